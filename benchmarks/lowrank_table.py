"""Projection of all TRP layers of a network: trp_kernels.lowrank_project (one call per shape group)
against (a) the per-layer loop of the released TRP code (one torch.linalg.svd per layer, rank chosen per
layer, reconstruction) and (b) batched torch.linalg.svd per shape group, in one process.

    .venv/bin/python benchmarks/lowrank_table.py [--device cpu|cuda] [--repeats-scale F] [--part P]
        [--threads N] [--out FILE]

Writes the JSON and prints a markdown table (median wall time of the repeats, ratios against (a)).
TRP layers: every Conv2d with a kernel other than 1x1 except the network's first conv.
Weights: "init" = the model's random initialisation; "trp" = TRP-like weights, each matrix projected
once at energy 0.9 and then perturbed by Gaussian noise of 5% of its entries' RMS (what the weights
look like a few SGD steps after a projection: a dominant low-rank part and a small full-rank tail).

TRP trajectory (the warm start, trp_kernels.WarmStart): a RankPruner (energy 0.9, nuclear 3e-4, period 1) on
the model, and between its step() calls an SGD-like update of every TRP weight (dense Gaussian, 1% of the
weight's RMS); at each step, on the same weights, (a) the per-layer loop, the full solve (lowrank_project
without a state, subgradient on, one call per group) and RankPruner.step() (warm), each the median of 3
interleaved rounds (the pruner's on copies of it); medians over the steps after the first (which is a full
solve for the pruner too)."""
import argparse
import copy
import statistics
import sys
import time

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
import trp_kernels  # noqa: E402
from trp._utils import timing  # noqa: E402
from trp.core.schemes import to_matrix  # noqa: E402
from trp_kernels import reference  # noqa: E402

ENERGY = 0.9
OWN_TABLES = ("trajectory", "settled", "paths", "widths")  # row kinds printed in their own tables, not markdown()
PARTS = ("static", "trajectory", "breakdown", "paths", "widths")
OUT_NAMES = {"trajectory": "lowrank_trajectory", "breakdown": "lowrank_breakdown", "paths": "lowrank_paths",
             "widths": "lowrank_widths"}


def workload(model_name, scheme, weights, seed=0):
    """The per-layer matrices of the model's TRP layers (in model order)."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": 1000} if model_name.startswith("torchvision:") else {}
    model = trp.models.build(model_name, **kwargs)
    layers = [model.get_submodule(name) for name, _ in trp.select_layers(model, scheme, layers="paper", warn=False)]
    mats = [to_matrix(m.weight.detach().float(), scheme).contiguous() for m in layers]
    if weights == "trp":
        gen = torch.Generator().manual_seed(seed + 1)
        out = []
        for M in mats:
            low = reference.lowrank_project(M[None].double(), ENERGY)[0][0].float()
            noise = torch.randn(M.shape, generator=gen) * (0.05 * float(M.square().mean().sqrt()))
            out.append((low + noise).contiguous())
        mats = out
    return mats


def group(mats):
    groups = {}
    for M in mats:
        groups.setdefault(tuple(M.shape), []).append(M)
    return {shape: torch.stack(ms) for shape, ms in groups.items()}


def per_layer_loop(mats):
    """(a) The released code's way: one SVD per layer, rank picked per layer, reconstruction."""
    out = []
    for M in mats:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        s2 = S * S
        cum = torch.cumsum(s2, 0)
        k = int((cum < ENERGY * cum[-1]).sum()) + 1
        out.append((U[:, :k] * S[:k]) @ Vh[:k])
    return out


def batched_svd(groups):
    """(b) One batched torch.linalg.svd per shape group in the weights' dtype, rank and reconstruction
    batched too (the reference runs its SVD in float64 for accuracy, which would not be a fair baseline)."""
    out = []
    for W in groups.values():
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        rank = reference.energy_rank(S, ENERGY)
        keep = (torch.arange(S.shape[-1], device=W.device) < rank[:, None]).to(W.dtype)
        out.append((U * (S * keep).unsqueeze(-2)) @ Vh)
    return out


def ours(groups):
    return [trp_kernels.lowrank_project(W, ENERGY) for W in groups.values()]


CASES = [
    ("resnet56", "channel", 9),
    ("torchvision:resnet50", "channel", 5),
    ("torchvision:resnet50", "spatial", 3),
]


