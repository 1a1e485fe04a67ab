"""Kernels that check themselves on first use.

The custom kernels (the CUDA projection and its warm step, each fused Triton convolution) have been tested in CI
on the CPU, but a GPU we never saw may run them differently (a compiler, a driver, an architecture). So the first
time a kernel runs for a new signature (device, dtype, shape class, configuration) it is compared once with the
float64 reference on a probe built from the real call's shapes (trp_kernels/probes.py). On disagreement beyond
the dtype's tolerance the library warns once with the details, marks that kernel unusable on that device for the
rest of the process and falls back to the reference / ATen path: never a silently wrong result.

Settings (environment, read at every check):
    TRP_KERNELS_SELF_CHECK          1 (default): the CUDA and Triton kernels check themselves; all: the C++ CPU
                                    kernels too (the CPU kernels run the code CI runs: off by default); 0: off,
                                    for users who have validated their setup.
    TRP_KERNELS_SELF_CHECK_FAILURE  fallback (default): warn and fall back; error: raise SelfCheckError instead
                                    (tests/conftest.py and benchmarks/gpu_suite.sh set it: a failed check must
                                    fail the test, not hide behind the fallback).

Cost: one reference computation per new signature (a float64 SVD of at most two probe matrices of the call's
shape; for a convolution the float64 two-convolution reference of the call), then a dictionary look-up per call.
Nothing is checked while a CUDA graph is being captured (the first call outside the capture checks). Verdicts are
kept per process and listed by trp_kernels.backend_info()["self_check"].

Under torch.distributed, ranks that make the same calls in the same order (replicated code: every rank projects
the same matrices) must take the same decision, or their results drift apart: inside `agreement(group)` each new
verdict is all-reduced (one all-reduce of one flag: unusable if any rank failed). It is not automatic because
ranks often do not make the same calls: RankPruner shards the layers over the ranks and exchanges the results (so
they stay identical whatever each rank's kernels), and the fused convolutions' auto mode may choose differently
per rank; a collective that only some ranks reach would hang."""
import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Optional

import torch

Device = str | torch.device

ENV = "TRP_KERNELS_SELF_CHECK"
FAILURE_ENV = "TRP_KERNELS_SELF_CHECK_FAILURE"
SCOPES = ("1", "0", "all")
FAILURES = ("fallback", "error")


class SelfCheckError(RuntimeError):
    """A kernel disagreed with the float64 reference on its first-use probe.

    Raised instead of the warning and fallback when TRP_KERNELS_SELF_CHECK_FAILURE=error.
    """


def scope() -> str:
    """The TRP_KERNELS_SELF_CHECK setting, read from the environment at every call.

    Returns:
        "1" (default: the CUDA and Triton kernels check themselves), "all" (the C++ CPU kernels too) or
            "0" (off).

    Raises:
        ValueError: the variable holds another value.
    """
    value = os.environ.get(ENV, "1").strip().lower() or "1"
    if value not in SCOPES:
        raise ValueError(f"{ENV} must be one of {', '.join(SCOPES)}, got {value!r}")
    return value


def failure_mode() -> str:
    """The TRP_KERNELS_SELF_CHECK_FAILURE setting, read from the environment at every call.

    Returns:
        "fallback" (default: warn and fall back to the reference) or "error" (raise SelfCheckError).

    Raises:
        ValueError: the variable holds another value.
    """
    value = os.environ.get(FAILURE_ENV, "fallback").strip().lower() or "fallback"
    if value not in FAILURES:
        raise ValueError(f"{FAILURE_ENV} must be one of {', '.join(FAILURES)}, got {value!r}")
    return value


def applies(device: Device, compiled_cpu: bool = False) -> bool:
    """Whether a kernel running on `device` checks itself under the current TRP_KERNELS_SELF_CHECK setting.

    Args:
        device: the device the kernel runs on (a torch.device or its name, e.g. "cuda:0").
        compiled_cpu: True for the C++ CPU kernels, which check themselves only under the setting "all"
            (default False: CUDA kernels and Triton's CPU interpreter, checked unless the setting is "0").

    Returns:
        Whether the kernel's first use per signature is verified.

    Raises:
        ValueError: TRP_KERNELS_SELF_CHECK holds an invalid value.
    """
    s = scope()
    if s == "0":
        return False
    return s == "all" or not (compiled_cpu and torch.device(device).type == "cpu")


_lock = threading.RLock()  # one check at a time: a check measures nothing, but two would compute it twice
_verdicts = {}             # (kernel, device, *signature) -> verdict dict
_unusable = {}             # (kernel, device) -> the failed verdict
_agreement = threading.local()


