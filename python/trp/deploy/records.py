# Over 300 lines: the schema of every record trp reads, checked field by field in one place.
"""Validation of the records trp reads back: `trp train` checkpoints, trp.save model files, --init weights.

A SHA-256 seal (trp._utils.integrity) proves that a file holds what its writer sealed, not that the writer was
trp: anyone can seal a crafted record. So every field of a loaded record is checked against a schema - its
type, its range, and the sizes it implies against the file's own tensors - before anything is built from
it, and one that does not fit is a RecordError naming the file and the field. Models are first built on
the meta device (dry_run), where no memory is allocated, and compared key by key and shape by shape with
the file's tensors: only a record whose every size matches its tensors is built for real, so a record can
never make trp allocate more than the tensors the file itself holds. Floating-point tensors must be finite:
a NaN or an infinite weight is refused on load, with the tensor's name."""
import math

import torch
from torch.nn.modules.module import register_module_module_registration_hook

from trp.nn.modules import FACTORIZED, FactorizedLinear

MAX_DEPTH = 32  # nesting of plain data in a record (trp writes at most 6)
# a dry run builds at most this many modules per tensor of the file (+ a margin): a record describing a
# deeper model than its tensors stops early instead of building millions of meta modules
MODULES_PER_TENSOR, MODULE_MARGIN = 8, 64
# architecture keys that count repeated blocks: each block holds at least one tensor, so a count is at most
# the number of the file's tensors (sizes - classes, channels, widths - are at most its number of weights)
COUNT_KEYS = ("depth", "num_layers", "num_blocks", "layers")


class RecordError(ValueError):
    """A loaded record (intact, maybe sealed, but crafted or from another program) that trp cannot use; the
    message names the file and the field."""


def fail(path, field, why):
    """A RecordError "PATH: FIELD: WHY" (returned, for the caller to raise).

    Args:
        path: the file's path.
        field: the field of the record that is wrong.
        why: what is wrong with it.

    Returns:
        The RecordError.
    """
    return RecordError(f"{path}: {field}: {why}")


