"""Overhead of TRP per training step: time of one SGD step with RankPruner (step + regularize) over the
time without, CIFAR ResNet-20 and ResNet-56, batch 128, CPU, periods 1, 5 and 20.

Fairness on a shared, noisy CPU: the runs (no TRP, TRP at period 1, TRP at period 5) live in one process,
start from the same weights and data, and run one step each in turn (round-robin), so that load from other
processes hits them alike; statistics are medians. A TRP run at period m pays one projection iteration and
m-1 plain ones per period, so its step time is (median projection iteration + (m-1) * median plain
iteration) / m, with samples from the interleaved runs themselves (the period-1 run projects every step,
the period-5 run supplies plain iterations and its own projections; period 20 is priced from the same
samples, as 20 whole steps per round do not fit a few-minute budget). The time spent inside
RankPruner.step()/regularize() is also timed directly ("trp_ms"), which is less exposed to noise than a
difference of two step times.

    python benchmarks/pruner_overhead_table.py [--rounds 10] [--budget 100] [--models resnet20 resnet56]

writes results/pruner_overhead_cpu.json and prints a markdown table."""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import trp
import trp_kernels

PERIODS = (1, 5, 20)
RUN_PERIODS = (1, 5)  # the TRP runs measured; period 20 is priced from their samples


class Runner:
    """One training run (model, SGD, optional RankPruner) whose steps are timed one by one."""

    def __init__(self, name, period, batch, seed=0):
        torch.manual_seed(seed)
        self.model = trp.models.build(name)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.pruner = (trp.RankPruner(self.model, "channel", energy=0.9, period=period, nuclear=3e-4)
                       if period else None)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.steps = {"projection": [], "plain": []}  # seconds per whole training step
        self.trp = []                                 # seconds inside the pruner, projection iterations

    def step(self):
        t0 = time.perf_counter()
        projected = self.pruner.step() if self.pruner is not None else False
        t_pruner = time.perf_counter() - t0
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        if self.pruner is not None:
            self.pruner.regularize()
        t_pruner += time.perf_counter() - t1
        self.opt.step()
        total = time.perf_counter() - t0
        self.steps["projection" if projected else "plain"].append(total)
        if projected:
            self.trp.append(t_pruner)


def measure(name, batch, rounds, budget):
    """Round-robin steps; stops after `rounds` rounds or once `budget` seconds are spent (>= 2 rounds)."""
    runners = {p: Runner(name, p, batch) for p in (0,) + RUN_PERIODS}
    for r in runners.values():  # warm-up (oneDNN primitives, first SVD, lazy imports), not recorded
        r.step()
        r.steps = {"projection": [], "plain": []}
        r.trp = []
    start, done = time.perf_counter(), 0
    while done < rounds and (done < 2 or time.perf_counter() - start < budget):
        for r in runners.values():
            r.step()
        done += 1
    base = statistics.median(runners[0].steps["plain"])
    proj = [t for p in RUN_PERIODS for t in runners[p].steps["projection"]]
    plain = [t for p in RUN_PERIODS for t in runners[p].steps["plain"]]
    trp_s = statistics.median([t for p in RUN_PERIODS for t in runners[p].trp])
    t_proj = statistics.median(proj)
    t_plain = statistics.median(plain) if plain else base
    rows = []
    for m in PERIODS:
        step = (t_proj + (m - 1) * t_plain) / m
        rows.append({"model": name, "batch": batch, "period": m,
                     "step_ms_no_trp": round(base * 1e3, 1), "step_ms_trp": round(step * 1e3, 1),
                     "overhead": round(step / base, 3),
                     "trp_ms_per_projection": round(trp_s * 1e3, 2),
                     "overhead_from_trp_ms": round(1 + trp_s / m / base, 4),
                     "rounds": done, "samples": {"no_trp": len(runners[0].steps["plain"]), "projection": len(proj),
                                 "plain": len(plain)}})
    return rows


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows, meta):
    lines = [f"TRP overhead per training step, CPU ({meta['cpu_model']}, {meta['cores']} cores, "
             f"{meta['threads']} torch thread(s), shared with other jobs: medians of "
             f"{rows[0]['rounds']} interleaved rounds), channel scheme, energy 0.9, "
             f"nuclear 3e-4, batch {rows[0]['batch']}, lowrank_project backend: {meta['backend']}.", "",
             "| model | period | step without TRP (ms) | step with TRP (ms) | overhead | TRP time per "
             "projection (ms) | overhead from TRP time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['period']} | {r['step_ms_no_trp']:.1f} | {r['step_ms_trp']:.1f} | "
                     f"{r['overhead']:.3f}x | {r['trp_ms_per_projection']:.2f} | "
                     f"{r['overhead_from_trp_ms']:.4f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget", type=float, default=100.0, help="seconds per model (at least 2 rounds)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice); on a CPU shared with other jobs "
                         "1 avoids OpenMP oversubscription, which distorts small ops such as the SVDs")
    ap.add_argument("--out", default="results/pruner_overhead_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = []
    for name in args.models:
        rows += measure(name, args.batch, args.rounds, args.budget)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backend": trp_kernels.backend_info()["lowrank_project"]["cpu"],
            "load_average": os.getloadavg(), "seconds": round(time.time() - t0, 1),
            "command": "python benchmarks/pruner_overhead_table.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
                if v is not None)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(tmp, args.out)
    print(markdown(rows, meta))
    print(f"\n{meta['date']}, {meta['seconds']} s, load average {meta['load_average']}; wrote {args.out}")


if __name__ == "__main__":
    main()
