"""Warm-started low-rank projection: one block power step and a Rayleigh-Ritz step from the previous call's
basis, with a per-matrix certificate that the result is the one the full eigensolve gives.

Between two TRP projections the weights move little: after a projection each matrix is exactly rank k, and
one SGD step later it is rank k plus a small update. One power step from the previous kept basis V0
(Y = M V0 with the Gram matrix M = A A^T, or A^T A) tilts the subspace by that update, and the error left
is of third order in it; a Rayleigh-Ritz step on span(Y) then gives the Ritz values theta_1 >= ... >=
theta_m and vectors X. Nothing is trusted without proof: with the residual R = M X - X diag(theta) (float64)
and tau = trace(M) - sum(theta) (the energy outside span(X), exact), per matrix and j = 1..m:

    Theta(j) = theta_1 + ... + theta_j  <=  F(j) = lam_1 + ... + lam_j  <=  Theta(j) + eps_j
    eps_j = ||R_{1:j}||_F^2 / gap_j,  gap_j = theta_j - ||R_{1:j}||_F - max(theta_{j+1}, tau)
                                               - 2 ||R_{j+1:m}||_F
    sin(angle(span X_{1:k}, exact top-k subspace)) <= min(||R_{1:k}||_F / gap_k, sqrt(s_b^2 + s_c^2))
    s_c = ||R||_F / (theta_k - tau),  s_b = ||R_{k+1:m}||_F s_c / (theta_k - theta_{k+1})

(Ky Fan's maximum principle for the lower bound; for the upper one, M <= diag(H11 + E^T E / d, M22 + d I)
in the Loewner order with the off-diagonal block E of the split after the leading j Ritz vectors, whose
complement has no eigenvalue above max(theta_{j+1}, tau) + 2 ||R_{j+1:m}||_F; then lam_i >= theta_i
(Cauchy interlacing) carries the bound to every j' <= j; the first angle bound is Davis and Kahan's
sin-theta theorem with the same gap. The second is of second order in the residual, so it holds where the
kept and the next Ritz value are close, as they are in the flat spectra of wide layers: in the basis
[X_{1:k}, X_{k+1:m}, Q_perp] the exact top-k eigenvectors U = (U_a; U_b; U_c) satisfy the Sylvester equations
U_c Lam - M22 U_c = R_hat (U_a; U_b) and U_b Lam - Theta_2 U_b = R_hat_2^T U_c, with Lam >= lam_k >= theta_k,
M22 <= tau (the trace of a positive semidefinite block bounds its eigenvalues) and Theta_2 <= theta_{k+1};
so ||U_c||_F <= s_c and ||U_b||_F <= s_b. Float64 rounding of the Ritz vectors themselves,
eps ||M|| / (theta_k - theta_{k+1}), is the full solve's own level and far below the tolerance.) A matrix
takes the warm result only when these bounds prove (a) the same energy-rule rank as the exact spectrum, with a
margin of RANK_MARGIN * ||W||_F^2 at the threshold (below it the full solve's own rounding decides), and
(b) a kept subspace within SUBSPACE_TOL, which bounds ||W_low - W_low_exact||_F / ||W||_F and, with the
factor 1 + sqrt(theta_1 / theta_k), the subgradient's error. Every other matrix (and every matrix on the
first call) takes the full solve.

This module is the executable specification (batched torch ops, any device) and the fallback; the compiled
kernels (csrc/common/warm_driver.h, warm_certify.h: one launch sequence per batch on the GPU) run the same
steps with the constants below. The host decides once per batch which matrices fall back
(trp_kernels/project.py)."""
import contextlib
from typing import Optional

import torch
from torch import Tensor

