"""Budgeted TRP: a target conv-MAC speed-up (the paper's measure, trp.count_macs) instead of an energy.

- the cost of the ranks is trp.cost.model.CostModel;
- allocate: the ranks at a budget, greedily by normalised energy per MAC across layers (each layer's
  squared singular values as fractions of its own total: a global ranking, as global magnitude pruning
  ranks weights across layers, weighted by what each component costs). trp.decompose(target_speedup=).
- SpeedupController: RankPruner's closed loop. After each projection it measures the speed-up the new
  ranks give and sets the energy of the next projection (a plain float, the same on every process since
  it depends on the ranks only) from the distance to the target, which ramps up geometrically from 1 over
  `warmup` projections so that ranks do not collapse early: proportional to the MACs above the goal, plus a
  trim for what SGD adds back; when a projection falls short, a cut (cut_to) removes the components worth
  least per MAC, a step a uniform energy cannot make (the class docstring says why, and why not an integral)."""
import heapq
import math

import torch

from trp._utils import checks
from trp.core import eligibility
from trp.core.schemes import layer_scheme, to_matrix
from trp.core.selection import select_layers
from trp.cost.model import CostModel


def check_reachable(model, scheme, target, input_size, name="target_speedup", layers=None, exclude=None):
    """Checks that a target speed-up is > 1 and reachable with the selected layers at rank 1.

    Args:
        model: the nn.Module.
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise".
        target: the target conv-MAC speed-up, a finite number.
        input_size: (C, H, W) or (N, C, H, W), the input at which conv MACs are counted.
        name: the argument's name in the error message. Default "target_speedup".
        layers: the layers to select, as for RankPruner. Default None: the "default" preset.
        exclude: layers to leave out, as for RankPruner. Default None.

    Returns:
        The target, as a float.

    Raises:
        ValueError: when target is <= 1 or above what rank 1 in every selected layer gives.
    """
    return CostModel(model, scheme, select_layers(model, scheme, layers, exclude), input_size).check_target(
        target, name)


def layer_gains(sigma):
    """Energy gain of each rank step of one layer: squared singular values (summed over the filters, for nd's
    [n, K] per-filter spectra) as fractions of the layer's total (zeros for an all-zero layer).

    Args:
        sigma: the layer's singular values, descending: a [K] tensor, or [n, K] per filter (or group).

    Returns:
        A list of K floats: the energy share of rank step i.
    """
    s2 = sigma.detach().to(torch.float64).square().reshape(-1, sigma.shape[-1]).sum(0)
    total = float(s2.sum())
    return [0.0] * len(s2) if total == 0 else (s2 / total).tolist()


def allocate(costs, spectra, target):
    """{name: rank, or None where the layer stays dense} meeting speed-up >= target, greedily: every layer
    starts at rank 1; the step (one more rank, or from the paying limit to dense) with the most normalised
    energy per MAC is taken while it fits the budget. Deterministic: ties go to the earlier layer.

    Args:
        costs: the CostModel of the selected layers.
        spectra: {name: singular values, descending} of every layer of `costs` (as spectra() gives).
        target: the target conv-MAC speed-up, > 1 and reachable (CostModel.check_target).

    Returns:
        {name: rank (int), or None where the layer stays dense}.

    Raises:
        ValueError: when target is <= 1 or unreachable.
    """
    target = costs.check_target(target)
    budget = costs.total_dense / target
    ranks = {n: (1 if costs.pay_rank[n] >= 1 else None) for n in costs.names}
    gains = {n: layer_gains(spectra[n]) for n in costs.names}
    spent = costs.macs(ranks)
    heap = []

    def push(i, name):
        r = ranks[name]
        if r is None:
            return
        if r < costs.pay_rank[name]:
            gain, cost = gains[name][r], costs.per_rank[name]
        else:  # the rest of the spectrum at once: the exact dense layer
            gain, cost = sum(gains[name][r:]), costs.dense[name] - costs.layer_macs(name, r)
        heapq.heappush(heap, (-gain / max(cost, 1), i, name, cost))

    for i, name in enumerate(costs.names):
        push(i, name)
    while heap:
        _, i, name, cost = heapq.heappop(heap)
        if spent + cost > budget * (1 + 1e-12):
            continue  # this layer's further steps cost as much or more: it stays where it is
        spent += cost
        ranks[name] = ranks[name] + 1 if ranks[name] < costs.pay_rank[name] else None
        push(i, name)
    return ranks


