"""Fused network decoupling, depthwise order: conv(kh x kw, groups c, c -> c*r) then conv(1 x 1, c*r -> n).

Design: a GEMM over the c*r intermediate channels whose left operand is computed on chip. A program owns
BLOCK_M output pixels (flattened over batch, rows, columns) x BLOCK_N output filters. For each block of BLOCK_K
intermediate channels (channel k is path k % r of input channel k // r, the depthwise conv's own numbering) it
computes the depthwise result at its pixels: the sum over the kh*kw taps of the input under the tap times the
tap's weight, in fp32 (zero outside the padded image), rounded to the input dtype as the two-conv path stores
it; then one tl.dot with the [BLOCK_K x BLOCK_N] block of pointwise weights into the fp32 accumulator. The c*r-
channel intermediate, at the output resolution, is never written to memory, and the depthwise conv costs no
more than in the two-conv path (each intermediate value is computed once per program column). Tensors are
addressed through their strides (NCHW or channels_last, no copies). Grouped layers run as two convolutions."""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import geometry
from ._common import (
    MIN_DOT,
    common_unsupported,
    grid_fits,
    interpreter_consts,
    interpreting,
    launch,
    loop_bound,
    max_offset,
    next_pow2,
    output_pixels,
    precision,
)
from .configs import TileSpace

KIND = "depthwise_decoupled"
MAX_TAPS = 49  # kh * kw up to 7 x 7: the taps are a static loop, so larger kernels only grow the code


