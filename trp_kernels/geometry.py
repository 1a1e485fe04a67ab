"""Convolution geometry, in one place: argument normalisation (int / pair / 4-tuple padding, "same"),
output size, and the output memory format of the factorized convolutions. Used by the public ops
(trp_kernels.conv), their Triton kernels and trp's factorized modules, so all of them accept, reject and
compute the same things."""
from collections.abc import Sequence

import torch
from torch._prims_common import suggest_memory_format

IntPair = int | Sequence[int]           # an int, or a (vertical, horizontal) pair: stride, dilation
Padding = int | Sequence[int] | str      # int, (h, w), (top, bottom, left, right), "same" or "valid"


def pair(v: IntPair, name: str) -> tuple[int, int]:
    """An int or a 1- or 2-sequence of ints as a pair of ints.

    Args:
        v: an int (used twice), or a sequence of one or two ints.
        name: how the error message names the argument.

    Returns:
        The pair (vertical, horizontal).

    Raises:
        ValueError: v is neither an int nor a sequence of one or two ints.
    """
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


def padding4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Zero padding as (top, bottom, left, right).

    Args:
        padding: an int (every side), an (h, w) pair (symmetric) or a (top, bottom, left, right) 4-tuple, all
            values >= 0.

    Returns:
        The 4-tuple (top, bottom, left, right).

    Raises:
        ValueError: padding is a string (see resolve_padding), has another length, or holds a negative value.
    """
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


def same_padding4(mode: str, kernel_size: IntPair, dilation: IntPair) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of nn.Conv2d's padding="valid" or "same" (stride 1).

    For an even extent "same" is asymmetric: the extra row/column goes to the bottom/right, as in PyTorch.

    Args:
        mode: "same" or "valid".
        kernel_size: the kernel's (kh, kw), or one int for both.
        dilation: the (vertical, horizontal) dilation, or one int for both.

    Returns:
        The 4-tuple (top, bottom, left, right).

    Raises:
        ValueError: mode is neither "same" nor "valid".
    """
    if mode == "valid":
        return (0, 0, 0, 0)
    if mode != "same":
        raise ValueError(f"padding string must be 'same' or 'valid', got {mode!r}")
    pads = []
    for k, d in zip(pair(kernel_size, "kernel_size"), pair(dilation, "dilation")):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def resolve_padding(padding: Padding, kernel_size: IntPair, dilation: IntPair,
                    stride: IntPair = 1) -> tuple[int, int, int, int]:
    """Any padding nn.Conv2d takes ("same", "valid", int, (h, w)), or a 4-tuple, as (top, bottom, left, right).

    Args:
        padding: "same", "valid", an int, an (h, w) pair or a (top, bottom, left, right) 4-tuple.
        kernel_size: the kernel's (kh, kw), or one int for both (for "same").
        dilation: the (vertical, horizontal) dilation, or one int for both (for "same").
        stride: the (vertical, horizontal) stride, or one int for both; "same" needs 1.

    Returns:
        The 4-tuple (top, bottom, left, right).

    Raises:
        ValueError: padding is malformed or negative, or "same" comes with a stride other than 1.
    """
    if isinstance(padding, str):
        if padding == "same" and pair(stride, "stride") != (1, 1):
            raise ValueError("padding='same' needs stride 1, as in nn.Conv2d")
        return same_padding4(padding, kernel_size, dilation)
    return padding4(padding)


def out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    """Output extent of one convolution dimension.

    Args:
        size: the input extent.
        k: the kernel extent.
        stride: the stride, >= 1.
        pad_lo: zero padding before the input (top or left).
        pad_hi: zero padding after the input (bottom or right).
        dilation: the dilation, >= 1.

    Returns:
        The output extent (<= 0 for an input smaller than the dilated kernel).
    """
    return (size + pad_lo + pad_hi - dilation * (k - 1) - 1) // stride + 1


def kernel_hw(kind: str, w1_shape: Sequence[int], w2_shape: Sequence[int]) -> tuple[int, int]:
    """(kh, kw) of the dense convolution a factorized pair of weights replaces.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        w1_shape: the first weight's shape: channel [r, c, kh, kw], spatial [r, c, kh, 1], decoupled
            [n*r, c, 1, 1], depthwise_decoupled [c*r, 1, kh, kw].
        w2_shape: the second weight's shape: channel [n, r, 1, 1], spatial [n, r, 1, kw], decoupled
            [n, r, kh, kw], depthwise_decoupled [n, c*r, 1, 1].

    Returns:
        The pair (kh, kw).
    """
    if kind == "decoupled":
        return (w2_shape[2], w2_shape[3])
    return (w1_shape[2], w2_shape[3] if kind == "spatial" else w1_shape[3])


def out_hw(kind: str, x_shape: Sequence[int], w1_shape: Sequence[int], w2_shape: Sequence[int],
           stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(OH, OW) of a factorized convolution.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x_shape: the input's shape [N, c, H, W].
        w1_shape: the first weight's shape (see kernel_hw).
        w2_shape: the second weight's shape (see kernel_hw).
        stride: (vertical, horizontal) stride.
        padding: (top, bottom, left, right) zero padding.
        dilation: (vertical, horizontal) dilation.

    Returns:
        The pair (OH, OW); an entry <= 0 when the input is smaller than the dilated kernel.
    """
    kh, kw = kernel_hw(kind, w1_shape, w2_shape)
    return (out_size(x_shape[2], kh, stride[0], padding[0], padding[1], dilation[0]),
            out_size(x_shape[3], kw, stride[1], padding[2], padding[3], dilation[1]))


def out_shape(kind: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """Output shape [N, n, OH, OW] of a factorized convolution.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x: the input [N, c, H, W].
        w1: the first weight (see kernel_hw).
        w2: the second weight [n, ...].
        stride: (vertical, horizontal) stride.
        padding: (top, bottom, left, right) zero padding.
        dilation: (vertical, horizontal) dilation.

    Returns:
        The shape (N, n, OH, OW).
    """
    return (x.shape[0], w2.shape[0], *out_hw(kind, x.shape, w1.shape, w2.shape, stride, padding, dilation))


def output_memory_format(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.memory_format:
    """Memory format of a factorized convolution's output: what its two conv2d calls give.

    That is channels_last when the input or a weight has channels_last-like strides (conv2d's rule on CPU and
    CUDA; the first conv's channels_last output carries over to the second), else contiguous. The fake kernels,
    the Triton output and the two-conv path all follow it, so compiled graphs see the strides eager returns.

    Args:
        x: the input [N, c, H, W].
        w1: the first weight.
        w2: the second weight.

    Returns:
        torch.channels_last or torch.contiguous_format.
    """
    if any(suggest_memory_format(t) == torch.channels_last for t in (x, w1, w2)):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(kind: str, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """The uninitialised output of a factorized convolution (shape, dtype, device, memory format).

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x: the input [N, c, H, W].
        w1: the first weight (see kernel_hw).
        w2: the second weight [n, ...].
        stride: (vertical, horizontal) stride.
        padding: (top, bottom, left, right) zero padding.
        dilation: (vertical, horizontal) dilation.

    Returns:
        An empty tensor [N, n, OH, OW] in x's dtype and device, in output_memory_format(x, w1, w2).
    """
    return torch.empty(out_shape(kind, x, w1, w2, stride, padding, dilation), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x, w1, w2))
