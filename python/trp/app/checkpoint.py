"""Training checkpoints: sealed with a SHA-256 of everything they hold (checked on every load), written
atomically (storage.atomic_save), loaded without unpickling code and checked field by field (records), with
the RNG states that make a resumed run continue exactly."""
import random

import numpy as np
import torch

from trp._utils.integrity import SEAL, digest_tree, seal_problem, unsealed
from trp._utils.storage import atomic_save, read_torch
from trp.app.config import TrainConfig
from trp.deploy import io, records

FORMAT = "trp-train-checkpoint"
VERSION = 2  # 2: sealed ("sha256"); 1 carried no checksum
REQUIRED = ("config", "arch", "epoch", "model")


class CheckpointError(ValueError):
    """A file that is not a usable training checkpoint (corrupted, other format or model)."""


def save_checkpoint(state, path):
    """Writes the checkpoint dict `state` to `path` atomically, sealed with the SHA-256 of its contents."""
    body = unsealed(state)
    atomic_save({**body, SEAL: digest_tree(body)}, path)


def is_checkpoint(obj):
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def verify_checkpoint(obj, path):
    """`obj` (as loaded from `path`) if it is an intact checkpoint this trp reads, with every field valid
    (check_checkpoint; its config completed with the defaults of options it predates), else
    CheckpointError naming the file (and the field)."""
    if not is_checkpoint(obj):
        raise CheckpointError(f"{path}: not a `trp train` checkpoint (no '{FORMAT}' header)")
    version = obj.get("version")
    if version != VERSION:
        old = " (written by an older trp, without a checksum; start a new run)" if version == 1 else ""
        raise CheckpointError(f"{path}: checkpoint version {version!r}, this trp reads {VERSION}{old}")
    problem = seal_problem(obj, lambda: digest_tree(unsealed(obj)))
    if problem == "missing":
        raise CheckpointError(f"{path}: checkpoint has no checksum (damaged, or not written by trp)")
    if problem == "mismatch":
        raise CheckpointError(f"{path}: corrupted: its contents do not match the SHA-256 checksum written "
                              "with it")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    try:  # a seal does not make a record trustworthy: every field against its schema
        return check_checkpoint(obj, path)
    except records.RecordError as exc:
        raise CheckpointError(str(exc)) from None


def _rng(state, path, field):
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor) \
            or not isinstance(state.get("python"), (list, tuple)) or not isinstance(state.get("numpy"), (list, tuple)):
        raise records.fail(path, field, "must be the RNG states trp saves (torch, python, numpy)")
    for key in ("torch", "loader"):
        if key in state and (not isinstance(state[key], torch.Tensor) or state[key].dtype != torch.uint8):
            raise records.fail(path, f"{field}[{key!r}]", "must be a uint8 tensor")
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                      for t in cuda):
        raise records.fail(path, f"{field}['cuda']", "must be a list of uint8 tensors")


def check_checkpoint(obj, path):
    """Checks a sealed `trp train` checkpoint (verify_checkpoint) field by field: its config
    (every option by its rule), architecture, epoch, model weights (finite, consistent with the
    architecture: train.model_from_checkpoint builds it on the meta device first), optimizer, scheduler,
    pruner, RNG and history records. Replaces obj["config"] by the checked config (options a checkpoint of
    an older trp lacks take their defaults).

    Args:
        obj: the loaded checkpoint, its seal already verified.
        path: the file, for the message.

    Returns:
        obj.

    Raises:
        records.RecordError: naming the file and the field.
    """
    try:
        cfg = TrainConfig.from_record(obj["config"])
    except ValueError as exc:
        raise records.fail(path, "config", records.first_line(exc)) from None
    obj["config"] = cfg.to_dict()
    model = records.tensors(obj["model"], path, "model")
    records.check_arch(obj["arch"], model, path)
    if obj["arch"]["name"] != cfg.model:
        raise records.fail(path, "arch['name']", f"{obj['arch']['name']!r} but the config trained {cfg.model!r}")
    records.integer(obj["epoch"], path, "epoch", 0, cfg.epochs)
    for key in ("optimizer", "scheduler"):
        if not isinstance(obj.get(key), dict):
            raise records.fail(path, key, f"must be a dict, got {type(obj.get(key)).__name__}")
    opt = obj["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list) \
            or not all(isinstance(g, dict) for g in opt["param_groups"]):
        raise records.fail(path, "optimizer", "must hold 'state' (a dict) and 'param_groups' (a list of dicts)")
    for i, group in enumerate(opt["param_groups"]):
        records.plain(group, path, f"optimizer['param_groups'][{i}]")
    records.plain(obj["scheduler"], path, "scheduler")
    if obj.get("pruner") is not None and not isinstance(obj["pruner"], dict):
        raise records.fail(path, "pruner", f"must be a dict or None, got {type(obj['pruner']).__name__}")
    _rng(obj.get("rng"), path, "rng")
    ranks = obj.get("rng_ranks") or []
    if not isinstance(ranks, list) or len(ranks) > cfg.nproc:
        raise records.fail(path, "rng_ranks", f"must be a list of at most nproc = {cfg.nproc} RNG states")
    for i, r in enumerate(ranks):
        _rng(r, path, f"rng_ranks[{i}]")
    history = obj.get("history", [])
    if not isinstance(history, list) or len(history) > obj["epoch"] or not all(isinstance(h, dict) for h in history):
        raise records.fail(path, "history", f"must be a list of at most epoch = {obj['epoch']} dicts")
    records.plain(history, path, "history")
    if obj.get("scaler") is not None:
        records.plain(obj["scaler"], path, "scaler")
    # every other tensor (optimizer momenta, pruner subgradients and bases) finite as well
    for key in ("optimizer", "pruner"):
        for where, t in records.all_tensors(obj.get(key), key, {}).items():
            records.check_finite({where: t}, path, "")
    return obj


def read_run_file(path):
    """The file at `path`, read once and verified by its own format's checks: ("checkpoint", the checkpoint)
    for a `trp train` checkpoint, ("model", the payload) for a trp.save model file, else (None, what the file
    holds)."""
    obj = read_torch(path)
    if is_checkpoint(obj):
        return "checkpoint", verify_checkpoint(obj, path)
    if io.is_model_file(obj):
        return "model", io.verify_model_file(obj, path)
    return None, obj


def load_checkpoint(path):
    return verify_checkpoint(read_torch(path), path)


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
           "check_checkpoint", "is_checkpoint", "read_run_file", "rng_state", "set_rng_state"]
