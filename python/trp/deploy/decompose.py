"""trp.decompose: a trained network -> a new network whose selected layers are factorized modules."""
import copy
import re
import warnings

import torch
import torch.nn as nn

from trp._utils import checks
from trp.core import attention as transformer
from trp.core import rank as rank_rules
from trp.core.schemes import check_scheme
from trp.core.selection import NOT_NAMED, Selection, plan_layers
from trp.cost.flops import count_macs
from trp.cost.macs import dense_macs_per_output_pixel, input_shape, pays
from trp.cost.model import CostModel, check_target_speedup
from trp.deploy import calibration as calib
from trp.deploy import latency_budget
from trp.nn.modules import FACTORIZED, FACTORIZED_TYPES, FactorizedLinear
from trp.prune import budget as budget_mod

# The released code's deployment rule for network decoupling: per-filter energy 0.85 (channel/spatial use
# an absolute cutoff of 0.05 after TRP, which per-filter matrices with small singular values do not suit).
ND_DEFAULT_ENERGY = 0.85


def _implied_layers(layers, rank):
    """layers= with the names of a per-layer rank map added: rank={name: r} selects the layers it names."""
    if not isinstance(rank, dict):
        return layers
    named = [n for n in rank if isinstance(n, str)]
    if len(named) != len(rank):
        raise ValueError(f"rank= maps layer names to ranks, got keys {[k for k in rank if not isinstance(k, str)]}")
    if layers is None:
        return named or None
    return list(_as_specs(layers)) + named


def _as_specs(layers):
    return [layers] if isinstance(layers, (str, type, re.Pattern)) else list(layers)


