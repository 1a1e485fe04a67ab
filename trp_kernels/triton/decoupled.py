"""Fused network-decoupling convolution: conv(1 x 1, c -> n*r) then conv(kh x kw, groups n, n*r -> n).

Design: a program owns BLOCK_M output pixels (flattened over batch, rows, columns) x BLOCK_F output filters,
i.e. the BLOCK_F * R_PAD pointwise channels those filters read (filter f, path j = channel f*r + j). For
each depthwise tap (a, b) it recomputes, on chip, the pointwise result at the input pixel under that tap:
[BLOCK_M x C] input patch @ [C x BLOCK_F*R_PAD] pointwise weights (tl.dot over blocks of BLOCK_C channels,
fp32 accumulator; zero outside the padded image, which equals padding the pointwise output since it has
no bias), rounds it to the input dtype (as the two-conv path stores it), scales it by the tap's depthwise
weights and sums each filter's R_PAD paths into the fp32 [BLOCK_M x BLOCK_F] output. The n*r-channel
intermediate is never written to memory; the price is kh*kw pointwise products per output pixel instead
of (stride_h*stride_w) - memory traffic, not MACs, bounds these layers. Tensors are addressed through
their strides (NCHW or channels_last, no copies)."""
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

MAX_R_PAD = 16    # paths per filter kept on chip (3 x 3 kernels reach r = 9); beyond: two convolutions
MAX_TAPS = 9      # kh * kw: 5 x 5 and 7 x 7 kernels spill registers in every tile tried (compile test)


