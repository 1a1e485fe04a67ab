"""Overhead of TRP per training step: time of one SGD step with RankPruner (step + regularize) over the
time without, CIFAR ResNet-20 and ResNet-56 (batch 128, 32x32) and torchvision ResNet-50 (batch 64, 224x224),
on the CPU or a GPU (fp32, or bf16/fp16 autocast), periods 1, 5 and 20.

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
    python benchmarks/pruner_overhead_table.py --device cuda --amp off bf16 --models resnet20 resnet56 \
        torchvision:resnet50

writes results/pruner_overhead_<device>.json (one row written as soon as it is measured) and prints a
markdown table."""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import harness  # first: puts the checkout on sys.path
import trp  # noqa: E402
import trp_kernels  # noqa: E402
from trp._utils import timing  # noqa: E402

PERIODS = (1, 5, 20)
RUN_PERIODS = (1, 5)  # the TRP runs measured; period 20 is priced from their samples


AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def workload(name):
    """(model name for trp.models.build, kwargs, input size); ImageNet models at 224x224, CIFAR at 32x32."""
    if name.startswith("torchvision:"):
        return {"num_classes": 1000}, (3, 224, 224), 1000
    return {}, (3, 32, 32), 10


class Runner:
    """One training run (model, SGD, optional RankPruner) whose steps are timed one by one."""

    def __init__(self, name, period, batch, device, amp, seed=0):
        torch.manual_seed(seed)
        kwargs, size, classes = workload(name)
        self.device, self.amp = torch.device(device), AMP[amp]
        self.model = trp.models.build(name, **kwargs).to(self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.pruner = (trp.RankPruner(self.model, "channel", energy=0.9, period=period, nuclear=3e-4,
                                         layers="paper")
                       if period else None)
        # fp16 needs loss scaling; the pruner's regularize() then runs after unscale_ (docs/guides/training.md)
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch,) + size, generator=g).to(self.device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(self.device)
        self.steps = {"projection": [], "plain": []}  # seconds per whole training step
        self.trp = []                                 # seconds inside the pruner, projection iterations

    def step(self):
        timing.sync(self.device)
        t0 = time.perf_counter()
        projected = self.pruner.step() if self.pruner is not None else False
        timing.sync(self.device)
        t_pruner = time.perf_counter() - t0
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        timing.sync(self.device)
        t1 = time.perf_counter()
        if self.pruner is not None:
            self.pruner.regularize()
            timing.sync(self.device)
        t_pruner += time.perf_counter() - t1
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        timing.sync(self.device)
        total = time.perf_counter() - t0
        self.steps["projection" if projected else "plain"].append(total)
        if projected:
            self.trp.append(t_pruner)


def measure(name, batch, rounds, budget, device="cpu", amp="off"):
    """Round-robin steps; stops after `rounds` rounds or once `budget` seconds are spent (>= 2 rounds)."""
    runners = {p: Runner(name, p, batch, device, amp) for p in (0,) + RUN_PERIODS}
    for r in runners.values():  # warm-up (oneDNN/cuDNN primitives, first SVD, lazy imports), not recorded
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
        rows.append({"model": name, "batch": batch, "device": str(device), "amp": amp, "period": m,
                     "step_ms_no_trp": round(base * 1e3, 2), "step_ms_trp": round(step * 1e3, 2),
                     "overhead": round(step / base, 3),
                     "trp_ms_per_projection": round(trp_s * 1e3, 3),
                     "overhead_from_trp_ms": round(1 + trp_s / m / base, 4),
                     "rounds": done, "samples": {"no_trp": len(runners[0].steps["plain"]), "projection": len(proj),
                                 "plain": len(plain)}})
    return rows


def markdown(rows, doc):
    m = doc["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s))"
    lines = [f"TRP overhead per training step on {where}: medians of interleaved rounds, channel scheme, "
             f"energy 0.9, nuclear 3e-4, lowrank_project backend: {doc['backend']}.", "",
             harness.markdown_table(
                 ["model", "batch", "amp", "period", "step without TRP (ms)", "step with TRP (ms)", "overhead",
                  "TRP time per projection (ms)", "overhead from TRP time"],
                 [[r["model"], r["batch"], r.get("amp", "off"), r["period"], f"{r['step_ms_no_trp']:.1f}",
                   f"{r['step_ms_trp']:.1f}", f"{r['overhead']:.3f}x", f"{r['trp_ms_per_projection']:.2f}",
                   f"{r['overhead_from_trp_ms']:.4f}x"] for r in rows])]
    return "\n".join(lines)


def render(doc):
    """The table of a results file of this script as markdown (benchmarks/pages.py)."""
    return markdown(doc["rows"], doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--batch", type=int, default=None,
                    help="default: 128 for CIFAR ResNets, 64 for torchvision models")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", nargs="+", default=["off"], choices=sorted(AMP),
                    help="autocast dtypes to measure (the projection itself always runs in float32)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget", type=float, default=100.0, help="seconds per model (at least 2 rounds)")
    ap.add_argument("--total-budget", type=float, default=0,
                    help="start no new model/amp point after this many seconds (0: no limit)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice); on a CPU shared with other jobs "
                         "1 avoids OpenMP oversubscription, which distorts small ops such as the SVDs")
    ap.add_argument("--smoke", action="store_true", help="ResNet-20, batch 4, 2 rounds: checks the script works")
    ap.add_argument("--out", default=None, help="default: results/pruner_overhead_<device>.json")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.batch, args.rounds, args.budget = ["resnet20"], 4, 2, 0.0
    out = args.out or str(harness.ROOT / "results" / f"pruner_overhead_{args.device}.json")
    results = harness.Results(out, "pruner_overhead", args.device,
                              backend=trp_kernels.backend_info()["lowrank_project"][args.device])
    budget, t0, cut = harness.Budget(args.total_budget), time.time(), False
    for name in args.models:
        batch = args.batch or (64 if name.startswith("torchvision:") else 128)
        for amp in args.amp:
            if budget.over():
                cut = True
                break
            for row in measure(name, batch, args.rounds, args.budget, args.device, amp):
                results.add(row)
    results.finish(seconds=round(time.time() - t0, 1), truncated_by_budget=cut)
    print(markdown(results.rows, results.doc))
    print(f"\n{results.doc['date']}, {results.doc['seconds']} s; wrote {out}")


if __name__ == "__main__":
    main()
