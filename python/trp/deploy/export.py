# Over 300 lines: ONNX export, its verification and onnxruntime runs share the exporter plumbing.
"""ONNX export of (decomposed) models, checked in onnxruntime, and latency measured there.

    trp.export_onnx(compact, "model.onnx", (3, 32, 32))   # dynamic batch axis, verified in onnxruntime
    trp.export_onnx(lm, "lm.onnx", (2, 16), vocab_size=lm.config.vocab_size)   # token ids in, logits out

The factorized convolutions export as the standard convolutions they equal (trp_kernels.onnx), with either
exporter: "dynamo" (torch.onnx.export(dynamo=True), needs onnxscript) or "torchscript" (the TorchScript-
based exporter). Needs the `deploy` extra: pip install "trp[deploy]" (onnx, onnxruntime, onnxscript)."""
import copy
import dataclasses
import inspect
import io
import warnings
from collections.abc import Mapping

import torch
import torch.nn as nn

from trp._utils import checks, storage
from trp._utils.timing import interleaved
from trp.cost.macs import input_shape

EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME, OUTPUT_NAME = "input", "output"
BATCH_AXIS = "batch"


def _require(module, what):
    try:
        return __import__(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module}: pip install 'trp[deploy]' (onnx, onnxruntime, "
                          f"onnxscript)") from exc


def check_exporter(exporter):
    """Checks an exporter name.

    Args:
        exporter: "dynamo" or "torchscript".

    Returns:
        The exporter name.

    Raises:
        ValueError: when exporter is not one of EXPORTERS.
    """
    return checks.choice(exporter, EXPORTERS, "exporter")


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


def check_vocab_size(vocab_size):
    """Checks export_onnx's vocab_size: None (float inputs) or an int >= 1 (token-id inputs).

    Args:
        vocab_size: the value to check.

    Returns:
        vocab_size.

    Raises:
        ValueError: neither None nor an int >= 1.
    """
    if vocab_size is not None:
        checks.integer(vocab_size, "vocab_size", 1, what=" (token ids are drawn from [0, vocab_size))")
    return vocab_size


def example_shape(input_size, vocab_size=None):
    """The shape of the exported model's input: input_shape(input_size) for float inputs; with vocab_size,
    token ids: (L,) or (N, L), as (N, L).

    Args:
        input_size: (C, H, W) or (N, C, H, W); with vocab_size (L,) or (N, L).
        vocab_size: None (float inputs) or the vocabulary size (token-id inputs).

    Returns:
        The shape, a tuple of ints with the batch size first.

    Raises:
        ValueError: a malformed input_size or vocab_size.
    """
    if check_vocab_size(vocab_size) is None:
        return input_shape(input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 1:
        shape = (1,) + shape
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"with vocab_size, input_size must be (L,) or (N, L) token ids with positive sizes, got "
                         f"{input_size}")
    return shape


def example_input(shape, vocab_size=None, generator=None):
    """A random input of `shape`: standard normal floats, or with vocab_size token ids (int64) drawn
    uniformly from [0, vocab_size).

    Args:
        shape: the input's shape.
        vocab_size: None (float inputs) or the vocabulary size (token-id inputs).
        generator: the torch.Generator to draw from. Default None: the global one.

    Returns:
        The tensor.
    """
    if vocab_size is None:
        return torch.randn(shape, generator=generator)
    return torch.randint(0, vocab_size, shape, generator=generator)


def _cpu_eval_copy(model):
    """A float32 CPU copy in eval mode: what is exported (the caller's model is not touched)."""
    return copy.deepcopy(model).cpu().float().eval()


