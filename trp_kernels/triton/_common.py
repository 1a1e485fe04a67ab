"""Helpers shared by the fused-conv Triton kernels: interpreter detection, tile-size arithmetic and
autotune config pruning."""
import os

import torch

# Tensor-core friendly minimum for tl.dot operands on Ampere/Hopper (M, N, K >= 16).
MIN_DOT = 16
# Largest padded rank the kernels keep on chip; beyond it the [pixels x r] accumulator no longer fits
# in registers at a useful tile size, and two convolutions are the better plan anyway. fp32 (IEEE, FMA
# instead of tensor cores, 2x the bytes) gets half: larger tiles exceed shared memory and compile slowly.
MAX_RANK_PAD = {("channel", False): 256, ("spatial", False): 128,
                ("channel", True): 128, ("spatial", True): 64}
# fp32 registers one program may hold in an accumulator (8 warps x 32 threads x 64 registers).
MAX_ACC = 16384

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# triton.jit decides at decoration time (when this package is imported) whether kernels are interpreted
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting():
    """True when this package's kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1
    was set when trp_kernels.triton was first imported)."""
    return _INTERPRET


def next_pow2(v):
    v = int(v)
    return 1 if v <= 1 else 1 << (v - 1).bit_length()


def rank_pad(r):
    return max(MIN_DOT, next_pow2(r))


def out_size(size, k, s, p_lo, p_hi, d):
    return (size + p_lo + p_hi - d * (k - 1) - 1) // s + 1


def precision(dtype):
    # fp32 stays IEEE (no TF32) so that results match the two fp32 convolutions to rounding (1e-5 rel).
    return "ieee" if dtype == torch.float32 else "tf32"


def named(named_args, kwargs):
    d = dict(named_args)
    d.update(kwargs)
    return d


AUTOTUNE_ENV = "TRP_TRITON_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick", "off")


def autotune_mode():
    """TRP_TRITON_AUTOTUNE: full (default; every config, tuned once per shape), quick (three configs: for
    time-boxed benchmark runs), off (one config chosen by the tile rules, no tuning)."""
    mode = os.environ.get(AUTOTUNE_ENV, "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV} must be one of {', '.join(AUTOTUNE_MODES)}, got {mode!r}")
    return mode
