# Over 300 lines: the latency fit, its timer and the merge back to dense layers are one measurement loop.
"""Latency-aware deployment: keep a factorized layer only where it is measurably faster than the dense layer
it replaces, in the runtime the network will run in.

    fitted, fit = trp.fit_latency(compact, (3, 224, 224), runtime="onnxruntime", batch_size=1, threads=1)
    print(fit)   # per layer: MACs and measured ms, factorized vs dense, and the choice

A factorized layer that is not faster is merged back into the dense layer it equals (exactly: the dense
weight is its dense_weight(), the product of its factors), so the fitted network computes the same function
as the decomposed one and, layer by layer, never runs a slower form. Fewer MACs are not always less time:
small layers are bound by memory traffic and per-call overhead, where two thin convolutions lose to one."""
import copy
import math

import torch
import torch.nn as nn

from trp._utils import checks
from trp._utils.checks import integer, real
from trp._utils.timing import interleaved
from trp.core import eligibility
from trp.cost.flops import count_macs, io_shapes, macs_by_layer
from trp.cost.macs import dense_macs_per_output_pixel, input_shape, pays
from trp.deploy import export as export_mod
from trp.deploy.report import Report
from trp.nn.modules import FACTORIZED, FACTORIZED_TYPES, FactorizedLinear

RUNTIMES = ("eager", "onnxruntime")


def dense_layer(module):
    """The dense nn.Conv2d (or nn.Linear) that a factorized module equals, with weight dense_weight().

    Args:
        module: a factorized module (ChannelFactorizedConv2d, SpatialFactorizedConv2d, DecoupledConv2d,
            DepthwiseDecoupledConv2d or FactorizedLinear).

    Returns:
        A new nn.Linear or nn.Conv2d on the module's device and dtype, in its training mode; a conv with
        asymmetric explicit padding is nn.Sequential(nn.ZeroPad2d, nn.Conv2d).
    """
    w = module.dense_weight().detach()
    factory = {"device": w.device, "dtype": w.dtype}
    bias = module.bias
    if isinstance(module, FactorizedLinear):
        layer = nn.Linear(module.in_features, module.out_features, bias is not None, **factory)
        target = layer
    else:
        padding = module.padding  # nn.Conv2d's form: "same"/"valid", (h, w), or an asymmetric 4-tuple
        pad = None
        if isinstance(padding, tuple) and len(padding) == 4:
            top, bottom, left, right = padding
            pad, padding = nn.ZeroPad2d((left, right, top, bottom)), 0
        target = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                           module.dilation, module.groups, bias=bias is not None, **factory)
        layer = target if pad is None else nn.Sequential(pad, target)
    with torch.no_grad():
        target.weight.copy_(w)
        if bias is not None:
            target.bias.copy_(bias.detach())
    layer.train(module.training)
    return layer


