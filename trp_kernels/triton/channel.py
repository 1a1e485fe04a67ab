"""Fused channel-bottleneck convolution: conv(kh x kw, c -> r) then conv(1 x 1, r -> n), one launch.

Design (back-to-back GEMM): a program owns BLOCK_M output pixels (flattened over batch, rows, columns).
GEMM 1 is an implicit-GEMM convolution: for every tap (i, j) and every block of BLOCK_C input channels it
gathers the [BLOCK_M x BLOCK_C] input patch (zero outside the padded image) and multiplies it by the
[BLOCK_C x R_PAD] slice of c_weight, accumulating the [BLOCK_M x R_PAD] rank-r intermediate in fp32
registers. The intermediate is rounded to the input dtype (as the two-conv path stores it) and GEMM 2
multiplies it by [R_PAD x BLOCK_N] blocks of p_weight, looping over all output channels inside the
program, so the intermediate is computed once and never written to memory. Tensors are addressed through
their strides, so NCHW and channels_last input/output need no copies; weights are read in place (no
per-call packing kernels, which would cost launches at batch 1)."""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import geometry
from ._common import interpreter_consts, interpreting, launch, loop_bound, next_pow2, output_pixels, precision, rank_pad
from .configs import TileSpace, by_registers


@triton.jit
def _channel_kernel(
    X, W1, W2, B, Y,
    C, H, W, R, NOUT, OH, OW, M,
    sxn, sxc, sxh, sxw,
    s1r, s1c, s1h, s1w,
    s2o, s2r,
    syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, C_CONST: tl.constexpr, NOUT_CONST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m, m_ok, n, oh, ow, ih0, iw0 = output_pixels(tl.program_id(0), M, OH, OW, STRIDE_H, STRIDE_W,
                                                      PAD_T, PAD_L, BLOCK_M)
    # batch offset in int64: a batch of large images can exceed 2**31 elements
    x_img = X + n.to(tl.int64) * sxn

    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # one flat loop over (tap, channel block): a single software-pipelined K loop on the GPU, and a small
    # body (unrolling the taps made fp32 FMA kernels take minutes in ptxas)
    n_cb = tl.cdiv(C, BLOCK_C)
    for kb in range(0, KH * KW * tl.cdiv(loop_bound(C, C_CONST), BLOCK_C)):  # = KH * KW * n_cb
        tap = kb // n_cb
        cc = (kb - tap * n_cb) * BLOCK_C + offs_c
        i = tap // KW
        j = tap - i * KW
        ih = ih0 + i * DIL_H
        iw = iw0 + j * DIL_W
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = cc < C
        xt = tl.load((x_img + ih * sxh + iw * sxw)[:, None] + cc[None, :] * sxc,
                     mask=ok[:, None] & c_ok[None, :], other=0.0)
        wt = tl.load(W1 + i * s1h + j * s1w + cc[:, None] * s1c + offs_r[None, :] * s1r,
                     mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)

    # round like the stored intermediate of the two-conv path; low precision also feeds the tensor cores
    mid = acc.to(Y.dtype.element_ty)
    y_pix = Y + n.to(tl.int64) * syn + oh * syh + ow * syw
    for o0 in range(0, loop_bound(NOUT, NOUT_CONST), BLOCK_N):
        oo = o0 + tl.arange(0, BLOCK_N)
        o_ok = oo < NOUT
        w2 = tl.load(W2 + offs_r[:, None] * s2r + oo[None, :] * s2o,
                     mask=r_ok[:, None] & o_ok[None, :], other=0.0)
        out = tl.dot(mid, w2, input_precision=PRECISION)
        if HAS_BIAS:
            out += tl.load(B + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_pix[:, None] + oo[None, :] * syc, out.to(Y.dtype.element_ty),
                 mask=m_ok[:, None] & o_ok[None, :])


def live_words(r_pad: int, block_m: int, block_c: int, block_n: int, num_stages: int, dtype: torch.dtype) -> float:
    """Estimated live 32-bit words of one program of the channel kernel (see _common.REGS_PER_THREAD).

    GEMM 1 holds the fp32 [BLOCK_M x R_PAD] accumulator and num_stages - 1 input and c_weight tiles in flight;
    GEMM 2 the intermediate in the input dtype, the fp32 [BLOCK_M x BLOCK_N] output block and p_weight tiles.

    Args:
        r_pad: the padded rank R_PAD.
        block_m: output pixels per program.
        block_c: input channels per step of GEMM 1.
        block_n: output channels per step of GEMM 2.
        num_stages: the software pipeline's depth.
        dtype: the input dtype.

    Returns:
        The larger of the two GEMMs' estimates.
    """
    words = dtype.itemsize / 4
    gemm1 = block_m * r_pad + (num_stages - 1) * (block_m * block_c + block_c * r_pad) * words
    gemm2 = block_m * r_pad * words + block_m * block_n + (num_stages - 1) * r_pad * block_n * words
    return max(gemm1, gemm2)


# A short list (autotuning compiles each one per shape): tiles for small CIFAR layers up to the wide ResNet-50
# ones, (BLOCK_M, BLOCK_C, BLOCK_N, warps, stages); the pruning drops those whose accumulators exceed the register
# budget for the rank. The last two: small tiles over 8 warps, few accumulator registers per thread, for the
# largest ranks.
_TILES = {"full": [(32, 16, 16, 4, 2), (32, 32, 32, 4, 3), (32, 64, 64, 4, 3), (64, 16, 32, 4, 3),
                   (64, 32, 64, 4, 3), (64, 64, 64, 4, 3), (64, 32, 128, 4, 3), (128, 32, 64, 8, 3),
                   (128, 64, 64, 8, 3), (128, 32, 128, 8, 3), (32, 16, 16, 8, 2), (64, 16, 32, 8, 2)],
          "quick": [(32, 16, 16, 4, 2), (64, 32, 64, 4, 3), (128, 32, 64, 8, 3)],
          "off": [(64, 32, 64, 4, 3)]}


TUNING = TileSpace(
    ("BLOCK_M", "BLOCK_C", "BLOCK_N"), _TILES,
    # x's and y's layout strides too: NCHW and channels_last inputs of one shape tune separately
    ["C", "H", "W", "R_PAD", "NOUT", "M", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "KH", "KW", "sxc", "sxw", "syc"],
    by_registers("channel",
                 lambda a, cfg, dtype: live_words(a["R_PAD"], cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_C"],
                                                  cfg.kwargs["BLOCK_N"], cfg.num_stages, dtype),
                 lambda a: {"BLOCK_C": max(16, next_pow2(a["C"])), "BLOCK_N": max(16, next_pow2(a["NOUT"])),
                            "BLOCK_M": max(32, next_pow2(a["M"]))}))


def _kernel():
    """Autotuned kernel on the GPU; under the interpreter a single small config (autotuning there would
    run every config serially on the CPU)."""
    if interpreting():
        return _channel_kernel, {"BLOCK_M": 64, "BLOCK_C": 16, "BLOCK_N": 16}
    return TUNING.autotuned(_channel_kernel), {}


def launch_args(x: torch.Tensor, c_weight: torch.Tensor, p_weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], y: torch.Tensor
                ) -> tuple[Callable, tuple, dict]:
    """The launch of the channel kernel for one call writing y (the wrapper and tests/test_triton_compile.py).

    Args:
        x: the input [N, c, H, W].
        c_weight: weight of the kh x kw conv [r, c, kh, kw].
        p_weight: weight of the 1 x 1 conv [n, r, 1, 1].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.
        y: the output [N, n, OH, OW].

    Returns:
        A tuple (grid, args, consts): the launch grid (a function of the config's meta-parameters), the
            kernel's positional arguments and its untuned constexprs.
    """
    nb, c, h, w = x.shape
    r, _, kh, kw = c_weight.shape
    _, nout, oh, ow = y.shape
    args = (x, c_weight, p_weight, bias if bias is not None else y, y,
            c, h, w, r, nout, oh, ow, nb * oh * ow,
            *x.stride(), *c_weight.stride(), p_weight.stride(0), p_weight.stride(1), *y.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    consts = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, R_PAD=rank_pad(r), PRECISION=precision(x.dtype),
                  **interpreter_consts(C=c, NOUT=nout))
    m = nb * oh * ow
    return (lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)), args, consts


def factorized_conv_channel(x: torch.Tensor, c_weight: torch.Tensor, p_weight: torch.Tensor,
                            bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int]) -> torch.Tensor:
    """The channel-bottleneck convolution by the fused kernel (the caller has checked supported()).

    Args:
        x: the input [N, c, H, W] (CUDA, or the CPU under TRITON_INTERPRET=1).
        c_weight: weight of the kh x kw conv [r, c, kh, kw].
        p_weight: weight of the 1 x 1 conv [n, r, 1, 1].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype (geometry.empty_output's shape and memory format).
    """
    y = geometry.empty_output("channel", x, c_weight, p_weight, stride, padding, dilation)
    if y.numel() == 0:
        return y
    grid, args, consts = launch_args(x, c_weight, p_weight, bias, stride, padding, dilation, y)
    kernel, fixed = _kernel()
    launch("channel", kernel, fixed, grid, args, consts)
    return y
