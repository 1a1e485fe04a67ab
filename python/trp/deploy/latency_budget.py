"""Latency-targeted decomposition: ranks chosen so that the network runs a target number of times faster than
the dense one, by time measured in the runtime it is deployed to, not by multiply-adds.

    compact = trp.decompose(model, "channel", target_latency=1.5, input_size=(3, 224, 224),
                            runtime=trp.Runtime("onnxruntime", batch_size=1, cache="latency.json"))
    print(compact.trp_latency_budget)   # target, measured speed-up, per-layer ranks and times, attempts

1. LatencyTable times every selected layer once at its real input shape: the dense layer, and its factorized
   form at a few candidate ranks (multiples of `multiple` below the rank where the multiply-adds stop paying),
   all in alternation in one comparison. Layers of the same geometry and input are timed once, and a cache
   file keeps the times per (runtime, device, threads, dtype, batch) for the next run.
2. allocate_latency spends the time budget (dense time / target) greedily on the rank steps with the most
   energy per second, the rule trp.prune.budget.allocate applies to multiply-adds. A candidate that is not
   faster than a higher rank (or than dense) is never chosen.
3. decompose builds the network at those ranks and times it against the dense one; if the measured speed-up
   falls short (per-layer times do not add up exactly: caches, memory traffic between layers), the allocation
   is repeated for a goal raised by the shortfall, a few times. The result records every attempt."""
import json
import math
import os
import warnings

import torch
import torch.nn as nn

from trp._utils import checks, storage
from trp.core.schemes import layer_matrix_shape, layer_scheme
from trp.cost.flops import io_shapes
from trp.cost.macs import input_shape, pay_rank
from trp.deploy.latency import RUNTIMES, RuntimeTimer
from trp.nn.modules import FACTORIZED, FactorizedLinear, conv_padding4
from trp.prune.budget import layer_gains

CACHE_VERSION = 1


class Runtime:
    """Where and how layer and network latencies are measured for target_latency.

    Args:
        name: "eager" (PyTorch on the model's device, CPU or CUDA) or "onnxruntime" (ONNX Runtime, CPU).
            Default "eager".
        batch_size: the batch size measured at, an int >= 1. Default 1.
        threads: intra-op threads while timing, an int >= 1, or None for the runtime's default. Default None.
        repeats: timed calls per module and comparison (their median counts), an int >= 1. Default 20.
        cache: a JSON file of measured layer times, read when it exists and rewritten with the new
            measurements (atomically, never through a symlink), or None (no file). Default None.
        timer: an object whose compare(modules, x) returns the seconds per call of each module on x, or None:
            trp.deploy.latency.RuntimeTimer for `name`. Default None.

    Raises:
        ValueError: when an argument is out of range.
    """

    def __init__(self, name="eager", batch_size=1, threads=None, repeats=20, cache=None, timer=None):
        self.name = checks.choice(name, RUNTIMES, "runtime")
        self.batch_size = checks.integer(batch_size, "batch_size", 1)
        self.threads = None if threads is None else checks.integer(threads, "threads", 1)
        self.repeats = checks.integer(repeats, "repeats", 1)
        self.cache = None if cache is None else os.fspath(cache)
        self.timer = timer

    def timer_for(self, device):
        """The timer measuring on `device`: the one given, else a RuntimeTimer.

        Args:
            device: the model's device.

        Returns:
            An object with compare(modules, x).
        """
        return self.timer or RuntimeTimer(self.name, device, self.threads, self.repeats)

    def key(self, device, dtype):
        """The part of a cache key that says where the times were measured.

        Args:
            device: the model's device.
            dtype: the model's dtype.

        Returns:
            A str.
        """
        timer = "" if self.timer is None else f"|timer={type(self.timer).__name__}"
        return f"{self.name}|{torch.device(device)}|threads={self.threads}|{dtype}|batch={self.batch_size}{timer}"

    def __repr__(self):
        return (f"Runtime({self.name!r}, batch_size={self.batch_size}, threads={self.threads}, "
                f"repeats={self.repeats}, cache={self.cache!r})")


