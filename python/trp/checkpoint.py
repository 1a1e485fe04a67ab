"""Training checkpoints: written atomically, loaded without unpickling code, with the RNG states that make
a resumed run continue exactly.

atomic_save writes to a temporary file in the target's directory, fsyncs it and os.replace()s it onto the
target, so a crash at any point leaves either the previous checkpoint or the new one, never a mix."""
import os
import random
import tempfile

import numpy as np
import torch

FORMAT = "trp-train-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable training checkpoint (missing, corrupted, other format or model)."""


def atomic_save(obj, path):
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # make the rename itself durable (best effort; not every platform can fsync a directory)
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_file(path):
    """torch.load(weights_only=True) with clear errors for a missing or corrupted file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupted or not a torch file ({first[:200]})") from None


def is_checkpoint(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path):
    obj = load_file(path)
    if not is_checkpoint(obj):
        raise CheckpointError(f"{path}: not a `trp train` checkpoint (no '{FORMAT}' header)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')!r}, this trp reads {VERSION}")
    missing = [k for k in ("config", "arch", "epoch", "model") if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return obj


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


__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_save", "load_file", "load_checkpoint",
           "is_checkpoint", "rng_state", "set_rng_state"]
