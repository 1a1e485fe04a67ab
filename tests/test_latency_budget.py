"""decompose(target_latency=): the measured latency table, its cache, the allocation by energy per second and the
end-to-end verification loop, proven with a fake timer whose times are known (a cost per multiply-add plus a cost
per kernel call, and optionally a per-layer cost that only shows in the whole network)."""
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

import trp
from trp.deploy import latency_budget as lb
from trp.nn.modules import FACTORIZED_TYPES


class FakeTimer:
    """seconds = per_mac * MACs + per_call * kernel calls (+ in_network per factorized layer when a whole network
    with several layers is timed): deterministic, so allocations and measurements are exactly predictable."""

    def __init__(self, per_mac=1e-9, per_call=1e-6, in_network=0.0):
        self.per_mac, self.per_call, self.in_network = per_mac, per_call, in_network
        self.calls = 0

    def seconds(self, module, x):
        mods = list(module.modules())
        factorized = sum(isinstance(m, FACTORIZED_TYPES) for m in mods)
        dense = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in mods
                    if not any(m is s for f in mods if isinstance(f, FACTORIZED_TYPES) for s in f.modules()))
        t = self.per_mac * trp.count_macs(module, tuple(x.shape), linear=True)
        t += self.per_call * (dense + 2 * factorized)
        if factorized + dense > 1:
            t += self.in_network * factorized
        return t

    def compare(self, modules, x):
        self.calls += 1
        return [self.seconds(m, x) for m in modules]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(64, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


def runtime(timer=None, **kw):
    return trp.Runtime("eager", timer=timer or FakeTimer(), **kw)


SIZE = (3, 16, 16)


def test_candidate_ranks_are_multiples_thinned_and_small_layers_get_small_ranks():
    assert lb.candidate_ranks(40, 8, 6) == [8, 16, 24, 32, 40]
    assert lb.candidate_ranks(100, 8, 4) == [8, 40, 64, 96]  # 12 multiples, 4 evenly spread
    assert lb.candidate_ranks(5, 8, 3) == [1, 3, 5]
    assert lb.candidate_ranks(0, 8, 6) == []


def test_meets_the_target_and_predicts_the_measured_time_exactly_when_times_add_up():
    model = net()
    compact = trp.decompose(model, "channel", target_latency=1.6, input_size=SIZE, runtime=runtime())
    rec = compact.trp_latency_budget
    assert rec["met"] and rec["measured"] >= 1.6 * 0.97 and len(rec["attempts"]) == 1
    assert rec["attempts"][0]["predicted"] == pytest.approx(rec["measured"], rel=1e-9)
    timer = FakeTimer()
    x = torch.zeros(1, *SIZE)
    dense_s, compact_s = timer.compare([model, compact], x)
    assert dense_s / compact_s == pytest.approx(rec["measured"], rel=1e-9)
    layers = trp.factorized_layers(compact)
    assert layers and all(m.rank % 8 == 0 for m in layers.values())  # the runtime's multiples
    for name, m in layers.items():
        assert rec["layers"][name]["rank"] == m.rank and rec["layers"][name]["ms_factorized"] < \
            rec["layers"][name]["ms_dense"]
    # a 3x target takes no layer to a higher rank than 1.6x does (dense counts as the highest), and some lower
    tighter = trp.decompose(model, "channel", target_latency=3.0, input_size=SIZE, runtime=runtime())
    rank = lambda r: float("inf") if r is None else r  # noqa: E731
    pairs = [(rank(tighter.trp_latency_budget["ranks"][n]), rank(rec["ranks"][n])) for n in rec["ranks"]]
    assert all(a <= b for a, b in pairs) and any(a < b for a, b in pairs)
    assert tighter.trp_latency_budget["measured"] >= 3.0 * 0.97


def test_layers_whose_calls_cost_more_than_their_saving_stay_dense():
    # a large cost per kernel call: only the big layers pay for their second conv
    timer = FakeTimer(per_mac=1e-9, per_call=2e-4)
    compact = trp.decompose(net(), "channel", target_latency=1.05, input_size=SIZE, runtime=runtime(timer))
    rec = compact.trp_latency_budget
    assert rec["met"]
    assert rec["ranks"]["2"] is None and "2" not in trp.factorized_layers(compact)  # 32 -> 32 at 16x16 is small


def test_the_loop_raises_the_goal_by_the_measured_shortfall():
    # each factorized layer costs more inside the network than alone: the first allocation falls short
    timer = FakeTimer(in_network=2e-4)
    compact = trp.decompose(net(), "channel", target_latency=1.6, input_size=SIZE, runtime=runtime(timer))
    rec = compact.trp_latency_budget
    first, last = rec["attempts"][0], rec["attempts"][-1]
    assert first["measured"] < 1.6 * 0.97 <= last["measured"] and rec["met"]
    assert last["goal"] == pytest.approx(1.6 * 1.6 / first["measured"]) and first["goal"] == 1.6
    assert rec["measured"] == last["measured"]


def test_an_unreachable_target_is_refused_before_anything_is_built():
    timer = FakeTimer(per_mac=1e-12, per_call=1e-3)  # every second conv costs more than any saving
    with pytest.raises(ValueError, match="not reachable .* no speed-up"):
        trp.decompose(net(), "channel", target_latency=1.2, input_size=SIZE, runtime=runtime(timer))
    assert timer.calls == 3 + 1  # the three selected layers and the dense network timed; nothing decomposed


def test_a_target_missed_after_every_attempt_warns_and_records_it():
    timer = FakeTimer(in_network=1e-3)  # much slower in the network than alone: three attempts fall short
    with pytest.warns(UserWarning, match="not reached: measured"):
        compact = trp.decompose(net(), "channel", target_latency=1.8, input_size=SIZE, runtime=runtime(timer))
    assert not compact.trp_latency_budget["met"]


def test_energy_goes_where_the_spectrum_needs_it():
    model = net()
    with torch.no_grad():  # layer 2's weight has rank 8: it needs no more, and layer 6 gets the budget
        w = model[2].weight
        w.copy_((torch.randn(32, 8) @ torch.randn(8, 32 * 9)).reshape(w.shape))
    compact = trp.decompose(model, "channel", target_latency=1.6, input_size=SIZE, runtime=runtime())
    ranks = compact.trp_latency_budget["ranks"]
    assert ranks["2"] == 8
    x = torch.randn(2, 32, 16, 16)
    torch.testing.assert_close(compact[2](x), model[2](x), rtol=1e-4, atol=1e-4)  # rank 8 of a rank-8 weight


def test_the_cache_saves_measurements_and_bad_caches_are_refused(tmp_path):
    cache = tmp_path / "lat.json"
    timer = FakeTimer()
    first = trp.decompose(net(), "channel", target_latency=1.6, input_size=SIZE, runtime=runtime(timer, cache=cache))
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) > 4 and all("eager|cpu" in k for k in entries)
    timer2 = FakeTimer()
    second = trp.decompose(net(), "channel", target_latency=1.6, input_size=SIZE,
                           runtime=runtime(timer2, cache=cache))
    assert timer2.calls == 2  # the dense network and the one attempt: no layer re-measured
    assert second.trp_latency_budget["ranks"] == first.trp_latency_budget["ranks"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "entries": {"k": -1.0}}')
    with pytest.raises(ValueError, match="not a trp latency cache"):
        trp.decompose(net(), "channel", target_latency=1.6, input_size=SIZE, runtime=runtime(cache=bad))
    assert json.loads(bad.read_text())["entries"] == {"k": -1.0}  # left as it was
    link = tmp_path / "link.json"
    os.symlink(cache, link)
    with pytest.raises(OSError, match="symbolic link"):
        trp.decompose(net(), "channel", target_latency=1.6, input_size=SIZE, runtime=runtime(cache=link))


