"""Projection of all TRP layers of a network: trp_kernels.lowrank_project (one call per shape group)
against (a) the per-layer loop of the released TRP code (one torch.linalg.svd per layer, rank chosen per
layer, reconstruction) and (b) batched torch.linalg.svd per shape group, in one process.

    .venv/bin/python benchmarks/lowrank_table.py [--device cpu|cuda] [--repeats-scale F] [--out FILE]

Writes the JSON and prints a markdown table (median wall time of the repeats, ratios against (a)).
TRP layers: every Conv2d with a kernel other than 1x1 except the network's first conv.
Weights: "init" = the model's random initialisation; "trp" = TRP-like weights, each matrix projected
once at energy 0.9 and then perturbed by Gaussian noise of 5% of its entries' RMS (what the weights
look like a few SGD steps after a projection: a dominant low-rank part and a small full-rank tail)."""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, ROOT)

import trp_kernels  # noqa: E402
from trp_kernels import reference  # noqa: E402

ENERGY = 0.9


def trp_layers(model):
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return [m for m in convs[1:] if tuple(m.kernel_size) != (1, 1)]


def to_matrix(w, scheme):
    n, c, kh, kw = w.shape
    if scheme == "channel":
        return w.reshape(n, -1)
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def workload(model_name, scheme, weights, seed=0):
    """The per-layer matrices of the model's TRP layers (in model order)."""
    import trp.models

    torch.manual_seed(seed)
    kwargs = {"num_classes": 1000} if model_name.startswith("torchvision:") else {}
    model = trp.models.build(model_name, **kwargs)
    mats = [to_matrix(m.weight.detach().float(), scheme).contiguous() for m in trp_layers(model)]
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


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats):
    fn()  # warm-up (allocations, LAPACK workspaces)
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


CASES = [
    ("resnet56", "channel", 9),
    ("torchvision:resnet50", "channel", 5),
    ("torchvision:resnet50", "spatial", 3),
]


def run(repeats_scale=1.0, weights_kinds=("init", "trp"), cases=CASES, device="cpu"):
    rows = []
    for model_name, scheme, repeats in cases:
        repeats = max(1, int(round(repeats * repeats_scale)))
        for weights in weights_kinds:
            mats = [M.to(device) for M in workload(model_name, scheme, weights)]
            groups = group(mats)
            fractions = [float(r) / min(W.shape[1:]) for W in groups.values()
                         for r in trp_kernels.lowrank_project(W, ENERGY)[1]]
            t_loop, all_loop = median_time(lambda: per_layer_loop(mats), repeats)
            t_bsvd, all_bsvd = median_time(lambda: batched_svd(groups), repeats)
            t_ours, all_ours = median_time(lambda: ours(groups), repeats)
            row = {
                "model": model_name, "scheme": scheme, "weights": weights, "layers": len(mats),
                "groups": {"x".join(map(str, s)): int(W.shape[0]) for s, W in groups.items()},
                "mean_rank_fraction": sum(fractions) / len(fractions),
                "loop_s": t_loop, "batched_svd_s": t_bsvd, "ours_s": t_ours,
                "speedup_vs_loop": t_loop / t_ours, "speedup_vs_batched_svd": t_bsvd / t_ours,
                "repeats": repeats, "raw": {"loop": all_loop, "batched_svd": all_bsvd, "ours": all_ours},
            }
            rows.append(row)
            print(f"{model_name} {scheme} {weights}: loop {t_loop*1e3:.1f} ms, batched svd "
                  f"{t_bsvd*1e3:.1f} ms, ours {t_ours*1e3:.1f} ms -> {row['speedup_vs_loop']:.1f}x",
                  file=sys.stderr, flush=True)
    return rows


def markdown(rows):
    lines = ["| network | scheme | weights | layers (groups) | mean rank / n | (a) per-layer SVD loop | "
             "(b) batched SVD | lowrank_project | vs (a) | vs (b) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model'].replace('torchvision:', '')} | {r['scheme']} | {r['weights']} | {r['layers']} "
            f"({len(r['groups'])}) | {r['mean_rank_fraction']:.2f} | {r['loop_s']*1e3:.1f} ms | "
            f"{r['batched_svd_s']*1e3:.1f} ms | {r['ours_s']*1e3:.1f} ms | {r['speedup_vs_loop']:.1f}x | "
            f"{r['speedup_vs_batched_svd']:.1f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default: results/lowrank_project_<device>.json")
    args = parser.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "results", f"lowrank_project_{args.device}.json")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    info = trp_kernels.backend_info()
    rows = run(args.repeats_scale, device=args.device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "energy": ENERGY, "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "backend": info["lowrank_project"][args.device],
        "command": f"python benchmarks/lowrank_table.py --device {args.device}", "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(f"{result['date']}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"energy {ENERGY}, backend {result['backend']}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
