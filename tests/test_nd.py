"""Network decoupling in both orders: nd_pointwise (per-filter reshape; DecoupledConv2d) and nd_depthwise (per
input channel; DepthwiseDecoupledConv2d): reshape and projection, the nuclear subgradient, the modules, decompose,
MACs/FLOPs, report and plot, save/load; "nd" picking the cheaper order per layer; `trp train --scheme nd`."""
import itertools
import json

import pytest
import torch
import torch.nn as nn

import trp
from cli_helpers import TINY
from test_pruner import SELECTED, SmallNet
from trp.core.schemes import from_matrix, matrix_shape, nd_order, resolve, to_matrix
from trp.deploy.decompose import ND_DEFAULT_ENERGY
from trp.nn.modules import FACTORIZED


def truncated(M, energy):
    """(k, the rank-k truncation) of one matrix by the energy rule, from its float64 SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    s2 = S.square()
    k = next(k for k in range(1, len(S) + 1) if s2[:k].sum() >= energy * s2.sum())
    return k, (U[:, :k] * S[:k]) @ Vh[:k]


def per_filter_truncation(W, energy):
    """Exact float64 reference: every filter's c x (kh*kw) matrix truncated by the energy rule, one by one."""
    ranks, out = [], torch.empty_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        k, low = truncated(W[i].reshape(W.shape[1], -1), energy)
        ranks.append(k)
        out[i] = low.reshape(W.shape[1:])
    return ranks, out


def lowrank_filters(n, c, kh, kw, r, dtype=torch.float64):
    """A conv weight whose every filter matrix c x (kh*kw) has rank exactly r."""
    return (torch.randn(n, c, r, dtype=dtype) @ torch.randn(n, r, kh * kw, dtype=dtype)).reshape(n, c, kh, kw)


def test_nd_layout_is_one_matrix_per_filter():
    W = torch.randn(5, 3, 2, 4)
    M = to_matrix(W, "nd_pointwise")
    assert M.shape == matrix_shape(W.shape, "nd_pointwise") == (5, 3, 8)
    for i, c in itertools.product(range(5), range(3)):
        assert torch.equal(M[i, c], W[i, c].flatten())
    assert torch.equal(from_matrix(M, "nd_pointwise", W.shape), W)
    with pytest.raises(ValueError, match="channel"):
        to_matrix(torch.randn(4, 9), "nd_pointwise")
    with pytest.raises(ValueError, match="picks an order per layer"):
        to_matrix(W, "nd")


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95])
def test_projection_is_the_exact_per_filter_truncation(energy):
    torch.manual_seed(1)
    model = SmallNet()
    before = {n: getattr(model, n).weight.detach().clone() for n in SELECTED + ["stem", "point"]}
    pruner = trp.RankPruner(model, "nd_pointwise", energy=energy, nuclear=0)
    assert len(pruner._groups) == 2  # a and b share a shape: one batched call covers all their filters
    pruner.step()
    for name in SELECTED:
        ranks, ref = per_filter_truncation(before[name], energy)
        torch.testing.assert_close(getattr(model, name).weight, ref, rtol=1e-10, atol=1e-10)
        assert pruner.filter_ranks[name] == ranks and pruner.ranks[name] == max(ranks)
    assert max(pruner.ranks.values()) < 6  # the ranks dropped below min(c, kh*kw) = 6
    assert model.stem.weight.equal(before["stem"]) and model.point.weight.equal(before["point"])


def test_one_projection_call_per_group_covers_all_filters(monkeypatch):
    import trp_kernels
    calls = []
    real = trp_kernels.lowrank_project_many
    monkeypatch.setattr(trp_kernels, "lowrank_project_many",
                        lambda Ws, *a, **k: calls.append([W.shape for W in Ws]) or real(Ws, *a, **k))
    trp.RankPruner(SmallNet(), "nd_pointwise", energy=0.9).step()
    assert len(calls) == 1 and sorted(calls[0]) == sorted([(2 * 6, 6, 9), (8, 6, 6)])  # [layers * filters, c, kh*kw]


