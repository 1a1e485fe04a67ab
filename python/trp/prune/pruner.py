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
trp_kernels.inplace for all groups instead, with the same results (`path` says which ran). Under the nd
scheme every filter is its own matrix, and under channel / spatial every group of a grouped conv: a group's
call covers all filters (conv groups) of all its layers, and a layer's rank is the largest. A group holds
trp.core.targets.Target objects: a whole weight or a row block of one (the q, k, v rows of a packed attention
in_proj_weight), read, written and regularized through the target's views of the parameter."""
import contextlib
import copy

import torch

import trp_kernels
from trp._utils import checks
from trp.core.rank import check_energy
from trp.core.schemes import check_scheme, from_matrix, matrix_shape, to_matrix
from trp.core.selection import PRESETS, plan_layers
from trp.cost.model import CostModel
from trp.prune import distributed
from trp.prune.budget import SpeedupController
from trp.prune.warm_state import restore_warm_basis, warm_bases
from trp_kernels import inplace
from trp_kernels.project import check_max_rank, finite_flag, finite_rows

NUCLEAR_EVERY = ("projection", "step")


def check_period(period, name="period"):
    return checks.integer(period, name, 1, what=" (project every `period` steps)")


def check_nuclear(nuclear, name="nuclear"):
    return checks.real(nuclear, name, 0.0, what=" (the nuclear-norm weight)")


def _check_config(scheme, energy, period, nuclear, nuclear_every, max_rank=None):
    check_scheme(scheme)
    check_energy(energy)
    check_period(period)
    check_nuclear(nuclear)
    check_max_rank(max_rank)
    checks.choice(nuclear_every, NUCLEAR_EVERY, "nuclear_every", unknown=True)


class _Group:
    """Targets sharing one matrix shape, dtype and device: projected by one batched call."""

    def __init__(self, targets):
        self.targets = targets
        self.names = [t.name for t in targets]
        self.shape = targets[0].shape
        self.groups = targets[0].groups  # a grouped conv: `groups` matrices per layer
        self.rank = None  # int64 [B] (nd: [B, n], per filter) on the device, from the last projection
        self.G = None     # [B, p, q] nuclear subgradient from the last projection, or None
        self.warm = trp_kernels.WarmStart()  # kept bases carried to the next projection (warm start)


