"""Wall-clock timing, the one home for the library and the benchmarks: CPU calls with time.perf_counter, CUDA
work either between two synchronizations or between two CUDA events."""
import statistics
import time

import torch


def sync(device=None):
    """Waits for the CUDA work queued so far: on `device` when it is a CUDA device, on the current one when
    `device` is None and CUDA is available; a no-op for CPU devices."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn, device=None):
    """Seconds of one call of fn, synchronizing CUDA before and after (see sync)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def call_seconds(fn, cuda=False):
    """Seconds of one call of fn: between two CUDA events (the end one waited for) when `cuda`, else with
    perf_counter (nothing synchronized)."""
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
    """(median seconds, all samples) of `repeats` calls after one warm-up call, each timed by timed()."""
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
    load changes on a shared machine affect all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t.append(call_seconds(fn))
    return [statistics.median(t) for t in times]


__all__ = ["sync", "timed", "call_seconds", "median_time", "interleaved"]
