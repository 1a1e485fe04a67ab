"""Reshape of layer weights to the matrices that TRP makes low-rank, and back: channel-wise
(filters as rows) and spatial-wise (kh x kw split) reshapes, and nd (one matrix per filter).

channel: conv weight [n, c, kh, kw] -> n x (c*kh*kw)   (Zhang et al.; kh x kw conv to rank k, then 1x1)
spatial: conv weight [n, c, kh, kw] -> (c*kh) x (n*kw) (Jaderberg et al.; kh x 1 conv, then 1 x kw)
nd:      conv weight [n, c, kh, kw] -> n matrices c x (kh*kw), one per filter, as a batch [n, c, kh*kw]
         (network decoupling; r parallel 1x1 + depthwise kh x kw paths)
Linear weight [out, in] is its own matrix out x in (channel scheme only).
A conv with groups g > 1 is g independent convs: under channel / spatial each group's filters
[n/g, c/g, kh, kw] make their own matrix (a batch [g, p, q]); nd's per-filter matrices are unchanged.

Every function also takes a leading batch dimension ([B, n, c, kh, kw] <-> [B, p, q]) so the pruner can
reshape a stacked group in one call."""
from trp._utils import checks

SCHEMES = ("channel", "spatial", "nd")


def check_scheme(scheme):
    """Validates a decomposition scheme name.

    Args:
        scheme: the scheme, one of SCHEMES ("channel", "spatial", "nd").

    Returns:
        The scheme, unchanged.

    Raises:
        ValueError: when scheme is not one of SCHEMES.
    """
    return checks.choice(scheme, SCHEMES, "scheme", unknown=True)


def _check_groups(groups, n, scheme):
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or n % groups:
        raise ValueError(f"groups must be an int >= 1 that divides the {n} filters, got {groups!r}")
    return 1 if scheme == "nd" else groups  # nd's per-filter matrices do not depend on the groups


def matrix_shape(weight_shape, scheme, groups=1):
    """Shape of the matrix (or batch of matrices) that a weight of shape weight_shape reshapes to.

    Always the shape of to_matrix's result for one weight.

    Args:
        weight_shape: the weight's shape without a batch dimension, a sequence of ints: [n, c, kh, kw] for a
            conv or [out, in] for a linear layer.
        scheme: the reshape, "channel", "spatial" or "nd" (linear weights: "channel" only).
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd".

    Returns:
        A tuple: (p, q) for one matrix; for nd (n, c, kh*kw), the n per-filter matrices; for a conv with
            groups g > 1 under channel / spatial (g, p, q), one matrix per group, each of its n/g filters over
            its c = in/g input channels.

    Raises:
        ValueError: when scheme is unknown, a linear weight is given a scheme other than "channel", the shape
            has neither 2 nor 4 dimensions, or groups is not an int >= 1 dividing n.
    """
    check_scheme(scheme)
    if len(weight_shape) == 2:
        if scheme != "channel":
            raise ValueError("nn.Linear weights have only the out x in matrix: use scheme='channel'")
        return tuple(weight_shape)
    if len(weight_shape) != 4:
        raise ValueError(f"expected a conv weight [n, c, kh, kw] or a linear weight [out, in], "
                         f"got shape {tuple(weight_shape)}")
    n, c, kh, kw = weight_shape
    g = _check_groups(groups, n, scheme)
    m = n // g
    shape = {"channel": (m, c * kh * kw), "spatial": (c * kh, m * kw), "nd": (n, c, kh * kw)}[scheme]
    return shape if g == 1 else (g, *shape)