RANK_MARGIN = 1e-9       # relative energy margin around the energy threshold (float64 rounding is ~1e-13)
SUBSPACE_TOL = 1e-6      # bound on the sine of the angle to the exact kept subspace (contract: 1e-5)
POWER_STEPS = 2          # each divides the distance to the kept subspace by ~(update / kept singular value)^2
# FLOAT32_FIRST_STEP: the first of two or more power steps runs in float32 (on M / trace(M), in range): its
# rounding (~1e-7 of the subspace) is damped by the float64 step after it as the update itself is, so the
# certificate's bounds and the true angle stay where they were (measured at n = 768), for half the cost of a
# float64 product; the Rayleigh-Ritz step and the residuals, which the certificate reads, stay float64.
NOISE_FLOOR = 1e3        # kept Ritz values must exceed this many times the Gram matrix's rounding level
MIN_N = 16               # smaller matrices always take the full solve (as fast there: measured, README)
MAX_FRACTION = 0.55      # nor does a basis wider than this fraction of n: from about 0.6 n the power steps,
                         # orthonormalisation and m x m eigensolve cost as much as the full eigensolve
                         # (`benchmarks/lowrank_table.py --part widths`, README)


# A large matrix without a state (the first projection, or a decomposition) starts from a random block instead:
# randomized block power iteration (Householder QR between the steps, since random columns all turn towards
# the top eigenvector), a Rayleigh-Ritz step and the same certificate. Cheap where the spectrum decays (after
# TRP, pretrained weights); a flat spectrum fails it and takes the full solve.
SKETCH_MIN_N = 2048        # the op: from this n on (the full eigensolve costs tens of seconds on 2 cores there)
SKETCH_FIRST_BLOCK = 128   # columns of the first random block; then SKETCH_GROWTH times as many
SKETCH_GROWTH = 4
SKETCH_MAX_FRACTION = 0.25  # the widest block, as a fraction of n: an attempt with m columns costs about
                            # 12 n q m flops, so all of them together stay near the 2 n^2 q of the Gram matrix

# A large matrix with a state, on the CPU (n >= LARGE_MIN_N and a basis of at most LARGE_MAX_FRACTION * n
# columns), skips the Gram matrix too: subspace iteration from the previous basis with M applied as A (A^T X),
# 4 n q m flops a product instead of the Gram matrix's n^2 q. Each product M Q of an orthonormal block Q gives a
# Rayleigh-Ritz step and the certificate, and is also the next power step (M X = M Q S): the previous basis
# itself (first order in the update, seldom proven), then span(M V0) (second order: an SGD step's update is
# proven there, two products in all), and so on up to LARGE_MAX_STEPS products; a rank that outgrows the block
# gets LARGE_GROWTH random columns more (up to SKETCH_MAX_FRACTION * n). All products run in float64: a float32
# one's rounding (1e-7 of the subspace) shows in the certificate unless another product follows it, which costs
# more than the float64 product it saves.
LARGE_MIN_N = 3072          # below, the compiled Gram matrix (one triangle, at full GEMM speed) costs about as
                            # much as two narrow products and their QR (measured at n = 2048; at 4096 the
                            # Gram-free step took well under half the time of the Gram matrix's)
LARGE_MAX_FRACTION = 0.1    # a wider basis takes the Gram matrix's warm step: its products, at about half the GEMM
                            # speed of the Gram matrix's, cost as much from there
LARGE_MAX_STEPS = 6
LARGE_GROWTH = 0.25         # the fraction of its width a block grows by (at least 16 columns)


def is_basis(t: object) -> bool:
    """Whether t has the form of a warm-start state (the one rule for states handed in, saved or restored).

    Args:
        t: any object.

    Returns:
        True for a float64 tensor [B, n, m].
    """
    return isinstance(t, torch.Tensor) and t.dim() == 3 and t.dtype == torch.float64


def noise_rel(p: int, q: int) -> float:
    """Relative eigenvalue level (of lam_1) below which a kept direction gets no 1/s in the subgradient.

    It is the Gram matrix's float64 rounding, as gram_noise_rel in csrc/common/lowrank_driver.h.

    Args:
        p: rows of the matrices.
        q: columns of the matrices.

    Returns:
        16 * eps(float64) * max(p, q).
    """
    return 16.0 * torch.finfo(torch.float64).eps * max(p, q)


