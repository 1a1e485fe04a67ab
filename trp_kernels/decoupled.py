"""Network-decoupling convolution op: trp_kernels::decoupled_conv.

Equals a 1 x 1 conv c -> n*r (pw_weight [n*r, c, 1, 1], at the input resolution) followed by a kh x kw conv
with groups=n (dw_weight [n, r, kh, kw]; the dense conv's stride, padding, dilation; bias): r parallel
pointwise + depthwise paths per output filter. Padding is (top, bottom, left, right) inside the op; the
public function also takes an int, an (h, w) pair, "same" or "valid".
Backward runs the two-convolution path.

It runs through the factorized convs' dispatch (trp_kernels.conv._run with kind "decoupled"): the
TRP_CONV_BACKEND setting (auto | triton | torch, same meaning), the per-signature measurement cache of auto
mode, the device guard, conv2d's autocast rule and output memory format. The Triton kernel
(trp_kernels/triton/decoupled.py) never writes the n*r-channel intermediate to memory."""
from typing import Optional

import torch
from torch import Tensor

from . import conv, geometry
from .geometry import IntPair, Padding

KIND = "decoupled"


@torch.library.custom_op("trp_kernels::decoupled_conv", mutates_args=())
def _decoupled_op(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, bias: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    # conv's dispatch: backend setting, per-signature auto measurement, device guard, output layout
    return conv._run(KIND, x, pw_weight, dw_weight, bias, stride, padding, dilation)


@_decoupled_op.register_fake
def _(x, pw_weight, dw_weight, bias, stride, padding, dilation):
    return geometry.empty_output(KIND, x, pw_weight, dw_weight, stride, padding, dilation)


conv._make_autograd(_decoupled_op, KIND)  # backward through reference.factorized_conv_decoupled
_autocast_lib = torch.library.Library("trp_kernels", "FRAGMENT")  # kept alive: owns the registrations
for _device_type in ("cpu", "cuda"):
    conv._register_autocast(_autocast_lib, "decoupled_conv", _device_type)


def _check(x, pw_weight, dw_weight, bias, stride, dilation):
    name = "decoupled_conv"
    if x.dim() != 4 or pw_weight.dim() != 4 or dw_weight.dim() != 4:
        raise ValueError(f"{name}: x, pw_weight and dw_weight must be 4-D")
    if pw_weight.shape[2:] != (1, 1) or pw_weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: pw_weight must be a 1 x 1 conv weight [n*r, {x.shape[1]}, 1, 1] for x with "
                         f"{x.shape[1]} channels, got {tuple(pw_weight.shape)}")
    n, r = dw_weight.shape[:2]
    if pw_weight.shape[0] != n * r:
        raise ValueError(f"{name}: dw_weight [n={n}, r={r}, kh, kw] needs pw_weight with n*r = {n * r} "
                         f"channels, got {pw_weight.shape[0]}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{name}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{name}: stride and dilation must be >= 1, got {stride}, {dilation}")


def decoupled_conv(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, bias: Optional[Tensor] = None,
                   stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> Tensor:
    """Network-decoupling convolution as one op: a 1 x 1 conv c -> n*r, then a kh x kw conv with groups=n.

    Equals conv2d(conv2d(x, pw_weight), dw_weight, bias, stride, padding, dilation, groups=n): r parallel
    pointwise + depthwise paths per output filter. The output is channels_last when x or a weight has
    channels_last strides (as conv2d's), else contiguous.
    TRP_CONV_BACKEND (auto | triton | torch) picks the fused Triton kernel or the two convolutions; backward
    runs the two-convolution path; under torch.onnx.export it traces as the two convolutions.

    Args:
        x: input [N, c, H, W], float32, float16, bfloat16 or float64.
        pw_weight: weight of the pointwise conv [n*r, c, 1, 1]; channel f*r + j feeds path j of filter f.
        dw_weight: weight of the grouped kh x kw conv [n, r, kh, kw] (n filters, r paths each).
        bias: None, or the output bias [n] (same dtype and device as x).
        stride: stride of the kh x kw conv: an int, or a (vertical, horizontal)
            pair of ints >= 1 (default 1).
        padding: zero padding: an int (every side), an (h, w) pair (symmetric), a (top, bottom, left, right)
            4-tuple, or "same" / "valid" as nn.Conv2d takes them ("same" needs stride 1; for an even kernel
            extent its extra row/column goes to the bottom/right, as in PyTorch). Values >= 0; default 0.
        dilation: dilation of the kh x kw conv: an int, or a (vertical, horizontal)
            pair of ints >= 1 (default 1).

    Returns:
        The output [N, n, OH, OW] in x's dtype, OH and OW as conv2d computes them.

    Raises:
        ValueError: a tensor has the wrong number of dimensions or mismatching channels
            (pw_weight [n*r, c, 1, 1] for dw_weight [n, r, kh, kw]), bias has
            the wrong shape, stride or dilation is below 1, padding is negative or malformed, or
            padding="same" comes with a stride other than 1.
        RuntimeError: TRP_CONV_BACKEND=triton and the Triton kernel cannot run this call (no triton, CPU
            tensors without TRITON_INTERPRET=1, an unsupported dtype or size); or conv2d's own errors (e.g. an
            input smaller than the dilated kernel).
    """
    stride, dilation, padding = conv._conv_args(stride, padding, dilation)
    _check(x, pw_weight, dw_weight, bias, stride, dilation)
    padding = conv._op_padding(KIND, padding, pw_weight, dw_weight, stride, dilation)
    return conv._call(KIND, _decoupled_op, x, pw_weight, dw_weight, bias, stride, padding, dilation)


__all__ = ["decoupled_conv"]
