"""Cost of a network: multiply-accumulates as the paper counts them, FLOPs, parameters, measured latency.

count_macs counts the conv layers only (dense nn.Conv2d, other conv-kind layers with an adapter
(trp.eligibility) and the factorized convs), per forward pass of
`input_size`, from the shapes seen in one forward pass; the paper's speed-up is the ratio of these counts
(FC, BN and pooling ignored). With linear=True the Linear layers (and Linear-like ones with an adapter, such
as transformers' Conv1D) count too, and with attention=True the
attention matmuls (Q K^T and A V; trp.cost.attention) and the projections that an attention applies without
calling a Linear module (the packed in_proj of nn.MultiheadAttention, torchvision Swin's qkv/proj): the
count for transformers. count_flops uses torch.utils.flop_counter (so it agrees with it), with
formulas registered for the trp_kernels factorized-conv ops (decoupled_conv included)."""
import statistics

import torch
import torch.nn as nn
from torch.utils import flop_counter

import trp_kernels  # noqa: F401  (registers the torch.ops.trp_kernels ops)
from trp._utils import checks
from trp._utils.timing import call_seconds
from trp.core import eligibility
from trp.cost import attention as attention_macs
from trp.cost.macs import conv_macs, input_shape
from trp.nn.modules import (
    ChannelFactorizedConv2d,
    DecoupledConv2d,
    DepthwiseDecoupledConv2d,
    FactorizedLinear,
    SpatialFactorizedConv2d,
)


def _probe_input(model, shape):
    """A zero input of `shape` on the model's device, in its parameters' floating dtype."""
    checks.materialized(model, "input_size")
    param = next(model.parameters(), None)
    return torch.zeros(shape, device=param.device if param is not None else "cpu",
                       dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)


def _forward(model, x):
    """model(x); an error of the forward itself (an input of the wrong channel count or size) is a
    ValueError that names the input size."""
    try:
        return model(x)
    except RuntimeError as exc:
        text = str(exc).strip()
        raise ValueError(f"an input of size {tuple(x.shape)} does not run through the model (check input_size): "
                         f"{text.splitlines()[0] if text else type(exc).__name__}") from None


