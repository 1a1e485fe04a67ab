# Over 300 lines with its docstrings: RankPruner's public configuration, schedule and state (the projection
# paths live in engine.py).
"""RankPruner: Trained Rank Pruning in any training loop: periodic low-rank projection of the weights during
SGD, and the nuclear-norm subgradient added to their gradients.

    pruner = trp.RankPruner(model, scheme="channel", energy=0.9, period=1, nuclear=3e-4)
    for x, y in loader:
        pruner.step()          # every `period` calls (the first one included): W <- D(W), in place
        loss = criterion(model(x), y)
        optimizer.zero_grad(); loss.backward()
        pruner.regularize()    # W.grad += nuclear * U_k V_k^T
        optimizer.step()

The selected layers are grouped by (matrix shape, dtype, device); each group is one batched
trp_kernels.lowrank_project call, which also returns the nuclear-norm subgradient U_k V_k^T, warm-started
from the group's previous projection (trp_kernels.WarmStart: same results, less time); on the CPU one call of
trp_kernels.inplace for all groups instead, with the same results (`path` says which ran). Under network
decoupling every filter (pointwise order) or every input channel (depthwise order) is its own matrix, and under
channel / spatial every group of a grouped conv: a group's call covers all of them in all its layers, and a
layer's rank is the largest. A group holds
trp.core.targets.Target objects: a whole weight or a row block of one (the q, k, v rows of a packed attention
in_proj_weight), read, written and regularized through the target's views of the parameter."""
import copy

import torch

from trp._utils import checks
from trp.core.rank import check_energy
from trp.core.schemes import check_scheme
from trp.core.selection import PRESETS, plan_layers
from trp.cost.model import CostModel
from trp.prune import distributed
from trp.prune.budget import SpeedupController, cut_to
from trp.prune.engine import Engine
from trp.prune.warm_state import restore_warm_basis
from trp_kernels.project import check_max_rank

NUCLEAR_EVERY = ("projection", "step")
NUCLEAR = 3e-4  # the paper's lambda


def default_nuclear(target=None):
    """The nuclear-norm weight a pruner takes when none is given: NUCLEAR for a fixed energy, 0 with a target.

    With a target speed-up the controller's projections remove what SGD adds, so the term is not needed to
    bring the ranks down; its subgradient then only shrinks every kept singular value, which did not pay on
    ResNet-20 on the digits or Fashion-MNIST (measured: benchmarks/recipe_table.py).

    Args:
        target: the target speed-up (target_speedup, or trp train's --target-latency), or None.

    Returns:
        The weight, a float.
    """
    return NUCLEAR if target is None else 0.0


def check_period(period, name="period"):
    """Checks a projection period.

    Args:
        period: the value to check, an int >= 1 (project every `period` steps).
        name: the argument's name in the error message. Default "period".

    Returns:
        The period.

    Raises:
        ValueError: when period is not an int >= 1.
    """
    return checks.integer(period, name, 1, what=" (project every `period` steps)")


def check_nuclear(nuclear, name="nuclear"):
    """Checks a nuclear-norm weight.

    Args:
        nuclear: the value to check, a real number >= 0.
        name: the argument's name in the error message. Default "nuclear".

    Returns:
        The weight, as a float.

    Raises:
        ValueError: when nuclear is not a real number >= 0.
    """
    return checks.real(nuclear, name, 0.0, what=" (the nuclear-norm weight)")


def _check_config(scheme, energy, period, nuclear, nuclear_every, max_rank=None):
    check_scheme(scheme)
    check_energy(energy)
    check_period(period)
    check_nuclear(nuclear)
    check_max_rank(max_rank)
    checks.choice(nuclear_every, NUCLEAR_EVERY, "nuclear_every", unknown=True)


