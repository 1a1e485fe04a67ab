"""Triton kernels of the fused factorized convolutions (trp_kernels::factorized_conv_channel/spatial,
decoupled_conv and depthwise_decoupled_conv).

Imported lazily by trp_kernels.conv, so that `import trp_kernels` works without triton and so that
TRITON_INTERPRET is read at first use. `supported()` says whether a call can run here, and why not."""
from typing import Optional

import torch

from . import decoupled, depthwise_decoupled
from ._common import MAX_RANK_PAD, common_unsupported, interpreting, last_config, max_offset, rank_pad
from .channel import factorized_conv_channel
from .decoupled import factorized_conv_decoupled
from .depthwise_decoupled import factorized_conv_depthwise_decoupled
from .spatial import factorized_conv_spatial

__all__ = ["factorized_conv_channel", "factorized_conv_spatial", "factorized_conv_decoupled",
           "factorized_conv_depthwise_decoupled", "supported",
           "interpreting", "last_config"]


def supported(kind: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: Optional[torch.Tensor],
              out_hw: tuple[int, int]) -> Optional[str]:
    """Why the Triton kernel of `kind` cannot run this call, or None when it can.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x: the input [N, c, H, W].
        w1: the first weight.
        w2: the second weight.
        bias: None, or the output bias [n].
        out_hw: the output's (OH, OW).

    Returns:
        None, or the reason (a short string).
    """
    if kind == "decoupled":
        return decoupled.supported(x, w1, w2, bias, out_hw)
    if kind == "depthwise_decoupled":
        return depthwise_decoupled.supported(x, w1, w2, bias, out_hw)
    why = common_unsupported(x, [x, w1, w2] + ([bias] if bias is not None else []), out_hw)
    if why is not None:
        return why
    limit = MAX_RANK_PAD[(kind, x.dtype == torch.float32)]
    if rank_pad(w1.shape[0]) > limit:
        return f"rank {w1.shape[0]} above the on-chip limit {limit} for {x.dtype}"
    if max_offset(x, 1) >= 2 ** 31 or w2.shape[0] * out_hw[0] * out_hw[1] >= 2 ** 31:
        return "image too large for 32-bit offsets"
    return None