@contextlib.contextmanager
def agreement(process_group: Optional["torch.distributed.ProcessGroup"] = None) -> Iterator[None]:
    """Context in which every new verdict is agreed on by the ranks of a process group.

    One all-reduce per new verdict: the kernel is unusable everywhere if its check failed on any rank. Use it
    only around code that every rank runs identically (the same calls in the same order), see the module
    docstring; outside an initialised torch.distributed run it changes nothing.

    Args:
        process_group: a torch.distributed ProcessGroup, or None (default) for the default group.

    Yields:
        Nothing; the agreement holds until the context exits (contexts nest, per thread).
    """
    previous = getattr(_agreement, "group", None)
    _agreement.group = process_group if process_group is not None else torch.distributed.group.WORLD
    try:
        yield
    finally:
        _agreement.group = previous


def _all_ranks_ok(ok):
    group = getattr(_agreement, "group", None)
    if group is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _capturing(device):
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def usable(kernel: str, device: Device) -> bool:
    """Whether `kernel` may still run on `device`: False when its self-check failed earlier in this process.

    Args:
        kernel: the kernel's name ("lowrank_project", "lowrank_project_warm", "triton_channel", ...).
        device: the device (a torch.device or its name).

    Returns:
        False when the kernel was marked unusable on that device, else True.
    """
    return (kernel, str(torch.device(device))) not in _unusable


def checked(kernel: str, device: Device, signature: tuple[Hashable, ...]) -> bool:
    """Whether `kernel` has a verdict for this signature on `device`, i.e. no check is due.

    Args:
        kernel: the kernel's name ("lowrank_project", "lowrank_project_warm", "triton_channel", ...).
        device: the device (a torch.device or its name).
        signature: the tuple of hashables passed to verify (dtype, shape class, configuration).

    Returns:
        Whether a verdict (pass or fail) is recorded.
    """
    return (kernel, str(torch.device(device)), *signature) in _verdicts


def verify(kernel: str, device: Device, signature: tuple[Hashable, ...],
           check: Callable[[], tuple[Optional[bool], str]]) -> bool:
    """Whether `kernel` may run on `device`, checking it on its first call per signature.

    False when the kernel is marked unusable on that device. On the first call per signature, the verdict of
    check() (agreed across ranks inside `agreement`) is recorded; a failed one marks the kernel unusable on
    that device and warns (or raises SelfCheckError). Skipped (True, no verdict) while a CUDA graph is
    captured.

    Args:
        kernel: the kernel's name ("lowrank_project", "lowrank_project_warm", "triton_channel", ...).
        device: the device it runs on (a torch.device or its name).
        signature: a tuple of hashables: dtype, shape class, configuration.
        check: a callable returning (ok, detail): ok a bool, or None for inconclusive (e.g. non-finite input:
            no verdict, the kernel runs, and the next call checks again); detail a short description.

    Returns:
        Whether the kernel may run.

    Raises:
        SelfCheckError: the check failed and TRP_KERNELS_SELF_CHECK_FAILURE=error.
    """
    dev = str(torch.device(device))
    key = (kernel, dev, *signature)
    if (kernel, dev) in _unusable:
        return False
    if key in _verdicts or _capturing(device):
        return True
    with _lock:
        if (kernel, dev) in _unusable:
            return False
        if key in _verdicts:
            return True
        start = time.perf_counter()
        ok, detail = check()
        if ok is None:
            return True
        agreed = _all_ranks_ok(ok)
        if ok and not agreed:
            detail = f"{detail}; failed on another rank"
        verdict = {"kernel": kernel, "device": dev, "signature": [str(s) for s in signature], "ok": agreed,
                   "detail": detail, "seconds": round(time.perf_counter() - start, 4)}
        _verdicts[key] = verdict
        if agreed:
            return True
        _unusable[(kernel, dev)] = verdict
        message = (f"trp_kernels: the {kernel} kernel on {dev} disagrees with the float64 reference on its "
                   f"self-check ({', '.join(verdict['signature'])}): {detail}")
        if failure_mode() == "error":
            raise SelfCheckError(message)
        warnings.warn(f"{message}; it is not used on {dev} for the rest of this process (the reference path "
                      f"runs instead)", RuntimeWarning, stacklevel=3)
        return False


def info() -> dict:
    """The setting and every verdict of this process (trp_kernels.backend_info()["self_check"]).

    Returns:
        A dict: "setting" (TRP_KERNELS_SELF_CHECK, or "invalid: ..."), "failure"
            (TRP_KERNELS_SELF_CHECK_FAILURE), "verdicts" (one dict per check: kernel, device, signature, ok,
            detail, seconds) and "unusable" (sorted "kernel@device" names).
    """
    try:
        setting = scope()
    except ValueError as exc:
        setting = f"invalid: {exc}"
    with _lock:
        verdicts = [dict(v) for v in _verdicts.values()]
        unusable = sorted(f"{k}@{d}" for k, d in _unusable)
    return {"setting": setting, "failure": os.environ.get(FAILURE_ENV, "fallback"), "verdicts": verdicts,
            "unusable": unusable}


def reset() -> None:
    """Forget every verdict, including the unusable marks (tests; a process normally keeps them)."""
    with _lock:
        _verdicts.clear()
        _unusable.clear()


__all__ = ["SelfCheckError", "verify", "usable", "checked", "agreement", "applies", "info", "reset", "scope",
           "failure_mode"]
