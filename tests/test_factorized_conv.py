"""Fused factorized convolutions: Triton kernels (interpreter on CPU) against the two-conv reference,
autograd, opcheck, torch.compile, input validation and TRP_CONV_BACKEND dispatch.

Tolerance (float32): max|y - ref| <= 1e-5 * max|ref|. The kernels accumulate in fp32 with IEEE dot
products (no TF32), so they differ from the two convolutions only in summation order; 1e-5 leaves room
for that at these reduction lengths (<= 8 * 3 * 3 terms per GEMM) and would catch any indexing error.
GPU tests (marker cuda) bound float16/bfloat16 error relative to PyTorch's own error in that precision."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import trp_kernels
from trp_kernels import conv, reference

HAS_CUDA = torch.cuda.is_available()
RTOL = 1e-5


def rel_err(y, ref):
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make(kind, nb, c, h, w, r, n, kh, kw, bias, dtype=torch.float32, device="cpu"):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(nb, c, h, w, **g)
    if kind == "channel":
        w1, w2 = torch.randn(r, c, kh, kw, **g), torch.randn(n, r, 1, 1, **g)
    else:
        w1, w2 = torch.randn(r, c, kh, 1, **g), torch.randn(n, r, 1, kw, **g)
    b = torch.randn(n, **g) if bias else None
    return x, w1, w2, b


def ref_fn(kind):
    return getattr(reference, f"factorized_conv_{kind}")


def public_fn(kind):
    return getattr(trp_kernels, f"factorized_conv_{kind}")


@pytest.fixture
def backend(monkeypatch):
    def set_backend(value):
        monkeypatch.setenv(conv.BACKEND_ENV, value)
    return set_backend


def triton_mod():
    return pytest.importorskip("trp_kernels.triton")


# ---- Triton vs reference (interpreter on CPU): every stride x padding x dilation x bias combination
PADDINGS = {"p0": (0, 0, 0, 0), "p1": (1, 1, 1, 1), "asym": (0, 2, 1, 0)}
GRID = list(itertools.product(["channel", "spatial"], [1, 2], PADDINGS, [1, 2], [True, False]))


@pytest.mark.triton
@pytest.mark.parametrize("kind,stride,pad,dil,bias", GRID)
def test_triton_matches_reference(kind, stride, pad, dil, bias):
    tri = triton_mod()
    i = GRID.index((kind, stride, pad, dil, bias))
    # vary the sizes deterministically over the grid: batch 1-2, channels 3-8, rank 1-5, spatial 5-9
    nb, c, r, n = 1 + i % 2, 3 + i % 6, 1 + i % 5, 3 + (i * 5) % 6
    h, w = 5 + i % 5, 9 - i % 4
    x, w1, w2, b = make(kind, nb, c, h, w, r, n, 3, 3, bias)
    padding = list(PADDINGS[pad])
    args = (b, [stride, stride], padding, [dil, dil])
    y = getattr(tri, f"factorized_conv_{kind}")(x, w1, w2, *args)
    ref = ref_fn(kind)(x, w1, w2, *args)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= RTOL


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("kh,kw,stride,dil", [(1, 3, (2, 1), (1, 2)), (5, 2, (1, 2), (2, 1))])
def test_triton_rectangular_kernels_and_mixed_strides(kind, kh, kw, stride, dil):
    tri = triton_mod()
    x, w1, w2, b = make(kind, 2, 5, 9, 8, 4, 6, kh, kw, True)
    args = (b, list(stride), [1, 0, 2, 1], list(dil))
    y = getattr(tri, f"factorized_conv_{kind}")(x, w1, w2, *args)
    ref = ref_fn(kind)(x, w1, w2, *args)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= RTOL


@pytest.mark.triton
@pytest.mark.parametrize("stride,dil,pad", [(1, 1, (1, 1, 1, 1)), (2, 1, (1, 0, 2, 0)), (1, 2, (0, 1, 0, 2)),
                                            (2, 2, (2, 2, 2, 2))])
def test_triton_spatial_column_tiles(stride, dil, pad):
    """Rows split into column tiles whose intermediate carries a horizontal halo (wide images on the
    GPU); forced here on a small image with an 8-column span."""
    tri = triton_mod()
    x, w1, w2, b = make("spatial", 2, 4, 6, 9, 3, 5, 3, 3, True)
    args = (b, [stride, stride], list(pad), [dil, dil])
    y = tri.factorized_conv_spatial(x, w1, w2, *args, max_single_span=4, multi_span=8)
    ref = reference.factorized_conv_spatial(x, w1, w2, *args)
    assert rel_err(y, ref) <= RTOL
    span, out_w, valid, single = tri.spatial.tile_plan(9, y.shape[3], 3, stride, dil, 4, 8)
    assert not single and valid < y.shape[3]  # really more than one column tile


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_triton_channels_last(kind):
    tri = triton_mod()
    x, w1, w2, b = make(kind, 2, 6, 7, 9, 5, 4, 3, 3, True)
    xl = x.to(memory_format=torch.channels_last)
    args = (b, [1, 2], [1, 1, 0, 2], [2, 1])
    y = getattr(tri, f"factorized_conv_{kind}")(xl, w1, w2, *args)
    ref = ref_fn(kind)(x, w1, w2, *args)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, ref) <= RTOL
    # a non-contiguous view (every other column) is read through its strides, no copy
    xs = torch.randn(2, 6, 7, 18)[..., ::2]
    y = getattr(tri, f"factorized_conv_{kind}")(xs, w1, w2, *args)
    assert rel_err(y, ref_fn(kind)(xs.contiguous(), w1, w2, *args)) <= RTOL


@pytest.mark.triton
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["channel", "spatial"]), nb=st.integers(1, 2), c=st.integers(3, 8),
       r=st.integers(1, 5), n=st.integers(1, 7), h=st.integers(5, 9), w=st.integers(5, 9),
       k=st.sampled_from([1, 2, 3]), s=st.integers(1, 2), d=st.integers(1, 2),
       pad=st.tuples(*[st.integers(0, 2)] * 4), bias=st.booleans())
def test_triton_random_shapes(kind, nb, c, r, n, h, w, k, s, d, pad, bias):
    tri = triton_mod()
    assume(min(h + pad[0] + pad[1], w + pad[2] + pad[3]) >= d * (k - 1) + 1)  # at least one output pixel
    x, w1, w2, b = make(kind, nb, c, h, w, r, n, k, k, bias)
    args = (b, [s, s], list(pad), [d, d])
    y = getattr(tri, f"factorized_conv_{kind}")(x, w1, w2, *args)
    ref = ref_fn(kind)(x, w1, w2, *args)
    assert y.shape == ref.shape and rel_err(y, ref) <= RTOL


# ---- autograd
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(kind, bias, backend):
    backend("torch")
    x, w1, w2, b = make(kind, 1, 3, 5, 5, 2, 3, 3, 3, bias, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w1, w2, b) if t is not None]

    def f(*ts):
        xx, a, bb = ts[:3]
        return public_fn(kind)(xx, a, bb, ts[3] if bias else None, stride=(2, 1), padding=(1, 0, 2, 1),
                               dilation=(1, 2))

    # fast mode (random projections of the Jacobian): the full Jacobian costs ~300 op calls per input
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_triton_forward_backward_matches_reference(kind, backend):
    triton_mod()
    x, w1, w2, b = make(kind, 2, 5, 7, 8, 3, 4, 3, 3, True)
    kw = dict(stride=2, padding=(1, 0, 1, 2), dilation=(2, 1))
    grads = {}
    for name in ("triton", "torch"):
        backend(name)
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, b)]
        y = public_fn(kind)(*leaves, **kw)
        assert conv._last_backend[kind] == name
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[name] = (y.detach(), [t.grad for t in leaves])
    assert rel_err(grads["triton"][0], grads["torch"][0]) <= RTOL
    for g_t, g_r in zip(grads["triton"][1], grads["torch"][1]):
        assert rel_err(g_t, g_r) <= RTOL


@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_trp_modules_run_the_fused_op(scheme, backend):
    """The factorized modules of `trp` (what trp.decompose builds) go through these ops: forward and
    backward with the Triton kernel equal the two-conv path."""
    triton_mod()
    trp = pytest.importorskip("trp")
    dense = torch.nn.Conv2d(5, 6, 3, stride=2, padding=1, dilation=1, bias=True)
    cls = trp.ChannelFactorizedConv2d if scheme == "channel" else trp.SpatialFactorizedConv2d
    layer = cls.from_conv(dense, rank=3)
    x = torch.randn(2, 5, 9, 8)
    outs = {}
    for name in ("triton", "torch"):
        backend(name)
        layer.zero_grad()
        y = layer(x)
        assert conv._last_backend[scheme] == name
        y.square().sum().backward()
        outs[name] = (y.detach(), [p.grad.clone() for p in layer.parameters()])
    assert rel_err(outs["triton"][0], outs["torch"][0]) <= RTOL
    for a, b in zip(outs["triton"][1], outs["torch"][1]):
        assert rel_err(a, b) <= RTOL


# ---- op registration
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_opcheck(kind, name, backend):
    if name == "triton":
        triton_mod()
    backend(name)
    op = getattr(torch.ops.trp_kernels, f"factorized_conv_{kind}").default
    x, w1, w2, b = make(kind, 2, 4, 7, 6, 3, 5, 3, 3, True)
    for t in (x, w1, w2, b):
        t.requires_grad_()
    torch.library.opcheck(op, (x, w1, w2, b, [2, 1], [1, 0, 2, 1], [1, 2]))
    # no bias, no grad: schema and fake kernel (the aot_dispatch checks above already cover tracing)
    torch.library.opcheck(op, (x.detach(), w1.detach(), w2.detach(), None, [1, 1], [0, 0, 0, 0], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_torch_compile_fullgraph(kind, backend):
    backend("torch")
    x, w1, w2, b = make(kind, 2, 4, 7, 6, 3, 5, 3, 3, True)
    f = torch.compile(lambda *t: public_fn(kind)(*t, stride=2, padding=1), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x, w1, w2, b), public_fn(kind)(x, w1, w2, b, stride=2, padding=1))


# ---- public wrappers reject bad input with ValueError
def _bad_cases(kind):
    x, w1, w2, b = make(kind, 1, 4, 6, 6, 3, 5, 3, 3, True)
    cases = [
        ((x[0], w1, w2), {}),                                  # 3-D input
        ((x, w1[0], w2), {}),                                  # 3-D weight
        ((x[:, :3], w1, w2), {}),                              # channel mismatch
        ((x, w1, w2[:, :2]), {}),                              # rank mismatch
        ((x, w1, w2, b[:4]), {}),                              # bias shape
        ((x, w1, w2), {"padding": (1, 1, 1)}),                 # 3-tuple padding
        ((x, w1, w2), {"padding": -1}),                        # negative padding
        ((x, w1, w2), {"stride": 0}),
        ((x, w1, w2), {"dilation": (1, 0)}),
        ((x, w1, w2), {"stride": (1, 1, 1)}),
    ]
    if kind == "channel":
        cases.append(((x, w1, torch.randn(5, 3, 3, 3)), {}))      # projection not 1 x 1
    else:
        cases.append(((x, torch.randn(3, 4, 3, 3), w2), {}))      # vertical part not kh x 1
        cases.append(((x, w1, torch.randn(5, 3, 3, 3)), {}))      # horizontal part not 1 x kw
    return cases


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_bad_input_raises_value_error(kind):
    for args, kwargs in _bad_cases(kind):
        with pytest.raises(ValueError):
            public_fn(kind)(*args, **kwargs)


# ---- TRP_CONV_BACKEND
def test_backend_env_values(backend, monkeypatch):
    x, w1, w2, b = make("channel", 1, 3, 5, 5, 2, 4, 3, 3, True)
    ref = reference.factorized_conv_channel(x, w1, w2, b, [1, 1], [1, 1, 1, 1], [1, 1])
    backend("torch")
    torch.testing.assert_close(trp_kernels.factorized_conv_channel(x, w1, w2, b, padding=1), ref)
    assert conv._last_backend["channel"] == "torch"
    assert trp_kernels.backend_info()["factorized_conv"]["setting"] == "torch"
    backend("auto")
    torch.testing.assert_close(trp_kernels.factorized_conv_channel(x, w1, w2, b, padding=1), ref)
    assert conv._last_backend["channel"] == "torch"  # CPU tensors: two convolutions under auto
    assert trp_kernels.backend_info()["factorized_conv"]["cpu"].startswith("torch")
    backend(" TORCH ")  # case and surrounding blanks are ignored
    assert conv.requested_backend() == "torch"
    backend("cudnn")
    with pytest.raises(ValueError, match="TRP_CONV_BACKEND"):
        trp_kernels.factorized_conv_channel(x, w1, w2, b, padding=1)
    assert trp_kernels.backend_info()["factorized_conv"]["setting"].startswith("invalid")


@pytest.mark.triton
def test_backend_triton_forced(backend, monkeypatch):
    tri = triton_mod()
    x, w1, w2, b = make("spatial", 1, 3, 5, 5, 2, 4, 3, 3, False)
    backend("triton")
    if tri.interpreting():
        y = trp_kernels.factorized_conv_spatial(x, w1, w2, padding=1)
        assert conv._last_backend["spatial"] == "triton"
        assert rel_err(y, reference.factorized_conv_spatial(x, w1, w2, None, [1, 1], [1] * 4, [1, 1])) <= RTOL
        assert trp_kernels.backend_info()["factorized_conv"]["cpu"] == "triton (interpreter)"
        # float64 has no Triton kernel: forcing it is an error, not a silent fallback
        with pytest.raises(RuntimeError, match="not supported"):
            trp_kernels.factorized_conv_spatial(x.double(), w1.double(), w2.double(), padding=1)
    # CPU tensors without the interpreter: a clear error
    monkeypatch.setattr(tri._common, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        trp_kernels.factorized_conv_spatial(x, w1, w2, padding=1)


# ---- GPU only
def _lowp_check(kind, dtype, nb, c, h, w, r, n, k, stride, padding, dilation, channels_last=False):
    """flash-attention style: the fused kernel's error against an fp64 reference must stay within a small
    multiple of the error PyTorch's own two convolutions make in the same precision."""
    tri = triton_mod()
    x, w1, w2, b = make(kind, nb, c, h, w, r, n, k, k, True, device="cuda")
    # unit-scale activations, so that float16 neither overflows nor underflows
    w1 = w1 / (w1[0].numel() ** 0.5)
    w2 = w2 / (w2[0].numel() ** 0.5)
    args = (stride, padding, dilation)
    exact = ref_fn(kind)(x.double(), w1.double(), w2.double(), b.double(), *args)
    lp = [t.to(dtype) for t in (x, w1, w2, b)]
    if channels_last:
        lp[0] = lp[0].to(memory_format=torch.channels_last)
    torch_err = (ref_fn(kind)(*lp, *args).double() - exact).abs().max().item()
    y = getattr(tri, f"factorized_conv_{kind}")(*lp, *args)
    fused_err = (y.double() - exact).abs().max().item()
    assert y.dtype == dtype and y.shape == exact.shape
    assert fused_err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (fused_err, torch_err)
    return y


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_low_precision(kind, dtype, channels_last):
    _lowp_check(kind, dtype, 4, 64, 32, 32, 24, 64, 3, [1, 1], [1, 1, 1, 1], [1, 1], channels_last)
    _lowp_check(kind, dtype, 3, 37, 17, 23, 13, 29, 3, [2, 2], [0, 1, 2, 0], [2, 1], channels_last)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("shape", [
    (32, 64, 56, 56, 32, 64, [1, 1], [1] * 4),          # ResNet-50 stage 1
    (8, 256, 14, 14, 128, 256, [1, 1], [1] * 4),        # ResNet-50 stage 3
    (8, 128, 28, 28, 64, 128, [2, 2], [1] * 4),         # stride-2 downsampling
    (2, 16, 20, 300, 8, 16, [1, 1], [1] * 4),           # wide rows: spatial column tiles
])
def test_cuda_large_fp32(kind, shape):
    tri = triton_mod()
    nb, c, h, w, r, n, stride, padding = shape
    x, w1, w2, b = make(kind, nb, c, h, w, r, n, 3, 3, True, device="cuda")
    args = (b, stride, padding, [1, 1])
    y = getattr(tri, f"factorized_conv_{kind}")(x, w1, w2, *args)
    exact = ref_fn(kind)(*(t.double() for t in (x, w1, w2, b)), stride, padding, [1, 1])
    # IEEE fp32 accumulation over c*k*k + r*k terms
    assert rel_err(y, exact) <= 1e-5
    yl = getattr(tri, f"factorized_conv_{kind}")(x.to(memory_format=torch.channels_last), w1, w2, *args)
    assert rel_err(yl, exact) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_cuda_auto_picks_valid_backend(kind, backend, monkeypatch):
    backend("auto")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE fp32 on both paths
    x, w1, w2, b = make(kind, 2, 32, 16, 16, 8, 32, 3, 3, True, device="cuda")
    y = public_fn(kind)(x, w1, w2, b, padding=1)
    first = conv._last_backend[kind]
    assert first in ("triton", "torch")
    y2 = public_fn(kind)(x, w1, w2, b, padding=1)
    assert conv._last_backend[kind] == first  # the choice is cached per shape
    ref = ref_fn(kind)(x.double(), w1.double(), w2.double(), b.double(), [1, 1], [1] * 4, [1, 1])
    assert rel_err(y, ref) <= 1e-5 and rel_err(y2, y) <= 1e-6
    info = trp_kernels.backend_info()["factorized_conv"]
    assert any(c["backend"] == first for c in info["auto_choices"])
    # torch.compile over the op keeps the dispatch at run time
    f = torch.compile(lambda *t: public_fn(kind)(*t, padding=1), fullgraph=True)
    assert rel_err(f(x, w1, w2, b), ref) <= 1e-5
