"""Fused spatial-separable convolution: conv(kh x 1, c -> r) then conv(1 x kw, r -> n), one launch.

Design: a program owns ROWS output rows (flattened over batch and output rows) x OUT_W output columns.
GEMM 1 (the vertical conv) computes the intermediate for those rows over SPAN consecutive intermediate
columns: every column the tile's horizontal taps touch, i.e. the tile plus its horizontal halo
((kw - 1) * dilation columns, stride included). When a whole row fits (the common case: CIFAR and
ResNet-50 widths) the span is the image row itself, so padding columns, which are zero in the
intermediate, are never computed. GEMM 2 (the horizontal conv) then, for every tap j, picks the
intermediate column each output pixel needs with an on-chip tl.gather of the [ROWS*SPAN x R_PAD]
intermediate and multiplies it by the [R_PAD x BLOCK_N] slice of h_weight. Nothing but the output is
written. Strides of x and y are honoured, so NCHW and channels_last work without copies."""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import geometry
from ._common import interpreter_consts, interpreting, launch, loop_bound, next_pow2, precision, rank_pad
from .configs import TileSpace, by_registers

# A row whose padded width exceeds this is split into column tiles with a halo.
MAX_SINGLE_SPAN = 128


@triton.jit
def _spatial_kernel(
    X, WV, WH, B, Y,
    C, H, W, R, NOUT, OH, OW, NROWS, VALID_W,
    sxn, sxc, sxh, sxw,
    svr, svc, svh,
    sho, shr, shw,
    syn, syc, syh, syw,
    STRIDE_H, STRIDE_W, PAD_T, PAD_L, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr, SPAN: tl.constexpr, OUT_W: tl.constexpr, SINGLE: tl.constexpr,
    C_CONST: tl.constexpr, NOUT_CONST: tl.constexpr,
    M_TARGET: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ROWS: tl.constexpr = (M_TARGET + OUT_W - 1) // OUT_W  # >= 1 even for a row wider than M_TARGET
    pid_row = tl.program_id(0)
    pid_col = tl.program_id(1)
    ow0 = pid_col * VALID_W
    if SINGLE:
        cs = 0
    else:
        cs = ow0 * STRIDE_W - PAD_L

    # ---- GEMM 1: vertical conv over ROWS x SPAN intermediate positions
    m1 = tl.arange(0, ROWS * SPAN)
    row1 = pid_row * ROWS + m1 // SPAN
    col1 = cs + m1 % SPAN
    ok1 = (row1 < NROWS) & (col1 >= 0) & (col1 < W)
    oh1 = row1 % OH
    x_col = X + (row1 // OH).to(tl.int64) * sxn + col1 * sxw
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    offs_c = tl.arange(0, BLOCK_C)
    acc1 = tl.zeros((ROWS * SPAN, R_PAD), dtype=tl.float32)
    n_cb = tl.cdiv(C, BLOCK_C)
    # flat (tap, channel block) loop, as in the channel kernel
    for kb in range(0, KH * tl.cdiv(loop_bound(C, C_CONST), BLOCK_C)):  # = KH * n_cb
        i = kb // n_cb
        cc = (kb - i * n_cb) * BLOCK_C + offs_c
        ih = oh1 * STRIDE_H - PAD_T + i * DIL_H
        ok = ok1 & (ih >= 0) & (ih < H)
        c_ok = cc < C
        xt = tl.load((x_col + ih * sxh)[:, None] + cc[None, :] * sxc, mask=ok[:, None] & c_ok[None, :],
                     other=0.0)
        wt = tl.load(WV + i * svh + cc[:, None] * svc + offs_r[None, :] * svr,
                     mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc1 = tl.dot(xt, wt, acc1, input_precision=PRECISION)
    mid = acc1.to(Y.dtype.element_ty)

    # ---- GEMM 2: horizontal conv, taps gathered from the on-chip intermediate
    m2 = tl.arange(0, ROWS * OUT_W)
    rl2 = m2 // OUT_W
    wl2 = m2 % OUT_W
    row2 = pid_row * ROWS + rl2
    ow = ow0 + wl2
    ok2 = (row2 < NROWS) & (wl2 < VALID_W) & (ow < OW)
    y_pix = Y + (row2 // OH).to(tl.int64) * syn + (row2 % OH) * syh + ow * syw
    for o0 in range(0, loop_bound(NOUT, NOUT_CONST), BLOCK_N):
        oo = o0 + tl.arange(0, BLOCK_N)
        o_ok = oo < NOUT
        acc2 = tl.zeros((ROWS * OUT_W, BLOCK_N), dtype=tl.float32)
        for j in range(KW):
            col = ow * STRIDE_W - PAD_L + j * DIL_W
            # columns outside the image are the conv's zero padding of the intermediate
            valid = ok2 & (col >= 0) & (col < W)
            idx = rl2 * SPAN + tl.where(valid, col - cs, 0)
            g = tl.gather(mid, tl.broadcast_to(idx[:, None], (ROWS * OUT_W, R_PAD)), 0)
            g = tl.where(valid[:, None], g, tl.zeros_like(g))
            wt = tl.load(WH + j * shw + offs_r[:, None] * shr + oo[None, :] * sho,
                         mask=r_ok[:, None] & o_ok[None, :], other=0.0)
            acc2 = tl.dot(g, wt, acc2, input_precision=PRECISION)
        if HAS_BIAS:
            acc2 += tl.load(B + oo, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_pix[:, None] + oo[None, :] * syc, acc2.to(Y.dtype.element_ty),
                 mask=ok2[:, None] & o_ok[None, :])


def live_words(r_pad: int, span: int, out_w: int, m_target: int, block_c: int, block_n: int, num_stages: int,
               dtype: torch.dtype) -> float:
    """Estimated live 32-bit words of one program of the spatial kernel (see _common.REGS_PER_THREAD).

    GEMM 1 holds the fp32 [ROWS*SPAN x R_PAD] accumulator and num_stages - 1 input and v_weight tiles in
    flight; GEMM 2 the intermediate and one gathered tap [ROWS*OUT_W x R_PAD] in the input dtype, the fp32
    [ROWS*OUT_W x BLOCK_N] output block and h_weight tiles.

    Args:
        r_pad: the padded rank R_PAD.
        span: intermediate columns per tile (SPAN).
        out_w: output column slots per tile (OUT_W).
        m_target: output pixels per program the config aims at (ROWS = ceil(m_target / out_w)).
        block_c: input channels per step of GEMM 1.
        block_n: output channels per step of GEMM 2.
        num_stages: the software pipeline's depth.
        dtype: the input dtype.

    Returns:
        The larger of the two GEMMs' estimates.
    """
    rows = -(-m_target // out_w)
    m1, m2, words = rows * span, rows * out_w, dtype.itemsize / 4
    gemm1 = m1 * r_pad + (num_stages - 1) * (m1 * block_c + block_c * r_pad) * words
    gemm2 = (m1 + m2) * r_pad * words + m2 * block_n + (num_stages - 1) * r_pad * block_n * words
    return max(gemm1, gemm2)


# (M_TARGET, BLOCK_C, BLOCK_N, warps, stages); the last three of "full": small tiles over 8 warps, few
# accumulator registers per thread, for the largest ranks.
_TILES = {"full": [(16, 16, 16, 4, 2), (32, 16, 32, 4, 2), (32, 32, 64, 4, 2), (64, 16, 32, 4, 2),
                   (64, 32, 64, 4, 2), (64, 64, 64, 4, 2), (128, 32, 64, 8, 2), (128, 32, 128, 8, 2),
                   (128, 64, 64, 8, 2), (16, 16, 16, 8, 2), (32, 16, 32, 8, 2), (64, 16, 32, 8, 2)],
          "quick": [(16, 16, 16, 4, 2), (64, 32, 64, 4, 2), (128, 32, 64, 8, 2)],
          "off": [(64, 32, 64, 4, 2)]}


TUNING = TileSpace(
    ("M_TARGET", "BLOCK_C", "BLOCK_N"), _TILES,
    # x's and y's layout strides too: NCHW and channels_last inputs of one shape tune separately
    ["C", "H", "W", "R_PAD", "NOUT", "NROWS", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "KH", "KW", "SPAN", "OUT_W",
     "sxc", "sxw", "syc"],
    by_registers("spatial",
                 lambda a, cfg, dtype: live_words(a["R_PAD"], a["SPAN"], a["OUT_W"], cfg.kwargs["M_TARGET"],
                                                  cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_N"], cfg.num_stages, dtype),
                 lambda a: {"BLOCK_C": max(16, next_pow2(a["C"])), "BLOCK_N": max(16, next_pow2(a["NOUT"]))}))


def _kernel(out_w):
    if interpreting():
        return _spatial_kernel, {"M_TARGET": max(32, out_w), "BLOCK_C": 16, "BLOCK_N": 16}
    return TUNING.autotuned(_spatial_kernel), {}


def tile_plan(w: int, ow: int, kw: int, stride_w: int, dil_w: int, max_single_span: Optional[int] = None,
              multi_span: Optional[int] = None) -> tuple[int, int, int, bool]:
    """How the spatial kernel tiles an output row.

    Args:
        w: the input width W.
        ow: the output width OW.
        kw: the horizontal kernel extent.
        stride_w: the horizontal stride.
        dil_w: the horizontal dilation.
        max_single_span: the widest padded row one tile covers whole (default MAX_SINGLE_SPAN).
        multi_span: the span of column tiles (default: chosen from the halo); tests use both to exercise
            column tiles on tiny images.

    Returns:
        A tuple (SPAN, OUT_W, VALID_W, SINGLE): intermediate columns computed per tile, output column slots,
            output columns actually produced per tile, and whether one tile covers a whole row.

    Raises:
        ValueError: multi_span is too small for the kernel's halo.
    """
    max_single_span = MAX_SINGLE_SPAN if max_single_span is None else max_single_span
    span = max(16, next_pow2(w))
    if span <= max_single_span:
        return span, next_pow2(ow), ow, True
    halo = (kw - 1) * dil_w + 1
    if multi_span is not None:
        span = multi_span
    else:
        # the tile's halo wastes (halo - stride) / span of GEMM 1: keep spans >= 4x the halo
        span = 64
        while span < 4 * halo or (span - halo) // stride_w + 1 < 16:
            span *= 2
    valid = (span - halo) // stride_w + 1
    if valid < 1:
        raise ValueError(f"column tile of {span} too small for a {kw}-tap dilation-{dil_w} halo")
    return span, next_pow2(valid), valid, False


def launch_args(x: torch.Tensor, v_weight: torch.Tensor, h_weight: torch.Tensor, bias: Optional[torch.Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], y: torch.Tensor,
                max_single_span: Optional[int] = None, multi_span: Optional[int] = None
                ) -> tuple[Callable, tuple, dict]:
    """The launch of the spatial kernel for one call writing y (the wrapper and tests/test_triton_compile.py).

    Args:
        x: the input [N, c, H, W].
        v_weight: weight of the vertical conv [r, c, kh, 1].
        h_weight: weight of the horizontal conv [n, r, 1, kw].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.
        y: the output [N, n, OH, OW].
        max_single_span: see tile_plan.
        multi_span: see tile_plan.

    Returns:
        A tuple (grid, args, consts): the launch grid (a function of the config's meta-parameters), the
            kernel's positional arguments and its untuned constexprs.
    """
    nb, c, h, w = x.shape
    r, _, kh, _ = v_weight.shape
    _, nout, oh, ow = y.shape
    kw = h_weight.shape[3]
    span, out_w, valid_w, single = tile_plan(w, ow, kw, stride[1], dilation[1], max_single_span, multi_span)
    args = (x, v_weight, h_weight, bias if bias is not None else y, y,
            c, h, w, r, nout, oh, ow, nb * oh, valid_w,
            *x.stride(), v_weight.stride(0), v_weight.stride(1), v_weight.stride(2),
            h_weight.stride(0), h_weight.stride(1), h_weight.stride(3), *y.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])
    consts = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, R_PAD=rank_pad(r), PRECISION=precision(x.dtype),
                  SPAN=span, OUT_W=out_w, SINGLE=single, **interpreter_consts(C=c, NOUT=nout))
    grid = lambda meta: (triton.cdiv(nb * oh, triton.cdiv(meta["M_TARGET"], out_w)),  # noqa: E731
                         triton.cdiv(ow, valid_w))
    return grid, args, consts


def factorized_conv_spatial(x: torch.Tensor, v_weight: torch.Tensor, h_weight: torch.Tensor,
                            bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], max_single_span: Optional[int] = None,
                            multi_span: Optional[int] = None) -> torch.Tensor:
    """The spatial-separable convolution by the fused kernel (the caller has checked supported()).

    Args:
        x: the input [N, c, H, W] (CUDA, or the CPU under TRITON_INTERPRET=1).
        v_weight: weight of the vertical conv [r, c, kh, 1].
        h_weight: weight of the horizontal conv [n, r, 1, kw].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.
        max_single_span: see tile_plan.
        multi_span: see tile_plan.

    Returns:
        The output [N, n, OH, OW] in x's dtype (geometry.empty_output's shape and memory format).
    """
    y = geometry.empty_output("spatial", x, v_weight, h_weight, stride, padding, dilation)
    if y.numel() == 0:
        return y
    grid, args, consts = launch_args(x, v_weight, h_weight, bias, stride, padding, dilation, y, max_single_span,
                                     multi_span)
    kernel, fixed = _kernel(consts["OUT_W"])
    launch("spatial", kernel, fixed, grid, args, consts)
    return y
