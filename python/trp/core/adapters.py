"""Layer adapters: how TRP reads, projects and decomposes a type of layer (the protocol and the built-ins).

TRP reproduces exactly two computations: nn.Conv2d's (zero padding) and nn.Linear's. An adapter says that
a layer type computes one of them, up to the layout of its stored weight, and how to get at it:

- `kind`: "conv" (the layer computes what an nn.Conv2d does) or "linear" (what an nn.Linear does);
- `forward_attrs`: the methods whose code is the computation: a subclass that overrides one of them
  computes something else, and the adapter does not apply to it (trp.eligibility checks the class);
- `unsupported(module)`: why this layer cannot be reproduced exactly (None when it can);
- `layout(stored)`: a view of the stored weight (the parameter, or its .grad) in nn.Linear's [out, in] or
  nn.Conv2d's [out, in / groups, kh, kw] layout: the pruner reads, writes in place and regularizes through
  it, so it must be a view (a transpose, a reshape of a contiguous tensor), never a copy;
- `dense(module, weight)`: a new nn.Linear / nn.Conv2d (zero padding) that computes exactly what `module`
  computes with the stored weight `weight` (the effective one: trp.eligibility evaluates parametrized
  weights), used by decomposition.

The built-ins: nn.Conv2d and nn.Linear themselves (any subclass that overrides neither forward nor
_conv_forward), Hugging Face transformers' Conv1D (GPT-2's transposed Linear) and timm's Conv2dSame (its
TensorFlow "same" padding made explicit where it does not depend on the input size). The optional
libraries are named by class path, so that trp never imports them. Users register their own with
trp.register_layer_adapter (trp.eligibility)."""
import torch
import torch.nn as nn

KINDS = ("conv", "linear")


class LayerAdapter:
    """Base of the adapters (see the module doc). Subclass it, set `kind` (and `forward_attrs` if the
    computation lives in more methods than forward), implement `dense` (and `layout` when the stored weight
    is not in nn.Linear / nn.Conv2d layout), then register an instance with trp.register_layer_adapter."""

    kind = None
    forward_attrs = ("forward",)

    def unsupported(self, module):
        """Why `module` cannot be reproduced exactly by an nn.Linear / nn.Conv2d (a short phrase), or None.

        Args:
            module: a layer of the adapted type.

        Returns:
            str or None.
        """
        return None

    def layout(self, stored):
        """The stored weight (or its gradient) as a view in nn.Linear / nn.Conv2d layout (default: itself).

        Args:
            stored: a tensor of the stored weight's shape.

        Returns:
            A view of `stored`.
        """
        return stored

    def groups(self, module):
        """Groups of a conv-kind layer (its filters split into this many independent matrices); 1 for
        linear-kind layers.

        Args:
            module: a layer of the adapted type (its `groups` attribute is read for conv-kind adapters;
                absent means 1).

        Returns:
            int >= 1.
        """
        return int(getattr(module, "groups", 1)) if self.kind == "conv" else 1

    def dense(self, module, weight):
        """A new nn.Linear or nn.Conv2d (padding_mode "zeros") equal to `module` with stored weight `weight`.

        Args:
            module: the layer (its other attributes: bias, stride, ...).
            weight: the effective stored weight (same shape as the stored one; not to be modified).

        Returns:
            nn.Linear or nn.Conv2d on the weight's device and dtype.
        """
        raise NotImplementedError


def _copy_into(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def conv_like(module, weight, padding):
    """A new nn.Conv2d with the geometry of `module` (a conv-kind layer), `padding`, weight and bias copied.

    Args:
        module: the conv-kind layer whose in/out channels, kernel size, stride, dilation, groups and bias are
            used.
        weight: the weight to copy, a tensor [out, in / groups, kh, kw] (detached; it sets the new layer's
            device and dtype).
        padding: nn.Conv2d's padding argument (an int, a pair of ints, or "same" / "valid").

    Returns:
        nn.Conv2d with padding_mode "zeros", holding copies of weight and module's bias.
    """
    bias = module.bias.detach() if module.bias is not None else None
    conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                     module.dilation, module.groups, bias is not None, device=weight.device, dtype=weight.dtype)
    return _copy_into(conv, weight.detach(), bias)


