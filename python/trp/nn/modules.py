# Over 300 lines: the factorized layer types share their construction, SVD and weight helpers.
"""Factorized layers that a decomposed network is made of.

ChannelFactorizedConv2d  kh x kw conv c -> rank, then 1 x 1 conv rank -> n (+ bias)   ("channel")
SpatialFactorizedConv2d  kh x 1 conv c -> rank, then 1 x kw conv rank -> n (+ bias)   ("spatial")
DecoupledConv2d          1 x 1 conv c -> n*rank, then grouped kh x kw conv n*rank -> n (groups n, + bias):
                         rank parallel pointwise + depthwise paths per filter            ("nd_pointwise")
DepthwiseDecoupledConv2d depthwise kh x kw conv c -> c*rank (stride), then 1 x 1 conv c*rank -> n (+ bias):
                         rank parallel depthwise + pointwise paths per input channel     ("nd_depthwise")
FactorizedLinear         Linear in -> rank, then Linear rank -> out (+ bias)

The convolutions forward through trp_kernels' fused factorized-conv ops. `from_conv` / `from_linear` build
one from a dense layer by a float64 SVD of its scheme matrix M ~= A B, with A = U_k S_k^1/2 and
B = S_k^1/2 V_k^T: splitting the singular values evenly gives both factors the same scale, which keeps them
in range in half precision and balances their gradients when the compact network is fine-tuned (U_k S_k /
V_k^T would put all the magnitude in one factor)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

import trp_kernels
from trp._utils import checks
from trp.core import eligibility, spectral
from trp.core import rank as rank_rules
from trp.core.schemes import to_matrix
from trp_kernels import geometry


def conv_padding4(conv):
    """(top, bottom, left, right) zero padding of an nn.Conv2d, resolving "same" and "valid".

    For even kernels "same" is asymmetric: the extra row/column goes to the bottom/right, as in PyTorch.

    Args:
        conv: an nn.Conv2d (or anything with its padding, kernel_size and dilation attributes).

    Returns:
        A tuple of four ints >= 0: (top, bottom, left, right).
    """
    return geometry.resolve_padding(conv.padding, conv.kernel_size, conv.dilation)


def _svd_factors(matrix, kind, value):
    """Float64 SVD of `matrix` [p, q] or of a batch [B, p, q] (nd: one matrix per filter); returns
    (A [..., p, r], B [..., r, q], r, singular values: all of them, or the kept ones of a large matrix) in
    float64. A batch shares one r, the largest rank the criterion gives any of its matrices: all of them keep
    r components, since the layer computes r paths for every filter anyway and the extra components only add
    accuracy. A single matrix whose short side is at least spectral.LARGE_N takes trp.core.spectral's routes (the
    same truncated SVD without computing the long side's singular vectors)."""
    if matrix.dim() == 2 and min(matrix.shape) >= spectral.LARGE_N:
        return spectral.leading_factors(matrix, kind, value)
    U, S, Vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    r = int(rank_rules.select_rank(S, kind, value).max())
    root = S[..., :r].sqrt()
    return U[..., :r] * root[..., None, :], root[..., None] * Vh[..., :r, :], r, S


def _init_(weight, fan_in):
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    nn.init.uniform_(weight, -bound, bound)


def conv_padding_attr(padding4, given):
    """The `padding` attribute nn.Conv2d would show.

    Args:
        padding4: the resolved zero padding, a (top, bottom, left, right) tuple of ints.
        given: the padding argument the layer was built with (a str "same" / "valid", an int or a tuple).

    Returns:
        The string it was given ("same" / "valid"), else (h, w) for symmetric padding, else the
            (top, bottom, left, right) tuple (no nn.Conv2d equivalent).
    """
    if isinstance(given, str):
        return given
    top, bottom, left, right = padding4
    return (top, left) if (top, left) == (bottom, right) else tuple(padding4)