def ours_solver(groups, solver):
    """lowrank_project's compiled kernel with a forced eigensolver ("jacobi": the shared-memory Jacobi
    kernel, n <= 64 on CUDA; "lapack": LAPACK on the CPU, cuSOLVER through ATen on CUDA)."""
    op = torch.ops.trp_kernels_C.lowrank_project_solver
    return [op(W, ENERGY, None, False, solver) for W in groups.values()]


SMOKE_CASES = [("resnet20", "channel", 1)]


def run(results, repeats_scale=1.0, weights_kinds=("init", "trp"), cases=CASES, device="cpu", budget=None):
    """Measures every case and adds one row per (case, weights) to `results` (written at once)."""
    solvers = ("jacobi", "lapack") if device == "cuda" and \
        trp_kernels.backend_info()["lowrank_project"]["compiled_cuda"] else ()
    for model_name, scheme, repeats in cases:
        repeats = max(1, int(round(repeats * repeats_scale)))
        for weights in weights_kinds:
            if budget is not None and budget.over():
                return False
            mats = [M.to(device) for M in workload(model_name, scheme, weights)]
            groups = group(mats)
            fractions = [float(r) / min(W.shape[1:]) for W in groups.values()
                         for r in trp_kernels.lowrank_project(W, ENERGY)[1]]
            t_loop, all_loop = timing.median_time(lambda: per_layer_loop(mats), repeats, device)
            t_bsvd, all_bsvd = timing.median_time(lambda: batched_svd(groups), repeats, device)
            t_ours, all_ours = timing.median_time(lambda: ours(groups), repeats, device)
            row = {
                "model": model_name, "scheme": scheme, "weights": weights, "layers": len(mats),
                "groups": {"x".join(map(str, s)): int(W.shape[0]) for s, W in groups.items()},
                "mean_rank_fraction": sum(fractions) / len(fractions),
                "loop_s": t_loop, "batched_svd_s": t_bsvd, "ours_s": t_ours,
                "speedup_vs_loop": t_loop / t_ours, "speedup_vs_batched_svd": t_bsvd / t_ours,
                "repeats": repeats, "raw": {"loop": all_loop, "batched_svd": all_bsvd, "ours": all_ours},
            }
            for solver in solvers:  # Jacobi kernel vs cuSOLVER (the Jacobi one applies to n <= 64 only)
                if solver == "jacobi" and max(min(W.shape[1:]) for W in groups.values()) > 64:
                    continue
                row[f"ours_{solver}_s"] = timing.median_time(lambda: ours_solver(groups, solver), repeats,
                                                              device)[0]
            results.add(row)
            print(f"{model_name} {scheme} {weights}: loop {t_loop*1e3:.1f} ms, batched svd "
                  f"{t_bsvd*1e3:.1f} ms, ours {t_ours*1e3:.1f} ms -> {row['speedup_vs_loop']:.1f}x",
                  file=sys.stderr, flush=True)
    return True


TRAJECTORY_CASES = [
    ("resnet56", "channel", 12),
    ("torchvision:resnet50", "channel", 5),
    ("torchvision:resnet50", "spatial", 4),
]
SGD_STEP = 0.01  # the update's RMS, relative to the weight's


def sgd_like_step(pruner, gen):
    """Moves every TRP weight by a dense Gaussian update of SGD_STEP times its RMS (in place)."""
    with torch.no_grad():
        for _, module in pruner.layers:
            w = module.weight
            noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
            w.add_(noise * (SGD_STEP * float(w.square().mean().sqrt())))


