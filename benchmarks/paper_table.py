"""The paper's central experiment on the embedded digits data (issue: TRP vs data-free decomposition).

Trains, with the same seeds, epochs and schedule:
  baseline (no TRP); TRP channel; TRP + nuclear channel; TRP spatial; TRP + nuclear spatial; TRP ND;
  TRP + nuclear ND (network decoupling)
and evaluates, with no fine-tuning:
  - the baseline undecomposed, and decomposed data-free at energy e ("Zhang et al." channel row,
    "Jaderberg et al." spatial row, network decoupling), and decomposed data-free at the ranks that TRP +
    nuclear reached (the same speed-up as the TRP row: the paper's Table 2 comparison);
  - every TRP model decomposed at the energy it was trained with.
Each row: accuracy before / after decomposition, the paper's speed-up (conv MAC ratio), parameters, CPU
latency ratio (batch 32), as mean and spread over the seeds. Then an energy sweep: TRP + nuclear (channel)
trained and decomposed at several energies, against data-free decomposition of the baseline at the same
energies. Writes results/paper_table.json and results/paper_table.png; benchmarks/pages.py turns the JSON into the
documentation's page.

    python benchmarks/paper_table.py                 # docs/benchmarks/paper.md's table (about 22 minutes, 2-core CPU)
    python benchmarks/paper_table.py --quick         # a smoke run (seconds), not for the docs
    python benchmarks/paper_table.py --rows baseline trp_nd trp_nu_nd   # only these trained rows (and the
        data-free rows of their schemes; the sweep needs baseline and trp_nu_channel), written to
        results/paper_table_rows-baseline-trp_nd-trp_nu_nd.*
"""
import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
from trp.app import setup  # noqa: E402
from trp.app.config import TrainConfig  # noqa: E402
from trp.app.train import Run, evaluate  # noqa: E402
from trp.deploy.decompose import factorized_layers  # noqa: E402

TRAINED = {  # row key -> (label, TrainConfig overrides)
    "baseline": ("Baseline", dict(trp=False, nuclear=0.0)),
    "trp_channel": ("TRP channel", dict(scheme="channel", nuclear=0.0)),
    "trp_nu_channel": ("TRP+Nu channel", dict(scheme="channel")),
    "trp_spatial": ("TRP spatial", dict(scheme="spatial", nuclear=0.0)),
    "trp_nu_spatial": ("TRP+Nu spatial", dict(scheme="spatial")),
    "trp_nd": ("TRP ND", dict(scheme="nd", nuclear=0.0)),
    "trp_nu_nd": ("TRP+Nu ND", dict(scheme="nd")),
    # network decoupling with one order for every layer ("nd" picks the cheaper per layer)
    "trp_nu_nd_pointwise": ("TRP+Nu ND pointwise first", dict(scheme="nd_pointwise")),
    "trp_nu_nd_depthwise": ("TRP+Nu ND depthwise first", dict(scheme="nd_depthwise")),
    # budgeted TRP (trp.budget): trained towards and decomposed at --target-channel / --target-spatial
    "trp_channel_budget": ("TRP channel at target", dict(scheme="channel", nuclear=0.0, budget=True)),
    "trp_nu_channel_budget": ("TRP+Nu channel at target", dict(scheme="channel", budget=True)),
    "trp_spatial_budget": ("TRP spatial at target", dict(scheme="spatial", nuclear=0.0, budget=True)),
    "trp_nu_spatial_budget": ("TRP+Nu spatial at target", dict(scheme="spatial", budget=True)),
}
BUDGET_ROWS = [k for k, (_, o) in TRAINED.items() if o.get("budget")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--nuclear", type=float, default=3e-4)
    p.add_argument("--sweep", type=float, nargs="*", default=[0.75, 0.9, 0.97])
    p.add_argument("--latency-batch", type=int, default=32)
    p.add_argument("--out", default="results")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 1 epoch, 128 samples")
    p.add_argument("--rows", nargs="+", choices=list(TRAINED), default=list(TRAINED),
                   help="trained rows to run (default: all); data-free rows follow from baseline + a scheme")
    p.add_argument("--target-channel", type=float, default=2.2, help="speed-up of the channel budget rows")
    p.add_argument("--target-spatial", type=float, default=2.8, help="speed-up of the spatial budget rows")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="do not run in trp train's --deterministic mode (one thread, deterministic algorithms)")
    p.add_argument("--stem", help="results file name stem (default: from --rows)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the per-seed rows of these results files (runs of other seeds) instead of "
                        "training")
    args = p.parse_args(argv)
    args.targets = {"channel": args.target_channel, "spatial": args.target_spatial}
    args.rows = [k for k in TRAINED if k in args.rows]  # table order, no repeats
    if args.quick:
        args.seeds, args.epochs, args.sweep, args.subset = args.seeds[:1], 1, [0.8, 0.9], 128
    else:
        args.subset = None
    return args