def read_cache(path):
    """{key: seconds} from a cache file, {} when it does not exist.

    Args:
        path: the file.

    Returns:
        A dict of str -> float.

    Raises:
        ValueError: when the file is not a latency cache of this version (it is then left as it is).
    """
    if path is None or not os.path.exists(path):
        return {}
    try:
        with storage.open_regular(path) as f:
            data = json.loads(f.read())
        entries = data["entries"] if data.get("version") == CACHE_VERSION else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"latency cache {path}: not readable as a trp latency cache ({exc})") from None
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, float) and math.isfinite(v) and v > 0 for k, v in entries.items()):
        raise ValueError(f"latency cache {path}: not a trp latency cache of version {CACHE_VERSION}; remove it or "
                         "name another file")
    return dict(entries)


def write_cache(path, entries):
    """Writes {key: seconds} to a cache file, atomically.

    Args:
        path: the file.
        entries: the dict of str -> float.
    """
    text = json.dumps({"version": CACHE_VERSION, "entries": dict(sorted(entries.items()))}, indent=0)
    storage.atomic_write(path, lambda f: f.write(text.encode()))


def candidate_ranks(top, multiple, points):
    """The ranks measured for one layer: multiples of `multiple` up to `top`, thinned to at most `points` evenly
    spread ones (the largest kept); below one multiple, up to `points` ranks spread over 1..top.

    Args:
        top: the largest rank worth measuring (where the factorized multiply-adds still pay), an int.
        multiple: the rank granularity the runtime favours, an int >= 1.
        points: the most ranks to measure, an int >= 1.

    Returns:
        A sorted list of distinct ints in [1, top] (empty when top < 1).
    """
    if top < 1:
        return []
    grid = list(range(multiple, top + 1, multiple)) or list(range(1, top + 1))
    if len(grid) <= points:
        return grid
    return sorted({grid[round(i * (len(grid) - 1) / (points - 1))] for i in range(points)} if points > 1
                  else {grid[-1]})


def _geometry(layer, scheme, shape):
    if isinstance(layer, nn.Linear):
        return f"linear|{layer.in_features}|{layer.out_features}|{layer.bias is not None}|{list(shape)}"
    return (f"conv|{scheme}|{layer.in_channels}|{layer.out_channels}|{list(layer.kernel_size)}|"
            f"{list(layer.stride)}|{list(conv_padding4(layer))}|{list(layer.dilation)}|{layer.groups}|"
            f"{layer.bias is not None}|{list(shape)}")


def _factorized(layer, scheme, rank, device, dtype):
    """A freshly initialized factorized form of `layer` at `rank` (its time does not depend on the values)."""
    factory = {"device": device, "dtype": dtype}
    if isinstance(layer, nn.Linear):
        return FactorizedLinear(layer.in_features, layer.out_features, rank, layer.bias is not None, **factory)
    return FACTORIZED[scheme](layer.in_channels, layer.out_channels, layer.kernel_size, rank, layer.stride,
                              conv_padding4(layer), layer.dilation, layer.bias is not None, groups=layer.groups,
                              **factory)