def trajectory_pruner(model_name, scheme, device="cpu", seed=0):
    """(RankPruner on the freshly initialised model, the generator of its SGD-like updates)."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": 1000} if model_name.startswith("torchvision:") else {}
    model = trp.models.build(model_name, **kwargs).to(device)
    pruner = trp.RankPruner(model, scheme, energy=ENERGY, period=1, nuclear=3e-4, layers="paper")
    return pruner, torch.Generator().manual_seed(seed + 1)


def trajectory(model_name, scheme, steps, device="cpu", seed=0, repeats=3):
    """One TRP trajectory row: per step, the per-layer loop, the full solve and RankPruner.step() on the
    same weights (see the module docstring)."""
    pruner, gen = trajectory_pruner(model_name, scheme, device, seed)
    times = {"loop": [], "cold": [], "step": []}
    warm = total = 0
    fractions = []
    for t in range(steps + 1):
        mats = [to_matrix(m.weight.detach(), scheme).contiguous() for _, m in pruner.layers]
        groups = group(mats)
        # `repeats` interleaved rounds on the same weights (the pruner's on copies, the last on itself): the
        # median of each is robust to a busy machine's outliers
        copies = [copy.deepcopy(pruner) for _ in range(repeats - 1)] + [pruner]
        for c in copies:  # what a pruner caches on its first step (its in-place views), as the original has
            c._inplace_groups()
        rounds = []
        for c in copies:
            rounds.append((timing.timed(lambda: per_layer_loop(mats), device),
                           timing.timed(lambda: [trp_kernels.lowrank_project(W, ENERGY, subgradient=True)
                                                  for W in groups.values()], device),
                           timing.timed(c.step, device)))
        del copies
        t_loop, t_cold, t_step = (statistics.median(r) for r in zip(*rounds))
        if t > 0:  # the first projection is a full solve for the pruner too
            for k, v in zip(times, (t_loop, t_cold, t_step)):
                times[k].append(v)
            states = [g.warm.warm for g in pruner._groups]
            warm += sum(int(s.sum()) for s in states)
            total += sum(s.numel() for s in states)
            fractions += [r / min(M.shape) for r, M in zip(pruner.ranks.values(), mats)]
        sgd_like_step(pruner, gen)
        print(f"  {model_name} {scheme} step {t}: loop {t_loop*1e3:.1f} ms, full solve {t_cold*1e3:.1f} ms, "
              f"RankPruner.step() {t_step*1e3:.1f} ms", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "scheme": scheme, "weights": "trajectory", "layers": len(pruner.layers),
            "steps": steps, "repeats": repeats, "sgd_step": SGD_STEP,
            "mean_rank_fraction": sum(fractions) / len(fractions),
            "warm_fraction": warm / total, "loop_s": med["loop"], "cold_s": med["cold"], "step_s": med["step"],
            "step_vs_loop": med["loop"] / med["step"], "cold_vs_loop": med["loop"] / med["cold"],
            "step_vs_cold": med["cold"] / med["step"], "raw": times}


def breakdown(model_name="resnet56", scheme="channel", settle=10, steps=12, device="cpu", inplace=True):
    """Where a settled RankPruner.step() goes: after `settle` trajectory steps (ranks settled), per step the
    whole step(), the time inside the projection functions (with their Python and dispatch: the in-place
    trp_kernels.inplace.lowrank_project_, or trp_kernels.lowrank_project_many for all groups when the pruner stacks
    them: inplace=False) and inside the compiled kernels they call; medians over `steps` steps."""
    pruner, gen = trajectory_pruner(model_name, scheme, device)
    pruner.inplace = inplace
    for _ in range(settle):
        pruner.step()
        sgd_like_step(pruner, gen)
    spent = {"op": 0.0, "kernel": 0.0}
    timed = [(trp_kernels, "lowrank_project_many", "op"), (trp_kernels.warm, "compiled_step", "kernel"),
             (trp_kernels.inplace, "lowrank_project_", "op"), (trp_kernels.inplace, "kernel", "kernel")]
    real = [getattr(module, name) for module, name, _ in timed]

    def timed_as(key, fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timing.sync(device)
                spent[key] += time.perf_counter() - t0
        return run

    rows = []
    for (module, name, key), fn in zip(timed, real):
        setattr(module, name, timed_as(key, fn))
    try:
        for _ in range(steps):
            mats = [to_matrix(m.weight.detach(), scheme).contiguous() for _, m in pruner.layers]
            t_loop = timing.timed(lambda: per_layer_loop(mats), device)
            spent.update(op=0.0, kernel=0.0)
            t_step = timing.timed(pruner.step, device)
            warm = all(bool(g.warm.warm.all()) for g in pruner._groups)
            rows.append((t_step, spent["op"], spent["kernel"], t_loop, warm))
            sgd_like_step(pruner, gen)
    finally:
        for (module, name, _), fn in zip(timed, real):
            setattr(module, name, fn)
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    path = pruner.path  # the one the pruner took
    return {"model": model_name, "scheme": scheme, "weights": "settled", "path": path,
            "settle": settle, "steps": steps,
            "all_warm_steps": sum(r[4] for r in rows), "step_s": med[0], "ops_s": med[1], "kernels_s": med[2],
            "ops_python_s": med[1] - med[2], "pruner_python_s": med[0] - med[1], "loop_s": med[3],
            "step_vs_loop": med[3] / med[0],
            "raw": {k: [r[i] for r in rows] for i, k in enumerate(("step", "ops", "kernels", "loop"))}}


PATH_CASES = [("torchvision:resnet50", "channel"), ("torchvision:resnet50", "spatial")]


def paths(model_name, scheme, repeats=3):
    """The CPU kernel's two paths per shape group with n >= 64 ("trp" weights, energy 0.9, subgradient on): the
    full solve (lowrank_project_solver "lapack" = one matrix per thread, "lapack_batched") and the warm step
    from the projected weights' basis after a 1% update (warm.compiled_step "per_matrix" / "batched")."""
    rows = []
    for shape, W in group(workload(model_name, scheme, "trp")).items():
        if min(shape) < 64:
            continue
        W_low, rank, _, basis = torch.ops.trp_kernels_C.lowrank_project_basis(W, ENERGY, None, True)
        state = trp_kernels.warm.next_basis(basis, rank)
        gen = torch.Generator().manual_seed(2)
        moved = W_low + SGD_STEP * float(W_low.square().mean().sqrt()) * torch.randn(W_low.shape, generator=gen)
        times = {}
        for name, solver in (("cold_per_matrix", "lapack"), ("cold_batched", "lapack_batched")):
            times[name] = timing.median_time(lambda: torch.ops.trp_kernels_C.lowrank_project_solver(
                W, ENERGY, None, True, solver), repeats)[0]
        for name, solver in (("warm_per_matrix", "per_matrix"), ("warm_batched", "batched")):
            times[name] = timing.median_time(lambda: trp_kernels.warm.compiled_step(
                moved, state, ENERGY, None, True, solver), repeats)[0]
        ok = trp_kernels.warm.compiled_step(moved, state, ENERGY, None, True, "per_matrix")[4]
        rows.append({"model": model_name, "scheme": scheme, "weights": "paths", "shape": list(W.shape),
                     "basis_width": state.shape[2], "warm_certified": int(ok.sum()),
                     **{f"{k}_s": v for k, v in times.items()}})
    return rows


