"""What budgeted TRP (`trp train --target-speedup`) costs in accuracy, per recipe: ResNet-20 trained at a
conv-MAC speed-up target and decomposed at it with no fine-tuning, against a baseline trained with the same
seed and schedule. The cost of a recipe is the baseline's accuracy minus the decomposed network's, per seed
(paired), then mean and standard deviation over the seeds.

    python benchmarks/recipe_table.py --jobs 2                                   # the digits, the sweep
    python benchmarks/recipe_table.py --jobs 2 --data arrays:data/fashion.npz \\
        --recipes baseline before both defaults --stem recipe_table_fashion     # a data set never tuned on
    python benchmarks/recipe_table.py --jobs 2 --seeds 10 11 12 13 14 \\
        --recipes baseline defaults --stem recipe_table_selection               # the seeds the recipe was chosen on

The recipes differ in how the controller steers the ranks (trp.prune.budget.SpeedupController): the share of
training over which the goal ramps to the target (--budget-ramp) and the proportional gain (--budget-gain); and
in the nuclear-norm weight (--nuclear, 0 by default with a target).
Everything else is `trp train`'s defaults at --image-size 16 and --epochs 20, in deterministic mode (one
thread per run: --jobs runs that many at once). benchmarks/fashion_mnist.py writes the Fashion-MNIST file."""
import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch

import harness
import trp
from trp.app.config import DEFAULTS, TrainConfig
from trp.app.train import Run, evaluate

# recipe -> overrides of trp train's defaults ({}: the defaults as they are); every other recipe names its
# controller settings and nuclear weight, so that its rows mean the same whatever the defaults become
RECIPES = {
    "baseline": {"trp": False},
    "before": {"budget_ramp": 0.25, "budget_gain": 1.0, "nuclear": 3e-4},  # the first defaults' settings
    "ramp": {"budget_ramp": 0.5, "budget_gain": 1.0, "nuclear": 3e-4},
    "gain": {"budget_ramp": 0.25, "budget_gain": 0.2, "nuclear": 3e-4},
    "both": {"budget_ramp": 0.5, "budget_gain": 0.2, "nuclear": 3e-4},
    "defaults": {},
    "period10": {"period": 10},
    "ramp03": {"budget_ramp": 0.3, "budget_gain": 0.2, "nuclear": 0.0},  # tried as a default, not kept
}
NAMES = {"baseline": "Baseline (no TRP)", "before": "TRP+Nu at the first defaults' settings, today's controller",
         "ramp": "TRP+Nu, slower ramp", "gain": "TRP+Nu, lower gain", "both": "TRP+Nu, slower ramp and lower gain",
         "defaults": "TRP, the defaults", "period10": "TRP, the defaults, projecting every 10 steps",
         "ramp03": "TRP, the goal reached at 30% of the run"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="digits", help="digits or arrays:FILE.npz (default digits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--target", type=float, default=2.2, help="the conv-MAC speed-up (default 2.2)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--scheme", default="channel")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default 1)")
    p.add_argument("--out", default="results")
    p.add_argument("--stem", default="recipe_table")
    args = p.parse_args(argv)
    if "baseline" not in args.recipes:
        p.error("the cost is paired with the baseline: --recipes needs baseline")
    return args


def run_one(job):
    """One training run and its decomposition at the target: a row of the results file."""
    args, recipe, seed = job
    overrides = RECIPES[recipe]
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**dict(model="resnet20", data=args.data, image_size=args.image_size, epochs=args.epochs,
                                    scheme=args.scheme, seed=seed, deterministic=True, out=out,
                                    target_speedup=None if overrides.get("trp") is False else args.target),
                             **overrides})
        t0 = time.perf_counter()
        run = Run(cfg, log=lambda msg: None, progress=False).fit()
        seconds = time.perf_counter() - t0
    acc = evaluate(run.model, run.test_loader, "cpu")
    row = {"recipe": recipe, "seed": seed, "acc_before": acc, "acc_after": acc, "speedup": 1.0,
           "seconds": round(seconds, 1)}
    if run.pruner is not None:
        size = tuple(run.bundle.input_size[1:])
        compact = trp.decompose(run.model, args.scheme, target_speedup=args.target, input_size=size)
        row.update(acc_after=evaluate(compact, run.test_loader, "cpu"), speedup=compact.trp_budget["speedup"],
                   trained_speedup=run.pruner.budget.speedup, ramp=cfg.budget_ramp, gain=cfg.budget_gain,
                   nuclear=cfg.nuclear, period=cfg.period)
    print(f"  {recipe:9s} seed {seed}: {row['acc_after']:.2f}% at {row['speedup']:.2f}x in {seconds:.0f}s",
          flush=True)
    return row


def summary(rows):
    """{recipe: statistics} of the per-seed rows, the cost paired with the baseline's seeds."""
    base = {r["seed"]: r["acc_after"] for r in rows if r["recipe"] == "baseline"}
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["seed"])
        paired = [r for r in mine if r["seed"] in base]
        costs = [base[r["seed"]] - r["acc_after"] for r in paired]
        out[recipe] = {"seeds": [r["seed"] for r in mine], "before": [r["acc_before"] for r in mine],
                       "acc": [r["acc_after"] for r in mine], "cost": costs,
                       "trained": [r["trained_speedup"] for r in mine if "trained_speedup" in r],
                       "speedup": [r["speedup"] for r in mine],
                       "ramp": mine[0].get("ramp"), "gain": mine[0].get("gain"), "nuclear": mine[0].get("nuclear")}
    return out


def _ms(values, fmt="{:.2f}"):
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return fmt.format(mean) + (" ± " + fmt.format(statistics.stdev(values)) if len(values) > 1 else "")


def render(doc):
    """The results file's table as markdown (benchmarks/pages.py and the script's own output)."""
    lines = ["| recipe | ramp | gain | nuclear | acc trained (%) | acc after, no fine-tuning (%) | cost vs baseline "
             "(points) | speed-up in training | speed-up decomposed (conv MACs) | seeds |", "|---" * 10 + "|"]
    for recipe, s in summary(doc["rows"]).items():
        ramp, gain, nuclear = ("-" if s[k] is None else f"{s[k]:g}" for k in ("ramp", "gain", "nuclear"))
        cost = "0 (reference)" if recipe == "baseline" else _ms(s["cost"])
        trained = f"{_ms(s['trained'])}x" if s["trained"] else "-"
        lines.append(f"| {NAMES[recipe]} | {ramp} | {gain} | {nuclear} | {_ms(s['before'])} | {_ms(s['acc'])} | "
                     f"{cost} | {trained} | {_ms(s['speedup'])}x | {', '.join(map(str, s['seeds']))} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    settings = {"model": "resnet20", "data": args.data, "image_size": args.image_size, "epochs": args.epochs,
                "scheme": args.scheme, "target": args.target, "seeds": args.seeds, "deterministic": True,
                "defaults": {k: DEFAULTS[k] for k in ("lr", "batch_size", "period", "energy", "budget_ramp",
                                                      "budget_gain")},
                "recipes": {r: RECIPES[r] for r in args.recipes}}
    results = harness.Results(os.path.join(args.out, args.stem + ".json"), "recipe_table", "cpu",
                              settings=settings)
    jobs = [(args, recipe, seed) for seed in args.seeds for recipe in args.recipes]
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for row in pool.imap_unordered(run_one, jobs):
            results.add(row)
    results.doc["rows"].sort(key=lambda r: (args.recipes.index(r["recipe"]), r["seed"]))
    results.finish(seconds=round(time.perf_counter() - t0, 1))
    print(render(results.doc))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
