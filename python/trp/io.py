"""trp.save / trp.load: a (decomposed) model as plain data - its architecture record, the configuration of
each factorized layer and a state_dict - read back with torch.load(weights_only=True), so no pickled code
runs on load."""
import copy
import hashlib
import os

import torch
import torch.nn as nn

from . import models
from .checkpoint import atomic_save
from .modules import FACTORIZED, FACTORIZED_TYPES

FORMAT = "trp.model"
VERSION = 1


def _digest(arch, layers, state_dict):
    """SHA-256 over the config and every tensor's bytes: the zip container does not verify its CRCs on
    load, so a flipped byte inside a tensor would otherwise load silently."""
    h = hashlib.sha256(repr((arch, layers)).encode())
    for key in sorted(state_dict):
        t = state_dict[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(model, path):
    """Writes `model` (dense or decomposed) to `path` atomically (temporary file, then rename)."""
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    arch = getattr(model, "trp_arch", None)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "arch": copy.deepcopy(arch), "layers": layers,
               "state_dict": state_dict, "sha256": _digest(arch, layers, state_dict)}
    atomic_save(payload, os.fspath(path))


def _read(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"trp.load: no such file: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign objects: all mean "not our file"
        raise ValueError(f"trp.load: {path} is not a readable trp model file (corrupted or truncated?): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"trp.load: {path} is not a trp model file (written by trp.save)")
    if payload.get("version") != VERSION:
        raise ValueError(f"trp.load: {path} has format version {payload.get('version')}, "
                         f"this trp reads version {VERSION}")
    for key, kind in (("layers", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            raise ValueError(f"trp.load: {path} is damaged: missing {key!r}")
    if payload.get("sha256") != _digest(payload.get("arch"), payload["layers"], payload["state_dict"]):
        raise ValueError(f"trp.load: {path} is corrupted: its contents do not match the checksum "
                         "written by trp.save")
    return payload


def _install_layers(model, layers, path):
    """Replaces the dense layers named in `layers` by factorized modules built from their config."""
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
            ok = isinstance(dense, nn.Conv2d) and (dense.in_channels, dense.out_channels,
                                                   tuple(dense.kernel_size)) == (
                cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]))
        if not ok:
            raise ValueError(f"trp.load: {path} was saved from another architecture: its layer {name!r} "
                             f"({kind}, {cfg}) does not fit the model's {dense!r}")
        w = dense.weight
        factorized = FACTORIZED[kind].from_config(cfg, device=w.device, dtype=w.dtype)
        factorized.train(dense.training)
        model.set_submodule(name, factorized)


def load(path, base=None):
    """The model stored at `path` by trp.save.

    base=None rebuilds the architecture from the file's record (trp.models.build); otherwise a copy of the
    given nn.Module is used (it is not modified). A file of another architecture, or a damaged one, raises
    ValueError and nothing is returned half-loaded."""
    payload = _read(path)
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
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"trp.load: {path} does not match the model (another architecture?): {exc}") from exc
    if arch is not None:
        model.trp_arch = copy.deepcopy(arch)
    return model


__all__ = ["save", "load"]