WIDTH_SHAPES = [(64, 576), (256, 2304), (768, 768), (1536, 1536)]  # ResNet-56 channel, ResNet-50 channel/spatial
WIDTH_ENERGIES = (0.95, 0.9, 0.8, 0.7)


def widths(shapes=WIDTH_SHAPES, repeats=2):
    """Where the warm step stops paying (warm.MAX_FRACTION): per shape and basis width (the rank a full solve of
    a freshly initialised matrix keeps at each of WIDTH_ENERGIES), the full solve against the warm step after a
    1% update at that energy, one matrix, the one-matrix-per-thread kernels (fastest time of the repeats)."""
    rows = []
    for p, q in shapes:
        gen = torch.Generator().manual_seed(3)
        W0 = torch.randn(1, p, q, generator=gen) / q ** 0.5
        for energy in WIDTH_ENERGIES:
            W_low, rank, _, basis = torch.ops.trp_kernels_C.lowrank_project_basis(W0, energy, None, True)
            state = trp_kernels.warm.next_basis(basis, rank)
            W = W_low + SGD_STEP * float(W_low.square().mean().sqrt()) * torch.randn(W_low.shape, generator=gen)
            cold = min(timing.timed(lambda: torch.ops.trp_kernels_C.lowrank_project_solver(
                W, energy, None, True, "lapack")) for _ in range(repeats))
            warm_s = min(timing.timed(lambda: trp_kernels.warm.compiled_step(
                W, state, energy, None, True, "per_matrix")) for _ in range(repeats))
            ok = trp_kernels.warm.compiled_step(W, state, energy, None, True, "per_matrix")[4]
            rows.append({"model": "random init", "scheme": "-", "weights": "widths", "shape": [p, q],
                         "energy": energy, "basis_fraction": state.shape[2] / min(p, q),
                         "warm_certified": bool(ok.all()), "cold_s": cold, "warm_s": warm_s,
                         "warm_vs_cold": warm_s / cold})
    return rows


def widths_markdown(rows):
    return harness.markdown_table(
        ["matrix", "basis width / n", "full solve", "warm step", "warm / full", "certified"],
        [[f"{r['shape'][0]} x {r['shape'][1]}", f"{r['basis_fraction']:.2f}", f"{r['cold_s'] * 1e3:.1f} ms",
          f"{r['warm_s'] * 1e3:.1f} ms", f"{r['warm_vs_cold']:.2f}", "yes" if r["warm_certified"] else "no"]
         for r in rows])