def cut_to(costs, spectra, ranks, budget):
    """{name: new rank} of the layers to cut so that the cost steered (costs.macs(capped=False)) is at most
    `budget`: from `ranks`, the component with the least normalised energy per MAC it saves (as allocate()
    ranks them) is removed, one at a time, never below rank 1. A step of one rank where it costs least, which a
    uniform energy cannot make once every layer's smallest kept component holds about the same share: raising
    the residual until it passes them drops one from nearly every layer at once (2.198x became 2.41x against a
    goal of 2.2x, ResNet-20 on the digits, and training at the decayed rate never grew them back).

    Args:
        costs: the cost model of the layers (CostModel, or LatencyCost: seconds instead of MACs).
        spectra: {name: singular values, descending} of every layer of `costs`, as the projection left them.
        ranks: {name: rank} after the latest projection.
        budget: the cost to reach, in costs.macs's unit.

    Returns:
        {name: new rank (int)} of the layers cut, the others absent; empty when nothing needs to go.
    """
    ranks = {n: int(ranks[n]) for n in costs.names}
    gains = {n: layer_gains(spectra[n]) for n in costs.names}
    spent = costs.macs(ranks, capped=False)
    heap = []

    def push(i, name):
        r = ranks[name]
        if r <= 1:
            return
        saved = spent - costs.macs({**ranks, name: r - 1}, capped=False)
        if saved > 0:
            heapq.heappush(heap, (gains[name][r - 1] / saved, i, name, saved))

    for i, name in enumerate(costs.names):
        push(i, name)
    cut = {}
    while spent > budget and heap:
        _, i, name, saved = heapq.heappop(heap)
        ranks[name] -= 1
        cut[name] = ranks[name]
        spent -= saved
        push(i, name)
    return cut