def output_leaves(out, name=OUTPUT_NAME):
    """The tensors of a model's output, in order, each with its ONNX output name: [(name, tensor)].

    A tensor is one output named `name`; a dict (also a Hugging Face ModelOutput or another Mapping) gives its
    values in insertion order, named name.KEY; a tuple or list its items, name.INDEX (a namedtuple's
    name.FIELD); a dataclass its fields, name.FIELD; nested containers nest the names. None is left out (the
    exporters drop it as well; a ModelOutput holds no None). This is the order of torch.utils._pytree and of
    both exporters.

    Args:
        out: the model's output: a tensor, or a (nested) container of tensors.
        name: the name of the output (the prefix of the leaves' names). Default OUTPUT_NAME ("output").

    Returns:
        [(name, tensor)] of every tensor leaf, in order.

    Raises:
        ValueError: a leaf that is neither a tensor nor None (ONNX outputs are tensors), or no tensor at all.
    """
    leaves = []

    def visit(obj, path):
        if isinstance(obj, torch.Tensor):
            leaves.append((path, obj))
        elif obj is None:
            return
        elif isinstance(obj, Mapping):
            for key, value in obj.items():
                visit(value, f"{path}.{key}")
        elif isinstance(obj, (tuple, list)):
            keys = obj._fields if isinstance(obj, tuple) and hasattr(obj, "_fields") else range(len(obj))
            for key, value in zip(keys, obj):
                visit(value, f"{path}.{key}")
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for field in dataclasses.fields(obj):
                visit(getattr(obj, field.name), f"{path}.{field.name}")
        else:
            hint = ""
            if type(obj).__name__.endswith("Cache"):  # transformers' KV caches (DynamicCache, ...)
                hint = "; a Hugging Face model returns its KV cache unless model.config.use_cache = False"
            raise ValueError(f"export_onnx: the model's output {path} is a {type(obj).__name__}; ONNX outputs "
                             "are tensors (dicts, tuples, lists, dataclasses and ModelOutputs of tensors or None "
                             f"are flattened){hint}")

    visit(out, name)
    if not leaves:
        raise ValueError(f"export_onnx: the model's output holds no tensor (got {type(out).__name__})")
    names = [n for n, _ in leaves]
    if len(set(names)) != len(names):
        raise ValueError(f"export_onnx: the model's output has leaves of the same name ({', '.join(names)}): "
                         "keys such as 1 and '1' in one dict")
    return leaves