def test_bad_arguments_are_one_line_errors():
    model = net()
    with pytest.raises(ValueError, match="input_size"):
        trp.decompose(model, "channel", target_latency=1.5)
    with pytest.raises(ValueError, match="not several"):
        trp.decompose(model, "channel", target_latency=1.5, energy=0.9, input_size=SIZE)
    with pytest.raises(ValueError, match="target_latency"):
        trp.decompose(model, "channel", target_latency=0.9, input_size=SIZE)
    with pytest.raises(ValueError, match="give target_latency"):
        trp.decompose(model, "channel", energy=0.9, runtime="eager")
    with pytest.raises(ValueError, match="runtime"):
        trp.Runtime("tensorrt")


def test_nd_orders_and_a_real_eager_runtime_never_silently_miss():
    # the real timer on a tiny network: either the target is met or a warning says it was not
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compact = trp.decompose(net(), "nd", target_latency=1.05, input_size=SIZE,
                                    runtime=trp.Runtime("eager", repeats=3))
        except ValueError as exc:  # unreachable on this machine: said before anything was built
            assert "not reachable" in str(exc)
            return
    rec = compact.trp_latency_budget
    assert rec["met"] or any("not reached" in str(w.message) for w in caught)
    orders = {type(m).__name__ for m in trp.factorized_layers(compact).values()}
    assert orders <= {"DecoupledConv2d", "DepthwiseDecoupledConv2d"}