class RankPruner:
    """Periodic low-rank projection of the selected layers plus the nuclear-norm subgradient.

    scheme: "channel", "spatial" or "nd" (trp.core.schemes; nd projects each filter's c x kh*kw matrix and a layer's
    rank is the largest of its filters'). energy: fraction of squared singular values each projection
    keeps, in (0, 1] (the released code's T = 0.9). period: project every `period` calls of step(), the
    first call included (m in the paper). nuclear: weight lambda of the nuclear-norm term, >= 0.
    layers / exclude: a preset ("default", "paper"), module names, regexes or types (default: the "default"
    preset: dense, grouped and pointwise convs but the stem and depthwise ones, and the Linear-like matrices
    of the network's repeated blocks: trp.selection). `skipped` says why each other layer is not pruned.
    nuclear_every: "projection" (the released code: the subgradient is added on projection iterations
    only) or "step" (every iteration, with U_k V_k^T of the latest projection).
    max_rank: optional cap on every layer's rank.
    process_group: under torch.distributed (default: the default group when it is initialized with more
    than one process), each rank projects a cost-balanced share of the layers and receives the others'
    results, so that every rank ends bit-identical (trp.distributed). model may be DDP-wrapped or
    torch.compile'd: the pruner works on the bare module's parameters.
    target_speedup: steer the network's conv-MAC speed-up (trp.count_macs at input_size, (C, H, W)) to this
    instead of keeping a fixed energy: after each projection trp.prune.budget.SpeedupController sets the next
    projection's energy, aiming at a goal that ramps from 1 to target_speedup over `warmup` projections."""

    def __init__(self, model, scheme="channel", energy=0.9, period=1, nuclear=3e-4, layers=None,
                 exclude=None, nuclear_every="projection", max_rank=None, process_group=None,
                 target_speedup=None, input_size=None, warmup=0):
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
        groups = {}
        for t in self.targets:
            w = t.read()
            key = (matrix_shape(t.shape, scheme, t.groups), t.shape, t.groups, w.dtype, w.device)
            groups.setdefault(key, []).append(t)
        self._sharding = None
        if pg is not None:  # heavy groups split, and all shared out by cost: fixed for the whole run
            costs = [distributed.projection_cost(key[0]) for key in groups]
            pieces, self._sharding = distributed.make_sharding(pg, list(groups.values()), costs)
            groups = dict(enumerate(pieces))
        self._groups = [_Group(targets) for targets in groups.values()]
        self.budget = None  # the speed-up controller of target_speedup=
        if target_speedup is not None:
            if input_size is None:
                raise ValueError("RankPruner: target_speedup needs input_size= (C, H, W), the input at which "
                                 "conv MACs are counted")
            costs = CostModel(model, scheme, self.layers, input_size)
            self.budget = SpeedupController(costs, target_speedup, warmup)
            self.energy = self.budget.energy
        self._inplace_cache = None     # (parameter addresses, _find_inplace_groups() for them)
        self.inplace = True            # False: always stack the groups and project them one op call each (the
                                       # path for GPUs, sharding and nd), e.g. to compare (same results: tests)
        self.path = None               # how the latest projection ran: "in place" (views of the weights), "staged"
                                       # (the in-place op on stacked copies) or "stacked" (one call per group)
        self.steps = 0                 # number of step() calls so far
        self.last_projected = False    # whether the latest step() projected

    @property
    def layer_names(self):
        return [n for n, _ in self.layers]

    @property
    def ranks(self):
        """{layer name: rank after the latest projection} (None before the first projection)."""
        out = {n: None for n in self.layer_names}
        for g in self._groups:
            if g.rank is not None:
                # nd (a grouped conv): the layer needs the largest rank of its filters (groups)
                rank = g.rank if g.rank.dim() == 1 else g.rank.amax(dim=1)
                out.update(zip(g.names, rank.tolist()))
        return out

    @property
    def filter_ranks(self):
        """nd scheme: {layer name: [rank of each filter]} after the latest projection (None before it, and
        for layers restored from a state, which records the layer ranks only); a grouped conv under channel /
        spatial: [rank of each group]. Other layers: the ranks."""
        out = {n: None for n in self.layer_names}
        for g in self._groups:
            if g.rank is not None:
                out.update(zip(g.names, g.rank.tolist()))
        return out

    def _owned_groups(self):
        """The groups this process projects (all of them without sharding)."""
        return [g for i, g in enumerate(self._groups) if self._sharding is None or self._sharding.owns(i)]

    def _matrices(self, group):
        return to_matrix(torch.stack([t.read() for t in group.targets]), self.scheme, group.groups)

    def _inplace_allowed(self):
        """Whether the in-place op may project at all: switched on, and no sharding (each process projects only
        its own groups, then exchanges them)."""
        return self.inplace and self._sharding is None

    def _inplace_groups(self):
        """Each group's matrices as views of the layers' weights when the in-place CPU op takes them all
        (trp_kernels.inplace: CPU, no sharding, every matrix a contiguous view of its weight, n small enough),
        else None. One call for all groups instead of stacking each group and copying the results back."""
        if not self._inplace_allowed():
            return None
        # The views stay valid while every parameter keeps its storage (a cached view keeps its storage alive,
        # so a new one, after .to() or .data =, never has the same address)
        key = [t.param.data_ptr() for t in self.targets]
        if self._inplace_cache is not None and self._inplace_cache[0] == key:
            return self._inplace_cache[1]
        self._inplace_cache = (key, self._find_inplace_groups())
        return self._inplace_cache[1]

    def _find_inplace_groups(self):
        groups = []
        for g in self._groups:
            mats = []
            for t in g.targets:
                w = t.read()
                m = to_matrix(w, self.scheme, t.groups)
                if m.dim() != 2 or m.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
                    return None  # a copy (spatial), or nd's batch of filter matrices
                mats.append(m)
            groups.append(mats)
        return groups if inplace.supports(groups) else None

    def _project_inplace(self, groups):
        want_g = self.nuclear > 0
        G = None
        if want_g:
            G = [g.G if g.G is not None and g.G.shape == (len(mats), *mats[0].shape) and g.G.dtype == mats[0].dtype
                 and g.G.device == mats[0].device and g.G.is_contiguous()
                 else mats[0].new_empty(len(mats), *mats[0].shape) for g, mats in zip(self._groups, groups)]
        try:
            ranks = inplace.lowrank_project_(groups, self.energy, [g.warm for g in self._groups],
                                             max_rank=self.max_rank, G=G)
        except inplace.NonFiniteError as exc:
            bad = [self._groups[i].names[j] for i, j in exc.bad]
            raise ValueError(f"RankPruner: non-finite weights (NaN or Inf) in layer(s) {', '.join(bad)}; "
                             "no layer was modified") from None
        for i, (g, rank) in enumerate(zip(self._groups, ranks)):
            g.rank, g.G = rank, (G[i] if want_g else None)

    def _write_back(self, group, W_low):
        """Copies a group's projected stack [B, ...matrix] into its layers' weights."""
        torch._foreach_copy_([t.read() for t in group.targets],
                             list(from_matrix(W_low, self.scheme, group.shape, group.groups).unbind(0)))

    def _staged_inplace(self, stacks):
        """The in-place op on the groups' stacked matrices, for layers whose matrix is a copy (spatial) on the
        CPU: one call for all groups (matrices shared out over the threads by cost, the fallback on the spot)
        instead of one per group, then the copy back. Returns whether it projected (False: the op does not
        take these matrices, e.g. nd's filter batches, a GPU, n > inplace.max_n())."""
        if not self._inplace_allowed():
            return False
        groups = [list(W.unbind(0)) for W in stacks]
        if not inplace.supports(groups):
            return False
        self._project_inplace(groups)  # raises before any weight is written (only the copies are touched)
        for g, W in zip(self._groups, stacks):
            self._write_back(g, W)
        return True

    @torch.no_grad()
    def project(self):
        """Projects every selected layer on its energy-rule low-rank approximation now (in place).

        All groups are checked and computed before any weight is written: if a layer holds NaN/Inf, a
        ValueError names it and no layer is modified."""
        groups = self._inplace_groups()
        if groups is not None:
            self._project_inplace(groups)
            self.path = "in place"
        else:
            stacks = [self._matrices(g) for g in self._groups]
            if self._staged_inplace(stacks):
                self.path = "staged"
            else:
                self._project_stacked(stacks)
                self.path = "stacked"
        if self.budget is not None:
            self.energy = self.budget.update(self.ranks)

    def _project_stacked(self, stacks):
        """One lowrank_project call per group on its stacked matrices (sharded when a process group is set),
        all groups checked for NaN/Inf first, then the copy back."""
        # The op's cheap per-group flag, but one host sync per device for all groups; only a suspect device
        # pays for the exact test. The op is then told not to check (and sync) again.
        flags = {}
        for i, W in enumerate(stacks):
            flags.setdefault(W.device, []).append((i, finite_flag(W)))
        suspects = [i for items in flags.values() if not bool(torch.stack([f for _, f in items]).all())
                    for i, _ in items]
        bad = []
        for i in suspects:
            bad += [n for n, ok in zip(self._groups[i].names, finite_rows(stacks[i]).tolist()) if not ok]
        if bad:
            raise ValueError(f"RankPruner: non-finite weights (NaN or Inf) in layer(s) {', '.join(bad)}; "
                             "no layer was modified")
        want_g = self.nuclear > 0
        owned = [i for i in range(len(stacks)) if self._sharding is None or self._sharding.owns(i)]
        results = [None] * len(stacks)  # another rank's groups: received below
        # One call for all groups: one host synchronisation per device, not two per group. The projection keeps
        # the weights' dtype whatever autocast region step() is called from.
        with contextlib.ExitStack() as no_autocast:
            for device_type in {stacks[i].device.type for i in owned}:
                no_autocast.enter_context(torch.autocast(device_type, enabled=False))
            # nd's [B, n, c, kh*kw]: one batch for every filter of the group, as [B*n, c, kh*kw]
            out = trp_kernels.lowrank_project_many([stacks[i].reshape(-1, *stacks[i].shape[-2:]) for i in owned],
                                                   self.energy, max_rank=self.max_rank, subgradient=want_g,
                                                   warms=[self._groups[i].warm for i in owned], check_finite=False)
        for i, (W_low, rank, G) in zip(owned, out):
            W = stacks[i]
            results[i] = (W_low.view(W.shape), rank.view(W.shape[:-2]), G.view(W.shape) if G is not None else None)
        if self._sharding is not None:
            results = self._sharding.exchange(results, [
                ((W.shape, W.dtype, W.device), (W.shape[:-2], torch.int64, W.device),
                 (W.shape, W.dtype, W.device) if want_g else None) for W in stacks])
        for g, (W_low, rank, G) in zip(self._groups, results):
            self._write_back(g, W_low)
            g.rank, g.G = rank, G

    def step(self):
        """Call once per training iteration, before the forward pass. Projects on the first call and
        then every `period` calls; returns whether it projected."""
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
        nuclear_every="projection", on iterations that did not project."""
        if self.nuclear == 0 or (self.nuclear_every == "projection" and not self.last_projected):
            return
        for g in self._groups:
            if g.G is None:
                continue
            sub = from_matrix(g.G, self.scheme, g.shape, g.groups).unbind(0)
            grads, updates = [], []
            for t, s in zip(g.targets, sub):
                grad = t.grad_view()  # None for a frozen weight
                if grad is not None:
                    grads.append(grad)
                    updates.append(s.to(grad.dtype))
            if grads:
                torch._foreach_add_(grads, updates, alpha=self.nuclear)

    def nuclear_norm(self):
        """sum over the selected layers of ||W_l||_* (float, for logging)."""
        total = 0.0
        for g in self._groups:
            W = self._matrices(g).to(torch.float64)
            total += float(torch.linalg.matrix_norm(W, ord="nuc").sum())
        return total

    def config(self):
        return {"scheme": self.scheme, "energy": self.energy, "period": self.period,
                "nuclear": self.nuclear, "nuclear_every": self.nuclear_every, "max_rank": self.max_rank,
                "layers": self.layer_names}

    def state_dict(self):
        """Step counter, configuration and current ranks; the subgradients too when nuclear_every="step"
        (they are needed by the iterations between projections), and the warm-start bases (per layer: its
        matrices' kept singular vectors, [matrices, n, m] float64), so that a resumed run continues exactly.
        Under sharding only the bases of this process's groups (`trp train` gathers every rank's)."""
        state = {"steps": self.steps, "last_projected": self.last_projected, "config": self.config(),
                 "ranks": self.ranks, "warm_bases": warm_bases(self._owned_groups())}
        if self.nuclear_every == "step":
            # copies: the next projection may write the pruner's buffers in place
            state["subgradients"] = {n: G.clone() for g in self._groups if g.G is not None
                                     for n, G in zip(g.names, g.G.unbind(0))}
        if self.budget is not None:
            state["budget"] = self.budget.state_dict()
        return state

    def load_state_dict(self, state):
        """Restores what state_dict() saved. A state of another model or layer selection, or a malformed
        one, raises ValueError and leaves the pruner as it was."""
        where = "RankPruner.load_state_dict"
        try:
            cfg, steps, last = state["config"], state["steps"], state["last_projected"]
            scheme, layers = cfg["scheme"], list(cfg["layers"])
            config = (cfg["energy"], cfg["period"], cfg["nuclear"], cfg["nuclear_every"], cfg.get("max_rank"))
            ranks, subs = state.get("ranks") or {}, state.get("subgradients") or {}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: not a RankPruner state (missing or malformed {exc})") from None
        if scheme != self.scheme or layers != self.layer_names:
            raise ValueError(f"{where}: the state was saved for another model or layer selection (scheme "
                             f"{scheme!r}, {len(layers)} layers; this pruner: {self.scheme!r}, "
                             f"{len(self.layer_names)} layers)")
        try:
            _check_config(scheme, *config)
            checks.integer(steps, "steps", 0)
            if not isinstance(last, bool):
                raise ValueError(f"last_projected must be a bool, got {last!r}")
            restored = [self._restore_group(g, ranks, subs) for g in self._groups]
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
        owned = self._owned_groups()
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

    def _restore_group(self, g, ranks, subs):
        """(rank, G) of group g from a saved state's per-layer ranks and subgradients."""
        w = g.targets[0].read()
        rank = G = None
        if all(ranks.get(n) is not None for n in g.names):
            rank = torch.tensor([checks.integer(ranks[n], f"ranks[{n!r}]", 0) for n in g.names],
                                dtype=torch.int64, device=w.device)
        if subs and all(n in subs for n in g.names):
            G = torch.stack([subs[n] for n in g.names]).to(device=w.device, dtype=w.dtype)
            expected = (len(g.names), *to_matrix(w, self.scheme, g.groups).shape)
            if tuple(G.shape) != expected:
                raise ValueError(f"subgradients of {', '.join(g.names)} have shape {tuple(G.shape)}, "
                                 f"expected {expected}")
        return rank, G

    def __getstate__(self):
        # pickles and copies do not carry the cached views of this model's weights (a copy's model is another)
        return {**self.__dict__, "_inplace_cache": None}

    def __repr__(self):
        return (f"RankPruner(scheme={self.scheme!r}, energy={self.energy}, period={self.period}, "
                f"nuclear={self.nuclear}, nuclear_every={self.nuclear_every!r}, "
                f"layers={len(self.layers)}, groups={len(self._groups)}, steps={self.steps})")


__all__ = ["RankPruner", "NUCLEAR_EVERY"]