def decompose(model, scheme, energy=None, threshold=None, layers=None, exclude=None, rank=None,
              target_speedup=None, input_size=None, target_latency=None, runtime=None, calibration=None,
              calibration_method=None, calibration_alpha=None):
    """A deep copy of `model` whose selected layers are replaced by factorized modules (`model` is untouched).

    For network decoupling the rank criterion picks each filter's (pointwise order) or input channel's
    (depthwise order) rank and the layer keeps the largest; for a grouped conv, each group's, likewise. "nd"
    factorizes each layer in its cheaper order (trp.core.schemes.nd_order), as RankPruner projects it.

    A layer whose factorized form would cost at least the dense multiply-adds stays dense. The SVD runs in
    float64 per layer: deployment accuracy matters more than speed here. Each layer is factorized from the
    weight it computes with (a parametrized weight: its value in eval mode; Conv1D: its transpose). Attention
    q/k/v targets and layers whose host reads their weights (nn.MultiheadAttention, the
    TransformerEncoderLayer fast path) are placed after trp.core.attention.prepare_hosts converts the host; a
    host it cannot convert keeps them dense (one warning). A decomposition that factorizes nothing warns.

    Args:
        model: the (trained) nn.Module.
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise".
        energy: rank criterion: the fraction of squared singular values kept, a float in (0, 1]. Give exactly
            one of energy, threshold and rank (or target_speedup). Default None (for nd*: ND_DEFAULT_ENERGY,
            as the released code).
        threshold: rank criterion: the absolute singular-value cutoff, a float (e.g. 0.05 after TRP
            training). Default None.
        rank: rank criterion: an int, or {layer name: int}; a map selects the layers it names, which must be
            eligible, in addition to those of layers=, and the layers it does not name stay dense.
            Default None.
        layers: the layers to decompose, as for RankPruner (a preset, module names, regexes or types;
            trp.core.selection). Default None: the "default" preset.
        exclude: layers to leave out of the selection, given like `layers`. Default None.
        target_speedup: instead of a criterion, a float > 1: ranks are allocated across the layers
            (trp.prune.budget.allocate) so that the conv-MAC speed-up is at least the target, and as close
            as one rank step allows; the result's `trp_budget` attribute holds the target, the ranks and the
            speed-up achieved. Default None.
        input_size: (C, H, W), the input at which conv MACs are counted (target_speedup) or latency is
            measured (target_latency, at runtime.batch_size); required with either. Default None.
        target_latency: instead of a criterion, a float > 1: ranks are chosen so that the network runs at least
            this many times faster than the dense one in `runtime`, by measurement
            (trp.deploy.latency_budget: per-layer times at candidate ranks, a greedy allocation by energy per
            second, then the whole network timed against the dense one and the allocation repeated if it fell
            short). Raises when the target is out of reach (before building anything where no layer is faster
            factorized; else after measuring the fastest allocation); warns when the network built misses it.
            The result's `trp_latency_budget` attribute holds the target, whether it was met, the measured
            speed-up, the ranks and every attempt. Attention q/k/v rows stay dense.
            Default None.
        runtime: where target_latency measures: a trp.Runtime, or a runtime name ("eager", "onnxruntime").
            Default None: Runtime("eager").
        calibration: activation-aware decomposition (trp.deploy.calibration): an iterable of sample model
            inputs (a list of batches, a generator; each a tensor, a tuple of positional arguments or a dict
            of keyword arguments for the model's forward), run through the model in eval mode to record the
            inputs of the layers to factorize. Each layer then factorizes W S, S a scaling of its inputs, and
            maps the factors back: the components kept are those that carry most of its output on such
            inputs, not most of its weight. The criteria (energy, threshold, rank, target_speedup) read the
            singular values of W S. Scheme "channel" only (Linear-like layers and convs; a conv's inputs are
            its im2col patches). Default None: the plain SVD of the weights.
        calibration_method: with calibration=: "whiten" (S the Cholesky factor of the inputs' second moment
            E[x x^T]: the best rank-k factors for the mean squared output error on the calibration inputs; a
            numerically singular second moment, from fewer inputs than features or an always-zero feature,
            gets a small ridge, trp.deploy.calibration.RIDGE x its mean diagonal) or "scale"
            (S = diag(E|x_j|)^alpha per input feature: cheaper, favours features of large magnitude).
            Default None: "whiten".
        calibration_alpha: the exponent alpha of "scale", a float > 0. Default None:
            trp.deploy.calibration.DEFAULT_ALPHA (0.5).

    Returns:
        The decomposed copy. Its `trp_skipped` attribute is {layer name: reason} for every candidate layer
        left dense (not selected, no saving at its rank, a host that cannot run it factorized), which
        trp.report shows.

    Raises:
        ValueError: when the criteria are bad (none or several, out of range, target_speedup without
            input_size), layers do not exist or are not eligible, or a selected weight holds NaN/Inf; with
            calibration=: a scheme other than "channel", a bad method or alpha, no inputs, inputs that do
            not reach a layer to factorize, or non-finite or all-zero statistics (the model is left as it
            was). calibration_method= or calibration_alpha= without calibration= is refused too.
    """
    check_scheme(scheme)
    selection = plan_layers(model, scheme, _implied_layers(layers, rank), exclude)
    selected = selection.targets
    skipped = {n: ("not in the rank= map" if why == NOT_NAMED and isinstance(rank, dict) else why)
               for n, why in selection.skipped.items()}
    checks.materialized(model, "trp.decompose")
    for t in selected:  # before any SVD: a NaN weight is named, not a linalg error
        if not bool(torch.isfinite(t.read()).all()):
            raise ValueError(f"trp.decompose: layer {t.name!r} has NaN or infinite weights (a diverged or "
                             "damaged model)")
    scalings = None
    if calibration is not None:
        layers = [t for t in selected if transformer.unsupported_host(model, t.name) is None
                  and (not isinstance(rank, dict) or t.name in rank)]  # those that can be factorized
        scalings = calib.calibrate(model, scheme, layers, calibration, calibration_method, calibration_alpha)
    elif calibration_method is not None or calibration_alpha is not None:
        raise ValueError("calibration_method= and calibration_alpha= apply only with calibration= (sample inputs)")
    budget = None
    if target_latency is not None:
        if scalings is not None:
            raise ValueError("target_latency= does not take calibration= yet: decompose by a criterion or a "
                             "target_speedup= with calibration=")
        if energy is not None or threshold is not None or rank is not None or target_speedup is not None:
            raise ValueError("give target_latency= or one rank criterion (energy=, threshold=, rank=, "
                             "target_speedup=), not several")
        return _decompose_to_latency(model, scheme, selection, skipped, target_latency, input_size, runtime)
    if runtime is not None:
        raise ValueError("runtime= says where target_latency= measures: give target_latency= too")
    if target_speedup is not None:
        if energy is not None or threshold is not None or rank is not None:
            raise ValueError("give target_speedup= or one rank criterion (energy=, threshold=, rank=), not both")
        check_target_speedup(target_speedup)
        if input_size is None:
            raise ValueError("target_speedup needs input_size= (C, H, W), the input at which conv MACs are "
                             "counted")
        chosen = [(t.name, t.module) for t in selected]
        costs = CostModel(model, scheme, chosen, input_size)
        spectra = budget_mod.spectra(model, scheme, chosen)
        if scalings is not None:  # the calibrated layers' criteria read W S (the others stay dense anyway)
            spectra.update({t.name: calib.scaled_spectrum(t.dense(), scalings[t.name])
                            for t in selected if t.name in scalings})
        allocated = budget_mod.allocate(costs, spectra, target_speedup)
        rank = {n: r for n, r in allocated.items() if r is not None}  # a layer not in the map stays dense
        budget = {"target_speedup": float(target_speedup), "ranks": allocated}
    if scheme.startswith("nd") and energy is None and threshold is None and rank is None:
        energy = ND_DEFAULT_ENERGY
    kind, value = rank_rules.check_criterion(energy, threshold, rank)
    if kind == "rank" and isinstance(value, dict):
        unknown = set(value) - {t.name for t in selected}
        if unknown:
            raise ValueError(f"rank= names layers that are not selected (excluded, or not a layer TRP can "
                             f"factorize): {sorted(unknown)}")
    compact = _build(model, scheme, selected, skipped, kind, value, scalings)
    if budget is not None:  # measured on the result, not predicted
        budget["speedup"] = costs.total_dense / count_macs(compact, input_size, linear=costs.linear)
        compact.trp_budget = budget
    return compact


