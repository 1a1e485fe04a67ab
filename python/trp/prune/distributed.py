# Over 300 lines: process groups, sharding and the worker launcher share one protocol.
"""TRP on several processes with torch.distributed: the pruner's sharded projection and `trp train`'s workers.

Sharding (RankPruner): every rank holds the same weights, so projecting every layer on every rank would do
the same work N times. Instead the pruner's groups are shared out by estimated cost (the batched SVD of B
p x q matrices costs about B * p * q * min(p, q)): a group heavier than a rank's fair share is first split
into smaller groups of whole layers, then the pieces go, heaviest first, to the least loaded rank. The
assignment depends only on the layer shapes and the world size, so every rank computes the same one and it
never changes during a run (state kept per group, such as a warm start, stays on its owner). After its own
groups, each rank receives the others' results (projected weights, ranks, nuclear subgradients) as their
owners computed them, bytes packed into one all-gather per projection, so every rank ends with bit-identical
weights and ranks.

Processes (`trp train --nproc N`, or started by torchrun): gloo on the CPU, NCCL on CUDA (one GPU per
worker), and a timeout on every collective (TRP_DIST_TIMEOUT seconds, default 600) so that a dead or stuck
worker ends the run with an error instead of a hang."""
import contextlib
import dataclasses
import datetime
import gc
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trp._utils import storage

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "TRP_DIST_TIMEOUT"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --- models and process groups ---------------------------------------------------------------------------

def unwrap(model):
    """The bare module of a DistributedDataParallel / DataParallel wrapper or a torch.compile'd model
    (parameters are shared with the wrapper, so the pruner can work on the bare module's names).

    Args:
        model: the model, wrapped any number of times, or a bare nn.Module (returned as is).

    Returns:
        The bare module.
    """
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


