"""Factorized modules: construction from dense layers, reprs, config round trip, gradients, autocast."""
import time

import pytest
import torch
import torch.nn as nn

import trp
from trp.core import spectral
from trp.nn import modules
from trp.nn.modules import ChannelFactorizedConv2d, FactorizedLinear, SpatialFactorizedConv2d, conv_padding4

CLASSES = [ChannelFactorizedConv2d, SpatialFactorizedConv2d]


def test_reprs_are_readable():
    ch = ChannelFactorizedConv2d(16, 32, 3, rank=5, stride=2, padding=1)
    assert repr(ch) == ("ChannelFactorizedConv2d(16, 32, kernel_size=(3, 3), rank=5, stride=(2, 2), "
                        "padding=(1, 1), dilation=(1, 1), bias=True)")
    sp = SpatialFactorizedConv2d(8, 4, (3, 5), rank=2, padding=(1, 2), bias=False)
    assert "SpatialFactorizedConv2d(8, 4, kernel_size=(3, 5), rank=2" in repr(sp)
    assert sp.v_weight.shape == (2, 8, 3, 1) and sp.h_weight.shape == (4, 2, 1, 5)
    assert ch.c_weight.shape == (5, 16, 3, 3) and ch.p_weight.shape == (32, 5, 1, 1)
    fl = FactorizedLinear(10, 6, rank=3)
    assert "FactorizedLinear(\n  in_features=10, out_features=6, rank=3" in repr(fl)


def test_same_padding_of_even_kernels_is_asymmetric_like_pytorch():
    conv = nn.Conv2d(2, 2, (4, 2), padding="same", dilation=(1, 3))
    assert conv_padding4(conv) == (1, 2, 1, 2)
    assert conv_padding4(nn.Conv2d(2, 2, 3, padding="valid")) == (0, 0, 0, 0)
    assert conv_padding4(nn.Conv2d(2, 2, 3, padding=(2, 1))) == (2, 2, 1, 1)


@pytest.mark.parametrize("cls", CLASSES)
def test_from_conv_full_rank_is_exact_and_dense_weight_matches(cls):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (2, 3), stride=(1, 2), padding="valid", dilation=(2, 1), dtype=torch.float64)
    full = min(trp.schemes.matrix_shape(tuple(conv.weight.shape), cls.scheme))
    layer = cls.from_conv(conv, energy=1.0)
    assert layer.rank == full
    torch.testing.assert_close(layer.dense_weight(), conv.weight, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)
    assert all(f.dtype == torch.float64 for f in layer.factors())


@pytest.mark.parametrize("cls", CLASSES)
def test_factors_are_balanced(cls):
    # A = U S^1/2, B = S^1/2 V^T: both factors carry the same Frobenius norm (sum of singular values)
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(100.0)
    layer = cls.from_conv(conv, rank=3)
    first, second = layer.factors()
    assert first.norm().item() == pytest.approx(second.norm().item(), rel=1e-4)


@pytest.mark.parametrize("cls", CLASSES)
def test_config_round_trip_and_gradients(cls):
    layer = cls(4, 6, (3, 2), rank=2, stride=(2, 1), padding=(1, 0, 1, 1), dilation=(1, 2))
    clone = cls.from_config(layer.config())
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 8, 9, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, clone(x))
    out.square().sum().backward()
    first, second = layer.factors()
    assert x.grad is not None and first.grad is not None and second.grad is not None
    assert layer.bias.grad is not None
    with torch.no_grad():  # the same gradients as the two plain convolutions
        dense = nn.Conv2d(4, 6, (3, 2), (2, 1), 0, (1, 2))
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    ref = dense(nn.functional.pad(x.detach(), (1, 1, 1, 0)))
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


def test_from_linear_and_rank_rules():
    torch.manual_seed(2)
    lin = nn.Linear(12, 8, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 2, dtype=torch.float64) @ torch.randn(2, 12, dtype=torch.float64))
    fl = FactorizedLinear.from_linear(lin, threshold=1e-9)
    assert fl.rank == 2 and fl.bias is fl.second.bias
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(fl(x), lin(x), rtol=1e-10, atol=1e-10)
    assert FactorizedLinear.from_config(fl.config()).first.weight.shape == (2, 12)
    with pytest.raises(ValueError, match="nn.Linear"):
        FactorizedLinear.from_linear(nn.Conv2d(2, 2, 1), rank=1)


