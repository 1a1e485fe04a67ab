"""What the pruner projects and decomposition factorizes: a target is one weight matrix.

Most targets are a layer's whole weight: an eligible layer (trp.eligibility: nn.Conv2d, nn.Linear, their
subclasses that keep their forward, and types with a layer adapter), read through its adapter's layout
(Conv1D's [in, out] weight as its [out, in] transpose; a parametrized weight's original). nn.MultiheadAttention keeps
its query, key and value projections packed in one raw Parameter, in_proj_weight [3E, E]: each of the three
row blocks is its own target, so q, k and v get their own rank (they are different linear maps; one rank for
the stacked [3E, E] matrix would not factorize any of them). With separate q/k/v weights (kdim or vdim !=
embed_dim) the targets are q_proj_weight, k_proj_weight and v_proj_weight. Either way the targets are named
"<attention>.q_proj", ".k_proj", ".v_proj": the names of the nn.Linear modules that decomposition gives the
attention (trp.core.attention.SplitMultiheadAttention), so that a name means the same matrix before and after.

A target reads its matrix as a view of the parameter, writes in place into it (only its rows), and hands out
the matching view of the parameter's .grad: the pruner never needs to know whether a target is a slice."""
import torch
import torch.nn as nn

from trp.core import eligibility
from trp.core.schemes import resolve, to_matrix

QKV = ("q", "k", "v")