class _FlatOutputs(nn.Module):
    """The model with its output flattened to the tuple of its tensors (output_leaves' order), what the
    exporters are given when the output is not one tensor: each ONNX output is then one leaf, by position and
    by name, whatever container the model returns (a ModelOutput or a dataclass that torch.export's pytree
    does not know included)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(t for _, t in output_leaves(self.model(x)))


def _check_single_input(model):
    """ValueError before any work when model.forward needs more than the one input tensor export_onnx feeds."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no introspectable signature: the probe forward decides
        return
    required = [p.name for p in params if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(required) > 1 or not positional:
        raise ValueError(f"export_onnx exports a model called as model(x) with one input tensor; "
                         f"{type(model).__name__}.forward takes ({', '.join(p.name for p in params)}). Wrap it "
                         "in an nn.Module whose forward takes that one tensor and supplies the rest (several "
                         "or keyword inputs are not supported)")


class _OutputSpec:
    """What one eager forward tells about a model's output before the export: its leaves' names (output_leaves)
    and which of them carry the batch axis (axis 0 follows the input's batch size: made dynamic with
    dynamic_batch). single: whether the output is one tensor (exported as is) or a container (_FlatOutputs)."""

    def __init__(self, model, x, dynamic_batch):
        _check_single_input(model)
        kind = "float32" if x.is_floating_point() else f"{str(x.dtype).removeprefix('torch.')} (token ids)"
        sizes = (x.shape[0], x.shape[0] + 1) if dynamic_batch else (x.shape[0],)
        runs = []
        for n in sizes:
            xn = x if n == x.shape[0] else torch.cat([x, x[:1]])
            try:
                with torch.no_grad():
                    out = model(xn)
            except Exception as exc:
                raise ValueError(f"export_onnx: the model fails on one {kind} input of shape {tuple(xn.shape)} "
                                 f"({type(exc).__name__}: {exc}). export_onnx calls model(x) with one float "
                                 "tensor of input_size, or with vocab_size= one tensor of token ids; a model that "
                                 "takes several inputs or keyword inputs needs a wrapper module whose forward "
                                 "takes that one tensor") from exc
            runs.append(output_leaves(out))
        self.single = isinstance(out, torch.Tensor)
        self.names = [n for n, _ in runs[0]]
        if any([n for n, _ in r] != self.names for r in runs):
            raise ValueError(f"export_onnx: the model's output structure changes with the batch size "
                             f"({self.names} at batch {sizes[0]})")
        self.batched = [n for i, n in enumerate(self.names)
                        if len(runs) > 1 and runs[0][i][1].dim() > 0
                        and runs[0][i][1].shape[0] == sizes[0] and runs[1][i][1].shape[0] == sizes[1]]

    def exportable(self, model):
        return model if self.single else _FlatOutputs(model)


def onnx_bytes(model, input_size, dynamic_batch=True, exporter="dynamo", opset=18, vocab_size=None):
    """The serialized ONNX model of `model` (eval mode, float32, CPU) for inputs of `input_size`.

    Args:
        model: the nn.Module to export (not modified: a CPU float32 copy is exported).
        input_size: (C, H, W) or (N, C, H, W); with vocab_size, token ids: (L,) or (N, L).
        dynamic_batch: make the batch axis of the input and of the outputs symbolic. Default True.
        exporter: "dynamo" or "torchscript". Default "dynamo".
        opset: the ONNX opset to write, within opset_range(exporter). Default 18.
        vocab_size: None (a float input) or the vocabulary size of a model that takes token ids (an int64
            input). Default None.

    Returns:
        The ONNX model, bytes.

    Raises:
        ValueError: as module_bytes, or a malformed input_size or vocab_size.
    """
    x = example_input(example_shape(input_size, vocab_size), vocab_size)
    return module_bytes(model, x, exporter, dynamic_batch, opset)


def module_bytes(module, x, exporter="dynamo", dynamic_batch=False, opset=18):
    """The serialized ONNX model of `module` (eval mode, float32, CPU) for the example input x (a float input
    is exported as float32, an integer one, such as token ids, with its dtype).

    The output may be one tensor (ONNX output "output") or any container of tensors: its tensors become the
    ONNX outputs in output_leaves' order and names. The checks that one eager forward allows (one input
    tensor, tensor outputs) run before the export.

    Args:
        module: the nn.Module to export (not modified: a CPU float32 copy is exported).
        x: the example input tensor.
        exporter: "dynamo" or "torchscript". Default "dynamo".
        dynamic_batch: make the batch axis of the input and of the outputs symbolic, a bool. Default False.
        opset: the ONNX opset to write, within opset_range(exporter). Default 18.

    Returns:
        The ONNX model, bytes.

    Raises:
        ValueError: a bad exporter or dynamic_batch, a model that does not run on x or returns non-tensors.
    """
    check_exporter(exporter)
    check_opset(opset, exporter)
    if not isinstance(dynamic_batch, bool):
        raise ValueError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    m, x = _cpu_eval_copy(module), x.detach().cpu()
    x = x.float() if x.is_floating_point() else x
    spec = _OutputSpec(m, x, dynamic_batch)
    m = spec.exportable(m)
    names = {"input_names": [INPUT_NAME], "output_names": spec.names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if exporter == "dynamo":
            _require("onnxscript", "torch.onnx.export(dynamo=True)")
            dims = ({0: torch.export.Dim(BATCH_AXIS)},) if dynamic_batch else None
            program = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes=dims, opset_version=opset,
                                        verbose=False, **names)
            return program.model_proto.SerializeToString()
        buf = io.BytesIO()
        axes = None
        if dynamic_batch:
            axes = {name: {0: BATCH_AXIS} for name in [INPUT_NAME] + spec.batched}
        torch.onnx.export(m, (x,), buf, dynamo=False, dynamic_axes=axes, opset_version=opset, **names)
        return buf.getvalue()


def fast_exporter():
    """The exporter for internal latency measurements: the TorchScript-based one while torch has it
    (about 10x faster to export than dynamo), else dynamo."""
    try:  # a probe: whether this torch still ships the TorchScript exporter
        from torch.onnx import utils  # noqa: F401
        return "torchscript"
    except ImportError:
        return "dynamo"


def session(model_bytes, threads=None):
    """An onnxruntime CPU InferenceSession of a serialized ONNX model.

    Args:
        model_bytes: the ONNX model, bytes.
        threads: intra-op threads, an int >= 1. Default None: onnxruntime's default (all cores).

    Returns:
        The onnxruntime.InferenceSession.

    Raises:
        ImportError: when onnxruntime is not installed.
    """
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


def _leaf_error(name, out, ref, batch):
    """max |onnx - eager| / max |eager| of one output leaf (ValueError on another shape or dtype)."""
    if out.shape != ref.shape:
        raise ValueError(f"onnxruntime output {name} has shape {tuple(out.shape)}, eager {tuple(ref.shape)} at "
                         f"batch {batch}")
    if out.dtype != ref.dtype:
        raise ValueError(f"onnxruntime output {name} is {out.dtype}, eager {ref.dtype} at batch {batch}")
    if out.numel() == 0:
        return 0.0
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def output_names(model_bytes):
    """The output names of a serialized ONNX model, in order.

    Args:
        model_bytes: the ONNX model, bytes.

    Returns:
        A list of str.
    """
    onnx = _require("onnx", "reading ONNX models")
    return [o.name for o in onnx.load_from_string(model_bytes).graph.output]


def _pair_outputs(sess, outs, leaves):
    """[(leaf name, onnx output, eager leaf)] by position: both exporters emit the leaves in output_leaves'
    order (the files written here are exported from the flat tuple of them). The ONNX names are output_leaves'
    for the files written here, except where an exporter folds an output that does not depend on the input
    into a constant and names it itself."""
    if len(outs) != len(leaves):
        names = ", ".join(o.name for o in sess.get_outputs())
        raise ValueError(f"onnxruntime gives {len(outs)} outputs ({names}), the model's output has {len(leaves)} "
                         f"tensors ({', '.join(n for n, _ in leaves)})")
    return [(n, torch.from_numpy(out), ref) for (n, ref), out in zip(leaves, outs)]


def verify(model, model_bytes, input_size, batch_sizes=None, rtol=1e-4, seed=0, vocab_size=None):
    """Runs the exported model in onnxruntime and eager `model` on the same random inputs, output by output.

    Every tensor of the model's output (a tensor, or a dict, tuple, list, dataclass or ModelOutput of them,
    flattened by output_leaves) is compared with its ONNX output: same shape, same dtype, and
    max |onnx - eager| / max |eager| <= rtol.

    Args:
        model: the eager model (a float32 CPU copy in eval mode is run; the model is not touched).
        model_bytes: the serialized ONNX model.
        input_size: (C, H, W) or (N, C, H, W); with vocab_size, token ids: (L,) or (N, L).
        batch_sizes: the batch sizes to run (default: the input_size's; another one checks a dynamic axis).
        rtol: the largest relative error allowed on any output.
        seed: seed of the random inputs.
        vocab_size: None (random normal float inputs) or the vocabulary size (random token ids). Default None.

    Returns:
        {batch size: the largest relative error over the outputs}.

    Raises:
        ValueError: another number of outputs, a shape or dtype that differs, or an error above rtol.
    """
    shape = example_shape(input_size, vocab_size)
    m = _cpu_eval_copy(model)
    sess = session(model_bytes, threads=1)
    gen = torch.Generator().manual_seed(seed)
    errors, worst = {}, {}
    for n in batch_sizes or (shape[0],):
        x = example_input((n, *shape[1:]), vocab_size, gen)
        with torch.no_grad():
            leaves = output_leaves(m(x))
        outs = sess.run(None, {INPUT_NAME: x.numpy()})
        per_leaf = {name: _leaf_error(name, out, ref, n) for name, out, ref in _pair_outputs(sess, outs, leaves)}
        worst[n] = max(per_leaf, key=per_leaf.get)
        errors[n] = per_leaf[worst[n]]
    bad = {n: e for n, e in errors.items() if not e <= rtol}
    if bad:
        where = ", ".join(f"{worst[n]} at batch {n}" for n in bad)
        raise ValueError(f"the exported model differs from eager by more than rtol={rtol}: {bad} ({where})")
    return errors


def export_onnx(model, path, input_size, dynamic_batch=True, exporter="dynamo", opset=18, check=True,
                rtol=1e-4, vocab_size=None):
    """Writes `model` (dense or decomposed) as ONNX to `path` (atomically) and, with check=True, verifies it
    in onnxruntime against eager, output by output (verify), at the given batch size and, with dynamic_batch,
    another.

    The model is called as model(x) with one float tensor of input_size, or with vocab_size= one int64 tensor
    of token ids of input_size (N, L) (a Hugging Face causal LM: input_ids in, "output.logits" out; its
    config.use_cache must be False, a KV cache is no tensor output); its output may be a tensor or any
    container of tensors (dicts such as torchvision segmentation's {"out": ...}, tuples, lists, dataclasses,
    Hugging Face ModelOutputs): each tensor is one ONNX output named by its path ("output", "output.out",
    "output.0", "output.logits"; output_leaves). Before the export, which can take minutes, the destination,
    input_size, the model's signature and its output (one eager forward) are checked.

    Args:
        model: an nn.Module whose forward takes one input tensor.
        path: the .onnx file to write (its directory is created).
        input_size: (C, H, W) or (N, C, H, W); with vocab_size, token ids: (L,) or (N, L).
        dynamic_batch: make the batch axis of the input and of the batched outputs symbolic.
        exporter: "dynamo" or "torchscript".
        opset: the ONNX opset.
        check: verify the file in onnxruntime before writing it.
        rtol: verify's tolerance.
        vocab_size: None (a float input) or the vocabulary size of a model that takes token ids: the input is
            then int64 and verify draws its ids from [0, vocab_size). Default None.

    Returns:
        {"path", "bytes", "exporter", "dynamic_batch", "errors" (verify's, or None), "outputs" (the file's
        output names)}.

    Raises:
        ValueError: bad arguments, a model that does not take one tensor or returns non-tensors, or a file that
            differs from eager; nothing is written.
        IsADirectoryError, NotADirectoryError, PermissionError: a destination that cannot be written.
    """
    storage.check_writable(path)
    shape = example_shape(input_size, vocab_size)
    data = onnx_bytes(model, shape, dynamic_batch, exporter, opset, vocab_size)
    errors = None
    if check:
        batches = (shape[0], shape[0] + 2) if dynamic_batch else (shape[0],)
        errors = verify(model, data, shape, batches, rtol, vocab_size=vocab_size)
    storage.atomic_write(path, lambda f: f.write(data))
    return {"path": str(path), "bytes": len(data), "exporter": exporter, "dynamic_batch": dynamic_batch,
            "errors": errors, "outputs": output_names(data)}


def ort_runner(model_bytes, x, threads=None):
    """A no-argument callable: one onnxruntime run of the model on the tensor x.

    Args:
        model_bytes: the ONNX model, bytes (its input is named INPUT_NAME).
        x: the input tensor (copied to a CPU numpy array once).
        threads: intra-op threads, as for session(). Default None.

    Returns:
        The callable.
    """
    sess = session(model_bytes, threads)
    feed = {INPUT_NAME: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)


def ort_latency(model_bytes, input_size, threads=None, repeats=20, warmup=3):
    """Median seconds of one onnxruntime run of the model at `input_size`, on a random normal input.

    Args:
        model_bytes: the ONNX model, bytes.
        input_size: (C, H, W) or (N, C, H, W).
        threads: intra-op threads, as for session(). Default None.
        repeats: timed runs, an int >= 1. Default 20.
        warmup: untimed runs first, an int >= 0. Default 3.

    Returns:
        The median seconds, a float.
    """
    return interleaved([ort_runner(model_bytes, torch.randn(input_shape(input_size)), threads)], repeats,
                       warmup)[0]


def compare_ort(dense, compact, input_size, threads=None, repeats=20, exporter=None):
    """Median onnxruntime latency (s) of the dense and the decomposed model at input_size, measured
    alternately in rounds so that load changes on a shared machine affect both alike.

    Args:
        dense: the dense nn.Module.
        compact: its decomposition.
        input_size: (C, H, W) or (N, C, H, W) (a fixed batch: no dynamic axis is exported).
        threads: intra-op threads, as for session(). Default None.
        repeats: timed runs of each model, an int >= 1. Default 20.
        exporter: "dynamo" or "torchscript". Default None: fast_exporter().

    Returns:
        [dense seconds, compact seconds], the median of each.
    """
    exporter = exporter or fast_exporter()
    data = [onnx_bytes(m, input_size, False, exporter) for m in (dense, compact)]
    x = torch.randn(input_shape(input_size))
    return interleaved([ort_runner(d, x, threads) for d in data], repeats)


def onnxruntime_available():
    """Whether onnxruntime (the `deploy` extra) can be imported."""
    try:  # optional dependency (the deploy extra): a probe
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def available_exporters():
    """The exporters this installation can run (dynamo needs onnxscript)."""
    try:  # optional dependency (the deploy extra): a probe
        import onnxscript  # noqa: F401
        return list(EXPORTERS)
    except ImportError:
        return ["torchscript"]


__all__ = ["export_onnx", "check_opset", "opset_range", "onnx_bytes", "module_bytes", "output_leaves",
           "output_names", "fast_exporter", "verify", "session", "ort_runner", "ort_latency", "compare_ort",
           "EXPORTERS", "onnxruntime_available", "available_exporters", "check_vocab_size", "example_shape",
           "example_input"]