def train(args, key, seed, energy, workdir):
    label, overrides = TRAINED[key]
    overrides = dict(overrides)
    if overrides.pop("budget", False):
        overrides["target_speedup"] = args.targets[overrides["scheme"]]
    settings = dict(deterministic=args.deterministic, model=args.model, data="digits", image_size=args.image_size,
                    subset=args.subset,
                    energy=energy, nuclear=args.nuclear, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, seed=seed, device="cpu",
                    out=os.path.join(workdir, f"{key}_e{energy}_s{seed}"))
    cfg = TrainConfig(**{**settings, **overrides})
    t0 = time.perf_counter()
    run = Run(cfg, log=lambda msg: None, progress=False).fit()
    print(f"  trained {label:16s} energy {energy} seed {seed}: test {run.history[-1]['test_acc']:.2f}% "
          f"in {time.perf_counter() - t0:.0f}s", flush=True)
    return run


def measure(args, dense, compact, test_loader, input_size):
    """Accuracy after decomposition, speed-up, params, latency ratio of one decomposed model."""
    rep = trp.report(dense, compact, input_size, latency=False)
    lat_size = (args.latency_batch, *input_size)
    lat_dense = trp.measure_latency(dense, lat_size, warmup=3, repeats=15)
    lat_compact = trp.measure_latency(compact, lat_size, warmup=3, repeats=15)
    t = rep.totals
    return {"acc_after": evaluate(compact, test_loader, "cpu"), "speedup": t["speedup"],
            "params": t["params_compact"], "latency_ratio": lat_dense / lat_compact}


def ranks_of(compact):
    return {name: m.rank for name, m in factorized_layers(compact).items()}


def run_table(args, workdir):
    rows = {}  # row key -> list of per-seed dicts

    def add(key, **values):
        rows.setdefault(key, []).append(values)

    sweep = []
    for seed in args.seeds:
        runs = {key: train(args, key, seed, args.energy, workdir) for key in args.rows}
        first = next(iter(runs.values()))
        input_size = tuple(first.bundle.input_size)[-3:]  # (C, H, W)
        loader = first.test_loader
        trp_compacts = {key: trp.decompose(runs[key].model, TRAINED[key][1]["scheme"], **criterion(args, key),
                                           input_size=input_size)
                        for key in runs if key != "baseline"}
        base = runs.get("baseline")
        if base is not None:
            dense_acc = evaluate(base.model, loader, "cpu")
            add("baseline", acc_before=dense_acc, acc_after=dense_acc, speedup=1.0,
                params=trp.count_params(base.model), latency_ratio=1.0)
            for scheme in dict.fromkeys(TRAINED[k][1]["scheme"] for k in trp_compacts if k not in BUDGET_ROWS):
                compact = trp.decompose(base.model, scheme, energy=args.energy)
                add(f"datafree_{scheme}", acc_before=dense_acc,
                    **measure(args, base.model, compact, loader, input_size))
                if f"trp_nu_{scheme}" in trp_compacts:
                    matched = trp.decompose(base.model, scheme, rank=ranks_of(trp_compacts[f"trp_nu_{scheme}"]))
                    add(f"datafree_{scheme}_matched", acc_before=dense_acc,
                        **measure(args, base.model, matched, loader, input_size))
            for scheme in dict.fromkeys(TRAINED[k][1]["scheme"] for k in trp_compacts if k in BUDGET_ROWS):
                compact = trp.decompose(base.model, scheme, target_speedup=args.targets[scheme],
                                        input_size=input_size)
                add(f"datafree_{scheme}_budget", acc_before=dense_acc,
                    **measure(args, base.model, compact, loader, input_size))
            if seed == args.seeds[0] and "trp_nu_channel" in runs:
                sweep = run_sweep(args, workdir, seed, base, runs["trp_nu_channel"], input_size)
        for key, compact in trp_compacts.items():
            model = runs[key].model
            add(key, acc_before=evaluate(model, loader, "cpu"),
                **measure(args, model, compact, loader, input_size))
    return rows, sweep


