"""Projection time per TRP step with 1 and 2 processes: RankPruner.project() unsharded (one process does
every layer) against sharded over a 2-process gloo group (each rank projects its cost-balanced share, then
the results are broadcast), on the CPU, one torch thread per process.

Same run, same noise: both configurations live in one 2-process job and alternate step by step on the same
weights (moved by a small SGD-like perturbation between steps, as in training): rank 0 times the unsharded
pruner alone while rank 1 waits at a barrier, then both ranks time the sharded pruner; a sharded step's time
is the slowest rank's, the exchange included. Also the CPU time each process spends in project() (the
busiest rank's for 2 processes): the work sharding removes, apart from the scheduling delays that a CPU
shared with other jobs adds to the wall clock at every synchronisation. Medians over the steps.

    python benchmarks/distributed_projection.py [--models resnet20 resnet56 torchvision:resnet50] [--steps 10]

writes results/distributed_projection_cpu.json (a row as soon as it is measured) and prints a markdown
table."""
import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
from trp.prune import distributed  # noqa: E402

WORLD = 2


def workload(name):
    return {"num_classes": 1000} if name.startswith("torchvision:") else {"num_classes": 10}


def _perturb(models, gen, scale=1e-3):
    """The same small step on every copy of the weights (a stand-in for an SGD step between projections)."""
    with torch.no_grad():
        for params in zip(*(m.parameters() for m in models)):
            d = torch.randn(params[0].shape, generator=gen) * scale * params[0].detach().abs().mean()
            for p in params:
                p.add_(d)


def _timed(fn):
    """(wall seconds, CPU seconds of the calling thread) of fn(), started together on every rank."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - t0, time.thread_time() - c0


def measure(name, scheme, steps, rank, solo_group):
    torch.manual_seed(0)
    model = trp.models.build(name, **workload(name))
    sharded = trp.RankPruner(model, scheme, energy=0.9, nuclear=3e-4, layers="paper")
    solo_model = copy.deepcopy(model) if rank == 0 else None
    solo = trp.RankPruner(solo_model, scheme, energy=0.9, nuclear=3e-4, process_group=solo_group,
                          layers="paper") if rank == 0 else None
    gen = torch.Generator().manual_seed(1)
    one, two, cpu_one, cpu_two = [], [], [], []
    for step in range(steps + 1):  # the first step warms up (allocations, first SVDs) and is not recorded
        _perturb([m for m in (model, solo_model) if m is not None], gen)
        t1, c1 = _timed(solo.project if solo is not None else (lambda: None))
        t2, c2 = _timed(sharded.project)
        both = distributed.all_gather_objects((t2, c2))
        if step:
            one.append(t1)
            cpu_one.append(c1)
            two.append(max(t for t, _ in both))   # the step waits for the slowest rank
            cpu_two.append(max(c for _, c in both))
    if solo is not None:
        assert solo.ranks == sharded.ranks, "sharded and unsharded projections chose other ranks"
    s = sharded._sharding
    loads = s.loads()
    return {"model": name, "scheme": scheme, "layers": len(sharded.layers),
            "groups_1": len(solo._groups) if solo else None, "groups_2": len(sharded._groups), "steps": steps,
            "ms_1proc": round(statistics.median(one) * 1e3, 2), "ms_2proc": round(statistics.median(two) * 1e3, 2),
            "speedup": round(statistics.median(one) / statistics.median(two), 3),
            "cpu_ms_1proc": round(statistics.median(cpu_one) * 1e3, 2),
            "cpu_ms_2proc_max_rank": round(statistics.median(cpu_two) * 1e3, 2),
            "cpu_ratio": round(statistics.median(cpu_one) / statistics.median(cpu_two), 3),
            "cost_share_per_rank": [round(v / sum(loads), 3) for v in loads]}


def _worker(world, init_method, args):
    # Each rank in its own session, hence its own Linux scheduling autogroup, as it would have its own
    # device: with autogroups the processes of one session share one CPU share, so on a CPU shared with
    # other jobs two ranks of one session would run no faster than one whatever the sharding.
    os.setsid()
    torch.set_num_threads(1)
    with distributed.process_group(world, "cpu", init_method):
        solo_group = dist.new_group([0])  # a one-process group: the pruner does not shard over it
        results = harness.Results(args.out, "distributed_projection", "cpu", world_size=WORLD,
                                  threads_per_process=1, energy=0.9, nuclear=3e-4) if world.rank == 0 else None
        t0 = time.time()
        for name in args.models:
            for scheme in args.schemes:
                row = measure(name, scheme, args.steps, world.rank, solo_group)
                if results is not None:
                    results.add(row)
                    print(f"{name} {scheme}: {row['ms_1proc']:.1f} ms -> {row['ms_2proc']:.1f} ms "
                          f"({row['speedup']:.2f}x)", flush=True)
        if results is not None:
            results.finish(seconds=round(time.time() - t0, 1))
            print(markdown(results.rows, results.doc))


def markdown(rows, doc):
    m = doc["machine"]
    lines = [f"RankPruner.project() per step, 1 process vs 2 gloo processes (sharded), CPU ({m['cpu']}, "
             f"{m['cores']} cores), 1 torch thread per process, energy 0.9, nuclear 3e-4; medians of "
             f"{rows[0]['steps'] if rows else 0} interleaved steps.", "",
             harness.markdown_table(
                 ["model", "scheme", "layers", "1 process (ms)", "2 processes (ms)", "speed-up",
                  "CPU ms: 1 process / busiest rank", "CPU ratio", "estimated cost share per rank"],
                 [[r["model"], r["scheme"], r["layers"], f"{r['ms_1proc']:.1f}", f"{r['ms_2proc']:.1f}",
                   f"{r['speedup']:.2f}x", f"{r['cpu_ms_1proc']:.1f} / {r['cpu_ms_2proc_max_rank']:.1f}",
                   f"{r['cpu_ratio']:.2f}x", " / ".join(f"{v:.2f}" for v in r["cost_share_per_rank"])]
                  for r in rows])]
    return "\n".join(lines)


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    return markdown(doc["rows"], doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "torchvision:resnet50"])
    ap.add_argument("--schemes", nargs="+", default=["channel"], choices=["channel", "spatial", "nd"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="ResNet-20 channel, 2 steps: checks the script works")
    ap.add_argument("--out", default=str(harness.ROOT / "results" / "distributed_projection_cpu.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.schemes, args.steps = ["resnet20"], ["channel"], 2
    distributed.spawn(_worker, WORLD, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