class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d with zero padding."""
    kind = "conv"
    forward_attrs = ("forward", "_conv_forward")

    def unsupported(self, module):
        """Why `module` cannot be reproduced exactly: a padding mode other than zeros; else None.

        Args:
            module: an nn.Conv2d.

        Returns:
            str or None.
        """
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding factorizes exactly)"
        return None

    def dense(self, module, weight):
        """A new nn.Conv2d equal to `module` with stored weight `weight` (and module's padding).

        Args:
            module: the nn.Conv2d (its geometry, padding and bias).
            weight: the effective weight [out, in / groups, kh, kw] (not modified).

        Returns:
            nn.Conv2d on the weight's device and dtype.
        """
        return conv_like(module, weight, module.padding)


class LinearAdapter(LayerAdapter):
    """nn.Linear."""
    kind = "linear"

    def dense(self, module, weight):
        """A new nn.Linear equal to `module` with stored weight `weight`.

        Args:
            module: the linear-kind layer (its bias, if any, is copied).
            weight: the effective weight [out, in] (not modified).

        Returns:
            nn.Linear on the weight's device and dtype.
        """
        bias = module.bias.detach() if module.bias is not None else None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device,
                           dtype=weight.dtype)
        return _copy_into(linear, weight.detach(), bias)


class TransposedLinearAdapter(LinearAdapter):
    """A Linear whose weight is stored transposed, [in, out], with a bias always present: Hugging Face
    transformers' Conv1D (GPT-2's c_attn, c_proj, c_fc), forward = bias + x @ weight."""

    def layout(self, stored):
        """The stored [in, out] weight (or its gradient) as an [out, in] view (its transpose).

        Args:
            stored: a tensor [in, out].

        Returns:
            The transposed view [out, in].
        """
        return stored.t()

    def dense(self, module, weight):
        """A new nn.Linear equal to `module` with stored (transposed) weight `weight`.

        Args:
            module: the Conv1D-like layer (its bias is copied).
            weight: the effective stored weight [in, out] (not modified).

        Returns:
            nn.Linear on the weight's device and dtype.
        """
        return super().dense(module, weight.t())


class SameConv2dAdapter(Conv2dAdapter):
    """timm's Conv2dSame: an nn.Conv2d (padding 0) whose forward first pads the input as TensorFlow's
    "SAME" does, from the input's size: along an axis, total = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i,
    0), the smaller half before. With stride 1 the total is (k - 1) * d whatever i, the split of
    nn.Conv2d(padding="same"); with stride s > 1 it depends on i mod s unless the dilated kernel is 1 (then
    0). Layers whose padding depends on the input size are not reproducible by a fixed conv: unsupported."""
    forward_attrs = ("forward",)

    def _padding(self, module):
        """nn.Conv2d's padding argument equal to the dynamic one, or None when it depends on the input."""
        strides, extents = module.stride, [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation)]
        if all(s == 1 for s in strides):
            return "same"
        if all(s == 1 or e == 1 for s, e in zip(strides, extents)):
            pads = [0 if s != 1 else e - 1 for s, e in zip(strides, extents)]
            if all(p % 2 == 0 for p in pads):
                return tuple(p // 2 for p in pads)
        return None

    def unsupported(self, module):
        """Why `module` cannot be reproduced exactly: a padding mode other than zeros, or a "same" padding that
        depends on the input size; else None.

        Args:
            module: a Conv2dSame layer.

        Returns:
            str or None.
        """
        why = super().unsupported(module)
        if why is None and self._padding(module) is None:
            why = (f"dynamic 'same' padding at stride {tuple(module.stride)}: it depends on the input size, "
                   "so no fixed factorized conv reproduces it")
        return why

    def dense(self, module, weight):
        """A new nn.Conv2d equal to `module` with stored weight `weight`, its dynamic padding made explicit.

        Args:
            module: the Conv2dSame layer (supported: see unsupported).
            weight: the effective weight [out, in / groups, kh, kw] (not modified).

        Returns:
            nn.Conv2d on the weight's device and dtype.
        """
        return conv_like(module, weight, self._padding(module))


CONV2D = Conv2dAdapter()
LINEAR = LinearAdapter()

# Layer types of other libraries, by "module.QualName" of the class (trp does not import them).
BUILTIN = {
    nn.Conv2d: CONV2D,
    nn.Linear: LINEAR,
    "transformers.pytorch_utils.Conv1D": TransposedLinearAdapter(),
    "timm.layers.conv2d_same.Conv2dSame": SameConv2dAdapter(),
}

# Weight parametrizations (torch.nn.utils.parametrize) whose computed weight has the rank of one of their
# inputs, by class path: the name of that input (the ParametrizationList's original, or originalI).
# weight_norm: W = g * v / ||v||, norms over every dim but `dim`: a per-slice scale along one axis of the
# weight, i.e. a diagonal scaling of the rows or of the columns of every scheme's matrix (or of a whole
# matrix), so W has the rank of v (original1); g (original0) only rescales.
# spectral_norm: W = v / sigma(v), a scalar scale: W has the rank of v (original).
BUILTIN_PARAMETRIZATIONS = {
    "torch.nn.utils.parametrizations._WeightNorm": "original1",
    "torch.nn.utils.parametrizations._SpectralNorm": "original",
}


__all__ = ["LayerAdapter", "Conv2dAdapter", "LinearAdapter", "TransposedLinearAdapter", "SameConv2dAdapter",
           "BUILTIN", "BUILTIN_PARAMETRIZATIONS", "KINDS", "CONV2D", "LINEAR", "conv_like"]