def active_group(process_group=None):
    """The process group to shard over: `process_group` if given, else the default group when
    torch.distributed is initialized; None when that group has a single process (nothing to shard).

    Args:
        process_group: a torch.distributed.ProcessGroup, or None (the default group, if initialized).
            Default None.

    Returns:
        The ProcessGroup, or None.

    Raises:
        TypeError: when process_group is neither a ProcessGroup nor None.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    return process_group if dist.get_world_size(process_group) > 1 else None


# --- sharding ---------------------------------------------------------------------------------------------

def projection_cost(matrix_shape):
    """Estimated cost of projecting one layer whose matrix (stack) has shape [..., p, q]: the number of
    matrices times p * q * min(p, q), the order of an SVD's flops.

    Args:
        matrix_shape: the shape of the layer's matrix stack, [..., p, q].

    Returns:
        The estimated cost, an int.
    """
    *lead, p, q = matrix_shape
    return math.prod(lead) * p * q * min(p, q)


def split_heavy(groups, costs, world):
    """Splits each group (a list of layers) whose total cost exceeds the fair share (total / world) into up
    to `world` contiguous pieces of whole layers.

    Args:
        groups: the groups, each a list of layers.
        costs: the per-layer cost of each group: costs[i] for every layer of groups[i].
        world: the number of ranks, an int >= 1.

    Returns:
        (pieces, piece costs): the lists of layers, in order, and the total cost of each.
    """
    total = sum(c * len(g) for g, c in zip(groups, costs))
    share = total / world
    pieces, piece_costs = [], []
    for g, c in zip(groups, costs):
        n = len(g)
        k = min(world, n, max(1, math.ceil(c * n / share - 1e-9))) if share > 0 else 1
        bounds = [round(j * n / k) for j in range(k + 1)]
        for a, b in zip(bounds, bounds[1:]):
            pieces.append(g[a:b])
            piece_costs.append(c * (b - a))
    return pieces, piece_costs


def assign(costs, world):
    """Owner rank of each item: heaviest first, each to the least loaded rank (ties: the lower rank, then
    the item order), the classical longest-processing-time rule. Deterministic for every rank.

    Args:
        costs: the cost of each item, a list of numbers.
        world: the number of ranks, an int >= 1.

    Returns:
        The owner rank of each item, a list of ints in [0, world).
    """
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


class Sharding:
    """Which rank projects which of the pruner's groups, and the exchange of the results.

    Args:
        group: the torch.distributed process group.
        owners: the owner rank of each group (assign()).
        costs: the estimated cost of each group.
    """

    def __init__(self, group, owners, costs):
        self.group, self.owners, self.costs = group, list(owners), list(costs)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def owns(self, i):
        """Whether this rank projects group `i`.

        Args:
            i: the group's index.

        Returns:
            True or False.
        """
        return self.owners[i] == self.rank

    def loads(self):
        """Estimated cost per rank."""
        out = [0.0] * self.world
        for i, c in enumerate(self.costs):
            out[self.owners[i]] += c
        return out

    def exchange(self, results, specs):
        """Every group's results, as its owner computed them, bit for bit, on every rank.

        Each rank packs the bytes of its results into one buffer (per device), and one all-gather exchanges
        them - one synchronisation per projection, whatever the number of groups, dtypes and ranks.

        Args:
            results: results[i] is this rank's tuple of tensors for a group it owns, None for the others'.
            specs: specs[i] is the (shape, dtype, device) of each tensor of group i's tuple (None for a result
                that is not produced).

        Returns:
            A list with every group's results, a list of tensors (None where not produced) per group.
        """
        out = [list(r) if r is not None else [None] * len(specs[i]) for i, r in enumerate(results)]
        layout = {}  # device -> owner -> [(group, index, shape, dtype, byte offset, bytes)]
        for i, group_specs in enumerate(specs):
            for j, spec in enumerate(group_specs):
                if spec is None:
                    continue
                shape, dtype, device = tuple(spec[0]), spec[1], torch.device(spec[2])
                items = layout.setdefault(device, [[] for _ in range(self.world)])[self.owners[i]]
                offset = items[-1][4] + _aligned(items[-1][5]) if items else 0
                items.append((i, j, shape, dtype, offset, math.prod(shape) * dtype.itemsize))
        for device, per_owner in layout.items():
            size = max(_aligned(it[-1][4] + it[-1][5]) if it else 0 for it in per_owner)
            if size == 0:
                continue
            mine = torch.zeros(size, dtype=torch.uint8, device=device)
            for i, j, shape, dtype, offset, nbytes in per_owner[self.rank]:
                t = out[i][j]
                if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
                    raise RuntimeError(f"sharded projection: group {i} result {j} is {t.dtype} {tuple(t.shape)} "
                                       f"on {t.device}, expected {dtype} {shape} on {device}")
                mine[offset:offset + nbytes] = t.contiguous().reshape(-1).view(torch.uint8)
            gathered = torch.empty(self.world * size, dtype=torch.uint8, device=device)
            _all_gather_single(gathered, mine, group=self.group)
            for owner, items in enumerate(per_owner):
                if owner == self.rank:
                    continue
                base = owner * size
                for i, j, shape, dtype, offset, nbytes in items:
                    out[i][j] = gathered[base + offset:base + offset + nbytes].view(dtype).view(shape)
        return [tuple(r) for r in out]


# torch >= 2.14 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _aligned(nbytes, to=16):
    """Byte offsets of the packed results are multiples of 16, so every slice can be viewed as its dtype."""
    return -(-nbytes // to) * to


def make_sharding(group, groups, costs):
    """(pieces, Sharding) for the pruner's groups (lists of layers) with per-layer costs.

    Args:
        group: the torch.distributed process group.
        groups: the pruner's groups, each a list of layers.
        costs: the per-layer cost of each group.

    Returns:
        (pieces, Sharding): the groups split by split_heavy() and which rank projects each piece.

    Raises:
        ValueError: when the processes selected different layers.
    """
    world = dist.get_world_size(group)
    # every rank must share the same layers out the same way: a model that differs across ranks (another
    # selection or architecture) would otherwise exchange mismatched results or hang
    mine = [(len(g), c) for g, c in zip(groups, costs)]
    others = all_gather_objects(mine, group)
    if any(o != mine for o in others):
        raise ValueError(f"RankPruner: the processes selected different layers (groups of (layers, cost) "
                         f"per rank: {others}); build the same model and selection on every rank")
    pieces, piece_costs = split_heavy(groups, costs, world)
    return pieces, Sharding(group, assign(piece_costs, world), piece_costs)


# --- metrics and buffers ------------------------------------------------------------------------------------

def current():
    """World of this process when torch.distributed is initialized with more than one process, else
    None. The local rank (the GPU index) comes from LOCAL_RANK, as torchrun sets it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def all_gather_objects(obj, group=None):
    """[obj of rank 0, obj of rank 1, ...] on every rank.

    Args:
        obj: this rank's picklable object.
        group: the process group. Default None: the default group.

    Returns:
        The list of every rank's object.
    """
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_sum(values, device, group=None):
    """[sum over ranks of each value] (floats), one all-reduce in float64.

    Args:
        values: this rank's numbers, a list.
        device: the device of the reduction (the backend's: CUDA for NCCL).
        group: the process group. Default None: the default group.

    Returns:
        A list of floats.
    """
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_true(flag, device, group=None):
    """Whether `flag` holds on every rank (one all-reduce): lets all ranks take the same branch.

    Args:
        flag: this rank's bool.
        device: the device of the reduction (the backend's: CUDA for NCCL).
        group: the process group. Default None: the default group.

    Returns:
        True when every rank's flag is true.
    """
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