class LatencyTable:
    """Measured seconds per call of the selected layers (dense, and factorized at candidate ranks) and of the
    whole dense network, in one runtime.

    Attributes: names, dense ({name: seconds}), ranks ({name: [candidate ranks]}), times ({name: [seconds]}),
    total_dense (the dense network's seconds), scale and fixed (the network's time is predicted as
    fixed + scale x the sum of its selected layers' times: fixed = total_dense minus the selected layers' dense
    times, scale = 1; where those times add up to more than the network's, as a per-call overhead in every
    single-layer time makes them, fixed = 0 and scale = total_dense / their sum), measured (how many times were
    measured, not read from the cache).

    Args:
        model: the dense nn.Module (eval mode is used; not modified).
        scheme: the decomposition scheme (trp.core.schemes.SCHEMES).
        targets: the selected trp.core.targets.Target objects (whole layers; attention q/k/v rows are not
            timed on their own).
        input_size: (C, H, W) or (N, C, H, W); N is replaced by runtime.batch_size.
        runtime: the Runtime to measure in.
        multiple: the rank granularity the runtime favours, an int >= 1. Default 8.
        points: the most candidate ranks per layer, an int >= 1. Default 6.

    Raises:
        ValueError: when a layer does not run at input_size or an argument is out of range.
    """

    def __init__(self, model, scheme, targets, input_size, runtime, multiple=8, points=6):
        checks.integer(multiple, "multiple", 1)
        checks.integer(points, "points", 1)
        shape = (runtime.batch_size, *input_shape(input_size)[1:])
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        timer = runtime.timer_for(device)
        where = runtime.key(device, dtype)
        if runtime.cache is not None:
            storage.check_output_file(runtime.cache)  # before measuring: a link or a directory is refused now
        cache = read_cache(runtime.cache)
        self.names = [t.name for t in targets]
        seen = io_shapes(model, [(t.name, t.module) for t in targets], shape)
        self.dense, self.ranks, self.times, self.measured = {}, {}, {}, 0
        gen = torch.Generator(device="cpu").manual_seed(0)
        for t in targets:
            if t.name not in seen:
                raise ValueError(f"layer {t.name!r} did not run in a forward pass of input {shape}: its latency is "
                                 "unknown; exclude it")
            layer = t.dense().eval()
            own = layer_scheme(scheme, layer)
            one = _factorized(layer, own, 1, "meta", dtype)
            top = min(pay_rank(one, layer), min(layer_matrix_shape(layer, scheme)[-2:]))
            ranks = candidate_ranks(top, multiple, points)
            x_shape = tuple(seen[t.name][0])
            geometry = f"{where}|{_geometry(layer, own, x_shape)}"
            keys = [f"{geometry}|dense"] + [f"{geometry}|rank={r}" for r in ranks]
            if not all(k in cache for k in keys):
                x = torch.randn(x_shape, generator=gen).to(device=device, dtype=dtype)
                modules = [layer] + [_factorized(layer, own, r, device, dtype).eval() for r in ranks]
                cache.update(zip(keys, (float(s) for s in timer.compare(modules, x))))
                self.measured += len(keys)
            self.dense[t.name] = cache[keys[0]]
            self.ranks[t.name], self.times[t.name] = ranks, [cache[k] for k in keys[1:]]
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        self.total_dense = float(timer.compare([model.eval()], x)[0])  # the network: never cached
        layers = sum(self.dense.values())
        self.fixed = max(self.total_dense - layers, 0.0)
        self.scale = min(self.total_dense / layers, 1.0) if layers > 0 else 1.0
        if runtime.cache is not None and self.measured:
            write_cache(runtime.cache, cache)

    def frontier(self, name, margin=0.0):
        """The candidates of one layer worth choosing: (rank, seconds) pairs in increasing rank and time, each
        faster than every higher rank and than (1 - margin) x the dense layer.

        Args:
            name: the layer's name.
            margin: a float in [0, 1). Default 0.

        Returns:
            A list of (int, float).
        """
        out, best = [], self.dense[name] * (1.0 - margin)
        for r, s in sorted(zip(self.ranks[name], self.times[name]), reverse=True):
            if s < best:
                out.append((r, s))
                best = s
        return out[::-1]

    def seconds(self, ranks):
        """The predicted seconds of the network at `ranks`: fixed + scale x the sum of the layers' times.

        Args:
            ranks: {name: a rank of the layer's candidates, or None (dense)}; a layer it lacks is dense.

        Returns:
            A float.
        """
        total = 0.0
        for n in self.names:
            r = ranks.get(n)
            total += self.dense[n] if r is None else self.times[n][self.ranks[n].index(r)]
        return self.fixed + self.scale * total

    def fastest(self, margin=0.0):
        """Every layer at its fastest worthwhile candidate (dense where none).

        Args:
            margin: as for frontier(). Default 0.

        Returns:
            {name: rank or None}.
        """
        return {n: (f[0][0] if f else None) for n in self.names for f in [self.frontier(n, margin)]}

    def max_speedup(self, margin=0.0):
        """The predicted speed-up of fastest().

        Args:
            margin: as for frontier(). Default 0.

        Returns:
            A float.
        """
        return self.total_dense / self.seconds(self.fastest(margin))


