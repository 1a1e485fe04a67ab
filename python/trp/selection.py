"""Which layers TRP works on.

Default (layers=None): every nn.Conv2d whose kernel is not 1x1, except the network's first conv (the first
nn.Conv2d in registration order), as the paper and its released code do. `layers=` / `exclude=` take module
names, regular expressions (matched in full against module names) or module types; an explicit `layers=` is
taken as given. Grouped, transposed and non-zero-padding-mode convs cannot be factorized by these schemes:
they are skipped with one warning naming them.

Linear-like layers (trp.targets): nn.Linear and its subclasses, and the q, k, v projections of
nn.MultiheadAttention ("<attention>.q_proj", ".k_proj", ".v_proj"; a type spec nn.Linear selects them too).
Default for a transformer (a model with attention modules, channel scheme), besides the convs above: every
Linear-like matrix inside a transformer block (the module that holds an attention: attention projections
and MLP), except tiny ones (smaller side < TINY_LINEAR) and those whose host cannot run factorized
(trp.transformer); embeddings, patch merging and the classifier head lie outside the blocks."""
import re
import warnings

import torch.nn as nn

from . import targets as targets_mod
from .schemes import check_scheme

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check_module(model, name="model"):
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
        raise ValueError(f"{arg}= must be a module name, regex, module type or a list of them, "
                         f"got {spec!r}") from None
    for item in items:
        if not isinstance(item, (str, type, re.Pattern)):
            raise ValueError(f"{arg}= entries must be module names, regexes or module types, got {item!r}")
    return items


TINY_LINEAR = 16  # default selection skips Linear-like matrices with a side below this: little to save


def _matches(spec, named, arg):
    """Names of the modules in `named` that `spec` selects; a spec that selects nothing is an error."""
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
                         f"(names are like: {sample or 'none'})")
    return hits


def _unsupported(module):
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed"
    if not isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)):
        return f"{type(module).__name__} (only Conv2d and Linear are supported)"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def _transformer_defaults(model, named, scheme):
    """Default Linear-like targets of a transformer (see the module doc); [] for other models."""
    from . import transformer
    blocks = transformer.block_names(model)
    if not blocks or scheme != "channel":
        return []

    def in_block(name):
        return any(b == "" or name.startswith(b + ".") for b in blocks)

    return [t.name for t in named.values() if t.is_linear and in_block(t.name) and min(t.shape) >= TINY_LINEAR
            and transformer.unsupported_host(model, t.name) is None]


def select_targets(model, scheme="channel", layers=None, exclude=None, warn=True):
    """[trp.targets.Target] of the matrices to prune/decompose, in registration order."""
    check_module(model)
    check_scheme(scheme)
    by_name = {t.name: t for t in targets_mod.candidates(model)}
    named = [(t.name, t.module) for t in by_name.values()]
    if layers is None:
        convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d)]
        first = convs[0][0] if convs else None
        chosen = [n for n, m in convs if n != first and tuple(m.kernel_size) != (1, 1)]
        chosen += _transformer_defaults(model, by_name, scheme)
    else:
        chosen = []
        for spec in _as_list(layers, "layers"):
            chosen += [n for n in _matches(spec, named, "layers") if n not in chosen]
    excluded = set()
    for spec in _as_list(exclude, "exclude"):
        excluded.update(_matches(spec, named, "exclude"))
    chosen = [n for n in chosen if n not in excluded]

    skipped, result = [], []
    for name in chosen:
        target = by_name[name]
        why = _unsupported(target.module)
        if why is not None:
            skipped.append(f"{name} ({why})")
            continue
        if target.is_linear and scheme != "channel":
            raise ValueError(f"layer {name!r} is Linear-like (nn.Linear or attention q/k/v): its out x in "
                             f"matrix only has the 'channel' scheme (got scheme={scheme!r}); exclude it or "
                             "use 'channel'")
        result.append(target)
    if skipped and warn:
        warnings.warn("TRP skips layers that the channel/spatial schemes cannot factorize: "
                      + ", ".join(skipped), stacklevel=3)
    # registration order, whatever the order of the specs
    order = {n: i for i, n in enumerate(by_name)}
    return sorted(result, key=lambda t: order[t.name])


def select_layers(model, scheme="channel", layers=None, exclude=None, warn=True):
    """[(name, module)] of the layers to prune/decompose, in registration order (for attention q/k/v: the
    attention module; select_targets gives the matrices)."""
    return [(t.name, t.module) for t in select_targets(model, scheme, layers, exclude, warn)]


__all__ = ["select_layers", "select_targets", "check_module", "TINY_LINEAR"]
