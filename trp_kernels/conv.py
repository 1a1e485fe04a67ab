"""Factorized convolution ops: trp_kernels::factorized_conv_channel and factorized_conv_spatial.

Each equals the two nn.functional.conv2d calls it replaces. Padding is (top, bottom, left, right) inside
the op; the public functions also take an int, an (h, w) pair, "same" or "valid". Backward runs the
two-convolution path. Like conv2d, every backend returns channels_last output when the input (or a weight)
has channels_last strides (trp_kernels.geometry.output_memory_format, which the fake kernels follow too), and
under torch.autocast the inputs are cast to the region's dtype (float64 excepted), as conv2d's are. While
torch.onnx.export traces a model they run as the convolutions they equal (trp_kernels.onnx).

Backends (env TRP_CONV_BACKEND, read at every call):
- auto (default): CUDA tensors run the fused Triton kernel when it supports the call and, for that exact
  call signature (shapes, strides, dtype, conv parameters), a one-time measurement in this process found it
  faster than the two cuDNN convolutions; otherwise the two convolutions. CPU tensors: two convolutions
  (oneDNN), called directly in eager mode (see _call). While a CUDA graph is being captured nothing is
  measured: an unmeasured shape runs two convs.
- triton: always the Triton kernel; on CPU tensors only under TRITON_INTERPRET=1, else RuntimeError.
- torch: always the two convolutions (the reference).

The Triton kernels check themselves on first use per call signature and tile configuration (against the float64
reference, trp_kernels/selfcheck.py): one that disagrees is not used again on that device in this process."""
import contextlib
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from . import geometry, onnx, probes, reference, selfcheck
from .geometry import IntPair, Padding

BACKEND_ENV = "TRP_CONV_BACKEND"
BACKENDS = ("auto", "triton", "torch")


def _conv_args(stride, padding, dilation):
    """The op's list arguments: stride and dilation pairs, padding (top, bottom, left, right). A padding
    string ("same", "valid") is kept as it is: it needs the kernel size, see _op_padding."""
    return (list(geometry.pair(stride, "stride")), list(geometry.pair(dilation, "dilation")),
            padding if isinstance(padding, str) else list(geometry.padding4(padding)))


def _op_padding(kind, padding, w1, w2, stride, dilation):
    """(top, bottom, left, right) of an op's checked arguments, resolving "same" / "valid" (as nn.Conv2d,
    with the kernel size of the dense conv the weights replace)."""
    if isinstance(padding, str):
        return list(geometry.resolve_padding(padding, geometry.kernel_hw(kind, w1.shape, w2.shape), dilation,
                                             stride))
    return padding


def _call(kind, op, x, w1, w2, bias, stride, padding, dilation):
    """The custom op; while torch.onnx.export traces the model, the convolutions it equals (onnx.py); and in eager
    mode on CPU tensors, where the op would choose them too (TRP_CONV_BACKEND auto or torch), the two
    convolutions called directly: the op's dispatch costs tens of microseconds per call, as much as a small
    layer's two convolutions at batch 1 (measured), which a deployed model would pay at every layer. Autograd
    and autocast are conv2d's own there, which the op's registrations reproduce."""
    if onnx.exporting():
        return onnx.lowered(kind, x, w1, w2, bias, stride, padding, dilation)
    if _eager_cpu(x, w1, w2, bias):
        _last_backend[kind] = "torch"
        y = getattr(reference, f"factorized_conv_{kind}")(x, w1, w2, bias, stride, padding, dilation)
        return y.contiguous(memory_format=geometry.output_memory_format(x, w1, w2))
    return op(x, w1, w2, bias, stride, padding, dilation)


def _eager_cpu(x, w1, w2, bias):
    """Whether a call may skip the op: every tensor on the CPU, not being compiled, and a backend setting that
    runs the two convolutions there (the triton setting runs the interpreter on CPU tensors)."""
    return (all(t.device.type == "cpu" for t in (x, w1, w2) + ((bias,) if bias is not None else ()))
            and not torch.compiler.is_compiling() and requested_backend() != "triton")


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


