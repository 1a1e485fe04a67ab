"""Reshape of layer weights to the matrices that TRP makes low-rank, and back: channel-wise
(filters as rows) and spatial-wise (kh x kw split) reshapes, and network decoupling in its two orders.

channel:      conv weight [n, c, kh, kw] -> n x (c*kh*kw)   (Zhang et al.; kh x kw conv to rank k, then 1x1)
spatial:      conv weight [n, c, kh, kw] -> (c*kh) x (n*kw) (Jaderberg et al.; kh x 1 conv, then 1 x kw)
nd_pointwise: conv weight [n, c, kh, kw] -> n matrices c x (kh*kw), one per filter, as a batch [n, c, kh*kw]
              (r parallel paths per filter: a 1x1 conv c -> n*r at the input resolution, then a grouped
              kh x kw conv n*r -> n)
nd_depthwise: conv weight [n, c, kh, kw] -> c matrices n x (kh*kw), one per input channel, as a batch
              [c, n, kh*kw] (r paths per input channel: a depthwise kh x kw conv c -> c*r with the stride,
              then a 1x1 conv c*r -> n at the output resolution)
nd:           either order, picked per layer by nd_order: the one with fewer multiply-adds. The cost of
              both is linear in the rank, so the choice depends on the layer's geometry only (a stride-2
              layer pays in depthwise order, where the pointwise order's 1x1 conv would run at 4x the
              output's pixels) and is fixed before training; resolve() makes it.
Linear weight [out, in] is its own matrix out x in (channel scheme only).
A conv with groups g > 1 is g independent convs: under channel / spatial each group's filters
[n/g, c/g, kh, kw] make their own matrix (a batch [g, p, q]); nd_pointwise's per-filter matrices are
unchanged; under nd_depthwise each of the c input channels has a matrix over its group's n/g filters.

Every function also takes a leading batch dimension ([B, n, c, kh, kw] <-> [B, p, q]) so the pruner can
reshape a stacked group in one call."""
from trp._utils import checks

SCHEMES = ("channel", "spatial", "nd", "nd_pointwise", "nd_depthwise")
# what one layer's matrices are made by: "nd" names a choice between the two orders, not a reshape
LAYER_SCHEMES = ("channel", "spatial", "nd_pointwise", "nd_depthwise")


def check_scheme(scheme):
    """Validates a decomposition scheme name.

    Args:
        scheme: the scheme, one of SCHEMES ("channel", "spatial", "nd", "nd_pointwise", "nd_depthwise").

    Returns:
        The scheme, unchanged.

    Raises:
        ValueError: when scheme is not one of SCHEMES.
    """
    return checks.choice(scheme, SCHEMES, "scheme", unknown=True)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def nd_order(weight_shape, groups=1, stride=1):
    """The cheaper network-decoupling order for a conv: multiply-adds per output pixel at any rank r are
    r * n * (c_g * sh * sw + kh * kw) in pointwise order and r * c * (kh * kw + n / g) in depthwise order
    (c = c_g * g input channels). A tie keeps the pointwise order.

    Args:
        weight_shape: the conv weight's shape [n, c_g, kh, kw] (c_g = input channels per group).
        groups: the conv's groups g, an int >= 1; default 1.
        stride: the conv's stride, an int or an (sh, sw) pair; default 1.

    Returns:
        "nd_pointwise" or "nd_depthwise".
    """
    n, c_g, kh, kw = weight_shape
    sh, sw = _pair(stride)
    pointwise = n * (c_g * sh * sw + kh * kw)
    depthwise = c_g * groups * kh * kw + n * c_g
    return "nd_depthwise" if depthwise < pointwise else "nd_pointwise"


def resolve(scheme, weight_shape, groups=1, stride=1):
    """The reshape one layer uses under `scheme`: "nd" becomes the layer's cheaper order (nd_order); every
    other scheme is its own reshape.

    Args:
        scheme: a scheme of SCHEMES.
        weight_shape: the layer's weight shape ([n, c_g, kh, kw] or [out, in]).
        groups: the conv's groups, an int >= 1; default 1.
        stride: the conv's stride, an int or a pair; default 1.

    Returns:
        The layer's scheme: one of LAYER_SCHEMES ("nd" stays "nd" for a Linear weight, which to_matrix refuses
            with its reason).

    Raises:
        ValueError: when scheme is not one of SCHEMES.
    """
    check_scheme(scheme)
    if scheme != "nd" or len(weight_shape) != 4:
        return scheme
    return nd_order(tuple(weight_shape), groups, stride)