def to_matrix(weight, scheme, groups=1):
    """Reshapes a weight to the matrix (or batch of matrices) that TRP makes low-rank.

    Args:
        weight: a conv weight [..., n, c, kh, kw] or a linear weight [..., out, in] (any leading batch
            dimensions), a tensor.
        scheme: the reshape, "channel", "spatial" or "nd" (linear weights: "channel" only).
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd".

    Returns:
        The matrix [..., p, q] (nd: [..., n, c, kh*kw], a batch of per-filter matrices; groups g > 1 under
            channel / spatial: [..., g, p, q], one per group); a view of weight when possible.

    Raises:
        ValueError: when scheme is unknown, a linear weight is given a scheme other than "channel", or groups
            is not an int >= 1 dividing n.
    """
    check_scheme(scheme)
    if weight.dim() <= 3:  # [out, in] or a batch of them: already a matrix
        matrix_shape(weight.shape[-2:], scheme)  # raises for spatial
        return weight
    lead = weight.shape[:-4]
    n, c, kh, kw = weight.shape[-4:]
    g = _check_groups(groups, n, scheme)
    if g > 1:
        lead, n = (*lead, g), n // g
        weight = weight.reshape(*lead, n, c, kh, kw)
    if scheme == "channel":
        return weight.reshape(*lead, n, c * kh * kw)
    if scheme == "nd":
        return weight.reshape(*lead, n, c, kh * kw)
    nd = len(lead)
    perm = tuple(range(nd)) + (nd + 1, nd + 2, nd, nd + 3)  # [c, kh, n, kw]
    return weight.permute(perm).reshape(*lead, c * kh, n * kw)


def from_matrix(matrix, scheme, weight_shape, groups=1):
    """Inverse of to_matrix: reshapes a matrix back to a layer weight.

    Args:
        matrix: the matrix [..., p, q] (nd: [..., n, c, kh*kw]; groups g > 1: [..., g, p, q]), a tensor with
            any leading batch dimensions.
        scheme: the reshape that made the matrix, "channel", "spatial" or "nd".
        weight_shape: the weight's shape without the batch dimension, [n, c, kh, kw] or [out, in].
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd".

    Returns:
        The weight [..., *weight_shape]. For the spatial scheme a permuted view (not contiguous), or a copy
            with groups.

    Raises:
        ValueError: when scheme is unknown, a linear weight shape is given a scheme other than "channel", or
            groups is not an int >= 1 dividing n.
    """
    check_scheme(scheme)
    weight_shape = tuple(weight_shape)
    if len(weight_shape) == 2:
        matrix_shape(weight_shape, scheme)
        return matrix.reshape(*matrix.shape[:-2], *weight_shape)
    n, c, kh, kw = weight_shape
    g = _check_groups(groups, n, scheme)
    if g > 1:
        per_group = from_matrix(matrix, scheme, (n // g, c, kh, kw))  # [..., g, n/g, c, kh, kw]
        return per_group.reshape(*per_group.shape[:-5], n, c, kh, kw)
    lead = matrix.shape[:-2]
    if scheme == "nd":
        lead = matrix.shape[:-3]
    if scheme in ("channel", "nd"):
        return matrix.reshape(*lead, n, c, kh, kw)
    nd = len(lead)
    w = matrix.reshape(*lead, c, kh, n, kw)
    perm = tuple(range(nd)) + (nd + 2, nd, nd + 1, nd + 3)  # back to [n, c, kh, kw]
    return w.permute(perm)


def layer_matrix_shape(module, scheme):
    """Matrix shape for an nn.Conv2d (with its groups) or nn.Linear module under `scheme`.

    Args:
        module: the layer, an nn.Conv2d or nn.Linear (anything with a weight and, for a conv, groups).
        scheme: the reshape, "channel", "spatial" or "nd".

    Returns:
        The shape tuple, as matrix_shape gives it for the module's weight and groups.

    Raises:
        ValueError: when the scheme is unknown or does not apply to the module's weight.
    """
    return matrix_shape(tuple(module.weight.shape), scheme, getattr(module, "groups", 1))


__all__ = ["SCHEMES", "check_scheme", "matrix_shape", "to_matrix", "from_matrix", "layer_matrix_shape"]
