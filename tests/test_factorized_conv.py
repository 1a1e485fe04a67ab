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
    assert_module_backends_agree(layer, x, scheme, backend)


def assert_module_backends_agree(layer, x, kind, backend):
    """layer's forward and parameter gradients run the `kind` op with the Triton kernel (backend fixture)
    and equal those of the two-conv path."""
    outs = {}
    for name in ("triton", "torch"):
        backend(name)
        layer.zero_grad()
        y = layer(x)
        assert conv._last_backend[kind] == name
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


# ---- output memory format: every backend and the fake kernel follow geometry.output_memory_format
CL = torch.channels_last


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_channels_last_output_and_opcheck(kind, name, backend):
    """conv2d returns channels_last for channels_last input; the op's fake must promise the same strides
    (opcheck compares them), or compiled graphs assert on the real output's strides."""
    if name == "triton":
        triton_mod()
    backend(name)
    x, w1, w2, b = make(kind, 2, 4, 7, 6, 3, 5, 3, 3, True)
    xl = x.to(memory_format=CL)
    y = public_fn(kind)(xl, w1, w2, b, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    two_convs = ref_fn(kind)(xl, w1, w2, b, [2, 1], [1, 0, 2, 1], [1, 2])
    assert y.stride() == two_convs.stride()
    op = getattr(torch.ops.trp_kernels, f"factorized_conv_{kind}").default
    torch.library.opcheck(op, (xl, w1, w2, b, [2, 1], [1, 0, 2, 1], [1, 2]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("layout", ["weight_cl", "c1_cl", "strided_cl_view", "permuted"])
def test_output_format_follows_conv2d(kind, layout, backend):
    """The rule matches conv2d's in the corner cases too: a channels_last weight, a one-channel input
    (both layouts at once), a strided view of a channels_last tensor, another permutation."""
    backend("torch")
    x, w1, w2, b = make(kind, 2, 4, 7, 6, 3, 5, 3, 3, True)
    if layout == "weight_cl":
        w1 = w1.to(memory_format=CL)
    elif layout == "c1_cl":
        x, w1 = x[:, :1].contiguous().to(memory_format=CL), w1[:, :1].contiguous()
    elif layout == "strided_cl_view":
        x = torch.randn(2, 4, 7, 12).to(memory_format=CL)[..., ::2]
    else:
        x = torch.randn(2, 4, 6, 7).permute(0, 1, 3, 2)
    args = (b, [1, 1], [1, 1, 1, 1], [1, 1])
    y = getattr(torch.ops.trp_kernels, f"factorized_conv_{kind}")(x, w1, w2, *args)
    assert y.stride() == ref_fn(kind)(x, w1, w2, *args).stride()
    with torch._subclasses.FakeTensorMode() as mode:
        fx, fw1, fw2, fb = (mode.from_tensor(t) for t in (x, w1, w2, b))
        fake = getattr(torch.ops.trp_kernels, f"factorized_conv_{kind}")(fx, fw1, fw2, fb, *args[1:])
    assert fake.stride() == y.stride()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_inductor_channels_last_decomposed_resnet20(scheme, backend):
    """torch.compile (inductor, CPU) of a decomposed ResNet-20 fed channels_last input: the generated
    code asserts every custom-op output's strides against the fake kernel's."""
    trp = pytest.importorskip("trp")
    backend("torch")
    net = trp.decompose(trp.models.build("resnet20").eval(), scheme, rank=2).eval()
    assert any(isinstance(m, trp.modules.FACTORIZED_TYPES) for m in net.modules())
    x = torch.randn(2, 3, 16, 16).to(memory_format=CL)
    torch._dynamo.reset()
    # no FX-graph cache: a graph compiled against another version of the fake kernels would be reused
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        y = torch.compile(net)(x)
    torch.testing.assert_close(y, net(x), rtol=1e-4, atol=1e-5)


# ---- autocast: the ops follow conv2d's rule (inputs cast to the region's dtype, float64 left alone)
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_cpu_autocast_eager_fake_and_reference_agree(kind, backend):
    backend("torch")
    x, w1, w2, b = make(kind, 2, 4, 7, 6, 3, 5, 3, 3, True)
    kw = dict(stride=2, padding=(1, 0, 2, 1), dilation=(1, 2))

    def f(*t):
        return public_fn(kind)(*t, **kw)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(x, w1, w2, b)
        two_convs = ref_fn(kind)(x, w1, w2, b, [2, 2], [1, 0, 2, 1], [1, 2])  # conv2d under autocast
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w1, w2, b)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = f(*(mode.from_tensor(t) for t in (x, w1, w2, b)))
    assert eager.dtype == two_convs.dtype == compiled.dtype == fake.dtype == torch.bfloat16
    torch.testing.assert_close(eager, two_convs, rtol=0, atol=0)
    torch.testing.assert_close(compiled, two_convs, rtol=0, atol=0)
    # float64 is not an autocast type: untouched, as conv2d leaves it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = f(*(t.double() for t in (x, w1, w2, b)))
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_cpu_autocast_backward(kind, backend):
    """Gradients flow through the cast back to the float32 leaves, in their dtype."""
    backend("torch")
    leaves = [t.requires_grad_() for t in make(kind, 1, 3, 5, 5, 2, 4, 3, 3, True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = public_fn(kind)(*leaves, padding=1)
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_follows_region_dtype(kind, dtype, backend):
    """The region's dtype, not a fixed one: bfloat16 autocast on CUDA gives bfloat16, like conv2d; the
    Triton kernel then runs in that dtype."""
    backend("triton")
    x, w1, w2, b = make(kind, 2, 16, 12, 12, 8, 16, 3, 3, True, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = public_fn(kind)(x, w1, w2, b, padding=1)
        two_convs = ref_fn(kind)(x, w1, w2, b, [1, 1], [1] * 4, [1, 1])
    assert y.dtype == two_convs.dtype == dtype
    exact = ref_fn(kind)(*(t.double() for t in (x, w1, w2, b)), [1, 1], [1] * 4, [1, 1])
    torch_err = (two_convs.double() - exact).abs().max().item()
    assert (y.double() - exact).abs().max().item() <= 2 * torch_err + 1e-6 * exact.abs().max().item()


# ---- device guard: measurement, autotuning and launches run on the tensor's device
def test_device_guard_wraps_dispatch_and_launch(backend, monkeypatch):
    """_run enters _on_device(x.device) around the backend choice (where `auto` measures and Triton
    autotunes) and the kernel call; _on_device(cuda:1) is torch.cuda.device(1). CPU-checkable: the guard
    is recorded, the kernel is a stub."""
    guard = torch.cuda.device(torch.device("cuda", 1))  # constructing one needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(conv._on_device(torch.device("cpu")), torch.cuda.device)
    entered, seen = [], []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    def choose(*args):
        seen.append(("choose", list(entered)))
        return "triton"

    class StubTriton:
        @staticmethod
        def factorized_conv_channel(x, *args):
            seen.append(("kernel", list(entered)))
            return torch.zeros(1, 5, 5, 5)

    monkeypatch.setattr(conv, "_on_device", Recorder)
    monkeypatch.setattr(conv, "choose_backend", choose)
    monkeypatch.setattr(conv, "_triton", lambda: StubTriton)
    monkeypatch.setenv("TRP_KERNELS_SELF_CHECK", "0")  # the stub's zeros would fail the first-use check
    x, w1, w2, b = make("channel", 1, 3, 5, 5, 2, 5, 3, 3, True)
    conv._run("channel", x, w1, w2, b, [1, 1], [1] * 4, [1, 1])
    assert seen == [("choose", [x.device]), ("kernel", [x.device])]


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("name", ["triton", "auto"])
def test_cuda_tensors_on_a_non_current_device(name, backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    backend(name)
    x, w1, w2, b = make("channel", 2, 16, 12, 12, 8, 16, 3, 3, True, device="cuda:1")
    with torch.cuda.device(0):
        y = public_fn("channel")(x, w1, w2, b, padding=1)
        torch.cuda.synchronize(1)
    exact = ref_fn("channel")(*(t.double() for t in (x, w1, w2, b)), [1, 1], [1] * 4, [1, 1])
    assert y.device == x.device and rel_err(y, exact) <= 1e-5


# ---- 32-bit indices: calls too large for the kernels are refused (two convolutions run instead)
@pytest.mark.triton
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_supported_refuses_int32_overflow(kind, backend):
    """2**32 output pixels with a 1 x 1 image per channel: the flattened pixel index would wrap. The
    input is an expanded scalar (stride 0), so nothing of that size is allocated."""
    tri = triton_mod()
    _, w1, w2, _ = make(kind, 1, 2, 3, 3, 2, 1, 1, 1, False)
    x = torch.zeros(()).expand(2 ** 16, 2, 2 ** 8, 2 ** 8)
    assert "32-bit" in tri.supported(kind, x, w1, w2, None, (2 ** 8, 2 ** 8))
    assert tri.supported(kind, x[: 2 ** 14], w1, w2, None, (2 ** 8, 2 ** 8)) is None  # 2**30 pixels: fine
    backend("triton")
    with pytest.raises(RuntimeError, match="32-bit"):
        public_fn(kind)(x, w1, w2)


# ---- threads: one measurement per signature, autotuned launches never interleave
def test_auto_measures_each_signature_once_across_threads(monkeypatch):
    import threading
    import time
    monkeypatch.setattr(conv, "_auto_choice", {})
    calls, lock, start = {}, threading.Lock(), threading.Barrier(8)

    def measure(key):
        with lock:
            calls[key] = calls.get(key, 0) + 1
        time.sleep(0.02)  # long enough for every thread to arrive while the first one measures
        return "triton" if key == "a" else "torch"

    results = []

    def worker(key):
        start.wait()
        results.append((key, conv._measured_choice(key, lambda: measure(key))))

    threads = [threading.Thread(target=worker, args=("ab"[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == {"a": 1, "b": 1}
    assert sorted(set(results)) == [("a", "triton"), ("b", "torch")] and len(results) == 8


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_triton_launches_are_serialised(kind, monkeypatch):
    """The autotuner keeps per-call state on the shared kernel object: concurrent launches must not
    overlap (checked with a stub kernel that sleeps and counts callers inside it)."""
    import threading
    import time
    tri = triton_mod()
    mod = getattr(tri, kind)
    inside, peak, lock = [0], [0], threading.Lock()

    class StubKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                time.sleep(0.01)
                with lock:
                    inside[0] -= 1
            return launch

    monkeypatch.setattr(mod, "_kernel", lambda *a: (StubKernel(), {}))
    x, w1, w2, b = make(kind, 1, 3, 5, 5, 2, 4, 3, 3, True)
    fn = getattr(mod, f"factorized_conv_{kind}")
    threads = [threading.Thread(target=fn, args=(x, w1, w2, b, [1, 1], [1] * 4, [1, 1])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


# ---- conv geometry (trp_kernels.geometry): one home for argument rules and output sizes
def test_geometry_rules_and_errors():
    from trp_kernels import geometry as g
    assert g.pair(3, "stride") == (3, 3) and g.pair([2], "stride") == (2, 2) and g.pair((1, 2), "s") == (1, 2)
    assert g.padding4(1) == (1,) * 4 and g.padding4((1, 2)) == (1, 1, 2, 2)
    assert g.padding4((0, 1, 2, 3)) == (0, 1, 2, 3)
    assert g.resolve_padding("same", (4, 2), (1, 3)) == (1, 2, 1, 2)
    assert g.resolve_padding("valid", 3, 1) == (0, 0, 0, 0) and g.resolve_padding(2, 3, 1) == (2,) * 4
    for bad, match in [(lambda: g.pair((1, 2, 3), "stride"), "stride"), (lambda: g.pair(None, "dilation"), "dilation"),
                       (lambda: g.padding4((1, 2, 3)), "padding"), (lambda: g.padding4(-1), ">= 0"),
                       (lambda: g.padding4("same"), "resolve_padding"),
                       (lambda: g.resolve_padding("full", 3, 1), "'same' or 'valid'"),
                       (lambda: g.resolve_padding("same", 3, 1, stride=2), "stride 1")]:
        with pytest.raises(ValueError, match=match):
            bad()


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_geometry_out_hw_matches_the_two_convs(kind):
    from trp_kernels import geometry as g
    for (h, w), k, s, p, d in [((7, 9), 3, (2, 1), (1, 0, 2, 1), (1, 2)), ((5, 5), 2, (1, 2), (0, 2, 1, 0), (2, 1)),
                               ((3, 4), 3, (1, 1), (0, 0, 0, 0), (1, 1))]:
        x, w1, w2, b = make(kind, 1, 2, h, w, 2, 3, k, k, False)
        ref = ref_fn(kind)(x, w1, w2, None, s, p, d)
        assert g.out_shape(kind, x, w1, w2, s, p, d) == tuple(ref.shape)


# ---- eager CPU calls: the two convolutions without the op's dispatch
def _four_kinds(kind):
    """(public function, op, x, w1, w2, bias) of each factorized conv, small and odd-sized."""
    c, n, r = 5, 7, 3
    shapes = {"channel": ((r, c, 3, 3), (n, r, 1, 1)), "spatial": ((r, c, 3, 1), (n, r, 1, 3)),
              "decoupled": ((n * r, c, 1, 1), (n, r, 3, 3)),
              "depthwise_decoupled": ((c * r, 1, 3, 3), (n, c * r, 1, 1))}
    public = {"decoupled": trp_kernels.decoupled_conv, "depthwise_decoupled": trp_kernels.depthwise_decoupled_conv}
    name = {"decoupled": "decoupled_conv", "depthwise_decoupled": "depthwise_decoupled_conv"}.get(
        kind, f"factorized_conv_{kind}")
    w1, w2 = (torch.randn(*s) for s in shapes[kind])
    return (public.get(kind) or getattr(trp_kernels, name), getattr(torch.ops.trp_kernels, name).default,
            torch.randn(2, c, 9, 8), w1, w2, torch.randn(n))


@pytest.mark.parametrize("kind", ["channel", "spatial", "decoupled", "depthwise_decoupled"])
def test_eager_cpu_calls_run_the_convolutions_without_the_op(kind, backend, monkeypatch):
    """On CPU tensors the op would run the two convolutions anyway; its dispatch costs as much as a small layer, so
    eager calls skip it, with the same result bit for bit, conv2d's gradients and the promised layout. Compiled
    code and the triton setting still go through the op."""
    torch.manual_seed(0)
    fn, op, x, w1, w2, b = _four_kinds(kind)
    args = ([2, 1], [1, 0, 2, 1], [1, 2])
    backend("torch")
    expected = op(x, w1, w2, b, *args)
    calls, run = [], conv._run
    monkeypatch.setattr(conv, "_run", lambda *a: calls.append(a[0]) or run(*a))
    for setting in ("auto", "torch"):
        backend(setting)
        conv._last_backend[kind] = None
        y = fn(x, w1, w2, b, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
        assert torch.equal(y, expected) and y.stride() == expected.stride() and calls == []
        assert conv._last_backend[kind] == "torch"
    xl = x.to(memory_format=torch.channels_last)
    assert fn(xl, w1, w2, b, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2)).is_contiguous(
        memory_format=torch.channels_last)
    leaves = [t.clone().double().requires_grad_() for t in (x, w1, w2, b)]
    assert torch.autograd.gradcheck(lambda *t: fn(*t, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2)),
                                    leaves, fast_mode=True)
    compiled = torch.compile(lambda *t: fn(*t, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2)),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w1, w2, b), expected)
    assert calls == [kind]  # the compiled graph holds the op
