# Over 300 lines: the layer-selection language (presets, names, regexes, types) and its plan are one unit.
"""Which layers TRP works on: presets (the default one and the paper's), explicit layers=, and why every
other layer is skipped.

Only eligible layers can be selected (trp.eligibility: what TRP reproduces exactly). layers= takes presets,
module names, regular expressions (matched in full against module names) or module types, or a list of
them; exclude= the same without presets.

Presets (layers=None is "default", unless the model names its own: a `trp_layers` attribute, as
trp.models' CIFAR ResNets do with "paper" to keep the paper's experiments as they were):
- "paper": every dense (groups=1) conv whose kernel is not 1x1, except the network's first conv (the stem),
  as the paper and its released code do.
- "default": where the cost of modern networks lies. The paper's convs, plus
  * grouped convs (groups > 1 with several input channels per group: ResNeXt, RegNet): every group's filters
    are their own matrix (trp.schemes), factorized into a grouped pair of convs;
  * pointwise 1x1 convs (MobileNet, EfficientNet, the ResNets' bottlenecks), except tiny ones (a matrix side
    below TINY) and under nd (each filter of a 1x1 conv is a rank-1 matrix: nothing to factorize);
  * under the channel scheme, the Linear-like matrices (nn.Linear, transformers' Conv1D, attention q/k/v)
    of the network's blocks: attention q/k/v/out and MLP projections, found by structure, not by class
    names. A block is a child of an nn.ModuleList / nn.Sequential that has a sibling of identical structure
    (the same module types, parameter and buffer shapes: the repeated layers of Hugging Face, timm and
    torchvision models alike), or a module that holds an attention module trp knows
    (trp.core.attention). Skipped: tiny matrices, tied weights (a parameter shared by two modules, such as a
    tied LM head: changing one changes the other) and those whose host cannot run factorized.
  Never: the stem, depthwise convs (one input channel per group: every matrix has rank 1), Linear-like
  layers outside the blocks (embeddings, the classifier head, patch merging, poolers), and the network's
  last layer when it is a 1x1 conv outside the blocks (a conv classifier head: BiT, FCN, SqueezeNet).

plan_layers returns a Selection: the targets and, for every other candidate layer, why it is skipped.
Layers that look like a conv or a Linear but are not eligible (an nn.Conv2d subclass with its own forward,
an unregistered parametrization, ...) are skipped with one warning naming them when a preset selects
them, and refused with a ValueError when layers= names them. So is a Linear-like layer with a tied weight
named by layers= (a type such as nn.Linear matches a language model's tied output head): its factorized form
would untie it from the embedding."""
import re
import warnings

import torch.nn as nn

from trp.core import attention as transformer
from trp.core import eligibility
from trp.core.schemes import check_scheme, matrix_shape
from trp.core.targets import survey

PRESETS = ("default", "paper")
_INELIGIBLE = "not eligible: "
NOT_NAMED = "not named in layers="
TINY = 16  # the default skips matrices (pointwise convs, Linear-like) with a side below this: little to save


def check_module(model, name="model"):
    """Validates that `model` is an nn.Module instance (not a class, not anything else).

    Args:
        model: the object to check.
        name: the parameter name that the error message uses, str; default "model".

    Returns:
        The model, unchanged.

    Raises:
        TypeError: when model is not a torch.nn.Module instance (the message says to instantiate a class).
    """
    if not isinstance(model, nn.Module):
        what = f"the class {model.__name__} (instantiate it)" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"{name} must be a torch.nn.Module, got {what}")
    return model


def _as_list(spec, arg):
    if spec is None:
        return []
    if isinstance(spec, (str, type, re.Pattern)):
        return [spec]
    try:
        items = list(spec)
    except TypeError:
        raise ValueError(f"{arg}= must be a preset ({', '.join(PRESETS)}), a module name, regex, module type "
                         f"or a list of them, got {spec!r}") from None
    for item in items:
        if not isinstance(item, (str, type, re.Pattern)):
            raise ValueError(f"{arg}= entries must be presets, module names, regexes or module types, got {item!r}")
    return items


def _matches(spec, named, arg):
    """Names of the candidates in `named` that `spec` selects; a spec that selects nothing is an error."""
    if isinstance(spec, type):  # attention q/k/v are Linear-like: nn.Linear selects them
        hits = [n for n, m in named if isinstance(m, spec) or (isinstance(m, nn.MultiheadAttention)
                                                             and issubclass(nn.Linear, spec))]
    else:
        exact = [n for n, _ in named if isinstance(spec, str) and n == spec]
        if exact:
            hits = exact
        else:
            try:
                pattern = spec if isinstance(spec, re.Pattern) else re.compile(spec)
            except re.error:
                pattern = None
            hits = [n for n, _ in named if pattern is not None and pattern.fullmatch(n)]
    if not hits:
        sample = ", ".join(n for n, _ in named[:8]) + (", ..." if len(named) > 8 else "")
        raise ValueError(f"{arg}={spec!r} matches no convolution or linear module of the model "
                         f"(names are like: {sample or 'none'}; presets: {', '.join(PRESETS)})")
    return hits


