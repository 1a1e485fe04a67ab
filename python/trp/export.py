"""ONNX export of (decomposed) models, checked in onnxruntime, and latency measured there.

    trp.export_onnx(compact, "model.onnx", (3, 32, 32))   # dynamic batch axis, verified in onnxruntime

The factorized convolutions export as the standard convolutions they equal (trp_kernels.onnx), with either
exporter: "dynamo" (torch.onnx.export(dynamo=True), needs onnxscript) or "torchscript" (the TorchScript-
based exporter). Needs the `deploy` extra: pip install "trp[deploy]" (onnx, onnxruntime, onnxscript)."""
import copy
import io
import statistics
import time
import warnings

import torch

from . import storage
from .flops import _input_shape

EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME, OUTPUT_NAME = "input", "output"


def _require(module, what):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module}: pip install 'trp[deploy]' (onnx, onnxruntime, "
                          f"onnxscript)") from exc


def check_exporter(exporter):
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    return exporter


def opset_range(exporter):
    """The ONNX opsets an exporter writes: the TorchScript-based one 7..its maximum, dynamo 18 (the opset it
    exports at; lower ones would go through a converter that may fail or fall back) .. the maximum of this
    torch.

    Args:
        exporter: "dynamo" or "torchscript".

    Returns:
        (lowest, highest).

    Raises:
        ValueError: an unknown exporter.
    """
    constants = getattr(torch.onnx, "_constants", None)
    top = getattr(constants, "ONNX_MAX_OPSET", 20)
    if check_exporter(exporter) == "torchscript":
        return 7, getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", min(top, 20))
    return 18, top


def check_opset(opset, exporter="dynamo"):
    """Checks, before any export, that the exporter writes `opset` (opset_range).

    Args:
        opset: the ONNX opset version.
        exporter: "dynamo" or "torchscript".

    Returns:
        opset.

    Raises:
        ValueError: not an int in the exporter's range (the message gives it), or an unknown exporter.
    """
    low, high = opset_range(exporter)
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset must be an int in [{low}, {high}] for the {exporter} exporter, got {opset!r}")
    return opset


def _cpu_eval_copy(model):
    """A float32 CPU copy in eval mode: what is exported (the caller's model is not touched)."""
    return copy.deepcopy(model).cpu().float().eval()


def onnx_bytes(model, input_size, dynamic_batch=True, exporter="dynamo", opset=18):
    """The serialized ONNX model of `model` (eval mode, float32, CPU) for inputs of input_size ((C, H, W) or
    (N, C, H, W)); with dynamic_batch the batch axis of the input and output is symbolic."""
    return module_bytes(model, torch.randn(_input_shape(input_size)), exporter, dynamic_batch, opset)


def module_bytes(module, x, exporter="dynamo", dynamic_batch=False, opset=18):
    """The serialized ONNX model of `module` (eval mode, float32, CPU) for the example input x."""
    check_opset(opset, exporter)
    if not isinstance(dynamic_batch, bool):
        raise ValueError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    m, x = _cpu_eval_copy(module), x.detach().cpu().float()
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if exporter == "dynamo":
            _require("onnxscript", "torch.onnx.export(dynamo=True)")
            dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            program = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes=dims, opset_version=opset,
                                        verbose=False, **names)
            return program.model_proto.SerializeToString()
        buf = io.BytesIO()
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
        torch.onnx.export(m, (x,), buf, dynamo=False, dynamic_axes=axes, opset_version=opset, **names)
        return buf.getvalue()


def fast_exporter():
    """The exporter for internal latency measurements: the TorchScript-based one while torch has it
    (about 10x faster to export than dynamo), else dynamo."""
    try:
        from torch.onnx import utils  # noqa: F401
        return "torchscript"
    except ImportError:
        return "dynamo"


