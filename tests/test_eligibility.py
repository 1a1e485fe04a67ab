"""Which layers TRP may touch (trp.eligibility, trp.adapters, trp.selection): nn.Conv2d subclasses with their
own forward, adapters (transformers' Conv1D, timm's Conv2dSame, a user's), parametrized weights, grouped
convs, the default selection by structure, rank= implying layers, and that nothing is skipped silently."""
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

import trp
from trp.core.schemes import from_matrix, to_matrix
from trp.deploy import export
from trp.nn.modules import (
    ChannelFactorizedConv2d,
    DecoupledConv2d,
    DepthwiseDecoupledConv2d,
    FactorizedLinear,
    SpatialFactorizedConv2d,
)

CLASSES = {"channel": ChannelFactorizedConv2d, "spatial": SpatialFactorizedConv2d, "nd_pointwise": DecoupledConv2d,
           "nd_depthwise": DepthwiseDecoupledConv2d}


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def energy_rank(M, energy):
    s2 = torch.linalg.svdvals(M.to(torch.float64)).square()
    return int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1


def matrix_rank(W, scheme="channel", groups=1):
    return int(torch.linalg.matrix_rank(to_matrix(W.detach().to(torch.float64), scheme, groups),
                                        rtol=1e-9).max())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class StandardizedConv(nn.Conv2d):
    """An nn.Conv2d subclass with its own forward (weight standardization, as timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _prune_then_decompose(model, x, scheme="channel", energy=0.5, **kw):
    """One projection, then decompose at the pruner's ranks: (pruner, projected output, compact output)."""
    pruner = trp.RankPruner(model, scheme, energy=energy, nuclear=0, **kw)
    pruner.step()
    model.eval()
    with torch.no_grad():
        y = model(x)
        compact = trp.decompose(model, scheme, rank=pruner.ranks).eval()
        return pruner, y, compact(x), compact


# --- wrong-result subclasses ------------------------------------------------------------------------------

def test_conv_subclass_with_its_own_forward_is_skipped_with_one_warning_and_refused_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), StandardizedConv(16, 32, 3, padding=1),
                          nn.Conv2d(32, 32, 3, padding=1)).double()
    with pytest.warns(UserWarning, match=r"skips layers it cannot reproduce exactly: 1 \(StandardizedConv "
                                         r"overrides forward of Conv2d") as record:
        selection = trp.plan_layers(model)
    assert len(record) == 1 and selection.names == ["2"]
    assert selection.skipped["1"].startswith("not eligible: StandardizedConv overrides forward")
    for bad in ({"layers": ["1"]}, {"layers": nn.Conv2d}):
        with pytest.raises(ValueError, match="cannot reproduce exactly: 1 .StandardizedConv overrides forward"):
            trp.RankPruner(model, **bad)
    with pytest.raises(ValueError, match="StandardizedConv overrides forward"):
        trp.decompose(model, "channel", rank={"1": 4})
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    pruner, y, z, compact = quiet(_prune_then_decompose, model, x)
    assert pruner.layer_names == ["2"] and isinstance(compact[1], StandardizedConv)
    assert rel(z, y) < 1e-10


def test_timm_std_conv_from_the_issue_is_never_replaced_by_a_plain_conv():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for cls in (timm.layers.StdConv2d, timm.layers.ScaledStdConv2d):
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), cls(16, 32, 3, padding=1),
                              nn.Conv2d(32, 32, 3, padding=1)).eval()
        x = torch.randn(1, 3, 9, 9)
        with pytest.warns(UserWarning, match=f"1 .{cls.__name__} overrides forward"):
            pruner, y, z, compact = _prune_then_decompose(model, x)
        assert pruner.layer_names == ["2"] and type(compact[1]) is cls
        assert rel(z, y) < 1e-5
        # the issue's model: its only kxk conv after the stem is a StdConv2d: nothing to prune, said so
        with pytest.raises(ValueError, match=f"no layer selected.*{cls.__name__} overrides forward"):
            quiet(trp.RankPruner, model[:2])


