"""The setup of a training run: its initial weights (--init), the seeds, deterministic mode, the budget
controller's arguments and the checks of a resumed run's state."""
import contextlib
import copy
import os
import random

import numpy as np
import torch

from trp._utils.weights import load_weights
from trp.app import checkpoint as ckpt
from trp.core.selection import plan_layers
from trp.deploy import io, records
from trp.deploy.latency_budget import LatencyCost, LatencyTable, Runtime


def file_id(path):
    """(device, inode) of `path`, None when absent: an atomic write gives the file a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_scheduler(saved, fresh):
    """A scheduler state has the keys and value types of this run's scheduler (its load_state_dict would
    take any attribute)."""
    if set(saved) != set(fresh):
        raise ValueError(f"scheduler state keys {sorted(saved)} are not {sorted(fresh)}")
    for k, v in fresh.items():
        if v is not None and not isinstance(saved[k], type(v)) and not (
                isinstance(v, (int, float)) and isinstance(saved[k], (int, float)) and not isinstance(saved[k], bool)):
            raise ValueError(f"scheduler {k} must be a {type(v).__name__}, got {type(saved[k]).__name__}")
    if any(not isinstance(m, int) or isinstance(m, bool) for m in saved.get("milestones", {})):
        raise ValueError("scheduler milestones must be epoch numbers")


def read_initial_weights(path):
    """The state_dict that --init names: a trp checkpoint's or trp.save file's (both verified against
    their checksums and checked field by field), or a plain state_dict file (e.g. torchvision's;
    {"state_dict": ...} too) of finite tensors.

    Args:
        path: the file.

    Returns:
        {name: tensor}.

    Raises:
        checkpoint.CheckpointError: not a state_dict, damaged, or holding NaN / infinite values.
        OSError: the file cannot be read (missing, a directory, a FIFO...).
    """
    kind, obj = ckpt.read_run_file(path)
    if kind == "checkpoint":
        state = obj["model"]
    elif kind == "model":
        state = io.model_state_dict(obj)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        state = obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ckpt.CheckpointError(f"--init {path}: not a state_dict (a dict of tensors)")
    try:
        records.tensors(state, path, "state_dict")  # NaN / inf weights: the file is bad, not the run
    except records.RecordError as exc:
        raise ckpt.CheckpointError(f"--init {exc}") from None
    return state


def load_initial_weights(model, state, path):
    """Loads the --init state_dict into `model`; every key and shape must match (the error names them)."""
    load_weights(model, state, f"--init {path}: weights do not fit {model.trp_arch['name']}",
                 error=ckpt.CheckpointError)


LATENCY_CACHE = "latency.json"  # --target-latency's layer timings, in the run directory


def budget_args(cfg, bundle, latency_cost=None):
    """RankPruner's target_speedup / input_size / warmup / gain for cfg (none without --target-speedup or
    --target-latency): the goal ramps over --budget-ramp of the run's projections; with --target-latency, the
    measured `latency_cost` is what the target counts."""
    if cfg.target_speedup is None and cfg.target_latency is None:
        return {}
    steps = -(-len(bundle.train) // cfg.batch_size)  # an upper bound: a last batch of one is dropped
    steer = {"warmup": round(cfg.budget_ramp * cfg.epochs * steps / cfg.period), "gain": cfg.budget_gain}
    if cfg.target_latency is not None:
        return {"target_speedup": cfg.target_latency, "costs": latency_cost, **steer}
    return {"target_speedup": cfg.target_speedup, "input_size": bundle.input_size[1:], **steer}


def latency_runtime(runtime, batch_size, out):
    """The trp.Runtime of --target-latency: `runtime` at `batch_size`, its layer timings cached in the run
    directory `out` (LATENCY_CACHE), so that the final decomposition and a resumed run do not measure again."""
    return Runtime(runtime, batch_size=batch_size, cache=os.path.join(out, LATENCY_CACHE))


def latency_cost(cfg, model, bundle):
    """The measured LatencyCost of --target-latency for the layers RankPruner selects by default (timed on a
    CPU copy for onnxruntime); raises ValueError, before any training, when the target is unreachable or the
    selection has attention q/k/v rows (not timed on their own)."""
    runtime = latency_runtime(cfg.runtime, cfg.latency_batch_size, cfg.out)
    source = copy.deepcopy(model).cpu() if cfg.runtime == "onnxruntime" else model
    targets = plan_layers(source, cfg.scheme, warn=False).targets
    rows = [t.name for t in targets if t.rows is not None]
    if rows:
        raise ValueError(f"--target-latency times whole layers, and this model's attention q/k/v ({rows[0]}, ...) "
                         "are rows of one weight: use --target-speedup")
    table = LatencyTable(source, cfg.scheme, targets, bundle.input_size[1:], runtime)
    cost = LatencyCost(table)
    cost.check_target(cfg.target_latency, "--target-latency")
    return cost


@contextlib.contextmanager
def deterministic_mode(enabled=True, threads=1):
    """Within: torch.use_deterministic_algorithms, `threads` CPU threads (how reductions are split, so
    their rounding, depends on the thread count), cuDNN autotuning off; the previous settings after."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.get_num_threads(), torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        torch.backends.cudnn.benchmark = saved[3]


def seed_worker(worker_id):
    """A DataLoader worker's numpy and python RNGs seeded from its torch seed."""
    seed = torch.initial_seed() % 2**32  # the loader's generator seeded it
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed):
    """torch, numpy and python RNGs seeded from `seed`."""
    torch.manual_seed(seed)  # seeds are validated (TrainConfig): 0 <= seed < 2**63
    np.random.seed(seed % 2**32)
    random.seed(seed)


__all__ = ["read_initial_weights", "load_initial_weights", "budget_args", "deterministic_mode",
           "seed_worker", "seed_everything", "check_scheduler", "file_id"]