def requested_backend() -> str:
    """The TRP_CONV_BACKEND setting, read from the environment at every call.

    Returns:
        "auto" (default), "triton" or "torch".

    Raises:
        ValueError: the variable holds another value.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


_triton_state = {"module": None, "error": None, "tried": False}


def _triton():
    """trp_kernels.triton, imported on first use (None, with the error kept, when triton is missing)."""
    if not _triton_state["tried"]:
        _triton_state["tried"] = True
        try:
            from . import triton as mod
            _triton_state["module"] = mod
        except Exception as exc:  # triton absent or broken: the two-conv path still works
            _triton_state["error"] = f"{type(exc).__name__}: {exc}"
    return _triton_state["module"]


_auto_choice = {}       # call signature -> "triton" | "torch", measured once per process
_auto_timing = {}       # call signature -> (triton ms, torch ms) or the error that excluded Triton
# Serialises measure-and-store: threads sharing a model must not time (and autotune) the same signature
# at once; timing two signatures concurrently would also disturb both measurements.
_auto_lock = threading.Lock()
_last_backend = {"channel": None, "spatial": None, "decoupled": None, "depthwise_decoupled": None}


def _on_device(device):
    """Makes a CUDA tensor's device current: Triton launches, autotuning and CUDA-event timing all use the
    current device, which need not be the tensor's (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _measured_choice(key, measure):
    """The cached choice for key; on a miss, measure() runs once per process however many threads ask."""
    hit = _auto_choice.get(key)
    if hit is None:
        with _auto_lock:
            hit = _auto_choice.get(key)
            if hit is None:
                hit = _auto_choice[key] = measure()
    return hit


def _signature(kind, x, w1, w2, bias, stride, padding, dilation):
    return (kind, str(x.device), str(x.dtype), tuple(x.shape), tuple(x.stride()), tuple(w1.shape),
            tuple(w2.shape), bias is not None, tuple(stride), tuple(padding), tuple(dilation))


def _cuda_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def _measure(kind, args, key):
    """Time the fused kernel (its first call also autotunes it) against the two convolutions."""
    tri = _triton()
    fused = getattr(tri, f"factorized_conv_{kind}")
    ref = getattr(reference, f"factorized_conv_{kind}")
    try:
        t_fused = _cuda_ms(lambda: fused(*args), 10)
    except Exception as exc:  # a kernel that does not compile here must not break auto mode
        _auto_timing[key] = f"triton failed: {type(exc).__name__}: {exc}"[:300]
        return "torch"
    t_ref = _cuda_ms(lambda: ref(*args), 10)
    _auto_timing[key] = (round(t_fused, 4), round(t_ref, 4))
    return "triton" if t_fused < t_ref else "torch"