def _dense_layer(layer, kind, where):
    """The nn.Conv2d / nn.Linear that the eligible `layer` of `kind` computes (trp.eligibility), else
    ValueError naming `where` and the reason."""
    adapter, _, why = eligibility.resolve(layer) if isinstance(layer, nn.Module) else (None, None, None)
    if adapter is None or adapter.kind != kind:
        want = {"conv": "an eligible conv (nn.Conv2d with zero padding, or a type with a conv adapter)",
                "linear": "an nn.Linear (or a type with a linear adapter)"}[kind]
        raise ValueError(f"{where} needs {want}, got {type(layer).__name__}" + (f": {why}" if why else ""))
    return eligibility.dense_equivalent(layer, adapter)


def _pad(x, padding4):
    """(x, padding for F.conv2d) for (top, bottom, left, right) zero padding: symmetric padding is left to
    the conv, asymmetric padding is applied here."""
    top, bottom, left, right = padding4
    if (top, left) == (bottom, right):
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), 0


class _FactorizedConv2d(nn.Module):
    """Base of the factorized convs: a drop-in for the nn.Conv2d it replaces (the attributes code reads on
    one - in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode - and
    batched [N, C, H, W] or unbatched [C, H, W] input).

    groups g > 1 replaces a grouped conv: each group's filters are their own matrix (trp.schemes), factorized
    at the shared `rank` into a grouped pair of convs (g * rank intermediate channels), exact. Grouped layers
    run as two F.conv2d calls (standard convs, also in ONNX); groups=1 runs the fused trp_kernels op."""
    scheme = None
    padding_mode = "zeros"

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 bias=True, device=None, dtype=None, groups=1):
        super().__init__()
        rank = rank_rules.check_rank(rank)
        self.in_channels, self.out_channels, self.rank = int(in_channels), int(out_channels), rank
        self.groups = checks.integer(groups, "groups", 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"groups={self.groups} must divide in_channels ({self.in_channels}) and "
                             f"out_channels ({self.out_channels})")
        self.kernel_size = geometry.pair(kernel_size, "kernel_size")
        self.stride, self.dilation = geometry.pair(stride, "stride"), geometry.pair(dilation, "dilation")
        # also "same" / "valid", as nn.Conv2d takes them; the ops get (top, bottom, left, right)
        self.padding4 = geometry.resolve_padding(padding, self.kernel_size, self.dilation, self.stride)
        self.padding = conv_padding_attr(self.padding4, padding)
        factory = {"device": device, "dtype": dtype}
        w1, w2 = self._factor_shapes()
        self.register_parameter(self._names[0], nn.Parameter(torch.empty(w1, **factory)))
        self.register_parameter(self._names[1], nn.Parameter(torch.empty(w2, **factory)))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """Re-initializes both factors and the bias uniformly in +-1/sqrt(fan_in), in place."""
        first, second = self.factors()
        _init_(first, first[0].numel())
        _init_(second, second[0].numel())
        if self.bias is not None:
            _init_(self.bias, second[0].numel())

    def factors(self):
        """The two weight Parameters, (first conv's, second conv's)."""
        return getattr(self, self._names[0]), getattr(self, self._names[1])

    def extra_repr(self):
        """The module's repr details: channels, kernel size, rank, stride, padding, dilation, groups, bias."""
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}{groups}, "
                f"bias={self.bias is not None}")

    def config(self):
        """Plain-data description (no tensors), enough to rebuild the module; used by trp.save."""
        return {"type": self.scheme, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "rank": self.rank, "stride": list(self.stride),
                "padding": list(self.padding4), "dilation": list(self.dilation),
                "bias": self.bias is not None, "groups": self.groups}

    @classmethod
    def from_config(cls, cfg, device=None, dtype=None):
        """A new module (freshly initialized parameters) from config()'s dict.

        Args:
            cfg: the dict config() returned (its "groups" may be absent: 1).
            device: the parameters' device; default None (torch's default).
            dtype: the parameters' dtype; default None (torch's default).

        Returns:
            A module of this class with cfg's geometry and rank.
        """
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), cfg["rank"],
                   tuple(cfg["stride"]), tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["bias"],
                   device=device, dtype=dtype, groups=cfg.get("groups", 1))

    @classmethod
    def from_conv(cls, conv, rank=None, *, energy=None, threshold=None):
        """The factorized equivalent of a conv layer at a rank given directly or chosen by energy / absolute
        singular-value threshold; exact when the weight's rank (every group's) <= rank.

        Args:
            conv: an eligible conv-kind layer (trp.eligibility: nn.Conv2d with zero padding, any groups, or a
                type with a conv adapter); the layer it computes in eval mode is factorized.
            rank: a fixed rank, an int >= 1 (capped by the matrix size); default None. Exactly one of rank,
                energy and threshold is given (trp.rank).
            energy: the fraction of the squared singular values to keep, a float in (0, 1]; default None.
            threshold: an absolute singular-value cutoff, a float >= 0 (values above it are kept); default None.

        Returns:
            A new module of this class on the conv's device and dtype (a grouped conv shares one rank across its
                groups: the largest any group needs).

        Raises:
            ValueError: `conv` is not an eligible conv, or a bad criterion.
        """
        conv = _dense_layer(conv, "conv", f"{cls.__name__}.from_conv")
        kind, value = rank_rules.check_criterion(energy, threshold, rank)
        A, B, r, _ = _svd_factors(to_matrix(conv.weight, cls.scheme, conv.groups), kind, value)
        w = conv.weight
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, r, conv.stride,
                     conv.padding, conv.dilation, conv.bias is not None, device=w.device, dtype=w.dtype,
                     groups=conv.groups)
        module.load_factors(A, B)
        if conv.bias is not None:
            with torch.no_grad():
                module.bias.copy_(conv.bias)
        return module

    def forward(self, x):
        """The factorized convolution of `x` (the two convs, with the bias).

        Args:
            x: input [N, in_channels, H, W], or unbatched [in_channels, H, W].

        Returns:
            [N, out_channels, H_out, W_out] (unbatched: without N), H_out and W_out as the dense conv's.

        Raises:
            ValueError: when x is neither 3-D nor 4-D.
        """
        conv = self._conv if self.groups == 1 else self._grouped_conv
        if x.dim() == 3:  # unbatched, as nn.Conv2d accepts it
            return conv(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected a 3-D (unbatched) or 4-D (batched) input, got "
                             f"shape {tuple(x.shape)}")
        return conv(x)

    def load_factors(self, A, B):
        """Sets the weights from M ~= A @ B, M the scheme's matrix of the dense weight (trp.schemes), in place.

        Args:
            A: the left factor [p, rank] (groups g > 1: [g, p, rank]; nd: [n, c, rank]).
            B: the right factor [rank, q] (groups g > 1: [g, rank, q]; nd: [n, rank, kh*kw]).
        """
        first, second = self.factors()
        w1, w2 = self._factors_from_matrices(A, B)
        with torch.no_grad():
            first.copy_(w1)
            second.copy_(w2)


