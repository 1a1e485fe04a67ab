"""Model registry: built-in CIFAR ResNets, small ViTs ("vit_tiny", "vit_small"), any torchvision model
("torchvision:NAME") and any timm model ("timm:NAME", timm installed).

`build(name, **kwargs)` records the name and arguments on the model (`model.trp_arch`), so that a saved
decomposed model can be rebuilt from its file without pickled code. `candidate_archs(model)` proposes the
records of a torchvision or timm model built directly with those libraries; trp.save keeps one only when a
fresh build of it has exactly the model's structure."""
import inspect

import torch.nn as nn

from .cifar_resnet import CifarResNet
from .vit import VIT_CONFIGS, ViT

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
TORCHVISION, TIMM = "torchvision:", "timm:"


def available():
    """The registry's names: the CIFAR ResNets, the ViTs, and the torchvision / timm name patterns.

    Returns:
        [str]: "resnet20" ... "resnet110", "vit_small", "vit_tiny", "torchvision:<name>", "timm:<name>".
    """
    return sorted(CIFAR_DEPTHS) + sorted(VIT_CONFIGS) + [f"{TORCHVISION}<name>", f"{TIMM}<name>"]


def _import_torchvision():
    try:  # optional dependency (the vision extra)
        import torchvision
    except ImportError as exc:
        raise ValueError("torchvision models need torchvision installed (pip install torchvision)") from exc
    return torchvision


def _import_timm():
    try:  # optional dependency (timm models only)
        import timm
    except ImportError as exc:
        raise ValueError("timm models need timm installed (pip install timm)") from exc
    return timm


def _check_torchvision_name(tv_name):
    names = _import_torchvision().models.list_models()
    if tv_name not in names:
        raise ValueError(f"unknown torchvision model {tv_name!r}; valid: {', '.join(sorted(names))}")


def _check_timm_name(timm_name):
    if not _import_timm().is_model(timm_name):
        raise ValueError(f"unknown timm model {timm_name!r} (timm.list_models() lists them)")


def check_name(name):
    """Validates a registry name without building the model (so bad names fail before any work).

    Args:
        name: a registry name (see available()); a "torchvision:NAME" or "timm:NAME" is looked up in that
            library, which must be installed.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: an unknown name, or a library that is not installed.
    """
    if name in CIFAR_DEPTHS or name in VIT_CONFIGS:
        return name
    if isinstance(name, str) and name.startswith(TORCHVISION):
        _check_torchvision_name(name[len(TORCHVISION):])
        return name
    if isinstance(name, str) and name.startswith(TIMM):
        _check_timm_name(name[len(TIMM):])
        return name
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(available())}")


def build(name, num_classes=10, in_channels=3, **kwargs):
    """A fresh model by registry name, with random weights (nothing is downloaded).

    Args:
        name: "resnet20" .. "resnet110", "vit_tiny", "vit_small", "torchvision:NAME" (any model of
            torchvision.models.list_models()) or "timm:NAME" (any timm model; timm must be installed).
        num_classes: classes of the head, an int >= 1; default 10.
        in_channels: input channels, an int >= 1 (torchvision models take 3); default 3.
        **kwargs: further keyword arguments of the builder (recorded too).

    Returns:
        The model, with `trp_arch` = {"name", "num_classes", "in_channels", **kwargs}: what trp.save records
        and trp.load rebuilds it from.

    Raises:
        ValueError: an unknown name, or a library that is not installed.
    """
    if name in CIFAR_DEPTHS:
        model = CifarResNet(CIFAR_DEPTHS[name], num_classes=num_classes, in_channels=in_channels, **kwargs)
    elif name in VIT_CONFIGS:
        model = ViT(**{**VIT_CONFIGS[name], **kwargs}, num_classes=num_classes, in_channels=in_channels)
    elif isinstance(name, str) and name.startswith(TORCHVISION):
        model = _torchvision(name[len(TORCHVISION):], num_classes, in_channels, **kwargs)
    elif isinstance(name, str) and name.startswith(TIMM):
        model = _timm(name[len(TIMM):], num_classes, in_channels, **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(available())}")
    model.trp_arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs}
    return model


def _torchvision(tv_name, num_classes, in_channels, **kwargs):
    torchvision = _import_torchvision()
    _check_torchvision_name(tv_name)
    if in_channels != 3:
        raise ValueError("torchvision models take 3 input channels")
    builder = torchvision.models.get_model_builder(tv_name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs.setdefault("weights_backbone", None)  # random weights: no download of a pretrained backbone
    return builder(weights=None, num_classes=num_classes, **kwargs)


def _timm(timm_name, num_classes, in_channels, **kwargs):
    timm = _import_timm()
    _check_timm_name(timm_name)
    return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)


def build_from_arch(arch):
    """Rebuild a model from the `trp_arch` dict that build() recorded.

    Args:
        arch: the record, a dict with "name" and build()'s other arguments (num_classes, in_channels, ...).

    Returns:
        A fresh model with random weights, as build(**arch) gives it.

    Raises:
        ValueError: when arch is not a dict with a "name", or build() refuses it.
    """
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"not a model architecture record: {arch!r}")
    arch = dict(arch)
    return build(arch.pop("name"), **arch)


def _head_sizes(model):
    """in_channels of the first conv and the output size of the last Linear / conv: the build() arguments
    that a model built directly with its library most often differs in."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    heads = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    return (convs[0].in_channels if convs else 3), (heads[-1] if heads else None)


def candidate_archs(model):
    """Records that build() might rebuild `model` from.

    Only proposals: the caller keeps one whose fresh build has exactly the model's structure (trp.save).

    Args:
        model: the nn.Module.

    Returns:
        [dict]: [its own `trp_arch`] when it has one; else, for a model built directly with torchvision or
            timm, the builder by name with its num_classes and in_channels (timm models carry their
            architecture's name; for torchvision, every builder of the model's module, e.g. resnet18 ...
            resnet152 for a ResNet); else [].
    """
    arch = getattr(model, "trp_arch", None)
    if arch is not None:
        return [arch]
    module = type(model).__module__
    in_channels, classes = _head_sizes(model)
    if module.startswith("timm."):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        classes = getattr(model, "num_classes", classes)
        if isinstance(name, str) and isinstance(classes, int):
            return [{"name": TIMM + name, "num_classes": classes, "in_channels": in_channels}]
        return []
    if module.startswith("torchvision.models.") and classes is not None:
        try:
            torchvision = _import_torchvision()
        except ValueError:
            return []
        names = sorted(n for n in torchvision.models.list_models()
                       if torchvision.models.get_model_builder(n).__module__ == module)
        return [{"name": TORCHVISION + n, "num_classes": classes, "in_channels": 3} for n in names]
    return []


__all__ = ["CifarResNet", "ViT", "VIT_CONFIGS", "build", "check_name", "build_from_arch", "candidate_archs",
           "available", "CIFAR_DEPTHS"]
