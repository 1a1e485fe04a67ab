"""Triton kernels of the fused factorized convolutions (trp_kernels::factorized_conv_channel/spatial).

Imported lazily by trp_kernels.conv, so that `import trp_kernels` works without triton and so that
TRITON_INTERPRET is read at first use. `supported()` says whether a call can run here, and why not."""
import torch

from ._common import DTYPES, MAX_RANK_PAD, interpreting, rank_pad
from .channel import factorized_conv_channel
from .spatial import factorized_conv_spatial

__all__ = ["factorized_conv_channel", "factorized_conv_spatial", "supported", "interpreting"]


def supported(kind, x, w1, w2, bias, out_hw):
    """None when the Triton kernel can run this call, else the reason (a short string)."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"{x.device.type} tensors need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    tensors = [x, w1, w2] + ([bias] if bias is not None else [])
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    if any(t.dtype != x.dtype for t in tensors):
        return "all tensors must share one dtype"
    if any(t.device != x.device for t in tensors):
        return "all tensors must be on one device"
    limit = MAX_RANK_PAD[(kind, x.dtype == torch.float32)]
    if rank_pad(w1.shape[0]) > limit:
        return f"rank {w1.shape[0]} above the on-chip limit {limit} for {x.dtype}"
    # Index arithmetic inside the kernels is 32-bit except for the batch offset: the flattened output-pixel
    # index (N * OH * OW, plus the overrun of the last tile) and per-image element offsets must fit.
    if x.shape[0] * out_hw[0] * out_hw[1] + _TILE_OVERRUN >= 2 ** 31:
        return "N * OH * OW output pixels too many for 32-bit indices"
    if _max_offset(x, 1) >= 2 ** 31 or w2.shape[0] * out_hw[0] * out_hw[1] >= 2 ** 31:
        return "image too large for 32-bit offsets"
    return None


_TILE_OVERRUN = 1024  # above any tile's pixel count: a program's indices may run past the last pixel


def _max_offset(t, first_dim):
    return sum((size - 1) * abs(st) for size, st in zip(t.shape[first_dim:], t.stride()[first_dim:]) if size)