class LatencyCost:
    """A LatencyTable as the cost model of trp.prune.budget.SpeedupController (RankPruner(target_speedup=,
    costs=)): the network's time at any ranks, each layer's by linear interpolation between its measured
    candidates (and extrapolation beyond them), so that training can be steered to a latency speed-up.

    Attributes: names, total_dense, fixed (as the table's: fixed + scale x the layers' times).

    Args:
        table: the LatencyTable of the pruned layers.
        margin: a layer counts as dense where its time is not below (1 - margin) x the dense one. Default 0.
    """

    def __init__(self, table, margin=0.0):
        self.table, self.margin = table, checks.real(margin, "margin", 0.0, 1.0, high_open=True)
        self.names, self.total_dense, self.fixed = table.names, table.total_dense, table.fixed

    def layer_seconds(self, name, rank, capped=True):
        """One layer's time at `rank`.

        Args:
            name: the layer's name.
            rank: an int >= 1, or None (dense).
            capped: count the dense time where the factorized time would not be below it (or the rank is above
                every measured candidate). False: the interpolated time regardless (what the controller
                steers: it moves with every rank). Default True.

        Returns:
            Seconds, a float.
        """
        dense, points = self.table.dense[name], list(zip(self.table.ranks[name], self.table.times[name]))
        if rank is None or not points:
            return dense
        if len(points) == 1:
            seconds = points[0][1] * rank / points[0][0]
        else:
            i = min(max(sum(r <= rank for r, _ in points) - 1, 0), len(points) - 2)
            (r0, t0), (r1, t1) = points[i], points[i + 1]
            seconds = t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        seconds = max(seconds, 1e-12)
        if capped and (rank > points[-1][0] or seconds >= dense * (1.0 - self.margin)):
            return dense
        return seconds

    def macs(self, ranks, capped=True):
        """The network's predicted time at `ranks` (the controller's cost; seconds here, not MACs).

        Args:
            ranks: {name: rank or None}; a layer it lacks is dense.
            capped: as for layer_seconds. Default True.

        Returns:
            Seconds, a float.
        """
        layers = sum(self.layer_seconds(n, ranks.get(n), capped) for n in self.names)
        return self.fixed + self.table.scale * layers

    def speedup(self, ranks, capped=True):
        """The predicted latency speed-up at `ranks`.

        Args:
            ranks: {name: rank or None}.
            capped: as for layer_seconds. Default True.

        Returns:
            A float.
        """
        return self.total_dense / self.macs(ranks, capped)

    def max_speedup(self):
        """The predicted speed-up with every layer at its fastest measured candidate (LatencyTable.max_speedup)."""
        return self.table.max_speedup(self.margin)

    def check_target(self, target, name="target_latency"):
        """Checks that a latency speed-up is > 1 and reachable by the measurements.

        Args:
            target: the speed-up, a finite number.
            name: the argument's name in the error message. Default "target_latency".

        Returns:
            The target, as a float.

        Raises:
            ValueError: when it is not > 1, or above max_speedup() (the message says what is reachable).
        """
        target = checks.real(target, name, 1.0, low_open=True)
        best = self.max_speedup()
        if target > best:
            reach = f"at most {best:.2f}x" if best > 1 else "no speed-up: no layer measured faster factorized"
            raise ValueError(f"{name}={target:g} is not reachable in this runtime: the measurements allow {reach} "
                             "(try another batch size, runtime or scheme)")
        return target


def allocate_latency(table, spectra, target, margin=0.0):
    """{name: rank, or None where the layer stays dense} whose predicted latency speed-up is at least `target`,
    keeping the most energy: every layer starts at its fastest worthwhile candidate; the step (to its next
    candidate, or from the last to dense) with the most energy per second is taken while it fits the budget
    total_dense / target. Deterministic: ties go to the earlier layer.

    Args:
        table: the LatencyTable of the selected layers.
        spectra: {name: singular values, descending} (trp.prune.budget.spectra).
        target: the latency speed-up, a float > 1.
        margin: a candidate must be faster than (1 - margin) x its dense layer. Default 0.

    Returns:
        {name: int or None}.

    Raises:
        ValueError: when target is not > 1 or the measurements cannot reach it (the message says what can be).
    """
    target = checks.real(target, "target_latency", 1.0, low_open=True)
    fronts = {n: table.frontier(n, margin) for n in table.names}
    ranks = table.fastest(margin)
    spent, budget = table.seconds(ranks), table.total_dense / target
    if spent > budget:
        best = table.total_dense / spent
        reach = (f"at most {best:.2f}x: ask for at most that" if any(fronts.values()) else
                 "no speed-up: no selected layer measured faster factorized than dense here")
        raise ValueError(f"target_latency={target:g} is not reachable in this runtime: with every selected layer "
                         f"at its fastest measured rank the prediction is {reach} (or try another batch size, "
                         "runtime or scheme)")
    gains = {n: layer_gains(spectra[n]) for n in table.names}
    state = {n: 0 for n in table.names}  # index into the layer's frontier; len(frontier): dense
    order = {n: i for i, n in enumerate(table.names)}
    while True:
        best = None
        for n, front in fronts.items():
            i = state[n]
            if i >= len(front):
                continue
            r, s = front[i]
            nxt_r, nxt_s = front[i + 1] if i + 1 < len(front) else (len(gains[n]), table.dense[n])
            cost = table.scale * (nxt_s - s)
            if spent + cost > budget * (1 + 1e-12):
                continue
            score = (sum(gains[n][r:nxt_r]) / max(cost, 1e-12), -order[n])
            if best is None or score > best[0]:
                best = (score, n, cost)
        if best is None:
            break
        _, n, cost = best
        spent += cost
        state[n] += 1
        front = fronts[n]
        ranks[n] = front[state[n]][0] if state[n] < len(front) else None
    return ranks


