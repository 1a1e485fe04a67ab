# Over 300 lines: what trp.save writes and what trp.load checks and rebuilds read best side by side.
"""trp.save / trp.load: a (decomposed) model as plain data - its architecture record, the configuration of
each factorized layer, a state_dict with its dtypes and its `_metadata` (the per-module versions that some
_load_from_state_dict read), the model's class name and each module's train/eval flag, and a SHA-256 over all
of it - read back with torch.load(weights_only=True), so no pickled code runs on load.

The architecture record is what trp.models.build rebuilds the model from: the model's own `trp_arch` (built by
trp.models.build), or for a model built directly with torchvision or timm the builder found by name
(trp.models.candidate_archs). It is written only when a fresh build, with the file's factorized layers
installed, has exactly the saved model's structure (its repr and its state_dict's names and shapes); any
other model is loaded onto base=."""
import collections
import copy
import os
import warnings

import torch
import torch.nn as nn

from trp import models
from trp._utils import checks
from trp._utils.integrity import SEAL, digest, seal_problem
from trp._utils.storage import atomic_save, read_torch
from trp._utils.weights import load_weights
from trp.core import eligibility
from trp.core.attention import prepare_hosts
from trp.deploy import records
from trp.nn.modules import FACTORIZED, FACTORIZED_TYPES, conv_padding4

FORMAT = "trp.model"
# 3 adds "model" (class name, train/eval flags); 2 adds "metadata"; 1 and 2 are still read (the checksum of 1
# covers arch, layers and tensors)
VERSION = 3
READABLE = (1, 2, VERSION)


def _header(payload):
    header = (payload.get("arch"), payload["layers"])
    if payload.get("version") == 1:
        return header
    header += (payload.get("metadata"),)
    return header if payload.get("version") == 2 else header + (payload.get("model"),)


