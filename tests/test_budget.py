"""Budgeted TRP (trp.budget): the MAC cost model, the rank allocation at a target speed-up, the closed-loop
energy of RankPruner(target_speedup=), and `trp train --target-speedup / --deterministic`."""
import copy

import pytest
import torch
import torch.nn as nn

import trp
from trp.app import config, setup, train
from trp.core.selection import select_layers
from trp.prune import budget

INPUT = (3, 12, 10)


def small_net(seed=0):
    """Odd sizes, stride 2, padding 0, dilation 2, bias and no bias, a 1x1 conv and a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 24, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(24, 20, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(20, 28, (3, 2), padding=0, dilation=2), nn.ReLU(),
        nn.Conv2d(28, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def costs_of(model, scheme):
    return budget.CostModel(model, scheme, select_layers(model, scheme), INPUT)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "nd"])
def test_cost_model_counts_what_count_macs_counts(scheme):
    model = small_net()
    costs = costs_of(model, scheme)
    assert costs.total_dense == trp.count_macs(model, INPUT)
    for ranks in ({"2": 1, "4": 3, "6": 2}, {"2": 5, "4": 9, "6": 4}, {"2": 8, "4": 1, "6": 50}):
        compact = trp.decompose(model, scheme, rank=ranks)
        assert costs.macs(ranks) == trp.count_macs(compact, INPUT), ranks
    assert all(1 <= costs.pay_rank[n] < costs.full_rank[n] for n in costs.names)


@pytest.mark.parametrize("scheme", ["channel", "spatial", "nd"])
def test_decompose_at_target_meets_it_deterministically(scheme):
    model = small_net(seed=1)
    ranks = {}
    for target in (1.3, 2.3):
        compact = trp.decompose(model, scheme, target_speedup=target, input_size=INPUT)
        info = compact.trp_budget
        measured = trp.count_macs(model, INPUT) / trp.count_macs(compact, INPUT)
        assert info["speedup"] == pytest.approx(measured)
        assert measured >= target
        if scheme != "nd":  # nd's rank steps cost a whole layer's pointwise conv: too coarse a grain here
            assert measured <= 1.1 * target
        ranks[target] = info["ranks"]
    costs = costs_of(small_net(seed=1), scheme)  # the same seed: the same allocation
    assert budget.allocate(costs, budget.spectra(model, scheme, select_layers(model, scheme)), 2.3) == ranks[2.3]
    # a looser budget never gives a layer less rank (dense, None, is the most)
    loose, tight = ranks[1.3], ranks[2.3]
    assert all(loose[n] is None or (tight[n] is not None and tight[n] <= loose[n]) for n in loose)


def test_allocation_keeps_a_low_rank_network_exact_and_follows_energy_per_mac():
    """A network that is exactly low rank decomposes with no loss when the budget allows its ranks."""
    model = small_net(seed=2)
    pruner = trp.RankPruner(model, "channel", energy=1.0, nuclear=0.0, max_rank=2)
    pruner.project()  # every layer now has rank <= 2
    costs = costs_of(model, "channel")
    allowed = costs.speedup(pruner.ranks)
    compact = trp.decompose(model, "channel", target_speedup=allowed, input_size=INPUT)
    x = torch.randn(2, *INPUT)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-4, atol=1e-5)
    assert compact.trp_budget["speedup"] >= allowed


def test_bad_targets_are_clear_errors_before_any_work():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    top = costs_of(model, "channel").max_speedup()
    for bad, match in ((1.0, "target_speedup must be a finite number > 1"), (0.5, "> 1"),
                       (float("nan"), "target_speedup"), (True, "target_speedup"),
                       (top * 1.01, "above what rank 1 in every selected layer gives")):
        with pytest.raises(ValueError, match=match):
            trp.RankPruner(model, "channel", target_speedup=bad, input_size=INPUT)
        with pytest.raises(ValueError, match=match):
            trp.decompose(model, "channel", target_speedup=bad, input_size=INPUT)
    with pytest.raises(ValueError, match="input_size"):
        trp.RankPruner(model, "channel", target_speedup=2.0)
    with pytest.raises(ValueError, match="input_size"):
        trp.decompose(model, "channel", target_speedup=2.0)
    with pytest.raises(ValueError, match="not both"):
        trp.decompose(model, "channel", energy=0.9, target_speedup=2.0, input_size=INPUT)
    trp.decompose(model, "channel", target_speedup=top, input_size=INPUT)  # the limit itself is reachable
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="--target-speedup"):
        config.resolve_config({"target_speedup": 1.0})
    with pytest.raises(ValueError, match="--target-speedup and --threshold"):
        config.resolve_config({"target_speedup": 2.0, "threshold": 0.05})
    with pytest.raises(ValueError, match="--deterministic"):
        config.resolve_config({"deterministic": 1})
    for trp_on in (True, False):  # the baseline too: it decomposes at the target after training
        cfg = config.resolve_config(dict(data="digits", image_size=8, subset=16, trp=trp_on, target_speedup=50.0))
        with pytest.raises(ValueError, match="--target-speedup=50 is above what rank 1"):
            train.Run(cfg, log=lambda *_: None, progress=False)


def test_pruner_reaches_2x_after_training_and_after_decomposition():
    torch.manual_seed(0)
    model = small_net(seed=3)
    pruner = trp.RankPruner(model, "channel", nuclear=1e-4, target_speedup=2.0, input_size=INPUT, warmup=40)
    assert pruner.energy == pytest.approx(pruner.budget.energy) and pruner.energy > 0.999
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, *INPUT), torch.randint(0, 5, (64,))
    goals = []
    for step in range(80):
        pruner.step()
        goals.append(pruner.budget.goal())
        loss = nn.functional.cross_entropy(model(x[step % 4::4]), y[step % 4::4])
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
    assert goals[0] < 1.1 and goals[-1] == 2.0 and goals == sorted(goals)  # the warm-up ramp
    trained = costs_of(model, "channel").speedup(pruner.ranks)
    assert trained == pytest.approx(pruner.budget.speedup)
    assert abs(trained - 2.0) <= 0.2, pruner.ranks
    compact = trp.decompose(model, "channel", target_speedup=2.0, input_size=INPUT)
    assert abs(compact.trp_budget["speedup"] - 2.0) <= 0.2


def test_pruner_state_carries_the_controller():
    model = small_net()
    pruner = trp.RankPruner(model, "spatial", target_speedup=1.8, input_size=INPUT, warmup=5)
    for _ in range(3):
        pruner.step()
    state = pruner.state_dict()
    assert state["budget"]["updates"] == 3
    twin = copy.deepcopy(model)
    other = trp.RankPruner(twin, "spatial", target_speedup=1.8, input_size=INPUT, warmup=5)
    other.load_state_dict(state)
    assert other.energy == pruner.energy and other.budget.state_dict() == pruner.budget.state_dict()
    assert other.budget is not pruner.budget
    pruner.step()
    other.step()
    assert other.energy == pruner.energy
    for kwargs, match in (({}, "speed-up target"), ({"target_speedup": 1.5, "input_size": INPUT, "warmup": 5},
                                                   "target_speedup=1.8")):
        plain = trp.RankPruner(model, "spatial", **kwargs)
        with pytest.raises(ValueError, match=match):
            plain.load_state_dict(state)
    with pytest.raises(ValueError, match="no speed-up target"):
        other.load_state_dict(trp.RankPruner(model, "spatial").state_dict())


def test_train_target_speedup_deterministic_rerun_is_identical(tmp_path):
    def run(name):
        cfg = config.resolve_config(dict(data="digits", image_size=8, subset=48, batch_size=16, epochs=2,
                                        schedule=[1], seed=5, out=str(tmp_path / name), target_speedup=1.5,
                                        deterministic=True))
        return train.Run(cfg, log=lambda *_: None, progress=False).fit()

    threads = torch.get_num_threads()
    a, b = run("a"), run("b")
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert a.history == b.history and a.history[-1]["speedup"] >= 1.0
    assert a.pruner.budget.updates == a.pruner.steps > 0 and a.pruner.energy != a.cfg.energy  # steered
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.pruner.state_dict()["budget"] == b.pruner.state_dict()["budget"]
    # `trp train`'s end-of-training report decomposes at the target and says what it reached
    rep = train.final_report(a.model, a.bundle, a.test_loader, "cpu", "channel", target_speedup=1.5,
                             log=lambda *_: None, latency_repeats=1)
    assert rep["target_speedup"] == 1.5 and 1.5 <= rep["speedup"] <= 1.65


@pytest.mark.slow
def test_short_run_reaches_the_target_without_overshoot():
    """60 projections, warm-up 20, on a ResNet memorizing random labels at a high learning rate (SGD re-grows
    the ranks fast): the speed-up follows the ramp, reaches the target within the run and stays near it,
    never above it by more than a rank step (the integral law stayed at 1.0x for 10 projections, then passed
    3x, still rising; the gain of 1 overshot on real data)."""
    torch.manual_seed(0)
    size = (3, 16, 16)
    model = trp.models.build("resnet20")
    pruner = trp.RankPruner(model, "channel", target_speedup=2.0, input_size=size, warmup=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, *size), torch.randint(0, 10, (32,))
    speedups = []
    for _ in range(60):
        pruner.step()
        speedups.append(pruner.budget.speedup)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
    assert speedups[10] > 1.1 and speedups == sorted(speedups[:30]) + speedups[30:], speedups  # follows the ramp
    assert max(speedups) <= 2.2 and all(1.8 <= s for s in speedups[50:]), speedups  # reached, no overshoot
    assert 1.9 <= speedups[-1] <= 2.2, speedups
    assert min(pruner.ranks.values()) >= 4, pruner.ranks  # ranks do not collapse


class OneLayerCosts:
    """A cost model of one layer whose MACs are 100 per rank, 1000 dense, nothing else (the controller's
    interface of trp.cost.model.CostModel)."""
    names, total_dense, fixed = ["a"], 1000.0, 0.0

    def check_target(self, target, name="target_speedup"):
        return float(target)

    def macs(self, ranks, capped=True):
        return 100.0 * ranks["a"]

    def speedup(self, ranks, capped=True):
        return self.total_dense / self.macs(ranks)


def test_controller_law_gain_and_progress_trim():
    """1 - E = gain * excess + trim; below the goal the trim doubles after a projection that closed less than a
    tenth of the gap (standing still or creeping), halves after one that closed more, and falls back once the
    goal is met."""
    c = budget.SpeedupController(OneLayerCosts(), 2.0, gain=0.2, residual=1e-4)
    assert c.gain == budget.SpeedupController.GAIN == 0.2
    residual = lambda: 1 - c.energy  # noqa: E731
    c.update({"a": 10})  # 1000 MACs against a goal of 500: an excess of half the MACs
    assert residual() == pytest.approx(0.2 * 0.5 + 1e-4)
    c.update({"a": 10})  # no progress: the trim doubles
    assert residual() == pytest.approx(0.1 + 2e-4)
    c.update({"a": 9})  # 100 MACs less, more than a tenth of the 500-MAC gap: the trim halves
    assert residual() == pytest.approx(0.2 * (400 / 900) + 1e-4)
    for _ in range(3):
        c.update({"a": 9})  # stalled: 2e-4, 4e-4, 8e-4
    assert residual() == pytest.approx(0.2 * (400 / 900) + 8e-4)
    c.update({"a": 8.9})  # creeping: 10 MACs of a 400-MAC gap
    assert residual() == pytest.approx(0.2 * (390 / 890) + 1.6e-3)
    c.update({"a": 5})  # the goal is met: the trim falls back to its start and no excess is asked for
    assert residual() == pytest.approx(1e-4)
    gain_one = budget.SpeedupController(OneLayerCosts(), 2.0, gain=1.0)
    gain_one.update({"a": 8})
    assert 1 - gain_one.energy == pytest.approx(300 / 800 + 1e-4)  # the whole excess in one projection


def test_recipe_options_reach_the_pruner_and_old_records_keep_theirs():
    base = dict(data="digits", image_size=8, subset=48, batch_size=16, epochs=4, target_speedup=1.5)
    cfg = config.resolve_config(base)
    assert (cfg.budget_ramp, cfg.budget_gain) == (0.5, budget.SpeedupController.GAIN)
    tuned = config.resolve_config({**base, "budget_ramp": 0.25, "budget_gain": 0.5})
    bundle = trp.app.data.load("digits", 8, 48)
    assert setup.budget_args(tuned, bundle)["warmup"] == 3 and setup.budget_args(tuned, bundle)["gain"] == 0.5
    assert setup.budget_args(cfg, bundle)["warmup"] == 6  # half of 4 epochs of 3 steps
    record = cfg.to_dict()
    del record["budget_ramp"], record["budget_gain"]  # a checkpoint from before the options
    old = config.TrainConfig.from_record(record)
    assert (old.budget_ramp, old.budget_gain) == (0.25, 1.0)
    for option, value in (("budget_ramp", 1.5), ("budget_ramp", -0.1), ("budget_gain", 0.0),
                          ("budget_gain", 2.0)):
        with pytest.raises(ValueError, match="--" + option.replace("_", "-")):
            config.resolve_config({**base, option: value})


def test_nuclear_weight_defaults_to_zero_with_a_target_only():
    model = small_net()
    assert trp.RankPruner(model, "channel").nuclear == 3e-4
    assert trp.RankPruner(model, "channel", target_speedup=1.5, input_size=INPUT).nuclear == 0.0
    assert trp.RankPruner(model, "channel", nuclear=1e-4, target_speedup=1.5, input_size=INPUT).nuclear == 1e-4
    base = dict(data="digits", image_size=8, subset=16)
    assert config.resolve_config(base).nuclear == 3e-4
    assert config.resolve_config({**base, "target_speedup": 1.5}).nuclear == 0.0
    assert config.resolve_config({**base, "target_latency": 1.5}).nuclear == 0.0
    assert config.resolve_config({**base, "target_speedup": 1.5, "nuclear": 3e-4}).nuclear == 3e-4
    assert config.resolve_config({**base, "target_speedup": 1.5}, preset="cifar10-paper").nuclear == 3e-4
    with pytest.raises(ValueError, match="nuclear"):
        config.resolve_config({**base, "nuclear": -1.0})
