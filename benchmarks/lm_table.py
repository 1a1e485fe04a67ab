"""Language models at a parameter budget: TRP against the post-hoc low-rank methods, by held-out perplexity.

    python benchmarks/lm_table.py                  # results/lm_table.json (GPT-2 and Llama configurations, 3 seeds)
    python benchmarks/lm_table.py --quick          # a smoke run (one seed, a few steps), not for the docs

Data: the Python documentation topics that ship with every Python (pydoc_data.topics), byte-level (256 tokens);
a fixed tenth of the topics (every tenth in sorted order) is held out. Models: small decoders from transformers
configurations (GPT-2 and Llama), random initialization, trained from scratch with AdamW on sequences of
`--seq` bytes. Every decomposition keeps the same parameter budget: each selected matrix (the blocks' attention
and MLP projections, trp's default selection) at the rank whose two factors hold `--budget` of its parameters.

Rows (per model and seed):
- dense: the trained baseline, not decomposed;
- SVD: the baseline decomposed by the plain truncated SVD of each weight;
- ASVD: activation scaling (calibration_method="scale") from calibration batches of training data;
- SVD-LLM whitening: the Cholesky factor of the inputs' second moment (calibration_method="whiten");
- TRP: trained with RankPruner (energy `--energy`, projection every `--period` steps), plain SVD at the budget;
- TRP+Nu: the same with the nuclear-norm term;
- TRP+Nu, whitened: the TRP+Nu model decomposed with whitening.
Each row's training cost is the seconds of the training it needs (the decompositions are timed apart)."""
import argparse
import json
import math
import time
from pathlib import Path

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402

CONFIGS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=256, bos_token_id=0, eos_token_id=0,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(num_hidden_layers=4, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)),
}
ROWS = ["dense", "svd", "asvd", "svdllm", "trp", "trp_nu", "trp_nu_whiten"]
LABELS = {"dense": "dense (not decomposed)", "svd": "SVD of the dense model", "asvd": "ASVD (activation scaling)",
          "svdllm": "SVD-LLM whitening", "trp": "TRP, then SVD", "trp_nu": "TRP+Nu, then SVD",
          "trp_nu_whiten": "TRP+Nu, then whitening"}
TRAINING = {"dense": "dense", "svd": "dense", "asvd": "dense", "svdllm": "dense", "trp": "trp", "trp_nu": "trp_nu",
            "trp_nu_whiten": "trp_nu"}


def corpus():
    """(train bytes, held-out bytes) as uint8 tensors: every tenth topic in sorted order is held out."""
    import pydoc_data.topics as topics
    names = sorted(topics.topics)
    held = set(names[::10])
    join = lambda keep: "\n\n".join(topics.topics[n] for n in names if keep(n)).encode()  # noqa: E731
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(join(lambda n: n not in held)), as_tensor(join(lambda n: n in held))


def batches(data, seq, batch, gen):
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


def build(name, seed):
    import transformers
    model_cls, config_cls, cfg = CONFIGS[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg))