@triton.jit
def _depthwise_decoupled_kernel(
    X, DW, PW, B, Y,
    C, H, W, R, K, NOUT, OH, OW, M,
    sxn, sxc, sxh, sxw,
    sdk, sdh, sdw,
    spn, spk,
    syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, K_CONST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    offs_m, m_ok, n, oh, ow, ih0, iw0 = output_pixels(tl.program_id(0), M, OH, OW, STRIDE_H, STRIDE_W,
                                                      PAD_T, PAD_L, BLOCK_M)
    x_img = X + n.to(tl.int64) * sxn  # batch offset in int64: a batch may exceed 2**31 elements
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NOUT
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, loop_bound(K, K_CONST), BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x_chan = (kk // R) * sxc  # intermediate channel k reads input channel k // r
        dw_k = DW + kk * sdk
        mid = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        # a runtime loop over the taps: unrolled, every tap's [BLOCK_M x BLOCK_K] load stays in flight at once
        # (register spills, and shared memory for the pipelined loads)
        for t in range(0, KH * KW):
            a = t // KW
            b = t - a * KW
            ih = ih0 + a * DIL_H
            iw = iw0 + b * DIL_W
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = tl.load(x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + x_chan[None, :],
                         mask=ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(dw_k + a * sdh + b * sdw, mask=k_ok, other=0.0)
            mid += xt.to(tl.float32) * wt.to(tl.float32)[None, :]
        # round like the stored intermediate of the two-conv path
        mid_lp = mid.to(Y.dtype.element_ty)
        pt = tl.load(PW + offs_n[None, :] * spn + kk[:, None] * spk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(mid_lp, pt, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_pix = Y + n.to(tl.int64) * syn + oh * syh + ow * syw
    tl.store(y_pix[:, None] + offs_n[None, :] * syc, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Only tiles that tests/test_triton_compile.py compiles without
# register spills for sm_80 and sm_90 in fp16/bf16/fp32: the program holds the fp32 [BLOCK_M x BLOCK_K]
# depthwise block next to the [BLOCK_M x BLOCK_N] accumulator (64 x 64 x 16 only without pipelining; 64 x 32 x 32
# spills on sm_80 with 4 warps, and with 8 warps for 7 x 7 kernels; with Triton 3.6, 32 x 32 x 32 and 32 x 32 x 16
# with 4 warps get an 8-byte stack frame on some shapes, which 2 warps do not).
_TILES = {"full": [(32, 32, 32, 2, 2), (64, 64, 16, 4, 1), (32, 64, 32, 4, 2)],
          "quick": [(32, 32, 32, 2, 2), (64, 64, 16, 4, 1)],
          "off": [(32, 32, 32, 2, 2)]}


def _useful(configs, a):
    """The tiles that do not exceed the call's filters, intermediate channels and pixels (else the smallest)."""
    keep = [cfg for cfg in configs if cfg.kwargs["BLOCK_N"] <= max(MIN_DOT, next_pow2(a["NOUT"]))
            and cfg.kwargs["BLOCK_K"] <= max(MIN_DOT, next_pow2(a["K"]))
            and cfg.kwargs["BLOCK_M"] <= max(32, next_pow2(a["M"]))]
    return keep or [min(configs, key=_tile_area)]


def _tile_area(cfg):
    return cfg.kwargs["BLOCK_M"] * (cfg.kwargs["BLOCK_N"] + cfg.kwargs["BLOCK_K"])


TUNING = TileSpace(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"), _TILES,
    # x's and y's layout strides too: NCHW and channels_last inputs of one shape tune separately
    ["C", "H", "W", "R", "NOUT", "M", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "KH", "KW", "sxc", "sxw", "syc"],
    _useful)


def _kernel():
    """Autotuned kernel on the GPU; under the interpreter one small config (autotuning would run every
    config serially on the CPU)."""
    if interpreting():
        return _depthwise_decoupled_kernel, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
    return TUNING.autotuned(_depthwise_decoupled_kernel), {}


def launch_args(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], y: torch.Tensor
                ) -> tuple[Callable, tuple, dict]:
    """The launch of the kernel for one call writing y (the wrapper and tests/test_triton_compile.py).

    Args:
        x: the input [N, c, H, W].
        dw_weight: weight of the depthwise conv [c*r, 1, kh, kw].
        pw_weight: weight of the pointwise conv [n, c*r, 1, 1].
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
    k, _, kh, kw = dw_weight.shape
    nout = pw_weight.shape[0]
    _, _, oh, ow = y.shape
    m = nb * oh * ow
    args = (x, dw_weight, pw_weight, bias if bias is not None else y, y,
            c, h, w, k // c, k, nout, oh, ow, m,
            *x.stride(), dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
            pw_weight.stride(0), pw_weight.stride(1), *y.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    consts = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, PRECISION=precision(x.dtype),
                  **interpreter_consts(K=k))
    grid = (lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(nout, meta["BLOCK_N"])))
    return grid, args, consts


def factorized_conv_depthwise_decoupled(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor,
                                        bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                                        dilation: Sequence[int]) -> torch.Tensor:
    """Network decoupling in the depthwise order by the fused kernel (the caller has checked supported()).

    Args:
        x: the input [N, c, H, W] (CUDA, or the CPU under TRITON_INTERPRET=1).
        dw_weight: weight of the depthwise conv [c*r, 1, kh, kw].
        pw_weight: weight of the pointwise conv [n, c*r, 1, 1].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype (geometry.empty_output's shape and memory format).
    """
    y = geometry.empty_output(KIND, x, dw_weight, pw_weight, stride, padding, dilation)
    if y.numel() == 0:
        return y
    grid, args, consts = launch_args(x, dw_weight, pw_weight, bias, stride, padding, dilation, y)
    kernel, fixed = _kernel()
    launch(KIND, kernel, fixed, grid, args, consts)
    return y


def supported(x: torch.Tensor, dw_weight: torch.Tensor, pw_weight: torch.Tensor, bias: Optional[torch.Tensor],
              out_hw: tuple[int, int]) -> Optional[str]:
    """Why the kernel cannot run this call here, or None when it can.

    Args:
        x: the input [N, c, H, W].
        dw_weight: weight of the depthwise conv [c*r, 1, kh, kw].
        pw_weight: weight of the pointwise conv [n, c*r, 1, 1].
        bias: None, or the output bias [n].
        out_hw: the output's (OH, OW).

    Returns:
        None, or the reason (a short string).
    """
    why = common_unsupported(x, [x, dw_weight, pw_weight] + ([bias] if bias is not None else []), out_hw)
    if why is not None:
        return why
    if dw_weight.shape[2] * dw_weight.shape[3] > MAX_TAPS:
        return f"{dw_weight.shape[2]} x {dw_weight.shape[3]} kernel above {MAX_TAPS} taps"
    if max_offset(x, 1) >= 2 ** 31 or max_offset(pw_weight, 0) >= 2 ** 31 or max_offset(dw_weight, 0) >= 2 ** 31 \
            or pw_weight.shape[0] * out_hw[0] * out_hw[1] >= 2 ** 31:
        return "tensors too large for 32-bit offsets"
    if not grid_fits((1, triton.cdiv(pw_weight.shape[0], MIN_DOT))):
        return f"{pw_weight.shape[0]} filters: the launch grid's second axis holds at most 65535"
    return None


__all__ = ["factorized_conv_depthwise_decoupled", "supported", "interpreting", "launch_args"]