def choose_backend(kind: str, x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], stride: list[int],
                   padding: list[int], dilation: list[int]) -> str:
    """The backend of one call under the current TRP_CONV_BACKEND (may measure, see the module docstring).

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x: the input [N, c, H, W].
        w1: the first weight.
        w2: the second weight.
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride.
        padding: (top, bottom, left, right) zero padding.
        dilation: (vertical, horizontal) dilation.

    Returns:
        "triton" or "torch".

    Raises:
        ValueError: TRP_CONV_BACKEND holds an invalid value.
        RuntimeError: TRP_CONV_BACKEND=triton and the Triton kernel cannot run this call.
    """
    choice = requested_backend()
    if choice == "torch":
        return "torch"
    out_hw = geometry.out_hw(kind, x.shape, w1.shape, w2.shape, stride, padding, dilation)
    if choice == "triton":
        tri = _triton()
        if tri is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is unavailable: {_triton_state['error']}")
        if x.device.type != "cuda" and not tri.interpreting():
            raise RuntimeError(f"{BACKEND_ENV}=triton on {x.device.type} tensors needs TRITON_INTERPRET=1 "
                               f"(set before triton is imported), or CUDA tensors")
        if min(out_hw) <= 0:
            return "torch"  # empty/invalid output: the reference raises the usual conv2d error
        why = tri.supported(kind, x, w1, w2, bias, out_hw)
        if why is not None:
            raise RuntimeError(f"{BACKEND_ENV}=triton: factorized_conv_{kind} not supported here: {why}")
        return "triton"
    # auto (CPU tensors never import triton)
    if x.device.type != "cuda" or min(out_hw) <= 0:
        return "torch"
    tri = _triton()
    if tri is None:
        return "torch"
    if tri.supported(kind, x, w1, w2, bias, out_hw) is not None:
        return "torch"
    key = _signature(kind, x, w1, w2, bias, stride, padding, dilation)
    if key not in _auto_choice and torch.cuda.is_current_stream_capturing():
        return "torch"  # cannot time (or autotune) inside a graph capture
    return _measured_choice(key, lambda: _measure(kind, (x, w1, w2, bias, stride, padding, dilation), key))


def _self_checked(kind, y, args):
    """Whether the fused kernel's output y for this call may be used: its first use per signature and tile
    configuration is compared with the float64 reference (trp_kernels/selfcheck.py, probes.convolution)."""
    x = args[0]
    if not selfcheck.applies(x.device):
        return True
    signature = (*_signature(kind, *args)[2:], _triton().last_config(kind))
    return selfcheck.verify(f"triton_{kind}", x.device, signature, lambda: probes.convolution(kind, y, *args))


def _run(kind, x, w1, w2, bias, stride, padding, dilation):
    args = (x, w1, w2, bias, stride, padding, dilation)
    # the measurement (with its autotuning) and the launch both run on x's device
    with _on_device(x.device):
        backend = choose_backend(kind, *args)
        if backend == "triton" and not selfcheck.usable(f"triton_{kind}", x.device):
            backend = "torch"  # failed its self-check earlier in this process
        y = getattr(_triton(), f"factorized_conv_{kind}")(*args) if backend == "triton" else None
        if y is not None and not _self_checked(kind, y, args):
            backend, y = "torch", None
        _last_backend[kind] = backend
        if y is None:
            y = getattr(reference, f"factorized_conv_{kind}")(*args)
    # conv2d may pick another layout than the rule in corner cases (ambiguous strides): the fake kernel
    # promises geometry.output_memory_format, so every backend returns it (a no-op when it already is)
    return y.contiguous(memory_format=geometry.output_memory_format(x, w1, w2))


@torch.library.custom_op("trp_kernels::factorized_conv_channel", mutates_args=())
def _channel_op(x: Tensor, c_weight: Tensor, p_weight: Tensor, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _run("channel", x, c_weight, p_weight, bias, stride, padding, dilation)


@torch.library.custom_op("trp_kernels::factorized_conv_spatial", mutates_args=())
def _spatial_op(x: Tensor, v_weight: Tensor, h_weight: Tensor, bias: Optional[Tensor],
                stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    return _run("spatial", x, v_weight, h_weight, bias, stride, padding, dilation)


@_channel_op.register_fake
def _(x, c_weight, p_weight, bias, stride, padding, dilation):
    return geometry.empty_output("channel", x, c_weight, p_weight, stride, padding, dilation)


@_spatial_op.register_fake
def _(x, v_weight, h_weight, bias, stride, padding, dilation):
    return geometry.empty_output("spatial", x, v_weight, h_weight, stride, padding, dilation)


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
            out = getattr(reference, f"factorized_conv_{kind}")(*leaves, *ctx.conv_args)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else [])
        result = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*result, None, None, None)

    op.register_autograd(backward, setup_context=setup_context)


_make_autograd(_channel_op, "channel")
_make_autograd(_spatial_op, "spatial")


