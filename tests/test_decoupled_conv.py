"""trp_kernels.decoupled_conv (network decoupling): the Triton kernel (interpreter on CPU) against the
1 x 1 + grouped-conv reference, autograd, opcheck, fake vs real output, autocast, input validation,
TRP_CONV_BACKEND dispatch, and GPU checks in float16/bfloat16/channels_last (marker cuda).

Tolerance (float32): max|y - ref| <= 1e-5 * max|ref| (IEEE fp32 dot products, only the summation order
differs); GPU low precision: within 2x PyTorch's own error in that precision, against a float64 reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import trp_kernels
from test_factorized_conv import RTOL, assert_module_backends_agree, backend, rel_err, triton_mod  # noqa: F401  (backend: a fixture)
from trp_kernels import conv, reference

CL = torch.channels_last
OP = torch.ops.trp_kernels.decoupled_conv.default


def make(nb, c, h, w, n, r, kh, kw, bias, dtype=torch.float32, device="cpu"):
    g = dict(dtype=dtype, device=device)
    return (torch.randn(nb, c, h, w, **g), torch.randn(n * r, c, 1, 1, **g), torch.randn(n, r, kh, kw, **g),
            torch.randn(n, **g) if bias else None)


def test_reference_is_the_sum_of_parallel_paths():
    x, pw, dw, b = make(2, 3, 6, 5, 4, 2, 3, 2, True, dtype=torch.float64)
    ref = reference.factorized_conv_decoupled(x, pw, dw, b, [2, 1], [1, 0, 0, 1], [1, 2])
    xp = F.pad(x, (0, 1, 1, 0))
    dense = torch.einsum("nrc,nrt->nct", pw.reshape(4, 2, 3), dw.flatten(2)).reshape(4, 3, 3, 2)
    torch.testing.assert_close(ref, F.conv2d(xp, dense, b, (2, 1), 0, (1, 2)))


# ---- Triton vs reference: stride x padding x dilation x bias, odd sizes
PADDINGS = {"p0": (0, 0, 0, 0), "p1": (1, 1, 1, 1), "asym": (0, 2, 1, 0)}
GRID = list(itertools.product([1, 2], PADDINGS, [1, 2], [True, False]))


@pytest.mark.triton
@pytest.mark.parametrize("stride,pad,dil,bias", GRID)
def test_triton_matches_reference(stride, pad, dil, bias):
    tri = triton_mod()
    from trp_kernels.triton import decoupled
    i = GRID.index((stride, pad, dil, bias))
    nb, c, n, r = 1 + i % 2, 3 + i % 5, 2 + (i * 3) % 5, 1 + i % 4
    x, pw, dw, b = make(nb, c, 5 + i % 4, 8 - i % 3, n, r, 3, 3, bias)
    args = (b, [stride, stride], list(PADDINGS[pad]), [dil, dil])
    y = decoupled.factorized_conv_decoupled(x, pw, dw, *args)
    ref = reference.factorized_conv_decoupled(x, pw, dw, *args)
    assert tri is not None and y.shape == ref.shape and rel_err(y, ref) <= RTOL


@pytest.mark.triton
def test_triton_rectangular_channels_last_strided_and_many_filters():
    triton_mod()
    from trp_kernels.triton import decoupled
    # 19 filters x 3 paths: more than one filter block per program column; rectangular kernel
    x, pw, dw, b = make(2, 5, 7, 9, 19, 3, 2, 3, True)
    args = (b, [1, 2], [1, 0, 2, 1], [2, 1])
    ref = reference.factorized_conv_decoupled(x, pw, dw, *args)
    y = decoupled.factorized_conv_decoupled(x.to(memory_format=CL), pw, dw, *args)
    assert y.is_contiguous(memory_format=CL) and rel_err(y, ref) <= RTOL
    xs = torch.randn(2, 5, 7, 18)[..., ::2]  # a strided view: read through its strides
    y = decoupled.factorized_conv_decoupled(xs, pw, dw, *args)
    assert rel_err(y, reference.factorized_conv_decoupled(xs.contiguous(), pw, dw, *args)) <= RTOL


@pytest.mark.triton
def test_triton_forward_backward_and_module(backend):
    triton_mod()
    import trp
    dense = torch.nn.Conv2d(5, 6, 3, stride=2, padding=1, bias=True)
    layer = trp.DecoupledConv2d.from_conv(dense, rank=2)
    x = torch.randn(2, 5, 7, 6)
    assert_module_backends_agree(layer, x, "decoupled", backend)


# ---- op registration, autograd, layouts
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_opcheck(name, backend):
    if name == "triton":
        triton_mod()
    backend(name)
    x, pw, dw, b = make(2, 4, 6, 5, 3, 2, 3, 3, True)
    for t in (x, pw, dw, b):
        t.requires_grad_()
    torch.library.opcheck(OP, (x, pw, dw, b, [2, 1], [1, 0, 2, 1], [1, 2]))
    xl = x.detach().to(memory_format=CL)
    torch.library.opcheck(OP, (xl, pw.detach(), dw.detach(), None, [1, 1], [0, 0, 0, 0], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradcheck_float64(backend):
    backend("torch")
    inputs = [t.requires_grad_() for t in make(1, 3, 5, 5, 2, 2, 3, 3, True, dtype=torch.float64)]
    f = lambda *t: trp_kernels.decoupled_conv(*t, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("layout", ["contiguous", "x_cl", "pw_cl", "dw_cl", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_matches_real_dtype_and_memory_format(layout, dtype, backend):
    backend("torch")
    x, pw, dw, b = make(2, 4, 7, 6, 5, 3, 3, 3, True, dtype=dtype)
    if layout == "x_cl":
        x = x.to(memory_format=CL)
    elif layout == "pw_cl":
        pw = pw.to(memory_format=CL)
    elif layout == "dw_cl":
        dw = dw.to(memory_format=CL)
    elif layout == "permuted":
        x = torch.randn(2, 4, 6, 7, dtype=dtype).permute(0, 1, 3, 2)
    args = ([1, 2], [1, 1, 0, 1], [2, 1])
    y = OP(x, pw, dw, b, *args)
    two_convs = reference.factorized_conv_decoupled(x, pw, dw, b, *args)
    assert y.dtype == dtype and y.stride() == two_convs.stride()
    with torch._subclasses.FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(t) for t in (x, pw, dw, b)), *args)
    assert fake.shape == y.shape and fake.dtype == y.dtype and fake.stride() == y.stride()


def test_torch_compile_fullgraph(backend):
    backend("torch")
    x, pw, dw, b = make(2, 4, 7, 6, 3, 2, 3, 3, True)
    f = torch.compile(lambda *t: trp_kernels.decoupled_conv(*t, stride=2, padding=1), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x, pw, dw, b), trp_kernels.decoupled_conv(x, pw, dw, b, stride=2, padding=1))


def test_cpu_autocast_follows_conv2d(backend):
    backend("torch")
    x, pw, dw, b = make(2, 4, 7, 6, 3, 2, 3, 3, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trp_kernels.decoupled_conv(x, pw, dw, b, padding=1)
        ref = F.conv2d(F.conv2d(x, pw), dw, b, padding=1, groups=3)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("bad", ["x3d", "pw_not_1x1", "channels", "paths", "bias", "stride", "padding"])
def test_bad_input_raises_value_error(bad):
    x, pw, dw, b = make(1, 4, 6, 6, 3, 2, 3, 3, True)
    kw = {}
    if bad == "x3d":
        x = x[0]
    elif bad == "pw_not_1x1":
        pw = torch.randn(6, 4, 3, 3)
    elif bad == "channels":
        x = x[:, :3]
    elif bad == "paths":
        pw = pw[:5]
    elif bad == "bias":
        b = b[:2]
    elif bad == "stride":
        kw["stride"] = 0
    else:
        kw["padding"] = (1, 1, 1)
    with pytest.raises(ValueError):
        trp_kernels.decoupled_conv(x, pw, dw, b, **kw)


def test_backend_dispatch(backend, monkeypatch):
    x, pw, dw, b = make(1, 3, 5, 5, 2, 2, 3, 3, False)
    backend("auto")
    trp_kernels.decoupled_conv(x, pw, dw, b)
    assert conv._last_backend["decoupled"] == "torch"  # CPU tensors: the two convolutions
    backend("bogus")
    with pytest.raises(ValueError, match="TRP_CONV_BACKEND"):
        trp_kernels.decoupled_conv(x, pw, dw, b)
    tri = triton_mod()
    from trp_kernels.triton import decoupled
    backend("triton")
    assert decoupled.supported(x.double(), pw.double(), dw.double(), None, (3, 3)) is not None
    with pytest.raises(RuntimeError, match="not supported"):
        trp_kernels.decoupled_conv(x.double(), pw.double(), dw.double())
    big = torch.empty(1, 2, 1, 1).expand(1, 2, 2 ** 16, 2 ** 16)  # 2**32 output pixels: no 32-bit indices
    assert "32-bit" in decoupled.supported(big, torch.empty(4, 2, 1, 1), torch.empty(2, 2, 1, 1), None,
                                           (2 ** 16, 2 ** 16))
    x5, pw5, dw5, _ = make(1, 3, 8, 8, 2, 2, 5, 5, False)  # 25 taps spill registers: two convolutions
    assert "taps" in decoupled.supported(x5, pw5, dw5, None, (4, 4))
    monkeypatch.setattr(tri._common, "_INTERPRET", False)
    monkeypatch.setattr(decoupled, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        trp_kernels.decoupled_conv(x, pw, dw, b)


# ---- GPU only
def _lowp_check(dtype, nb, c, h, w, n, r, k, stride, padding, dilation, channels_last):
    """The fused kernel's error against float64 within 2x PyTorch's own error in `dtype`."""
    from trp_kernels.triton import decoupled
    x, pw, dw, b = make(nb, c, h, w, n, r, k, k, True, device="cuda")
    pw, dw = pw / c ** 0.5, dw / (r * k * k) ** 0.5  # unit-scale activations for float16
    args = (stride, padding, dilation)
    exact = reference.factorized_conv_decoupled(x.double(), pw.double(), dw.double(), b.double(), *args)
    lp = [t.to(dtype) for t in (x, pw, dw, b)]
    if channels_last:
        lp[0] = lp[0].to(memory_format=CL)
    torch_err = (reference.factorized_conv_decoupled(*lp, *args).double() - exact).abs().max().item()
    y = decoupled.factorized_conv_decoupled(*lp, *args)
    err = (y.double() - exact).abs().max().item()
    assert y.dtype == dtype and y.shape == exact.shape
    assert err <= 2 * torch_err + 1e-6 * exact.abs().max().item(), (err, torch_err)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_low_precision(dtype, channels_last):
    _lowp_check(dtype, 4, 64, 32, 32, 64, 4, 3, [1, 1], [1, 1, 1, 1], [1, 1], channels_last)
    _lowp_check(dtype, 3, 37, 17, 23, 29, 9, 3, [2, 2], [0, 1, 2, 0], [2, 1], channels_last)
    _lowp_check(dtype, 2, 16, 12, 12, 24, 25, 5, [1, 1], [2, 2, 2, 2], [1, 1], channels_last)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_fp32_and_auto(layout, backend, monkeypatch):
    from trp_kernels.triton import decoupled
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, pw, dw, b = make(8, 64, 28, 28, 64, 5, 3, 3, True, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=CL)
    args = ([2, 2], [1, 1, 1, 1], [1, 1])
    exact = reference.factorized_conv_decoupled(*(t.double() for t in (x, pw, dw, b)), *args)
    assert rel_err(decoupled.factorized_conv_decoupled(x, pw, dw, b, *args), exact) <= 1e-5
    backend("auto")
    y = trp_kernels.decoupled_conv(x, pw, dw, b, stride=2, padding=1)
    assert conv._last_backend["decoupled"] in ("triton", "torch") and rel_err(y, exact) <= 1e-5
    assert y.stride() == OP(x, pw, dw, b, *args).stride()
