"""Network-decoupling convolution in the depthwise order as one op: trp_kernels::depthwise_decoupled_conv.

Equals a kh x kw conv c -> c*r with groups=c (dw_weight [c*r, 1, kh, kw]; the dense conv's stride, padding,
dilation; no bias) followed by a 1 x 1 conv c*r -> n (pw_weight [n, c*r, 1, 1], bias): r parallel depthwise +
pointwise paths per input channel. Padding is (top, bottom, left, right) inside the op; the public function
also takes an int, an (h, w) pair, "same" or "valid". Backward runs the two-convolution path.

It runs through the factorized convs' dispatch (trp_kernels.conv._run with kind "depthwise_decoupled"): the
TRP_CONV_BACKEND setting (auto | triton | torch, same meaning), the per-signature measurement cache of auto
mode, the first-use self-check, the device guard, conv2d's autocast rule and output memory format. The Triton
kernel (trp_kernels/triton/depthwise_decoupled.py) never writes the c*r-channel intermediate to memory."""
from typing import Optional

import torch
from torch import Tensor

from . import conv, geometry
from .geometry import IntPair, Padding

KIND = "depthwise_decoupled"


@torch.library.custom_op("trp_kernels::depthwise_decoupled_conv", mutates_args=())
def _depthwise_decoupled_op(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bias: Optional[Tensor],
                            stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    # conv's dispatch: backend setting, per-signature auto measurement, device guard, output layout
    return conv._run(KIND, x, dw_weight, pw_weight, bias, stride, padding, dilation)


@_depthwise_decoupled_op.register_fake
def _(x, dw_weight, pw_weight, bias, stride, padding, dilation):
    return geometry.empty_output(KIND, x, dw_weight, pw_weight, stride, padding, dilation)


conv._make_autograd(_depthwise_decoupled_op, KIND)  # backward through the reference's two convolutions
_autocast_lib = torch.library.Library("trp_kernels", "FRAGMENT")  # kept alive: owns the registrations
for _device_type in ("cpu", "cuda"):
    conv._register_autocast(_autocast_lib, "depthwise_decoupled_conv", _device_type)


def _check(x, dw_weight, pw_weight, bias, stride, dilation):
    name = "depthwise_decoupled_conv"
    if x.dim() != 4 or dw_weight.dim() != 4 or pw_weight.dim() != 4:
        raise ValueError(f"{name}: x, dw_weight and pw_weight must be 4-D")
    c = x.shape[1]
    if dw_weight.shape[1] != 1 or dw_weight.shape[0] % c or dw_weight.shape[0] == 0:
        raise ValueError(f"{name}: dw_weight must be a depthwise conv weight [{c}*r, 1, kh, kw] for x with {c} "
                         f"channels, got {tuple(dw_weight.shape)}")
    if pw_weight.shape[1:] != (dw_weight.shape[0], 1, 1):
        raise ValueError(f"{name}: pw_weight must be a 1 x 1 conv weight [n, {dw_weight.shape[0]}, 1, 1] for "
                         f"dw_weight {tuple(dw_weight.shape)}, got {tuple(pw_weight.shape)}")
    if bias is not None and bias.shape != (pw_weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({pw_weight.shape[0]},), got {tuple(bias.shape)}")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"{name}: stride and dilation must be >= 1, got {stride}, {dilation}")


def depthwise_decoupled_conv(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bias: Optional[Tensor] = None,
                             stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> Tensor:
    """Network decoupling in the depthwise order as one op: a depthwise kh x kw conv c -> c*r, then a 1 x 1 conv.

    Equals conv2d(conv2d(x, dw_weight, None, stride, padding, dilation, groups=c), pw_weight, bias): r parallel
    depthwise + pointwise paths per input channel. The output is channels_last when x or a weight has
    channels_last strides (as conv2d's), else contiguous. TRP_CONV_BACKEND (auto | triton | torch) picks the
    fused Triton kernel or the two convolutions; backward runs the two-convolution path; under
    torch.onnx.export it traces as the two convolutions.

    Args:
        x: input [N, c, H, W], float32, float16, bfloat16 or float64.
        dw_weight: weight of the depthwise conv [c*r, 1, kh, kw]; channel j*r + l is path l of input channel j.
        pw_weight: weight of the pointwise conv [n, c*r, 1, 1].
        bias: None, or the output bias [n] (same dtype and device as x).
        stride: stride of the depthwise conv: an int, or a (vertical, horizontal) pair of ints >= 1 (default 1).
        padding: zero padding: an int (every side), an (h, w) pair (symmetric), a (top, bottom, left, right)
            4-tuple, or "same" / "valid" as nn.Conv2d takes them ("same" needs stride 1; for an even kernel
            extent its extra row/column goes to the bottom/right, as in PyTorch). Values >= 0; default 0.
        dilation: dilation of the depthwise conv: an int, or a (vertical, horizontal) pair of ints >= 1
            (default 1).

    Returns:
        The output [N, n, OH, OW] in x's dtype, OH and OW as conv2d computes them.

    Raises:
        ValueError: a tensor has the wrong number of dimensions or mismatching channels (dw_weight
            [c*r, 1, kh, kw] for x with c channels, pw_weight [n, c*r, 1, 1]), bias has the wrong shape, stride
            or dilation is below 1, padding is negative or malformed, or padding="same" comes with a stride
            other than 1.
        RuntimeError: TRP_CONV_BACKEND=triton and the Triton kernel cannot run this call (no triton, CPU
            tensors without TRITON_INTERPRET=1, an unsupported dtype or size); or conv2d's own errors (e.g. an
            input smaller than the dilated kernel).
    """
    stride, dilation, padding = conv._conv_args(stride, padding, dilation)
    _check(x, dw_weight, pw_weight, bias, stride, dilation)
    padding = conv._op_padding(KIND, padding, dw_weight, pw_weight, stride, dilation)
    return conv._call(KIND, _depthwise_decoupled_op, x, dw_weight, pw_weight, bias, stride, padding, dilation)


__all__ = ["depthwise_decoupled_conv"]