def paths_markdown(rows):
    times = ("cold_per_matrix_s", "cold_batched_s", "warm_per_matrix_s", "warm_batched_s")
    return harness.markdown_table(
        ["network", "scheme", "group [B, p, q]", "basis width", "full solve, one matrix per thread",
         "full solve, batched", "warm step, one matrix per thread", "warm step, batched"],
        [[r["model"].split(":")[-1], r["scheme"], r["shape"], r["basis_width"]]
         + [f"{r[k] * 1e3:.1f} ms" for k in times] for r in rows])


def run_trajectories(results, cases=TRAJECTORY_CASES, device="cpu", budget=None, steps_scale=1.0):
    for model_name, scheme, steps in cases:
        if budget is not None and budget.over():
            return False
        results.add(trajectory(model_name, scheme, max(1, int(round(steps * steps_scale))), device))
    return True


def trajectory_markdown(rows):
    return harness.markdown_table(
        ["network", "scheme", "layers", "steps", "mean rank / n", "warm matrices", "(a) per-layer SVD loop",
         "full solve", "RankPruner.step() (warm)", "step vs (a)", "full solve vs (a)", "step vs full solve"],
        [[r["model"].replace("torchvision:", ""), r["scheme"], r["layers"], r["steps"],
          f"{r['mean_rank_fraction']:.2f}", f"{100 * r['warm_fraction']:.0f}%", f"{r['loop_s']*1e3:.1f} ms",
          f"{r['cold_s']*1e3:.1f} ms", f"{r['step_s']*1e3:.1f} ms", f"{r['step_vs_loop']:.1f}x",
          f"{r['cold_vs_loop']:.1f}x", f"{r['step_vs_cold']:.1f}x"] for r in rows])


def markdown(rows):
    solvers = [k for k in ("ours_jacobi_s", "ours_lapack_s") if any(k in r for r in rows)]
    names = {"ours_jacobi_s": "Jacobi kernel", "ours_lapack_s": "cuSOLVER/LAPACK eigh"}
    return harness.markdown_table(
        ["network", "scheme", "weights", "layers (groups)", "mean rank / n", "(a) per-layer SVD loop",
         "(b) batched SVD", "lowrank_project", "vs (a)", "vs (b)"] + [names[k] for k in solvers],
        [[r["model"].replace("torchvision:", ""), r["scheme"], r["weights"], f"{r['layers']} ({len(r['groups'])})",
          f"{r['mean_rank_fraction']:.2f}", f"{r['loop_s']*1e3:.1f} ms", f"{r['batched_svd_s']*1e3:.1f} ms",
          f"{r['ours_s']*1e3:.1f} ms", f"{r['speedup_vs_loop']:.1f}x", f"{r['speedup_vs_batched_svd']:.1f}x"]
         + [f"{r[k]*1e3:.2f} ms" if k in r else "-" for k in solvers]
         for r in rows if r["weights"] not in OWN_TABLES])


def settled_markdown(rows):
    return harness.markdown_table(
        ["network", "scheme", "path", "steps (every matrix warm)", "RankPruner.step()", "compiled kernels",
         "the projection functions' Python and dispatch", "the pruner's own Python", "per-layer SVD loop",
         "step vs loop"],
        [[r["model"].replace("torchvision:", ""), r["scheme"], r["path"], f"{r['steps']} ({r['all_warm_steps']})",
          f"{r['step_s']*1e3:.2f} ms", f"{r['kernels_s']*1e3:.2f} ms", f"{r['ops_python_s']*1e3:.2f} ms",
          f"{r['pruner_python_s']*1e3:.2f} ms", f"{r['loop_s']*1e3:.1f} ms", f"{r['step_vs_loop']:.1f}x"]
         for r in rows])