def gram(W: Tensor) -> tuple[Tensor, Tensor, bool]:
    """The float64 Gram matrix of the smaller side of each matrix.

    Args:
        W: tensor [B, p, q].

    Returns:
        A tuple (M, A, left): M the symmetrised Gram matrix [B, n, n] float64 (n = min(p, q)), A = W in float64,
            left whether M = A A^T (p <= q) rather than A^T A.
    """
    A = W.to(torch.float64)
    left = A.shape[1] <= A.shape[2]
    M = A @ A.mT if left else A.mT @ A
    return (M + M.mT) * 0.5, A, left


def rayleigh_ritz(M: Tensor, basis: Tensor, steps: int = POWER_STEPS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block power steps from `basis` and a Rayleigh-Ritz step on the span reached.

    Y = M^steps basis needs no orthonormalisation in between: its columns stay close to distinct
    eigenvectors (they are the previous ones), so after scaling them to unit norm Y^T Y is close to the
    identity and Cholesky QR (a small Cholesky factorisation and a triangular solve instead of Householder
    QR's per-matrix LAPACK calls; its loss of orthogonality is eps * cond(Y)^2) orthonormalises them. A
    matrix where that fails (Cholesky breaks down, or the result is not orthonormal to 1e-12) is not
    usable; the caller solves it in full.

    Args:
        M: Gram matrices [B, n, n] float64.
        basis: the kept singular vectors of the previous call [B, n, m] float64, zero columns beyond each
            matrix's rank.
        steps: the number of power steps, >= 1 (the first of two or more runs in float32, see
            FLOAT32_FIRST_STEP).

    Returns:
        A tuple (theta, X, res2, usable): Ritz values theta [B, m] (descending), orthonormal Ritz vectors
            X [B, n, m] (zero columns where the span has fewer dimensions), squared residual norms of the columns
            res2 [B, m], and usable bool [B].
    """
    Y = basis
    for s in range(steps):
        if s == 0 and steps > 1:  # float32: see FLOAT32_FIRST_STEP
            trace = M.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
            Y = ((M / torch.where(trace > 0, trace, 1.0)).float() @ Y.float()).double()
        else:
            Y = M @ Y
    norms = Y.norm(dim=-2, keepdim=True)
    live = norms > 1e-200 * norms.amax(dim=-1, keepdim=True)  # zero padding, or a direction M annihilates
    Y = torch.where(live, Y / norms.clamp_min(1e-300), torch.zeros_like(Y))
    dead = torch.diag_embed((~live).squeeze(-2).to(Y.dtype))  # unit pivots keep dead columns at zero
    L, info = torch.linalg.cholesky_ex(Y.mT @ Y + dead)
    Q = torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)  # Y L^-T
    usable = info == 0
    eye = torch.diag_embed(live.squeeze(-2).to(Y.dtype))
    usable &= (Q.mT @ Q - eye).abs().amax(dim=(-2, -1)) <= 1e-12  # False for NaN too
    # where Cholesky broke down Q holds garbage (Inf, NaN): Q = 0, so H = 0 and the eigensolver never sees it
    Q = torch.where(usable[:, None, None], Q, torch.zeros_like(Q))
    MQ = M @ Q
    H = Q.mT @ MQ
    theta, S = torch.linalg.eigh((H + H.mT) * 0.5)
    theta, S = theta.flip(-1), S.flip(-1)
    X = Q @ S
    R = MQ @ S - X * theta.unsqueeze(-2)
    return theta, X, R.square().sum(-2), usable


def _at(t, idx):
    return t.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _terms(trace, theta, res2):
    """The certificate's per-column quantities: (theta clamped at 0, tau, ||R_{1:j}||^2, ||R_{j+1:m}||,
    theta_{j+1} (0 after the last), gap_j)."""
    B, m = theta.shape
    theta = theta.clamp_min(0.0)  # Ritz values of a positive semidefinite matrix; negative ones are rounding
    slack = 8.0 * torch.finfo(torch.float64).eps * m * trace
    tau = (trace - theta.sum(-1)).clamp_min(0.0) + slack
    res_head = res2.cumsum(-1)                                     # ||R_{1:j}||^2
    res_tail = (res_head[:, -1:] - res_head).clamp_min(0.0).sqrt()  # ||R_{j+1:m}||
    theta_next = torch.cat([theta[:, 1:], theta.new_zeros(B, 1)], dim=-1)
    gap = theta - res_head.sqrt() - torch.maximum(theta_next, tau[:, None]) - 2.0 * res_tail
    return theta, tau, res_head, res_tail, theta_next, gap


def _subspace_sin(terms, i):
    """The bound on the sine of the angle between the leading i + 1 Ritz vectors and the exact top i + 1
    eigenvectors: the smaller of the first- and the second-order bound of the module docstring (inf where
    neither applies)."""
    theta, tau, res_head, res_tail, theta_next, gap = terms
    tiny = torch.finfo(torch.float64).tiny
    inf = torch.full_like(tau, float("inf"))
    gap_k, theta_k, theta_k1 = _at(gap, i), _at(theta, i), _at(theta_next, i)
    first = torch.where(gap_k > 0, _at(res_head, i).sqrt() / gap_k.clamp_min(tiny), inf)
    out_gap, in_gap = theta_k - tau, theta_k - theta_k1
    s_c = res_head[:, -1].sqrt() / out_gap.clamp_min(tiny)
    s_b = _at(res_tail, i) * s_c / in_gap.clamp_min(tiny)  # zero at k = m: nothing else in the block
    second = torch.where((out_gap > 0) & (in_gap > 0), (s_b.square() + s_c.square()).sqrt(), inf)
    return torch.minimum(first, second)


def subspace_bound(trace: Tensor, theta: Tensor, res2: Tensor, rank: Tensor) -> Tensor:
    """Per matrix, the certificate's bound on the sine of the angle to the exact kept subspace.

    The angle is between the span of the leading `rank` Ritz vectors and the exact top-`rank` eigenvectors of
    the Gram matrix (the smaller of the module docstring's first- and second-order bounds).

    Args:
        trace: trace of each Gram matrix [B] float64.
        theta: Ritz values [B, m] float64, descending.
        res2: squared residual norms of the Ritz vectors [B, m] float64.
        rank: the kept count per matrix, int64 [B] in 1..m.

    Returns:
        The bounds [B] float64 (inf where neither bound applies).
    """
    return _subspace_sin(_terms(trace, theta, res2), rank - 1)


def certify(trace: Tensor, theta: Tensor, res2: Tensor, energy: float, max_rank: Optional[int],
            noise_rel: float) -> tuple[Tensor, Tensor]:
    """The energy-rule rank from the Ritz values, and whether the certificate proves it exact.

    ok means the bounds of the module docstring prove the rank equal to the exact spectrum's, with the kept
    subspace within SUBSPACE_TOL.

    Args:
        trace: trace of each Gram matrix [B] float64.
        theta: Ritz values [B, m] float64, descending.
        res2: squared residual norms of the Ritz vectors [B, m] float64.
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).
        noise_rel: the Gram matrix's relative rounding level (see the function noise_rel).

    Returns:
        A pair (rank, ok): rank int64 [B] (0 for an all-zero matrix, at most m), ok bool [B].
    """
    m = theta.shape[1]
    terms = _terms(trace, theta, res2)
    theta, gap = terms[0], terms[5]
    eps = torch.where(gap > 0, terms[2] / gap.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(gap, float("inf")))
    eps_from = eps.flip(-1).cummin(-1).values.flip(-1)  # min over j' >= j: bounds every F(j) with j <= j'
    cum = theta.cumsum(-1)
    target = energy * trace
    rank_w = (cum < target[:, None]).sum(-1) + 1  # m + 1: the threshold is not reached within the block
    rank = rank_w if max_rank is None else rank_w.clamp(max=max_rank)
    capped = rank < rank_w
    ok = rank <= m
    i = (rank - 1).clamp(0, m - 1)  # index of the last kept Ritz value
    margin = RANK_MARGIN * trace
    # F(k) >= energy * trace (not needed when max_rank decides the rank)
    ok &= capped | (_at(cum, i) >= target + margin)
    # F(k - 1) < energy * trace: the rank is not smaller
    j = (rank - 2).clamp(0, m - 1)
    ok &= (rank == 1) | (_at(cum, j) + _at(eps_from, j) < target - margin)
    # the kept subspace, and kept directions clearly above the Gram matrix's rounding level
    theta_k = _at(theta, i)
    ok &= _subspace_sin(terms, i) * (1.0 + (theta[:, 0] / theta_k).sqrt()) <= SUBSPACE_TOL
    ok &= theta_k > NOISE_FLOOR * noise_rel * theta[:, 0]
    zero = trace == 0
    return torch.where(zero, torch.zeros_like(rank), rank.clamp(max=m)), ok | zero  # not ok: any rank <= m


def project(W: Tensor, A: Tensor, left: bool, X: Tensor, theta: Tensor, rank: Tensor, subgradient: bool,
            noise_rel: float) -> tuple[Tensor, Optional[Tensor]]:
    """W_low and the subgradient from the kept Ritz vectors.

    W_low = X_k X_k^T W (or W X_k X_k^T) and G = U_k V_k^T, GEMMs in float32 for float32/16 inputs as in the
    full solve (its accuracy is decided by the float64 basis).

    Args:
        W: the matrices [B, p, q].
        A: W in float64.
        left: whether X spans the left singular vectors (p <= q).
        X: Ritz vectors [B, n, m] float64 (the basis width bounds every rank).
        theta: Ritz values [B, m] float64 (the squared singular values).
        rank: the kept count per matrix, int64 [B].
        subgradient: whether G is computed.
        noise_rel: the relative level below which a kept direction gets no 1/s in G.

    Returns:
        A pair (W_low, G or None), float64 for float64 input, else float32.
    """
    kmax = X.shape[-1]  # the basis width bounds every rank: no host synchronisation to find the largest
    rdt = torch.float64 if W.dtype == torch.float64 else torch.float32
    keep = torch.arange(kmax, device=W.device) < rank[:, None]
    Xk = (X[:, :, :kmax] * keep.unsqueeze(-2)).to(rdt)
    A = A if rdt == torch.float64 else W.to(rdt)
    C = Xk.mT @ A if left else A @ Xk  # [B, k, q] = S_k V_k^T, or [B, p, k] = U_k S_k
    W_low = Xk @ C if left else C @ Xk.mT
    G = None
    if subgradient:
        lam = theta[:, :kmax]
        live = keep & (lam > noise_rel * theta[:, :1]) & (lam > 0)
        inv_s = torch.where(live, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam)).to(rdt)
        Xs = Xk * inv_s.unsqueeze(-2)
        G = Xs @ C if left else C @ Xs.mT
    return W_low, G


def next_basis(vectors: Tensor, rank: Tensor, largest: Optional[int] = None) -> Tensor:
    """The state for the next call: each matrix's kept vectors, zero columns up to the batch's largest rank.

    Args:
        vectors: singular vectors [B, n, >= max rank] float64, columns in descending order.
        rank: the kept count per matrix, int64 [B].
        largest: the largest rank when the caller has it on the host already (else it is read: a
            synchronisation on the GPU).

    Returns:
        The basis [B, n, max(largest, 1)]: the leading rank[b] columns of each matrix, zeros after them.
    """
    if largest is None:
        largest = int(rank.max()) if rank.numel() else 0
    m = max(int(largest), 1)
    keep = torch.arange(m, device=rank.device) < rank[:, None]
    return vectors[..., :m] * keep.unsqueeze(-2).to(vectors.dtype)


def step(W: Tensor, basis: Tensor, energy: float, max_rank: Optional[int], subgradient: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One warm-started projection of W from `basis` (the specification of the compiled warm step).

    Args:
        W: floating-point tensor [B, p, q].
        basis: the previous call's kept vectors [B, n, m] float64 (non-finite entries are treated as zero).
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).
        subgradient: whether G is computed.

    Returns:
        A tuple (W_low, rank, G, X, ok): W_low in W's dtype and shape, rank int64 [B], G in W's dtype and shape
            (an empty tensor without subgradient), X the Ritz vectors [B, n, m] float64, ok bool [B]; matrices with ok
            False hold unspecified results (the caller solves them in full).
    """
    p, q = W.shape[1:]
    nr = noise_rel(p, q)
    M, A, left = gram(W)
    basis = torch.where(torch.isfinite(basis), basis, torch.zeros_like(basis))  # a corrupted state: cold
    theta, X, res2, usable = rayleigh_ritz(M, basis)
    rank, ok = certify(M.diagonal(dim1=-2, dim2=-1).sum(-1), theta, res2, energy, max_rank, nr)
    W_low, G = project(W, A, left, X, theta, rank, subgradient, nr)
    return W_low.to(W.dtype), rank, (G.to(W.dtype) if subgradient else W.new_empty(0)), X, ok & usable


def _gram_op(A, left):
    """x -> M x for the Gram matrix of the smaller side of A [p, q], as two GEMMs (M is not formed)."""
    return (lambda X: A @ (A.mT @ X)) if left else (lambda X: A.mT @ (A @ X))


def random_ritz(A: Tensor, A32: Tensor, left: bool, m: int, generator: torch.Generator
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized block power iteration from m Gaussian columns, then a float64 Rayleigh-Ritz step.

    POWER_STEPS steps on the Gram matrix M (the first in float32 on A32), Householder QR after each.

    Args:
        A: one matrix [p, q] float64.
        A32: A in float32.
        left: whether M = A A^T (p <= q) rather than A^T A.
        m: the block width, 1 <= m <= min(p, q).
        generator: the random generator of the Gaussian block (on A's device).

    Returns:
        A tuple (theta, X, res2): Ritz values [m] descending, Ritz vectors [n, m] and squared residual norms of
            the columns [m], float64.
    """
    n = min(A.shape)
    op = _gram_op(A, left)
    Y = torch.randn(n, m, dtype=A32.dtype, device=A.device, generator=generator)
    for s in range(POWER_STEPS):
        Y = torch.linalg.qr(_gram_op(A32, left)(Y).double() if s == 0 else op(Y)).Q
    MY = op(Y)
    H = Y.mT @ MY
    theta, S = torch.linalg.eigh((H + H.mT) * 0.5)
    theta, S = theta.flip(-1), S.flip(-1)
    X = Y @ S
    R = MY @ S - X * theta
    return theta, X, R.square().sum(0)


def sketched_subspace(A: Tensor, A32: Tensor, energy: Optional[float] = None, rank: Optional[int] = None,
                      max_rank: Optional[int] = None) -> Optional[tuple[Tensor, Tensor, int]]:
    """The kept subspace of one matrix by random_ritz, proven by the certificate, or None.

    The block grows from SKETCH_FIRST_BLOCK columns up to SKETCH_MAX_FRACTION * n; an energy that the widest
    block cannot reach at its smallest Ritz value (a flat spectrum) stops the attempts early.

    Args:
        A: the matrix [p, q] float64.
        A32: A in float32.
        energy: fraction of the squared singular values kept, in (0, 1]; used when rank is None.
        rank: a fixed kept count (>= 1) instead of the energy rule.
        max_rank: None, or the largest rank the energy rule keeps.

    Returns:
        None when no block proves the subspace, else (theta [m], Ritz vectors X [n, m], r) with X[:, :r] the
            exact top-r eigenvectors of the Gram matrix within SUBSPACE_TOL; r is the energy rule's rank (capped
            by max_rank), or `rank` when given.
    """
    p, q = A.shape
    n, left = min(p, q), p <= q
    trace = A.square().sum().reshape(1)
    widest = SKETCH_MAX_FRACTION * n
    if not bool(trace > 0) or (rank is not None and rank >= widest):
        return None
    nr = noise_rel(p, q)
    generator = torch.Generator(device=A.device).manual_seed(0)
    m = SKETCH_FIRST_BLOCK
    while m <= widest:
        if rank is not None and rank >= m:  # a block must be wider than the rank it proves
            m *= SKETCH_GROWTH
            continue
        theta, X, res2 = random_ritz(A, A32, left, m, generator)
        if rank is None:
            r, ok = certify(trace, theta[None], res2[None], energy, max_rank, nr)
            r, ok = int(r), bool(ok)
        else:  # a fixed rank: its subspace within the tolerance, above the rounding level
            r = rank
            sin = subspace_bound(trace, theta[None], res2[None], torch.tensor([r], device=A.device))
            ok = (bool(sin * (1 + (theta[0] / theta[r - 1]).sqrt()) <= SUBSPACE_TOL)
                  and bool(theta[r - 1] > NOISE_FLOOR * nr * theta[0]))
        if ok and 0 < r < m:
            return theta, X, r
        if rank is None and theta[-1] > 0 and m + float(energy * trace - theta.sum()) / float(theta[-1]) > widest:
            return None
        m *= SKETCH_GROWTH
    return None


@contextlib.contextmanager
def _one_thread():
    """The small LAPACK calls of subspace_iteration (QR of n x m, eigh of m x m) on one thread: they gain nothing
    from more, and where another process shares the cores, their threads' barriers cost up to 100 times the
    work (measured: eigh of 107 x 107 on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subspace_iteration(A: Tensor, start: Tensor, energy: float, max_rank: Optional[int]
                       ) -> Optional[tuple[Tensor, Tensor, int]]:
    """The kept subspace of one matrix by certified subspace iteration from `start`, or None.

    See LARGE_MIN_N: products with the Gram matrix M of the short side, applied as A (A^T X), each followed by
    a float64 Rayleigh-Ritz step and the certificate (certify), at most LARGE_MAX_STEPS products; the block
    grows by LARGE_GROWTH random columns while its Ritz values cannot reach the energy threshold.

    Args:
        A: the matrix [p, q] float64.
        start: the starting block [n, m] (n = min(p, q), m >= 1 linearly independent columns, e.g. the previous
            call's kept singular vectors).
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).

    Returns:
        None when no step proves the subspace, else (theta [m'], Ritz vectors X [n, m'], r) with X[:, :r] the
            exact top-r eigenvectors of the Gram matrix within SUBSPACE_TOL and r the energy rule's rank (capped
            by max_rank).
    """
    p, q = A.shape
    n, left = min(p, q), p <= q
    trace = torch.linalg.vector_norm(A).square().reshape(1)
    if not bool(trace > 0) or start.shape[-1] < 1:
        return None
    nr = noise_rel(p, q)
    op = _gram_op(A, left)
    generator = torch.Generator(device=A.device).manual_seed(0)
    Y = start.to(torch.float64)
    for _ in range(LARGE_MAX_STEPS):
        with _one_thread():
            Q = torch.linalg.qr(Y).Q
        MQ = op(Q)
        H = Q.mT @ MQ
        with _one_thread():
            theta, S = torch.linalg.eigh((H + H.mT) * 0.5)
        theta, S = theta.flip(-1), S.flip(-1)
        X, MX = Q @ S, MQ @ S
        res2 = (MX - X * theta).square().sum(0)
        r, ok = certify(trace, theta[None], res2[None], energy, max_rank, nr)
        if bool(ok) and int(r) > 0:
            return theta, X, int(r)
        Y = MX
        m = Y.shape[-1]
        capped = max_rank is not None and m >= max_rank
        if not capped and float(theta.clamp_min(0).sum()) < energy * float(trace):  # threshold beyond the block
            extra = max(16, int(LARGE_GROWTH * m))
            if m + extra > SKETCH_MAX_FRACTION * n:
                return None
            G = torch.randn(n, extra, dtype=A.dtype, device=A.device, generator=generator)
            Y = torch.cat([Y, op(G)], dim=-1)
    return None


def _assemble(W, found, subgradient):
    """(W_low, rank, G, X, ok) of a batch from each matrix's (A float64, None or (theta, X, r)): the projection
    on the leading r Ritz vectors where found, zeros and ok False elsewhere."""
    B, p, q = W.shape
    nr, left = noise_rel(p, q), p <= q
    m = max([1] + [f[2] for _, f in found if f is not None])
    W_low, rank = torch.zeros_like(W), torch.zeros(B, dtype=torch.int64, device=W.device)
    G = torch.zeros_like(W) if subgradient else W.new_empty(0)
    X = torch.zeros(B, min(p, q), m, dtype=torch.float64, device=W.device)
    ok = torch.zeros(B, dtype=torch.bool, device=W.device)
    for b, (A, f) in enumerate(found):
        if f is None:
            continue
        theta, vectors, r = f
        r_t = torch.tensor([r], device=W.device)
        low, g = project(W[b:b + 1], A[None], left, vectors[None], theta[None], r_t, subgradient, nr)
        W_low[b], rank[b], X[b, :, :r], ok[b] = low[0].to(W.dtype), r, vectors[:, :r], True
        if subgradient:
            G[b] = g[0].to(W.dtype)
    return W_low, rank, G, X, ok


def large_step(W: Tensor, basis: Tensor, energy: float, max_rank: Optional[int], subgradient: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The warm step of large matrices without their Gram matrix (subspace_iteration), matrix by matrix.

    An all-zero matrix is exact at rank 0; a matrix whose state holds no nonzero finite column is not certified.

    Args:
        W: floating-point tensor [B, p, q].
        basis: the previous call's kept vectors [B, n, m] float64 (zero columns beyond each matrix's rank).
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).
        subgradient: whether G is computed.

    Returns:
        A tuple (W_low, rank, G, X, ok) as sketched_step's: matrices with ok False hold unspecified results (the
            caller solves them otherwise).
    """
    found, zero = [], []
    for b in range(W.shape[0]):
        A = W[b].to(torch.float64)
        start = torch.where(torch.isfinite(basis[b]), basis[b], torch.zeros_like(basis[b]))
        start = start[:, start.norm(dim=0) > 0]
        zero.append(not bool(A.any()))
        found.append((A, None if zero[-1] else subspace_iteration(A, start, energy, max_rank)))
    W_low, rank, G, X, ok = _assemble(W, found, subgradient)
    return W_low, rank, G, X, ok | torch.tensor(zero, dtype=torch.bool, device=W.device)


def sketched_step(W: Tensor, energy: float, max_rank: Optional[int], subgradient: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The projection of W from random blocks (sketched_subspace), matrix by matrix.

    Args:
        W: floating-point tensor [B, p, q].
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).
        subgradient: whether G is computed.

    Returns:
        A tuple (W_low, rank, G, X, ok): W_low in W's dtype and shape, rank int64 [B], G in W's dtype and shape
            (an empty tensor without subgradient), X the kept Ritz vectors [B, n, largest rank] float64, ok bool
            [B]; matrices with ok False (not certified) hold unspecified results (the caller solves them in full).
    """
    found = []
    for b in range(W.shape[0]):
        A = W[b].to(torch.float64)
        found.append((A, sketched_subspace(A, W[b].float(), energy=energy, max_rank=max_rank)))
    return _assemble(W, found, subgradient)


def kernel_params() -> tuple[int, float, float, float]:
    """This module's constants as the compiled kernels take them.

    Returns:
        The tuple (POWER_STEPS, RANK_MARGIN, SUBSPACE_TOL, NOISE_FLOOR).
    """
    return POWER_STEPS, RANK_MARGIN, SUBSPACE_TOL, NOISE_FLOOR


def compiled_step(W: Tensor, basis: Tensor, energy: float, max_rank: Optional[int], subgradient: bool,
                  solver: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """step() by the compiled kernel (trp_kernels_C::lowrank_project_warm), with this module's constants.

    Args:
        W: floating-point tensor [B, p, q].
        basis: the previous call's kept vectors [B, n, m] float64.
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or the largest rank kept (>= 1).
        subgradient: whether G is computed.
        solver: None (the kernel's own choice), or "auto", "per_matrix" (CPU only) or "batched": the CPU
            kernel's path (tests, benchmarks).

    Returns:
        A tuple (W_low, rank, G, X, ok): W_low in W's dtype and shape, rank int64 [B], G in W's dtype and shape
            (an empty tensor without subgradient), X the Ritz vectors [B, n, m] float64, ok bool [B]; matrices with ok
            False hold unspecified results (the caller solves them in full).
    """
    args = (W, basis, energy, max_rank, subgradient, *kernel_params())
    if solver is None:
        return torch.ops.trp_kernels_C.lowrank_project_warm(*args)
    return torch.ops.trp_kernels_C.lowrank_project_warm_solver(*args, solver)
