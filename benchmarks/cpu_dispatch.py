"""Eager CPU latency of decomposed networks with the factorized convs called through their custom ops' dispatch
against the two convolutions called directly (what `trp_kernels` does in eager mode on CPU tensors since the
dispatch was found to cost as much as a small layer), with the dense network as the reference.

    python benchmarks/cpu_dispatch.py                 # ResNet-20 and ResNet-56, channel and nd, batch 1 and 8

Random weights, decomposed at a 2x conv-MAC target (the ranks give the time, not the accuracy), 32 px input, one
thread, eval mode, no_grad. Dense, through-the-op and direct alternate in the same process over several rounds of
back-to-back calls; the table gives the median ms per forward and the speed-up over dense."""
import argparse
import os
import statistics
import sys
import time

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
from trp_kernels import conv  # noqa: E402

MODES = ("dense", "through the op", "direct")


def time_ms(fn, calls):
    for _ in range(max(calls // 10, 2)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def measure(net, scheme, batch, rounds, calls):
    """Median ms per forward of each mode, alternating modes round by round."""
    torch.manual_seed(0)
    model = trp.models.build(net).eval()
    compact = trp.decompose(model, scheme, target_speedup=2.0, input_size=(3, 32, 32)).eval()
    x = torch.randn(batch, 3, 32, 32)
    direct = conv._eager_cpu
    times = {m: [] for m in MODES}
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for mode in MODES:
                    conv._eager_cpu = (lambda *a: False) if mode == "through the op" else direct
                    times[mode].append(time_ms(lambda: (model if mode == "dense" else compact)(x), calls))
    finally:
        conv._eager_cpu = direct
    return {m: statistics.median(v) for m, v in times.items()}


def render(doc):
    """The results file's table as markdown (benchmarks/pages.py and the script's own output)."""
    rows = [(r["net"], r["scheme"], r["batch"], f"{r['dense_ms']:.3f}", f"{r['op_ms']:.3f}", f"{r['direct_ms']:.3f}",
             f"{r['dense_ms'] / r['op_ms']:.2f}x", f"{r['dense_ms'] / r['direct_ms']:.2f}x") for r in doc["rows"]]
    return harness.markdown_table(["net", "scheme", "batch", "dense (ms)", "through the op (ms)", "direct (ms)",
                                   "speed-up through the op", "speed-up direct"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--schemes", nargs="+", default=["channel", "nd"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    results = harness.Results(os.path.join(args.out, "cpu_dispatch.json"), "cpu_dispatch", "cpu",
                              settings={"target_speedup": 2.0, "input": [3, 32, 32], "rounds": args.rounds,
                                        "calls": args.calls, "threads": 1})
    t0 = time.perf_counter()
    for net in args.nets:
        for scheme in args.schemes:
            for batch in args.batches:
                ms = measure(net, scheme, batch, args.rounds, args.calls)
                results.add({"net": net, "scheme": scheme, "batch": batch, "dense_ms": round(ms["dense"], 4),
                             "op_ms": round(ms["through the op"], 4), "direct_ms": round(ms["direct"], 4)})
                print(f"  {net} {scheme} batch {batch}: {ms}", flush=True)
    results.finish(seconds=round(time.perf_counter() - t0, 1))
    print(render(results.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