def render(doc):
    """The tables of one results file of this script as markdown, one per kind of row (benchmarks/pages.py)."""
    rows = doc["rows"]
    tables = [markdown(rows)] if any(r["weights"] not in OWN_TABLES for r in rows) else []
    for kind, table in (("trajectory", trajectory_markdown), ("settled", settled_markdown),
                        ("paths", paths_markdown), ("widths", widths_markdown)):
        chosen = [r for r in rows if r["weights"] == kind]
        if chosen:
            tables.append(table(chosen))
    return "\n\n".join(tables)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budget-s", type=float, default=0, help="start no new case after this long")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny case, one repeat: checks that the script works (dry runs, CI)")
    parser.add_argument("--out", default=None, help="default: results/lowrank_project_<device>.json (--part "
                        + ", ".join(f"{part}: results/{name}_<device>.json" for part, name in OUT_NAMES.items())
                        + ")")
    parser.add_argument("--part", nargs="+", choices=["all", *PARTS], default=["all"],
                        help="static: the init/trp weight rows; trajectory: the TRP trajectory rows (warm start); "
                             "breakdown: where a settled ResNet-56 RankPruner.step() goes; paths: the CPU kernel's "
                             "one-matrix-per-thread and batched paths per ResNet-50 group; widths: the warm step "
                             "against the full solve per basis width (the last three not part of all: static, "
                             "then trajectory). Several run in the order given, into one file; --budget-s stops "
                             "the static and trajectory parts from starting a new case")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice); on a CPU shared with other jobs "
                             "1 avoids OpenMP oversubscription, which distorts small ops")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for part in args.part for p in (("static", "trajectory") if part == "all" else (part,))]
    if args.out is None:
        name = OUT_NAMES.get(parts[0], "lowrank_project") if len(parts) == 1 else "lowrank_project"
        args.out = str(harness.ROOT / "results" / f"{name}_{args.device}.json")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    results = harness.Results(args.out, "lowrank_project", args.device, energy=ENERGY,
                              backend=trp_kernels.backend_info()["lowrank_project"][args.device])
    cases = SMOKE_CASES if args.smoke else CASES
    budget = harness.Budget(args.budget_s)
    done = True
    for part in parts:
        if not done:  # the budget ran out
            break
        if part == "static":
            done = run(results, 1.0 if args.smoke else args.repeats_scale,
                       ("trp",) if args.smoke else ("init", "trp"), cases, args.device, budget)
        elif part == "trajectory":
            done = run_trajectories(results, [("resnet20", "channel", 1)] if args.smoke else TRAJECTORY_CASES,
                                    args.device, budget, 1.0 if args.smoke else args.repeats_scale)
        elif part == "breakdown":
            for inplace in (True, False):  # the pruner's own path (in place on the CPU), and the stacked one
                row = breakdown(*(("resnet20", "channel", 8, 2) if args.smoke else ()), device=args.device,
                                inplace=inplace)
                if inplace or row["path"] not in [r["path"] for r in results.rows]:
                    results.add(row)
        elif part == "paths":
            for model_name, scheme in [("resnet20", "channel")] if args.smoke else PATH_CASES:
                for row in paths(model_name, scheme, 1 if args.smoke else 3):
                    results.add(row)
        else:  # widths
            for row in widths([(24, 40)] if args.smoke else WIDTH_SHAPES, 1 if args.smoke else 2):
                results.add(row)
    results.finish(truncated_by_budget=not done)
    m = results.doc["machine"]
    print(f"{results.doc['date']}, {m.get('gpu') or m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
          f"energy {ENERGY}, backend {results.doc['backend']}\n")
    if any(r["weights"] not in OWN_TABLES for r in results.rows):
        print(markdown(results.rows))
    if any(r["weights"] == "widths" for r in results.rows):
        print(widths_markdown([r for r in results.rows if r["weights"] == "widths"]))
    if any(r["weights"] == "paths" for r in results.rows):
        print(paths_markdown([r for r in results.rows if r["weights"] == "paths"]))
    for r in results.rows:
        if r["weights"] == "settled":
            print(f"\n{r['model']} {r['scheme']}, settled RankPruner.step(), {r['path']} (median of {r['steps']} "
                  f"steps, {r['all_warm_steps']} with every matrix warm): {r['step_s']*1e3:.2f} ms = compiled "
                  f"kernels {r['kernels_s']*1e3:.2f} ms + the projection functions' Python and dispatch "
                  f"{r['ops_python_s']*1e3:.2f} ms + the pruner's own Python (stacking, checks and write-back when "
                  f"stacked) {r['pruner_python_s']*1e3:.2f} ms; per-layer SVD loop on the same weights "
                  f"{r['loop_s']*1e3:.1f} ms ({r['step_vs_loop']:.1f}x)")
    if any(r["weights"] == "trajectory" for r in results.rows):
        print("\nTRP trajectory:\n")
        print(trajectory_markdown([r for r in results.rows if r["weights"] == "trajectory"]))


if __name__ == "__main__":
    main()