def layer_scheme(scheme, module):
    """resolve() for a layer module (an nn.Conv2d, nn.Linear or anything with their weight, groups and stride).

    Args:
        scheme: a scheme of SCHEMES.
        module: the layer.

    Returns:
        The layer's scheme, as resolve() gives it.
    """
    return resolve(scheme, tuple(module.weight.shape), getattr(module, "groups", 1), getattr(module, "stride", 1))


def _check_groups(groups, n, scheme):
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or n % groups:
        raise ValueError(f"groups must be an int >= 1 that divides the {n} filters, got {groups!r}")
    return 1 if scheme == "nd_pointwise" else groups  # per-filter matrices do not depend on the groups


def _check_layer_scheme(scheme):
    check_scheme(scheme)
    if scheme == "nd":
        raise ValueError("scheme 'nd' picks an order per layer: resolve it to 'nd_pointwise' or 'nd_depthwise' "
                         "first (trp.core.schemes.resolve)")


def matrix_shape(weight_shape, scheme, groups=1):
    """Shape of the matrix (or batch of matrices) that a weight of shape weight_shape reshapes to.

    Always the shape of to_matrix's result for one weight.

    Args:
        weight_shape: the weight's shape without a batch dimension, a sequence of ints: [n, c, kh, kw] for a
            conv or [out, in] for a linear layer.
        scheme: the reshape, one of LAYER_SCHEMES (linear weights: "channel" only).
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd_pointwise".

    Returns:
        A tuple: (p, q) for one matrix; for nd_pointwise (n, c, kh*kw), the n per-filter matrices; for
            nd_depthwise (c*g, n/g, kh*kw), one matrix per input channel; for a conv with groups g > 1 under
            channel / spatial (g, p, q), one matrix per group, each of its n/g filters over its c = in/g input
            channels.

    Raises:
        ValueError: when scheme is unknown or "nd" (unresolved), a linear weight is given a scheme other than
            "channel", the shape has neither 2 nor 4 dimensions, or groups is not an int >= 1 dividing n.
    """
    _check_layer_scheme(scheme)
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
    if scheme == "nd_depthwise":
        return (c * g, m, kh * kw)
    shape = {"channel": (m, c * kh * kw), "spatial": (c * kh, m * kw), "nd_pointwise": (n, c, kh * kw)}[scheme]
    return shape if g == 1 else (g, *shape)