# --- structure ------------------------------------------------------------------------------------------

def _signatures(model):
    """{id(module): hashable structure} for every module: its type, its parameters' and buffers' names and
    shapes, and its children's structures by name."""
    memo = {}

    def shape(t):  # a lazy module's parameters have none yet
        return None if isinstance(t, nn.parameter.UninitializedTensorMixin) else tuple(t.shape)

    def sig(m):
        key = id(m)
        if key not in memo:
            memo[key] = (type(m), tuple((n, shape(p)) for n, p in m._parameters.items() if p is not None),
                         tuple((n, shape(b)) for n, b in m._buffers.items() if b is not None),
                         tuple((n, sig(c)) for n, c in m._modules.items() if c is not None))
        return memo[key]

    sig(model)
    return memo


def block_names(model):
    """Names of the blocks (module doc), the parts of a network whose Linear-like layers the default selects.

    Args:
        model: the nn.Module.

    Returns:
        The sorted list of module names (str): the children of an nn.ModuleList / nn.Sequential that have a
            sibling of identical structure, and the modules that hold an attention module ("" for the root).
    """
    sigs = _signatures(model)
    out = set(transformer.block_names(model))
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        seen = {}
        for child_name, child in m.named_children():
            seen.setdefault(sigs[id(child)], []).append(child_name)
        prefix = f"{name}." if name else ""
        out.update(prefix + c for names in seen.values() if len(names) > 1 for c in names)
    return sorted(out)


def _inside(name, blocks):
    return any(b == "" or name == b or name.startswith(b + ".") for b in blocks)


def _shared(model):
    """{id(parameter): [its names]} for the parameters that more than one module holds (tied weights)."""
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {k: v for k, v in names.items() if len(v) > 1}


# --- presets --------------------------------------------------------------------------------------------

class _Candidate:
    """One candidate for the presets' rules: an eligible target or an ineligible layer (target None)."""

    def __init__(self, name, module, target=None, refused=None):
        self.name, self.module, self.target, self.refused = name, module, target, refused
        if target is not None:
            self.kind = "linear" if target.is_linear else "conv"
        elif isinstance(module, nn.MultiheadAttention):
            self.kind = "linear"
        else:
            self.kind = eligibility.kind_of(module)  # None: another kind of conv (Conv1d, transposed, ...)


def _conv_geometry(c):
    """(in, out, kernel, groups) of a conv-kind candidate from its weight (or its attributes)."""
    if c.target is not None:
        n, cg, kh, kw = c.target.shape
        return cg * c.target.groups, n, (kh, kw), c.target.groups
    m = c.module  # an ineligible conv-kind layer: nn.Conv2d's attributes, if it has them
    try:
        return m.in_channels, m.out_channels, tuple(m.kernel_size), m.groups
    except (AttributeError, TypeError):
        return None


def _tied_reason(names):
    return f"tied weight (shared as {', '.join(names)}): changing it changes every module that holds it"


def _tied_linear(c, shared):
    """The names sharing candidate c's weight when c is a Linear-like layer with a tied weight (a language
    model's output head tied to its embedding), else None. Decomposing it would untie them."""
    if c.target is None or not c.target.is_linear or c.target.rows is not None:
        return None
    return shared.get(id(c.target.param))


