"""Autotune search spaces of the fused-conv Triton kernels, in one place: the TRP_TRITON_AUTOTUNE modes, each
kernel's table of tile configurations (TileSpace) and the per-call pruning of that table (by_registers: the
register budget and the tile sizes a call can use), shared by the channel, spatial and decoupled kernels."""
import os

import triton

from ._common import named, regs_fit

AUTOTUNE_ENV = "TRP_TRITON_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick", "off")


def autotune_mode():
    """TRP_TRITON_AUTOTUNE: full (default; every config, tuned once per shape), quick (three configs: for
    time-boxed benchmark runs), off (one config chosen by the tile rules, no tuning)."""
    mode = os.environ.get(AUTOTUNE_ENV, "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV} must be one of {', '.join(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


def by_registers(kind, words, limits):
    """A pruning rule (see TileSpace): the configs whose estimated live 32-bit words per program
    (words(args, cfg, dtype)) fit kind's register budget (regs_fit) and whose tile sizes are within
    limits(args) ({tile name: largest useful size for this call}); when none does (a rank at the limit with small
    channel counts, a wide row), the lightest config per thread. args: the launch's named arguments."""
    def rule(configs, args):
        dtype = args["X"].dtype
        keep = [cfg for cfg in configs if regs_fit(kind, words(args, cfg, dtype), cfg.num_warps, dtype)
                and all(cfg.kwargs[name] <= limit for name, limit in limits(args).items())]
        return keep or [min(configs, key=lambda cfg: words(args, cfg, dtype) / cfg.num_warps)]
    return rule


class TileSpace:
    """One kernel's autotune search space.

    names: the tile sizes' constexpr names, in the order of the table's rows. table: {TRP_TRITON_AUTOTUNE mode:
    rows (tile sizes..., num_warps, num_stages)}. key: the launch arguments the autotuner tunes per value of.
    rule: (configs, named launch arguments) -> the configs worth trying for that call."""

    def __init__(self, names, table, key, rule):
        self.names, self.table, self.key, self.rule = tuple(names), table, list(key), rule
        self._tuned = {}  # (kernel, mode) -> the autotuned kernel (it keeps its per-shape tuning cache)

    def configs(self, mode):
        """The triton.Config list of autotune mode `mode`."""
        return [triton.Config(dict(zip(self.names, row[:-2])), num_warps=row[-2], num_stages=row[-1])
                for row in self.table[mode]]

    def prune(self, configs, named_args, **kwargs):
        """triton.autotune's early_config_prune: the rule applied to the launch's arguments and constexprs."""
        return self.rule(configs, named(named_args, kwargs))

    def autotuned(self, kernel):
        """kernel wrapped in triton.autotune with this space for the current TRP_TRITON_AUTOTUNE mode, built once
        per mode."""
        mode = autotune_mode()
        hit = self._tuned.get((kernel, mode))
        if hit is None:
            hit = self._tuned[(kernel, mode)] = triton.autotune(
                configs=self.configs(mode), key=self.key, prune_configs_by={"early_config_prune": self.prune})(kernel)
        return hit
