"""Model registry: built-in CIFAR ResNets, small ViTs ("vit_tiny", "vit_small") and any torchvision
classification model ("torchvision:NAME").

`build(name, **kwargs)` records the name and arguments on the model (`model.trp_arch`), so that a saved
decomposed model can be rebuilt from its file without pickled code."""
import torch.nn as nn

from .cifar_resnet import CifarResNet
from .vit import VIT_CONFIGS, ViT

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


def available():
    return sorted(CIFAR_DEPTHS) + sorted(VIT_CONFIGS) + ["torchvision:<name>"]


def check_name(name):
    """Validates a registry name without building the model (so bad names fail before any work)."""
    if name in CIFAR_DEPTHS or name in VIT_CONFIGS:
        return name
    if isinstance(name, str) and name.startswith("torchvision:"):
        try:
            import torchvision
        except ImportError as exc:
            raise ValueError("torchvision models need torchvision installed (pip install torchvision)") from exc
        tv_name = name.split(":", 1)[1]
        names = torchvision.models.list_models(module=torchvision.models)
        if tv_name not in names:
            raise ValueError(f"unknown torchvision model {tv_name!r}; valid: {', '.join(sorted(names))}")
        return name
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(available())}")


def build(name, num_classes=10, in_channels=3, **kwargs):
    """A fresh model by registry name, e.g. "resnet20" or "torchvision:resnet50"."""
    if name in CIFAR_DEPTHS:
        model = CifarResNet(CIFAR_DEPTHS[name], num_classes=num_classes, in_channels=in_channels, **kwargs)
    elif name in VIT_CONFIGS:
        model = ViT(**{**VIT_CONFIGS[name], **kwargs}, num_classes=num_classes, in_channels=in_channels)
    elif isinstance(name, str) and name.startswith("torchvision:"):
        model = _torchvision(name.split(":", 1)[1], num_classes, in_channels, **kwargs)
    else:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(available())}")
    model.trp_arch = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **kwargs}
    return model


def _torchvision(tv_name, num_classes, in_channels, **kwargs):
    try:
        import torchvision
    except ImportError as exc:
        raise ValueError("torchvision models need torchvision installed (pip install torchvision)") from exc
    names = torchvision.models.list_models(module=torchvision.models)
    if tv_name not in names:
        raise ValueError(f"unknown torchvision model {tv_name!r}; valid: {', '.join(sorted(names))}")
    if in_channels != 3:
        raise ValueError("torchvision models take 3 input channels")
    return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)


def build_from_arch(arch):
    """Rebuild a model from the `trp_arch` dict that build() recorded."""
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"not a model architecture record: {arch!r}")
    arch = dict(arch)
    return build(arch.pop("name"), **arch)


__all__ = ["CifarResNet", "ViT", "VIT_CONFIGS", "build", "check_name", "build_from_arch", "available", "CIFAR_DEPTHS"]
