"""Autotune search spaces of the fused-conv Triton kernels, in one place: the TRP_TRITON_AUTOTUNE modes, each
kernel's table of tile configurations (TileSpace) and the per-call pruning of that table (by_registers: the
register budget and the tile sizes a call can use), shared by the channel, spatial and decoupled kernels."""
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import triton

from ._common import named, regs_fit

AUTOTUNE_ENV = "TRP_TRITON_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick", "off")

# A pruning rule: (configs, the launch's named arguments and constexprs) -> the configs worth trying for that call.
Rule = Callable[[list, Mapping], list]


def autotune_mode() -> str:
    """The TRP_TRITON_AUTOTUNE setting, read from the environment at every call.

    Returns:
        "full" (default; every config, tuned once per shape), "quick" (three configs: for time-boxed benchmark
            runs) or "off" (one config chosen by the tile rules, no tuning).

    Raises:
        ValueError: the variable holds another value.
    """
    mode = os.environ.get(AUTOTUNE_ENV, "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV} must be one of {', '.join(AUTOTUNE_MODES)}, got {mode!r}")
    return mode


def by_registers(kind: str, words: Callable[[Mapping, "triton.Config", torch.dtype], float],
                 limits: Callable[[Mapping], Mapping[str, int]]) -> Rule:
    """A pruning rule by the register budget and the tile sizes a call can use.

    The rule keeps the configs whose estimated live 32-bit words per program fit kind's register budget
    (regs_fit) and whose tile sizes are within the call's limits; when none does (a rank at the limit with
    small channel counts, a wide row), the lightest config per thread.

    Args:
        kind: the kernel's register budget class, "channel" or "spatial" (_common.REGS_PER_THREAD).
        words: (launch arguments, config, input dtype) -> estimated live 32-bit words of one program.
        limits: launch arguments -> {tile name: largest useful size for this call}.

    Returns:
        The rule, for TileSpace.
    """
    def rule(configs, args):
        dtype = args["X"].dtype
        keep = [cfg for cfg in configs if regs_fit(kind, words(args, cfg, dtype), cfg.num_warps, dtype)
                and all(cfg.kwargs[name] <= limit for name, limit in limits(args).items())]
        return keep or [min(configs, key=lambda cfg: words(args, cfg, dtype) / cfg.num_warps)]
    return rule


class TileSpace:
    """One kernel's autotune search space: its tile table per mode, autotune key and pruning rule.

    Args:
        names: the tile sizes' constexpr names, in the order of the table's rows.
        table: {TRP_TRITON_AUTOTUNE mode: rows (tile sizes..., num_warps, num_stages)}.
        key: the launch arguments whose values the autotuner tunes separately.
        rule: (configs, named launch arguments) -> the configs worth trying for that call.
    """

    def __init__(self, names: Sequence[str], table: Mapping[str, Sequence[tuple]], key: Sequence[str],
                 rule: Rule):
        self.names, self.table, self.key, self.rule = tuple(names), table, list(key), rule
        self._tuned = {}  # (kernel, mode) -> the autotuned kernel (it keeps its per-shape tuning cache)

    def configs(self, mode: str) -> list:
        """The configs of one autotune mode.

        Args:
            mode: "full", "quick" or "off".

        Returns:
            A list of triton.Config.
        """
        return [triton.Config(dict(zip(self.names, row[:-2])), num_warps=row[-2], num_stages=row[-1])
                for row in self.table[mode]]

    def prune(self, configs: list, named_args: Mapping, **kwargs: object) -> list:
        """triton.autotune's early_config_prune: the rule applied to one launch.

        Args:
            configs: the triton.Config candidates.
            named_args: the launch's arguments by name.
            **kwargs: the launch's constexprs.

        Returns:
            The configs to try (at least one).
        """
        return self.rule(configs, named(named_args, kwargs))

    def autotuned(self, kernel: Callable) -> Callable:
        """The kernel wrapped in triton.autotune with this space for the current TRP_TRITON_AUTOTUNE mode.

        Built once per kernel and mode, so that its per-shape tuning cache lasts.

        Args:
            kernel: a triton.jit kernel.

        Returns:
            The autotuned kernel.

        Raises:
            ValueError: TRP_TRITON_AUTOTUNE holds an invalid value.
        """
        mode = autotune_mode()
        hit = self._tuned.get((kernel, mode))
        if hit is None:
            hit = self._tuned[(kernel, mode)] = triton.autotune(
                configs=self.configs(mode), key=self.key, prune_configs_by={"early_config_prune": self.prune})(kernel)
        return hit