@triton.jit
def _decoupled_kernel(
    X, PW, DW, B, Y,
    C, H, W, R, NOUT, OH, OW, M,
    sxn, sxc, sxh, sxw,
    spo, spc,
    sdo, sdr, sdh, sdw,
    syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, C_CONST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
):
    BLOCK_F: tl.constexpr = BLOCK_Q // R_PAD
    pid_f = tl.program_id(1)
    offs_m, m_ok, n, oh, ow, ih0, iw0 = output_pixels(tl.program_id(0), M, OH, OW, STRIDE_H, STRIDE_W,
                                                      PAD_T, PAD_L, BLOCK_M)
    x_img = X + n.to(tl.int64) * sxn  # batch offset in int64: a batch may exceed 2**31 elements

    # pointwise channel q of this program: filter f = pid_f * BLOCK_F + q // R_PAD, path j = q % R_PAD
    offs_q = tl.arange(0, BLOCK_Q)
    f_of_q = pid_f * BLOCK_F + offs_q // R_PAD
    j_of_q = offs_q % R_PAD
    q_ok = (f_of_q < NOUT) & (j_of_q < R)
    pw_row = PW + (f_of_q * R + j_of_q) * spo
    dw_q = DW + f_of_q * sdo + j_of_q * sdr
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            ih = ih0 + a * DIL_H
            iw = iw0 + b * DIL_W
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_img + ih * sxh + iw * sxw
            mid = tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32)
            for c0 in range(0, loop_bound(C, C_CONST), BLOCK_C):
                cc = c0 + offs_c
                c_ok = cc < C
                xt = tl.load(x_pix[:, None] + cc[None, :] * sxc, mask=ok[:, None] & c_ok[None, :], other=0.0)
                wt = tl.load(pw_row[None, :] + cc[:, None] * spc, mask=c_ok[:, None] & q_ok[None, :], other=0.0)
                mid = tl.dot(xt, wt, mid, input_precision=PRECISION)
            # round like the stored intermediate of the two-conv path
            mid = mid.to(Y.dtype.element_ty).to(tl.float32)
            dwt = tl.load(dw_q + a * sdh + b * sdw, mask=q_ok, other=0.0).to(tl.float32)
            acc += tl.sum(tl.reshape(mid * dwt[None, :], (BLOCK_M, BLOCK_F, R_PAD)), axis=2)

    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = offs_f < NOUT
    if HAS_BIAS:
        acc += tl.load(B + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
    y_pix = Y + n.to(tl.int64) * syn + oh * syh + ow * syw
    tl.store(y_pix[:, None] + offs_f[None, :] * syc, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & f_ok[None, :])


def r_pad(r):
    return next_pow2(r)


# (BLOCK_M, BLOCK_Q, BLOCK_C, warps, stages); BLOCK_Q (pointwise channels per program) is raised to R_PAD at
# launch when a filter has more paths. Only tiles that tests/test_triton_compile.py compiles without register
# spills for sm_80 and sm_90 in fp16/bf16/fp32 at R_PAD <= MAX_R_PAD: larger ones (64 x 32, 32 x 32 x 32 in fp32,
# ...) spill, since every program also holds the per-tap products.
_TILES = {"full": [(16, 32, 32, 4, 2), (32, 32, 16, 4, 2)],
          "quick": [(16, 32, 32, 4, 2), (32, 32, 16, 4, 2)],
          "off": [(16, 32, 32, 4, 2)]}


def _useful(configs, a):
    """The tiles that hold a filter's R_PAD paths and do not exceed the call's channels and pixels (else the one
    with the most pointwise channels)."""
    keep = [cfg for cfg in configs if cfg.kwargs["BLOCK_Q"] >= a["R_PAD"]
            and cfg.kwargs["BLOCK_C"] <= max(MIN_DOT, next_pow2(a["C"]))
            and cfg.kwargs["BLOCK_M"] <= max(32, next_pow2(a["M"]))]
    return keep or [max(configs, key=lambda cfg: cfg.kwargs["BLOCK_Q"])]


TUNING = TileSpace(
    ("BLOCK_M", "BLOCK_Q", "BLOCK_C"), _TILES,
    # x's and y's layout strides too: NCHW and channels_last inputs of one shape tune separately
    ["C", "H", "W", "R_PAD", "NOUT", "M", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "KH", "KW", "sxc", "sxw", "syc"],
    _useful)


def _kernel(rp):
    """Autotuned kernel on the GPU; under the interpreter one small config (autotuning would run every
    config serially on the CPU)."""
    if interpreting():
        return _decoupled_kernel, {"BLOCK_M": 16, "BLOCK_Q": max(MIN_DOT, rp), "BLOCK_C": 16}
    return TUNING.autotuned(_decoupled_kernel), {}


def launch_args(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], y: torch.Tensor
                ) -> tuple[Callable, tuple, dict]:
    """The launch of the decoupled kernel for one call writing y (the wrapper and tests/test_triton_compile.py).

    Args:
        x: the input [N, c, H, W].
        pw_weight: weight of the pointwise conv [n*r, c, 1, 1].
        dw_weight: weight of the grouped kh x kw conv [n, r, kh, kw].
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
    nout, r, kh, kw = dw_weight.shape
    _, _, oh, ow = y.shape
    m = nb * oh * ow
    rp = r_pad(r)
    args = (x, pw_weight, dw_weight, bias if bias is not None else y, y,
            c, h, w, r, nout, oh, ow, m,
            *x.stride(), pw_weight.stride(0), pw_weight.stride(1), *dw_weight.stride(), *y.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    consts = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, R_PAD=rp, PRECISION=precision(x.dtype),
                  **interpreter_consts(C=c))
    grid = (lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(nout, meta["BLOCK_Q"] // rp)))
    return grid, args, consts


def factorized_conv_decoupled(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                              bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int]) -> torch.Tensor:
    """The network-decoupling convolution by the fused kernel (the caller has checked supported()).

    Args:
        x: the input [N, c, H, W] (CUDA, or the CPU under TRITON_INTERPRET=1).
        pw_weight: weight of the pointwise conv [n*r, c, 1, 1].
        dw_weight: weight of the grouped kh x kw conv [n, r, kh, kw].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype (geometry.empty_output's shape and memory format).
    """
    y = geometry.empty_output("decoupled", x, pw_weight, dw_weight, stride, padding, dilation)
    if y.numel() == 0:
        return y
    grid, args, consts = launch_args(x, pw_weight, dw_weight, bias, stride, padding, dilation, y)
    kernel, fixed = _kernel(consts["R_PAD"])
    launch("decoupled", kernel, fixed, grid, args, consts)
    return y


def supported(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor, bias: Optional[torch.Tensor],
              out_hw: tuple[int, int]) -> Optional[str]:
    """Why the decoupled kernel cannot run this call here, or None when it can.

    Args:
        x: the input [N, c, H, W].
        pw_weight: weight of the pointwise conv [n*r, c, 1, 1].
        dw_weight: weight of the grouped kh x kw conv [n, r, kh, kw].
        bias: None, or the output bias [n].
        out_hw: the output's (OH, OW).

    Returns:
        None, or the reason (a short string).
    """
    why = common_unsupported(x, [x, pw_weight, dw_weight] + ([bias] if bias is not None else []), out_hw)
    if why is not None:
        return why
    if dw_weight.shape[2] * dw_weight.shape[3] > MAX_TAPS:
        return f"{dw_weight.shape[2]} x {dw_weight.shape[3]} kernel above {MAX_TAPS} taps"
    if r_pad(dw_weight.shape[1]) > MAX_R_PAD:
        return f"{dw_weight.shape[1]} paths per filter above the on-chip limit {MAX_R_PAD}"
    if max_offset(x, 1) >= 2 ** 31 or max_offset(pw_weight, 0) >= 2 ** 31 or \
            dw_weight.shape[0] * out_hw[0] * out_hw[1] >= 2 ** 31:
        return "tensors too large for 32-bit offsets"
    # grid axis 1 holds the filter blocks: NOUT / BLOCK_F programs, BLOCK_F = BLOCK_Q // R_PAD >= 1 (one filter
    # per program when a config's BLOCK_Q equals R_PAD), and CUDA allows 65535 on that axis
    if not grid_fits((1, dw_weight.shape[0])):
        return f"{dw_weight.shape[0]} filters: the launch grid's second axis holds at most 65535"
    return None


__all__ = ["factorized_conv_decoupled", "supported", "interpreting", "launch_args"]