def _decompose_to_latency(model, scheme, selection, skipped, target, input_size, runtime):
    """decompose(target_latency=): the measured table, the allocation and its verification loop."""
    target = checks.real(target, "target_latency", 1.0, low_open=True)
    if input_size is None:
        raise ValueError("target_latency needs input_size= (C, H, W), the input at which latency is measured")
    runtime = latency_budget.Runtime(runtime) if runtime is None or isinstance(runtime, str) else runtime
    if not isinstance(runtime, latency_budget.Runtime):
        raise ValueError(f"runtime= takes a trp.Runtime or a runtime name, got {type(runtime).__name__}")
    selected = [t for t in selection.targets if t.rows is None]
    skipped = dict(skipped, **{t.name: "attention q/k/v rows: target_latency does not time them on their own"
                               for t in selection.targets if t.rows is not None})
    if not selected:
        raise ValueError(f"target_latency: no layer to decompose (scheme {scheme!r}): {selection.summary()}")
    table = latency_budget.LatencyTable(model, scheme, selected, input_size, runtime)
    spectra = budget_mod.spectra(model, scheme, [(t.name, t.module) for t in selected])
    shape = (runtime.batch_size, *input_shape(input_size)[1:])
    param = next(model.parameters())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=param.device, dtype=param.dtype)

    def build(ranks):
        named = [t for t in selected if ranks[t.name] is not None]
        dense = dict(skipped, **{t.name: "dense is faster at every measured rank, or the budget keeps it"
                                 for t in selected if ranks[t.name] is None})
        with warnings.catch_warnings():  # "factorized nothing" is reported in the record, not per attempt
            warnings.simplefilter("ignore")
            return _build(model, scheme, named, dense, "rank", {t.name: ranks[t.name] for t in named}).eval()

    compact, record = latency_budget.fit_to_latency(table, spectra, target, build, runtime.timer_for(param.device),
                                                    copy.deepcopy(model).eval(), x)
    record.update(runtime=repr(runtime), input_shape=list(shape), total_dense_s=table.total_dense,
                  layers={n: {"rank": record["ranks"][n], "ms_dense": table.dense[n] * 1e3,
                              "ms_factorized": (None if record["ranks"][n] is None else
                                                table.times[n][table.ranks[n].index(record["ranks"][n])] * 1e3)}
                          for n in table.names})
    compact.train(model.training)
    compact.trp_latency_budget = record
    return compact


def _build(model, scheme, selected, skipped, kind, value, scalings=None):
    """The decomposed copy of `model`: each of `selected` factorized by the criterion (kind, value) where it
    pays (with `scalings`, {name: input scaling}, from calibrated factors); `skipped` ({name: reason}) is
    extended with the layers kept dense and becomes trp_skipped."""
    skipped = dict(skipped)
    chosen, kept_dense = {}, []
    for t in selected:
        layer_value = value.get(t.name) if isinstance(value, dict) else value
        if layer_value is None:  # a per-layer rank map without this layer: keep it dense
            skipped[t.name] = "no rank in the rank= map"
            continue
        why = transformer.unsupported_host(model, t.name)
        if why is not None:
            kept_dense.append(f"{t.name} ({why})")
            skipped[t.name] = f"its host cannot run factorized: {why}"
            continue
        dense = t.dense()
        args = {kind: layer_value}
        if scalings is not None:
            factorized = calib.calibrated_layer(dense, scalings[t.name], kind, layer_value)
        elif isinstance(dense, nn.Linear):
            factorized = FactorizedLinear.from_linear(dense, **args)
        else:
            factorized = FACTORIZED[t.scheme_for(scheme)].from_conv(dense, **args)
        if not pays(factorized, dense_macs_per_output_pixel(dense)):
            skipped[t.name] = (f"no saving at rank {factorized.rank}: the factorized form would cost at least "
                               "the dense multiply-adds")
            continue
        factorized.train(t.module.training)
        chosen[t.name] = factorized
    if kept_dense:
        warnings.warn("trp.decompose keeps these layers dense, their host module cannot run them "
                      "factorized: " + ", ".join(kept_dense), stacklevel=2)
    if not chosen:
        warnings.warn(f"trp.decompose factorized no layer (scheme {scheme!r}): "
                      f"{Selection([], skipped, scheme).summary() or 'the model has no conv or Linear layer'}",
                      stacklevel=2)
    compact = transformer.prepare_hosts(copy.deepcopy(model), chosen)  # hosts of the factorized ones only
    for name, factorized in chosen.items():
        compact.set_submodule(name, factorized)
    compact.trp_skipped = {n: skipped[n] for n in skipped if n not in chosen}
    return compact


def factorized_layers(model):
    """The factorized modules of a (decomposed) model.

    Args:
        model: the nn.Module to search, typically the result of decompose().

    Returns:
        {name: module} of every ChannelFactorizedConv2d, SpatialFactorizedConv2d, DecoupledConv2d,
        DepthwiseDecoupledConv2d and FactorizedLinear in the model, in named_modules() order.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, FACTORIZED_TYPES)}


__all__ = ["decompose", "factorized_layers", "ND_DEFAULT_ENERGY"]