class ChannelFactorizedConv2d(_FactorizedConv2d):
    """conv(kh x kw, in -> rank; stride, padding, dilation) then conv(1 x 1, rank -> out) with bias.

    The parameters are c_weight [g*rank, in/g, kh, kw] and p_weight [out, rank, 1, 1].

    Args:
        in_channels: input channels c, an int >= 1 divisible by groups.
        out_channels: output channels n, an int >= 1 divisible by groups.
        kernel_size: the dense kernel (kh, kw), an int or a pair of ints >= 1.
        rank: the number of intermediate channels (per group with groups), an int >= 1.
        stride: the dense conv's stride, an int or a pair of ints >= 1; default 1.
        padding: the dense conv's zero padding: an int, a pair (h, w), a (top, bottom, left, right) tuple, or
            "same" / "valid" as nn.Conv2d takes them; default 0.
        dilation: the dense conv's dilation, an int or a pair of ints >= 1; default 1.
        bias: whether the layer adds a bias [out_channels]; default True.
        device: the parameters' device; default None (torch's default).
        dtype: the parameters' dtype; default None (torch's default).
        groups: the dense conv's groups g, an int >= 1 that divides in_channels and out_channels; default 1.

    Raises:
        ValueError: when rank or groups is not an int >= 1, groups does not divide the channels, or the
            geometry (kernel_size, stride, padding, dilation) is invalid.
    """
    scheme = "channel"
    _names = ("c_weight", "p_weight")

    def _factor_shapes(self):
        kh, kw = self.kernel_size
        g = self.groups
        return (g * self.rank, self.in_channels // g, kh, kw), (self.out_channels, self.rank, 1, 1)

    def _factors_from_matrices(self, A, B):
        # M = W.reshape(n, c*kh*kw) ~= A B: B's rows are the rank-k filters, A mixes them per output (per
        # group with groups: A [g, n/g, r], B [g, r, c/g*kh*kw], stacked group after group).
        return B.reshape(self.c_weight.shape), A.reshape(self.p_weight.shape)

    def dense_weight(self):
        """The equivalent dense conv weight [out, in / groups, kh, kw]."""
        g = self.groups
        p = self.p_weight.reshape(g, self.out_channels // g, self.rank)
        return (p @ self.c_weight.reshape(g, self.rank, -1)).reshape(
            self.out_channels, self.in_channels // g, *self.kernel_size)

    def macs_per_output_pixel(self):
        """Multiply-accumulates of both convs per output pixel (all output channels): rank * (in*kh*kw + out).

        Returns:
            int.
        """
        kh, kw = self.kernel_size
        return self.rank * (self.in_channels * kh * kw + self.out_channels)

    def _conv(self, x):
        return trp_kernels.factorized_conv_channel(x, self.c_weight, self.p_weight, self.bias,
                                                   self.stride, self.padding4, self.dilation)

    def _grouped_conv(self, x):
        x, padding = _pad(x, self.padding4)
        y = F.conv2d(x, self.c_weight, None, self.stride, padding, self.dilation, self.groups)
        return F.conv2d(y, self.p_weight, self.bias, 1, 0, 1, self.groups)


class SpatialFactorizedConv2d(_FactorizedConv2d):
    """conv(kh x 1, in -> rank; vertical stride/padding/dilation) then conv(1 x kw, rank -> out;
    horizontal stride/padding/dilation) with bias.

    The parameters are v_weight [g*rank, in/g, kh, 1] and h_weight [out, rank, 1, kw].

    Args:
        in_channels: input channels c, an int >= 1 divisible by groups.
        out_channels: output channels n, an int >= 1 divisible by groups.
        kernel_size: the dense kernel (kh, kw), an int or a pair of ints >= 1.
        rank: the number of intermediate channels (per group with groups), an int >= 1.
        stride: the dense conv's stride, an int or a pair of ints >= 1; default 1.
        padding: the dense conv's zero padding: an int, a pair (h, w), a (top, bottom, left, right) tuple, or
            "same" / "valid" as nn.Conv2d takes them; default 0.
        dilation: the dense conv's dilation, an int or a pair of ints >= 1; default 1.
        bias: whether the layer adds a bias [out_channels]; default True.
        device: the parameters' device; default None (torch's default).
        dtype: the parameters' dtype; default None (torch's default).
        groups: the dense conv's groups g, an int >= 1 that divides in_channels and out_channels; default 1.

    Raises:
        ValueError: when rank or groups is not an int >= 1, groups does not divide the channels, or the
            geometry (kernel_size, stride, padding, dilation) is invalid.
    """
    scheme = "spatial"
    _names = ("v_weight", "h_weight")

    def _factor_shapes(self):
        kh, kw = self.kernel_size
        g = self.groups
        return (g * self.rank, self.in_channels // g, kh, 1), (self.out_channels, self.rank, 1, kw)

    def _factors_from_matrices(self, A, B):
        # M[(c, i), (n, j)] = W[n, c, i, j] ~= A B: A's columns are vertical filters, B's rows horizontal
        # (per group with groups: A [g, c/g*kh, r], B [g, r, n/g*kw]).
        kh, kw = self.kernel_size
        g, r = self.groups, self.rank
        v = A.transpose(-1, -2).reshape(g * r, self.in_channels // g, kh, 1)
        h = B.reshape(g, r, self.out_channels // g, kw).permute(0, 2, 1, 3).reshape(self.out_channels, r, 1, kw)
        return v, h

    def dense_weight(self):
        """The equivalent dense conv weight [out, in / groups, kh, kw]."""
        kh, kw = self.kernel_size
        g, r = self.groups, self.rank
        v = self.v_weight.reshape(g, r, self.in_channels // g, kh)
        h = self.h_weight.reshape(g, self.out_channels // g, r, kw)
        return torch.einsum("grci,gnrj->gncij", v, h).reshape(self.out_channels, self.in_channels // g, kh, kw)

    def macs_per_output_pixel(self):
        """Multiply-accumulates of both convs per output pixel (all output channels).

        Returns:
            int: rank * (in * kh * stride_w + out * kw).
        """
        # the kh x 1 conv runs at horizontal stride 1, so with a horizontal stride s it computes about s
        # intermediate pixels per output pixel
        kh, kw = self.kernel_size
        return self.rank * (self.in_channels * kh * self.stride[1] + self.out_channels * kw)

    def _conv(self, x):
        return trp_kernels.factorized_conv_spatial(x, self.v_weight, self.h_weight, self.bias,
                                                   self.stride, self.padding4, self.dilation)

    def _grouped_conv(self, x):
        # as the fused op: the kh x 1 conv at horizontal stride 1 without horizontal padding, then 1 x kw
        top, bottom, left, right = self.padding4
        (sh, sw), (dh, dw) = self.stride, self.dilation
        y = F.conv2d(F.pad(x, (0, 0, top, bottom)), self.v_weight, None, (sh, 1), 0, (dh, 1), self.groups)
        return F.conv2d(F.pad(y, (left, right, 0, 0)), self.h_weight, self.bias, (1, sw), 0, (1, dw), self.groups)


class DecoupledConv2d(_FactorizedConv2d):
    """Network decoupling, pointwise order: every filter W_i [c, kh*kw] ~= sum_j (s_ij^1/2 u_ij)(s_ij^1/2 v_ij)^T,
    i.e. rank parallel paths of a pointwise conv c -> 1 and a depthwise kh x kw conv. As two standard layers: a 1 x 1
    conv c -> n*rank (pw_weight [n*rank, c, 1, 1], no bias), then a kh x kw conv with groups=n (dw_weight
    [n, rank, kh, kw]; stride, padding, dilation of the dense conv, bias). Group i reads the channels
    i*rank .. i*rank+rank-1, so pointwise channel i*rank+j is path j of filter i.

    Args:
        in_channels: input channels c, an int >= 1 divisible by groups.
        out_channels: output channels n, an int >= 1 divisible by groups.
        kernel_size: the dense kernel (kh, kw), an int or a pair of ints >= 1.
        rank: the number of parallel paths per filter (out_channels * rank intermediate channels), an int >= 1.
        stride: the dense conv's stride, an int or a pair of ints >= 1; default 1.
        padding: the dense conv's zero padding: an int, a pair (h, w), a (top, bottom, left, right) tuple, or
            "same" / "valid" as nn.Conv2d takes them; default 0.
        dilation: the dense conv's dilation, an int or a pair of ints >= 1; default 1.
        bias: whether the layer adds a bias [out_channels]; default True.
        device: the parameters' device; default None (torch's default).
        dtype: the parameters' dtype; default None (torch's default).
        groups: the dense conv's groups g, an int >= 1 that divides in_channels and out_channels; default 1.

    Raises:
        ValueError: when rank or groups is not an int >= 1, groups does not divide the channels, or the
            geometry (kernel_size, stride, padding, dilation) is invalid.
    """
    scheme = "nd_pointwise"
    _names = ("pw_weight", "dw_weight")

    def _factor_shapes(self):
        return (self.out_channels * self.rank, self.in_channels // self.groups, 1, 1), (
            self.out_channels, self.rank, *self.kernel_size)

    def _factors_from_matrices(self, A, B):
        # A [n, c, r]: column j of filter i is pointwise channel i*r+j; B [n, r, kh*kw]: its depthwise taps.
        return A.transpose(1, 2).reshape(self.pw_weight.shape), B.reshape(self.dw_weight.shape)

    def dense_weight(self):
        """The equivalent dense conv weight [out, in / groups, kh, kw]."""
        n, r, c = self.out_channels, self.rank, self.in_channels // self.groups
        pw = self.pw_weight.reshape(n, r, c)
        return torch.einsum("nrc,nrt->nct", pw, self.dw_weight.flatten(2)).reshape(n, c, *self.kernel_size)

    def macs_per_output_pixel(self):
        """Multiply-accumulates of both convs per output pixel (all output channels).

        Returns:
            int: rank * out * (in / groups * stride_h * stride_w + kh * kw).
        """
        # the 1 x 1 conv runs at the input resolution: about stride_h * stride_w input pixels per output pixel
        kh, kw = self.kernel_size
        sh, sw = self.stride
        return self.rank * self.out_channels * (self.in_channels // self.groups * sh * sw + kh * kw)

    def _conv(self, x):
        return trp_kernels.decoupled_conv(x, self.pw_weight, self.dw_weight, self.bias, self.stride,
                                          self.padding4, self.dilation)

    def _grouped_conv(self, x):
        y = F.conv2d(x, self.pw_weight, None, 1, 0, 1, self.groups)  # filter i's paths read group i's inputs
        y, padding = _pad(y, self.padding4)
        return F.conv2d(y, self.dw_weight, self.bias, self.stride, padding, self.dilation, self.out_channels)


class DepthwiseDecoupledConv2d(_FactorizedConv2d):
    """Network decoupling, depthwise order: the filters' slices on input channel j, M_j [n/g, kh*kw] (over the
    n/g filters of j's group), are ~= sum_l (s_jl^1/2 u_jl)(s_jl^1/2 v_jl)^T: rank parallel paths of a depthwise
    kh x kw conv on channel j and a pointwise conv to the filters. As two standard layers: a depthwise kh x kw
    conv c -> c*rank (dw_weight [c*rank, 1, kh, kw], groups c; stride, padding, dilation of the dense conv, no
    bias), then a 1 x 1 conv c*rank -> n (pw_weight [n, c/g*rank, 1, 1], groups g, bias). Depthwise channel
    j*rank+l is path l of input channel j. Both convs run at the output resolution, so a strided layer pays
    here where the pointwise order (DecoupledConv2d) runs its 1 x 1 conv on every input pixel. Not grouped, the
    layer runs them as one op, trp_kernels.depthwise_decoupled_conv (a fused Triton kernel on CUDA).

    Args:
        in_channels: input channels c, an int >= 1 divisible by groups.
        out_channels: output channels n, an int >= 1 divisible by groups.
        kernel_size: the dense kernel (kh, kw), an int or a pair of ints >= 1.
        rank: the number of parallel paths per input channel (in_channels * rank intermediate channels), an
            int >= 1.
        stride: the dense conv's stride, an int or a pair of ints >= 1; default 1.
        padding: the dense conv's zero padding: an int, a pair (h, w), a (top, bottom, left, right) tuple, or
            "same" / "valid" as nn.Conv2d takes them; default 0.
        dilation: the dense conv's dilation, an int or a pair of ints >= 1; default 1.
        bias: whether the layer adds a bias [out_channels]; default True.
        device: the parameters' device; default None (torch's default).
        dtype: the parameters' dtype; default None (torch's default).
        groups: the dense conv's groups g, an int >= 1 that divides in_channels and out_channels; default 1.

    Raises:
        ValueError: when rank or groups is not an int >= 1, groups does not divide the channels, or the
            geometry (kernel_size, stride, padding, dilation) is invalid.
    """
    scheme = "nd_depthwise"
    _names = ("dw_weight", "pw_weight")

    def _factor_shapes(self):
        c, r = self.in_channels, self.rank
        return (c * r, 1, *self.kernel_size), (self.out_channels, c // self.groups * r, 1, 1)

    def _factors_from_matrices(self, A, B):
        # A [c, n/g, r]: filter i of channel j's group, path l -> pw_weight[i, (j mod c/g)*r + l];
        # B [c, r, kh*kw]: path l's taps -> dw_weight[j*r + l]
        g, (c, m, r) = self.groups, A.shape
        pw = A.reshape(g, c // g, m, r).permute(0, 2, 1, 3).reshape(self.pw_weight.shape)
        return B.reshape(self.dw_weight.shape), pw

    def dense_weight(self):
        """The equivalent dense conv weight [out, in / groups, kh, kw]."""
        g, c, r, n = self.groups, self.in_channels, self.rank, self.out_channels
        pw = self.pw_weight.reshape(g, n // g, c // g, r)
        dw = self.dw_weight.reshape(g, c // g, r, -1)
        return torch.einsum("gmcr,gcrt->gmct", pw, dw).reshape(n, c // g, *self.kernel_size)

    def macs_per_output_pixel(self):
        """Multiply-accumulates of both convs per output pixel (all output channels).

        Returns:
            int: rank * in * (kh * kw + out / groups).
        """
        kh, kw = self.kernel_size
        return self.rank * self.in_channels * (kh * kw + self.out_channels // self.groups)

    def _conv(self, x):
        return trp_kernels.depthwise_decoupled_conv(x, self.dw_weight, self.pw_weight, self.bias, self.stride,
                                                    self.padding4, self.dilation)

    def _grouped_conv(self, x):  # the 1 x 1 conv is grouped: two convolutions
        x, padding = _pad(x, self.padding4)
        y = F.conv2d(x, self.dw_weight, None, self.stride, padding, self.dilation, self.in_channels)
        return F.conv2d(y, self.pw_weight, self.bias, 1, 0, 1, self.groups)


class FactorizedWeight:
    """What FactorizedLinear.weight returns, for host modules that read their Linear's weight instead of
    calling it (torchvision's Swin attention: F.linear(x, qkv.weight, qkv.bias)). F.linear(x, w, bias)
    computes through the two factors (with the bias the host passes); any other torch function gets the
    dense product in its place. Being a tensor-like (__torch_function__), it also turns torch's fused
    fast paths off (they require plain tensors) instead of breaking them.

    Args:
        layer: the FactorizedLinear whose weight this stands for.
    """

    def __init__(self, layer):
        self.layer = layer

    @property
    def shape(self):
        """The dense weight's shape, torch.Size([out_features, in_features])."""
        return torch.Size((self.layer.out_features, self.layer.in_features))

    dtype = property(lambda self: self.layer.first.weight.dtype)
    device = property(lambda self: self.layer.first.weight.device)

    def dense(self):
        """The dense weight [out_features, in_features], the product of the layer's factors."""
        return self.layer.dense_weight()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            names = ("input", "weight", "bias")
            x, w, bias = (args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names))
            if isinstance(w, cls) and not isinstance(x, cls) and not isinstance(bias, cls):
                return F.linear(F.linear(x, w.layer.first.weight), w.layer.second.weight, bias)
        unwrap = lambda a: a.dense() if isinstance(a, cls) else a  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class FactorizedLinear(nn.Module):
    """Linear(in -> rank, no bias) then Linear(rank -> out, bias). .weight is a FactorizedWeight (for
    hosts that read it), not a Parameter: the parameters are first.weight [rank, in] and second.weight
    [out, rank] (and second.bias).

    Args:
        in_features: input features, an int >= 1.
        out_features: output features, an int >= 1.
        rank: the inner dimension, an int >= 1.
        bias: whether the layer adds a bias [out_features]; default True.
        device: the parameters' device; default None (torch's default).
        dtype: the parameters' dtype; default None (torch's default).

    Raises:
        ValueError: when rank is not an int >= 1.
    """
    scheme = "linear"

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        rank = rank_rules.check_rank(rank)
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self):
        """The bias Parameter [out_features] (second.bias), or None."""
        return self.second.bias

    @property
    def weight(self):
        """A FactorizedWeight standing for the dense weight [out_features, in_features] (not a Parameter)."""
        return FactorizedWeight(self)

    def extra_repr(self):
        """The module's repr details: in_features, out_features and rank."""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def config(self):
        """Plain-data description (no tensors), enough to rebuild the module; used by trp.save."""
        return {"type": "linear", "in_features": self.in_features, "out_features": self.out_features,
                "rank": self.rank, "bias": self.second.bias is not None}

    @classmethod
    def from_config(cls, cfg, device=None, dtype=None):
        """A new module (freshly initialized parameters) from config()'s dict.

        Args:
            cfg: the dict config() returned.
            device: the parameters' device; default None (torch's default).
            dtype: the parameters' dtype; default None (torch's default).

        Returns:
            FactorizedLinear with cfg's sizes and rank.
        """
        return cls(cfg["in_features"], cfg["out_features"], cfg["rank"], cfg["bias"], device=device,
                   dtype=dtype)

    @classmethod
    def from_linear(cls, linear, rank=None, *, energy=None, threshold=None):
        """The factorized equivalent of a Linear-like layer at a rank given directly or chosen by energy /
        absolute singular-value threshold; exact when the weight's rank <= rank.

        Args:
            linear: an eligible linear-kind layer (trp.eligibility: nn.Linear, transformers' Conv1D, a
                parametrized Linear, a type with a linear adapter); the layer it computes in eval mode.
            rank: a fixed rank, an int >= 1 (capped by the matrix size); default None. Exactly one of rank,
                energy and threshold is given (trp.rank).
            energy: the fraction of the squared singular values to keep, a float in (0, 1]; default None.
            threshold: an absolute singular-value cutoff, a float >= 0 (values above it are kept); default None.

        Returns:
            A new FactorizedLinear on the layer's device and dtype.

        Raises:
            ValueError: `linear` is not an eligible Linear-like layer, or a bad criterion.
        """
        linear = _dense_layer(linear, "linear", "FactorizedLinear.from_linear")
        kind, value = rank_rules.check_criterion(energy, threshold, rank)
        A, B, r, _ = _svd_factors(linear.weight, kind, value)
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, r, linear.bias is not None,
                     device=w.device, dtype=w.dtype)
        module.load_factors(A, B)
        if linear.bias is not None:
            with torch.no_grad():
                module.second.bias.copy_(linear.bias)
        return module

    def load_factors(self, A, B):
        """Sets the weights from W ~= A @ B, in place.

        Args:
            A: the left factor [out_features, rank] (becomes second.weight).
            B: the right factor [rank, in_features] (becomes first.weight).
        """
        with torch.no_grad():
            self.first.weight.copy_(B)
            self.second.weight.copy_(A)

    def dense_weight(self):
        """The equivalent dense weight [out_features, in_features] = second.weight @ first.weight."""
        return self.second.weight @ self.first.weight

    def macs_per_output_pixel(self):
        """Multiply-accumulates of both Linears per output vector (per token or pixel): rank * (in + out).

        Returns:
            int.
        """
        return self.rank * (self.in_features + self.out_features)

    def forward(self, x):
        """second(first(x)).

        Args:
            x: input [..., in_features].

        Returns:
            [..., out_features].
        """
        return self.second(self.first(x))


# a layer scheme (trp.core.schemes.LAYER_SCHEMES, or "linear") -> its module type; also the "type" of a saved
# layer's config, where "nd" is the pointwise order's name in files written before the two orders existed
FACTORIZED = {"channel": ChannelFactorizedConv2d, "spatial": SpatialFactorizedConv2d,
              "nd_pointwise": DecoupledConv2d, "nd_depthwise": DepthwiseDecoupledConv2d, "linear": FactorizedLinear,
              "nd": DecoupledConv2d}
FACTORIZED_TYPES = tuple(dict.fromkeys(FACTORIZED.values()))

__all__ = ["ChannelFactorizedConv2d", "SpatialFactorizedConv2d", "DecoupledConv2d", "DepthwiseDecoupledConv2d",
           "FactorizedLinear", "conv_padding4", "FactorizedWeight", "FACTORIZED", "FACTORIZED_TYPES"]
