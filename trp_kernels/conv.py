"""Factorized convolution ops: trp_kernels::factorized_conv_channel and factorized_conv_spatial.

Each equals the two nn.functional.conv2d calls it replaces. Padding is (top, bottom, left, right) inside
the op; the public functions also take an int or an (h, w) pair. Backward runs the two-convolution path."""
import torch
from torch import Tensor
from typing import Optional

from . import reference

BACKEND_ENV = "TRP_CONV_BACKEND"


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    if len(v) == 1:
        return v * 2
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _padding4(padding):
    """int -> all sides; (h, w) -> symmetric; (top, bottom, left, right) as given."""
    if isinstance(padding, int):
        p = [padding] * 4
    else:
        p = [int(i) for i in padding]
        if len(p) == 2:
            p = [p[0], p[0], p[1], p[1]]
        elif len(p) != 4:
            raise ValueError(f"padding must be an int, (h, w) or (top, bottom, left, right), got {p}")
    if min(p) < 0:
        raise ValueError(f"padding must be >= 0, got {p}")
    return p


def _check_common(name, x, w1, w2, bias, stride, dilation):
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if w1.dim() != 4 or w2.dim() != 4:
        raise ValueError(f"{name}: weights must be 4-D conv weights")
    if w1.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, first weight expects {w1.shape[1]}")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{name}: rank mismatch: first weight gives {w1.shape[0]} channels, "
                         f"second expects {w2.shape[1]}")
    if bias is not None and bias.shape != (w2.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({w2.shape[0]},), got {tuple(bias.shape)}")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{name}: stride and dilation must be >= 1, got {stride}, {dilation}")


def _run(kind, x, w1, w2, bias, stride, padding, dilation):
    fn = reference.factorized_conv_channel if kind == "channel" else reference.factorized_conv_spatial
    return fn(x, w1, w2, bias, stride, padding, dilation)


@torch.library.custom_op("trp_kernels::factorized_conv_channel", mutates_args=())
def _channel_op(x: Tensor, c_weight: Tensor, p_weight: Tensor, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _run("channel", x, c_weight, p_weight, bias, stride, padding, dilation)


@torch.library.custom_op("trp_kernels::factorized_conv_spatial", mutates_args=())
def _spatial_op(x: Tensor, v_weight: Tensor, h_weight: Tensor, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _run("spatial", x, v_weight, h_weight, bias, stride, padding, dilation)


def _out_size(size, k, s, p_lo, p_hi, d):
    return (size + p_lo + p_hi - d * (k - 1) - 1) // s + 1


@_channel_op.register_fake
def _(x, c_weight, p_weight, bias, stride, padding, dilation):
    kh, kw = c_weight.shape[2:]
    oh = _out_size(x.shape[2], kh, stride[0], padding[0], padding[1], dilation[0])
    ow = _out_size(x.shape[3], kw, stride[1], padding[2], padding[3], dilation[1])
    return x.new_empty((x.shape[0], p_weight.shape[0], oh, ow))


@_spatial_op.register_fake
def _(x, v_weight, h_weight, bias, stride, padding, dilation):
    oh = _out_size(x.shape[2], v_weight.shape[2], stride[0], padding[0], padding[1], dilation[0])
    ow = _out_size(x.shape[3], h_weight.shape[3], stride[1], padding[2], padding[3], dilation[1])
    return x.new_empty((x.shape[0], h_weight.shape[0], oh, ow))


def _make_autograd(op, kind):
    def setup_context(ctx, inputs, output):
        x, w1, w2, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(x, w1, w2, bias)
        ctx.conv_args = (stride, padding, dilation)

    def backward(ctx, grad_out):
        x, w1, w2, bias = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t is not None and need)
                  if t is not None else None
                  for t, need in zip((x, w1, w2, bias), ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            out = _run(kind, *leaves, *ctx.conv_args)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else [])
        result = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*result, None, None, None)

    op.register_autograd(backward, setup_context=setup_context)


_make_autograd(_channel_op, "channel")
_make_autograd(_spatial_op, "spatial")


def factorized_conv_channel(x, c_weight, p_weight, bias=None, stride=1, padding=0, dilation=1):
    """conv2d(x, c_weight, stride, padding, dilation) [kh x kw, c -> r] then conv2d(., p_weight, bias)
    [1 x 1, r -> n], as one op. padding: int, (h, w) or (top, bottom, left, right)."""
    stride, dilation, padding = _pair(stride, "stride"), _pair(dilation, "dilation"), _padding4(padding)
    _check_common("factorized_conv_channel", x, c_weight, p_weight, bias, stride, dilation)
    if p_weight.shape[2:] != (1, 1):
        raise ValueError("factorized_conv_channel: p_weight must be a 1 x 1 conv weight [n, r, 1, 1]")
    return _channel_op(x, c_weight, p_weight, bias, stride, padding, dilation)


def factorized_conv_spatial(x, v_weight, h_weight, bias=None, stride=1, padding=0, dilation=1):
    """conv2d with v_weight [r, c, kh, 1] then with h_weight [n, r, 1, kw] and bias, as one op.
    stride/dilation: (vertical, horizontal); padding: int, (h, w) or (top, bottom, left, right)."""
    stride, dilation, padding = _pair(stride, "stride"), _pair(dilation, "dilation"), _padding4(padding)
    _check_common("factorized_conv_spatial", x, v_weight, h_weight, bias, stride, dilation)
    if v_weight.shape[3] != 1 or h_weight.shape[2] != 1:
        raise ValueError("factorized_conv_spatial: v_weight must be [r, c, kh, 1] and h_weight [n, r, 1, kw]")
    return _spatial_op(x, v_weight, h_weight, bias, stride, padding, dilation)


def backend_info():
    return {"cpu": "torch", "cuda": "torch" if torch.cuda.is_available() else None}