def to_matrix(weight, scheme, groups=1):
    """Reshapes a weight to the matrix (or batch of matrices) that TRP makes low-rank.

    Args:
        weight: a conv weight [..., n, c, kh, kw] or a linear weight [..., out, in] (any leading batch
            dimensions), a tensor.
        scheme: the reshape, one of LAYER_SCHEMES (linear weights: "channel" only).
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd_pointwise".

    Returns:
        The matrix [..., p, q] (nd_pointwise: [..., n, c, kh*kw], a batch of per-filter matrices;
            nd_depthwise: [..., c*g, n/g, kh*kw], one per input channel; groups g > 1 under channel / spatial:
            [..., g, p, q], one per group); a view of weight when possible.

    Raises:
        ValueError: when scheme is unknown or "nd" (unresolved), a linear weight is given a scheme other than
            "channel", or groups is not an int >= 1 dividing n.
    """
    _check_layer_scheme(scheme)
    if weight.dim() <= 3:  # [out, in] or a batch of them: already a matrix
        matrix_shape(weight.shape[-2:], scheme)  # raises for spatial
        return weight
    lead = weight.shape[:-4]
    n, c, kh, kw = weight.shape[-4:]
    g = _check_groups(groups, n, scheme)
    if scheme == "nd_depthwise":  # [.., g, n/g, c, k] -> [.., g, c, n/g, k]: input channel j = group * c + local
        nd = len(lead)
        w = weight.reshape(*lead, g, n // g, c, kh * kw).transpose(nd + 1, nd + 2)
        return w.reshape(*lead, g * c, n // g, kh * kw)
    if g > 1:
        lead, n = (*lead, g), n // g
        weight = weight.reshape(*lead, n, c, kh, kw)
    if scheme == "channel":
        return weight.reshape(*lead, n, c * kh * kw)
    if scheme == "nd_pointwise":
        return weight.reshape(*lead, n, c, kh * kw)
    nd = len(lead)
    perm = tuple(range(nd)) + (nd + 1, nd + 2, nd, nd + 3)  # [c, kh, n, kw]
    return weight.permute(perm).reshape(*lead, c * kh, n * kw)


def from_matrix(matrix, scheme, weight_shape, groups=1):
    """Inverse of to_matrix: reshapes a matrix back to a layer weight.

    Args:
        matrix: the matrix as to_matrix made it ([..., p, q]; nd_pointwise: [..., n, c, kh*kw]; nd_depthwise:
            [..., c*g, n/g, kh*kw]; groups g > 1: [..., g, p, q]), a tensor with any leading batch dimensions.
        scheme: the reshape that made the matrix, one of LAYER_SCHEMES.
        weight_shape: the weight's shape without the batch dimension, [n, c, kh, kw] or [out, in].
        groups: the conv's groups g, an int >= 1 that divides n; default 1. Ignored by "nd_pointwise".

    Returns:
        The weight [..., *weight_shape]. For the spatial and nd_depthwise schemes a copy or a permuted view
            (not contiguous), a copy with groups.

    Raises:
        ValueError: when scheme is unknown or "nd" (unresolved), a linear weight shape is given a scheme other
            than "channel", or groups is not an int >= 1 dividing n.
    """
    _check_layer_scheme(scheme)
    weight_shape = tuple(weight_shape)
    if len(weight_shape) == 2:
        matrix_shape(weight_shape, scheme)
        return matrix.reshape(*matrix.shape[:-2], *weight_shape)
    n, c, kh, kw = weight_shape
    g = _check_groups(groups, n, scheme)
    if scheme == "nd_depthwise":
        lead = matrix.shape[:-3]
        nd = len(lead)
        w = matrix.reshape(*lead, g, c, n // g, kh * kw).transpose(nd + 1, nd + 2)
        return w.reshape(*lead, n, c, kh, kw)
    if g > 1:
        per_group = from_matrix(matrix, scheme, (n // g, c, kh, kw))  # [..., g, n/g, c, kh, kw]
        return per_group.reshape(*per_group.shape[:-5], n, c, kh, kw)
    lead = matrix.shape[:-2]
    if scheme == "nd_pointwise":
        lead = matrix.shape[:-3]
    if scheme in ("channel", "nd_pointwise"):
        return matrix.reshape(*lead, n, c, kh, kw)
    nd = len(lead)
    w = matrix.reshape(*lead, c, kh, n, kw)
    perm = tuple(range(nd)) + (nd + 2, nd, nd + 1, nd + 3)  # back to [n, c, kh, kw]
    return w.permute(perm)


def layer_matrix_shape(module, scheme):
    """Matrix shape for an nn.Conv2d (with its groups and stride) or nn.Linear module under `scheme`.

    Args:
        module: the layer, an nn.Conv2d or nn.Linear (anything with a weight and, for a conv, groups).
        scheme: a scheme of SCHEMES ("nd" is resolved for the module first).

    Returns:
        The shape tuple, as matrix_shape gives it for the module's weight and groups.

    Raises:
        ValueError: when the scheme is unknown or does not apply to the module's weight.
    """
    return matrix_shape(tuple(module.weight.shape), layer_scheme(scheme, module), getattr(module, "groups", 1))


__all__ = ["SCHEMES", "LAYER_SCHEMES", "check_scheme", "nd_order", "resolve", "layer_scheme", "matrix_shape",
           "to_matrix", "from_matrix", "layer_matrix_shape"]