def criterion(args, key):
    """How row `key`'s TRP model is decomposed: at its target speed-up, or at the energy it trained with."""
    if key in BUDGET_ROWS:
        return {"target_speedup": args.targets[TRAINED[key][1]["scheme"]]}
    return {"energy": args.energy}


def run_sweep(args, workdir, seed, base, trp_run_at_default, input_size):
    """TRP + nuclear channel trained and decomposed at each energy vs data-free baseline decomposition."""
    points = []
    for energy in args.sweep:
        trained = trp_run_at_default if energy == args.energy else train(args, "trp_nu_channel", seed,
                                                                         energy, workdir)
        loader = base.test_loader
        trp_compact = trp.decompose(trained.model, "channel", energy=energy)
        free_compact = trp.decompose(base.model, "channel", energy=energy)
        points.append({"energy": energy,
                       "trp_nu": measure(args, trained.model, trp_compact, loader, input_size),
                       "datafree": measure(args, base.model, free_compact, loader, input_size)})
    return points


LABELS = {
    "baseline": "Baseline (no decomposition)",
    "datafree_channel": "Baseline, data-free channel (Zhang et al.)",
    "datafree_channel_matched": "Baseline, data-free channel at TRP+Nu ranks",
    "datafree_spatial": "Baseline, data-free spatial (Jaderberg et al.)",
    "datafree_spatial_matched": "Baseline, data-free spatial at TRP+Nu ranks",
    "trp_channel": "TRP channel",
    "trp_nu_channel": "TRP+Nu channel",
    "trp_spatial": "TRP spatial",
    "trp_nu_spatial": "TRP+Nu spatial",
    "datafree_nd": "Baseline, data-free ND (network decoupling)",
    "datafree_nd_matched": "Baseline, data-free ND at TRP+Nu ND ranks",
    "trp_nd": "TRP ND",
    "trp_nu_nd": "TRP+Nu ND",
    "datafree_nd_pointwise": "Baseline, data-free ND, pointwise first",
    "datafree_nd_pointwise_matched": "Baseline, data-free ND pointwise first at TRP+Nu ranks",
    "trp_nu_nd_pointwise": "TRP+Nu ND, pointwise first in every layer",
    "datafree_nd_depthwise": "Baseline, data-free ND, depthwise first",
    "datafree_nd_depthwise_matched": "Baseline, data-free ND depthwise first at TRP+Nu ranks",
    "trp_nu_nd_depthwise": "TRP+Nu ND, depthwise first in every layer",
    "datafree_channel_budget": "Baseline, data-free channel at the target speed-up",
    "trp_channel_budget": "TRP channel, target speed-up",
    "trp_nu_channel_budget": "TRP+Nu channel, target speed-up",
    "datafree_spatial_budget": "Baseline, data-free spatial at the target speed-up",
    "trp_spatial_budget": "TRP spatial, target speed-up",
    "trp_nu_spatial_budget": "TRP+Nu spatial, target speed-up",
}