class RankPruner:
    """Periodic low-rank projection of the selected layers plus the nuclear-norm subgradient.

    `skipped` says why each other candidate layer is not pruned. The model may be DDP-wrapped or
    torch.compile'd: the pruner works on the bare module's parameters. A model sharded with FSDP2 (fully_shard;
    build the pruner after it) is projected group by group on whole gathered matrices and written back into
    every rank's shards (trp.prune.fsdp).

    Args:
        model: the nn.Module to prune (its parameters must be materialized, not on the meta device).
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise" (trp.core.schemes). nd_pointwise
            projects each filter's c x kh*kw matrix, nd_depthwise each input channel's n x kh*kw matrix, and a
            layer's rank is the largest of its matrices'; "nd" picks the cheaper order per layer (fixed by its
            geometry). Default "channel".
        energy: fraction of squared singular values each projection keeps, a float in (0, 1] (the released
            code's T = 0.9). Default 0.9. With target_speedup it is only the starting value.
        period: project every `period` calls of step(), the first call included (m in the paper); an
            int >= 1. Default 1.
        nuclear: weight lambda of the nuclear-norm term, a float >= 0 (0 turns regularize() off).
            Default None: default_nuclear(target_speedup), NUCLEAR (3e-4, the paper's lambda) for a fixed
            energy and 0 with a target speed-up.
        layers: the layers to prune: a preset ("default", "paper"), module names, regexes or types.
            Default None: the "default" preset (dense, grouped and pointwise convs but the stem and depthwise
            ones, and the Linear-like matrices of the network's repeated blocks: trp.core.selection).
        exclude: layers to leave out of the selection, given like `layers`. Default None.
        nuclear_every: "projection" (the released code: the subgradient is added on projection iterations
            only) or "step" (every iteration, with U_k V_k^T of the latest projection).
            Default "projection".
        max_rank: optional cap on every layer's rank, an int >= 1 or None (no cap). Default None.
        process_group: the torch.distributed group to shard the projections over. Default None: the
            default group when it is initialized with more than one process. Each rank projects a
            cost-balanced share of the layers and receives the others' results, so that every rank ends
            bit-identical (trp.prune.distributed).
        target_speedup: steer the network's conv-MAC speed-up (trp.count_macs at input_size) to this
            float > 1 instead of keeping a fixed energy: after each projection
            trp.prune.budget.SpeedupController sets the next projection's energy, aiming at a goal that ramps
            from 1 to target_speedup over `warmup` projections, and after a projection that fell short the
            components worth least per MAC are cut (trp.prune.budget.cut_to; one float64 SVD of the selected
            matrices). Default None (a fixed energy).
        input_size: (C, H, W), the input at which conv MACs are counted; required with target_speedup.
            Default None.
        warmup: number of projections over which the speed-up goal ramps from 1 to target_speedup, an
            int >= 0. Default 0.
        gain: the speed-up controller's proportional gain, a float > 0: about the share of the cost above
            the goal that one projection removes (SpeedupController). Default
            SpeedupController.GAIN (0.2).
        costs: what target_speedup counts, instead of conv MACs at input_size: a cost model with the interface
            of trp.cost.model.CostModel's speedup(), macs(), total_dense, fixed and check_target();
            trp.deploy.latency_budget.LatencyCost makes target_speedup a measured latency speed-up. Default
            None.

    Raises:
        ValueError: when an argument is out of range, no layer is selected, or target_speedup is given
            without input_size.
    """

    def __init__(self, model, scheme="channel", energy=0.9, period=1, nuclear=None, layers=None,
                 exclude=None, nuclear_every="projection", max_rank=None, process_group=None,
                 target_speedup=None, input_size=None, warmup=0, costs=None, gain=SpeedupController.GAIN):
        if nuclear is None:
            nuclear = default_nuclear(target_speedup)
        _check_config(scheme, energy, period, nuclear, nuclear_every, max_rank)
        pg = distributed.active_group(process_group)
        model = distributed.unwrap(model)
        if isinstance(model, torch.nn.Module):
            checks.materialized(model, "RankPruner")
        self.scheme, self.energy, self.period = scheme, float(energy), period
        self.nuclear, self.nuclear_every, self.max_rank = float(nuclear), nuclear_every, max_rank
        selection = plan_layers(model, scheme, layers, exclude)
        self.targets = selection.targets
        self.skipped = selection.skipped  # {layer name: why it is not pruned}
        self.layers = [(t.name, t.module) for t in self.targets]  # q/k/v: the attention module
        if not self.targets:
            raise ValueError(f"RankPruner: no layer selected for scheme {scheme!r}: "
                             f"{selection.summary() or 'the model has no conv or Linear layer'}. Pass layers= "
                             "(module names, regexes, types such as nn.Conv2d, or a preset: "
                             f"{', '.join(PRESETS)}) to choose layers")
        self.engine = Engine(self.targets, scheme, pg)  # the groups and the projection paths
        self.budget = None  # the speed-up controller of target_speedup=
        if costs is not None and target_speedup is None:
            raise ValueError("RankPruner: costs= is what target_speedup= counts: give target_speedup= too")
        if target_speedup is not None:
            if costs is None and input_size is None:
                raise ValueError("RankPruner: target_speedup needs input_size= (C, H, W), the input at which "
                                 "conv MACs are counted")
            if costs is None:
                costs = CostModel(model, scheme, self.layers, input_size)
            elif list(costs.names) != self.layer_names:
                raise ValueError("RankPruner: costs= was built for other layers than the pruner selected")
            self.budget = SpeedupController(costs, target_speedup, warmup, gain)
            self.energy = self.budget.energy
        self.steps = 0                 # number of step() calls so far
        self.last_projected = False    # whether the latest step() projected

    @property
    def layer_names(self):
        """The names of the selected layers, in selection order (a list of str)."""
        return [n for n, _ in self.layers]

    @property
    def ranks(self):
        """{layer name: rank after the latest projection} (None before the first projection)."""
        return {**{n: None for n in self.layer_names}, **self.engine.ranks()}

    @property
    def filter_ranks(self):
        """Network decoupling: {layer name: [rank of each filter (pointwise order) or input channel (depthwise
        order)]} after the latest projection (None before it, and for layers restored from a state, which
        records the layer ranks only); a grouped conv under channel / spatial: [rank of each group]. Other
        layers: the ranks."""
        return {**{n: None for n in self.layer_names}, **self.engine.ranks(per_filter=True)}

    # what the projection engine holds, under the names the pruner had before it (tests read them)
    @property
    def _groups(self):
        return self.engine.groups

    @property
    def _sharding(self):
        return self.engine.sharding

    @_sharding.setter
    def _sharding(self, sharding):
        self.engine.sharding = sharding

    def _inplace_groups(self):
        return self.engine.inplace_groups()

    @property
    def _inplace_cache(self):
        return self.engine.inplace_cache

    @property
    def inplace(self):
        """False: always stack the groups and project them one op call each (the path for GPUs, sharding and
        nd), e.g. to compare (same results: tests)."""
        return self.engine.inplace

    @inplace.setter
    def inplace(self, value):
        self.engine.inplace = value

    @property
    def path(self):
        """How the latest projection ran: "in place" (views of the weights), "staged" (the in-place op on
        stacked copies) or "stacked" (one call per group)."""
        return self.engine.path

    @torch.no_grad()
    def project(self):
        """Projects every selected layer on its energy-rule low-rank approximation now (in place); with
        target_speedup, then cuts the components worth least per MAC when the controller asks for it.

        All groups are checked and computed before any weight is written: if a layer holds NaN/Inf, a
        ValueError names it and no layer is modified.

        Raises:
            ValueError: when a selected layer holds NaN or Inf values.
        """
        self.engine.project(self.energy, self.max_rank, self.nuclear)
        if self.budget is None:
            return
        self.energy = self.budget.update(self.ranks)
        if self.budget.cut is not None:
            ranks, costs, cost = self.ranks, self.budget.costs, self.budget.cut
            self.engine.cut(lambda spectra: cut_to(costs, spectra, ranks, cost))
            self.energy = self.budget.after_cut(self.ranks)

    def step(self):
        """Call once per training iteration, before the forward pass.

        Projects on the first call and then every `period` calls.

        Returns:
            True when this call projected, False otherwise.

        Raises:
            ValueError: when a selected layer holds NaN/Inf at a projection (no layer is modified).
        """
        self.last_projected = self.steps % self.period == 0
        if self.last_projected:
            self.project()
        self.steps += 1
        return self.last_projected

    @torch.no_grad()
    def regularize(self):
        """Adds nuclear * U_k V_k^T (the nuclear-norm subgradient at the latest projection) to the
        selected weights' .grad. Call after backward() and before optimizer.step() (with a GradScaler,
        after scaler.unscale_(optimizer)). A no-op when nuclear=0, before the first projection, and, with
        nuclear_every="projection", on iterations that did not project.

        Returns:
            None; the gradients are updated in place.
        """
        if self.nuclear == 0 or (self.nuclear_every == "projection" and not self.last_projected):
            return
        self.engine.add_subgradients(self.nuclear)

    def nuclear_norm(self):
        """The sum over the selected layers of their nuclear norms ||W_l||_*.

        Returns:
            A float, for logging.
        """
        return self.engine.nuclear_norm()

    def config(self):
        """The pruner's configuration, as state_dict() records it.

        Returns:
            A dict with the keys "scheme", "energy", "period", "nuclear", "nuclear_every", "max_rank" and
            "layers" (the selected layer names); under "nd" also "orders", {layer name: its order}.
        """
        config = {"scheme": self.scheme, "energy": self.energy, "period": self.period,
                  "nuclear": self.nuclear, "nuclear_every": self.nuclear_every, "max_rank": self.max_rank,
                  "layers": self.layer_names}
        if self.scheme == "nd":
            config["orders"] = self._orders()
        return config

    def _orders(self):
        return {t.name: t.scheme_for(self.scheme) for t in self.targets}

    def state_dict(self):
        """Step counter, configuration and current ranks; the subgradients too when nuclear_every="step"
        (they are needed by the iterations between projections), and the warm-start bases (per layer: its
        matrices' kept singular vectors, [matrices, n, m] float64), so that a resumed run continues exactly.
        Under sharding only the bases of this process's groups (`trp train` gathers every rank's).

        Returns:
            A dict with the keys "steps", "last_projected", "config", "ranks", "warm_bases", plus
            "subgradients" (nuclear_every="step") and "budget" (with target_speedup) when they apply.
        """
        state = {"steps": self.steps, "last_projected": self.last_projected, "config": self.config(),
                 "ranks": self.ranks, "warm_bases": self.engine.warm_bases()}
        if self.nuclear_every == "step":
            # copies: the next projection may write the pruner's buffers in place
            state["subgradients"] = self.engine.subgradients()
        if self.budget is not None:
            state["budget"] = self.budget.state_dict()
        return state

    def load_state_dict(self, state):
        """Restores what state_dict() saved. A state of another model or layer selection, or a malformed
        one, raises ValueError and leaves the pruner as it was.

        Args:
            state: a dict returned by state_dict() of a pruner of the same model, scheme and layer selection.

        Raises:
            ValueError: when the state is malformed, or was saved for another model, scheme, layer selection
                or speed-up setting (the pruner is left unchanged).
        """
        where = "RankPruner.load_state_dict"
        try:
            cfg, steps, last = state["config"], state["steps"], state["last_projected"]
            scheme, layers = cfg["scheme"], list(cfg["layers"])
            config = (cfg["energy"], cfg["period"], cfg["nuclear"], cfg["nuclear_every"], cfg.get("max_rank"))
            ranks, subs = state.get("ranks") or {}, state.get("subgradients") or {}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: not a RankPruner state (missing or malformed {exc})") from None
        if scheme == "nd" and cfg.get("orders") is None:  # saved when "nd" decoupled every layer per filter
            scheme = "nd_pointwise"
            if self.scheme == "nd":
                raise ValueError(f"{where}: the state was saved when scheme 'nd' decoupled every layer per filter; "
                                 "load it into a pruner with scheme='nd_pointwise'")
        if scheme == "nd" and cfg["orders"] != self._orders():
            raise ValueError(f"{where}: the state's network-decoupling orders differ from this pruner's (another "
                             "model)")
        if scheme != self.scheme or layers != self.layer_names:
            raise ValueError(f"{where}: the state was saved for another model or layer selection (scheme "
                             f"{scheme!r}, {len(layers)} layers; this pruner: {self.scheme!r}, "
                             f"{len(self.layer_names)} layers)")
        try:
            _check_config(scheme, *config)
            checks.integer(steps, "steps", 0)
            if not isinstance(last, bool):
                raise ValueError(f"last_projected must be a bool, got {last!r}")
            restored = [self.engine.restored(g, ranks, subs) for g in self._groups]
            bases = [restore_warm_basis(g, state.get("warm_bases") or {}) for g in self._groups]
            budget = self._restore_budget(state)
        except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        # everything checked: now change the pruner
        self.energy, self.period, self.nuclear = float(config[0]), int(config[1]), float(config[2])
        self.nuclear_every, self.max_rank = config[3], config[4]
        self.steps, self.last_projected, self.budget = steps, last, budget
        for g, (rank, G) in zip(self._groups, restored):
            g.rank, g.G = rank, G
        owned = self.engine.owned_groups()
        for g, basis in zip(self._groups, bases):  # another rank's group keeps none: only its owner updates it
            g.warm.load_state_dict({"basis": basis if g in owned else None})

    def _restore_budget(self, state):
        """A copy of the speed-up controller with the state's budget state (None without target_speedup)."""
        if self.budget is None:
            if state.get("budget") is not None:
                raise ValueError("the state has a speed-up target; build the pruner with target_speedup=")
            return None
        if state.get("budget") is None:
            raise ValueError("the state has no speed-up target, this pruner has target_speedup="
                             f"{self.budget.target}")
        budget = copy.copy(self.budget)
        budget.load_state_dict(state["budget"])
        return budget

    def __repr__(self):
        return (f"RankPruner(scheme={self.scheme!r}, energy={self.energy}, period={self.period}, "
                f"nuclear={self.nuclear}, nuclear_every={self.nuclear_every!r}, "
                f"layers={len(self.layers)}, groups={len(self._groups)}, steps={self.steps})")


__all__ = ["RankPruner", "NUCLEAR_EVERY", "NUCLEAR", "default_nuclear"]
