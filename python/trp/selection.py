"""Which layers TRP works on.

Default (layers=None): every nn.Conv2d whose kernel is not 1x1, except the network's first conv (the first
nn.Conv2d in registration order), as the paper and its released code do. `layers=` / `exclude=` take module
names, regular expressions (matched in full against module names) or module types; an explicit `layers=` is
taken as given. Grouped, transposed and non-zero-padding-mode convs cannot be factorized by these schemes:
they are skipped with one warning naming them."""
import re
import warnings

import torch.nn as nn

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


def _matches(spec, named, arg):
    """Names of the modules in `named` that `spec` selects; a spec that selects nothing is an error."""
    if isinstance(spec, type):
        hits = [n for n, m in named if isinstance(m, spec)]
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
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"{type(module).__name__} (only Conv2d and Linear are supported)"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"grouped (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
    return None


def select_layers(model, scheme="channel", layers=None, exclude=None, warn=True):
    """[(name, module)] of the layers to prune/decompose, in registration order."""
    check_module(model)
    check_scheme(scheme)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV_TYPES + (nn.Linear,))]
    by_name = dict(named)
    if layers is None:
        convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d)]
        first = convs[0][0] if convs else None
        chosen = [n for n, m in convs if n != first and tuple(m.kernel_size) != (1, 1)]
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
        module = by_name[name]
        why = _unsupported(module)
        if why is not None:
            skipped.append(f"{name} ({why})")
            continue
        if isinstance(module, nn.Linear) and scheme != "channel":
            raise ValueError(f"layer {name!r} is an nn.Linear: its out x in matrix only has the "
                             f"'channel' scheme (got scheme={scheme!r}); exclude it or use 'channel'")
        result.append((name, module))
    if skipped and warn:
        warnings.warn("TRP skips layers that the channel/spatial schemes cannot factorize: "
                      + ", ".join(skipped), stacklevel=3)
    # registration order, whatever the order of the specs
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(result, key=lambda nm: order[nm[0]])


__all__ = ["select_layers", "check_module"]
