"""TRP for transformers (issue 13): the paper's table for a small ViT on the embedded digits.

Trains vit_tiny (patch 4, width 64, depth 4, 4 heads, MLP 128: trp.models.ViT) with the same seeds, epochs
and schedule: baseline (no TRP), TRP and TRP + nuclear norm, on the Linear-like matrices of its transformer
blocks (the q, k, v rows of each attention's in_proj_weight, out_proj, the MLP; channel scheme, the only one
a Linear has). Then, with no fine-tuning: the baseline decomposed data-free at energy e and at the ranks
TRP + nuclear reached (the paper's Table 2 comparison), and each TRP model decomposed at its energy. Each
row: accuracy before / after decomposition, the speed-up in conv + Linear + attention MACs (trp.report's
count for transformers), the parameter reduction and the CPU latency ratio (batch 32), as mean and spread
over the seeds. It reuses paper_table's training and measurement. Writes results/vit_table.json
(benchmarks/pages.py turns it into the documentation's page).

    python benchmarks/vit_table.py             # docs/benchmarks/paper.md's table
    python benchmarks/vit_table.py --quick     # a smoke run (seconds), not for the docs
    python benchmarks/vit_table.py --energy 0.97   # another operating point: results/vit_table_e0.97.json
"""
import argparse
import shlex
import sys
import tempfile
import time

import torch

import harness  # noqa: F401  (first: puts the checkout on sys.path)
import paper_table

ROWS = ["baseline", "trp_channel", "trp_nu_channel"]  # trained rows (paper_table.TRAINED keys)
LABELS = {
    "baseline": "Baseline (no decomposition)",
    "datafree_channel": "Baseline, data-free decomposition at energy e",
    "datafree_channel_matched": "Baseline, data-free decomposition at the TRP+Nu ranks",
    "trp_channel": "TRP",
    "trp_nu_channel": "TRP+Nu",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="SGD; the CNNs' 0.05 trains this ViT unsteadily")
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--nuclear", type=float, default=3e-4)
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 1 epoch, 128 samples")
    args = p.parse_args(argv)
    args.rows, args.sweep = ROWS, []  # paper_table.run_table's options: these rows, no energy sweep,
    args.deterministic, args.targets = False, {}  # the table's settings (--threads), no budget rows
    args.subset = 128 if args.quick else None
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 1
    return args


def markdown(summary, args):
    params_base = summary["baseline"]["params"]["mean"]
    lines = ["| row | acc before (%) | acc after, no fine-tuning (%) | speed-up (conv + linear + attention "
             f"MACs) | params (reduction) | CPU latency ratio (batch {args.latency_batch}) |",
             "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        params = s["params"]["mean"]
        lines.append(f"| {LABELS[key]} | {paper_table._ms(s['acc_before'])} | {paper_table._ms(s['acc_after'])} | "
                     f"{paper_table._ms(s['speedup'])}x | {params / 1e6:.3f}M ({params_base / params:.2f}x) | "
                     f"{paper_table._ms(s['latency_ratio'])}x |")
    return "\n".join(lines)


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py), with the options of the
    command that wrote it."""
    return markdown(paper_table.summary_of(doc), parse_args(shlex.split(doc["command"])[2:]))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trp_vit_") as workdir:
        rows, _ = paper_table.run_table(args, workdir)
    summary = {key: paper_table.summarize(rows[key]) for key in LABELS if key in rows}
    elapsed = time.perf_counter() - t0
    table = markdown(summary, args)
    stem = "vit_table" + ("" if args.energy == 0.9 else f"_e{args.energy}") + ("_quick" if args.quick else "")
    paper_table.save_results(args, "vit_table", stem, summary, elapsed,
                             {"threads": args.threads, "macs": "conv + linear + attention"},
                             row_extra=lambda key: {"label": LABELS[key]})
    print(table)
    print(f"\n{args.model} on digits {args.image_size}x{args.image_size}, {args.epochs} epochs, lr {args.lr}, "
          f"seeds {args.seeds}, energy {args.energy}: {elapsed / 60:.1f} min; wrote {args.out}/{stem}.json")
    return paper_table.exit_code(summary)


if __name__ == "__main__":
    sys.exit(main())
