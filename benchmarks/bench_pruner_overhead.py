"""TRP overhead per training step (pytest-benchmark): one SGD step of CIFAR ResNet-20 with and without
RankPruner.step()/regularize(). Run: pytest benchmarks/bench_pruner_overhead.py --benchmark-enable.
The table of docs/benchmarks/training.md comes from benchmarks/pruner_overhead_table.py (interleaved, medians)."""
import pytest
import torch
import torch.nn.functional as F

import trp

BATCH = 32  # small enough for pytest-benchmark's repeated rounds on a 2-core CPU


def _setup(period):
    torch.manual_seed(0)
    model = trp.models.build("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    pruner = trp.RankPruner(model, "channel", energy=0.9, period=period, nuclear=3e-4) if period else None
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def step():
        if pruner is not None:
            pruner.step()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if pruner is not None:
            pruner.regularize()
        opt.step()
    return step


@pytest.mark.parametrize("period", [0, 1, 5, 20], ids=["no-trp", "period1", "period5", "period20"])
def test_train_step(benchmark, rounds, period):
    benchmark.group = "resnet20 train step (batch 32, CPU)"
    step = _setup(period)
    step()  # warm-up (oneDNN primitives, first SVD)
    benchmark.pedantic(step, rounds=rounds(5), iterations=1)


def test_projection_only(benchmark, rounds):
    benchmark.group = "projection"
    pruner = trp.RankPruner(trp.models.build("resnet20"), "channel", energy=0.9)
    benchmark.pedantic(pruner.project, rounds=rounds(5), iterations=1)
