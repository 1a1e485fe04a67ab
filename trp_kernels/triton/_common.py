"""Helpers shared by the fused-conv Triton kernels: interpreter detection, tile-size arithmetic, register budgets,
launch limits and the launch itself (their autotune search spaces: configs.py)."""
import os
import threading

import torch
import triton
import triton.language as tl

# Tensor-core friendly minimum for tl.dot operands on Ampere/Hopper (M, N, K >= 16).
MIN_DOT = 16
# Largest padded rank the kernels keep on chip; beyond it the [pixels x r] accumulator no longer fits
# in registers at a useful tile size, and two convolutions are the better plan anyway. fp32 (IEEE, FMA
# instead of tensor cores, 2x the bytes) gets half: larger tiles exceed shared memory and compile slowly.
MAX_RANK_PAD = {("channel", False): 256, ("spatial", False): 128,
                ("channel", True): 128, ("spatial", True): 64}
# Register budget per thread, in 32-bit words, of a config's estimated live tiles (live_words in channel.py
# and spatial.py: fp32 accumulators plus the operand tiles that num_stages keeps in flight; the larger of
# the two GEMMs). The values are the largest that compile without spills for sm_80 and sm_90 across the
# shapes of tests/test_triton_compile.py, which checks every config that survives pruning (its `--all`
# table shows the first spills at 128 / 52 words for the channel kernel in fp16/bf16 / fp32, 32 / 36 for
# the spatial kernel, whose on-chip gather costs registers the estimate does not count).
REGS_PER_THREAD = {("channel", False): 112, ("channel", True): 48, ("spatial", False): 28, ("spatial", True): 28}

# The autotuner keeps per-call state on the kernel object (its arguments, the chosen config): launches of
# one autotuned kernel from several threads must not interleave.
LAUNCH_LOCK = threading.Lock()
# Launch grid limits of CUDA: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)

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


def regs_fit(kind, words, num_warps, dtype):
    """Whether a config's estimated live words per program fit the per-thread budget of its kernel."""
    return words <= REGS_PER_THREAD[(kind, dtype == torch.float32)] * num_warps * 32


def interpreter_consts(**counts):
    """Loop-bound arguments passed a second time, as constexprs <NAME>_CONST, under the interpreter only.
    Triton 3.6's interpreter cannot run `range` up to a runtime scalar: it holds scalars (and every value
    assigned in a kernel) as 1-element arrays, which its tensor __index__ cannot convert. Compiled kernels
    get 0, i.e. the runtime argument (see loop_bound), so they are neither changed nor specialised."""
    return {f"{name}_CONST": (int(v) if _INTERPRET else 0) for name, v in counts.items()}


@triton.jit
def loop_bound(runtime, CONST: tl.constexpr):
    # use inline in range(...): assigning the result to a variable would make it an array again there
    return CONST if CONST > 0 else runtime


def precision(dtype):
    # fp32 stays IEEE (no TF32) so that results match the two fp32 convolutions to rounding (1e-5 rel).
    return "ieee" if dtype == torch.float32 else "tf32"


def named(named_args, kwargs):
    d = dict(named_args)
    d.update(kwargs)
    return d


# Index arithmetic inside the kernels is 32-bit except for the batch offset: the flattened output-pixel
# index (N * OH * OW, plus the overrun of the last tile) and per-image element offsets must fit.
TILE_OVERRUN = 1024  # above any tile's pixel count: a program's indices may run past the last pixel


def max_offset(t, first_dim):
    """Largest element offset of t over its dimensions from first_dim on (through its strides)."""
    return sum((size - 1) * abs(st) for size, st in zip(t.shape[first_dim:], t.stride()[first_dim:]) if size)


def common_unsupported(x, tensors, out_hw):
    """The reason none of the fused kernels can run this call (device, dtypes, pixel count), or None."""
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"{x.device.type} tensors need CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    if any(t.dtype != x.dtype for t in tensors):
        return "all tensors must share one dtype"
    if any(t.device != x.device for t in tensors):
        return "all tensors must be on one device"
    if x.shape[0] * out_hw[0] * out_hw[1] + TILE_OVERRUN >= 2 ** 31:
        return "N * OH * OW output pixels too many for 32-bit indices"
    return None


@triton.jit
def output_pixels(pid, M, OH, OW, STRIDE_H, STRIDE_W, PAD_T, PAD_L, BLOCK_M: tl.constexpr):
    """The BLOCK_M output pixels (flattened over batch, rows, columns) of program pid: their index, validity,
    batch index, output row/column and the top-left input position of their receptive field."""
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    tmp = offs_m // OW
    oh = tmp % OH
    n = tmp // OH
    return offs_m, m_ok, n, oh, ow, oh * STRIDE_H - PAD_T, ow * STRIDE_W - PAD_L


_launched = threading.local()  # this thread's last launch: kind -> its tile configuration (last_config)


def grid_fits(grid):
    """Whether a launch grid (1 to 3 program counts) is within CUDA's limits (GRID_LIMITS)."""
    return all(0 <= g <= limit for g, limit in zip(grid, GRID_LIMITS))


def launch(kind, kernel, fixed, grid, args, consts):
    """kernel[grid](*args, **consts, **fixed) under LAUNCH_LOCK, remembering (for this thread) which tile
    configuration ran: the autotuner's choice, or `fixed` (the interpreter's single config)."""
    with LAUNCH_LOCK:
        kernel[grid](*args, **consts, **fixed)
        best = getattr(kernel, "best_config", None)
        if not hasattr(_launched, "configs"):
            _launched.configs = {}
        _launched.configs[kind] = str(best) if best is not None else \
            ", ".join(f"{k}: {v}" for k, v in sorted(fixed.items()))


def last_config(kind):
    """The tile configuration of this thread's last launch of the `kind` kernel (None before the first)."""
    return getattr(_launched, "configs", {}).get(kind)
