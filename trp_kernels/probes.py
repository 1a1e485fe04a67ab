"""The self-checks' probes (trp_kernels/selfcheck.py): each runs a kernel once on inputs shaped like the real call and
compares it with the float64 reference. Returns (ok, detail) as selfcheck.verify expects.

Projection: matrices with a designed spectrum, so that the energy rule has a clear answer (no rank tie that two
correct kernels could break differently) and the kept subspace is well separated (eigengap >= 0.45 of the largest
eigenvalue): sigma_i^2 = 1 - 0.5 i / k for the k kept directions, 0.05 * 2^-(i - k) after them, and the energy
halfway through the k-th increment. The reference is the float64 SVD of the probe as the kernel sees it (rounded
to the call's dtype). Convolutions: the real call itself (a convolution has no ties), against the
float64 two-convolution reference, element by element within the a-priori rounding bound of the kernel."""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from . import reference, warm

PROBE_MATRICES = 2
REFLECTORS = 4
# the probes' rank: the full solve's paths do not depend on it; the warm step's do only through whether its
# basis is at most JACOBI_MAX_N wide (the Ritz step's eigensolver), so a wider basis is probed at JACOBI_MAX_N + 1.
# Small ranks keep the energy rule's margin (about 1 / (3 rank) of the energy) far above bfloat16's rounding.
COLD_RANK = 32
JACOBI_MAX_N = 64  # csrc/common/block_kernels.h kJacobiMaxN (tests/test_self_check.py compares them)
# the warm probe's update: its singular vectors turned by this angle, a TRP step's order of magnitude (the warm
# step's certificate proves the result, within warm.SUBSPACE_TOL, for turns up to about 5e-5 on these spectra)
ROTATION = 1e-5
# relative Frobenius error allowed for W_low and G: the op's contract (float32/float64), and the output rounding
# of the half types with room for their input rounding (as tests/test_lowrank_project.py)
PROJECTION_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
WARM_TOL = 1e-5


def _orthonormal(B, rows, cols, gen, device):
    """B dense matrices [rows, cols] with orthonormal columns (cols <= rows): the leading columns of a product of
    REFLECTORS random Householder reflectors, O(rows * cols) each (a QR of a random matrix costs rows * cols^2, which
    dominates a check at ResNet-50's sizes)."""
    X = torch.eye(rows, cols, dtype=torch.float64, device=device).expand(B, rows, cols).clone()
    for _ in range(REFLECTORS):
        v = torch.randn(B, rows, 1, generator=gen, dtype=torch.float64).to(device)
        v = v / v.norm(dim=1, keepdim=True)
        X = X - 2.0 * v @ (v.mT @ X)
    return X


def designed_spectrum(n: int, rank: int) -> tuple[Tensor, float]:
    """A spectrum whose energy rule keeps exactly `rank` values, with clear gaps (see the module docstring).

    Args:
        n: the number of values, >= 1.
        rank: the kept count, clamped to 1..n: values in (0.5, 1], then a tail from 0.05 halving at each step.

    Returns:
        A pair (squared singular values [n] float64, energy): the energy lies halfway through the rank-th
            value's increment of the cumulative sum.
    """
    k = max(1, min(int(rank), n))
    i = torch.arange(n, dtype=torch.float64)
    lam = torch.where(i < k, 1.0 - 0.5 * i / k, 0.05 * torch.pow(0.5, (i - k).clamp_min(0)))
    prefix = lam.cumsum(0)
    return lam, float((prefix[k - 1] - 0.5 * lam[k - 1]) / prefix[-1])


