"""trp_kernels.depthwise_decoupled_conv (network decoupling, depthwise order): the Triton kernel (interpreter on
CPU) against the depthwise + 1 x 1 reference, autograd, opcheck, fake vs real output, autocast, input validation,
TRP_CONV_BACKEND dispatch, the module, ONNX, and GPU checks in float16/bfloat16/channels_last (marker cuda).

Tolerance (float32): max|y - ref| <= 1e-5 * max|ref| (IEEE fp32 products, only the summation order differs);
GPU low precision: within 2x PyTorch's own error in that precision, against a float64 reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import trp_kernels
from test_factorized_conv import RTOL, assert_module_backends_agree, backend, rel_err, triton_mod  # noqa: F401  (backend: a fixture)
from trp_kernels import conv, onnx, reference

CL = torch.channels_last
OP = torch.ops.trp_kernels.depthwise_decoupled_conv.default


def make(nb, c, h, w, n, r, kh, kw, bias, dtype=torch.float32, device="cpu"):
    g = dict(dtype=dtype, device=device)
    return (torch.randn(nb, c, h, w, **g), torch.randn(c * r, 1, kh, kw, **g), torch.randn(n, c * r, 1, 1, **g),
            torch.randn(n, **g) if bias else None)


def test_reference_is_the_dense_conv_of_the_paths():
    x, dw, pw, b = make(2, 3, 6, 5, 4, 2, 3, 2, True, dtype=torch.float64)
    ref = reference.factorized_conv_depthwise_decoupled(x, dw, pw, b, [2, 1], [1, 0, 0, 1], [1, 2])
    # filter i on channel j: sum over paths l of pw[i, j*r + l] * dw[j*r + l]
    dense = torch.einsum("njl,jlt->njt", pw.reshape(4, 3, 2), dw.reshape(3, 2, 6)).reshape(4, 3, 3, 2)
    torch.testing.assert_close(ref, F.conv2d(F.pad(x, (0, 1, 1, 0)), dense, b, (2, 1), 0, (1, 2)))


# ---- Triton vs reference: stride x padding x dilation x bias, odd sizes
PADDINGS = {"p0": (0, 0, 0, 0), "p1": (1, 1, 1, 1), "asym": (0, 2, 1, 0)}
GRID = list(itertools.product([1, 2], PADDINGS, [1, 2], [True, False]))


@pytest.mark.triton
@pytest.mark.parametrize("stride,pad,dil,bias", GRID)
def test_triton_matches_reference(stride, pad, dil, bias):
    tri = triton_mod()
    from trp_kernels.triton import depthwise_decoupled
    i = GRID.index((stride, pad, dil, bias))
    nb, c, n, r = 1 + i % 2, 3 + i % 5, 2 + (i * 3) % 19, 1 + i % 4
    x, dw, pw, b = make(nb, c, 5 + i % 4, 8 - i % 3, n, r, 3, 3, bias)
    args = (b, [stride, stride], list(PADDINGS[pad]), [dil, dil])
    y = depthwise_decoupled.factorized_conv_depthwise_decoupled(x, dw, pw, *args)
    ref = reference.factorized_conv_depthwise_decoupled(x, dw, pw, *args)
    assert tri is not None and y.shape == ref.shape and rel_err(y, ref) <= RTOL


@pytest.mark.triton
def test_triton_rectangular_channels_last_strided_and_many_blocks():
    triton_mod()
    from trp_kernels.triton import depthwise_decoupled as dd
    # 7 channels x 5 paths = 35 intermediate channels (three blocks of 16), 19 filters (two), 1 x 5 kernel
    x, dw, pw, b = make(2, 7, 7, 9, 19, 5, 1, 5, True)
    args = (b, [1, 2], [1, 0, 2, 1], [2, 1])
    ref = reference.factorized_conv_depthwise_decoupled(x, dw, pw, *args)
    y = dd.factorized_conv_depthwise_decoupled(x.to(memory_format=CL), dw, pw, *args)
    assert y.is_contiguous(memory_format=CL) and rel_err(y, ref) <= RTOL
    xs = torch.randn(2, 7, 7, 18)[..., ::2]  # a strided view: read through its strides
    y = dd.factorized_conv_depthwise_decoupled(xs, dw, pw, *args)
    assert rel_err(y, reference.factorized_conv_depthwise_decoupled(xs.contiguous(), dw, pw, *args)) <= RTOL
    x7, dw7, pw7, _ = make(1, 2, 9, 9, 3, 1, 7, 7, False)  # 49 taps, the most the kernel takes
    assert rel_err(dd.factorized_conv_depthwise_decoupled(x7, dw7, pw7, None, [1, 1], [3, 3, 3, 3], [1, 1]),
                   reference.factorized_conv_depthwise_decoupled(x7, dw7, pw7, None, [1, 1], [3, 3, 3, 3],
                                                                 [1, 1])) <= RTOL


@pytest.mark.triton
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_forward_backward_and_module(backend, stride):
    triton_mod()
    import trp
    dense = torch.nn.Conv2d(5, 6, 3, stride=stride, padding=1, bias=True)
    layer = trp.DepthwiseDecoupledConv2d.from_conv(dense, rank=2)
    x = torch.randn(2, 5, 7, 6)
    assert_module_backends_agree(layer, x, "depthwise_decoupled", backend)


def test_module_runs_the_op_except_grouped(backend):
    import trp
    backend("torch")
    conv._last_backend["depthwise_decoupled"] = None
    grouped = trp.DepthwiseDecoupledConv2d.from_conv(torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), rank=2)
    x = torch.randn(1, 4, 5, 5)
    dense = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    dense.weight.data.copy_(grouped.dense_weight())
    dense.bias.data.copy_(grouped.bias)
    torch.testing.assert_close(grouped(x), dense(x), rtol=1e-5, atol=1e-5)
    assert conv._last_backend["depthwise_decoupled"] is None  # a grouped 1 x 1 conv: two convolutions
    plain = trp.DepthwiseDecoupledConv2d.from_conv(torch.nn.Conv2d(4, 6, 3, stride=2, padding=(1, 0)), rank=3)
    y = plain(x)
    assert conv._last_backend["depthwise_decoupled"] == "torch"
    dense = torch.nn.Conv2d(4, 6, 3, stride=2, padding=(1, 0))
    dense.weight.data.copy_(plain.dense_weight())
    dense.bias.data.copy_(plain.bias)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)


# ---- op registration, autograd, layouts
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_opcheck(name, backend):
    if name == "triton":
        triton_mod()
    backend(name)
    x, dw, pw, b = make(2, 4, 6, 5, 3, 2, 3, 3, True)
    for t in (x, dw, pw, b):
        t.requires_grad_()
    torch.library.opcheck(OP, (x, dw, pw, b, [2, 1], [1, 0, 2, 1], [1, 2]))
    xl = x.detach().to(memory_format=CL)
    torch.library.opcheck(OP, (xl, dw.detach(), pw.detach(), None, [1, 1], [0, 0, 0, 0], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))


def test_gradcheck_float64(backend):
    backend("torch")
    inputs = [t.requires_grad_() for t in make(1, 3, 5, 5, 2, 2, 3, 3, True, dtype=torch.float64)]
    f = lambda *t: trp_kernels.depthwise_decoupled_conv(*t, stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("layout", ["contiguous", "x_cl", "dw_cl", "pw_cl", "permuted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_matches_real_dtype_and_memory_format(layout, dtype, backend):
    backend("torch")
    x, dw, pw, b = make(2, 4, 7, 6, 5, 3, 3, 3, True, dtype=dtype)
    if layout == "x_cl":
        x = x.to(memory_format=CL)
    elif layout == "dw_cl":
        dw = dw.to(memory_format=CL)
    elif layout == "pw_cl":
        pw = pw.to(memory_format=CL)
    elif layout == "permuted":
        x = torch.randn(2, 4, 6, 7, dtype=dtype).permute(0, 1, 3, 2)
    args = ([1, 2], [1, 1, 0, 1], [2, 1])
    y = OP(x, dw, pw, b, *args)
    two_convs = reference.factorized_conv_depthwise_decoupled(x, dw, pw, b, *args)
    assert y.dtype == dtype and y.stride() == two_convs.stride()
    with torch._subclasses.FakeTensorMode() as mode:
        fake = OP(*(mode.from_tensor(t) for t in (x, dw, pw, b)), *args)
    assert fake.shape == y.shape and fake.dtype == y.dtype and fake.stride() == y.stride()


def test_torch_compile_fullgraph(backend):
    backend("torch")
    x, dw, pw, b = make(2, 4, 7, 6, 3, 2, 3, 3, True)
    f = torch.compile(lambda *t: trp_kernels.depthwise_decoupled_conv(*t, stride=2, padding=1), backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(f(x, dw, pw, b),
                               trp_kernels.depthwise_decoupled_conv(x, dw, pw, b, stride=2, padding=1))


def test_cpu_autocast_follows_conv2d(backend):
    backend("torch")
    x, dw, pw, b = make(2, 4, 7, 6, 3, 2, 3, 3, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = trp_kernels.depthwise_decoupled_conv(x, dw, pw, b, padding=1)
        ref = F.conv2d(F.conv2d(x, dw, padding=1, groups=4), pw, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)


def test_same_padding_and_onnx_lowering(backend):
    backend("torch")
    x, dw, pw, b = make(1, 3, 6, 7, 4, 2, 2, 3, True)
    y = trp_kernels.depthwise_decoupled_conv(x, dw, pw, b, padding="same", dilation=(1, 2))
    assert y.shape[2:] == x.shape[2:]
    # the exporters see the two convolutions the op equals
    torch.testing.assert_close(onnx.lowered("depthwise_decoupled", x, dw, pw, b, [1, 1], [0, 1, 2, 2], [1, 2]), y)
    onnxscript = pytest.importorskip("onnxscript")
    assert onnxscript is not None and OP in onnx.custom_translation_table()


@pytest.mark.parametrize("bad", ["x3d", "dw_not_depthwise", "channels", "pw_mismatch", "pw_not_1x1", "bias",
                                 "stride", "padding"])
def test_bad_input_raises_value_error(bad):
    x, dw, pw, b = make(1, 4, 6, 6, 3, 2, 3, 3, True)
    kw = {}
    if bad == "x3d":
        x = x[0]
    elif bad == "dw_not_depthwise":
        dw = torch.randn(8, 2, 3, 3)
    elif bad == "channels":
        x = x[:, :3]
    elif bad == "pw_mismatch":
        pw = pw[:, :5]
    elif bad == "pw_not_1x1":
        pw = torch.randn(3, 8, 3, 3)
    elif bad == "bias":
        b = b[:2]
    elif bad == "stride":
        kw["stride"] = 0
    else:
        kw["padding"] = (1, 1, 1)
    with pytest.raises(ValueError):
        trp_kernels.depthwise_decoupled_conv(x, dw, pw, b, **kw)


def test_backend_dispatch(backend, monkeypatch):
    x, dw, pw, b = make(1, 3, 5, 5, 2, 2, 3, 3, False)
    backend("auto")
    trp_kernels.depthwise_decoupled_conv(x, dw, pw, b)
    assert conv._last_backend["depthwise_decoupled"] == "torch"  # CPU tensors: the two convolutions
    backend("bogus")
    with pytest.raises(ValueError, match="TRP_CONV_BACKEND"):
        trp_kernels.depthwise_decoupled_conv(x, dw, pw, b)
    tri = triton_mod()
    from trp_kernels.triton import depthwise_decoupled as dd
    backend("triton")
    assert dd.supported(x.double(), dw.double(), pw.double(), None, (3, 3)) is not None
    with pytest.raises(RuntimeError, match="not supported"):
        trp_kernels.depthwise_decoupled_conv(x.double(), dw.double(), pw.double())
    big = torch.empty(1, 2, 1, 1).expand(1, 2, 2 ** 16, 2 ** 16)  # 2**32 output pixels: no 32-bit indices
    assert "32-bit" in dd.supported(big, torch.empty(4, 1, 1, 1), torch.empty(2, 4, 1, 1), None, (2 ** 16, 2 ** 16))
    x9, dw9, pw9, _ = make(1, 3, 12, 12, 2, 1, 9, 9, False)  # 81 taps: two convolutions
    assert "taps" in dd.supported(x9, dw9, pw9, None, (4, 4))
    monkeypatch.setattr(tri._common, "_INTERPRET", False)
    monkeypatch.setattr(dd, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        trp_kernels.depthwise_decoupled_conv(x, dw, pw, b)


# ---- GPU only
def _lowp_check(dtype, nb, c, h, w, n, r, k, stride, padding, dilation, channels_last):
    """The fused kernel's error against float64 within 2x PyTorch's own error in `dtype`."""
    from trp_kernels.triton import depthwise_decoupled as dd
    x, dw, pw, b = make(nb, c, h, w, n, r, k, k, True, device="cuda")
    dw, pw = dw / k, pw / (c * r) ** 0.5  # unit-scale activations for float16
    args = (stride, padding, dilation)
    exact = reference.factorized_conv_depthwise_decoupled(x.double(), dw.double(), pw.double(), b.double(), *args)
    lp = [t.to(dtype) for t in (x, dw, pw, b)]
    if channels_last:
        lp[0] = lp[0].to(memory_format=CL)
    torch_err = (reference.factorized_conv_depthwise_decoupled(*lp, *args).double() - exact).abs().max().item()
    y = dd.factorized_conv_depthwise_decoupled(*lp, *args)
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
    from trp_kernels.triton import depthwise_decoupled as dd
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, dw, pw, b = make(8, 64, 28, 28, 64, 5, 3, 3, True, device="cuda")
    if layout == "channels_last":
        x = x.to(memory_format=CL)
    args = ([2, 2], [1, 1, 1, 1], [1, 1])
    exact = reference.factorized_conv_depthwise_decoupled(*(t.double() for t in (x, dw, pw, b)), *args)
    assert rel_err(dd.factorized_conv_depthwise_decoupled(x, dw, pw, b, *args), exact) <= 1e-5
    backend("auto")
    y = trp_kernels.depthwise_decoupled_conv(x, dw, pw, b, stride=2, padding=1)
    assert conv._last_backend["depthwise_decoupled"] in ("triton", "torch") and rel_err(y, exact) <= 1e-5
    assert y.stride() == OP(x, dw, pw, b, *args).stride()
