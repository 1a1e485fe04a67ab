"""The leading singular subspace of a large matrix for decomposition, without an SVD of the whole matrix.

A float64 SVD of a 4096 x 25088 Linear (VGG-11's first classifier layer) computes 4096 singular vectors of the
long side (minutes on 2 cores); the decomposition needs only the kept ones. Two routes, both in float64:

- certified (energy and fixed-rank criteria; trp_kernels.warm.sketched_subspace, which the projection op also
  starts large matrices with): randomized block power iteration on the Gram matrix of the short side
  M = A A^T, applied as A (A^T X) without forming it, a Rayleigh-Ritz step, and the certificate of
  trp_kernels.warm (Ritz values, residuals and the exact total energy trace(M) = ||A||_F^2 prove the
  energy-rule rank equal to the exact one and bound the kept subspace's angle). Cheap where the spectrum
  decays, as after TRP, since the block then needs few columns.
- full (the fallback, and the threshold criterion): the Gram matrix of the short side and its eigh, then the
  long side by one GEMM.

Either way the factors are A = Q_r D and B = D^-1 Q_r^T W with Q_r the kept eigenvectors of the Gram
matrix and D = diag(||row of Q_r^T W||)^1/2 = S_r^1/2: their product is the projection Q_r Q_r^T W, the
truncated SVD of W."""
import torch

from trp.core import rank as rank_rules
from trp_kernels import warm

LARGE_N = 512        # from this short side on: the routes of this module (below it a full SVD is cheap)


def _certified(A, A32, kind, value):
    """(kept eigenvectors Q_r [n, r], r) proven by trp_kernels.warm's certificate, or None."""
    args = {"energy": value} if kind == "energy" else {"rank": value}
    found = warm.sketched_subspace(A, A32, **args)
    return None if found is None else (found[1][:, :found[2]], found[2])


def _full(A, left, kind, value):
    """(kept eigenvectors [n, r], r) from the eigh of the Gram matrix of the short side.

    The Gram matrix's eigenvalues carry its float64 rounding, eps * lam_1: below about sqrt(eps) s_1 their
    square roots are not the singular values (a null direction shows as ~1e-8 s_1). The energy and rank
    rules do not see that; a threshold can be that small, so its count is taken from the norms of Q_i^T W,
    accurate to eps * s_1 as an SVD's, over the directions whose eigenvalue does not rule them out."""
    M = A @ A.mT if left else A.mT @ A
    lam, Q = torch.linalg.eigh((M + M.mT) * 0.5)
    lam, Q = lam.flip(-1), Q.flip(-1)
    if kind != "threshold":
        r = int(rank_rules.select_rank(lam.clamp_min(0).sqrt(), kind, value))
        return Q[:, :r], r
    k = max(int((lam.clamp_min(0).sqrt() > value).sum()), 1)
    C = Q[:, :k].mT @ A if left else A @ Q[:, :k]
    r = int(rank_rules.select_rank(C.norm(dim=1 if left else 0), kind, value))
    return Q[:, :r], r


def leading_factors(matrix, kind, value):
    """Factors of the truncated SVD of a large matrix, without a full SVD.

    Meant for a matrix whose short side is at least LARGE_N.

    Args:
        matrix: the matrix [p, q], a tensor of any float dtype (detached and computed in float64).
        kind: the rank criterion, "energy", "threshold" or "rank" (as rank.check_criterion returns it).
        value: the criterion's validated value (rank.check_criterion's).

    Returns:
        (A [p, r], B [r, q], r, the kept singular values [r]): float64 tensors with A B the truncated SVD of
            matrix at the rank r (an int) that the criterion gives.
    """
    W = matrix.detach().to(torch.float64)
    left = W.shape[0] <= W.shape[1]
    certifiable = kind == "energy" or (kind == "rank" and isinstance(value, int))
    found = _certified(W, matrix.detach().float(), kind, value) if certifiable else None
    Q, r = found if found is not None else _full(W, left, kind, value)
    C = Q.mT @ W if left else W @ Q           # [r, q] = S_r V_r^T, or [p, r] = U_r S_r
    s = C.norm(dim=1 if left else 0)           # the kept singular values
    root = s.sqrt()
    inv = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if left:
        return Q * root, C * inv[:, None], r, s
    return C * inv, root[:, None] * Q.mT, r, s


__all__ = ["leading_factors", "LARGE_N"]
