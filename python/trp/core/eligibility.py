"""Which layers TRP may touch: the one rule, and the registry of layer adapters (trp.adapters).

A layer is eligible when TRP reproduces its forward exactly:

1. a layer adapter is registered for a class of its MRO (built in: nn.Conv2d, nn.Linear, transformers'
   Conv1D, timm's Conv2dSame), and the layer's class overrides none of that adapter's `forward_attrs` (for
   nn.Conv2d: forward and _conv_forward) below the registered class. An isinstance test is not enough: timm's
   StdConv2d / ScaledStdConv2d are nn.Conv2d subclasses that standardize the weight inside their forward,
   and a plain conv built from their raw weight computes something else;
2. it has no forward hooks (the hook-based torch.nn.utils.weight_norm / spectral_norm recompute .weight
   before every forward; a factorized layer would not run them);
3. its weight is a Parameter, or is computed by torch.nn.utils.parametrize from parametrizations registered
   here as rank-preserving (built in: parametrizations.weight_norm, parametrizations.spectral_norm). The
   pruner then projects the registered original (weight_norm's direction v, spectral_norm's v), never the
   recomputed .weight: a write into that tensor is lost at the next forward;
4. the adapter finds nothing unsupported (e.g. a conv's padding_mode other than "zeros").

resolve(module) applies the rule: the adapter and the parameter the pruner projects, or the reason the layer
is not eligible (a phrase that names the layer's type). Layers that look like a conv or a Linear but fail
the rule are reported as skipped (default selection: one warning) or refused (explicit layers=)."""
import contextlib
import re

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from trp.core.adapters import BUILTIN, BUILTIN_PARAMETRIZATIONS, CONV2D, KINDS, LINEAR, LayerAdapter

_ADAPTERS = dict(BUILTIN)
_PARAMETRIZATIONS = dict(BUILTIN_PARAMETRIZATIONS)
# other layers that hold a conv/linear weight: listed as skipped (with their type) rather than ignored
_OTHER_CONVS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")