def _register_autocast(lib, name, device_type):
    """conv2d's autocast rule (a lower-precision op) for one op and device type: in an autocast region the
    op's floating-point tensors on that device type (float64 excepted) are cast to the region's dtype and
    the op runs with autocast off, so eager, fake and every backend agree with the two convolutions.
    torch.library.register_autocast would cast to one fixed dtype, not to the region's (e.g. bfloat16 on
    CUDA), hence this kernel; it is what that function registers otherwise."""
    key = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type]
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(torch.ops.trp_kernels, name).default

    def cast(t, dtype):
        eligible = (isinstance(t, Tensor) and t.is_floating_point() and t.device.type == device_type
                    and t.dtype != torch.float64)
        return t.to(dtype) if eligible else t

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(cast(a, dtype) for a in args))

    lib.impl(name, kernel, key, with_keyset=True)


_autocast_lib = torch.library.Library("trp_kernels", "FRAGMENT")  # kept alive: owns the registrations
for _name in ("factorized_conv_channel", "factorized_conv_spatial"):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_autocast_lib, _name, _device_type)


def factorized_conv_channel(x: Tensor, c_weight: Tensor, p_weight: Tensor, bias: Optional[Tensor] = None,
                            stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> Tensor:
    """Channel-bottleneck convolution as one op: a kh x kw conv c -> r, then a 1 x 1 conv r -> n with bias.

    Equals conv2d(conv2d(x, c_weight, None, stride, padding, dilation), p_weight, bias). The output is
    channels_last when x or a weight has channels_last strides (as conv2d's), else contiguous.
    TRP_CONV_BACKEND (auto | triton | torch) picks the fused Triton kernel or the two convolutions; backward
    runs the two-convolution path; under torch.onnx.export it traces as the two convolutions.

    Args:
        x: input [N, c, H, W], float32, float16, bfloat16 or float64.
        c_weight: weight of the kh x kw conv [r, c, kh, kw] (r: the rank).
        p_weight: weight of the 1 x 1 conv [n, r, 1, 1].
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
            (c_weight [r, c, kh, kw], p_weight [n, r, 1, 1]), bias has
            the wrong shape, stride or dilation is below 1, padding is negative or malformed, or
            padding="same" comes with a stride other than 1.
        RuntimeError: TRP_CONV_BACKEND=triton and the Triton kernel cannot run this call (no triton, CPU
            tensors without TRITON_INTERPRET=1, an unsupported dtype or size); or conv2d's own errors (e.g. an
            input smaller than the dilated kernel).
    """
    stride, dilation, padding = _conv_args(stride, padding, dilation)
    _check_common("factorized_conv_channel", x, c_weight, p_weight, bias, stride, dilation)
    if p_weight.shape[2:] != (1, 1):
        raise ValueError("factorized_conv_channel: p_weight must be a 1 x 1 conv weight [n, r, 1, 1]")
    padding = _op_padding("channel", padding, c_weight, p_weight, stride, dilation)
    return _call("channel", _channel_op, x, c_weight, p_weight, bias, stride, padding, dilation)


def factorized_conv_spatial(x: Tensor, v_weight: Tensor, h_weight: Tensor, bias: Optional[Tensor] = None,
                            stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1) -> Tensor:
    """Spatial-separable convolution as one op: a kh x 1 conv c -> r, then a 1 x kw conv r -> n with bias.

    The vertical parts of stride, padding and dilation apply to the kh x 1 conv, the horizontal parts to the
    1 x kw conv, so the result equals the dense kh x kw conv with the product weight. The output is
    channels_last when x or a weight has channels_last strides (as conv2d's), else contiguous.
    TRP_CONV_BACKEND (auto | triton | torch) picks the fused Triton kernel or the two convolutions; backward
    runs the two-convolution path; under torch.onnx.export it traces as the two convolutions.

    Args:
        x: input [N, c, H, W], float32, float16, bfloat16 or float64.
        v_weight: weight of the vertical conv [r, c, kh, 1] (r: the rank).
        h_weight: weight of the horizontal conv [n, r, 1, kw].
        bias: None, or the output bias [n] (same dtype and device as x).
        stride: stride of the dense kh x kw conv: an int, or a (vertical, horizontal)
            pair of ints >= 1 (default 1).
        padding: zero padding: an int (every side), an (h, w) pair (symmetric), a (top, bottom, left, right)
            4-tuple, or "same" / "valid" as nn.Conv2d takes them ("same" needs stride 1; for an even kernel
            extent its extra row/column goes to the bottom/right, as in PyTorch). Values >= 0; default 0.
        dilation: dilation of the dense kh x kw conv: an int, or a (vertical, horizontal)
            pair of ints >= 1 (default 1).

    Returns:
        The output [N, n, OH, OW] in x's dtype, OH and OW as the dense kh x kw conv2d computes them.

    Raises:
        ValueError: a tensor has the wrong number of dimensions or mismatching channels
            (v_weight [r, c, kh, 1], h_weight [n, r, 1, kw]), bias has
            the wrong shape, stride or dilation is below 1, padding is negative or malformed, or
            padding="same" comes with a stride other than 1.
        RuntimeError: TRP_CONV_BACKEND=triton and the Triton kernel cannot run this call (no triton, CPU
            tensors without TRITON_INTERPRET=1, an unsupported dtype or size); or conv2d's own errors (e.g. an
            input smaller than the dilated kernel).
    """
    stride, dilation, padding = _conv_args(stride, padding, dilation)
    _check_common("factorized_conv_spatial", x, v_weight, h_weight, bias, stride, dilation)
    if v_weight.shape[3] != 1 or h_weight.shape[2] != 1:
        raise ValueError("factorized_conv_spatial: v_weight must be [r, c, kh, 1] and h_weight [n, r, 1, kw]")
    padding = _op_padding("spatial", padding, v_weight, h_weight, stride, dilation)
    return _call("spatial", _spatial_op, x, v_weight, h_weight, bias, stride, padding, dilation)


def backend_info() -> dict:
    """What the factorized convolutions run: the setting, the plan per device and this process's choices.

    Returns:
        A dict: "setting" (TRP_CONV_BACKEND), "cpu" and "cuda" (the plan per device type, "cuda" None without
            a CUDA device), "triton_available", "triton_error", "triton_interpret", "triton_autotune", "last" (the
            last backend each op used) and "auto_choices" (per call signature, the backend auto mode chose and its
            measured milliseconds, fused vs two convolutions).
    """
    try:
        setting = requested_backend()
    except ValueError as exc:
        setting = f"invalid: {exc}"
    tri = _triton()
    interp = bool(tri is not None and tri.interpreting())
    with _auto_lock:  # a snapshot: another thread may be adding a measurement
        choices = list(_auto_choice.items())
    if setting == "triton":
        cpu = "triton (interpreter)" if interp else "error: needs TRITON_INTERPRET=1"
        cuda = "triton"
    elif setting == "torch":
        cpu, cuda = "torch (two convs)", "torch (two cuDNN convs)"
    else:
        cpu = "torch (two convs, oneDNN)"
        cuda = ("auto: fused Triton where measured faster per shape, else two cuDNN convs"
                if tri is not None else "torch (two cuDNN convs; triton unavailable)")
    return {
        "setting": setting,
        "cpu": cpu,
        "cuda": cuda if torch.cuda.is_available() else None,
        "triton_available": tri is not None,
        "triton_error": _triton_state["error"],
        "triton_interpret": interp,
        "triton_autotune": os.environ.get("TRP_TRITON_AUTOTUNE", "full"),
        "last": dict(_last_backend),
        "auto_choices": [{"signature": list(k), "backend": v, "ms_fused_vs_torch": _auto_timing.get(k)}
                         for k, v in choices],
    }