def io_shapes(model, layers, input_size):
    """The input and output shapes of the first call of each of `layers` in one forward pass of zeros.

    The pass runs in eval mode with no_grad (BN statistics are not touched).

    Args:
        model: the nn.Module to run.
        layers: the layers to watch, a list of (name, module) pairs (modules of `model`).
        input_size: (C, H, W) for one input, or (N, C, H, W).

    Returns:
        {name: (input shape, output shape)} as torch.Size; a layer that did not run is absent.

    Raises:
        ValueError: when input_size is malformed or does not run through the model.
    """
    shape = input_shape(input_size)
    seen = {}

    def hook_for(name):
        def hook(module, inputs, output):  # returns None: the output is not replaced
            seen.setdefault(name, (inputs[0].shape, output.shape))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, _probe_input(model, shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def macs_by_layer(model, input_size, linear=False, attention=False):
    """Multiply-adds per layer of one forward pass of zeros of `input_size`.

    Every conv layer that ran counts (and, with linear=True, every Linear layer); the pass runs in eval mode
    with no_grad (BN statistics are not touched).

    Args:
        model: the nn.Module to count.
        input_size: (C, H, W) for one input, (N, C, H, W), or an example input tensor (e.g. tokens [N, L, E]
            for an encoder).
        linear: count the Linear layers (and Linear-like ones with an adapter) too. Default False.
        attention: add "<attention>.attention" (its matmuls Q K^T and A V) per attention module and, with
            linear=True, the projections an attention module applies itself. Default False.

    Returns:
        {module name: multiply-adds (int)} for every counted layer that ran.

    Raises:
        ValueError: when input_size is malformed or does not run through the model.
    """
    example = input_size if isinstance(input_size, torch.Tensor) else None
    shape = None if example is not None else input_shape(input_size)
    conv_types = (nn.Conv2d, ChannelFactorizedConv2d, SpatialFactorizedConv2d, DecoupledConv2d,
                  DepthwiseDecoupledConv2d)
    inside_factorized_linear = {id(m.first) for m in model.modules() if isinstance(m, FactorizedLinear)} | \
        {id(m.second) for m in model.modules() if isinstance(m, FactorizedLinear)}
    counts, handles = {}, []

    def hook_for(name):
        def hook(module, inputs, output):
            if is_linear(module):  # tokens x in x out, whatever the weight's layout (Conv1D: [in, out])
                macs = inputs[0].numel() * output.shape[-1]
            else:
                macs = conv_macs(module, inputs[0], output)
            counts[name] = counts.get(name, 0) + int(macs)
        return hook

    def attention_hook_for(name):
        def hook(module, args, kwargs, output):
            for key, macs in attention_macs.attention_macs(module, args, kwargs, linear).items():
                key = f"{name}.{key}" if name else key
                counts[key] = counts.get(key, 0) + int(macs)
        return hook

    def is_linear(module):
        return isinstance(module, nn.Linear) or eligibility.kind_of(module) == "linear"

    for name, module in model.named_modules():
        if isinstance(module, conv_types) or eligibility.kind_of(module) == "conv" or (linear and is_linear(module)):
            if isinstance(module, nn.Linear) and id(module) in inside_factorized_linear:
                name = name.rsplit(".", 1)[0]  # report a FactorizedLinear under its own name
            handles.append(module.register_forward_hook(hook_for(name)))
        elif attention and attention_macs.is_attention(module):
            handles.append(module.register_forward_hook(attention_hook_for(name), with_kwargs=True))
    x = example if example is not None else _probe_input(model, shape)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts


def count_macs(model, input_size, linear=False, attention=False):
    """Conv multiply-accumulates of one forward pass at `input_size`, as the paper counts them.

    Args:
        model: the nn.Module to count.
        input_size: (C, H, W) for one image, (N, C, H, W), or an example input tensor.
        linear: add the Linear layers (and Linear-like ones with an adapter). Default False.
        attention: add the attention matmuls (and the projections attention modules apply themselves).
            Default False.

    Returns:
        The total multiply-accumulates, an int (the sum of macs_by_layer).

    Raises:
        ValueError: when input_size is malformed or does not run through the model.
    """
    return sum(macs_by_layer(model, input_size, linear, attention).values())


def _register_flop_formulas():
    """Flop formulas for the trp_kernels factorized convs: 2 * the MACs of their two convolutions."""
    conv = flop_counter.conv_flop_count

    def channel(x_shape, c_shape, p_shape, bias, stride, padding, dilation, *args, out_shape=None, **kw):
        mid = [x_shape[0], c_shape[0], out_shape[2], out_shape[3]]
        return conv(x_shape, c_shape, mid) + conv(mid, p_shape, out_shape)

    def spatial(x_shape, v_shape, h_shape, bias, stride, padding, dilation, *args, out_shape=None, **kw):
        mid = [x_shape[0], v_shape[0], out_shape[2], x_shape[3]]  # kh x 1 conv: full input width
        return conv(x_shape, v_shape, mid) + conv(mid, h_shape, out_shape)

    def decoupled(x_shape, pw_shape, dw_shape, bias, stride, padding, dilation, *args, out_shape=None, **kw):
        mid = [x_shape[0], pw_shape[0], x_shape[2], x_shape[3]]  # 1 x 1 conv: input resolution
        return conv(x_shape, pw_shape, mid) + conv(mid, dw_shape, out_shape)  # grouped: dw_shape[1] = r

    for target, formula in ((torch.ops.trp_kernels.factorized_conv_channel, channel),
                            (torch.ops.trp_kernels.factorized_conv_spatial, spatial),
                            (torch.ops.trp_kernels.decoupled_conv, decoupled)):
        if target not in flop_counter.flop_registry:  # another module may have registered it already
            flop_counter.register_flop_formula(target)(formula)


_register_flop_formulas()


def count_flops(model, input_size):
    """Floating-point operations (2 x multiply-adds of convs, matmuls, ...) of one forward pass.

    Counted by torch.utils.flop_counter.FlopCounterMode on an input of zeros, in eval mode with no_grad.

    Args:
        model: the nn.Module to count.
        input_size: (C, H, W) for one input, or (N, C, H, W).

    Returns:
        The total FLOPs, an int.

    Raises:
        ValueError: when input_size is malformed or does not run through the model.
    """
    shape = input_shape(input_size)
    x = _probe_input(model, shape)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
            _forward(model, x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model, trainable_only=False):
    """Number of parameters (shared ones counted once).

    Args:
        model: the nn.Module to count.
        trainable_only: count only the parameters with requires_grad=True. Default False.

    Returns:
        The number of scalar parameters, an int.
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def measure_latency(model, input_size, warmup=10, repeats=50, device=None):
    """Median wall-clock seconds of one forward pass (eval mode, no_grad) on `device` (default: the
    model's), after one unmeasured call (whose errors name the input size) and `warmup` more. CUDA is timed
    with CUDA events after a synchronize; CPU with perf_counter.

    Args:
        model: the nn.Module.
        input_size: (C, H, W) or (N, C, H, W); the input is random normal in the model's floating dtype.
        warmup: unmeasured calls before timing, an int >= 0. Default 10.
        repeats: timed calls, an int >= 1. Default 50.
        device: where to time, a torch.device or str. Default None: the model's (it must be there).

    Returns:
        The median seconds per call, a float.

    Raises:
        ValueError: bad arguments, a model on another device or on the meta device, or an input size that
            does not run through the model.
    """
    shape = input_shape(input_size)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None
                                                               else torch.device("cpu"))
    if param is not None and param.device != device:
        raise ValueError(f"the model is on {param.device}, not on device={device}; move it first")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    checks.materialized(model, "measure_latency")
    x = torch.randn(shape, device=device, dtype=dtype)
    was_training = model.training
    times = []
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, x)  # one more warm-up call, whose errors name the input size
            for _ in range(warmup):
                model(x)
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
            times = [call_seconds(lambda: model(x), cuda) for _ in range(repeats)]
    finally:
        model.train(was_training)
    return statistics.median(times)


__all__ = ["count_macs", "count_flops", "count_params", "measure_latency", "macs_by_layer"]
