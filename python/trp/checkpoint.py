"""Training checkpoints: sealed with a SHA-256 of everything they hold (checked on every load), written
atomically (storage.atomic_save), loaded without unpickling code and checked field by field (records), with
the RNG states that make a resumed run continue exactly."""
import random

import numpy as np
import torch

from . import records
from .integrity import digest_tree
from .storage import atomic_save, read_torch

FORMAT = "trp-train-checkpoint"
VERSION = 2  # 2: sealed ("sha256"); 1 carried no checksum
REQUIRED = ("config", "arch", "epoch", "model")


class CheckpointError(ValueError):
    """A file that is not a usable training checkpoint (corrupted, other format or model)."""


def _body(state):
    return {k: v for k, v in state.items() if k != "sha256"}


def save_checkpoint(state, path):
    """Writes the checkpoint dict `state` to `path` atomically, sealed with the SHA-256 of its contents."""
    body = _body(state)
    atomic_save({**body, "sha256": digest_tree(body)}, path)


def is_checkpoint(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def verify_checkpoint(obj, path):
    """`obj` (as loaded from `path`) if it is an intact checkpoint this trp reads, with every field valid
    (records.check_checkpoint; its config completed with the defaults of options it predates), else
    CheckpointError naming the file (and the field)."""
    if not is_checkpoint(obj):
        raise CheckpointError(f"{path}: not a `trp train` checkpoint (no '{FORMAT}' header)")
    version = obj.get("version")
    if version != VERSION:
        old = " (written by an older trp, without a checksum; start a new run)" if version == 1 else ""
        raise CheckpointError(f"{path}: checkpoint version {version!r}, this trp reads {VERSION}{old}")
    if not isinstance(obj.get("sha256"), str):
        raise CheckpointError(f"{path}: checkpoint has no checksum (damaged, or not written by trp)")
    if obj["sha256"] != digest_tree(_body(obj)):
        raise CheckpointError(f"{path}: corrupted: its contents do not match the SHA-256 checksum written "
                              "with it")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:  # a seal does not make a record trustworthy: every field against its schema
        return records.check_checkpoint(obj, path)
    except records.RecordError as exc:
        raise CheckpointError(str(exc)) from None


def load_checkpoint(path):
    return verify_checkpoint(read_torch(path), path)


def mismatch(model, state, limit=5):
    """None when `state` has exactly the keys and shapes of model.state_dict(), else what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    for label, items in (("missing keys ", missing), ("unexpected keys ", unexpected), ("", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(label + ", ".join(items[:limit]) + more)
    return "; ".join(parts) or None


def load_weights(model, state, what, error=CheckpointError, assign=False):
    """model.load_state_dict(state) once keys and shapes are known to match; otherwise, or when a module's
    own checks refuse the state, raises error(f"{what}: <what differs>") - a mismatch before any write."""
    problem = mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state, assign=assign)
            return model
        except (RuntimeError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise error(f"{what}: {problem}")


def rng_state(loader_generator=None):
    """All RNG states a training step can draw from, as tensors/lists/ints (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state, loader_generator=None):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


__all__ = ["FORMAT", "VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
           "is_checkpoint", "mismatch", "load_weights", "rng_state", "set_rng_state"]
