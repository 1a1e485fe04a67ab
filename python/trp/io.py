"""trp.save / trp.load: a (decomposed) model as plain data - its architecture record, the configuration of
each factorized layer, a state_dict with its dtypes and its `_metadata` (the per-module versions that some
_load_from_state_dict read) and a SHA-256 over all of it - read back with torch.load(weights_only=True),
so no pickled code runs on load."""
import collections
import copy
import os

import torch
import torch.nn as nn

from . import checks, models, records
from .checkpoint import load_weights
from .integrity import digest
from .modules import FACTORIZED, FACTORIZED_TYPES, conv_padding4
from .storage import atomic_save, read_torch
from .transformer import prepare_hosts

FORMAT = "trp.model"
VERSION = 2  # 2 adds "metadata"; 1 is still read (its checksum covers arch, layers and tensors)


def _header(payload):
    header = (payload.get("arch"), payload["layers"])
    return header if payload.get("version") == 1 else header + (payload.get("metadata"),)


def save(model, path):
    """Writes `model` (dense or decomposed) to `path` atomically (temporary file, then rename).

    Args:
        model: the nn.Module.
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
    payload = {"format": FORMAT, "version": VERSION, "arch": copy.deepcopy(getattr(model, "trp_arch", None)),
               "layers": layers, "state_dict": state_dict, "metadata": metadata}
    payload["sha256"] = digest(_header(payload), state_dict)
    atomic_save(payload, os.fspath(path))


def is_model_file(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def verify_model_file(payload, path):
    """`payload` (as loaded from `path`) if it is an intact trp.save file, else ValueError."""
    if not is_model_file(payload):
        raise ValueError(f"{path} is not a trp model file (written by trp.save)")
    if payload.get("version") not in (1, VERSION):
        raise ValueError(f"{path} has format version {payload.get('version')}, "
                         f"this trp reads versions 1 and {VERSION}")
    for key in ("layers", "state_dict") + (("metadata",) if payload["version"] > 1 else ()):
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path} is damaged: missing {key!r}")
    if not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        raise ValueError(f"{path} is damaged: its state_dict holds non-tensors")
    if payload.get("sha256") != digest(_header(payload), payload["state_dict"]):
        raise ValueError(f"{path}: corrupted: its contents do not match the checksum written by trp.save")
    return records.check_model_file(payload, path)  # sealed is not trustworthy: every field, every size


def model_state_dict(payload):
    """The payload's state_dict with its `_metadata`, as load_state_dict wants it."""
    state = collections.OrderedDict(payload["state_dict"])
    state._metadata = collections.OrderedDict(payload.get("metadata") or {})
    return state


def _install_layers(model, layers, path):
    """Replaces the dense layers named in `layers` by factorized modules built from their config (first
    converting their host modules as decompose() did: trp.transformer.prepare_hosts)."""
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
        if kind == "linear":
            ok = isinstance(dense, nn.Linear) and (dense.in_features, dense.out_features) == (
                cfg["in_features"], cfg["out_features"])
        else:
            ok = isinstance(dense, nn.Conv2d) and (  # the geometry too: it does not show in the tensors
                dense.in_channels, dense.out_channels, tuple(dense.kernel_size), tuple(dense.stride),
                tuple(dense.dilation), tuple(conv_padding4(dense))) == (
                cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                tuple(cfg["dilation"]), tuple(cfg["padding"]))
        if not ok:
            raise ValueError(f"trp.load: {path} was saved from another architecture: its layer {name!r} "
                             f"({kind}, {cfg}) does not fit the model's {dense!r}")
        w = dense.weight
        factorized = FACTORIZED[kind].from_config(cfg, device=w.device, dtype=w.dtype)
        factorized.train(dense.training)
        model.set_submodule(name, factorized)


def load(path, base=None):
    """The model stored at `path` by trp.save, with the dtypes it was saved in.

    base=None rebuilds the architecture from the file's record (trp.models.build); otherwise a copy of the
    given nn.Module is used (it is not modified; the model keeps its device). A file of another
    architecture, or a damaged one, raises ValueError and nothing is returned half-loaded."""
    return from_payload(verify_model_file(read_torch(path), path), path, base)


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
            raise ValueError(f"trp.load: {path} records no architecture (the model was not built by "
                             "trp.models.build); pass the dense model as base=")
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
    load_weights(model, state, f"trp.load: {path} does not match the model (another architecture?)",
                 error=ValueError, assign=True)
    if arch is not None:
        model.trp_arch = copy.deepcopy(arch)
    return model


__all__ = ["save", "load", "from_payload", "is_model_file", "verify_model_file", "model_state_dict"]