def fit_to_latency(table, spectra, target, build, timer, dense_model, x, attempts=3, tolerance=0.03, margin=0.0):
    """Allocates ranks for `target`, builds the network, measures it against the dense one, and repeats with
    the goal raised by the measured shortfall until the measured speed-up is within `tolerance` of the target.

    The per-layer sum is a prediction: where it puts the target out of reach but some layer is faster
    factorized, the fastest allocation is built and measured first (the sum can be pessimistic: a runtime's
    per-call overhead is in every single-layer time); the target is refused only if that measurement is short
    of it too, and otherwise the goal is rescaled by measured / predicted before the loop.

    Args:
        table: the LatencyTable.
        spectra: {name: singular values}.
        target: the latency speed-up, a float > 1.
        build: build(ranks) -> the decomposed network at {name: rank or None}.
        timer: an object with compare(modules, x).
        dense_model: the dense network, timed against each attempt.
        x: the network's input for the end-to-end timing.
        attempts: the most allocations, an int >= 1. Default 3.
        tolerance: the target counts as met at a measured speed-up >= (1 - tolerance) x target. Default 0.03.
        margin: as for allocate_latency. Default 0.

    Returns:
        (network, record): the best attempt's network (the first that met the target, else the fastest) and a
        dict with "target", "met", "measured", "ranks", "attempts" ([{goal, predicted, measured}]).

    Raises:
        ValueError: when the target is unreachable: no layer is faster factorized (before anything is built),
            or the fastest allocation measures short of it.
    """
    checks.integer(attempts, "attempts", 1)
    goal, tries, best = float(target), [], None
    ceiling = table.max_speedup(margin)
    reached = lambda measured: measured >= target * (1.0 - tolerance)  # noqa: E731

    def attempt(ranks, goal):
        """(network, ranks, measured speed-up) of one allocation, recorded in `tries`."""
        net = build(ranks)
        t_dense, t_net = timer.compare([dense_model, net], x)
        measured = t_dense / t_net
        tries.append({"goal": goal, "predicted": table.total_dense / table.seconds(ranks), "measured": measured})
        return net, ranks, measured

    if ceiling < target and any(table.frontier(n, margin) for n in table.names):  # out of reach? measure it
        best = attempt(table.fastest(margin), ceiling)
        measured = best[2]
        if not reached(measured):
            raise ValueError(f"target_latency={target:g} is not reachable in this runtime: with every selected "
                             f"layer at its fastest measured rank the network measured a speed-up of "
                             f"{measured:.2f}x over dense (predicted {ceiling:.2f}x); ask for at most that (or try "
                             "another batch size, runtime or scheme)")
        goal = min(max(target * ceiling / measured, 1.0 + 1e-9), ceiling)  # a goal > 1: the allocator's domain
    for _ in range(attempts):
        result = attempt(allocate_latency(table, spectra, goal, margin), goal)
        if best is None or result[2] > best[2] or reached(result[2]):
            best = result
        if reached(result[2]) or goal >= ceiling:
            break
        goal = min(goal * target / result[2], ceiling)
    net, ranks, measured = best
    met = reached(measured)
    if not met:
        warnings.warn(f"target_latency={target:g} not reached: measured {measured:.2f}x after {len(tries)} "
                      f"allocation(s) (the per-layer measurements allow at most {ceiling:.2f}x)", stacklevel=3)
    return net, {"target": float(target), "met": met, "measured": measured, "ranks": ranks, "attempts": tries}


__all__ = ["Runtime", "LatencyTable", "LatencyCost", "allocate_latency", "fit_to_latency", "candidate_ranks",
           "read_cache", "write_cache", "CACHE_VERSION"]