def loss_of(model, chunk):
    logits = model(chunk[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, held, seq):
    model.eval()
    n = (len(held) - 1) // seq
    chunks = torch.stack([held[i * seq:i * seq + seq + 1] for i in range(n)])
    total = sum(float(loss_of(model, chunks[i:i + 32])) * len(chunks[i:i + 32]) for i in range(0, n, 32))
    return math.exp(total / n)


def train(args, name, seed, train_data, kind):
    """(model, seconds): trained from scratch; kind "dense", "trp" or "trp_nu"."""
    model = build(name, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    pruner = None
    if kind != "dense":
        pruner = trp.RankPruner(model, "channel", energy=args.energy, period=args.period,
                                nuclear=args.nuclear if kind == "trp_nu" else 0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    t0 = time.perf_counter()
    for step, chunk in zip(range(args.steps), batches(train_data, args.seq, args.batch, gen)):
        for group in opt.param_groups:  # linear warm-up, cosine decay
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        if pruner is not None:
            pruner.step()
        loss = loss_of(model, chunk)
        opt.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.regularize()
        opt.step()
    if pruner is not None:
        pruner.project()  # end on projected weights, as TRP leaves them for decomposition
    return model.eval(), time.perf_counter() - t0


def budget_ranks(model, budget):
    """{layer: rank} whose two factors hold `budget` of the layer's parameters."""
    ranks = {}
    for t in trp.plan_layers(model, "channel", warn=False).targets:
        out, inp = t.shape
        ranks[t.name] = max(1, int(budget * out * inp / (out + inp)))
    return ranks


def decompose(model, kind, ranks, calibration):
    method = {"asvd": "scale", "svdllm": "whiten", "trp_nu_whiten": "whiten"}.get(kind)
    extra = {"calibration": calibration, "calibration_method": method} if method else {}
    return trp.decompose(model, "channel", rank=ranks, **extra).eval()


def run(args, results):
    """One results row per model, seed and table row, written as soon as it is measured (a cut run keeps them)."""
    train_data, held = corpus()
    for seed in args.seeds:
        for name in args.models:
            trained = {kind: train(args, name, seed, train_data, kind) for kind in ("dense", "trp", "trp_nu")}
            ranks = budget_ranks(trained["dense"][0], args.budget)
            gen = torch.Generator().manual_seed(2000 + seed)
            calibration = [next(batches(train_data, args.seq, args.batch, gen))[:, :-1]
                           for _ in range(args.calibration_batches)]
            for row in ROWS:
                model, train_s = trained[TRAINING[row]]
                t0 = time.perf_counter()
                net = model if row == "dense" else decompose(model, row, ranks, calibration)
                dec_s = time.perf_counter() - t0
                ppl = perplexity(net, held, args.seq)
                results.add({"model": name, "row": row, "seed": seed, "ppl": ppl, "train_s": train_s,
                             "decompose_s": dec_s, "params": trp.count_params(net)})
                print(f"{name} seed {seed} {LABELS[row]:28s}: held-out perplexity {ppl:.3f} "
                      f"(train {train_s:.0f} s, decompose {dec_s:.1f} s)", flush=True)


def summarize(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def markdown(rows):
    """Per model and table row: mean ± std over the seeds the rows hold."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["row"]), []).append(r)

    def cell(key, fmt, vals):
        s = summarize([v[key] for v in vals])
        return fmt.format(s["mean"]) + (f" ± {fmt.format(s['std'])}" if len(vals) > 1 else "")
    return harness.markdown_table(
        ["model", "row", "seeds", "held-out perplexity", "parameters", "training (s)", "decomposition (s)"],
        [[name, LABELS[row], len(vals), cell("ppl", "{:.3f}", vals), f"{vals[0]['params'] / 1e6:.3f}M",
          cell("train_s", "{:.0f}", vals), cell("decompose_s", "{:.1f}", vals)]
         for (name, row), vals in groups.items()])


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    s = doc["settings"]
    return (markdown(doc["rows"]) + f"\n\n{s['steps']} AdamW steps of {s['batch']} x {s['seq']} bytes, parameter "
            f"budget {s['budget']:.0%} of each selected matrix, TRP energy {s['energy']} every {s['period']} "
            f"steps, nuclear weight {s['nuclear']}, {s['calibration_batches']} calibration batches.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--energy", type=float, default=0.98)
    p.add_argument("--period", type=int, default=5)
    p.add_argument("--nuclear", type=float, default=1e-4)
    p.add_argument("--budget", type=float, default=0.5, help="fraction of each matrix's parameters kept")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, 20 steps")
    p.add_argument("--out", default=str(harness.ROOT / "results" / "lm_table.json"))
    p.add_argument("--markdown", metavar="JSON", help="only print the table of an existing results file")
    args = p.parse_args(argv)
    if args.markdown:
        doc = json.loads(Path(args.markdown).read_text())
        print(render(doc))
        return
    if args.quick:
        args.seeds, args.steps, args.calibration_batches = args.seeds[:1], 20, 2
        args.out = str(Path(args.out).with_name("lm_table_quick.json"))
    torch.set_num_threads(torch.get_num_threads())
    settings = {k: getattr(args, k) for k in ("models", "seeds", "steps", "batch", "seq", "lr", "energy", "period",
                                             "nuclear", "budget", "calibration_batches", "quick")}
    results = harness.Results(args.out, "lm_table", "cpu", settings=settings)
    t0 = time.perf_counter()
    run(args, results)
    results.finish(seconds=round(time.perf_counter() - t0, 1))
    print("\n" + render(results.doc))


if __name__ == "__main__":
    main()
