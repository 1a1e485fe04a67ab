"""RankPruner: which layers change and when, the energy-rule rank, the nuclear subgradient, atomicity on
non-finite weights, exact resume, autocast, bad input."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import trp
import trp_kernels
from trp.core.schemes import to_matrix


class SmallNet(nn.Module):
    """Two layers share a matrix shape (one group), others differ; a 1x1 conv and the stem stay dense."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        kw = {"dtype": dtype}
        self.stem = nn.Conv2d(3, 6, 3, padding=1, **kw)
        self.a = nn.Conv2d(6, 6, 3, padding=1, bias=False, **kw)
        self.b = nn.Conv2d(6, 6, 3, padding=1, bias=False, **kw)
        self.c = nn.Conv2d(6, 8, (3, 2), stride=2, padding=(1, 0), **kw)
        self.point = nn.Conv2d(8, 8, 1, **kw)
        self.fc = nn.Linear(8, 5, **kw)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.b(F.relu(self.a(x))))
        x = self.point(F.relu(self.c(x)))
        return self.fc(x.mean((2, 3)))


SELECTED = ["a", "b", "c"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def energy_rule(weight, scheme, energy):
    """Reference: float64 SVD, smallest k keeping `energy` of sum s^2, and the truncated matrix."""
    M = to_matrix(weight.detach(), scheme).to(torch.float64)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    s2 = S.square()
    k = int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1
    return k, (U[:, :k] * S[:k]) @ Vh[:k], U[:, :k] @ Vh[:k]


@settings(max_examples=25, deadline=None)
@given(period=st.integers(1, 4), calls=st.integers(1, 9), energy=st.floats(0.3, 0.99),
       scheme=st.sampled_from(["channel", "spatial"]), seed=st.integers(0, 2**16))
def test_step_projects_exactly_the_selected_layers_every_period(period, calls, energy, scheme, seed):
    torch.manual_seed(seed)
    model = SmallNet()
    pruner = trp.RankPruner(model, scheme, energy=energy, period=period, nuclear=0)
    assert pruner.layer_names == SELECTED
    for t in range(calls):
        with torch.no_grad():  # the optimizer's stand-in: every weight moves between calls
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        before = snapshot(model)
        projected = pruner.step()
        assert projected == (t % period == 0)
        after = model.state_dict()
        for key, value in after.items():
            layer = key.rsplit(".", 1)[0]
            if projected and key.endswith("weight") and layer in SELECTED:
                k, W_low, _ = energy_rule(before[key], scheme, energy)
                assert pruner.ranks[layer] == k
                got = to_matrix(value, scheme)
                torch.testing.assert_close(got, W_low, rtol=1e-10, atol=1e-10)
                assert int(torch.linalg.matrix_rank(got, rtol=1e-9)) == k
            else:
                assert torch.equal(value, before[key]), key
    assert pruner.steps == calls


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_subgradient_equals_autograd_gradient_of_nuclear_norm(scheme):
    # energy=1 keeps every singular value: the projection is the identity (to rounding) and U V^T is the
    # gradient of ||W||_*, which is differentiable at a full-rank matrix with distinct singular values.
    torch.manual_seed(3)
    model = SmallNet()
    pruner = trp.RankPruner(model, scheme, energy=1.0, nuclear=1.0)
    refs = {}
    for name in SELECTED:
        W = getattr(model, name).weight.detach().clone().requires_grad_(True)
        torch.linalg.matrix_norm(to_matrix(W, scheme), ord="nuc").backward()
        refs[name] = W.grad
    pruner.step()
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    for name in SELECTED:
        torch.testing.assert_close(getattr(model, name).weight.grad, refs[name], rtol=1e-9, atol=1e-10)
    assert model.stem.weight.grad is None and model.point.weight.grad is None


def test_regularize_adds_truncated_subgradient_on_projection_iterations_only():
    torch.manual_seed(4)
    model = SmallNet()
    pruner = trp.RankPruner(model, "channel", energy=0.7, period=2, nuclear=0.5)
    expected = {n: energy_rule(getattr(model, n).weight, "channel", 0.7)[2] for n in SELECTED}
    pruner.step()  # projects
    base = {n: torch.randn_like(getattr(model, n).weight) for n in SELECTED}
    for n in SELECTED:
        getattr(model, n).weight.grad = base[n].clone()
    pruner.regularize()
    for n in SELECTED:
        got = to_matrix(getattr(model, n).weight.grad - base[n], "channel")
        torch.testing.assert_close(got, 0.5 * expected[n], rtol=1e-9, atol=1e-10)
        getattr(model, n).weight.grad = base[n].clone()
    pruner.step()  # no projection: the released code adds nothing
    pruner.regularize()
    for n in SELECTED:
        assert torch.equal(getattr(model, n).weight.grad, base[n])


def test_nuclear_every_step_reuses_latest_basis_and_nuclear_zero_is_noop():
    torch.manual_seed(5)
    model = SmallNet()
    pruner = trp.RankPruner(model, "spatial", energy=0.8, period=3, nuclear=0.1, nuclear_every="step")
    pruner.step()
    pruner.regularize()
    first = {n: getattr(model, n).weight.grad.clone() for n in SELECTED}
    pruner.step()
    pruner.regularize()
    for n in SELECTED:
        torch.testing.assert_close(getattr(model, n).weight.grad, 2 * first[n])
    off = trp.RankPruner(SmallNet(), nuclear=0.0)
    off.step()
    off.regularize()
    assert all(p.grad is None for p in off.layers[0][1].parameters())


def test_one_batch_per_group_in_one_call(monkeypatch):
    calls = []
    real = trp_kernels.lowrank_project_many

    def spy(Ws, energy, **kw):
        calls.append([tuple(W.shape) for W in Ws])
        return real(Ws, energy, **kw)

    monkeypatch.setattr(trp_kernels, "lowrank_project_many", spy)
    pruner = trp.RankPruner(SmallNet(), "channel")
    pruner.inplace = False  # the stacked path (GPUs, sharding, spatial, nd): one host read for all groups
    pruner.step()
    assert len(calls) == 1 and sorted(calls[0]) == sorted([(2, 6, 54), (1, 8, 36)])  # a and b share one batch


def test_the_in_place_cpu_path_is_one_call_for_all_groups(monkeypatch):
    if trp_kernels.inplace.max_n() == 0:
        pytest.skip("trp_kernels._C without the in-place CPU op")
    calls = []
    real = trp_kernels.inplace.lowrank_project_

    def spy(groups, energy, warm, **kw):
        calls.append([[tuple(m.shape) for m in mats] for mats in groups])
        return real(groups, energy, warm, **kw)

    monkeypatch.setattr(trp_kernels.inplace, "lowrank_project_", spy)
    monkeypatch.setattr(trp_kernels, "lowrank_project", None)  # never called
    monkeypatch.setattr(trp_kernels, "lowrank_project_many", None)  # nor the stacked path
    pruner = trp.RankPruner(SmallNet(), "channel")
    pruner.step()
    assert sorted(calls[0]) == sorted([[(6, 54), (6, 54)], [(8, 36)]]) and len(calls) == 1


def test_non_finite_weight_names_layer_and_modifies_nothing():
    model = SmallNet()
    pruner = trp.RankPruner(model, "channel", energy=0.5)
    with torch.no_grad():
        model.c.weight[0, 0, 0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\bc\b"):
        pruner.step()
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)
    assert pruner.steps == 0
    with torch.no_grad():
        model.c.weight[0, 0, 0, 0] = float("inf")
        model.a.weight[1, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"a, c"):
        pruner.step()


def _train(model, opt, pruner, batches):
    for x, y in batches:
        pruner.step()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()


@pytest.mark.parametrize("nuclear_every", ["projection", "step"])
def test_resume_through_state_dict_is_exact(nuclear_every):
    torch.manual_seed(6)
    batches = [(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))) for _ in range(7)]
    init = SmallNet()

    def make():
        model = SmallNet()
        model.load_state_dict(init.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, opt, trp.RankPruner(model, "channel", energy=0.8, period=3, nuclear=1e-2,
                                          nuclear_every=nuclear_every)

    ref_model, ref_opt, ref_pruner = make()
    _train(ref_model, ref_opt, ref_pruner, batches)

    model, opt, pruner = make()
    _train(model, opt, pruner, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model, opt, pruner = make()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    pruner.load_state_dict(state["pruner"])
    assert pruner.steps == 4
    _train(model, opt, pruner, batches[4:])
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert pruner.ranks == ref_pruner.ranks


def test_load_state_dict_rejects_other_selection():
    state = trp.RankPruner(SmallNet(), "channel").state_dict()
    with pytest.raises(ValueError, match="another model"):
        trp.RankPruner(SmallNet(), "channel", layers=["a"]).load_state_dict(state)
    with pytest.raises(ValueError, match="another model"):
        trp.RankPruner(SmallNet(), "spatial").load_state_dict(state)


def test_works_under_autocast_and_with_adam():
    torch.manual_seed(7)
    model = SmallNet(dtype=torch.float32)
    twin = SmallNet(dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    pruner = trp.RankPruner(model, "channel", energy=0.8)
    trp.RankPruner(twin, "channel", energy=0.8).step()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pruner.step()
        loss = F.cross_entropy(model(x), y)
    for n in SELECTED:  # projected in float32, as outside autocast
        assert getattr(model, n).weight.dtype == torch.float32
        assert torch.equal(getattr(model, n).weight, getattr(twin, n).weight)
    opt.zero_grad()
    loss.backward()
    pruner.regularize()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_arguments_name_valid_choices():
    model = SmallNet()
    for energy in (0, 0.0, -1, 1.01, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
            trp.RankPruner(model, energy=energy)
    for period in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match="period must be an int >= 1"):
            trp.RankPruner(model, period=period)
    for nuclear in (-1e-4, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="nuclear must be a finite number >= 0"):
            trp.RankPruner(model, nuclear=nuclear)
    with pytest.raises(ValueError, match="valid choices: 'channel', 'spatial'"):
        trp.RankPruner(model, scheme="VH")
    with pytest.raises(ValueError, match="valid choices: 'projection', 'step'"):
        trp.RankPruner(model, nuclear_every="epoch")
    with pytest.raises(ValueError, match="matches no"):
        trp.RankPruner(model, layers=["missing"])
    with pytest.raises(ValueError, match="no layer selected"):
        trp.RankPruner(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 1)))
    assert "RankPruner(scheme='channel'" in repr(trp.RankPruner(model))


def test_model_must_be_a_module():
    for bad in (None, "resnet20", SmallNet):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            trp.RankPruner(bad)


def test_load_state_dict_rejects_malformed_states_and_changes_nothing():
    model = SmallNet()
    pruner = trp.RankPruner(model, "channel", energy=0.5, period=2)
    pruner.step()
    before = (pruner.steps, pruner.energy, pruner.period, pruner.ranks)
    good = trp.RankPruner(SmallNet(), "channel", energy=0.8, period=3).state_dict()
    bad_states = [{}, None, [], {"config": good["config"]}, dict(good, steps="x"),
                  dict(good, config=dict(good["config"], energy=2.0)),
                  dict(good, config={k: v for k, v in good["config"].items() if k != "period"}),
                  dict(good, ranks={"a": 1}, steps=-1)]
    for state in bad_states:
        with pytest.raises(ValueError, match="RankPruner.load_state_dict"):
            pruner.load_state_dict(state)
        assert (pruner.steps, pruner.energy, pruner.period, pruner.ranks) == before


def test_finiteness_is_checked_once_per_step(monkeypatch):
    """The pruner checks every group (one host sync per device) and tells the op not to check again."""
    from trp_kernels import project
    calls = []
    real = project.check_finite
    monkeypatch.setattr(project, "check_finite", lambda W: calls.append(W.shape) or real(W))
    pruner = trp.RankPruner(SmallNet(), "channel")
    pruner.step()
    assert calls == []
    trp_kernels.lowrank_project(torch.randn(2, 3, 4), 0.9)  # the public op still checks by itself
    assert calls == [(2, 3, 4)]
