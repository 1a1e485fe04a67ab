"""The in-place projection of many small matrices (trp_kernels.inplace, the CPU path of RankPruner): bit for bit
the stacked warm-started lowrank_project over trajectories (warm steps, full solves, rank changes, a zeroed and a
suddenly moved matrix, float32/float64, with and without subgradient and max_rank), nothing written on NaN/Inf,
clear errors on bad input, and RankPruner's two paths giving the same training run."""
import copy
import pickle

import pytest
import torch

import trp
import trp_kernels
from test_lowrank_project import check_projection, make_batch
from test_warm_projection import _net, _train, sgd_like
from trp_kernels import WarmStart, inplace

pytestmark = pytest.mark.skipif(inplace.max_n() == 0, reason="trp_kernels._C without the in-place CPU op")

SHAPES = [(3, 20, 44), (2, 36, 18), (4, 12, 30)]  # p < q, p > q, and n below warm.MIN_N (always the full solve)


def start(dtype, seed=0):
    return [make_batch(B, p, q, "decay", seed=seed + i, dtype=dtype) + 0.05 * make_batch(B, p, q, "flat", seed=9 + i,
                                                                                       dtype=dtype)
            for i, (B, p, q) in enumerate(SHAPES)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("subgradient, max_rank", [(True, None), (False, None), (True, 5)])
def test_equals_the_stacked_warm_projection_bit_for_bit(dtype, subgradient, max_rank):
    gen = torch.Generator().manual_seed(1)
    stacks = start(dtype)
    mine, theirs = [WarmStart() for _ in SHAPES], [WarmStart() for _ in SHAPES]
    G = [torch.full_like(W, float("nan")) for W in stacks] if subgradient else None  # every entry is written
    warm_calls = 0
    for t in range(24):
        energy = (0.9, 0.8)[(t // 8) % 2]
        if t == 10:
            stacks[0][1] = 0.0                                               # a layer set to zero
        if t == 15:
            stacks[1][0] = torch.randn(stacks[1][0].shape, generator=gen, dtype=dtype)  # a sudden large update
        expected = [trp_kernels.lowrank_project(W, energy, max_rank=max_rank, subgradient=subgradient, warm=s)
                    for W, s in zip(stacks, theirs)]
        groups = [list(W.clone()) for W in stacks]  # each matrix its own tensor, as a layer's weight
        ranks = inplace.lowrank_project_(groups, energy, mine, max_rank=max_rank, G=G)
        for i, (W_low, rank, G_exp) in enumerate(expected):
            got = torch.stack(groups[i])
            if SHAPES[i][1] > 8 and SHAPES[i][2] > 8:  # n <= 8: the stacked op's full solve is Jacobi's
                assert torch.equal(got, W_low) and torch.equal(ranks[i], rank)
                assert torch.equal(mine[i].basis, theirs[i].basis) and torch.equal(mine[i].warm, theirs[i].warm)
                if subgradient:
                    assert torch.equal(G[i], G_exp)
            if t % 6 == 0:
                check_projection(stacks[i], energy, got, ranks[i], G[i] if subgradient else None, max_rank=max_rank)
        warm_calls += sum(int(s.warm.sum()) for s in mine)
        stacks = [sgd_like(torch.stack(g), 0.01, gen) for g in groups]
    assert warm_calls >= 0.5 * 23 * (SHAPES[0][0] + SHAPES[1][0])  # the warm path carried most steps


def test_non_finite_input_raises_and_changes_nothing():
    groups = [list(W.clone()) for W in start(torch.float32)]
    states = [WarmStart() for _ in groups]
    G = [torch.zeros(len(g), *g[0].shape) for g in groups]
    inplace.lowrank_project_(groups, 0.9, states, G=G)
    groups[1][1][3, 4] = float("nan")
    groups[2][0][0, 0] = float("inf")
    before = [[m.clone() for m in g] for g in groups], [x.clone() for x in G], [s.basis.clone() for s in states]
    with pytest.raises(ValueError, match=r"\[\(1, 1\), \(2, 0\)\].*NaN or Inf; nothing was modified") as info:
        inplace.lowrank_project_(groups, 0.9, states, G=G)
    assert isinstance(info.value, inplace.NonFiniteError) and info.value.bad == [(1, 1), (2, 0)]
    for g, b in zip(groups, before[0]):
        for m, x in zip(g, b):
            torch.testing.assert_close(m, x, rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(a, b) for a, b in zip(G, before[1]))
    assert all(torch.equal(s.basis, b) for s, b in zip(states, before[2]))


def test_bad_input_gets_a_clear_error():
    W = make_batch(2, 20, 30, "decay")
    ok = [list(W.clone())]
    assert inplace.supports(ok)
    cases = {
        "one shape and dtype": [[W[0].clone(), W[1, :, :20].clone()]],
        "contiguous": [[W[0].clone(), W[1].clone().T.contiguous().T]],
        "min\\(p, q\\) > ": [[torch.randn(inplace.max_n() + 1, inplace.max_n() + 2)]],
    }
    for message, groups in cases.items():
        assert not inplace.supports(groups)
        with pytest.raises(RuntimeError, match=message):
            inplace.lowrank_project_(groups, 0.9, [WarmStart()])
    assert not inplace.supports([[W[0].half()]]) and not inplace.supports([[W[0].clone()[None]]])
    with pytest.raises(RuntimeError, match=r"G\[0\] must be a contiguous \[B, p, q\] buffer"):
        inplace.lowrank_project_(ok, 0.9, [WarmStart()], G=[torch.zeros(2, 20, 31)])
    with pytest.raises(ValueError, match="energy must be a number in"):
        inplace.lowrank_project_(ok, 1.5, [WarmStart()])
    with pytest.raises(ValueError, match="max_rank must be None or an int >= 1"):
        inplace.lowrank_project_(ok, 0.9, [WarmStart()], max_rank=0)
    shared = [[W[0], W[0]]]  # the same memory twice: the threads would race on it
    assert not inplace.supports(shared)
    with pytest.raises(RuntimeError, match="share memory"):
        inplace.lowrank_project_(shared, 0.9, [WarmStart()])
    with pytest.raises(ValueError, match="must not require grad"):
        inplace.lowrank_project_([[W[0].clone().requires_grad_()]], 0.9, [WarmStart()])
    assert not inplace.supports([[]])
    with pytest.raises(TypeError, match="one trp_kernels.WarmStart per group"):
        inplace.lowrank_project_(ok, 0.9, [])
    assert torch.equal(torch.stack(ok[0]), W)  # nothing was written by the failed calls


def _pair(scheme="channel", **kwargs):
    """Two identical models and pruners: the in-place path and the stacked one."""
    out = []
    for inplace_path in (True, False):
        model = _net()
        pruner = trp.RankPruner(model, scheme, energy=0.5, nuclear=1e-3, **kwargs)
        pruner.inplace = inplace_path
        out.append((model, pruner))
    return out


def _assert_same_run(one, stacked, path):
    """The pruner of `one` took `path`, the other the stacked one, the warm step ran, and the two runs are bit
    for bit the same (weights, ranks, subgradients)."""
    (m1, p1), (m2, p2) = one, stacked
    assert (p1.path, p2.path) == (path, "stacked")
    assert any(bool(g.warm.warm.any()) for g in p1._groups)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert p1.ranks == p2.ranks
    assert all(torch.equal(g1.G, g2.G) for g1, g2 in zip(p1._groups, p2._groups))


def test_rank_pruner_paths_train_identically_and_resume_across_paths():
    (m1, p1), (m2, p2) = _pair()
    assert p1._inplace_groups() is not None and p2._inplace_groups() is None
    assert p1.path is None
    _train(m1, p1, 5)
    _train(m2, p2, 5)
    _assert_same_run((m1, p1), (m2, p2), "in place")
    # a state saved by one path resumes on the other, exactly
    p2.load_state_dict(p1.state_dict())
    _train(m1, p1, 3, seed=1)
    _train(m2, p2, 3, seed=1)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_rank_pruner_in_place_non_finite_weights_are_named_and_nothing_changes():
    (model, pruner), _ = _pair()
    _train(model, pruner, 2)
    names = pruner.layer_names
    with torch.no_grad():
        model.get_submodule(names[1]).weight[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    G = [g.G.clone() for g in pruner._groups]
    with pytest.raises(ValueError, match=f"non-finite weights .* in layer\\(s\\) {names[1]}; no layer was modified"):
        pruner.project()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert all(torch.equal(g.G, x) for g, x in zip(pruner._groups, G))


def test_rank_pruner_follows_new_parameter_storage_and_falls_back_where_it_must():
    (model, pruner), _ = _pair()
    _train(model, pruner, 2)
    model.float()  # new parameter tensors: the cached views must not be written
    pruner.step()
    for name, rank in pruner.ranks.items():
        w = model.get_submodule(name).weight
        assert w.dtype == torch.float32
        assert int(torch.linalg.matrix_rank(w.detach().flatten(1).double(), rtol=1e-5)) == rank
    model.to(memory_format=torch.channels_last)  # the matrices are no longer views: the stacked path
    assert pruner._inplace_groups() is None
    pruner.step()
    for name, rank in pruner.ranks.items():
        w = model.get_submodule(name).weight
        assert int(torch.linalg.matrix_rank(w.detach().flatten(1).double(), rtol=1e-5)) == rank
    for scheme in ("spatial", "nd"):
        assert trp.RankPruner(_net(), scheme, energy=0.5)._inplace_groups() is None


def test_the_reference_backend_setting_sends_the_pruner_to_the_stacked_path(monkeypatch):
    monkeypatch.setenv(trp_kernels.project.BACKEND_ENV, "reference")
    assert inplace.max_n() == 0
    assert trp.RankPruner(_net(), "channel", energy=0.5)._inplace_groups() is None


def test_a_copied_pruner_writes_its_own_model_only():
    (model, pruner), _ = _pair()
    _train(model, pruner, 2)
    twin = copy.deepcopy(pruner)  # with a copy of the model: its targets are the copy's parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pickle.loads(pickle.dumps(pruner))._inplace_cache is None


def test_rank_pruner_with_tied_layers_takes_the_stacked_path():
    models = []
    for inplace_path in (True, False):
        torch.manual_seed(6)
        model = torch.nn.Sequential(*_net(), torch.nn.Conv2d(24, 24, 3, padding=1).double())
        model[3].weight = model[2].weight  # tied: one parameter, two selected layers
        pruner = trp.RankPruner(model, "channel", energy=0.5, nuclear=1e-3)
        pruner.inplace = inplace_path
        assert pruner._inplace_groups() is None
        _train(model, pruner, 3)
        models.append(model)
    for k, v in models[0].state_dict().items():
        assert torch.equal(v, models[1].state_dict()[k]), k


def _no_stacked_calls(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the stacked path ran")
    monkeypatch.setattr(trp_kernels, "lowrank_project_many", fail)  # the pruner's stacked path: all groups at once
    monkeypatch.setattr(trp_kernels.project, "lowrank_project_many", fail)


@pytest.mark.parametrize("layout", ["spatial", "channels_last"])
def test_copied_matrices_take_the_in_place_op_on_staged_copies_and_train_identically(layout, monkeypatch):
    """Matrices that are copies of the weights (the spatial scheme; channel on channels_last weights) are
    stacked per group and projected by one in-place op call for all groups, then copied back: the same run as
    the stacked path, one op call per group."""
    (m1, p1), (m2, p2) = _pair("spatial" if layout == "spatial" else "channel")
    if layout == "channels_last":
        for m in (m1, m2):
            m.to(memory_format=torch.channels_last)
    assert p1._inplace_groups() is None  # not views: staged
    with monkeypatch.context() as patch:
        _no_stacked_calls(patch)
        _train(m1, p1, 5)
        with pytest.raises(AssertionError, match="the stacked path ran"):
            _train(m2, p2, 1)
    _train(m2, p2, 5)
    _assert_same_run((m1, p1), (m2, p2), "staged")
    if layout == "channels_last":
        assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in m1)


def test_staged_non_finite_weights_are_named_and_nothing_changes():
    (model, pruner), _ = _pair("spatial")
    _train(model, pruner, 2)
    names = pruner.layer_names
    with torch.no_grad():
        model.get_submodule(names[1]).weight[1, 2, 0, 1] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ranks = pruner.ranks
    with pytest.raises(ValueError, match=f"non-finite weights .* in layer\\(s\\) {names[1]}; no layer was modified"):
        pruner.project()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    assert pruner.ranks == ranks


def test_nd_filter_batches_keep_the_stacked_path(monkeypatch):
    model = _net()
    pruner = trp.RankPruner(model, "nd", energy=0.5)
    with monkeypatch.context() as patch:
        _no_stacked_calls(patch)
        with pytest.raises(AssertionError, match="the stacked path ran"):
            pruner.project()
    pruner.project()
    assert all(r is not None for r in pruner.ranks.values())
