"""What the pruner projects and decomposition factorizes: a target is one weight matrix.

Most targets are a layer's whole weight (nn.Conv2d, nn.Linear and any subclass). nn.MultiheadAttention keeps
its query, key and value projections packed in one raw Parameter, in_proj_weight [3E, E]: each of the three
row blocks is its own target, so q, k and v get their own rank (they are different linear maps; one rank for
the stacked [3E, E] matrix would not factorize any of them). With separate q/k/v weights (kdim or vdim !=
embed_dim) the targets are q_proj_weight, k_proj_weight and v_proj_weight. Either way the targets are named
"<attention>.q_proj", ".k_proj", ".v_proj": the names of the nn.Linear modules that decomposition gives the
attention (trp.transformer.SplitMultiheadAttention), so that a name means the same matrix before and after.

A target reads its matrix as a view of the parameter, writes in place into it (only its rows), and hands out
the matching view of the parameter's .grad: the pruner never needs to know whether a target is a slice."""
import torch
import torch.nn as nn

QKV = ("q", "k", "v")


class Target:
    """One matrix: `param` (rows `rows`, or all of it), owned by `module` (the layer, or the attention for
    q/k/v), named `name`; its bias is `bias_param` (rows `bias_rows`, or all of it), or None."""

    __slots__ = ("name", "module", "param", "rows", "bias_param", "bias_rows")

    def __init__(self, name, module, param, rows=None, bias_param=None, bias_rows=None):
        self.name, self.module, self.param, self.rows = name, module, param, rows
        self.bias_param, self.bias_rows = bias_param, bias_rows

    @property
    def is_linear(self):
        """True for every Linear-like matrix (out x in), False for a conv weight."""
        return self.param.dim() == 2

    @property
    def shape(self):
        return tuple(self.read().shape)

    def read(self):
        """The matrix (a conv: its 4-d weight) as a detached view of the parameter."""
        w = self.param.detach()
        return w if self.rows is None else w[self.rows]

    def bias(self):
        """The bias rows of this matrix (detached view) or None."""
        if self.bias_param is None:
            return None
        b = self.bias_param.detach()
        return b if self.bias_rows is None else b[self.bias_rows]

    def write_(self, value):
        """Copies `value` into the target's rows of the parameter, in place."""
        self.read().copy_(value)

    def grad_view(self):
        """The parameter's .grad restricted to this target (allocated as zeros if it has none yet), or None
        for a frozen parameter."""
        if not self.param.requires_grad:
            return None
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        g = self.param.grad
        return g if self.rows is None else g[self.rows]

    def as_linear(self):
        """A new nn.Linear holding a copy of this (Linear-like) matrix and its bias."""
        w, b = self.read(), self.bias()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return linear

    def __repr__(self):
        where = "" if self.rows is None else f", rows {self.rows.start}:{self.rows.stop}"
        return f"Target({self.name!r}, {tuple(self.param.shape)}{where})"


def attention_targets(name, mha):
    """The q, k, v targets of an nn.MultiheadAttention named `name` (its out_proj is an nn.Linear module).
    The bias is packed in in_proj_bias [3E] in both layouts."""
    prefix = f"{name}." if name else ""
    E, out = mha.embed_dim, []
    for i, p in enumerate(QKV):
        rows = slice(i * E, (i + 1) * E)
        if mha._qkv_same_embed_dim:
            weight, weight_rows = mha.in_proj_weight, rows
        else:
            weight, weight_rows = getattr(mha, f"{p}_proj_weight"), None
        out.append(Target(f"{prefix}{p}_proj", mha, weight, weight_rows, mha.in_proj_bias, rows))
    return out


def candidates(model):
    """[Target] for every conv, Linear-like weight and attention q/k/v matrix of `model`, in registration
    order (q, k, v at the position of their attention module)."""
    from .selection import _CONV_TYPES  # selection imports this module
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out += attention_targets(name, m)
        elif isinstance(m, _CONV_TYPES + (nn.Linear,)):
            out.append(Target(name, m, m.weight, None, m.bias))
    return out


__all__ = ["Target", "attention_targets", "candidates", "QKV"]