def test_from_conv_rejects_unsupported_convs_and_bad_rank():
    for conv, why in ((nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
                      (nn.ConvTranspose2d(4, 4, 3), "ConvTranspose2d"), (nn.Linear(4, 4), "Linear")):
        with pytest.raises(ValueError, match=f"needs an eligible conv.*{why}"):
            ChannelFactorizedConv2d.from_conv(conv, rank=1)
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank must be an int >= 1"):
            SpatialFactorizedConv2d(2, 2, 3, rank=rank)
    with pytest.raises(ValueError, match="padding"):
        ChannelFactorizedConv2d(2, 2, 3, rank=1, padding=(1, 2, 3))


@pytest.mark.parametrize("cls", CLASSES)
def test_forward_under_cpu_autocast(cls):
    layer = cls(4, 6, 3, rank=2, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


def _trp_like(p, q, rank, noise, seed=0):
    """A weight as TRP leaves it: low rank plus a small full-rank update."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(p, rank, generator=gen) @ torch.randn(rank, q, generator=gen)) / rank ** 0.5 \
        + noise * torch.randn(p, q, generator=gen)


def _truncated_svd(W, r):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r], S


@pytest.mark.parametrize("shape", [(520, 900), (900, 520)])
@pytest.mark.parametrize("weights, criterion", [("trp_like", {"energy": 0.9}), ("trp_like", {"rank": 40}),
                                                ("trp_like", {"threshold": 1.0}), ("flat", {"energy": 0.5})])
def test_large_matrices_reproduce_the_truncated_svd(shape, weights, criterion, monkeypatch):
    """Short side >= trp.spectral.LARGE_N: the certified randomized route (TRP-like spectra, energy and rank
    criteria) or the Gram matrix's eigh (flat spectra, thresholds) give the truncated SVD's rank and product."""
    p, q = shape
    routes = []
    full = spectral._full
    monkeypatch.setattr(spectral, "_full", lambda *args: routes.append("full") or full(*args))
    gen = torch.Generator().manual_seed(0)
    W = _trp_like(p, q, 60, 1e-3) if weights == "trp_like" else torch.randn(p, q, generator=gen) / 30
    A, B, r, _ = modules._svd_factors(W, *trp.rank.check_criterion(**criterion))
    certifiable = weights == "trp_like" and "threshold" not in criterion
    assert routes == ([] if certifiable else ["full"])
    _, S = _truncated_svd(W, 1)
    assert r == int(trp.rank.select_rank(S, *trp.rank.check_criterion(**criterion)))
    ref, _ = _truncated_svd(W, r)
    assert float((A @ B - ref).norm() / ref.norm()) <= 1e-6
    assert A.shape == (p, r) and B.shape == (r, q)
    assert float(A.norm(dim=0).sub(B.norm(dim=1)).abs().max()) <= 1e-6 * float(A.norm())  # balanced S^1/2
    if "energy" in criterion:  # the module built from them (the other criteria build it the same way)
        linear = nn.Linear(q, p)
        with torch.no_grad():
            linear.weight.copy_(W)
        fact = trp.FactorizedLinear.from_linear(linear, **criterion)
        x = torch.randn(3, q)
        with torch.no_grad():
            torch.testing.assert_close(fact(x), nn.functional.linear(x, ref.float(), linear.bias), rtol=1e-4,
                                       atol=1e-4)


def test_large_conv_reproduces_the_truncated_svd():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 600, 3, padding=1, stride=2)  # channel matrix 600 x 576
    with torch.no_grad():
        conv.weight.copy_(_trp_like(600, 576, 30, 1e-3).reshape(conv.weight.shape))
    fact = trp.ChannelFactorizedConv2d.from_conv(conv, energy=0.95)
    ref, _ = _truncated_svd(conv.weight.reshape(600, -1), fact.rank)
    torch.testing.assert_close(fact.dense_weight(), ref.float().reshape(conv.weight.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vgg_sized_linear_decomposes_in_seconds():
    """VGG-11's first classifier layer (25088 -> 4096) after TRP: seconds, not minutes (a float64 SVD of it
    took about 5 minutes on the 2-core build machine). A generous bound, against minutes, on the CPU time
    (2 cores: 20 s of wall time) so that a machine shared with other work does not fail it."""
    linear = nn.Linear(25088, 4096)
    with torch.no_grad():
        linear.weight.copy_(_trp_like(4096, 25088, 96, 1e-3))
    start = time.process_time()
    fact = trp.FactorizedLinear.from_linear(linear, energy=0.9)
    assert time.process_time() - start < 40
    with torch.no_grad():
        W_low = fact.second.weight.double() @ fact.first.weight.double()
        kept = float(W_low.square().sum() / linear.weight.double().square().sum())
    assert 1 <= fact.rank <= 96 and 0.9 <= kept <= 0.95  # the energy rule's rank: just enough energy
