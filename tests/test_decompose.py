"""trp.decompose: exact on exactly low-rank weights, layer selection, keep-dense rule, bad input."""
import re
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import trp
from trp.core.schemes import from_matrix, matrix_shape
from trp.nn.modules import ChannelFactorizedConv2d, FactorizedLinear, SpatialFactorizedConv2d

FACTORIZED = {"channel": ChannelFactorizedConv2d, "spatial": SpatialFactorizedConv2d}


def low_rank_weight(shape, scheme, r, gen):
    p, q = matrix_shape(shape, scheme)
    M = torch.randn(p, r, generator=gen, dtype=torch.float64) @ torch.randn(r, q, generator=gen,
                                                                              dtype=torch.float64)
    return from_matrix(M, scheme, shape).contiguous()


@st.composite
def conv_configs(draw):
    c, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"] if stride == (1, 1)
                                    else ["int", "tuple", "valid"]))
    padding = {"int": draw(st.integers(0, 2)), "tuple": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
               "same": "same", "valid": "valid"}[pad_kind]
    bias = draw(st.booleans())
    scheme = draw(st.sampled_from(["channel", "spatial"]))
    h = dilation[0] * (kh - 1) + 1 + draw(st.integers(0, 4))
    w = dilation[1] * (kw - 1) + 1 + draw(st.integers(0, 4))
    p, q = matrix_shape((n, c, kh, kw), scheme)
    r = draw(st.integers(1, min(p, q)))
    return dict(c=c, n=n, k=(kh, kw), stride=stride, dilation=dilation, padding=padding, bias=bias,
                scheme=scheme, hw=(h, w), r=r, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None)
