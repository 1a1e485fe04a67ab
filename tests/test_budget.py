"""Budgeted TRP (trp.budget): the MAC cost model, the rank allocation at a target speed-up, the closed-loop
energy of RankPruner(target_speedup=), and `trp train --target-speedup / --deterministic`."""
import copy

import pytest
import torch
import torch.nn as nn

import trp
from trp.app import config, setup, train
from trp.core.schemes import to_matrix
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


def test_controller_law_gain_progress_cut_and_trim():
    """1 - E = gain * excess + trim; below the goal, a projection that closed less than a tenth of the gap (standing
    still or creeping) asks for a cut of gain x the gap where it costs least, and the energy follows the ranks
    after the cut; once the goal is met the trim falls back to its start."""
    c = budget.SpeedupController(OneLayerCosts(), 2.0, gain=0.2, residual=1e-4)
    assert c.gain == budget.SpeedupController.GAIN == 0.2
    residual = lambda: 1 - c.energy  # noqa: E731
    c.update({"a": 10})  # 1000 MACs against a goal of 500: an excess of half the MACs
    assert residual() == pytest.approx(0.2 * 0.5 + 1e-4) and c.cut is None  # no progress to judge yet
    c.update({"a": 10})  # no progress: a cut to 1000 - 0.2 * 500 MACs; the trim stays
    assert c.cut == pytest.approx(900) and residual() == pytest.approx(0.1 + 1e-4)
    c.after_cut({"a": 9})  # the energy of the ranks after the cut, whose MACs the next progress counts from
    assert c.cut is None and residual() == pytest.approx(0.2 * (400 / 900) + 1e-4) and c.speedup == 1000 / 900
    c.update({"a": 8.9})  # creeping: 10 MACs of a 400-MAC gap
    assert c.cut == pytest.approx(890 - 0.2 * 390)
    c.after_cut({"a": 8})
    c.update({"a": 7.5})  # 50 MACs of a 300-MAC gap: enough, no cut
    assert c.cut is None and residual() == pytest.approx(0.2 * (250 / 750) + 1e-4)
    c.update({"a": 5})  # the goal is met: the trim falls back to its start and no excess is asked for
    assert c.cut is None and residual() == pytest.approx(1e-4)
    c.update({"a": 4})  # above it, the trim shrinks by (goal / speed-up)^gain
    assert residual() == pytest.approx(1e-4 * (400 / 500) ** 0.2)
    gain_one = budget.SpeedupController(OneLayerCosts(), 2.0, gain=1.0)
    gain_one.update({"a": 8})
    assert 1 - gain_one.energy == pytest.approx(300 / 800 + 1e-4)  # the whole excess in one projection


class LayerCosts:
    """Layers with the given MACs per rank (uncapped), 10 fixed MACs (the controller's cost interface)."""
    fixed = 10.0

    def __init__(self, per_rank, full):
        self.per_rank, self.names = per_rank, list(per_rank)
        self.total_dense = self.fixed + sum(per_rank[n] * full for n in self.names)

    def macs(self, ranks, capped=True):
        return self.fixed + sum(self.per_rank[n] * ranks[n] for n in self.names)


def test_trim_removes_the_components_worth_least_per_mac_until_the_budget():
    costs = LayerCosts({"a": 10.0, "b": 30.0, "c": 20.0}, full=4)
    spectra = {"a": torch.tensor([4.0, 2.0, 1.0, 0.5]),  # shares of the 4th: 0.25 / 21.25, 3rd: 1 / 21.25
               "b": torch.tensor([3.0, 3.0, 3.0, 3.0]),  # 0.25 each: worth 0.25 / 30 per MAC
               "c": torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])}  # per filter: the 3rd is empty
    ranks = {"a": 4, "b": 4, "c": 3}
    spent = costs.macs(ranks)  # 10 + 40 + 120 + 60
    assert budget.cut_to(costs, spectra, ranks, spent) == {}  # nothing to do
    assert budget.cut_to(costs, spectra, ranks, spent - 1) == {"c": 2}  # the empty component first
    assert budget.cut_to(costs, spectra, ranks, spent - 21) == {"c": 2, "a": 3}  # 0.0118 / 10 < 0.25 / 30
    assert budget.cut_to(costs, spectra, ranks, spent - 31) == {"c": 2, "a": 2}  # a's 3rd: 0.047 / 10 < 0.0083
    # then b's 4th (0.25 / 30) before a's 2nd (0.19 / 10)
    assert budget.cut_to(costs, spectra, ranks, spent - 41) == {"c": 2, "a": 2, "b": 3}
    assert budget.cut_to(costs, spectra, ranks, 0.0) == {"a": 1, "b": 1, "c": 1}  # never below rank 1


