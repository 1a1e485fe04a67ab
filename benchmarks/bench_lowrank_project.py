"""pytest-benchmark: lowrank_project on the TRP layers of ResNet-56 (channel) and ResNet-50 (channel,
spatial) against the per-layer SVD loop and batched SVD. Run with
    .venv/bin/python -m pytest -q benchmarks/bench_lowrank_project.py --benchmark-enable
(benchmarks/lowrank_table.py measures the same in one process; its results make docs/benchmarks/projection.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lowrank_table as lt  # noqa: E402

WORKLOADS = [("resnet56", "channel"), ("torchvision:resnet50", "channel"),
             ("torchvision:resnet50", "spatial")]
_cache = {}


def _workload(model_name, scheme, smoke):
    if smoke:  # the smallest network with the same code path
        model_name = "resnet20"
    key = (model_name, scheme)
    if key not in _cache:
        mats = lt.workload(model_name, scheme, "init")
        _cache[key] = (mats, lt.group(mats))
    return _cache[key]


@pytest.mark.parametrize("model_name,scheme", WORKLOADS, ids=["r56-channel", "r50-channel", "r50-spatial"])
@pytest.mark.parametrize("method", ["per_layer_loop", "batched_svd", "lowrank_project"])
def test_project_all_layers(benchmark, smoke, rounds, model_name, scheme, method):
    mats, groups = _workload(model_name, scheme, smoke)
    benchmark.group = f"{model_name} {scheme}"
    timing = dict(rounds=rounds(3 if "resnet50" in model_name else 10), warmup_rounds=0 if smoke else 1)
    if method == "per_layer_loop":
        out = benchmark.pedantic(lt.per_layer_loop, args=(mats,), **timing)
        assert len(out) == len(mats)
    elif method == "batched_svd":
        out = benchmark.pedantic(lt.batched_svd, args=(groups,), **timing)
        assert len(out) == len(groups)
    else:
        out = benchmark.pedantic(lt.ours, args=(groups,), **timing)
        assert len(out) == len(groups)
        for (W_low, rank, _), W in zip(out, groups.values()):
            assert W_low.shape == W.shape and (rank >= 1).all()
