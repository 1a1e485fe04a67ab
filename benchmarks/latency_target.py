"""Decomposition to a measured latency target (trp.decompose(target_latency=)): is the target reached, measured
end to end, in each runtime?

    python benchmarks/latency_target.py                         # results/latency_target_cpu.json
    python benchmarks/latency_target.py --nets resnet20 --targets 1.2 --runtimes eager --repeats 5   # a quick look

For each network, batch size, runtime and target: the layer timings (the cache file of one network, batch and
runtime is shared by its targets), the allocation, the decomposition and its verification loop, as
trp.decompose(target_latency=) runs them; then the dense and the decomposed networks timed afresh, alternately
(`repeats` rounds, median), so that the reported speed-up is not the one the loop accepted. A target the
measurements cannot reach is recorded with the error's statement of what is reachable. Random weights: the
ranks mean time only, not accuracy (the allocation keeps the most energy of flat spectra). Channel scheme, the
default layer selection."""
import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
from trp.deploy import latency  # noqa: E402

# network -> (trp.models name, input, default batches, default targets)
NETS = {"resnet20": ("resnet20", (3, 32, 32), (1, 32), (1.1, 1.2)),
        "resnet50": ("torchvision:resnet50", (3, 224, 224), (1,), (1.2, 1.5))}


def bench(results, net, batch, runtime, target, repeats, cache):
    name, size = NETS[net][:2]
    torch.manual_seed(0)
    model = trp.models.build(name, num_classes=10 if net == "resnet20" else 1000).eval()
    row = {"net": net, "input": list(size), "batch": batch, "runtime": runtime, "target": target,
           "threads": os.cpu_count(), "repeats": repeats}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compact = trp.decompose(model, "channel", target_latency=target, input_size=size,
                                    runtime=trp.Runtime(runtime, batch_size=batch, repeats=repeats, cache=cache))
    except ValueError as exc:
        row.update(reachable=False, error=str(exc), seconds=time.perf_counter() - t0)
        print(f"{net} b{batch} {runtime} target {target}: unreachable: {exc}", flush=True)
        return results.add(row)
    rec = compact.trp_latency_budget
    timer = latency.RuntimeTimer(runtime, "cpu", None, repeats)
    x = torch.randn(batch, *size)
    t_dense, t_comp = timer.compare([model, compact], x)
    shape = (batch, *size)
    row.update(reachable=True, met=rec["met"], measured_in_loop=rec["measured"], attempts=rec["attempts"],
               ms_dense=t_dense * 1e3, ms_decomposed=t_comp * 1e3, speedup_again=t_dense / t_comp,
               mac_speedup=trp.count_macs(model, shape) / trp.count_macs(compact, shape),
               layers_factorized=len(trp.factorized_layers(compact)), layers=len(rec["ranks"]),
               warnings=[str(w.message) for w in caught if "not reached" in str(w.message)],
               seconds=time.perf_counter() - t0)
    print(f"{net} b{batch} {runtime} target {target}: measured {rec['measured']:.2f}x in the loop "
          f"({'met' if rec['met'] else 'missed'}, {len(rec['attempts'])} attempt(s)), {row['speedup_again']:.2f}x "
          f"again; MACs {row['mac_speedup']:.2f}x; {row['layers_factorized']}/{row['layers']} layers factorized "
          f"[{row['seconds']:.0f} s]", flush=True)
    return results.add(row)


def markdown(rows):
    def result(r):
        if not r["reachable"]:
            return "refused: " + r["error"].split("rank the ", 1)[-1].split("; ask")[0].split(" (or")[0]
        return (f"{r['measured_in_loop']:.2f}x ({'met' if r['met'] else 'missed'}, {len(r['attempts'])} "
                f"attempt{'s' if len(r['attempts']) > 1 else ''})")
    return harness.markdown_table(
        ["network", "batch", "runtime", "target", "measured in the loop", "measured again", "MAC speed-up",
         "layers factorized"],
        [[f"{r['net']} {'x'.join(map(str, r['input'][1:]))}", r["batch"], r["runtime"], f"{r['target']}x",
          result(r), f"{r['speedup_again']:.2f}x" if r["reachable"] else "-",
          f"{r['mac_speedup']:.2f}x" if r["reachable"] else "-",
          f"{r['layers_factorized']}/{r['layers']}" if r["reachable"] else "-"] for r in rows])


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    return markdown(doc["rows"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--batches", nargs="+", type=int, help="default: 1 32 (ResNet-20), 1 (ResNet-50)")
    p.add_argument("--runtimes", nargs="+", default=list(latency.RUNTIMES), choices=list(latency.RUNTIMES))
    p.add_argument("--targets", nargs="+", type=float, help="default: 1.1 1.2 (ResNet-20), 1.2 1.5 (ResNet-50)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per comparison")
    p.add_argument("--out", default=str(harness.ROOT / "results" / "latency_target_cpu.json"))
    p.add_argument("--markdown", metavar="JSON", help="only print the table of an existing results file")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return
    results = harness.Results(args.out, "latency_target_cpu", "cpu", scheme="channel", weights="random")
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets:
            for batch in args.batches or NETS[net][2]:
                for runtime in args.runtimes:
                    cache = os.path.join(tmp, f"{net}_{batch}_{runtime}.json")  # shared by the targets
                    for target in args.targets or NETS[net][3]:
                        bench(results, net, batch, runtime, target, args.repeats, cache)
    results.finish()
    print("\n" + markdown(results.rows))


if __name__ == "__main__":
    main()