def _name(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plain(value, path, field, depth=0):
    """Checks that `value` is plain data: None, bool, int, finite float, str, and lists, tuples and dicts
    (string or int keys) of those, nested at most MAX_DEPTH deep.

    Args:
        value: the field's value.
        path: the file, for the message.
        field: the field's name, for the message.
        depth: the nesting depth of `value` (internal).

    Returns:
        value.

    Raises:
        RecordError: naming the file and the (nested) field.
    """
    if depth > MAX_DEPTH:
        raise fail(path, field, f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(path, field, f"must be a finite number, got {value!r}")
        return value
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            plain(v, path, f"{field}[{i}]", depth + 1)
        return value
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise fail(path, field, f"has a key of type {type(k).__name__}")
            plain(v, path, f"{field}[{k!r}]", depth + 1)
        return value
    raise fail(path, field, f"holds a {type(value).__name__}, not plain data")


def integer(value, path, field, low=0, high=None):
    """Checks that a record's field is an int (not a bool) in [low, high].

    Args:
        value: the field's value.
        path: the file's path, for the message.
        field: the field's name, for the message.
        low: the smallest valid value. Default 0.
        high: the largest valid value. Default None: no bound.

    Returns:
        The value.

    Raises:
        RecordError: when value is not such an int.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise fail(path, field, f"must be an int{bound}, got {_name(value)}")
    return value


def tensors(state, path, field, finite=True):
    """Checks that `state` is a dict of name -> tensor and, with finite=True, that every floating-point
    tensor is finite.

    Args:
        state: the field's value (a state_dict).
        path: the file, for the message.
        field: the field's name, for the message.
        finite: also check that every floating-point tensor is finite.

    Returns:
        state.

    Raises:
        RecordError: naming the file, the field and the first offending entry.
    """
    if not isinstance(state, dict):
        raise fail(path, field, f"must be a dict of tensors, got {type(state).__name__}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise fail(path, field, f"must map names to tensors, has {_name(k)}: {type(v).__name__}")
    if finite:
        check_finite(state, path, field)
    return state


def check_finite(state, path, field):
    """Checks that every floating-point (or complex) tensor of `state` is finite.

    Args:
        state: {name: tensor}; other values are ignored.
        path: the file, for the message.
        field: the field holding `state` ("" when the names are already full paths).

    Raises:
        RecordError: naming the first tensor that holds a NaN or an infinite value.
    """
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.device.type != "meta" \
                and not bool(torch.isfinite(v).all()):
            raise fail(path, f"{field}[{k!r}]" if field else k,
                        "holds NaN or infinite values: the weights are unusable (a diverged or damaged model)")


def all_tensors(obj, where, out, depth=0):
    """{where-path: tensor} of every tensor in a nested record (at most MAX_DEPTH deep).

    Args:
        obj: the record: a tensor, or nested dicts, lists and tuples.
        where: the path of `obj` in the record, the prefix of the keys (e.g. "state").
        out: the dict to add to (modified in place).
        depth: the nesting depth of `obj`. Default 0.

    Returns:
        `out`, with a key such as where['key'][0] per tensor.
    """
    if depth > MAX_DEPTH:
        return out
    if isinstance(obj, torch.Tensor):
        out[where] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            all_tensors(v, f"{where}[{k!r}]", out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            all_tensors(v, f"{where}[{i}]", out, depth + 1)
    return out


def _numel(state):
    return sum(t.numel() for t in state.values())


def check_arch(arch, state, path, field="arch"):
    """Checks an architecture record (models.build's trp_arch) against the file's tensors: plain data with a
    string name, every int in it (classes, channels, widths) at most the number of weights the file holds,
    and block counts (COUNT_KEYS) at most its number of tensors. Building it on the meta device (dry_run)
    then compares it tensor by tensor.

    Args:
        arch: the record.
        state: the file's tensors, {name: tensor}.
        path: the file, for the message.
        field: the record's name, for the message.

    Returns:
        arch.

    Raises:
        RecordError: naming the file and the field.
    """
    if not isinstance(arch, dict):
        raise fail(path, field, f"must be a dict, got {type(arch).__name__}")
    plain(arch, path, field)
    if not isinstance(arch.get("name"), str):
        raise fail(path, f"{field}['name']", f"must be a model name, got {_name(arch.get('name'))}")
    limit = max(_numel(state), 1)
    for key in ("num_classes", "in_channels"):
        if key in arch:
            integer(arch[key], path, f"{field}[{key!r}]", 1, limit)
    stack = [(arch, field)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{where}[{k!r}]") for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise fail(path, where, f"{value} exceeds the {limit} weights the file holds")
    for key in COUNT_KEYS:
        value = arch.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > len(state):
            raise fail(path, f"{field}[{key!r}]", f"{value} blocks, more than the {len(state)} tensors the file "
                                                    "holds")
    return arch


# layer keys that files written before they existed lack: their value then (a conv's groups came with grouped
# convs; from_config reads the same default)
OPTIONAL_LAYER_KEYS = {"groups": 1}


def _reference_config(kind):
    """The config() of a smallest factorized layer of `kind`: the keys and value types a record must have."""
    cls = FACTORIZED[kind]
    if cls is FactorizedLinear:
        return cls(1, 1, 1, device="meta").config()
    return cls(1, 1, (1, 1), 1, device="meta").config()


def _same_form(value, ref, path, field, low=1):
    """value has the form of ref: an int (not a bool) >= low for an int, a bool for a bool, a list of the
    same length of such for a list."""
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise fail(path, field, f"must be True or False, got {_name(value)}")
    elif isinstance(ref, int):
        integer(value, path, field, low)
    elif isinstance(ref, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(ref):
            raise fail(path, field, f"must be a list of {len(ref)} ints, got {_name(value)}")
        for i, (v, r) in enumerate(zip(value, ref)):
            _same_form(v, r, path, f"{field}[{i}]", low)


def check_layers(layers, state, path, field="layers"):
    """Checks the factorized-layer records of a trp.save file: each {name: config()} has exactly the keys
    and value types of its type's config(), and the module it describes, built on the meta device, has
    exactly the file's tensors under its name (so its rank and sizes are those of the file's weights). The
    geometry (stride, padding, dilation), which no tensor shows, is compared with the dense layer it
    replaces when the model is built (trp.deploy.io).

    Args:
        layers: {layer name: config dict}, as trp.save writes it.
        state: the file's tensors, {name: tensor}.
        path: the file, for the message.
        field: the record's name, for the message.

    Returns:
        layers.

    Raises:
        RecordError: naming the file, the layer and the field.
    """
    if not isinstance(layers, dict):
        raise fail(path, field, f"must be a dict, got {type(layers).__name__}")
    for name, cfg in layers.items():
        where = f"{field}[{_name(name)}]"
        if not isinstance(name, str) or not isinstance(cfg, dict):
            raise fail(path, where, "must map a layer name to its configuration dict")
        kind = cfg.get("type")
        if not isinstance(kind, str) or kind not in FACTORIZED:
            raise fail(path, f"{where}['type']", f"unknown type {_name(kind)}; valid: {', '.join(FACTORIZED)}")
        ref = _reference_config(kind)
        cfg = {**{k: v for k, v in OPTIONAL_LAYER_KEYS.items() if k in ref}, **cfg}  # older files lack them
        missing, unknown = [k for k in ref if k not in cfg], [k for k in cfg if k not in ref]
        if missing or unknown:
            raise fail(path, where, f"{'lacks ' + ', '.join(map(repr, missing)) if missing else ''}"
                                     f"{'; ' if missing and unknown else ''}"
                                     f"{'has unknown ' + ', '.join(map(_name, unknown)) if unknown else ''}")
        for k, r in ref.items():
            if k != "type":  # sizes, strides, dilations >= 1; paddings >= 0
                _same_form(cfg[k], r, path, f"{where}[{k!r}]", 0 if k == "padding" else 1)
        try:
            module = FACTORIZED[kind].from_config(cfg, device="meta")
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
            raise fail(path, where, first_line(exc)) from None
        for k, t in module.state_dict().items():
            saved = state.get(f"{name}.{k}")
            if saved is None:
                raise fail(path, where, f"the file holds no tensor {name}.{k} for it")
            if tuple(saved.shape) != tuple(t.shape):
                raise fail(path, where, f"rank {cfg.get('rank')} and sizes imply {name}.{k} of shape "
                                         f"{tuple(t.shape)}, the file's tensor is {tuple(saved.shape)}")
    return layers


def first_line(exc):
    """The first line of an exception's message (at most 1000 characters), or its type's name when empty.

    Args:
        exc: the exception.

    Returns:
        A str.
    """
    text = str(exc).strip()
    return text.splitlines()[0][:1000] if text else type(exc).__name__  # bounded: a crafted record may be huge


def check_model_file(payload, path):
    """Checks a sealed trp.save payload (io.verify_model_file): its tensors (finite), its metadata, its
    architecture record and its factorized layers, against each other.

    Args:
        payload: the loaded file, its seal already verified.
        path: the file, for the message.

    Returns:
        payload.

    Raises:
        RecordError: naming the file and the field.
    """
    state = tensors(payload["state_dict"], path, "state_dict")
    metadata = payload.get("metadata")
    if metadata is not None:
        plain(metadata, path, "metadata")
        for k, v in metadata.items():
            if not isinstance(v, dict) or not isinstance(v.get("version", 0), int) or isinstance(v.get("version"),
                                                                                                  bool):
                raise fail(path, f"metadata[{_name(k)}]", "must be a dict with an int 'version'")
    if payload.get("arch") is not None:
        check_arch(payload["arch"], state, path)
    if payload.get("model") is not None:
        check_model_info(payload["model"], path)
    check_layers(payload["layers"], state, path)
    return payload


def check_model_info(info, path, field="model"):
    """Checks the model description of a trp.save file (format 3): its class name and every module's
    train/eval flag.

    Args:
        info: {"class": str, "training": {module name: bool}}.
        path: the file, for the message.
        field: the record's name, for the message.

    Returns:
        info.

    Raises:
        RecordError: naming the file and the field.
    """
    if not isinstance(info, dict) or set(info) != {"class", "training"}:
        raise fail(path, field, "must be a dict with the keys 'class' and 'training'")
    if not isinstance(info["class"], str):
        raise fail(path, f"{field}['class']", f"must be a class name, got {_name(info['class'])}")
    flags = info["training"]
    if not isinstance(flags, dict) or not all(isinstance(k, str) and isinstance(v, bool) for k, v in flags.items()):
        raise fail(path, f"{field}['training']", "must map module names to True or False")
    return info


def dry_run(build, state, path):
    """build() on the meta device, where no memory is allocated, with at most MODULES_PER_TENSOR modules per
    tensor of `state` (the file's tensors); returns its result. Any error is a RecordError naming `path`:
    a record that does not build, or whose model does not match its tensors, fails here before the real
    build.

    Args:
        build: a no-argument callable that builds (and loads) the model.
        state: the file's tensors, {name: tensor}: they bound the number of modules.
        path: the file, for the message.

    Returns:
        what build() returns, on the meta device.

    Raises:
        RecordError: whatever build() raised (but KeyboardInterrupt, MemoryError), as one line naming the
            file.
    """
    limit = MODULES_PER_TENSOR * len(state) + MODULE_MARGIN
    count = [0]

    def hook(module, name, submodule):
        count[0] += 1
        if count[0] > limit:
            raise RecordError(f"{path}: its record describes a model of more than {limit} modules, far more than "
                              f"its {len(state)} tensors can hold")

    handle = register_module_module_registration_hook(hook)
    try:
        with torch.device("meta"):
            return build()
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        msg = " ".join(first_line(exc).split())
        raise RecordError(msg if str(path) in msg else f"{path}: {msg}") from None
    finally:
        handle.remove()


__all__ = ["RecordError", "fail", "first_line", "integer", "all_tensors", "plain", "tensors", "check_finite",
           "check_arch", "check_layers", "check_model_file", "dry_run", "MAX_DEPTH"]