# --- parametrized weights ---------------------------------------------------------------------------------

PARAMETRIZATIONS = {"weight_norm": (parametrizations.weight_norm, "original1"),
                    "spectral_norm": (parametrizations.spectral_norm, "original")}


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("name", sorted(PARAMETRIZATIONS))
def test_parametrized_weight_is_projected_through_its_original(name, kind):
    torch.manual_seed(0)
    apply, original = PARAMETRIZATIONS[name]
    if kind == "conv":
        layer = nn.Conv2d(16, 32, 3, padding=1)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), apply(layer)).double()
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    else:
        layer = nn.Linear(24, 32)
        model = nn.Sequential(nn.Linear(12, 24), apply(layer)).double()
        x = torch.randn(5, 12, dtype=torch.float64)
    model.train()  # spectral_norm's power iteration runs in training mode: reading the weight must not
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    pruner = trp.RankPruner(model, energy=0.5, nuclear=0, layers=["1"])
    pruner.step()
    param = getattr(layer.parametrizations.weight, original)
    assert pruner.targets[0].param is param
    # what the layer computes with has the reported rank (the weight was not written, it is recomputed)
    effective = trp.eligibility.effective_weight(layer)
    assert pruner.ranks["1"] < 16 and matrix_rank(effective) == pruner.ranks["1"] == matrix_rank(param)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    model.eval()
    with torch.no_grad():
        y = model(x)
        compact = trp.decompose(model, "channel", rank=pruner.ranks).eval()
        assert rel(compact(x), y) < 1e-10
    assert not parametrize.is_parametrized(compact[1]) and compact[1].rank == pruner.ranks["1"]
    # the nuclear-norm subgradient goes to the projected original
    pruner = trp.RankPruner(model, energy=0.5, nuclear=0.1, layers=["1"])
    model.zero_grad(set_to_none=True)
    pruner.step()
    pruner.regularize()
    assert param.grad is not None and param.grad.abs().sum() > 0