def designed_factors(B: int, p: int, q: int, device: str | torch.device, seed: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """Random singular vectors for B matrices [p, q]: products of a few Householder reflectors.

    Args:
        B: the number of matrices.
        p: rows of each matrix.
        q: columns of each matrix.
        device: where the factors are put.
        seed: the random generator's seed (the factors are the same for the same seed).

    Returns:
        A pair (U [B, p, n], V [B, q, n]) of float64 tensors with orthonormal columns, n = min(p, q).
    """
    gen = torch.Generator().manual_seed(seed)
    n = min(p, q)
    return _orthonormal(B, p, n, gen, device), _orthonormal(B, q, n, gen, device)


def designed_batch(B: int, p: int, q: int, rank: int, dtype: torch.dtype, device: str | torch.device,
                   seed: int = 0) -> tuple[Tensor, float]:
    """B matrices whose energy rule keeps exactly `rank` directions, with clear gaps (see the module docstring).

    Args:
        B: the number of matrices.
        p: rows of each matrix.
        q: columns of each matrix.
        rank: the kept count, 1 <= rank <= min(p, q).
        dtype: the matrices' dtype.
        device: where the matrices are put.
        seed: the random generator's seed.

    Returns:
        A pair (W [B, p, q] in dtype on device, energy).
    """
    lam, energy = designed_spectrum(min(p, q), rank)
    U, V = designed_factors(B, p, q, device, seed)
    return ((U * lam.to(device).sqrt()) @ V.mT).to(dtype), energy


def _rel(a, b):
    b = b.to(torch.float64)
    return float((a.to(torch.float64) - b).norm() / b.norm().clamp_min(1e-300))


def compare_projection(W: Tensor, energy: float, max_rank: Optional[int], subgradient: bool,
                       got: Sequence[Tensor], rows: Optional[Tensor] = None, tol: Optional[float] = None
                       ) -> tuple[bool, str]:
    """Compare a kernel's projection of W with reference.lowrank_project.

    Args:
        W: the kernel's input [B, p, q].
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept.
        subgradient: whether G is compared too.
        got: the kernel's results, (W_low, rank, G, ...).
        rows: None (every matrix), or a bool tensor [B]: only these matrices count (the warm step's certified
            ones).
        tol: the relative Frobenius error allowed for W_low and G (default PROJECTION_TOL of W's dtype).

    Returns:
        A pair (ok, detail): ok whether the kernel agrees with the reference, detail a short description.
    """
    W_low, rank, G = got[:3]
    ref_low, ref_rank, ref_G = reference.lowrank_project(W, energy, max_rank, subgradient)
    if rows is not None:
        W, W_low, rank, ref_low, ref_rank = W[rows], W_low[rows], rank[rows], ref_low[rows], ref_rank[rows]
        if subgradient:
            G, ref_G = G[rows], ref_G[rows]
    tol = PROJECTION_TOL.get(W.dtype, 1e-2) if tol is None else tol
    if not torch.equal(rank.cpu(), ref_rank.cpu()):
        return False, f"ranks {rank.tolist()}, reference {ref_rank.tolist()}"
    err = _rel(W_low, ref_low)
    g_err = _rel(G, ref_G) if subgradient else 0.0
    good = err <= tol and g_err <= tol  # False for NaN too
    return good, f"W_low error {err:.1e}, G error {g_err:.1e} (tolerance {tol:.0e}), ranks {rank.tolist()}"


def projection(kernel: Callable, shape: Sequence[int], dtype: torch.dtype, device: str | torch.device,
               max_rank: Optional[int], subgradient: bool) -> tuple[bool, str]:
    """Probe a full-solve kernel on designed matrices of the call's shape (at most PROBE_MATRICES of them).

    Args:
        kernel: the full solve, kernel(W, energy, max_rank, subgradient) -> (W_low, rank, G).
        shape: the call's (B, p, q).
        dtype: the call's dtype.
        device: the call's device.
        max_rank: the call's max_rank (None or an int >= 1).
        subgradient: the call's subgradient flag.

    Returns:
        A pair (ok, detail): ok whether the kernel agrees with the reference, detail a short description.
    """
    B, p, q = shape
    n = min(p, q)
    W, energy = designed_batch(min(B, PROBE_MATRICES), p, q, max(1, min(n // 3, COLD_RANK)), dtype, device)
    return compare_projection(W, energy, max_rank, subgradient, kernel(W, energy, max_rank, subgradient))


def warm_step(kernel: Callable, shape: Sequence[int], dtype: torch.dtype, device: str | torch.device,
              width: int, max_rank: Optional[int], subgradient: bool) -> tuple[bool, str]:
    """Probe a warm-step kernel: from the exact kept basis of designed matrices to those matrices slightly turned.

    The singular vectors turn by ROTATION between each kept direction and a discarded one (float16 / bfloat16:
    from the basis of the matrices as rounded), with a basis of the call's width class (see JACOBI_MAX_N).
    Only certified matrices (ok) are compared; none certified is a pass (they would take the full solve), noted
    in the detail.

    Args:
        kernel: the warm step, kernel(W, basis, energy, max_rank, subgradient) -> (W_low, rank, G, X, ok).
        shape: the call's (B, p, q).
        dtype: the call's dtype.
        device: the call's device.
        width: the call's basis width m.
        max_rank: the call's max_rank (None or an int >= 1).
        subgradient: the call's subgradient flag.

    Returns:
        A pair (ok, detail): ok whether the kernel agrees with the reference, detail a short description.
    """
    B, p, q = shape
    n = min(p, q)
    k = min(width, JACOBI_MAX_N + 1, n)
    lam, energy = designed_spectrum(n, k)
    U, V = designed_factors(min(B, PROBE_MATRICES), p, q, device)
    left = p <= q
    side = U if left else V  # the smaller side's singular vectors: the warm start's state
    basis = side[..., :k].contiguous()
    turned = side.clone()
    angle = torch.tensor(ROTATION, dtype=torch.float64)
    for i in range(min(k, n - k)):  # a Givens rotation between kept direction i and discarded direction k + i
        a, b = side[..., i], side[..., k + i]
        turned[..., i], turned[..., k + i] = torch.cos(angle) * a - torch.sin(angle) * b, \
            torch.sin(angle) * a + torch.cos(angle) * b
    U, V = (turned, V) if left else (U, turned)
    W = ((U * lam.to(device).sqrt()) @ V.mT).to(dtype)
    if torch.finfo(dtype).bits == 16:
        # rounding to a 16-bit type moves the subspace by ~1e-3, far more than any certificate: the basis of the
        # rounded matrix itself (the float64 Gram matrix's leading eigenvectors)
        basis = torch.linalg.eigh(warm.gram(W)[0]).eigenvectors.flip(-1)[..., :k].contiguous()
    got = kernel(W, basis, energy, max_rank, subgradient)
    ok = got[4]
    if not bool(ok.any()):
        return True, "no probe matrix certified (the full solve would run)"
    # the warm step's contract: within 1e-5 of the full solve (its certificate bounds the kept subspace's angle
    # by warm.SUBSPACE_TOL), also in float64
    tol = max(PROJECTION_TOL.get(W.dtype, 1e-2), WARM_TOL)
    good, detail = compare_projection(W, energy, max_rank, subgradient, got, rows=ok, tol=tol)
    return good, f"{detail}, {int(ok.sum())} of {ok.numel()} certified"


def _reduction(w):
    return int(w.shape[1] * w.shape[2] * w.shape[3])


def convolution(kind: str, y: Tensor, x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor],
                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[Optional[bool], str]:
    """Compare a fused convolution's output with the float64 two-convolution reference, element by element.

    The bound is |y - ref| <= 2 (2 u + (K1 + K2 + 2) u32) |ref|_abs, where |ref|_abs is the reference on
    absolute values, u the unit roundoff of the dtype (the intermediate and the output are rounded to it), u32
    that of the float32 accumulators and K1, K2 the two reductions' lengths: the first-order rounding bound,
    doubled.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        y: the kernel's output [N, n, OH, OW].
        x: the call's input [N, c, H, W].
        w1: the call's first weight.
        w2: the call's second weight.
        bias: None, or the call's bias [n].
        stride: (vertical, horizontal) stride.
        padding: (top, bottom, left, right) zero padding.
        dilation: (vertical, horizontal) dilation.

    Returns:
        A pair (ok, detail): ok None (inconclusive) when the call holds non-finite or overflowing values, else
            whether every output is within the bound; detail a short description.
    """
    fn = getattr(reference, f"factorized_conv_{kind}")
    args64 = [t.to(torch.float64) if t is not None else None for t in (x, w1, w2, bias)]
    ref = fn(*args64, stride, padding, dilation)
    bound_abs = fn(*[t.abs() if t is not None else None for t in args64], stride, padding, dilation)
    limit = torch.finfo(y.dtype).max
    if not bool(torch.isfinite(bound_abs).all()) or float(bound_abs.abs().max()) >= limit:
        return None, "non-finite or overflowing values in the call"
    u, u32 = torch.finfo(y.dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    tol = 2.0 * (2.0 * u + (_reduction(w1) + _reduction(w2) + 2) * u32)
    excess = ((y.to(torch.float64) - ref).abs() - tol * bound_abs).nan_to_num(nan=float("inf"))
    worst = float(excess.max())
    if worst <= 0.0:
        return True, f"within {tol:.1e} of the absolute-value bound"
    bad = int((excess > 0).sum())
    return False, (f"{bad} of {y.numel()} outputs outside the rounding bound (tolerance {tol:.1e} x |ref|, worst "
                   f"excess {worst:.2e})")


__all__ = ["designed_batch", "designed_spectrum", "designed_factors", "projection", "warm_step", "convolution",
           "compare_projection"]