def _preset_reason(preset, c, ctx):
    """Why the preset skips candidate c (a phrase), or None when it selects it."""
    scheme = ctx["scheme"]
    if c.kind == "conv":
        if c.name == ctx["stem"]:
            return "stem (the network's first conv)"
        geometry = _conv_geometry(c)
        if geometry is None:
            return None  # refused below, with its reason
        cin, cout, kernel, groups = geometry
        if c.name == ctx["last"] and kernel == (1, 1):
            return "classifier head (the network's last layer, a 1x1 conv outside the blocks)"
        if groups > 1 and cin == groups:
            return "depthwise conv (one input channel per group: its matrices have rank 1; stays dense)"
        if preset == "paper":
            if groups > 1:
                return "grouped conv (the 'paper' preset takes dense convs only)"
            if kernel == (1, 1):
                return "1x1 conv (the 'paper' preset takes kxk convs only)"
            return None
        if kernel == (1, 1):
            if scheme.startswith("nd"):
                return "1x1 conv under nd (every filter is a rank-1 matrix: nothing to factorize)"
            if min(cin, cout) // groups < TINY:
                return f"tiny 1x1 conv (a matrix side below {TINY})"
        return None
    if c.kind != "linear":
        return "not a Conv2d- or Linear-like layer: " + c.refused
    if preset == "paper":
        return "Linear-like (the 'paper' preset takes convs only)"
    if scheme != "channel":
        return f"Linear-like: only the channel scheme factorizes it (scheme={scheme!r})"
    if not _inside(c.name, ctx["blocks"]):
        if c.name == ctx["head"]:
            return "classifier head (the last Linear-like layer outside the blocks)"
        return "outside the repeated blocks (embedding, head, pooler or glue layer)"
    if c.target is None:
        return None
    tied = ctx["shared"].get(id(c.target.param))
    if tied is not None and c.target.rows is None:
        return _tied_reason(tied)
    if min(c.target.shape) < TINY:
        return f"tiny Linear-like matrix (a side below {TINY})"
    why = transformer.unsupported_host(ctx["model"], c.name)
    if why is not None:
        return f"its host cannot run factorized: {why}"
    return None


def _context(model, scheme, cands):
    convs = [c.name for c in cands if c.kind == "conv"]
    blocks = block_names(model)
    outside = [c.name for c in cands if c.kind == "linear" and not _inside(c.name, blocks)]
    last = cands[-1].name if cands and not _inside(cands[-1].name, blocks) else None  # e.g. BiT's 1x1 conv head
    return {"model": model, "scheme": scheme, "stem": convs[0] if convs else None, "blocks": blocks,
            "head": outside[-1] if outside else None, "last": last, "shared": _shared(model)}


# --- the plan -------------------------------------------------------------------------------------------