@torch.no_grad()
def broadcast_buffers(module, src=0, group=None):
    """Copies rank src's buffers (BatchNorm statistics) to every rank, so that evaluation and the
    checkpoint see the same model everywhere.

    Args:
        module: the nn.Module whose buffers are overwritten in place.
        src: the rank to copy from. Default 0.
        group: the process group. Default None: the default group.
    """
    for b in module.buffers():
        dist.broadcast(b, src, group=group)


# --- processes ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class World:
    """One process's place in a multi-process run.

    Args:
        rank: the global rank, an int in [0, world_size).
        world_size: the number of processes.
        local_rank: the rank on this machine (the GPU index).
    """

    rank: int
    world_size: int
    local_rank: int


def timeout():
    """The collectives' timeout: TRP_DIST_TIMEOUT seconds (default 600)."""
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def torchrun_world():
    """World from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or None outside torchrun."""
    if not all(k in os.environ for k in TORCHRUN_ENV):
        return None
    try:
        rank, size, local = (int(os.environ[k]) for k in TORCHRUN_ENV)
    except ValueError:
        raise ValueError(f"torchrun environment: {', '.join(TORCHRUN_ENV)} must be integers") from None
    if not 0 <= rank < size or local < 0:
        raise ValueError(f"torchrun environment: RANK={rank} out of WORLD_SIZE={size}")
    return World(rank, size, local)


def usable_cpus():
    """The number of CPU cores this process may run on (its affinity where the OS tells, else the
    machine's).

    Returns:
        An int >= 1.
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_nproc(nproc, device, source=""):
    """Checks that `nproc` local workers fit this machine: one GPU each on CUDA, at most one per usable CPU
    core (usable_cpus) on the CPU.

    Args:
        nproc: the number of workers.
        device: the workers' device (type cpu or cuda).
        source: where the count came from, for the message (e.g. " (from the checkpoint PATH)").

    Returns:
        nproc.

    Raises:
        ValueError: too many workers for this machine, with the bound.
    """
    device = torch.device(device)
    if device.type == "cuda":
        have, what = torch.cuda.device_count(), "GPUs visible"
    else:
        have, what = usable_cpus(), "CPU cores this process may use"
    if nproc > have:
        raise ValueError(f"--nproc {nproc}{source} is more workers than the {have} {what}: give --nproc {have} "
                         "or fewer")
    return nproc


def worker_device(device, local_rank, nproc):
    """A worker's device: CUDA workers take one GPU each (cuda:LOCAL_RANK).

    Args:
        device: the run's device, a torch.device or str ("cpu", "cuda").
        local_rank: the worker's rank on this machine.
        nproc: the number of processes per machine.

    Returns:
        The torch.device of the worker.

    Raises:
        ValueError: when a CUDA device index is given with several processes, or there is no GPU for this
            local rank.
    """
    device = torch.device(device)
    if device.type != "cuda" or nproc == 1:
        return device
    if device.index is not None:
        raise ValueError(f"--device {device} with several processes: give --device cuda (each worker "
                         "takes the GPU of its local rank)")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"worker of local rank {local_rank} has no GPU: {torch.cuda.device_count()} "
                         "visible; use at most that many processes per machine")
    return torch.device("cuda", local_rank)


def backend_for(device):
    """The torch.distributed backend for `device`: "nccl" for CUDA, else "gloo".

    Args:
        device: a torch.device or str.

    Returns:
        The backend name, a str.
    """
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(world, device, init_method="env://"):
    """Initializes the default process group for `world` on `device` (gloo / NCCL) with the timeout, and
    destroys it at the end (a context manager that yields `world`). Before that, a garbage collection frees
    what still holds the group (FSDP2's modules and meshes sit in reference cycles), so that the group is not
    left to the interpreter's shutdown: the likely cause of a gloo worker that aborted once in CI after its
    work ("terminate called without an active exception"; not reproduced in 39 runs here).

    Args:
        world: the World of this process.
        device: the process's device (CUDA: it becomes the current device).
        init_method: the rendezvous URL for torch.distributed.init_process_group. Default "env://".
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend_for(device), init_method=init_method, rank=world.rank,
                            world_size=world.world_size, timeout=timeout(), **kw)
    try:
        yield world
    finally:
        gc.collect()
        dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A worker process failed: the message is the worker's error (or how it died)."""