def _key(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_type(layer_type, what):
    if isinstance(layer_type, type) or (isinstance(layer_type, str) and _PATH.fullmatch(layer_type)):
        return layer_type
    raise ValueError(f"{what} must be a class or a 'module.ClassName' path string, got {layer_type!r}")


def register_layer_adapter(layer_type, adapter):
    """Declares how TRP handles a layer type (and its subclasses that override none of the adapter's
    forward_attrs): see trp.adapters.LayerAdapter.

    Args:
        layer_type: the class, or its "module.QualName" path (so that a library need not be imported).
        adapter: a trp.adapters.LayerAdapter instance whose kind is "conv" or "linear"; None removes the
            registration (the built-ins for nn.Conv2d and nn.Linear cannot be removed).

    Raises:
        ValueError: a bad type or adapter, or the removal of a built-in.
    """
    _check_type(layer_type, "layer_type")
    if adapter is None:
        if layer_type in (nn.Conv2d, nn.Linear):
            raise ValueError(f"the adapter of {layer_type.__name__} is built in and cannot be removed")
        _ADAPTERS.pop(layer_type, None)
        return
    if not isinstance(adapter, LayerAdapter) or adapter.kind not in KINDS:
        raise ValueError(f"adapter must be a trp.adapters.LayerAdapter instance with kind in {KINDS}, got "
                         f"{adapter!r}")
    if not adapter.forward_attrs or not all(isinstance(a, str) for a in adapter.forward_attrs):
        raise ValueError(f"adapter.forward_attrs must name the methods that compute the layer, got "
                         f"{adapter.forward_attrs!r}")
    _ADAPTERS[layer_type] = adapter


def register_weight_parametrization(parametrization_type, original="original"):
    """Declares a weight parametrization (torch.nn.utils.parametrize) whose computed weight has the rank of
    one of its inputs, so that TRP projects that input (and its layers become eligible).

    Valid only when W = f(X) has rank(W) <= rank(X) for every scheme's matrix of X, e.g. when f scales the
    rows or the columns (weight_norm, spectral_norm): the projected X then gives a weight of at most its rank,
    which decomposition factorizes exactly (it always factorizes the computed weight).

    Args:
        parametrization_type: the parametrization's class, or its "module.QualName" path.
        original: the ParametrizationList attribute holding X: "original" (one input), or "original0",
            "original1", ... (a parametrization whose right_inverse returns several tensors); default
            "original".

    Raises:
        ValueError: a bad type or name.
    """
    _check_type(parametrization_type, "parametrization_type")
    if not isinstance(original, str) or not re.fullmatch(r"original\d*", original):
        raise ValueError(f"original must be 'original' or 'original<i>', got {original!r}")
    _PARAMETRIZATIONS[parametrization_type] = original


def _lookup(table, cls):
    return table.get(cls) or table.get(_key(cls))


def find_adapter(module):
    """The adapter registered for the first class of type(module)'s MRO that has one.

    Says what the layer claims to be, not whether it is eligible (resolve does).

    Args:
        module: any nn.Module.

    Returns:
        (adapter, the class it is registered for), or (None, None) when no class of the MRO has one.
    """
    for cls in type(module).__mro__:
        adapter = _lookup(_ADAPTERS, cls)
        if adapter is not None:
            return adapter, cls
    return None, None


def kind_of(module):
    """The kind of computation a layer claims by its adapter: what cost counting treats as a conv or a Linear.

    Args:
        module: any nn.Module.

    Returns:
        "conv" or "linear" for a layer that computes (or claims to, by its adapter) a conv or a Linear, else
            None.
    """
    adapter, _ = find_adapter(module)
    return None if adapter is None else adapter.kind


def is_candidate(module):
    """Whether `module` holds a conv or Linear weight: eligible or not, TRP accounts for it.

    Args:
        module: any nn.Module.

    Returns:
        True for a layer with a registered adapter or another torch conv type (Conv1d, Conv3d, ConvTranspose*),
            else False.
    """
    return find_adapter(module)[0] is not None or isinstance(module, _OTHER_CONVS)


def _type_name(module):
    """The layer's class name (for a parametrized layer, the class torch.nn.utils.parametrize derived from)."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized") and cls.__bases__:
        cls = cls.__bases__[0]
    return cls.__name__


def _hook_names(module):
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    return [getattr(h, "__qualname__", None) or type(h).__name__ for h in hooks]


@contextlib.contextmanager
def _eval_mode(modules):
    """Evaluation mode for `modules` while inside (spectral_norm's power iteration updates its vectors in
    training mode: computing the weight must not change the model), then their own modes again."""
    modes = [(m, m.training) for m in modules]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def effective_weight(module):
    """The stored-layout weight that `module` computes with in eval mode, detached.

    Parametrizations are evaluated without side effects (their modules in eval mode meanwhile, so that
    spectral_norm's power iteration does not update its vectors).

    Args:
        module: a layer with a `weight` (a Parameter, or one computed by torch.nn.utils.parametrize).

    Returns:
        The weight tensor in the layer's stored layout, detached.
    """
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        with torch.no_grad(), _eval_mode(list(plist.modules())):
            return module.weight.detach()
    return module.weight.detach()


def _projected_parameter(module):
    """(the Parameter the pruner projects, None) or (None, reason)."""
    name = _type_name(module)
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        rules = [_lookup(_PARAMETRIZATIONS, type(p)) for p in plist]
        unknown = [type(p).__name__ for p, r in zip(plist, rules) if r is None]
        if unknown:
            return None, (f"{name} weight parametrized by {', '.join(unknown)}: TRP projects only "
                          "parametrizations whose weight has the rank of an input (weight_norm, spectral_norm, "
                          "or trp.register_weight_parametrization)")
        if any(r != "original" for r in rules[1:]):
            return None, f"{name} weight parametrization chain {[type(p).__name__ for p in plist]} is not supported"
        param = getattr(plist, rules[0], None)
        if not isinstance(param, nn.Parameter) or param.shape != effective_weight(module).shape:
            return None, (f"{name} weight parametrization {type(plist[0]).__name__}: its {rules[0]} is not a "
                          "parameter of the weight's shape")
        return param, None
    param = module._parameters.get("weight")
    if not isinstance(param, nn.Parameter):
        return None, f"{name}.weight is not a Parameter: nothing TRP can project in place"
    return param, None


def resolve(module):
    """Applies the eligibility rule (module doc) to one layer.

    Args:
        module: any nn.Module.

    Returns:
        (adapter, parameter, None) for an eligible layer, parameter being what the pruner projects; else
        (None, None, reason) with a short phrase naming the layer's type.
    """
    adapter, owner = find_adapter(module)
    cls, name = type(module), _type_name(module)
    if adapter is None:
        return None, None, f"{name} (TRP factorizes Conv2d- and Linear-like layers; " \
                           "trp.register_layer_adapter adds others)"
    overridden = [a for a in adapter.forward_attrs if getattr(cls, a, None) is not getattr(owner, a, None)]
    if overridden:
        return None, None, (f"{name} overrides {'/'.join(overridden)} of {owner.__name__}: TRP cannot "
                            "reproduce its computation (trp.register_layer_adapter can declare it)")
    if isinstance(module._parameters.get("weight"), nn.parameter.UninitializedParameter):
        return None, None, f"{name} is uninitialized (a lazy module): run one forward pass first"
    hooks = _hook_names(module)
    if hooks:
        return None, None, (f"{name} has forward hooks ({', '.join(hooks)}) that a factorized layer "
                            "would not run (for weight_norm / spectral_norm use torch.nn.utils.parametrizations)")
    why = adapter.unsupported(module)
    if why is not None:
        return None, None, f"{name}: {why}"
    param, why = _projected_parameter(module)
    if why is not None:
        return None, None, why
    return adapter, param, None


def dense_equivalent(module, adapter):
    """An nn.Conv2d / nn.Linear computing exactly what the eligible `module` computes (eval mode).

    Args:
        module: an eligible layer (resolve found an adapter for it).
        adapter: the layer's adapter, as resolve returns it.

    Returns:
        The module itself for a plain nn.Conv2d / nn.Linear (subclasses included, unparametrized), else a new
            layer from the adapter's dense, built from the effective weight.
    """
    if adapter in (CONV2D, LINEAR) and not parametrize.is_parametrized(module):
        return module
    return adapter.dense(module, effective_weight(module))


__all__ = ["register_layer_adapter", "register_weight_parametrization", "find_adapter", "kind_of",
           "is_candidate", "resolve", "effective_weight", "dense_equivalent"]
