"""Plain PyTorch implementations of every trp_kernels op: the executable specification that each compiled
or Triton kernel is tested against, and the fallback when no compiled kernel is available."""
import torch
import torch.nn.functional as F


def energy_rank(sigma, energy, max_rank=None):
    """Rank per matrix from singular values sigma [B, K] (descending): the smallest k >= 1 whose leading
    k squared singular values keep at least `energy` of the total; 0 for an all-zero matrix; capped by
    max_rank. Computed in float64 so that the rule does not depend on the input precision."""
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


def lowrank_project(W, energy, max_rank=None, subgradient=False):
    """W [B, p, q] -> (W_low, rank, G or None) by batched SVD; see DESIGN.md for the contract."""
    return lowrank_project_basis(W, energy, max_rank, subgradient)[:3]


def lowrank_project_basis(W, energy, max_rank=None, subgradient=False):
    """lowrank_project plus the singular vectors of the smaller side [B, n, n] float64 (columns, descending):
    left ones when p <= q, else right ones, i.e. the Gram matrix's eigenvectors (the warm start's state)."""
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


def factorized_conv_channel(x, c_weight, p_weight, bias, stride, padding, dilation):
    """kh x kw conv c -> r (stride, padding (t, b, l, r), dilation), then 1 x 1 conv r -> n with bias."""
    y = _pad_and_conv(x, c_weight, None, tuple(stride), tuple(padding), tuple(dilation))
    return F.conv2d(y, p_weight, bias)


def factorized_conv_spatial(x, v_weight, h_weight, bias, stride, padding, dilation):
    """kh x 1 conv c -> r, then 1 x kw conv r -> n with bias. stride/dilation are (vertical, horizontal)
    pairs and padding is (top, bottom, left, right): the vertical parts apply to the kh x 1 conv, the
    horizontal parts to the 1 x kw conv."""
    sh, sw = stride
    top, bottom, left, right = padding
    dh, dw = dilation
    y = _pad_and_conv(x, v_weight, None, (sh, 1), (top, bottom, 0, 0), (dh, 1))
    return _pad_and_conv(y, h_weight, bias, (1, sw), (0, 0, left, right), (1, dw))


def factorized_conv_decoupled(x, pw_weight, dw_weight, bias, stride, padding, dilation):
    """Network decoupling: 1 x 1 conv c -> n*r (pw_weight [n*r, c, 1, 1]) at the input resolution, then
    the kh x kw conv with groups=n (dw_weight [n, r, kh, kw]; stride, padding (t, b, l, r), dilation) and
    bias. Padding the pointwise output equals padding x: the 1 x 1 conv has no bias, so zeros stay zeros."""
    y = F.conv2d(x, pw_weight)
    return _pad_and_conv(y, dw_weight, bias, tuple(stride), tuple(padding), tuple(dilation),
                         groups=dw_weight.shape[0])