class SpeedupController:
    """Closed-loop energy for RankPruner(target_speedup=): update(ranks) after each projection returns the
    energy of the next one, and says in `cut` when a cut should follow it.

    The plant: a projection at energy E drops the components whose share of their layer's energy is below
    1 - E, and the next projection applies E again to the matrix already truncated. The ranks therefore keep
    falling as long as E < 1 by a margin, and they come back only as fast as SGD adds energy in new
    directions: the plant integrates the residual 1 - E, it does not settle at a rank per energy. Steering it
    with an integral of the error (as this controller first did) made a double integrator: on short runs the
    integral wound up while the first projections, at E ~ 1 - 1e-4, removed nothing from full-rank weights
    (torchvision resnet18, target 2, warmup 5: 1.0x for 10 projections), then kept pruning after the goal was
    passed (2.17x at the 14th projection, 3.52x at the 20th, still rising).

    The law, per projection, with the speed-up s of the new ranks and the goal g (which ramps geometrically
    from 1 to target over `warmup` projections, so that the ranks follow it down gradually):

    - proportional: the share of the selected layers' MACs above the goal's, excess = (M - D / g) / (M - F)
      (M: the network's MACs at the new ranks, D: dense, F: the layers not selected). On a flat spectrum the
      energy share of the smallest components is about their share of the rank, and a layer's factorized
      MACs are linear in its rank, so a residual of gain * excess removes about that share of what the goal
      asks for, and nothing once it is reached: no integral to wind up, no pruning past the goal.
    - cut: what the proportional term cannot do. Below the goal, after a projection that closed less than
      PROGRESS (a tenth) of the gap to the goal's MACs, update() sets `cut`, a cost of gain x the gap below the
      current one, and RankPruner removes the components worth least per MAC until it is reached (cut_to(), with
      the layers' spectra: one rank in one layer when the gap is small), then calls after_cut(). It catches the
      dead zone of integer ranks (once every layer's smallest kept component holds about the same share of its
      layer, an energy either keeps all of them or drops one from nearly every layer at once) and SGD adding
      back about what the projections remove (the ranks creep instead of standing still). Its forerunner, a
      trim of the residual that doubled after such a projection, closed the gap the uniform way: on ResNet-20 on
      the digits, 14 doublings at 2.198x against 2.2x ended in one projection that made it 2.41x, at the first
      learning-rate decay, and the decayed rate never grew the ranks back (measured).
    - trim: the residual at or above the goal. It falls back to at most its starting value and shrinks by the
      factor (g / s)^gain, and stays the residual that removes what SGD adds between projections (with E -> 1
      the ranks would grow back to full within a few steps: measured).

    1 - E = gain * max(excess, 0) + trim, in RESIDUAL.

    The gain: 1 would remove the whole excess in one projection. That is unstable while the learning rate is
    high: SGD re-grows the ranks between projections, a surge of excess (1.6x against a goal of 2.2x) then
    asked for a residual of 0.3, one projection dropped a third of every layer's energy and overshot (4x, then
    17x with ranks of 1), and training collapsed to chance accuracy (ResNet-20 on the digits, 20 epochs:
    measured, benchmarks/recipe_table.py). GAIN = 0.2 spreads the correction over about five projections.
    The price is a speed-up that lags a fast ramp by some projections.

    The steps are multiplicative and small, so E moves smoothly: a law that switches between holding
    (1 - E ~ 0) and pruning hard makes ranks swing between full and a few within an epoch, which wrecks
    training (measured). The speed-up steered is the uncapped one
    (CostModel.speedup(capped=False)), which moves with every rank even above the paying rank, where the real
    one is flat.

    Args:
        costs: the CostModel of the pruned layers.
        target: the target conv-MAC speed-up, > 1 and reachable (CostModel.check_target).
        warmup: projections over which the goal ramps from 1 to target, an int >= 0. Default 0.
        gain: the proportional gain, a float > 0. Default GAIN.
        residual: the starting 1 - energy (and the trim's ceiling once the goal is reached), clamped to
            RESIDUAL. Default 1e-4.

    Raises:
        ValueError: when an argument is out of range or the target is unreachable.
    """

    RESIDUAL = (1e-6, 0.5)  # range of 1 - energy: near-exact projections .. half the energy dropped
    GAIN = 0.2
    PROGRESS = 0.1  # below the goal, a projection closing less of the gap than this asks for a cut

    def __init__(self, costs, target, warmup=0, gain=GAIN, residual=1e-4):
        self.costs = costs
        self.target = costs.check_target(target)
        self.warmup = checks.integer(warmup, "warmup", 0, what=" (projections over which the target ramps)")
        self.gain = checks.real(gain, "gain", 0.0, low_open=True)
        self.updates = 0
        self.log_start = self._clamp(math.log(min(max(residual, self.RESIDUAL[0]), self.RESIDUAL[1])))
        self.log_trim = self.log_residual = self.log_start
        self.last_macs = None  # uncapped MACs after the previous projection
        self.speedup = None  # after the latest projection
        self.cut = None  # the cost a cut should reach after the latest projection (cut_to()), or None

    def _clamp(self, log_residual):
        return min(max(log_residual, math.log(self.RESIDUAL[0])), math.log(self.RESIDUAL[1]))

    @property
    def energy(self):
        """The energy of the next projection, 1 - the current residual (a float in (0, 1))."""
        return 1.0 - math.exp(self.log_residual)

    def goal(self, updates=None):
        """The speed-up aimed at after `updates` projections.

        Args:
            updates: the number of projections, an int >= 0. Default None: the updates so far.

        Returns:
            The goal, a float in [1, target].
        """
        t = self.updates if updates is None else updates
        ramp = 1.0 if self.warmup == 0 else min(1.0, t / self.warmup)
        return self.target ** ramp

    def update(self, ranks):
        """The energy of the next projection, from the ranks the latest one gave.

        Args:
            ranks: {layer name: rank} after the latest projection.

        Returns:
            The energy, a float.
        """
        self.updates += 1
        costs = self.costs
        macs = costs.macs(ranks, capped=False)
        goal_macs = costs.total_dense / self.goal()
        self.cut = None
        if macs <= goal_macs:  # the goal is reached: the trim falls back and shrinks
            self.log_trim = self._clamp(min(self.log_trim, self.log_start) - self.gain * math.log(goal_macs / macs))
        elif self.last_macs is not None and self.last_macs - macs < self.PROGRESS * (self.last_macs - goal_macs):
            self.cut = macs - self.gain * (macs - goal_macs)  # too slow: cut where it costs least
        return self._steer(ranks, goal_macs, macs)

    def after_cut(self, ranks):
        """The energy of the next projection, from the ranks after the cut that update() asked for.

        Args:
            ranks: {layer name: rank} after the cut.

        Returns:
            The energy, a float.
        """
        self.cut = None
        return self._steer(ranks, self.costs.total_dense / self.goal(), self.costs.macs(ranks, capped=False))

    def _steer(self, ranks, goal_macs, macs):
        """The energy of the next projection from the ranks and their uncapped cost `macs`."""
        costs = self.costs
        self.speedup = costs.speedup(ranks)
        excess = (macs - goal_macs) / max(macs - costs.fixed, 1e-12 * costs.total_dense)  # any unit: MACs or s
        self.log_residual = self._clamp(math.log(self.gain * max(excess, 0.0) + math.exp(self.log_trim)))
        self.last_macs = macs
        return self.energy

    def state_dict(self):
        """The controller's state (plain data), which load_state_dict() restores.

        Returns:
            A dict with the keys "target", "warmup", "gain", "updates", "log_residual", "log_trim",
            "last_macs" and "speedup".
        """
        return {"target": self.target, "warmup": self.warmup, "gain": self.gain, "updates": self.updates,
                "log_residual": self.log_residual, "log_trim": self.log_trim, "last_macs": self.last_macs,
                "speedup": self.speedup}

    def load_state_dict(self, state):
        """Restores what state_dict() saved.

        A state of the earlier integral law (no log_trim) resumes with its residual as the trim.

        Args:
            state: a dict from state_dict() of a controller with the same target, warmup and gain.

        Raises:
            ValueError: when the state is malformed or for another target, warmup or gain (nothing changed).
        """
        try:
            target, warmup, gain = state["target"], state["warmup"], state["gain"]
            updates, log_residual, speedup = state["updates"], state["log_residual"], state["speedup"]
            log_trim, last_macs = state.get("log_trim", log_residual), state.get("last_macs")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a SpeedupController state (missing or malformed {exc})") from None
        if (target, warmup, gain) != (self.target, self.warmup, self.gain):
            raise ValueError(f"the state was saved for target_speedup={target}, warmup={warmup}, gain={gain}; "
                             f"this pruner has {self.target}, {self.warmup}, {self.gain}")
        checks.integer(updates, "updates", 0)
        low, high = (math.log(r) for r in self.RESIDUAL)
        checks.real(log_residual, "log_residual", low - 1e-9, high + 1e-9)
        checks.real(log_trim, "log_trim", low - 1e-9, high + 1e-9)
        if last_macs is not None:
            checks.real(last_macs, "last_macs", 0.0)
        if speedup is not None:
            checks.real(speedup, "speedup", 1.0)
        self.updates, self.log_residual, self.speedup = updates, float(log_residual), speedup
        self.log_trim, self.last_macs = float(log_trim), (None if last_macs is None else float(last_macs))


def spectra(model, scheme, layers):
    """{name: singular values (float64, descending; network decoupling: [n, K] per filter or [c, K] per
    input channel; a grouped conv: [g, K] per group)} of the weights the selected layers compute with.

    Args:
        model: the nn.Module (not used: the layers are given).
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise".
        layers: the selected layers, a list of (name, module) pairs.

    Returns:
        {name: singular values tensor}.
    """
    out = {}
    for name, m in layers:
        dense = eligibility.dense_equivalent(m, eligibility.resolve(m)[0])
        own = layer_scheme(scheme, dense)
        out[name] = torch.linalg.svdvals(to_matrix(dense.weight.detach(), own, getattr(dense, "groups", 1))
                                         .to(torch.float64))
    return out


__all__ = ["SpeedupController", "allocate", "cut_to", "spectra", "layer_gains", "check_reachable"]