def class_name(model):
    """The qualified class name of `model`, "module.QualName", as trp.save records it.

    Args:
        model: the object (an nn.Module).

    Returns:
        The name, a str.
    """
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _structure(model):
    """What a rebuilt model must reproduce: its repr (module types and their settings) and its state_dict's
    names and shapes."""
    return repr(model), [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _fresh(arch):
    """A fresh build of `arch` on the meta device (no memory, no initialisation), else on the CPU (a builder
    that reads tensor values while it builds)."""
    try:
        with torch.device("meta"):
            return models.build_from_arch(arch)
    except (RuntimeError, NotImplementedError):
        return models.build_from_arch(arch)


def arch_record(model, layers):
    """The architecture record trp.load can rebuild `model` from (with its factorized `layers` installed),
    or None: the first of trp.models.candidate_archs(model) whose fresh build has exactly the model's
    structure. A record that trp.models.build wrote but that no longer matches (the model was changed after
    it was built) is dropped with a warning.

    Args:
        model: the nn.Module to describe.
        layers: its factorized layers' records, {name: config()}, installed on the fresh build before it is
            compared with `model`.

    Returns:
        The architecture record (plain data), or None when no candidate rebuilds the model.
    """
    candidates = models.candidate_archs(model)
    want = _structure(model)
    for arch in candidates:
        try:
            fresh = _fresh(arch)
            _install_layers(fresh, layers, "the saved model")
        except (ValueError, TypeError, RuntimeError, AttributeError, NotImplementedError):
            continue  # another builder, or other arguments
        if _structure(fresh) == want:
            return copy.deepcopy(arch)
    if getattr(model, "trp_arch", None) is not None:
        warnings.warn(f"trp.save: the model differs from a fresh trp.models.build of its record "
                      f"{model.trp_arch} (changed after it was built?); the file records no architecture and "
                      "trp.load will need base=", stacklevel=3)
    return None


def save(model, path):
    """Writes `model` (dense or decomposed) to `path` atomically (temporary file, then rename).

    Args:
        model: the nn.Module. Its architecture is recorded when trp.load can rebuild it by name (arch_record:
            trp.models.build, torchvision, timm); its class name and every module's train/eval flag are
            recorded as well.
        path: the file to write (absent or a regular file).

    Raises:
        TypeError: `model` is not an nn.Module.
        ValueError: its weights are on the meta device (hold no data).
        IsADirectoryError, storage.NotRegularFile, storage.WriteError: see storage.atomic_write.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trp.save: model must be an nn.Module, got {type(model).__name__}")
    checks.materialized(model, "trp.save")
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    sd = model.state_dict()
    state_dict = {k: v.detach().cpu() for k, v in sd.items()}
    metadata = {k: dict(v) for k, v in getattr(sd, "_metadata", {}).items()}
    info = {"class": class_name(model), "training": {n: m.training for n, m in model.named_modules()}}
    payload = {"format": FORMAT, "version": VERSION, "arch": arch_record(model, layers), "layers": layers,
               "state_dict": state_dict, "metadata": metadata, "model": info}
    atomic_save(seal(payload), os.fspath(path))


def seal(payload):
    """Sets payload["sha256"], the seal trp.save writes and trp.load checks, over the payload's records and
    tensors (the records that its format version covers).

    Args:
        payload: the model file's dict, as trp.save builds it (modified in place).

    Returns:
        The same payload.
    """
    payload[SEAL] = digest(_header(payload), payload["state_dict"])
    return payload


def is_model_file(obj):
    """Whether `obj` looks like a trp.save payload (a dict with trp's format tag); nothing else is checked.

    Args:
        obj: the object loaded from a file.

    Returns:
        True or False.
    """
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def verify_model_file(payload, path):
    """`payload` (as loaded from `path`) if it is an intact trp.save file.

    Args:
        payload: the object loaded from the file.
        path: the file's path, for the messages.

    Returns:
        The payload, checked field by field.

    Raises:
        ValueError: when it is not a trp model file, has an unreadable format version, is damaged or
            corrupted (the seal does not match), or holds a record trp cannot use.
    """
    if not is_model_file(payload):
        raise ValueError(f"{path} is not a trp model file (written by trp.save)")
    if payload.get("version") not in READABLE:
        raise ValueError(f"{path} has format version {payload.get('version')}, "
                         f"this trp reads versions {', '.join(map(str, READABLE))}")
    version = payload["version"]
    for key in ("layers", "state_dict") + (("metadata",) if version > 1 else ()) + (("model",) if version > 2
                                                                                    else ()):
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path} is damaged: missing {key!r}")
    if not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        raise ValueError(f"{path} is damaged: its state_dict holds non-tensors")
    if seal_problem(payload, lambda: digest(_header(payload), payload["state_dict"])) is not None:
        raise ValueError(f"{path}: corrupted: its contents do not match the checksum written by trp.save")
    return records.check_model_file(payload, path)  # sealed is not trustworthy: every field, every size


def model_state_dict(payload):
    """The payload's state_dict with its `_metadata`, as load_state_dict wants it.

    Args:
        payload: a verified trp.save payload.

    Returns:
        An OrderedDict of tensors with a `_metadata` attribute.
    """
    state = collections.OrderedDict(payload["state_dict"])
    state._metadata = collections.OrderedDict(payload.get("metadata") or {})
    return state


def _install_layers(model, layers, path):
    """Replaces the dense layers named in `layers` by factorized modules built from their config (first
    converting their host modules as decompose() did: trp.core.attention.prepare_hosts)."""
    try:
        prepare_hosts(model, [n for n in layers if isinstance(n, str)])
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"trp.load: {path} was saved from another architecture: {exc}") from None
    for name, cfg in layers.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"trp.load: {path} was saved from another architecture: the model has no "
                             f"layer {name!r}") from None
        kind = cfg.get("type") if isinstance(cfg, dict) else None
        if kind not in FACTORIZED:
            raise ValueError(f"trp.load: {path} is damaged: layer {name!r} has an unknown type {kind!r}")
        adapter, _, _ = eligibility.resolve(dense)  # the base's layer: nn.Linear, Conv1D, a parametrized conv..
        layer = None if adapter is None else eligibility.dense_equivalent(dense, adapter)
        if kind == "linear":
            ok = isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (
                cfg["in_features"], cfg["out_features"])
        else:
            ok = isinstance(layer, nn.Conv2d) and (  # the geometry too: it does not show in the tensors
                layer.in_channels, layer.out_channels, tuple(layer.kernel_size), layer.groups, tuple(layer.stride),
                tuple(layer.dilation), tuple(conv_padding4(layer))) == (
                cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), cfg.get("groups", 1),
                tuple(cfg["stride"]), tuple(cfg["dilation"]), tuple(cfg["padding"]))
        if not ok:
            raise ValueError(f"trp.load: {path} was saved from another architecture: its layer {name!r} "
                             f"({kind}, {cfg}) does not fit the model's {dense!r}")
        w = layer.weight
        factorized = FACTORIZED[kind].from_config(cfg, device=w.device, dtype=w.dtype)
        factorized.train(dense.training)
        model.set_submodule(name, factorized)


def _ties(model):
    """[[name, ...]] of the parameters that several names share (tied weights: a language model's embedding and
    output head), as the model holds them before its weights are loaded."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return [group for group in names.values() if len(group) > 1]


def _retie(model, ties, state, path):
    """Makes every group of `ties` one parameter again: load_state_dict(assign=True) gives each name its own.
    The file must hold one value for the group (it does when it was saved from the tied model)."""
    for first, *others in ties:
        for name in others:
            if not torch.equal(state[name], state[first]):
                raise ValueError(f"trp.load: {path} does not match the model: it holds different values for "
                                 f"{first} and {name}, which the model ties (one parameter)")
        shared = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)


def load(path, base=None):
    """The model stored at `path` by trp.save, with the dtypes and the train/eval mode it was saved in.

    Args:
        path: a file written by trp.save.
        base: None rebuilds the model from the file's architecture record (models of trp.models.build,
            torchvision and timm); for any other model, pass the dense model (e.g. base=MyNet()): a copy of it
            is used (it is not modified; the model keeps its device).

    Returns:
        The model, its factorized layers installed and its weights loaded; the parameters that the model ties
        (a language model's embedding and output head) stay one parameter.

    Raises:
        ValueError: no record and no base (the message names the class to pass), a file of another
            architecture, a damaged one, or one with different values for weights the model ties; nothing is
            returned half-loaded.
    """
    return from_payload(verify_model_file(read_torch(path), path), path, base)


def _no_record_error(payload, path):
    cls = (payload.get("model") or {}).get("class")
    if cls is None:  # a file of format 1 or 2
        return ValueError(f"trp.load: {path} records no architecture (the model was not built by "
                          "trp.models.build); pass the dense model as base=, e.g. trp.load(path, base=MyNet())")
    short = cls.rsplit(".", 1)[-1]
    return ValueError(f"trp.load: {path} holds a {cls}, which trp cannot rebuild by name (it rebuilds models of "
                      f"trp.models.build, torchvision and timm built with their default arguments); pass the "
                      f"dense model as base=, e.g. trp.load(path, base={short}(...))")


def _restore_modes(model, payload):
    """Sets each module's train/eval flag as saved (files of format 3; older ones keep the model's)."""
    flags = (payload.get("model") or {}).get("training") or {}
    for name, module in model.named_modules():
        if isinstance(flags.get(name), bool):
            module.training = flags[name]


def from_payload(payload, path, base=None):
    """The model of a verified trp.save payload (see load). Without base, it is first built on the meta
    device and matched with the file's tensors (records.dry_run): nothing is allocated for a record whose
    sizes are not those of its tensors.

    Args:
        payload: the file's content (verify_model_file).
        path: the file, for messages.
        base: None, or the dense nn.Module to copy and factorize (it is not modified).

    Returns:
        The model.

    Raises:
        ValueError: the record does not build, or does not fit its tensors or `base` (naming the file).
    """
    if base is None:
        records.dry_run(lambda: _from_payload(payload, path), payload["state_dict"], path)
    return _from_payload(payload, path, base)


def _from_payload(payload, path, base=None):
    arch = payload.get("arch")
    if base is None:
        if arch is None:
            raise _no_record_error(payload, path)
        model = models.build_from_arch(arch)
    else:
        if not isinstance(base, nn.Module):
            raise ValueError(f"trp.load: base must be an nn.Module or None, got {type(base).__name__}")
        base_arch = getattr(base, "trp_arch", None)
        if arch is not None and base_arch is not None and base_arch != arch:
            raise ValueError(f"trp.load: {path} was saved from architecture {arch}, base is {base_arch}")
        model = copy.deepcopy(base)
    _install_layers(model, payload["layers"], path)
    state = model_state_dict(payload)
    own = model.state_dict()
    for k, v in state.items():  # the model's devices, the file's dtypes (assign=True keeps them)
        state[k] = v.to(own[k].device) if k in own else v
    ties = _ties(model)
    load_weights(model, state, f"trp.load: {path} does not match the model (another architecture?)",
                 error=ValueError, assign=True)
    _retie(model, ties, state, path)
    _restore_modes(model, payload)
    if arch is not None:
        model.trp_arch = copy.deepcopy(arch)
    return model


__all__ = ["save", "load", "seal", "from_payload", "is_model_file", "verify_model_file", "model_state_dict",
           "arch_record", "class_name"]
