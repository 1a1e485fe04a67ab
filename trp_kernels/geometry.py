"""Convolution geometry, in one place: argument normalisation (int / pair / 4-tuple padding, "same"),
output size, and the output memory format of the factorized convolutions. Used by the public ops
(trp_kernels.conv), their Triton kernels and trp's factorized modules, so all of them accept, reject and
compute the same things."""
from collections.abc import Sequence
from typing import Union

import torch
from torch._prims_common import suggest_memory_format

IntPair = Union[int, Sequence[int]]            # an int, or a (vertical, horizontal) pair: stride, dilation
Padding = Union[int, Sequence[int], str]       # int, (h, w), (top, bottom, left, right), "same" or "valid"


def pair(v, name):
    """int -> (v, v); a 1- or 2-sequence -> a pair of ints. ValueError (naming the argument) otherwise."""
    if isinstance(v, int):
        return (v, v)
    try:
        p = tuple(int(i) for i in v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(p) == 1:
        return p * 2
    if len(p) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return p


def padding4(padding):
    """Zero padding as (top, bottom, left, right): an int pads every side, (h, w) pads symmetrically,
    a 4-tuple is taken as given. ValueError for other lengths and for negative values."""
    if isinstance(padding, str):
        raise ValueError(f"padding {padding!r} needs the kernel size: use resolve_padding")
    if isinstance(padding, int):
        p = (padding,) * 4
    else:
        try:
            p = tuple(int(i) for i in padding)
        except TypeError:
            raise ValueError(f"padding must be an int, (h, w) or (top, bottom, left, right), got {padding!r}") \
                from None
        if len(p) == 2:
            p = (p[0], p[0], p[1], p[1])
        elif len(p) != 4:
            raise ValueError(f"padding must be an int, (h, w) or (top, bottom, left, right), got {padding!r}")
    if min(p) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return p


def same_padding4(mode, kernel_size, dilation):
    """(top, bottom, left, right) of nn.Conv2d's padding="valid" / "same" (stride 1). For an even
    extent "same" is asymmetric: the extra row/column goes to the bottom/right, as in PyTorch."""
    if mode == "valid":
        return (0, 0, 0, 0)
    if mode != "same":
        raise ValueError(f"padding string must be 'same' or 'valid', got {mode!r}")
    pads = []
    for k, d in zip(pair(kernel_size, "kernel_size"), pair(dilation, "dilation")):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def resolve_padding(padding, kernel_size, dilation, stride=1):
    """Any padding nn.Conv2d takes ("same", "valid", int, (h, w)) or a 4-tuple, as (top, bottom, left,
    right)."""
    if isinstance(padding, str):
        if padding == "same" and pair(stride, "stride") != (1, 1):
            raise ValueError("padding='same' needs stride 1, as in nn.Conv2d")
        return same_padding4(padding, kernel_size, dilation)
    return padding4(padding)


def out_size(size, k, stride, pad_lo, pad_hi, dilation):
    """Output extent of one conv dimension (may be <= 0 for an input smaller than the dilated kernel)."""
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def kernel_hw(kind, w1_shape, w2_shape):
    """(kh, kw) of the dense conv a factorized pair replaces: channel [r, c, kh, kw] + [n, r, 1, 1],
    spatial [r, c, kh, 1] + [n, r, 1, kw], decoupled [n*r, c, 1, 1] + [n, r, kh, kw]."""
    if kind == "decoupled":
        return (w2_shape[2], w2_shape[3])
    return (w1_shape[2], w1_shape[3] if kind == "channel" else w2_shape[3])


def out_hw(kind, x_shape, w1_shape, w2_shape, stride, padding, dilation):
    """(OH, OW) of factorized_conv_<kind>; stride/dilation pairs, padding (top, bottom, left, right)."""
    kh, kw = kernel_hw(kind, w1_shape, w2_shape)
    return (out_size(x_shape[2], kh, stride[0], padding[0], padding[1], dilation[0]),
            out_size(x_shape[3], kw, stride[1], padding[2], padding[3], dilation[1]))


def out_shape(kind, x, w1, w2, stride, padding, dilation):
    return (x.shape[0], w2.shape[0], *out_hw(kind, x.shape, w1.shape, w2.shape, stride, padding, dilation))


def output_memory_format(x, w1, w2):
    """Memory format of a factorized conv's output: what its two conv2d calls give, i.e. channels_last
    when the input or a weight has channels_last-like strides (conv2d's rule on CPU and CUDA; the
    first conv's channels_last output carries over to the second), else contiguous. The fake kernels, the
    Triton output and the two-conv path all follow it, so compiled graphs see the strides eager returns."""
    if any(suggest_memory_format(t) == torch.channels_last for t in (x, w1, w2)):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(kind, x, w1, w2, stride, padding, dilation):
    """The uninitialised output of factorized_conv_<kind> (shape, dtype, device, memory format)."""
    return torch.empty(out_shape(kind, x, w1, w2, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x, w1, w2))