def clean_low_rank_net(rank=4):
    """Convs whose weights have `rank` equal singular values: every kept component holds the same share of its
    layer, so a uniform energy drops one from every layer at once or none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))
    with torch.no_grad():
        for m in list(model)[2::2]:
            if isinstance(m, nn.Conv2d):
                n, q = m.weight.shape[0], m.weight[0].numel()
                U = torch.linalg.qr(torch.randn(n, rank))[0]
                V = torch.linalg.qr(torch.randn(q, rank))[0]
                m.weight.copy_((U @ V.T).reshape(m.weight.shape))
    return model


def test_the_last_step_to_the_goal_is_one_rank_where_it_costs_least():
    """Clean spectra (no training): the energy cannot make a small step; the cut removes single components, the
    cheapest first, and the goal is met with the fewest."""
    model = clean_low_rank_net()
    size = (3, 8, 8)
    costs = budget.CostModel(model, "channel", select_layers(model, "channel", ["2", "4", "6"]), size)
    start = {"2": 4, "4": 4, "6": 4}
    target = costs.total_dense / (costs.macs(start, capped=False) - 1)  # just above what rank 4 gives
    pruner = trp.RankPruner(model, "channel", layers=["2", "4", "6"], target_speedup=target, input_size=size)
    seen = []
    for _ in range(12):
        pruner.step()
        seen.append(dict(pruner.ranks))
    assert seen[0] == start  # the first projection: nothing to judge progress by
    # equal shares: a component is worth least per MAC in the layer whose rank costs most
    assert seen[-1] == {**start, max(start, key=lambda n: costs.per_rank[n]): 3}, seen  # one, in one layer
    assert pruner.budget.speedup >= target and costs.speedup(seen[-1]) >= target


def test_a_cut_truncates_each_matrix_to_its_svd_at_the_new_rank():
    """Every scheme and path: a cut layer's matrices equal their truncated SVD (float64), the other layers are
    untouched bit for bit, the ranks and the nuclear subgradient follow."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, stride=2, padding=2,
                                                                               dilation=2),
                          nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(12, 10, 3),
                          nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 9, 9))
    for scheme in ("channel", "spatial", "nd_pointwise", "nd_depthwise"):
        for inplace in (True, False):
            net = copy.deepcopy(model)
            pruner = trp.RankPruner(net, scheme, energy=0.999, nuclear=1e-3)
            pruner.inplace = inplace
            pruner.project()
            before = {n: m.weight.detach().clone() for n, m in pruner.layers}
            ranks, filter_ranks = pruner.ranks, pruner.filter_ranks
            victims = pruner.layer_names[:2]
            seen = {}

            def decide(spectra):
                seen.update(spectra)
                return {n: ranks[n] - 2 for n in victims}

            assert pruner.engine.cut(decide) == {n: ranks[n] - 2 for n in victims}
            assert set(seen) == set(pruner.layer_names)
            for t in pruner.targets:
                n, w = t.name, t.module.weight.detach()
                if n not in victims:
                    assert torch.equal(w, before[n]) and pruner.ranks[n] == ranks[n], (scheme, n)
                    continue
                own = t.scheme_for(scheme)
                M = to_matrix(before[n].double(), own, t.groups)
                U, S, Vh = torch.linalg.svd(M, full_matrices=False)
                torch.testing.assert_close(seen[n], S, rtol=1e-10, atol=1e-12)
                k = ranks[n] - 2
                want = (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
                torch.testing.assert_close(to_matrix(w.double(), own, t.groups), want, rtol=1e-5, atol=1e-6)
                assert pruner.ranks[n] == k, (scheme, n)
                per = pruner.filter_ranks[n]
                if isinstance(per, list):
                    assert per == [min(r, k) for r in filter_ranks[n]]
            G = {n: Gn for g in pruner._groups for n, Gn in zip(g.names, g.G.unbind(0))}
            for t in pruner.targets:
                if t.name in victims:
                    own = t.scheme_for(scheme)
                    U, S, Vh = torch.linalg.svd(to_matrix(before[t.name].double(), own, t.groups),
                                                full_matrices=False)
                    k = ranks[t.name] - 2
                    torch.testing.assert_close(G[t.name].double(), U[..., :k] @ Vh[..., :k, :], rtol=1e-5,
                                               atol=1e-6)


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
