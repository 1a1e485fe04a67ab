"""ONNX lowering of the factorized convolutions: each op exports as the standard convolutions it equals.

Two routes, both giving plain ONNX Conv (and, for asymmetric "same" padding, Pad) nodes that any runtime
runs:
- Tracing a model (torch.onnx.export with dynamo=True or the TorchScript-based exporter): while an export
  is in progress the public ops (trp_kernels.factorized_conv_channel, ...) call their PyTorch reference,
  i.e. the two conv2d calls, instead of the custom op, so no exporter ever sees trp_kernels ops and the
  batch axis stays symbolic (no shape is baked in).
- A graph that already holds the custom ops (an ExportedProgram made by torch.export.export before ONNX
  was involved): `custom_translation_table()` maps each op to an onnxscript function for
  torch.onnx.export(..., dynamo=True, custom_translation_table=...).
"""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import Tensor

from . import reference

_OPSET = 18


def exporting() -> bool:
    """Whether torch.onnx.export is tracing a model right now (either exporter).

    Returns:
        True while an export is in progress.
    """
    return torch.onnx.is_in_onnx_export()


def lowered(kind: str, x: Tensor, w1: Tensor, w2: Tensor, bias: Optional[Tensor], stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """A factorized convolution as the two convolutions it equals (trp_kernels.reference), for the exporters.

    Args:
        kind: "channel", "spatial", "decoupled" or "depthwise_decoupled".
        x: input [N, c, H, W].
        w1: the first weight (c_weight, v_weight or pw_weight of the op).
        w2: the second weight (p_weight, h_weight or dw_weight of the op).
        bias: None, or the output bias [n].
        stride: (vertical, horizontal) stride, ints >= 1.
        padding: (top, bottom, left, right) zero padding, ints >= 0.
        dilation: (vertical, horizontal) dilation, ints >= 1.

    Returns:
        The output [N, n, OH, OW] in x's dtype.
    """
    return getattr(reference, f"factorized_conv_{kind}")(x, w1, w2, bias, stride, padding, dilation)


def _pads(top, bottom, left, right):
    return [top, left, bottom, right]  # ONNX order: all begins, then all ends


def custom_translation_table() -> dict[object, Callable]:
    """ONNX translations of the four trp_kernels conv ops, for torch.onnx.export(..., custom_translation_table=...).

    Returns:
        A dict {torch op overload: onnxscript function} for factorized_conv_channel, factorized_conv_spatial,
            decoupled_conv and depthwise_decoupled_conv, each giving standard Conv nodes (opset 18).

    Raises:
        ImportError: onnxscript is not installed.
    """
    import onnxscript
    op = getattr(onnxscript, f"opset{_OPSET}")

    def conv(x, w, bias, stride, pads, dilation, group=1):
        args = (x, w) if bias is None else (x, w, bias)
        return op.Conv(*args, strides=list(stride), pads=list(pads), dilations=list(dilation), group=group)

    def channel(x, c_weight, p_weight, bias, stride, padding, dilation):
        y = conv(x, c_weight, None, stride, _pads(*padding), dilation)
        return conv(y, p_weight, bias, (1, 1), (0, 0, 0, 0), (1, 1))

    def spatial(x, v_weight, h_weight, bias, stride, padding, dilation):
        top, bottom, left, right = padding
        y = conv(x, v_weight, None, (stride[0], 1), _pads(top, bottom, 0, 0), (dilation[0], 1))
        return conv(y, h_weight, bias, (1, stride[1]), _pads(0, 0, left, right), (1, dilation[1]))

    def decoupled(x, pw_weight, dw_weight, bias, stride, padding, dilation):
        # dw_weight [n, r, kh, kw] is a grouped conv weight with groups = n, read from its static shape
        y = conv(x, pw_weight, None, (1, 1), (0, 0, 0, 0), (1, 1))
        return conv(y, dw_weight, bias, stride, _pads(*padding), dilation, group=_static_dim(dw_weight, 0))

    def depthwise_decoupled(x, dw_weight, pw_weight, bias, stride, padding, dilation):
        # dw_weight [c*r, 1, kh, kw] is a depthwise conv weight with groups = c, read from x's static shape
        y = conv(x, dw_weight, None, stride, _pads(*padding), dilation,
                 group=_static_dim(x, 1, "depthwise_decoupled_conv", "x"))
        return conv(y, pw_weight, bias, (1, 1), (0, 0, 0, 0), (1, 1))

    ops = torch.ops.trp_kernels
    return {ops.factorized_conv_channel.default: channel, ops.factorized_conv_spatial.default: spatial,
            ops.decoupled_conv.default: decoupled, ops.depthwise_decoupled_conv.default: depthwise_decoupled}


def _static_dim(value, axis, op="decoupled_conv", name="dw_weight"):
    shape = getattr(value, "shape", None)
    dim = shape[axis] if shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"{op}: ONNX lowering needs the static shape of {name}")
    return dim


__all__ = ["exporting", "lowered", "custom_translation_table"]