PARENT_POLL_S = 1.0


def _exit_with_parent(parent):
    """A worker's watchdog: SIGTERM to itself once the parent that spawned it is gone (killed with SIGKILL,
    it could not stop its workers), so that no orphan goes on training."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


_INTERRUPTED = "interrupted"  # what an interrupted worker reports


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _worker_main(index, fn, args, nproc, init_method, errors):
    world = World(index, nproc, index)
    # SIGTERM (from the parent's stop, or the watchdog) ends the worker through its exception path, so that
    # writes in progress are cleaned up and its resources released, as on Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        fn(world, init_method, *args)
    except BaseException as exc:  # report the worker's own one-line error to the parent
        msg = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, KeyboardInterrupt):
            msg = _INTERRUPTED
        elif not (isinstance(exc, (ValueError, OSError)) or type(exc).__module__.startswith("trp")):
            msg = f"{type(exc).__name__}: {msg}"  # not one of trp's own messages: say what it is
        with contextlib.suppress(OSError):  # the parent may be gone
            errors.put((index, msg))
        raise SystemExit(2) from None


RENDEZVOUS_PREFIX = ".trp-rendezvous-"
_RENDEZVOUS = re.compile(re.escape(RENDEZVOUS_PREFIX) + r"(?P<pid>\d+)-[A-Za-z0-9_]+")


def clean_stale_rendezvous(directory):
    """Removes the rendezvous directories that `spawn` parents killed without a chance to clean up
    (SIGKILL) left in `directory`: this user's, whose parent's PID is gone; never a link.

    Args:
        directory: where spawn made them (its workdir).

    Returns:
        The names of the removed directories.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _RENDEZVOUS.fullmatch(name)
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path) if m is not None else None
            if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() \
                    or storage.writer_alive(int(m["pid"])):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


def _stop(procs, grace_s=5.0):
    """Terminates the workers still running (SIGTERM, then SIGKILL after grace_s) and reaps them."""
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs.processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def spawn(fn, nproc, *args, workdir=None):
    """Runs fn(world, init_method, *args) in `nproc` fresh local processes (rank = local rank = index)
    that rendezvous through a file in a fresh private directory `.trp-rendezvous-PID-XXXX` of `workdir`
    (default: the temporary directory), removed at the end; ones left by a killed parent are removed at the
    next start. Returns when all succeed; as soon as one fails or dies the others are terminated and
    WorkerError says which and why. An exception in this process (KeyboardInterrupt: Ctrl-C, or SIGTERM
    made one) terminates the workers and propagates. Workers whose parent dies (SIGKILL) stop themselves.

    Args:
        fn: fn(world, init_method, *args) runs in every worker.
        nproc: the number of workers.
        *args: passed to fn (picklable).
        workdir: the directory of the rendezvous directory (default: the temporary directory).

    Raises:
        WorkerError: a worker failed or died.
        KeyboardInterrupt: this process or a worker was interrupted; all workers are stopped.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    workdir = os.path.abspath(workdir or tempfile.gettempdir())
    os.makedirs(workdir, exist_ok=True)
    clean_stale_rendezvous(workdir)
    tmp = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-", dir=workdir)  # mode 0700, never a link
    procs = None
    try:
        procs = mp.start_processes(_worker_main, args=(fn, args, nproc, f"file://{tmp}/rendezvous", errors),
                                   nprocs=nproc, join=False, start_method="spawn")
        try:
            while not procs.join():
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            reported = {}
            while not errors.empty():
                index, msg = errors.get()
                reported.setdefault(index, msg)
            index = exc.error_index
            if reported.get(index) == _INTERRUPTED:  # Ctrl-C reached the workers first
                raise KeyboardInterrupt from None
            if index not in reported:  # killed, or died without a word: that is the cause
                raise WorkerError(f"worker {index} of {nproc} died ({' '.join(str(exc).split())}); all "
                                  "workers were stopped") from None
            raise WorkerError(f"worker {index} of {nproc} failed: {reported[index]}") from None
    except BaseException:
        if procs is not None:
            _stop(procs)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["unwrap", "active_group", "current", "all_gather_objects", "projection_cost", "split_heavy", "assign",
           "Sharding", "make_sharding", "all_reduce_sum", "all_true", "broadcast_buffers", "World", "timeout",
           "torchrun_world", "worker_device", "check_nproc", "usable_cpus", "clean_stale_rendezvous",
           "backend_for", "process_group", "WorkerError", "spawn",
           "DEFAULT_TIMEOUT_S", "TIMEOUT_ENV"]
