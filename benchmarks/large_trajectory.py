"""Large Linear layers along a short TRP trajectory: the time of each `RankPruner.step()` against a float64 SVD
of the same matrix and `torch.svd_lowrank` at the same rank (which has no guarantee: its energy error is shown).

    python benchmarks/large_trajectory.py [--shapes 2048x5504 2048x2048] [--steps 4] [--smoke] [--out PATH]

Llama-shaped matrices scaled to a small CPU (an MLP projection and an attention projection of a 2048-wide
model). Weights: rank 256 with decaying singular values plus a small dense part, as TRP leaves them; between
steps every weight moves by a small dense Gaussian update (an SGD step). The first step has no warm state (the
certified random blocks, else the full solve); the later ones are warm-started (docs/guides/large-layers.md).
On the last step's weights, timed in the same process: the float64 SVD, from which the exact energy-rule rank
and truncation check the pruner's result, and svd_lowrank with `q = rank + 10`, two power iterations."""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import harness  # puts the checkout on sys.path
import trp
from trp_kernels import reference

ENERGY = 0.9
UPDATE = 1e-3  # the dense update between steps, relative to the weights' RMS


def weights(p, q, gen):
    r = 256
    U = torch.linalg.qr(torch.randn(p, r, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(q, r, generator=gen)).Q
    s = torch.logspace(0, -1.5, r)
    W = (U * s) @ V.T
    return W + 1e-3 * W.square().mean().sqrt() * torch.randn(p, q, generator=gen) * 10


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(p, q, steps, gen):
    """One row: the trajectory's step times and routes, then the references on the last weights."""
    linear = nn.Linear(q, p, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weights(p, q, gen))
    pruner = trp.RankPruner(nn.Sequential(linear), "channel", energy=ENERGY, layers=[nn.Linear])
    times, routes = [], []
    for t in range(steps):
        if t:
            with torch.no_grad():
                w = linear.weight
                w.add_(UPDATE * w.square().mean().sqrt() * torch.randn(w.shape, generator=gen))
        W = linear.weight.detach().clone()
        _, dt = timed(pruner.step)
        times.append(round(dt, 3))
        certified = bool(pruner.engine.groups[0].warm.warm[0])  # took the random blocks / the warm step
        routes.append(("warm" if certified else "fallback") if t else ("random blocks" if certified else "full"))
        print(f"{p}x{q} step {t}: {dt:.2f} s ({routes[-1]}), rank {pruner.ranks['0']}", flush=True)
    W_low, rank = linear.weight.detach(), pruner.ranks["0"]
    (U, S, Vh), svd_s = timed(lambda: torch.linalg.svd(W.double(), full_matrices=False))
    k = int(reference.energy_rank(S[None], ENERGY)[0])
    ref = (U[:, :k] * S[:k]) @ Vh[:k]
    error = float((W_low.double() - ref).norm() / S.norm())
    (_, S_low, _), low_s = timed(lambda: torch.svd_lowrank(W, q=k + 10, niter=2))
    total = S.square().sum()
    energy_error = float((S[:k].square().sum() - S_low[:k].double().square().sum()) / total)
    later = statistics.median(times[1:]) if len(times) > 1 else None
    row = {"shape": f"{p}x{q}", "rank": rank, "exact_rank": k, "projection_error": error, "step_s": times,
           "route": routes, "svd_f64_s": round(svd_s, 3), "svd_lowrank_s": round(low_s, 3),
           "svd_lowrank_energy_error": energy_error, "warm_median_s": later,
           "speedup_vs_svd": round(svd_s / later, 1) if later else None,
           "first_speedup_vs_svd": round(svd_s / times[0], 1)}
    print(row, flush=True)
    return row


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    header = ["shape", "rank (exact)", "first step s (route)", "later steps s (median)", "float64 SVD s",
              "SVD / later step", "SVD / first step", "projection error", "svd_lowrank s",
              "svd_lowrank energy error"]
    rows = []
    for r in doc["rows"]:
        later = ", ".join(f"{t:.2f}" for t in r["step_s"][1:])
        rows.append([r["shape"], f"{r['rank']} ({r['exact_rank']})", f"{r['step_s'][0]:.2f} ({r['route'][0]})",
                     f"{later} ({r['warm_median_s']:.2f}; {'/'.join(r['route'][1:])})", f"{r['svd_f64_s']:.1f}",
                     f"{r['speedup_vs_svd']}x", f"{r['first_speedup_vs_svd']}x", f"{r['projection_error']:.1e}",
                     f"{r['svd_lowrank_s']:.2f}", f"{r['svd_lowrank_energy_error']:.1e}"])
    return harness.markdown_table(header, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["2048x5504", "2048x2048"], help="p x q of each layer")
    parser.add_argument("--steps", type=int, default=4, help="projections along the trajectory (>= 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="one 600 x 700 layer, 2 steps, into the temporary directory: checks the script works")
    parser.add_argument("--out", default=None, help="default: results/large_trajectory_cpu.json")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a cold step and a warm one)")
    if args.smoke:
        args.shapes, args.steps = ["600x700"], 2
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "large_trajectory_cpu_smoke.json") if args.smoke \
            else str(harness.ROOT / "results" / "large_trajectory_cpu.json")
    gen = torch.Generator().manual_seed(0)
    results = harness.Results(args.out, "large_trajectory", energy=ENERGY, update=UPDATE)
    for shape in args.shapes:
        p, q = (int(v) for v in shape.lower().split("x"))
        results.add(measure(p, q, args.steps, gen))
    results.finish()
    print(render(results.doc))


if __name__ == "__main__":
    main()