def test_subgradient_equals_autograd_of_per_filter_nuclear_norm():
    # energy=1 keeps every component: U V^T per filter is the gradient of sum_i ||W_i||_*
    torch.manual_seed(3)
    model = SmallNet()
    pruner = trp.RankPruner(model, "nd_pointwise", energy=1.0, nuclear=0.5)
    refs, total = {}, 0.0
    for name in SELECTED:
        W = getattr(model, name).weight.detach().clone().requires_grad_(True)
        norm = torch.linalg.matrix_norm(W.reshape(W.shape[0], W.shape[1], -1), ord="nuc").sum()
        norm.backward()
        norm = norm.detach()
        refs[name], total = 0.5 * W.grad, total + norm.item()
    assert pruner.nuclear_norm() == pytest.approx(total, rel=1e-12)
    pruner.step()
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    for name in SELECTED:
        torch.testing.assert_close(getattr(model, name).weight.grad, refs[name], rtol=1e-9, atol=1e-10)


def test_resume_through_state_dict_keeps_per_filter_subgradients():
    torch.manual_seed(4)
    model = SmallNet()
    pruner = trp.RankPruner(model, "nd_pointwise", energy=0.8, nuclear=1e-2, period=3, nuclear_every="step")
    pruner.step()
    state = pruner.state_dict()
    assert state["subgradients"]["a"].shape == (6, 6, 9)
    other = trp.RankPruner(model, "nd_pointwise", energy=0.8, nuclear=1e-2, period=3, nuclear_every="step")
    other.load_state_dict(state)
    assert other.ranks == pruner.ranks
    for g, h in zip(pruner._groups, other._groups):
        assert torch.equal(g.G, h.G)


CONFIGS = [  # (c, n, kernel, stride, padding, dilation, bias)
    (3, 5, 3, 1, 0, 1, True), (5, 4, 3, 2, 1, 1, False), (7, 3, 3, 1, "same", 2, True),
    (4, 6, (2, 3), 1, "same", 1, False), (6, 5, (3, 2), 2, (1, 0), (2, 1), True), (5, 7, 3, 1, 1, 2, False),
    (3, 4, 2, 1, "same", 2, True)]


@pytest.mark.parametrize("c,n,k,stride,padding,dil,bias", CONFIGS)
def test_from_conv_is_exact_on_rank_r_filters_and_at_full_rank(c, n, k, stride, padding, dil, bias):
    conv = nn.Conv2d(c, n, k, stride=stride, padding=padding, dilation=dil, bias=bias, dtype=torch.float64)
    kh, kw = conv.kernel_size
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    full = trp.DecoupledConv2d.from_conv(conv, rank=100)  # capped by min(c, kh*kw)
    assert full.rank == min(c, kh * kw)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full.dense_weight(), conv.weight, rtol=1e-10, atol=1e-12)
    r = max(1, min(c, kh * kw) - 1)
    with torch.no_grad():
        conv.weight.copy_(lowrank_filters(n, c, kh, kw, r))
    for crit in ({"threshold": 1e-8}, {"energy": 1.0 - 1e-12}, {"rank": r}):
        m = trp.DecoupledConv2d.from_conv(conv, **crit)
        assert m.rank == r, crit
        assert m.pw_weight.shape == (n * r, c, 1, 1) and m.dw_weight.shape == (n, r, kh, kw)
        torch.testing.assert_close(m(x), conv(x), rtol=1e-10, atol=1e-10)


def test_grouped_channel_order_is_path_j_of_filter_i():
    # filter i, path j = pointwise channel i*r+j: the module equals the sum of its parallel paths
    m = trp.DecoupledConv2d(3, 2, 3, rank=2, padding=1, bias=False, dtype=torch.float64)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    paths = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    for i, j in itertools.product(range(2), range(2)):
        mid = nn.functional.conv2d(x, m.pw_weight[i * 2 + j:i * 2 + j + 1])
        paths[:, i] += nn.functional.conv2d(mid, m.dw_weight[i:i + 1, j:j + 1], padding=1)[:, 0]
    torch.testing.assert_close(m(x), paths)