@given(conv_configs())
def test_decompose_conv_is_exact_on_low_rank_weights(cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    conv = nn.Conv2d(cfg["c"], cfg["n"], cfg["k"], cfg["stride"], cfg["padding"], cfg["dilation"],
                     bias=cfg["bias"], dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(low_rank_weight(conv.weight.shape, cfg["scheme"], cfg["r"], gen))
    model = nn.Sequential(conv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact = trp.decompose(model, cfg["scheme"], threshold=1e-8, layers=["0"])
    x = torch.randn(2, cfg["c"], *cfg["hw"], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-9, atol=1e-9)
    layer = compact[0]
    if isinstance(layer, FACTORIZED[cfg["scheme"]]):
        assert layer.rank == cfg["r"]  # the threshold rule finds the exact rank
    else:  # kept dense only where factorizing would not save multiply-adds
        assert layer is not conv and isinstance(layer, nn.Conv2d)
        assert FACTORIZED[cfg["scheme"]].from_conv(conv, rank=cfg["r"]).macs_per_output_pixel() >= \
            trp.decompose.__globals__["dense_macs_per_output_pixel"](conv)
    # the input model is untouched
    assert compact[0] is not model[0] and model[0] is conv
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.booleans(), st.integers(0, 2**16))
def test_decompose_linear_is_exact_on_low_rank_weights(fin, fout, r, bias, seed):
    r = min(r, fin, fout)
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(low_rank_weight((fout, fin), "channel", r, gen))
    model = nn.Sequential(lin)
    compact = trp.decompose(model, "channel", threshold=1e-8, layers=[nn.Linear])
    x = torch.randn(3, fin, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(compact(x), model(x), rtol=1e-9, atol=1e-9)
    if isinstance(compact[0], FactorizedLinear):
        assert compact[0].rank == r and r * (fin + fout) < fin * fout
    else:
        assert r * (fin + fout) >= fin * fout


@pytest.fixture
def one_thread():
    # MKL's multi-threaded SVD slows down up to 40x when other jobs hold the cores of a small CI machine
    # (its threads wait at barriers for descheduled peers); one thread keeps this test at a few seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_decompose_torchvision_resnet18_exact(scheme, one_thread):
    # The SVDs of the 512 x 512 x 3 x 3 layers take seconds each on a 2-core CPU: those three stay dense
    # here; every other conv (stride-2 convs, downsample paths, 64-512 channels) is decomposed.
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(1)
    exclude = r"layer4\.0\.conv2|layer4\.1\..*"
    selected = trp.select_layers(model, scheme, exclude=exclude)
    ranks = {}
    for name, conv in selected:
        p, q = matrix_shape(tuple(conv.weight.shape), scheme)
        ranks[name] = max(1, min(p, q) // 5)
        with torch.no_grad():
            conv.weight.copy_(low_rank_weight(conv.weight.shape, scheme, ranks[name], gen) * 0.05)
    compact = trp.decompose(model, scheme, threshold=1e-9, exclude=exclude)
    x = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-8, atol=1e-8)
    got = {n: m.rank for n, m in trp.factorized_layers(compact).items()}
    assert got == {n: r for n, r in ranks.items() if n in got}
    assert len(got) >= len(selected) - 3  # only layers that would not get cheaper stay dense
    assert trp.count_macs(compact, (3, 32, 32)) < trp.count_macs(model, (3, 32, 32))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))
        self.point = nn.Conv2d(8, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.up = nn.ConvTranspose2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.point(self.b(self.a(self.stem(x))))
        x = self.up(self.circular(self.depthwise(x)))
        return self.fc(x.mean((2, 3)))


def _names(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [n for n, _ in trp.select_layers(model, **kw)]


def test_default_selection_and_one_warning_for_unsupported():
    with pytest.warns(UserWarning) as record:
        selection = trp.plan_layers(Net(), "channel")
    assert selection.names == ["a", "b"]  # not the stem, not a tiny 1x1, not depthwise, not circular
    assert len(record) == 1  # only for the layer it cannot reproduce (depthwise is a rule, not a failure)
    assert "circular" in str(record[0].message) and "depthwise" not in str(record[0].message)
    assert set(selection.skipped) == {"stem", "point", "depthwise", "circular", "up", "fc"}
    assert "depthwise" in selection.skipped["depthwise"] and "stem" in selection.skipped["stem"]
    assert "padding_mode='circular'" in selection.skipped["circular"]


def test_selection_by_name_regex_type_and_exclude():
    net = Net()
    assert _names(net, layers=["point", "stem"]) == ["stem", "point"]  # as given, registration order
    assert _names(net, layers=r"[ab]") == ["a", "b"]
    assert _names(net, layers=re.compile("s.*")) == ["stem"]
    assert _names(net, layers=[nn.Linear]) == ["fc"]
    assert _names(net, exclude=["a"]) == ["b"]
    assert _names(net, layers=nn.Conv2d, exclude=[r"d.*", "circular"]) == ["stem", "a", "b", "point"]
    with pytest.raises(ValueError, match="up .ConvTranspose2d"):  # named: refused, not skipped
        trp.select_layers(net, layers=["up", "a"])
    with pytest.raises(ValueError, match="circular"):  # a type spec that takes an ineligible layer too
        trp.select_layers(net, layers=nn.Conv2d)


def test_selection_errors():
    net = Net()
    with pytest.raises(ValueError, match="nope"):
        trp.select_layers(net, layers=["nope"])
    with pytest.raises(ValueError, match="matches no"):
        trp.select_layers(net, exclude=["nope"])
    with pytest.raises(ValueError, match="channel"):
        trp.select_layers(net, "spatial", layers=["fc"])
    with pytest.raises(ValueError, match="valid choices"):
        trp.select_layers(net, "diagonal")
    with pytest.raises(ValueError):
        trp.select_layers(net, layers=[3])


@pytest.mark.filterwarnings("ignore:TRP skips layers")
def test_decompose_bad_criteria():
    net = Net()
    with pytest.raises(ValueError, match="exactly one"):
        trp.decompose(net, "channel")
    with pytest.raises(ValueError, match="exactly one"):
        trp.decompose(net, "channel", energy=0.9, threshold=0.1)
    for energy in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            trp.decompose(net, "channel", energy=energy)
    with pytest.raises(ValueError, match="threshold"):
        trp.decompose(net, "channel", threshold=-1.0)
    with pytest.raises(ValueError, match="'channel', 'spatial'"):
        trp.decompose(net, "svd", energy=0.9)
    with pytest.raises(ValueError, match="circular.*padding_mode"):  # rank= names a layer it cannot factorize
        trp.decompose(net, "channel", rank={"circular": 2})
    with pytest.raises(ValueError, match=r"not selected.*\['a'\]"):
        trp.decompose(net, "channel", rank={"a": 2}, exclude=["a"])
    for bad in ("x", None, Net):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            trp.decompose(bad, "channel", energy=0.9)


def test_decompose_keeps_full_rank_layers_dense_and_copies():
    net = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compact = trp.decompose(net, "channel", energy=1.0)  # full rank: no saving possible
        low = trp.decompose(net, "channel", rank={"a": 2})
    assert isinstance(compact.a, nn.Conv2d) and compact.a is not net.a
    assert torch.equal(compact.a.weight, net.a.weight)
    assert isinstance(low.a, ChannelFactorizedConv2d) and low.a.rank == 2
    assert isinstance(low.b, nn.Conv2d)  # not in the rank map: stays dense
    assert isinstance(net.a, nn.Conv2d)


def test_decompose_preserves_training_mode_and_arch():
    model = trp.models.build("resnet20")
    compact = trp.decompose(model, "spatial", energy=0.5, layers=r"layer1\..*")
    assert compact.trp_arch == model.trp_arch
    assert all(m.training for m in compact.modules())
