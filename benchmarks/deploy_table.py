"""CPU latency of dense vs decomposed vs latency-fitted networks, in PyTorch eager and in onnxruntime.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/deploy_table.py                  # docs/benchmarks/latency.md's table
    python benchmarks/deploy_table.py --nets resnet20 --batches 1 --repeats 5 # a quick look
    python benchmarks/deploy_table.py --markdown results/deploy_cpu.json         # the table of a results file

For each network, batch size, runtime (eager, onnxruntime) and thread count (1 and all cores), the latency
fit (trp.fit_latency) times every factorized layer against its dense layer in that runtime and merges back
the ones that are not faster; then dense, decomposed and fitted networks are timed afresh, alternately
(median of `repeats` rounds), so the fitted network's reported time is not the one it was selected on;
where the fit merged every layer back, the fitted network is the dense one and is reported as such.
"dense" is the decomposed network with every layer merged back (the same architecture and cost as the
original). Writes results/deploy_cpu.json (harness schema) and prints a markdown table.

Channel scheme, the default layer selection (every 3x3 conv but the first), random weights (so the ranks
mean cost only, not accuracy). Ranks: CIFAR ResNets as in benchmarks/conv_table.py (layer_rank: each 3x3
layer at the paper's MAC speed-up, ResNet-20 2.17x, ResNet-56 2.31x); ResNet-50 rank = n/3 (n = output
channels, floored) for each of its 16 3x3 convs."""
import argparse
import json
import os
import time
from pathlib import Path

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
from conv_table import build_net, decompose_at_paper_ranks  # noqa: E402
from trp.deploy import latency  # noqa: E402

DEFAULT = {"resnet20": ((3, 32, 32), (1, 32)), "resnet56": ((3, 32, 32), (1, 32)),
           "resnet50": ((3, 224, 224), (1, 8))}


def decompose(model, net):
    """CIFAR ResNets: conv_table's ranks (the paper's MAC speed-up per 3x3 layer); ResNet-50: rank n/3 for
    every selected (3x3) conv with n output channels."""
    if net != "resnet50":
        return decompose_at_paper_ranks(model, net, "channel")
    ranks = {name: max(1, m.out_channels // 3) for name, m in trp.select_layers(model, "channel", layers="paper")}
    return trp.decompose(model, "channel", rank=ranks)


def bench(results, net, batch, runtime, threads, fit_repeats, repeats):
    model, size = build_net(net, "cpu")
    compact = decompose(model, net).eval()
    t0 = time.perf_counter()
    fitted, fit = trp.fit_latency(compact, size, runtime, batch_size=batch, threads=threads,
                                  repeats=fit_repeats)
    fit_s = time.perf_counter() - t0
    dense = latency.merge_back(compact)
    x = torch.randn(batch, *size)
    t = fit.totals
    timer = latency.RuntimeTimer(runtime, "cpu", threads, repeats)
    if t["layers_kept"]:
        t_dense, t_comp, t_fit = timer.compare([dense, compact, fitted], x)
    else:  # every layer merged back: the fitted network is the dense one (timing it again measures noise)
        t_dense, t_comp = timer.compare([dense, compact], x)
        t_fit = t_dense
    row = {"net": net, "input": list(size), "batch": batch, "runtime": runtime,
           "threads": threads or os.cpu_count(), "macs_dense": t["macs_dense"],
           "macs_decomposed": t["macs_decomposed"], "macs_fitted": t["macs_fitted"],
           "mac_speedup_decomposed": t["mac_speedup_decomposed"], "mac_speedup_fitted": t["mac_speedup_fitted"],
           "ms_dense": t_dense * 1e3, "ms_decomposed": t_comp * 1e3, "ms_fitted": t_fit * 1e3,
           "speedup_decomposed": t_dense / t_comp, "speedup_fitted": t_dense / t_fit,
           "layers_factorized": len(fit.rows), "layers_kept": t["layers_kept"], "fit_all_dense": t["all_dense"],
           "fit_s": fit_s, "fit_repeats": fit_repeats, "repeats": repeats, "fit": fit.to_dict()}
    print(f"{net} b{batch} {runtime} {row['threads']}t: dense {row['ms_dense']:.2f} ms, decomposed "
          f"{row['ms_decomposed']:.2f} ({row['speedup_decomposed']:.2f}x), fitted {row['ms_fitted']:.2f} "
          f"({row['speedup_fitted']:.2f}x, {row['layers_kept']}/{row['layers_factorized']} kept, MACs "
          f"{row['mac_speedup_fitted']:.2f}x) [fit {fit_s:.0f} s]", flush=True)
    return results.add(row)


def markdown(rows):
    return harness.markdown_table(
        ["network", "batch", "runtime", "threads", "dense ms", "decomposed ms (x)", "fitted ms (x)", "layers kept",
         "MAC speed-up decomposed / fitted"],
        [[f"{r['net']} {'x'.join(map(str, r['input'][1:]))}", r["batch"], r["runtime"], r["threads"],
          f"{r['ms_dense']:.2f}", f"{r['ms_decomposed']:.2f} ({r['speedup_decomposed']:.2f}x)", _fitted(r),
          f"{r['layers_kept']}/{r['layers_factorized']}",
          f"{r['mac_speedup_decomposed']:.2f}x / {r['mac_speedup_fitted']:.2f}x"] for r in rows])


def _fitted(row):
    if not row["layers_kept"]:
        return "= dense (1.00x)"
    return f"{row['ms_fitted']:.2f} ({row['speedup_fitted']:.2f}x)"


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    return markdown(doc["rows"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=list(DEFAULT), choices=list(DEFAULT))
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 32 (CIFAR), 1 8 (ResNet-50)")
    p.add_argument("--runtimes", nargs="+", default=list(latency.RUNTIMES), choices=list(latency.RUNTIMES))
    p.add_argument("--threads", nargs="+", type=int, default=[1, os.cpu_count()])
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per point (ResNet-50: a fifth)")
    p.add_argument("--out", default=str(harness.ROOT / "results" / "deploy_cpu.json"))
    p.add_argument("--markdown", metavar="JSON", help="only print the table of an existing results file")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return
    results = harness.Results(args.out, "deploy_cpu", "cpu", scheme="channel",
                              ranks="CIFAR: conv_table.layer_rank at the paper's MAC speed-ups; ResNet-50: n/3 "
                                    "(random weights)",
                              onnxruntime=_version("onnxruntime"))
    for net in args.nets:
        size, batches = DEFAULT[net]
        scale = 5 if net == "resnet50" else 1
        for batch in args.batches or batches:
            for runtime in args.runtimes:
                for threads in args.threads:
                    reps = max(3, args.repeats // scale // (2 if batch > 1 and scale > 1 else 1))
                    bench(results, net, batch, runtime, threads, max(3, reps // 2), reps)
    results.finish()
    print("\n" + markdown(results.rows))


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