def make_net(r=None):
    """Stem + three 3x3 convs (one stride 2, odd channels); with r, their filters have rank r."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 17, 3, padding=1, bias=False),
                        nn.ReLU(), nn.Conv2d(17, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 31, 3, padding="same", dilation=2)).double()
    if r is not None:
        for i in (2, 4, 6):
            with torch.no_grad():
                net[i].weight.copy_(lowrank_filters(*net[i].weight.shape[:2], 3, 3, r))
    return net


def test_decompose_exact_ranks_and_dense_where_no_saving():
    net = make_net(r=1)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    compact = trp.decompose(net, "nd_pointwise", threshold=1e-8)
    layers = trp.factorized_layers(compact)
    assert set(layers) == {"2", "4", "6"} and all(isinstance(m, trp.DecoupledConv2d) for m in layers.values())
    assert all(m.rank == 1 for m in layers.values())
    torch.testing.assert_close(compact(x), net(x), rtol=1e-9, atol=1e-9)
    # rank 3: the stride-2 layer (1 x 1 conv at 4x the output pixels) would cost more than dense: stays dense
    compact = trp.decompose(make_net(r=3), "nd_pointwise", threshold=1e-8)
    assert set(trp.factorized_layers(compact)) == {"2", "6"}
    assert isinstance(compact[4], nn.Conv2d)
    full = trp.decompose(net, "nd_pointwise", rank=9)  # 9 paths cost more than the dense conv everywhere
    assert trp.factorized_layers(full) == {}


def test_default_deployment_rule_is_energy_085():
    net = make_net()
    ranks = {n: m.rank for n, m in trp.factorized_layers(trp.decompose(net, "nd", rank=3)).items()}
    default = trp.factorized_layers(trp.decompose(net, "nd", layers=["2", "6"]))
    explicit = trp.factorized_layers(trp.decompose(net, "nd", energy=ND_DEFAULT_ENERGY, layers=["2", "6"]))
    assert {n: m.rank for n, m in default.items()} == {n: m.rank for n, m in explicit.items()}
    assert ranks  # sanity: the net decomposes at all
    with pytest.raises(ValueError, match="exactly one"):
        trp.decompose(net, "channel")  # the other schemes still need a criterion


def test_macs_and_flops_match_the_formula():
    m = trp.DecoupledConv2d(6, 10, 3, rank=2, stride=2, padding=1)
    x_hw, (oh, ow) = (9, 7), (5, 4)
    expected = 6 * 10 * 2 * x_hw[0] * x_hw[1] + 10 * 2 * 9 * oh * ow  # 1x1 at the input size + depthwise
    assert trp.count_macs(m, (6, *x_hw)) == expected
    assert trp.count_macs(m, (3, 6, *x_hw)) == 3 * expected
    assert trp.count_flops(m, (6, *x_hw)) == 2 * expected
    assert m.macs_per_output_pixel() == 2 * 10 * (6 * 4 + 9)


def test_report_plot_and_save_load_round_trip(tmp_path):
    net = make_net(r=2)
    compact = trp.decompose(net, "nd_pointwise", energy=0.999999)
    rep = trp.report(net, compact, (3, 12, 12), latency=False)
    rows = {r["layer"]: r for r in rep.rows}
    assert rows["2"]["rank"] == 2 and rows["2"]["matrix"] == [17, 16, 9] and rows["2"]["type"] == "nd_pointwise"
    assert rows["2"]["energy_kept"] == pytest.approx(1.0)
    assert "17 x 16x9" in str(rep)
    assert rep.totals["macs_compact"] == trp.count_macs(compact, (3, 12, 12)) < rep.totals["macs_dense"]
    lossy = trp.decompose(make_net(), "nd_pointwise", rank=2, layers=["2"])
    kept = trp.report(make_net(), lossy, (3, 12, 12), latency=False).rows[1]["energy_kept"]
    S = torch.linalg.svdvals(make_net()[2].weight.detach().reshape(17, 16, 9))
    assert kept == pytest.approx(float(S[:, :2].square().sum() / S.square().sum()))
    from trp.deploy import plots
    spectra = plots.layer_spectra(net, compact, "nd_pointwise")
    # "4" (stride 2) stays dense at rank 2: its 1 x 1 conv at 4x the output pixels would cost more
    assert [(n, full, k) for n, _, full, k in spectra] == [("2", 9, 2), ("4", 9, 9), ("6", 9, 2)]
    assert plots.rank_spectrum(net, compact, "nd_pointwise", tmp_path / "r.png", energy=0.9).exists()
    path = tmp_path / "nd.pt"
    trp.save(compact, path)
    loaded = trp.load(path, base=net)
    assert isinstance(loaded[2], trp.DecoupledConv2d) and loaded[2].config() == compact[2].config()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    assert torch.equal(loaded(x), compact(x))


def test_resnet_round_trip_through_recorded_arch(tmp_path):
    model = trp.models.build("resnet20")
    compact = trp.decompose(model, "nd", rank=2)
    assert len(trp.factorized_layers(compact)) > 0
    trp.save(compact, tmp_path / "m.pt")
    loaded = trp.load(tmp_path / "m.pt").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), compact.eval()(x))


def test_trp_train_scheme_nd_decomposes_without_loss(tmp_path):
    from trp.app.cli import main
    out = tmp_path / "run"
    assert main(["train", *TINY, "--scheme", "nd", "--energy", "0.6", "--epochs", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["scheme"] == "nd" and rep["report"]["totals"]["layers_factorized"] > 0
    assert rep["speedup"] > 1.0
    # TRP projected every step: decomposing at the trained energy keeps (almost) all of every filter
    assert all(r["energy_kept"] > 0.999 for r in rep["report"]["layers"] if r["rank"] is not None)
    assert rep["decomposed_acc"] == pytest.approx(rep["dense_acc"], abs=100 / 48 + 1e-9)  # <= 1 image
    loaded = trp.load(out / "decomposed.pt")
    assert any(isinstance(m, trp.DecoupledConv2d) for m in loaded.modules())


# --- the depthwise order, and "nd" picking per layer ---------------------------------------------------------

def per_channel_truncation(W, energy, groups=1):
    """Float64 reference for nd_depthwise: every input channel's n/g x (kh*kw) matrix (over its group's
    filters) truncated by the energy rule, one by one."""
    n, c = W.shape[:2]
    m, ranks, out = n // groups, [], torch.empty_like(W, dtype=torch.float64)
    for j in range(c * groups):
        rows = slice(j // c * m, j // c * m + m)
        k, low = truncated(W[rows, j % c].reshape(m, -1), energy)
        ranks.append(k)
        out[rows, j % c] = low.reshape(m, *W.shape[2:])
    return ranks, out


@pytest.mark.parametrize("groups", [1, 3])
def test_depthwise_layout_is_one_matrix_per_input_channel(groups):
    W = torch.randn(2, 6, 5, 2, 3)  # a batch of two weights [n=6, c/g=5, 2, 3]
    M = to_matrix(W, "nd_depthwise", groups)
    assert M.shape == (2, *matrix_shape(W.shape[1:], "nd_depthwise", groups)) == (2, 5 * groups, 6 // groups, 6)
    m = 6 // groups
    for j in range(5 * groups):  # input channel j belongs to group j // 5, whose filters are rows j//5*m ...
        assert torch.equal(M[1, j], W[1, j // 5 * m:(j // 5 + 1) * m, j % 5].flatten(1))
    assert torch.equal(from_matrix(M, "nd_depthwise", W.shape[1:], groups), W)


def test_nd_picks_the_order_with_fewer_macs_per_layer():
    cases = [(16, 16, 3, 1), (16, 32, 3, 2), (32, 16, 3, 1), (16, 32, 3, 1), (64, 64, (1, 7), 1), (24, 24, 5, 2)]
    for c, n, k, s in cases:
        conv = nn.Conv2d(c, n, k, stride=s)
        order = resolve("nd", tuple(conv.weight.shape), 1, conv.stride)
        assert order == nd_order(tuple(conv.weight.shape), 1, conv.stride)
        macs = {o: FACTORIZED[o](c, n, k, 1, stride=s).macs_per_output_pixel()
                for o in ("nd_pointwise", "nd_depthwise")}
        assert macs[order] == min(macs.values()), (c, n, k, s, macs)
        if macs["nd_pointwise"] == macs["nd_depthwise"]:
            assert order == "nd_pointwise"  # a tie keeps the pointwise order
    assert resolve("nd", (16, 16, 3, 3), 1, 1) == "nd_pointwise"  # square stride 1: a tie
    assert resolve("nd", (32, 16, 3, 3), 1, 2) == "nd_depthwise"  # a stride-2 layer pays in depthwise order
    assert resolve("channel", (32, 16, 3, 3), 1, 2) == "channel"


GROUPED = CONFIGS + [(6, 9, 3, 2, 1, 1, True, 3), (4, 8, (3, 2), 1, "same", 2, False, 2)]


@pytest.mark.parametrize("cfg", GROUPED, ids=str)
def test_depthwise_from_conv_is_exact_on_rank_r_channels_and_at_full_rank(cfg):
    c, n, k, stride, padding, dil, bias, *g = cfg
    g = g[0] if g else 1
    conv = nn.Conv2d(c, n, k, stride=stride, padding=padding, dilation=dil, bias=bias, groups=g,
                     dtype=torch.float64)
    kh, kw = conv.kernel_size
    x = torch.randn(2, c, 9, 8, dtype=torch.float64)
    full = trp.DepthwiseDecoupledConv2d.from_conv(conv, rank=100)  # capped by min(n/g, kh*kw)
    assert full.rank == min(n // g, kh * kw)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full.dense_weight(), conv.weight, rtol=1e-10, atol=1e-12)
    r = max(1, min(n // g, kh * kw) - 1)
    low = torch.randn(c, n // g, r, dtype=torch.float64) @ torch.randn(c, r, kh * kw, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(from_matrix(low, "nd_depthwise", conv.weight.shape, g))
    for crit in ({"threshold": 1e-8}, {"energy": 1.0 - 1e-12}, {"rank": r}):
        m = trp.DepthwiseDecoupledConv2d.from_conv(conv, **crit)
        assert m.rank == r, crit
        assert m.dw_weight.shape == (c * r, 1, kh, kw) and m.pw_weight.shape == (n, c // g * r, 1, 1)
        torch.testing.assert_close(m(x), conv(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m(x[0]), conv(x[0]), rtol=1e-10, atol=1e-10)  # unbatched, as nn.Conv2d


def test_depthwise_channel_order_is_path_l_of_input_channel_j():
    # depthwise channel j*r+l is path l of input channel j; the module is the sum of its paths
    m = trp.DepthwiseDecoupledConv2d(3, 4, 3, rank=2, stride=2, padding=1, bias=False, dtype=torch.float64)
    x = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    paths = 0
    for j, l in itertools.product(range(3), range(2)):
        mid = nn.functional.conv2d(x[:, j:j + 1], m.dw_weight[j * 2 + l:j * 2 + l + 1], stride=2, padding=1)
        paths = paths + nn.functional.conv2d(mid, m.pw_weight[:, j * 2 + l:j * 2 + l + 1])
    torch.testing.assert_close(m(x), paths)


@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_depthwise_projection_is_the_exact_per_channel_truncation(energy):
    torch.manual_seed(6)
    model = SmallNet()
    before = {n: getattr(model, n).weight.detach().clone() for n in SELECTED}
    pruner = trp.RankPruner(model, "nd_depthwise", energy=energy, nuclear=0)
    pruner.step()
    for name in SELECTED:
        ranks, ref = per_channel_truncation(before[name], energy)
        torch.testing.assert_close(getattr(model, name).weight, ref, rtol=1e-10, atol=1e-10)
        assert pruner.filter_ranks[name] == ranks and pruner.ranks[name] == max(ranks)


def test_depthwise_subgradient_equals_autograd_of_per_channel_nuclear_norm():
    torch.manual_seed(7)
    model = SmallNet()
    pruner = trp.RankPruner(model, "nd_depthwise", energy=1.0, nuclear=0.5)
    refs = {}
    for name in SELECTED:
        W = getattr(model, name).weight.detach().clone().requires_grad_(True)
        torch.linalg.matrix_norm(W.transpose(0, 1).flatten(2), ord="nuc").sum().backward()
        refs[name] = 0.5 * W.grad
    pruner.step()
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    for name in SELECTED:
        torch.testing.assert_close(getattr(model, name).weight.grad, refs[name], rtol=1e-9, atol=1e-10)


def test_nd_trains_each_layer_in_its_order_and_decomposes_exactly_at_the_pruner_ranks():
    net = make_net()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    pruner = trp.RankPruner(net, "nd", energy=0.7, nuclear=0)
    orders = {t.name: t.scheme_for("nd") for t in pruner.targets}
    # 16 -> 17 and 32 -> 31 at stride 1 pay in the order with fewer inputs per path; 17 -> 32 at stride 2 in
    # depthwise order
    assert orders == {"2": "nd_depthwise", "4": "nd_depthwise", "6": "nd_pointwise"}
    pruner.step()
    y = net(x)
    compact = trp.decompose(net, "nd", rank=pruner.ranks)
    types = {n: type(m) for n, m in trp.factorized_layers(compact).items()}
    assert types == {"2": trp.DepthwiseDecoupledConv2d, "4": trp.DepthwiseDecoupledConv2d, "6": trp.DecoupledConv2d}
    torch.testing.assert_close(compact(x), y, rtol=1e-9, atol=1e-9)
    for name, order in orders.items():  # the projection was the per-matrix truncation of that order
        assert pruner.filter_ranks[name] == [int(r) for r in torch.linalg.matrix_rank(
            to_matrix(net.get_submodule(name).weight.detach(), order), rtol=1e-9)]


def test_depthwise_order_pays_at_stride_2_where_the_pointwise_order_does_not():
    net = make_net(r=3)  # layer 4: 17 -> 32, stride 2
    pointwise = trp.decompose(net, "nd_pointwise", rank=3, layers=["4"])
    assert trp.factorized_layers(pointwise) == {}  # 1 x 1 conv at 4x the output pixels: costs more than dense
    depthwise = trp.decompose(net, "nd", rank=3, layers=["4"])
    assert isinstance(depthwise[4], trp.DepthwiseDecoupledConv2d)
    x_hw, (oh, ow) = (12, 12), (6, 6)
    dense = trp.count_macs(net[4], (17, *x_hw))
    assert trp.count_macs(depthwise[4], (17, *x_hw)) == 3 * 17 * (9 + 32) * oh * ow < dense / 2


def test_depthwise_macs_and_flops_match_the_formula():
    m = trp.DepthwiseDecoupledConv2d(6, 10, 3, rank=2, stride=2, padding=1, groups=2)
    x_hw, (oh, ow) = (9, 7), (5, 4)
    expected = (6 * 2 * 9 + 10 * 3 * 2) * oh * ow  # depthwise 6 -> 12, then 1 x 1 12 -> 10 in 2 groups
    assert trp.count_macs(m, (6, *x_hw)) == expected
    assert trp.count_flops(m, (6, *x_hw)) == 2 * expected
    assert m.macs_per_output_pixel() == 2 * 6 * (9 + 10 // 2)


def test_depthwise_report_save_load_and_the_old_nd_type(tmp_path):
    net = make_net()
    for i in (2, 4, 6):  # every input channel's matrix of rank 2
        w = net[i].weight
        low = torch.randn(w.shape[1], w.shape[0], 2, dtype=w.dtype) @ torch.randn(w.shape[1], 2, 9, dtype=w.dtype)
        with torch.no_grad():
            w.copy_(from_matrix(low, "nd_depthwise", w.shape))
    compact = trp.decompose(net, "nd_depthwise", energy=0.999999)
    rows = {r["layer"]: r for r in trp.report(net, compact, (3, 12, 12), latency=False).rows}
    assert rows["2"]["type"] == "nd_depthwise" and rows["2"]["matrix"] == [16, 17, 9]
    path = tmp_path / "dw.pt"
    trp.save(compact, path)
    loaded = trp.load(path, base=net)
    assert isinstance(loaded[2], trp.DepthwiseDecoupledConv2d) and loaded[2].config() == compact[2].config()
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    assert torch.equal(loaded(x), compact(x))
    # files written before the two orders existed name the pointwise order "nd"
    old = dict(trp.DecoupledConv2d(4, 6, 3, 2).config(), type="nd")
    assert type(FACTORIZED[old["type"]].from_config(old)) is trp.DecoupledConv2d


def test_nd_state_records_the_orders_and_an_old_nd_state_resumes_only_per_filter():
    pruner = trp.RankPruner(make_net(), "nd", energy=0.7, nuclear=1e-3, nuclear_every="step")
    pruner.step()
    state = pruner.state_dict()
    assert state["config"]["orders"] == {"2": "nd_depthwise", "4": "nd_depthwise", "6": "nd_pointwise"}
    again = trp.RankPruner(make_net(), "nd", energy=0.7, nuclear=1e-3, nuclear_every="step")
    again.load_state_dict(state)
    assert again.ranks == pruner.ranks
    # a state written when "nd" meant the per-filter order for every layer: no "orders"
    old = trp.RankPruner(make_net(), "nd_pointwise", energy=0.7, nuclear=1e-3, nuclear_every="step")
    old.step()
    old_state = old.state_dict()
    old_state["config"] = dict(old_state["config"], scheme="nd")
    with pytest.raises(ValueError, match="scheme='nd_pointwise'"):
        trp.RankPruner(make_net(), "nd", energy=0.7).load_state_dict(old_state)
    resumed = trp.RankPruner(make_net(), "nd_pointwise", energy=0.7, nuclear=1e-3, nuclear_every="step")
    resumed.load_state_dict(old_state)
    assert resumed.ranks == old.ranks
    state["config"] = dict(state["config"], orders={**state["config"]["orders"], "6": "nd_depthwise"})
    with pytest.raises(ValueError, match="orders differ"):
        again.load_state_dict(state)