def summarize(per_seed):
    out = {}
    for field in per_seed[0]:
        vals = [r[field] for r in per_seed]
        out[field] = {"mean": statistics.fmean(vals),
                      "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}
    return out


def _ms(stat, fmt="{:.2f}"):
    return (fmt.format(stat["mean"]) + (" ± " + fmt.format(stat["std"]) if stat["std"] else ""))


def markdown(summary, sweep, args):
    lines = ["| row | acc before (%) | acc after, no fine-tuning (%) | speed-up (conv MACs) | params | "
             f"CPU latency ratio (batch {args.latency_batch}) |", "|---|---|---|---|---|---|"]
    for key, s in summary.items():
        label = LABELS[key]
        lines.append(f"| {label} | {_ms(s['acc_before'])} | {_ms(s['acc_after'])} | "
                     f"{_ms(s['speedup'])}x | {s['params']['mean'] / 1e6:.3f}M | "
                     f"{_ms(s['latency_ratio'])}x |")
    if not sweep:
        return "\n".join(lines)
    lines += ["", "| energy | TRP+Nu channel: acc after / speed-up | baseline data-free channel: "
              "acc after / speed-up |", "|---|---|---|"]
    for pt in sweep:
        a, b = pt["trp_nu"], pt["datafree"]
        lines.append(f"| {pt['energy']} | {a['acc_after']:.2f}% / {a['speedup']:.2f}x | "
                     f"{b['acc_after']:.2f}% / {b['speedup']:.2f}x |")
    return "\n".join(lines)


def render(doc):
    """The tables of a results file of this script as markdown (benchmarks/pages.py): its rows and sweep, with
    the options of the command that wrote it (the latency batch of the header)."""
    args = parse_args(shlex.split(doc["command"])[2:])
    return markdown(summary_of(doc), doc.get("sweep") or [], args)


def summary_of(doc):
    """{row key: per-field statistics} of a results file, in its row order."""
    return {row["key"]: {k: v for k, v in row.items() if k not in ("key", "label")} for row in doc["rows"]}


def plot(summary, sweep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for key, s in summary.items():
        label = LABELS[key]
        ax1.errorbar(s["speedup"]["mean"], s["acc_after"]["mean"], xerr=s["speedup"]["std"],
                     yerr=s["acc_after"]["std"], fmt="s" if key.startswith("trp") else "o", capsize=3,
                     label=label)
    ax1.set_xlabel("speed-up (conv MAC ratio)")
    ax1.set_ylabel("test accuracy after decomposition, no fine-tuning (%)")
    ax1.set_title("TRP vs data-free decomposition (mean ± std over seeds)")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    for key, label in (("trp_nu", "TRP+Nu channel"), ("datafree", "baseline, data-free channel")):
        xs = [pt[key]["speedup"] for pt in sweep]
        ys = [pt[key]["acc_after"] for pt in sweep]
        ax2.plot(xs, ys, "o-", label=label)
        for pt, x, y in zip(sweep, xs, ys):
            ax2.annotate(f"e={pt['energy']}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax2.set_xlabel("speed-up (conv MAC ratio)")
    ax2.set_ylabel("test accuracy after decomposition (%)")
    ax2.set_title("energy sweep (channel scheme)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merged_rows(paths):
    """{row key: per-seed dicts} and the seeds of results files written by runs of other seeds."""
    import json
    rows, seeds = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        seeds += data["settings"]["seeds"]
        for row in data["rows"]:
            fields = [k for k in row if isinstance(row[k], dict) and "values" in row[k]]
            n = len(row[fields[0]]["values"])
            rows.setdefault(row["key"], []).extend({k: row[k]["values"][i] for k in fields} for i in range(n))
    return rows, seeds


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        rows, args.seeds = merged_rows(args.merge)
        sweep = []
    else:
        torch.set_num_threads(1 if args.deterministic else max(1, os.cpu_count() or 1))
        with tempfile.TemporaryDirectory(prefix="trp_paper_") as workdir, \
                setup.deterministic_mode(args.deterministic):
            rows, sweep = run_table(args, workdir)
    summary = {key: summarize(rows[key]) for key in LABELS if key in rows}
    elapsed = time.perf_counter() - t0
    table = markdown(summary, sweep, args)
    stem = "paper_table" + ("_quick" if args.quick else "")
    if args.stem:
        stem = args.stem
    elif args.rows != list(TRAINED):  # a partial run never overwrites the full table
        stem += "_rows-" + "-".join(args.rows)
    save_results(args, "paper_table", stem, summary, elapsed, {"rows": args.rows, "targets": args.targets,
                 "deterministic": args.deterministic}, sweep=sweep)
    plot(summary, sweep, os.path.join(args.out, stem + ".png"))
    print(table)
    print(f"\n{args.model} on digits {args.image_size}x{args.image_size}, {args.epochs} epochs, seeds "
          f"{args.seeds}, energy {args.energy}: {elapsed / 60:.1f} min; wrote {args.out}/{stem}.json/.png")
    return exit_code(summary)


def save_results(args, name, stem, summary, elapsed, settings, row_extra=lambda key: {}, **finish):
    """args.out/<stem>.json (the shared results schema: the run's settings, one row per table row)."""
    os.makedirs(args.out, exist_ok=True)
    base = {"model": args.model, "data": "digits", "image_size": args.image_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "energy": args.energy, "nuclear": args.nuclear,
            "seeds": args.seeds, "quick": args.quick}
    results = harness.Results(os.path.join(args.out, stem + ".json"), name, "cpu", settings={**base, **settings})
    for key, row in summary.items():
        results.rows.append({"key": key, **row_extra(key), **row})
    results.finish(seconds=round(elapsed, 1), **finish)


def exit_code(summary):
    """0 when every row's accuracy after decomposition is a number (a NaN means a broken run)."""
    return 0 if all(math.isfinite(s["acc_after"]["mean"]) for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