class Target:
    """One weight matrix that the pruner projects and decomposition factorizes.

    A conv with groups g is g matrices, one per group (the attribute `groups`, from the adapter; 1 without
    one). Each argument is kept as the attribute of the same name.

    Args:
        name: the target's name, str: the layer's module name, or "<attention>.q_proj" (".k_proj",
            ".v_proj") for attention q/k/v.
        module: the owning module: the layer, or the nn.MultiheadAttention for q/k/v.
        param: the Parameter holding the matrix, what the pruner projects (for a parametrized weight, the
            parametrization's original: trp.eligibility).
        rows: a slice of param's rows that the matrix is (q/k/v of a packed in_proj_weight), or None for all of
            it; default None.
        bias_param: the Parameter holding the bias, or None when there is none; default None.
        bias_rows: a slice of bias_param that is this matrix's bias, or None for all of it; default None.
        adapter: the layer's trp.adapters.LayerAdapter, which says how the whole-layer target's parameter maps
            to nn.Conv2d / nn.Linear layout and how to build the layer's dense equivalent; None for attention
            q/k/v rows (already in nn.Linear layout); default None.
    """

    __slots__ = ("name", "module", "param", "rows", "bias_param", "bias_rows", "adapter", "groups")

    def __init__(self, name, module, param, rows=None, bias_param=None, bias_rows=None, adapter=None):
        self.name, self.module, self.param, self.rows = name, module, param, rows
        self.bias_param, self.bias_rows = bias_param, bias_rows
        self.adapter = adapter
        self.groups = 1 if adapter is None else adapter.groups(module)

    @property
    def is_linear(self):
        """True for every Linear-like matrix (out x in), False for a conv weight."""
        return self.param.dim() == 2 if self.adapter is None else self.adapter.kind == "linear"

    @property
    def shape(self):
        """The matrix's shape in nn.Linear / nn.Conv2d layout, a tuple of ints ([out, in] or [n, c, kh, kw])."""
        # from the parameter's shape alone: reading a sharded parameter's rows (FSDP2) would gather them
        return tuple(self.view_of(torch.empty(self.param.shape, device="meta")).shape)

    def view_of(self, stored):
        """The target's matrix as a view of `stored`, a tensor shaped like the parameter (the parameter, its
        gradient, or a whole copy of either), in nn.Linear / nn.Conv2d layout.

        Args:
            stored: a tensor of the parameter's shape.

        Returns:
            The view of `stored`: its rows of the target (q/k/v), through the adapter's layout.
        """
        w = stored if self.adapter is None else self.adapter.layout(stored)
        return w if self.rows is None else w[self.rows]

    def read(self):
        """The matrix (a conv: its 4-d weight) as a detached view of the parameter, in nn.Linear /
        nn.Conv2d layout."""
        return self.view_of(self.param.detach())

    def scheme_for(self, scheme):
        """The reshape this matrix uses under `scheme` (trp.core.schemes.resolve: "nd" becomes this layer's
        cheaper order).

        Args:
            scheme: a scheme of trp.core.schemes.SCHEMES.

        Returns:
            The layer's scheme, a str.
        """
        return resolve(scheme, self.shape, self.groups, getattr(self.module, "stride", 1) if self.rows is None else 1)

    def matrix(self, scheme):
        """read() as the scheme's matrix ([g, p, q] for a grouped conv under channel / spatial).

        Args:
            scheme: a scheme of trp.core.schemes.SCHEMES ("nd" resolved for this layer; Linear-like targets:
                "channel" only).

        Returns:
            A detached view of the parameter (or a copy), shaped as trp.schemes.to_matrix gives it.

        Raises:
            ValueError: when the scheme is unknown or does not apply to this matrix.
        """
        return to_matrix(self.read(), self.scheme_for(scheme), self.groups)

    def bias(self):
        """The bias rows of this matrix (detached view) or None."""
        if self.bias_param is None:
            return None
        b = self.bias_param.detach()
        return b if self.bias_rows is None else b[self.bias_rows]

    def write_(self, value):
        """Copies `value` into the target's rows of the parameter, in place.

        Args:
            value: a tensor of the target's shape (or broadcastable to it), in nn.Linear / nn.Conv2d layout.
        """
        self.read().copy_(value)

    def grad_view(self):
        """The parameter's .grad restricted to this target (allocated as zeros if it has none yet), or None
        for a frozen parameter."""
        if not self.param.requires_grad:
            return None
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        return self.view_of(self.param.grad)

    def effective(self):
        """The weight the layer computes with (eval mode), in nn.Linear / nn.Conv2d layout, detached: read()
        unless a parametrization computes it from the projected original."""
        if self.rows is not None or self.adapter is None:
            return self.read()
        return self.adapter.layout(eligibility.effective_weight(self.module))

    def dense(self):
        """An nn.Linear / nn.Conv2d computing exactly what this matrix's layer computes (eval mode): the
        layer itself when it is one, else a new one (q/k/v rows: as_linear)."""
        if self.rows is not None or self.adapter is None:
            return self.as_linear()
        return eligibility.dense_equivalent(self.module, self.adapter)

    def as_linear(self):
        """A new nn.Linear holding a copy of this (Linear-like) matrix and its bias."""
        w, b = self.effective(), self.bias()
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

    The bias is packed in in_proj_bias [3E] in both layouts.

    Args:
        name: the attention's module name, str ("" for the root).
        mha: the nn.MultiheadAttention (packed in_proj_weight [3E, E], or separate q/k/v_proj_weight).

    Returns:
        [Target] of three, named "<name>.q_proj", "<name>.k_proj", "<name>.v_proj" in that order.
    """
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


def _attention_unsupported(mha):
    """Why the q/k/v of an nn.MultiheadAttention (or subclass) cannot be targets, or None."""
    cls = type(mha)
    if cls.forward is not nn.MultiheadAttention.forward:
        return f"{cls.__name__} overrides forward of nn.MultiheadAttention: TRP cannot reproduce its computation"
    if mha._forward_pre_hooks or mha._forward_hooks:
        return f"{cls.__name__} has forward hooks that a split attention would not run"
    names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    if any(torch.nn.utils.parametrize.is_parametrized(mha, n) for n in names):
        return f"{cls.__name__} has a parametrized projection weight"
    return None


def survey(model):
    """Every layer that holds a conv or Linear weight, eligible or not.

    Args:
        model: the nn.Module.

    Returns:
        [(name, module, target, reason)] in registration order (q, k, v of an attention at its position, in
            that order): target is the Target of an eligible matrix (reason None), or None with the reason the
            layer is not eligible (trp.eligibility).
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            why = _attention_unsupported(m)
            if why is None:
                out += [(t.name, m, t, None) for t in attention_targets(name, m)]
            else:
                out.append((name, m, None, why))
        elif eligibility.is_candidate(m):
            adapter, param, why = eligibility.resolve(m)
            out.append((name, m, None if why else Target(name, m, param, adapter=adapter), why))
    return out


def candidates(model):
    """The eligible matrices of `model`: every eligible conv, Linear-like weight and attention q/k/v.

    Args:
        model: the nn.Module.

    Returns:
        [Target] in registration order (q, k, v at the position of their attention module).
    """
    return [t for _, _, t, _ in survey(model) if t is not None]


__all__ = ["Target", "attention_targets", "candidates", "survey", "QKV"]