def session(model_bytes, threads=None):
    """An onnxruntime CPU InferenceSession; threads: intra-op threads (None: onnxruntime's default, all
    cores)."""
    ort = _require("onnxruntime", "onnxruntime sessions")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    # idle workers do not spin between runs: a spinning pool steals the CPU from whatever runs next (another
    # session timed in alternation, the caller's own work)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def verify(model, model_bytes, input_size, batch_sizes=None, rtol=1e-4, seed=0):
    """Runs the exported model in onnxruntime and eager `model` on the same random inputs; returns
    {batch size: max |onnx - eager| / max |eager|} and raises ValueError if any exceeds rtol.
    batch_sizes: default the export's batch size, plus another one (to check a dynamic batch axis)."""
    shape = _input_shape(input_size)
    m = _cpu_eval_copy(model)
    sess = session(model_bytes, threads=1)
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for n in batch_sizes or (shape[0],):
        x = torch.randn((n, *shape[1:]), generator=gen)
        with torch.no_grad():
            ref = m(x)
        out = torch.from_numpy(sess.run(None, {INPUT_NAME: x.numpy()})[0])
        if out.shape != ref.shape:
            raise ValueError(f"onnxruntime output shape {tuple(out.shape)} != eager {tuple(ref.shape)} at "
                             f"batch {n}")
        errors[n] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    bad = {n: e for n, e in errors.items() if not e <= rtol}
    if bad:
        raise ValueError(f"the exported model differs from eager by more than rtol={rtol}: {bad}")
    return errors


def export_onnx(model, path, input_size, dynamic_batch=True, exporter="dynamo", opset=18, check=True,
                rtol=1e-4):
    """Writes `model` (dense or decomposed) as ONNX to `path` (atomically) and, with check=True, verifies it
    in onnxruntime against eager at rel. tolerance rtol (at the given batch size and, with dynamic_batch,
    another). Returns {"path", "bytes", "exporter", "dynamic_batch", "errors"}."""
    storage.check_output_file(path)
    shape = _input_shape(input_size)
    data = onnx_bytes(model, shape, dynamic_batch, exporter, opset)
    errors = None
    if check:
        batches = (shape[0], shape[0] + 2) if dynamic_batch else (shape[0],)
        errors = verify(model, data, shape, batches, rtol)
    storage.atomic_write(path, lambda f: f.write(data))
    return {"path": str(path), "bytes": len(data), "exporter": exporter, "dynamic_batch": dynamic_batch,
            "errors": errors}


def ort_runner(model_bytes, x, threads=None):
    """A no-argument callable: one onnxruntime run of the model on the tensor x."""
    sess = session(model_bytes, threads)
    feed = {INPUT_NAME: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


def ort_latency(model_bytes, input_size, threads=None, repeats=20, warmup=3):
    """Median seconds of one onnxruntime run of the model at input_size."""
    return interleaved([ort_runner(model_bytes, torch.randn(_input_shape(input_size)), threads)], repeats,
                       warmup)[0]


def compare_ort(dense, compact, input_size, threads=None, repeats=20, exporter=None):
    """Median onnxruntime latency (s) of the dense and the decomposed model at input_size, measured
    alternately in rounds so that load changes on a shared machine affect both alike."""
    exporter = exporter or fast_exporter()
    data = [onnx_bytes(m, input_size, False, exporter) for m in (dense, compact)]
    x = torch.randn(_input_shape(input_size))
    return interleaved([ort_runner(d, x, threads) for d in data], repeats)


def interleaved(fns, repeats=20, warmup=2):
    """Median seconds per call of each fn, timed in alternation (a, b, a, b, ...)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def onnxruntime_available():
    try:
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def available_exporters():
    """The exporters this installation can run (dynamo needs onnxscript)."""
    try:
        import onnxscript  # noqa: F401
        return list(EXPORTERS)
    except ImportError:
        return ["torchscript"]


__all__ = ["export_onnx", "check_opset", "opset_range",
           "onnx_bytes", "module_bytes", "fast_exporter", "verify", "session", "ort_runner", "ort_latency",
           "compare_ort", "interleaved", "EXPORTERS", "onnxruntime_available", "available_exporters"]
