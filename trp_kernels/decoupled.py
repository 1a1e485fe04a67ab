"""Network-decoupling convolution op: trp_kernels::decoupled_conv.

Equals a 1 x 1 conv c -> n*r (pw_weight [n*r, c, 1, 1], at the input resolution) followed by a kh x kw conv
with groups=n (dw_weight [n, r, kh, kw]; the dense conv's stride, padding, dilation; bias): r parallel
pointwise + depthwise paths per output filter. Padding is (top, bottom, left, right) inside the op; the
public function also takes an int or an (h, w) pair. Backward runs the two-convolution path.

It shares the factorized convs' machinery (trp_kernels.conv): the TRP_CONV_BACKEND setting (auto | triton
| torch, same meaning), the per-signature measurement cache of auto mode, conv2d's autocast rule and output
memory format. The Triton kernel (trp_kernels/triton/decoupled.py) never writes the n*r-channel
intermediate to memory."""
from typing import Optional

import torch
from torch import Tensor

from . import conv, geometry, reference

KIND = "decoupled"


def _tri():
    """trp_kernels.triton.decoupled, or None when triton is unavailable (conv keeps the reason)."""
    if conv._triton() is None:
        return None
    from .triton import decoupled
    return decoupled


def _measure(args, key):
    """auto mode: time the fused kernel (its first call autotunes it) against the two convolutions."""
    try:
        t_fused = conv._cuda_ms(lambda: _tri().factorized_conv_decoupled(*args), 10)
    except Exception as exc:  # a kernel that does not compile here must not break auto mode
        conv._auto_timing[key] = f"triton failed: {type(exc).__name__}: {exc}"[:300]
        return "torch"
    t_ref = conv._cuda_ms(lambda: reference.factorized_conv_decoupled(*args), 10)
    conv._auto_timing[key] = (round(t_fused, 4), round(t_ref, 4))
    return "triton" if t_fused < t_ref else "torch"


def choose_backend(x, pw_weight, dw_weight, bias, stride, padding, dilation):
    """"triton" or "torch" for this call under TRP_CONV_BACKEND (as conv.choose_backend decides)."""
    choice = conv.requested_backend()
    if choice == "torch":
        return "torch"
    out_hw = geometry.out_hw(KIND, x.shape, pw_weight.shape, dw_weight.shape, stride, padding, dilation)
    if choice == "triton":
        tri = _tri()
        if tri is None:
            raise RuntimeError(f"{conv.BACKEND_ENV}=triton but triton is unavailable: "
                               f"{conv._triton_state['error']}")
        if x.device.type != "cuda" and not tri.interpreting():
            raise RuntimeError(f"{conv.BACKEND_ENV}=triton on {x.device.type} tensors needs TRITON_INTERPRET=1 "
                               f"(set before triton is imported), or CUDA tensors")
        if min(out_hw) <= 0:
            return "torch"  # empty/invalid output: the reference raises the usual conv2d error
        why = tri.supported(x, pw_weight, dw_weight, bias, out_hw)
        if why is not None:
            raise RuntimeError(f"{conv.BACKEND_ENV}=triton: decoupled_conv not supported here: {why}")
        return "triton"
    # auto: CPU tensors never import triton
    if x.device.type != "cuda" or min(out_hw) <= 0:
        return "torch"
    tri = _tri()
    if tri is None or tri.supported(x, pw_weight, dw_weight, bias, out_hw) is not None:
        return "torch"
    args = (x, pw_weight, dw_weight, bias, stride, padding, dilation)
    key = conv._signature(KIND, *args)
    if key not in conv._auto_choice and torch.cuda.is_current_stream_capturing():
        return "torch"  # cannot time (or autotune) inside a graph capture
    return conv._measured_choice(key, lambda: _measure(args, key))


@torch.library.custom_op("trp_kernels::decoupled_conv", mutates_args=())
def _decoupled_op(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, bias: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    args = (x, pw_weight, dw_weight, bias, stride, padding, dilation)
    with conv._on_device(x.device):
        backend = choose_backend(*args)
        conv._last_backend[KIND] = backend
        fn = _tri().factorized_conv_decoupled if backend == "triton" else reference.factorized_conv_decoupled
        y = fn(*args)
    # the layout the fake kernel promises (conv2d's rule), whatever the backend gave
    return y.contiguous(memory_format=geometry.output_memory_format(x, pw_weight, dw_weight))


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


def decoupled_conv(x, pw_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1):
    """conv2d(x, pw_weight) [1 x 1, c -> n*r] then conv2d(., dw_weight, bias, stride, padding, dilation,
    groups=n) [kh x kw, n*r -> n], as one op. padding: int, (h, w) or (top, bottom, left, right)."""
    stride, dilation, padding = conv._conv_args(stride, padding, dilation)
    _check(x, pw_weight, dw_weight, bias, stride, dilation)
    return _decoupled_op(x, pw_weight, dw_weight, bias, stride, padding, dilation)


__all__ = ["decoupled_conv", "choose_backend"]