def merge_back(model, names=None):
    """A copy of `model` whose factorized layers named in `names` are replaced by the dense layers they equal.

    Each merged layer is dense_layer() of the factorized one: the same function. `model` is not modified.

    Args:
        model: an nn.Module with factorized layers (e.g. the result of trp.decompose).
        names: the names of the factorized layers to merge back, an iterable of str. Default None: all.

    Returns:
        The merged deep copy of `model`.

    Raises:
        ValueError: when `names` holds a name that is not a factorized layer of the model.
    """
    factorized = {n for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    names = factorized if names is None else set(names)
    unknown = names - factorized
    if unknown:
        raise ValueError(f"merge_back: not factorized layers of the model: {sorted(unknown)}")
    out = copy.deepcopy(model)
    for name in names:
        out.set_submodule(name, dense_layer(out.get_submodule(name)))
    return out


def round_ranks(model, multiple, dense=None):
    """A copy of `model` whose factorized layers have their rank rounded up to a multiple of `multiple`.

    The rounded rank is capped at full rank. A layer whose rounded form would cost at least the dense MACs
    keeps its rank. Wider ranks fill vector units / tensor cores better (8 on AVX2 float32, tensor-core
    tiles). `model` is not modified.

    Args:
        model: an nn.Module with factorized layers (e.g. the result of trp.decompose).
        multiple: the rank multiple, an int >= 1.
        dense: the model that was decomposed; each rounded layer is refactorized by SVD from its dense layer
            of the same name (more energy kept). Default None: from the layer's own dense_weight() (same
            function, extra components zero).

    Returns:
        The rounded deep copy of `model`.

    Raises:
        ValueError: when multiple is not an int >= 1, or a layer of `dense` is not one TRP can factorize.
    """
    multiple = integer(multiple, "multiple", 1)
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if not isinstance(module, FACTORIZED_TYPES):
            continue
        target = math.ceil(module.rank / multiple) * multiple
        if target == module.rank:
            continue
        source = dense_layer(module) if dense is None else copy.deepcopy(dense.get_submodule(name))
        if isinstance(source, nn.Sequential):  # asymmetric explicit padding: refactorize the exact form
            continue
        adapter, _, why = eligibility.resolve(source)
        if adapter is None:
            raise ValueError(f"round_ranks: dense layer {name!r} is not one TRP can factorize: {why}")
        source = eligibility.dense_equivalent(source, adapter)  # transformers' Conv1D: its nn.Linear
        if isinstance(module, FactorizedLinear):
            new = FactorizedLinear.from_linear(source, rank=target)
        else:
            new = FACTORIZED[module.scheme].from_conv(source, rank=target)
        if not pays(new, dense_macs_per_output_pixel(source)) or new.rank <= module.rank:
            continue
        new = new.to(device=module.dense_weight().device)
        new.train(module.training)
        out.set_submodule(name, new)
    return out


class RuntimeTimer:
    """Times modules in one runtime: eager PyTorch on the model's device (CPU or CUDA) or onnxruntime (CPU).

    Args:
        runtime: "eager" or "onnxruntime".
        device: where eager modules run ("cpu", "cuda", a torch.device); onnxruntime needs "cpu".
        threads: intra-op threads while timing (None: the runtime's default).
        repeats: timed calls per module (their median is reported).

    Raises:
        ValueError: an unknown runtime, or onnxruntime on a device other than the CPU.
    """

    def __init__(self, runtime, device, threads, repeats):
        checks.choice(runtime, RUNTIMES, "runtime")
        self.runtime, self.device, self.threads, self.repeats = runtime, torch.device(device), threads, repeats
        if runtime == "onnxruntime" and self.device.type != "cpu":
            raise ValueError("runtime='onnxruntime' measures on the CPU: move the model to the CPU")

    def callable(self, module, x):
        """A function of no arguments that runs `module` on `x` once in this runtime.

        Args:
            module: the nn.Module to run (eager: it is put in eval mode; onnxruntime: it is exported).
            x: the input tensor.

        Returns:
            The callable; under CUDA it synchronizes the device after each call.
        """
        if self.runtime == "onnxruntime":
            return export_mod.ort_runner(export_mod.module_bytes(module, x, export_mod.fast_exporter()), x,
                                         self.threads)
        module = module.eval()
        cuda = self.device.type == "cuda"

        def run():
            with torch.no_grad():
                module(x)
            if cuda:
                torch.cuda.synchronize(self.device)
        return run

    def compare(self, modules, x):
        """Median seconds per call of each module on input x, timed in alternation.

        Args:
            modules: the nn.Modules to compare, a list.
            x: the input tensor they all take.

        Returns:
            A list of floats, the median seconds per call of each module, in the order of `modules`.
        """
        fns = [self.callable(m, x) for m in modules]
        with _threads(self.threads if self.runtime == "eager" else None):
            return interleaved(fns, self.repeats)


class _threads:
    def __init__(self, n):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(int(self.n))

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def _layer_inputs(model, shape):
    """{factorized layer name: its input shape} in one forward pass of zeros of `shape` (eval mode)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)]
    return {name: tuple(x) for name, (x, _) in io_shapes(model, layers, shape).items()}


class LatencyFit(Report):
    """Per-layer rows and totals of fit_latency (as trp.Report: rows, totals, to_dict()).

    str() is its markdown table.

    Args:
        rows: the per-layer rows, a list of dicts (fit_latency writes the keys "layer", "scheme", "rank",
            "input_shape", "macs_dense", "macs_factorized", "ms_dense", "ms_factorized" and "factorized").
        totals: the totals, a dict (runtime, device, MACs, latencies and speed-ups: see fit_latency()).
        skipped: {layer name: reason} of layers left dense. Default None: none.
    """

    def __str__(self):
        t = self.totals
        lines = [f"latency fit: {t['runtime']} on {t['device']}, threads {t['threads'] or 'default'}, input "
                 f"{'x'.join(map(str, t['input_shape']))}",
                 "| layer | rank | MACs dense | MACs factorized | ms dense | ms factorized | kept |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['layer']} | {r['rank']} | {r['macs_dense'] / 1e6:.2f}M | "
                         f"{r['macs_factorized'] / 1e6:.2f}M | {r['ms_dense']:.3f} | {r['ms_factorized']:.3f} | "
                         f"{'factorized' if r['factorized'] else 'dense'} |")
        lines.append("")
        lines.append(f"{t['layers_kept']} of {len(self.rows)} factorized layers kept; conv MACs: "
                     f"decomposed {t['mac_speedup_decomposed']:.2f}x, fitted {t['mac_speedup_fitted']:.2f}x "
                     f"fewer than dense")
        lines.append(f"latency (median): dense {t['latency_dense_s'] * 1e3:.2f} ms, decomposed "
                     f"{t['latency_decomposed_s'] * 1e3:.2f} ms ({t['speedup_decomposed']:.2f}x), fitted "
                     f"{t['latency_fitted_s'] * 1e3:.2f} ms ({t['speedup_fitted']:.2f}x)"
                     + (" - every layer merged back: the dense network was faster" if t["all_dense"] else ""))
        return "\n".join(lines)

    __repr__ = __str__


def fit_latency(model, input_size, runtime="eager", batch_size=None, threads=None, repeats=20, margin=0.02,
                multiple=None, dense=None):
    """Keeps each factorized layer of a decomposed `model` only where it is faster in `runtime`.

    Every factorized layer is timed against the dense layer it equals at its real input shape, alternately,
    `repeats` times each; it stays factorized only if its median time is below (1 - margin) x the dense
    one, else it is merged back exactly (dense_layer). Then the whole fitted network is timed against the
    dense one (every layer merged back); if it is not faster, the dense network is returned, so the result
    is never slower than dense. `model` is not modified.

    Args:
        model: the decomposed nn.Module (with factorized layers).
        input_size: (C, H, W), with batch_size, or (N, C, H, W).
        runtime: "eager" (PyTorch on the model's device, CPU or CUDA) or "onnxruntime" (ONNX Runtime on the
            CPU). Default "eager".
        batch_size: the batch size N with a (C, H, W) input_size, an int >= 1. Default None: 1.
        threads: intra-op threads while timing, an int >= 1. Default None: the runtime's default.
        repeats: timed calls per module, an int >= 1. Default 20.
        margin: a layer stays factorized only if its median time is below (1 - margin) x the dense one's;
            a float in [0, 1). Default 0.02.
        multiple: first round ranks up to this multiple (round_ranks), an int >= 1. Default None: no
            rounding.
        dense: the model that was decomposed, from which round_ranks refactorizes. Default None.

    Returns:
        (fitted model, LatencyFit): the fitted copy and its per-layer timings and totals (MACs, median
        latencies in seconds and speed-ups of the dense, decomposed and fitted networks).

    Raises:
        ValueError: when an argument is out of range, the batch size is given twice, the runtime is unknown
            or unavailable on the model's device, or no factorized layer runs at this input size.
    """
    shape = list(input_shape(input_size))
    if batch_size is not None:
        if len(tuple(input_size)) == 4:
            raise ValueError("give the batch size either in input_size (N, C, H, W) or as batch_size")
        shape[0] = integer(batch_size, "batch_size", 1)
    shape = tuple(shape)
    if threads is not None:
        integer(threads, "threads", 1)
    integer(repeats, "repeats", 1)
    real(margin, "margin", 0.0, 1.0, high_open=True)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    timer = RuntimeTimer(runtime, device, threads, repeats)
    compact = round_ranks(model, multiple, dense) if multiple is not None else copy.deepcopy(model)
    compact.eval()
    inputs = _layer_inputs(compact, shape)
    if not inputs:
        raise ValueError("fit_latency: the model has no factorized layer that runs at this input size")
    macs_f = macs_by_layer(compact, shape, linear=True)
    dense_net = merge_back(compact)
    macs_d = macs_by_layer(dense_net, shape, linear=True)
    rows, merged = [], []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, in_shape in inputs.items():
        layer = compact.get_submodule(name)
        x = torch.randn(in_shape, generator=gen).to(device=device, dtype=dtype)
        t_dense, t_fact = timer.compare([dense_layer(layer).eval(), layer], x)
        keep = t_fact < (1.0 - margin) * t_dense
        if not keep:
            merged.append(name)
        rows.append({"layer": name, "scheme": layer.scheme, "rank": layer.rank, "input_shape": list(in_shape),
                     "macs_dense": macs_d.get(name, 0), "macs_factorized": macs_f.get(name, 0),
                     "ms_dense": t_dense * 1e3, "ms_factorized": t_fact * 1e3, "factorized": keep})
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if len(merged) == len(rows):  # nothing kept: the fitted network is the dense one
        t_dense, t_comp = timer.compare([dense_net, compact], x)
        fitted, t_fit = dense_net, t_dense
    else:
        fitted = merge_back(compact, merged)
        t_dense, t_comp, t_fit = timer.compare([dense_net, compact, fitted], x)
    all_dense = not t_fit < t_dense
    if all_dense:
        fitted, t_fit = dense_net, t_dense
        for r in rows:
            r["factorized"] = False
    conv = count_macs
    totals = {"runtime": runtime, "device": str(device), "threads": threads, "input_shape": list(shape),
              "repeats": repeats, "margin": margin, "rank_multiple": multiple,
              "macs_dense": conv(dense_net, shape), "macs_decomposed": conv(compact, shape),
              "macs_fitted": conv(fitted, shape),
              "latency_dense_s": t_dense, "latency_decomposed_s": t_comp, "latency_fitted_s": t_fit,
              "speedup_decomposed": t_dense / t_comp, "speedup_fitted": t_dense / t_fit,
              "layers_kept": sum(r["factorized"] for r in rows), "all_dense": all_dense}
    totals["mac_speedup_decomposed"] = totals["macs_dense"] / totals["macs_decomposed"]
    totals["mac_speedup_fitted"] = totals["macs_dense"] / totals["macs_fitted"]
    fitted.train(model.training)
    if hasattr(model, "trp_arch"):
        fitted.trp_arch = copy.deepcopy(model.trp_arch)
    return fitted, LatencyFit(rows, totals)


__all__ = ["fit_latency", "LatencyFit", "merge_back", "dense_layer", "round_ranks", "RUNTIMES"]
