"""Low-level ops of the TRP library: the batched low-rank projection and fused factorized convolutions
(channel, spatial, and network decoupling in both orders: decoupled_conv, depthwise_decoupled_conv).

Each op is a torch.library custom op with a fake kernel; its kernels are the C++/CUDA ones of the compiled
extension trp_kernels._C, Triton kernels, and the PyTorch reference (trp_kernels.reference), which is
also the fallback when nothing was compiled."""
from . import _extension, conv, inplace, project, reference, selfcheck
from .conv import factorized_conv_channel, factorized_conv_spatial
from .decoupled import decoupled_conv
from .depthwise_decoupled import depthwise_decoupled_conv
from .project import WarmStart, lowrank_project, lowrank_project_many
from .selfcheck import SelfCheckError

__all__ = ["lowrank_project", "lowrank_project_many", "WarmStart", "factorized_conv_channel",
           "factorized_conv_spatial", "decoupled_conv", "depthwise_decoupled_conv", "backend_info", "inplace",
           "reference", "selfcheck", "SelfCheckError"]


def backend_info() -> dict:
    """Which backends were built and which one each op uses on CPU and CUDA tensors.

    Returns:
        A dict: "extension_loaded" and "extension_error" (the compiled extension trp_kernels._C), the
            "torch" and "torch_cuda" versions, "cuda_available", "lowrank_project" (the projection's backend per
            device), "factorized_conv" (the convolutions' setting and choices, both decoupled_convs included) and
            "self_check" (the first-use verdicts of this process).
    """
    import torch

    return {
        "extension_loaded": _extension.load(),
        "extension_error": _extension.error(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "lowrank_project": project.backend_info(),
        "factorized_conv": conv.backend_info(),  # both decoupled_convs included (same setting and caches)
        "self_check": selfcheck.info(),  # every first-use verdict of this process (trp_kernels/selfcheck.py)
    }
