"""Wall-clock timing, the one home for the library and the benchmarks: CPU calls with time.perf_counter, CUDA
work either between two synchronizations or between two CUDA events."""
import statistics
import time

import torch


def sync(device=None):
    """Waits for the CUDA work queued so far: on `device` when it is a CUDA device, on the current one when
    `device` is None and CUDA is available; a no-op for CPU devices.

    Args:
        device: a torch.device or str, or None (the current CUDA device, if any). Default None.
    """
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn, device=None):
    """Seconds of one call of fn, synchronizing CUDA before and after (see sync).

    Args:
        fn: the function to call, with no arguments.
        device: the device to synchronize, as for sync(). Default None.

    Returns:
        The wall-clock seconds, a float.
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def call_seconds(fn, cuda=False):
    """Seconds of one call of fn: between two CUDA events (the end one waited for) when `cuda`, else with
    perf_counter (nothing synchronized).

    Args:
        fn: the function to call, with no arguments.
        cuda: time with CUDA events on the current stream. Default False.

    Returns:
        The seconds, a float.
    """
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, repeats, device=None):
    """The median seconds of `repeats` calls after one warm-up call, each timed as timed() does.

    Args:
        fn: the function to call, with no arguments.
        repeats: the number of timed calls, an int >= 1.
        device: the device to synchronize after each call, as for sync(). Default None.

    Returns:
        (median seconds, list of all samples in seconds).
    """
    fn()  # warm-up: allocations, workspaces, lazy initialisation
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved(fns, repeats=20, warmup=2):
    """Median seconds per call of each fn, timed with perf_counter in alternation (a, b, a, b, ...), so that
    load changes on a shared machine affect all alike.

    Args:
        fns: the functions to compare, each called with no arguments.
        repeats: timed calls of each function, an int >= 1. Default 20.
        warmup: untimed calls of each function first, an int >= 0. Default 2.

    Returns:
        A list of floats: the median seconds per call of each function, in the order of `fns`.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(call_seconds(fn))
    return [statistics.median(t) for t in times]


__all__ = ["sync", "timed", "call_seconds", "median_time", "interleaved"]
