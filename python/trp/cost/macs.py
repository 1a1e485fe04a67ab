"""What one layer costs in multiply-adds, and the one rule for when factorizing it pays.

A factorized layer's MACs are linear in its rank (macs_per_output_pixel of the module at rank r is r times
that at rank 1), so factorizing pays exactly below pay_rank: decompose keeps a layer dense at or above it,
latency fitting refuses rank rounding that reaches it, and the budget's cost model counts such a layer as
dense."""
import torch.nn as nn

from trp.core import eligibility
from trp.nn.modules import ChannelFactorizedConv2d, DecoupledConv2d, DepthwiseDecoupledConv2d


def input_shape(input_size):
    """`input_size` as a 4-d shape tuple (N = 1 if absent).

    Args:
        input_size: (C, H, W) or (N, C, H, W), positive ints.

    Returns:
        (N, C, H, W), a tuple of ints.

    Raises:
        ValueError: when input_size has another length or a size below 1.
    """
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_size must be (C, H, W) or (N, C, H, W) with positive sizes, got {input_size}")
    return shape



def dense_macs_per_output_pixel(module):
    """Multiply-adds per output pixel (per token for a Linear) of a dense nn.Conv2d / nn.Linear.

    Args:
        module: the dense nn.Conv2d or nn.Linear.

    Returns:
        The multiply-adds, an int.
    """
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    kh, kw = module.kernel_size
    return module.out_channels * module.in_channels * kh * kw // module.groups


def macs_per_output_pixel(module):
    """Multiply-adds per output pixel (per token) of a factorized module or a dense Conv2d / Linear.

    Args:
        module: a factorized module (one with a macs_per_output_pixel() method), nn.Conv2d or nn.Linear.

    Returns:
        The multiply-adds, an int.
    """
    if hasattr(module, "macs_per_output_pixel"):
        return module.macs_per_output_pixel()
    return dense_macs_per_output_pixel(module)


def pays(factorized, dense_macs):
    """Whether the factorized module costs fewer multiply-adds per output pixel than `dense_macs`, the
    dense_macs_per_output_pixel of the layer it replaces.

    Args:
        factorized: the factorized module.
        dense_macs: the dense layer's multiply-adds per output pixel, an int.

    Returns:
        True when factorizing saves multiply-adds.
    """
    return factorized.macs_per_output_pixel() < dense_macs


def pay_rank(one, dense):
    """The largest rank at which factorizing `dense` pays, given `one`, its factorized form at rank 1
    (0: never): r * one's MACs per output pixel < dense's.

    Args:
        one: the factorized form of `dense` at rank 1.
        dense: the dense nn.Conv2d or nn.Linear.

    Returns:
        The rank, an int >= 0.
    """
    return -(-dense_macs_per_output_pixel(dense) // one.macs_per_output_pixel()) - 1  # the inverse of pays


def conv_macs(module, x, y):
    """Multiply-adds of one call of a conv-kind layer, from its input and output.

    Args:
        module: an nn.Conv2d, a conv-kind layer with an adapter, or a factorized conv.
        x: the call's input tensor (or a meta tensor of its shape), [N, C, H, W].
        y: the call's output tensor (or a meta tensor of its shape), [N, M, OH, OW].

    Returns:
        The multiply-adds, an int.
    """
    n = x.shape[0]
    if isinstance(module, nn.Conv2d) or eligibility.kind_of(module) == "conv":
        kh, kw = module.kernel_size
        return n * y.shape[1] * y.shape[2] * y.shape[3] * (module.in_channels // module.groups) * kh * kw
    kh, kw = module.kernel_size
    oh, ow = y.shape[2], y.shape[3]
    r, c, m = module.rank, module.in_channels, module.out_channels
    if isinstance(module, ChannelFactorizedConv2d):  # with groups g too: g*r filters over c/g channels each
        return n * oh * ow * r * (c * kh * kw + m)
    if isinstance(module, DepthwiseDecoupledConv2d):  # both convs at the output resolution
        return n * oh * ow * r * c * (kh * kw + m // module.groups)
    if isinstance(module, DecoupledConv2d):
        # the 1 x 1 conv c/g -> m*r runs at the input resolution, the grouped kh x kw conv at the output's
        return n * (x.shape[2] * x.shape[3] * c // module.groups * m * r + oh * ow * m * r * kh * kw)
    # spatial: the kh x 1 conv runs at horizontal stride 1 without horizontal padding, so its output is
    # oh x (input width); the 1 x kw conv then makes oh x ow
    return n * (oh * x.shape[3] * r * c * kh + oh * ow * m * r * kw)


__all__ = ["input_shape", "dense_macs_per_output_pixel", "macs_per_output_pixel", "pays", "pay_rank",
           "conv_macs"]