def test_parametrized_layers_are_in_the_default_selection():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), parametrizations.weight_norm(nn.Conv2d(16, 16, 3)),
                          parametrizations.spectral_norm(nn.Conv2d(16, 16, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [n for n, _ in trp.select_layers(model)] == ["1", "2"]


def test_unregistered_parametrizations_and_hook_based_norms_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    parametrizations.orthogonal(model[1])
    with pytest.raises(ValueError, match="1 .Linear weight parametrized by _Orthogonal"):
        trp.RankPruner(model, layers=["1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        torch.nn.utils.weight_norm(model[2])
    with pytest.raises(ValueError, match="2 .Linear has forward hooks .WeightNorm"):
        trp.RankPruner(model, layers=["2"])


class Doubled(nn.Module):
    """W = 2 X: a parametrization whose weight has the rank of its input."""

    def forward(self, X):
        return 2 * X


def test_register_weight_parametrization():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)).double()
    parametrize.register_parametrization(model[1], "weight", Doubled())
    with pytest.raises(ValueError, match="parametrized by Doubled"):
        trp.RankPruner(model, layers=["1"])
    trp.register_weight_parametrization(Doubled)
    try:
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        pruner, y, z, _ = _prune_then_decompose(model, x)
        assert pruner.layer_names == ["1"] and rel(z, y) < 1e-10
        assert pruner.targets[0].param is model[1].parametrizations.weight.original
    finally:
        trp.eligibility._PARAMETRIZATIONS.pop(Doubled)
    for bad in ({"parametrization_type": 3}, {"parametrization_type": Doubled, "original": "orig"}):
        with pytest.raises(ValueError):
            trp.register_weight_parametrization(**bad)


# --- adapters ---------------------------------------------------------------------------------------------

def test_transformers_conv1d_is_a_transposed_linear():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(48, 16), nn.GELU(), pytorch_utils.Conv1D(16, 48)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    pruner, y, z, compact = _prune_then_decompose(model, x, layers=["0", "2"])
    assert pruner.targets[0].shape == (48, 16)  # nn.Linear's [out, in]: the stored weight is [16, 48]
    for name in ("0", "2"):
        assert matrix_rank(model.get_submodule(name).weight) == pruner.ranks[name] < 16
        assert isinstance(compact.get_submodule(name), FactorizedLinear)
    assert rel(z, y) < 1e-10
    assert trp.count_macs(model, x, linear=True) == 2 * 10 * 16 * 48  # counted as Linear layers
    with pytest.raises(ValueError, match="only has the 'channel' scheme"):
        trp.select_layers(model, "spatial", layers=["0"])


def test_timm_conv2d_same_padding_made_explicit_where_it_does_not_depend_on_the_input():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    same = timm.layers.Conv2dSame
    model = nn.Sequential(nn.Conv2d(3, 16, 3), same(16, 24, 4, dilation=1),  # even kernel: asymmetric
                          same(24, 24, (3, 1), stride=(1, 2)),  # stride 2 along a 1-wide kernel: no padding
                          same(24, 24, 3, stride=2)).double()  # depends on the input size
    selection = quiet(trp.plan_layers, model)
    assert selection.names == ["1", "2"]
    assert "depends on the input size" in selection.skipped["3"]
    for size in ((9, 9), (10, 13)):
        x = torch.randn(1, 3, *size, dtype=torch.float64)
        pruner, y, z, compact = quiet(_prune_then_decompose, model, x, energy=0.6)
        assert isinstance(compact[1], ChannelFactorizedConv2d) and rel(z, y) < 1e-10
    with pytest.raises(ValueError, match="3 .Conv2dSame: dynamic 'same' padding at stride .2, 2."):
        trp.RankPruner(model, layers=["3"])


class MyDense(nn.Module):
    """A user's layer computing F.linear with its own parameter names."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.shift = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return F.linear(x, self.weight, self.shift)


class MyDenseAdapter(trp.LayerAdapter):
    kind = "linear"

    def dense(self, module, weight):
        layer = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(module.shift)
        return layer


def test_register_layer_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(MyDense(16, 32), nn.ReLU(), MyDense(32, 16)).double()
    with pytest.raises(ValueError, match="matches no convolution or linear module"):
        trp.select_layers(model, layers=["0"])
    trp.register_layer_adapter(MyDense, MyDenseAdapter())
    try:
        x = torch.randn(3, 16, dtype=torch.float64)
        pruner, y, z, compact = _prune_then_decompose(model, x, layers=["0", "2"])
        assert isinstance(compact[0], FactorizedLinear) and rel(z, y) < 1e-10
    finally:
        trp.register_layer_adapter(MyDense, None)
    for bad in ((3, MyDenseAdapter()), (MyDense, object()), ("not a path", MyDenseAdapter()), (nn.Linear, None)):
        with pytest.raises(ValueError):
            trp.register_layer_adapter(*bad)


# --- grouped convs ----------------------------------------------------------------------------------------

GEOMETRIES = [  # in, out, kernel, stride, padding, dilation, groups, bias
    (6, 9, 3, 2, 1, 1, 3, True),
    (8, 12, (3, 2), (2, 1), (1, 0), (2, 1), 4, False),
    (4, 6, 4, 1, "same", 2, 2, True),
    (10, 5, 5, 2, 2, 1, 5, True),  # two input channels, one filter per group
]


@pytest.mark.parametrize("scheme", sorted(CLASSES))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_grouped_conv_decomposition_is_exact(scheme, geometry):
    torch.manual_seed(0)
    cin, cout, k, stride, padding, dilation, groups, bias = geometry
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias).double()
    shape = to_matrix(conv.weight, scheme, groups).shape
    lead, (p, q) = shape[:-2], shape[-2:]
    r = min(1 if scheme.startswith("nd") else 2, p, q)  # each group's matrices of rank r
    low = torch.randn(*lead, p, r, dtype=torch.float64) @ torch.randn(*lead, r, q, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(from_matrix(low, scheme, conv.weight.shape, groups))
    x = torch.randn(2, cin, 11, 12, dtype=torch.float64)
    layer = CLASSES[scheme].from_conv(conv, threshold=1e-8)
    assert layer.rank == r and layer.groups == groups
    assert rel(layer(x), conv(x)) < 1e-12
    torch.testing.assert_close(layer.dense_weight(), conv.weight)
    again = CLASSES[scheme].from_config(layer.config(), dtype=torch.float64)
    again.load_state_dict(layer.state_dict())
    assert rel(again(x), conv(x)) < 1e-12
    full = CLASSES[scheme].from_conv(conv, energy=1.0)  # full rank of a random-weight grouped conv: exact too
    assert rel(full(x[0]), conv(x[0])) < 1e-12  # unbatched input, as nn.Conv2d takes it
    # multiply-adds: the formula agrees with torch's flop counter of the two grouped convs
    assert trp.count_flops(layer, (cin, 11, 12)) == 2 * trp.count_macs(layer, (cin, 11, 12))


@pytest.mark.parametrize("scheme", sorted(CLASSES))
def test_pruner_projects_every_group_of_a_grouped_conv(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, groups=4), nn.Conv2d(32, 32, 3, groups=4),
                          nn.Conv2d(32, 32, 3, groups=32)).double()
    before = model[1].weight.detach().clone()
    pruner = trp.RankPruner(model, scheme, energy=0.6, nuclear=0.1)
    assert pruner.layer_names == ["1", "2"] and "depthwise" in pruner.skipped["3"]
    pruner.step()
    mats = to_matrix(before, scheme, 4)
    expected = [energy_rank(m, 0.6) for m in mats.reshape(-1, *mats.shape[-2:])]
    assert pruner.filter_ranks["1"] == expected and pruner.ranks["1"] == max(expected)
    after = to_matrix(model[1].weight.detach(), scheme, 4)
    for m, k in zip(after.reshape(-1, *after.shape[-2:]), expected):
        assert matrix_rank(m.unsqueeze(0).unsqueeze(0).reshape(1, *m.shape)) == k
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    assert model[1].weight.grad.abs().sum() > 0
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        compact = trp.decompose(model, scheme, rank=pruner.ranks)
        assert rel(compact(x), y) < 1e-10


def test_grouped_factorized_convs_save_load_and_export_as_standard_convs(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(32, 32, (3, 2), padding=(1, 0), groups=2)).eval()
    compact = trp.decompose(model, "channel", rank=2).eval()
    assert [m.groups for m in trp.factorized_layers(compact).values()] == [4, 2]
    trp.save(compact, tmp_path / "g.pt")
    loaded = trp.load(tmp_path / "g.pt", base=model).eval()
    x = torch.randn(2, 3, 13, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    data = export.onnx_bytes(compact, (2, 3, 13, 11), exporter="torchscript")
    assert export.verify(compact, data, (2, 3, 13, 11), (2,), rtol=1e-4)
    ops = {(n.domain, n.op_type) for n in onnx.load_from_string(data).graph.node}
    assert ("", "Conv") in ops and all(d in ("", "ai.onnx") for d, _ in ops)
    assert ort is not None


# --- default selection by structure, presets, messages ------------------------------------------------

class Block(nn.Module):
    """An attention block written by hand (no nn.MultiheadAttention): q/k/v/out and a two-layer MLP."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1) @ self.v(h)
        x = x + self.out(a)
        return x + self.fc2(F.gelu(self.fc1(x)))


class HandTransformer(nn.Module):
    def __init__(self, depth=2, d=32):
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.pool = nn.Linear(d, d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(torch.tanh(self.pool(x[:, 0])))


def test_default_selection_finds_the_linear_layers_of_repeated_blocks_by_structure():
    torch.manual_seed(0)
    model = HandTransformer().double()
    selection = trp.plan_layers(model)
    assert selection.names == [f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "out", "fc1", "fc2")]
    assert "classifier head" in selection.skipped["head"]
    assert "outside the repeated blocks" in selection.skipped["embed"] == selection.skipped["pool"]
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    pruner, y, z, compact = _prune_then_decompose(model, x)
    assert len(trp.factorized_layers(compact)) == 12 and rel(z, y) < 1e-10
    # tied weights are never in the default selection
    model.blocks[1].fc1.weight = model.blocks[0].fc1.weight
    skipped = trp.plan_layers(model).skipped
    assert "tied weight (shared as blocks.0.fc1.weight, blocks.1.fc1.weight)" in skipped["blocks.0.fc1"]
    assert "blocks.1.fc1" in skipped
    # only the channel scheme has Linear matrices
    assert "only the channel scheme" in trp.plan_layers(model, "spatial").skipped["blocks.0.q"]


def test_presets_and_the_paper_models_default():
    tv = pytest.importorskip("torchvision")
    resnet = tv.models.resnet18()
    default, paper = trp.plan_layers(resnet), trp.plan_layers(resnet, layers="paper")
    downsample = ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    assert default.names == sorted(paper.names + downsample, key=default.names.index)
    assert "1x1 conv (the 'paper' preset" in paper.skipped["layer2.0.downsample.0"]
    assert trp.plan_layers(resnet, layers=["paper", "fc"]).names == paper.names + ["fc"]
    cifar = trp.models.build("resnet20")  # the paper's models keep the paper's rule by default
    assert trp.plan_layers(cifar).names == trp.plan_layers(cifar, layers="paper").names
    assert "layer2.0.shortcut.0" in trp.plan_layers(cifar, layers="default").names
    nd = trp.plan_layers(resnet, "nd")
    assert "1x1 conv under nd" in nd.skipped["layer2.0.downsample.0"]


def test_no_layer_selected_says_why_per_kind_of_layer():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 8, 1),
                          nn.LazyConv2d(8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ValueError) as info, pytest.warns(UserWarning, match="3 .LazyConv2d is uninitialized"):
        trp.RankPruner(model)
    text = str(info.value)
    for phrase in ("no layer selected for scheme 'channel'", "1 x stem", "1 x depthwise conv", "1 x tiny 1x1 conv",
                   "LazyConv2d is uninitialized (a lazy module)", "1 x classifier head", "Pass layers=", "paper"):
        assert phrase in text, (phrase, text)


def test_decompose_warns_when_it_factorizes_nothing_and_the_report_counts_every_skip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 3, padding=1)).eval()
    with pytest.warns(UserWarning, match="factorized no layer.*no saving at rank 16"):
        same = trp.decompose(model, "channel", energy=1.0)  # full rank: nothing pays
    assert not trp.factorized_layers(same)
    compact = trp.decompose(model, "channel", rank={"1": 2})
    rep = trp.report(model, compact, (3, 8, 8), latency=False)
    assert set(rep.skipped) == {"0", "2", "3"} and rep.totals["layers_skipped"] == 3
    assert rep.skipped["3"] == "not in the rank= map" and "stem" in rep.skipped["0"]
    assert "depthwise" in rep.skipped["2"] and "left dense: 3 layers" in str(rep)
    assert rep.to_dict()["skipped"] == rep.skipped


def test_rank_map_implies_the_layers_it_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3))
    compact = trp.decompose(model, "channel", rank={"0": 2, "1": 3})  # the stem and a tiny 1x1: named
    assert {n: m.rank for n, m in trp.factorized_layers(compact).items()} == {"0": 2, "1": 3}
    compact = trp.decompose(model, "channel", rank={"0": 2}, layers=["2"], energy=None)
    assert set(trp.factorized_layers(compact)) == {"0"}  # "2" is selected but has no rank: dense
    assert compact.trp_skipped["2"] == "no rank in the rank= map"  # selected by layers=, but no rank
    with pytest.raises(ValueError, match=re.escape("layers='nope' matches no")):
        trp.decompose(model, "channel", rank={"nope": 2})
