"""Plain PyTorch implementations of every trp_kernels op: the executable specification that each compiled
or Triton kernel is tested against, and the fallback when no compiled kernel is available."""
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def energy_rank(sigma: Tensor, energy: float, max_rank: Optional[int] = None) -> Tensor:
    """Rank per matrix by the energy rule, from its singular values.

    The rank is the smallest k >= 1 whose leading k squared singular values keep at least `energy` of their
    total, 0 for an all-zero matrix, capped by max_rank. Computed in float64, so that the rule does not
    depend on the input precision.

    Args:
        sigma: singular values [B, K], each row in descending order, >= 0 (any floating dtype).
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None (no cap), or the largest rank returned, >= 1.

    Returns:
        The ranks, int64 [B] on sigma's device, each in 0..K.
    """
    s2 = sigma.detach().to(torch.float64).square()
    cum = torch.cumsum(s2, dim=-1)
    if cum.shape[-1] == 0:
        return torch.zeros(cum.shape[:-1], dtype=torch.int64, device=sigma.device)
    total = cum[..., -1:]
    # number of prefixes still below the threshold = index of the first prefix that reaches it
    rank = (cum < energy * total).sum(dim=-1) + 1
    rank = rank.clamp(max=cum.shape[-1])
    if max_rank is not None:
        rank = rank.clamp(max=int(max_rank))
    return torch.where(total[..., 0] > 0, rank, torch.zeros_like(rank))


def lowrank_project(W: Tensor, energy: float, max_rank: Optional[int] = None, subgradient: bool = False
                    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Project each matrix of W on its truncated SVD by a float64 batched SVD: the specification of the op.

    The arguments are not validated here (trp_kernels.lowrank_project checks them).

    Args:
        W: floating-point tensor [B, p, q].
        energy: fraction of the squared singular values each matrix keeps, in (0, 1] (see energy_rank).
        max_rank: None (no cap), or the largest rank kept, >= 1.
        subgradient: also return G = U_k V_k^T, the nuclear-norm subgradient.

    Returns:
        A tuple (W_low, rank, G): W_low = U_k S_k V_k^T in W's dtype and shape, rank int64 [B] (energy_rank),
            G in W's dtype and shape when subgradient is True, else None.
    """
    return lowrank_project_basis(W, energy, max_rank, subgradient)[:3]


def lowrank_project_basis(W: Tensor, energy: float, max_rank: Optional[int] = None, subgradient: bool = False
                          ) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """lowrank_project plus every singular vector of the smaller side: the state a warm start begins from.

    Args:
        W: floating-point tensor [B, p, q].
        energy: fraction of the squared singular values each matrix keeps, in (0, 1] (see energy_rank).
        max_rank: None (no cap), or the largest rank kept, >= 1.
        subgradient: also return G = U_k V_k^T, the nuclear-norm subgradient.

    Returns:
        A tuple (W_low, rank, G, basis): the first three as lowrank_project returns them; basis float64
            [B, n, n] with n = min(p, q) holds the left singular vectors when p <= q, else the right ones (the
            Gram matrix's eigenvectors), as columns in descending order of singular value.
    """
    # float64 SVD for every input: the spec must meet the contract's 1e-5 accuracy itself, and a float32
    # SVD misses it where the spectrum is flat at the cut.
    compute_dtype = torch.float64
    A = W.to(compute_dtype)
    B, p, q = A.shape
    n = min(p, q)
    if B == 0 or n == 0:
        rank = torch.zeros(B, dtype=torch.int64, device=W.device)
        return (torch.zeros_like(W), rank, (torch.zeros_like(W) if subgradient else None),
                A.new_zeros(B, n, n))
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    rank = energy_rank(S, energy, max_rank)
    keep = (torch.arange(S.shape[-1], device=W.device) < rank[:, None]).to(compute_dtype)
    W_low = (U * (S * keep).unsqueeze(-2)) @ Vh
    G = (U * keep.unsqueeze(-2)) @ Vh if subgradient else None
    basis = U if p <= q else Vh.mT
    return W_low.to(W.dtype), rank, (G.to(W.dtype) if G is not None else None), basis


def _pad_and_conv(x, weight, bias, stride, padding, dilation, groups=1):
    """conv2d with padding (top, bottom, left, right); asymmetric padding is applied by F.pad."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


def factorized_conv_channel(x: Tensor, c_weight: Tensor, p_weight: Tensor, bias: Optional[Tensor],
                            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """A kh x kw conv c -> r (stride, padding, dilation), then a 1 x 1 conv r -> n with bias, as two conv2d calls.

    Args:
        x: input [N, c, H, W].
        c_weight: weight of the kh x kw conv [r, c, kh, kw].
        p_weight: weight of the 1 x 1 conv [n, r, 1, 1].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype.
    """
    y = _pad_and_conv(x, c_weight, None, tuple(stride), tuple(padding), tuple(dilation))
    return F.conv2d(y, p_weight, bias)


def factorized_conv_spatial(x: Tensor, v_weight: Tensor, h_weight: Tensor, bias: Optional[Tensor],
                            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """A kh x 1 conv c -> r, then a 1 x kw conv r -> n with bias, as two conv2d calls.

    The vertical parts of stride, padding and dilation apply to the kh x 1 conv, the horizontal parts to the
    1 x kw conv.

    Args:
        x: input [N, c, H, W].
        v_weight: weight of the vertical conv [r, c, kh, 1].
        h_weight: weight of the horizontal conv [n, r, 1, kw].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype.
    """
    sh, sw = stride
    top, bottom, left, right = padding
    dh, dw = dilation
    y = _pad_and_conv(x, v_weight, None, (sh, 1), (top, bottom, 0, 0), (dh, 1))
    return _pad_and_conv(y, h_weight, bias, (1, sw), (0, 0, left, right), (1, dw))


def factorized_conv_decoupled(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, bias: Optional[Tensor],
                              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """Network decoupling: a 1 x 1 conv c -> n*r, then a kh x kw conv with groups=n and bias, as two conv2d calls.

    The pointwise conv runs at the input resolution; padding its output equals padding x, since it has no
    bias (zeros stay zeros).

    Args:
        x: input [N, c, H, W].
        pw_weight: weight of the pointwise conv [n*r, c, 1, 1].
        dw_weight: weight of the grouped kh x kw conv [n, r, kh, kw].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype.
    """
    y = F.conv2d(x, pw_weight)
    return _pad_and_conv(y, dw_weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                         groups=dw_weight.shape[0])


def factorized_conv_depthwise_decoupled(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, bias: Optional[Tensor],
                                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
                                        ) -> Tensor:
    """Network decoupling, depthwise order: a kh x kw conv c -> c*r with groups=c (stride, padding, dilation), then a
    1 x 1 conv c*r -> n with bias, as two conv2d calls.

    Args:
        x: input [N, c, H, W].
        dw_weight: weight of the depthwise conv [c*r, 1, kh, kw]; channel j*r + l is path l of input channel j.
        pw_weight: weight of the pointwise conv [n, c*r, 1, 1].
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype.
    """
    y = _pad_and_conv(x, dw_weight, None, tuple(stride), tuple(padding), tuple(dilation), groups=x.shape[1])
    return F.conv2d(y, pw_weight, bias)