class Selection:
    """What a layer selection takes and skips (plan_layers makes it; str() lists everything).

    Each argument is kept as the attribute of the same name.

    Args:
        targets: [trp.core.targets.Target], the matrices selected, in registration order.
        skipped: {layer name: reason} of every other candidate layer (convs, Linear-like layers, attention
            q/k/v), in registration order.
        scheme: the scheme the selection was made for, one of trp.core.schemes.SCHEMES.
    """

    def __init__(self, targets, skipped, scheme):
        self.targets, self.skipped, self.scheme = targets, skipped, scheme

    @property
    def names(self):
        """The selected targets' names, [str] in registration order."""
        return [t.name for t in self.targets]

    def summary(self):
        """The skipped layers counted by reason (one line per reason, the first names as examples)."""
        by_reason = {}
        for name, why in self.skipped.items():
            by_reason.setdefault(why, []).append(name)
        lines = []
        for why, names in by_reason.items():
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            lines.append(f"{len(names)} x {why} ({shown})")
        return "; ".join(lines)

    def __str__(self):
        lines = [f"selected for scheme {self.scheme!r}: {len(self.targets)} matrices"]
        lines += [f"  {t.name}: {'x'.join(map(str, matrix_shape(t.shape, t.scheme_for(self.scheme), t.groups)))}"
                  + (f" ({t.scheme_for(self.scheme)})" if self.scheme == "nd" else "")
                  for t in self.targets]
        lines.append(f"skipped: {len(self.skipped)}")
        lines += [f"  {n}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)

    __repr__ = __str__


def plan_layers(model, scheme="channel", layers=None, exclude=None, warn=True):
    """The layers TRP works on under `scheme`, and why every other candidate layer is skipped.

    Args:
        model: the nn.Module.
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise"; default "channel".
        layers: None (the model's `trp_layers`, else "default"), a preset ("default", "paper"), module names,
            regexes or module types, or a list mixing them; default None. Named layers are taken as given,
            and must be eligible.
        exclude: module names, regexes or types taken out of the selection; default None.
        warn: whether to emit one UserWarning naming the ineligible layers that a preset would have selected;
            default True.

    Returns:
        A Selection (str() lists everything).

    Raises:
        ValueError: a spec that matches nothing, a named layer that is not eligible, a Linear-like layer
            named under a scheme other than channel, or a named Linear-like layer with a tied weight.
    """
    check_module(model)
    check_scheme(scheme)
    if layers is None:
        layers = getattr(model, "trp_layers", None) or "default"
    cands = [_Candidate(n, m, t, why) for n, m, t, why in survey(model)]
    by_name = {c.name: c for c in cands}
    named = [(c.name, c.module) for c in cands]

    reasons, chosen, named_explicitly = {}, [], []
    specs = _as_list(layers, "layers")
    ctx = _context(model, scheme, cands)
    for spec in specs:
        if isinstance(spec, str) and spec in PRESETS:
            for c in cands:
                why = _preset_reason(spec, c, ctx)
                if why is None and c.refused is not None:  # the preset would take it: worth a warning
                    why = _INELIGIBLE + c.refused
                if why is None:
                    chosen.append(c.name)
                else:
                    reasons.setdefault(c.name, why)
        else:
            hits = _matches(spec, named, "layers")
            chosen += hits
            named_explicitly += hits
    excluded = set()
    for spec in _as_list(exclude, "exclude"):
        excluded.update(_matches(spec, named, "exclude"))

    bad = [f"{n} ({by_name[n].refused})" for n in dict.fromkeys(named_explicitly)
           if n not in excluded and by_name[n].refused is not None]
    if bad:
        raise ValueError("layers= names layers that TRP cannot reproduce exactly: " + "; ".join(bad)
                         + ". Exclude them (exclude=) or register an adapter (trp.register_layer_adapter)")
    tied = [f"{n} ({_tied_reason(names)})" for n in dict.fromkeys(named_explicitly)
            if n not in excluded and (names := _tied_linear(by_name[n], ctx["shared"])) is not None]
    if tied:
        raise ValueError("layers= names Linear-like layers with tied weights: " + "; ".join(tied) + ". Their "
                         "factorized form would untie them (a language model's head from its embedding); exclude "
                         "them (exclude=)")
    for n in named_explicitly:
        c = by_name[n]
        if n not in excluded and c.target is not None and c.target.is_linear and scheme != "channel":
            raise ValueError(f"layer {n!r} is Linear-like (nn.Linear, Conv1D or attention q/k/v): its out x in "
                             f"matrix only has the 'channel' scheme (got scheme={scheme!r}); exclude it or use "
                             "'channel'")
    selected = set(n for n in chosen if n not in excluded)
    ineligible = [f"{n} ({why[len(_INELIGIBLE):]})" for n, why in reasons.items()
                  if why.startswith(_INELIGIBLE) and n not in selected and n not in excluded]
    if ineligible and warn:
        warnings.warn("TRP skips layers it cannot reproduce exactly: " + "; ".join(ineligible), stacklevel=3)
    skipped = {}
    for c in cands:
        if c.name in selected:
            continue
        if c.name in excluded:
            skipped[c.name] = "excluded (exclude=)"
        elif c.name in reasons:
            skipped[c.name] = reasons[c.name]
        elif c.refused is not None:
            skipped[c.name] = _INELIGIBLE + c.refused
        else:  # the default's reason when it has one (stem, depthwise, ...): more telling
            skipped[c.name] = _preset_reason("default", c, ctx) or NOT_NAMED
    return Selection([c.target for c in cands if c.name in selected], skipped, scheme)


def select_targets(model, scheme="channel", layers=None, exclude=None, warn=True):
    """The matrices to prune/decompose: plan_layers(...).targets.

    Args:
        model: the nn.Module.
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise"; default "channel".
        layers: None (the model's `trp_layers`, else "default"), a preset ("default", "paper"), module names,
            regexes or module types, or a list mixing them (as plan_layers); default None.
        exclude: module names, regexes or types taken out of the selection; default None.
        warn: whether to emit one UserWarning naming the ineligible layers that a preset would have selected;
            default True.

    Returns:
        [trp.core.targets.Target] in registration order.

    Raises:
        ValueError: a spec that matches nothing, a named layer that is not eligible, a Linear-like layer
            named under a scheme other than channel, or a named Linear-like layer with a tied weight.
    """
    return plan_layers(model, scheme, layers, exclude, warn).targets


def select_layers(model, scheme="channel", layers=None, exclude=None, warn=True):
    """The layers to prune/decompose, as (name, module) pairs.

    The default is documented in trp.core.selection and docs/guides/models.md; plan_layers(...) also says why each
    other layer is skipped.

    Args:
        model: the nn.Module.
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise"; default "channel".
        layers: None (the model's `trp_layers`, else "default"), a preset ("default", "paper"), module names,
            regexes or module types, or a list mixing them (as plan_layers); default None.
        exclude: module names, regexes or types taken out of the selection; default None.
        warn: whether to emit one UserWarning naming the ineligible layers that a preset would have selected;
            default True.

    Returns:
        [(name, module)] in registration order (for attention q/k/v: the attention module; select_targets
            gives the matrices).

    Raises:
        ValueError: a spec that matches nothing, a named layer that is not eligible, a Linear-like layer
            named under a scheme other than channel, or a named Linear-like layer with a tied weight.
    """
    return [(t.name, t.module) for t in select_targets(model, scheme, layers, exclude, warn)]


__all__ = ["select_layers", "select_targets", "plan_layers", "Selection", "block_names", "check_module",
           "PRESETS", "TINY", "NOT_NAMED"]
