"""What every benchmark table script shares: timing, machine description, and one results schema written
atomically after every row (a time-boxed run that is cut off keeps the rows it measured).

Results schema (one JSON object per file):
    {"name": str, "date": ISO 8601 UTC, "command": str, "machine": {...}, "complete": bool,
     "rows": [ {...}, ... ], ...any table-specific keys (settings, backend info)}
"""
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "python", ROOT):  # run from a checkout without an install
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from trp._utils.storage import atomic_write  # noqa: E402
from trp_kernels import conv  # noqa: E402  (its CUDA timing)


def markdown_table(header, rows):
    """A markdown table: the header's cells, a separator with one column per header cell, and each row's cells
    (each converted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
    return "\n".join(lines)


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device="cpu"):
    """The machine a measurement ran on: CPU, cores, threads, load, library versions, GPU."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # triton is optional
        info["triton"] = None
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def command_line():
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


class Results:
    """A results file in the schema above, rewritten atomically (temporary file + rename) on every `add`."""

    def __init__(self, path, name, device="cpu", **extra):
        self.path = Path(path)
        self.doc = {"name": name, "date": now_iso(), "command": command_line(), "machine": machine(device),
                    "complete": False, **extra, "rows": []}
        self.write()

    @property
    def rows(self):
        return self.doc["rows"]

    def add(self, row):
        self.rows.append(row)
        self.write()
        return row

    def finish(self, **extra):
        self.doc.update(extra, complete=True)
        self.write()

    def write(self):
        atomic_write(self.path, lambda f: f.write(json.dumps(self.doc, indent=1).encode()))


class Budget:
    """Wall-clock budget of a time-boxed run: `over()` once `seconds` have passed (never for 0/None)."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds if seconds else None

    def over(self):
        return self.end is not None and time.monotonic() > self.end


def cuda_time_ms(fn, iters=20, graph=False):
    """Mean ms per call of fn on the GPU: best of two rounds of `iters` back-to-back calls timed with
    CUDA events (eager: includes launch overhead), or of one CUDA graph replaying `iters` calls (graph:
    GPU time only). None if the graph cannot be captured."""
    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    fn()
            run = g.replay
        except Exception:
            return None
    else:
        def run():
            for _ in range(iters):
                fn()
    # the library's own timing (what `auto` measures with): a warm-up run, then best of two timed runs
    return conv._cuda_ms(run, 1) / iters