def test_cli_decompose_to_a_latency_target(tmp_path, capsys, monkeypatch):
    from cli_helpers import TINY, run_cli
    monkeypatch.setattr(lb, "RuntimeTimer", lambda name, device, threads, repeats: FakeTimer())
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--epochs", "1", "--no-report", "--out", run)[0] == 0
    cache = tmp_path / "lat.json"
    code, out, err = run_cli(capsys, "decompose", run / "checkpoint.pt", "-o", tmp_path / "d.pt",
                             "--target-latency", "1.5", "--latency-batch-size", "8", "--latency-cache", cache)
    assert code == 0, err
    assert "target 1.5x, measured" in out and "(met)" in out
    assert all("batch=8" in k for k in json.loads(cache.read_text())["entries"])
    compact = trp.load(tmp_path / "d.pt")
    assert trp.factorized_layers(compact)
    code, _, err = run_cli(capsys, "decompose", run / "checkpoint.pt", "-o", tmp_path / "e.pt", "--target-latency",
                           "1.5", "--energy", "0.9")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run_cli(capsys, "decompose", run / "checkpoint.pt", "-o", tmp_path / "e.pt", "--target-latency",
                           "50")
    assert code != 0 and "not reachable" in err and not (tmp_path / "e.pt").exists()


def test_latency_cost_interpolates_caps_and_steers_training():
    model = net()
    targets = trp.plan_layers(model, "channel").targets
    cost = lb.LatencyCost(lb.LatencyTable(model, "channel", targets, SIZE, runtime()))
    table = cost.table
    r0, r1 = table.ranks["6"][:2]
    mid = cost.layer_seconds("6", (r0 + r1) // 2)
    assert min(table.times["6"][:2]) < mid < max(table.times["6"][:2])  # between the measured neighbours
    assert cost.layer_seconds("6", 64) == table.dense["6"]  # above every candidate: dense
    assert cost.layer_seconds("6", 64, capped=False) > cost.layer_seconds("6", 56, capped=False)
    assert cost.speedup({n: None for n in cost.names}) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not reachable"):
        cost.check_target(50.0)
    with pytest.raises(ValueError, match="give target_speedup"):
        trp.RankPruner(model, "channel", costs=cost)
    torch.manual_seed(0)
    pruner = trp.RankPruner(model, "channel", nuclear=1e-4, target_speedup=1.6, costs=cost, warmup=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, *SIZE), torch.randint(0, 10, (32,))
    model.train()
    for step in range(50):
        pruner.step()
        loss = nn.functional.cross_entropy(model(x[step % 4::4]), y[step % 4::4])
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
    assert pruner.budget.speedup == pytest.approx(cost.speedup(pruner.ranks))
    assert abs(pruner.budget.speedup - 1.6) <= 0.2, pruner.ranks


def test_trp_train_to_a_latency_target(tmp_path, capsys, monkeypatch):
    from cli_helpers import TINY, run_cli
    monkeypatch.setattr(lb, "RuntimeTimer", lambda name, device, threads, repeats: FakeTimer(per_call=1e-7))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", *TINY, "--epochs", "2", "--target-latency", "1.3", "--out", out)
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    rec = rep["latency_budget"]
    assert rep["target_latency"] == 1.3 and rep["runtime"] == "eager" and rec["met"] and rec["measured"] >= 1.3 * 0.97
    assert "target 1.3x, measured" in stdout
    assert json.loads((out / "latency.json").read_text())["entries"]  # the timings kept for the final decomposition
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["pruner"]["budget"]["target"] == 1.3  # the controller steered the training
    code, _, err = run_cli(capsys, "train", *TINY, "--target-latency", "40", "--out", tmp_path / "far")
    assert code != 0 and "not reachable" in err and not (tmp_path / "far" / "checkpoint.pt").exists()
    code, _, err = run_cli(capsys, "train", *TINY, "--target-latency", "1.3", "--energy", "0.9", "--out",
                           tmp_path / "both")
    assert code != 0 and "drop --energy" in err


def test_a_pessimistic_prediction_is_checked_by_measuring_the_fastest_allocation():
    # the network runs factorized layers faster than the sum of their single-layer times says (in_network < 0):
    # a target above the prediction is tried, measured, and met; one far above it is refused after measuring
    timer = FakeTimer(in_network=-1e-4)
    model = net()
    table = lb.LatencyTable(model, "channel", trp.plan_layers(model, "channel").targets, SIZE, runtime(timer))
    ceiling = table.max_speedup()
    target = ceiling * 1.15
    compact = trp.decompose(model, "channel", target_latency=target, input_size=SIZE, runtime=runtime(timer))
    rec = compact.trp_latency_budget
    assert rec["met"] and rec["measured"] >= target * 0.97
    assert rec["attempts"][0]["goal"] == rec["attempts"][0]["predicted"] == pytest.approx(ceiling)  # the probe
    assert rec["attempts"][1]["goal"] < ceiling  # rescaled by measured / predicted
    with pytest.raises(ValueError, match="measured a speed-up of .* over dense \\(predicted"):
        trp.decompose(model, "channel", target_latency=ceiling * 3, input_size=SIZE, runtime=runtime(timer))
    # far faster in the network than predicted: the rescaled goal would fall below 1, and stays a valid goal
    timer = FakeTimer(in_network=-4e-4)
    compact = trp.decompose(model, "channel", target_latency=ceiling * 1.05, input_size=SIZE, runtime=runtime(timer))
    assert compact.trp_latency_budget["met"] and compact.trp_latency_budget["attempts"][1]["goal"] > 1


def test_per_call_overhead_in_single_layer_times_scales_the_prediction():
    # every timed module pays a runtime call (per_module), once per network: the layers' times add up to more
    # than the network's, and the prediction scales them down instead of calling the target unreachable
    class Overhead(FakeTimer):
        def seconds(self, module, x):
            return super().seconds(module, x) + 2e-3

    model = net()
    table = lb.LatencyTable(model, "channel", trp.plan_layers(model, "channel").targets, SIZE, runtime(Overhead()))
    assert table.fixed == 0 and table.scale == pytest.approx(table.total_dense / sum(table.dense.values()))
    assert table.seconds({}) == pytest.approx(table.total_dense)
    assert 1 < table.max_speedup()
    compact = trp.decompose(model, "channel", target_latency=1.2, input_size=SIZE, runtime=runtime(Overhead()))
    assert compact.trp_latency_budget["met"]


def test_train_config_refuses_latency_with_other_criteria_and_processes():
    from trp.app import config
    with pytest.raises(ValueError, match="alternative decomposition criteria"):
        config.resolve_config({"target_latency": 1.5, "target_speedup": 2.0})
    with pytest.raises(ValueError, match="--nproc > 1"):
        config.resolve_config({"target_latency": 1.5, "nproc": 2})
    with pytest.raises(ValueError, match="--runtime"):
        config.resolve_config({"target_latency": 1.5, "runtime": "tensorrt"})
    with pytest.raises(ValueError, match="--target-latency"):
        config.resolve_config({"target_latency": 1.0})
