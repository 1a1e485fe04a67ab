# Over 300 lines with its docstrings: each attention host and its conversion belong together.
"""Host modules of factorized transformer projections.

Some modules do not call their Linear layers but read the weights: nn.MultiheadAttention passes the packed
in_proj_weight and out_proj.weight to F.multi_head_attention_forward, and nn.TransformerEncoderLayer's
inference fast path (and nn.TransformerEncoder's nested-tensor path) hands in_proj_weight, linear1.weight,
... to one fused kernel. The q/k/v rows of a packed weight cannot be replaced by modules, and a
FactorizedLinear's .weight is only a stand-in (trp.modules.FactorizedWeight) that those kernels cannot take,
so decomposition first converts such hosts into equivalents that call their projections:

- nn.MultiheadAttention -> SplitMultiheadAttention: q_proj, k_proj, v_proj and out_proj are modules (an
  nn.Linear each, holding the dense rows, or the FactorizedLinear that replaces it), the attention itself is
  the same computation (masks, dropout, need_weights, batch_first, kdim/vdim);
- a TransformerEncoderLayer with a factorized part gets a SplitMultiheadAttention (its in_proj_bias is None,
  which the fast-path test reads as "no fused kernel"), and every TransformerEncoder holding such a layer
  turns its nested-tensor path off: both then run their python path, which calls the modules.

prepare_hosts(model, names) converts exactly the hosts above the given target names: decompose() runs it for
the targets it factorizes and trp.load() for the factorized layers a file records, so both build the same
module tree. torchvision's Swin window attention needs no conversion: it passes qkv.weight and proj.weight
to F.linear, and a FactorizedLinear's .weight (trp.modules.FactorizedWeight) computes that through its
factors. Hosts that cannot be converted (an attention with add_bias_kv / add_zero_attn) keep their targets
dense: unsupported_host() says why, and decompose() warns once."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from trp.core.targets import attention_targets


def _swin_attention_types():
    """torchvision's Swin window attentions, if torchvision is importable (it is optional)."""
    try:  # optional dependency (the vision extra)
        from torchvision.models import swin_transformer as swin
    except ImportError:
        return ()
    return tuple(getattr(swin, n) for n in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
                 if hasattr(swin, n))


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with separate q, k, v and output projection modules (same arguments, same
    forward signature and outputs). Usually built by from_mha().

    The projections are the submodules q_proj [embed_dim <- embed_dim], k_proj [embed_dim <- kdim],
    v_proj [embed_dim <- vdim] and out_proj [embed_dim <- embed_dim], each an nn.Linear (or the
    FactorizedLinear that replaces it).

    Args:
        embed_dim: the model dimension E, an int >= 1 divisible by num_heads.
        num_heads: the number of attention heads H, an int >= 1 (each head has E / H dimensions).
        dropout: the dropout probability on the attention weights in training mode, a float in [0, 1);
            default 0.0.
        bias: whether the four projections have a bias; default True.
        kdim: the key feature size, an int >= 1; default None (embed_dim).
        vdim: the value feature size, an int >= 1; default None (embed_dim).
        batch_first: inputs and outputs are [N, L, E] when True, [L, N, E] when False; default False.
        device: the device of the projections' parameters; default None (torch's default).
        dtype: the dtype of the projections' parameters; default None (torch's default).

    Raises:
        ValueError: when embed_dim is not divisible by num_heads.
    """

    _qkv_same_embed_dim = False  # the attributes torch's fast-path tests read: no fused kernel for this one
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, kdim=None, vdim=None, batch_first=False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, float(dropout)
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first, self.head_dim = batch_first, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_mha(cls, mha):
        """The equivalent of an nn.MultiheadAttention (its weights copied; out_proj is the same module).

        Args:
            mha: the nn.MultiheadAttention to convert (not modified; its out_proj is shared).

        Returns:
            A SplitMultiheadAttention on mha's device and dtype, in mha's training mode.

        Raises:
            ValueError: when mha uses add_bias_kv or add_zero_attn (unsupported_attention).
        """
        why = unsupported_attention(mha)
        if why is not None:
            raise ValueError(f"SplitMultiheadAttention.from_mha: {why}")
        w = mha.out_proj.weight
        split = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                    mha.batch_first, device=w.device, dtype=w.dtype)
        for t in attention_targets("", mha):
            setattr(split, t.name, t.as_linear())
        split.out_proj = mha.out_proj
        split.train(mha.training)
        return split

    def extra_repr(self):
        """The module's repr details: embed_dim, num_heads and batch_first."""
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Multi-head attention, as nn.MultiheadAttention.forward computes it.

        Args:
            query: queries [N, L, E] (batch_first) or [L, N, E], or unbatched [L, E].
            key: keys [N, S, kdim] (batch_first) or [S, N, kdim], or unbatched [S, kdim].
            value: values [N, S, vdim] (batch_first) or [S, N, vdim], or unbatched [S, vdim].
            key_padding_mask: [N, S] (unbatched: [S]), True (bool) or -inf-like (float) where a key is
                ignored; default None.
            need_weights: whether to return the attention weights (computed explicitly; otherwise
                F.scaled_dot_product_attention runs); default True.
            attn_mask: [L, S] or [N * num_heads, L, S], a bool (True: not allowed) or additive float mask;
                default None.
            average_attn_weights: whether the returned weights are averaged over the heads; default True.
            is_causal: a hint that attn_mask is the causal mask (attn_mask must then be given); default False.

        Returns:
            (output, weights): output of query's layout with E features; weights [N, L, S] averaged, or
                [N, num_heads, L, S] (unbatched: without N), or None when need_weights is False.

        Raises:
            RuntimeError: when is_causal is True and attn_mask is None (as nn.MultiheadAttention).
        """
        batched = query.dim() == 3
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, S, H = query.shape[0], query.shape[1], key.shape[1], self.num_heads
        q = self.q_proj(query).view(N, L, H, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(N, S, H, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(N, S, H, self.head_dim).transpose(1, 2)
        mask, causal = self._mask(key_padding_mask, attn_mask, need_weights, is_causal, q.dtype, N, L, S)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # as F.multi_head_attention_forward: scaled q, then + mask, softmax, dropout
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if p > 0:  # the returned weights are the dropped-out ones, as torch's
                weights = F.dropout(weights, p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, key_padding_mask, attn_mask, need_weights, is_causal, dtype, N, L, S):
        """(additive float mask broadcastable to [N, H, L, S] or None, is_causal for SDPA), with the rules of
        F.multi_head_attention_forward (is_causal is a hint that attn_mask is causal)."""
        kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and kpm is None and not need_weights:
            return None, True
        mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                 target_type=dtype, check_other=False)
        if mask is not None:
            mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(N, self.num_heads, L, S)
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask, False


def unsupported_attention(mha):
    """Why an nn.MultiheadAttention cannot become a SplitMultiheadAttention, or None.

    Args:
        mha: an nn.MultiheadAttention.

    Returns:
        A short phrase (add_bias_kv / add_zero_attn are not supported), or None when it converts.
    """
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn attention is not supported"
    return None


@functools.cache
def _attention_types():
    return (nn.MultiheadAttention, SplitMultiheadAttention) + _swin_attention_types()


def is_attention(module):
    """Whether `module` is an attention module trp knows (nn.MultiheadAttention, SplitMultiheadAttention,
    torchvision's Swin window attentions).

    Args:
        module: any nn.Module.

    Returns:
        bool.
    """
    return isinstance(module, _attention_types())


def attention_modules(model):
    """The attention modules of `model` (what makes it a transformer for trp).

    Args:
        model: the nn.Module.

    Returns:
        [(name, module)] in registration order.
    """
    return [(n, m) for n, m in model.named_modules() if is_attention(m)]


def block_names(model):
    """Names of the transformer blocks: the modules that hold an attention module ("" for the root).

    Args:
        model: the nn.Module.

    Returns:
        The sorted list of module names (str).
    """
    return sorted({n.rpartition(".")[0] for n, _ in attention_modules(model)})


def _ancestors(model, name):
    """[(prefix, module)] of the modules above the dotted `name`, outermost first (the root is "")."""
    mods = dict(model.named_modules())
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts))]
    return [(p, mods[p]) for p in prefixes if p in mods]


def unsupported_host(model, name):
    """Why the target `name` cannot be factorized inside its host module (so it stays dense), or None.

    Args:
        model: the nn.Module holding the target.
        name: the target's dotted module name (an attention q/k/v target: the attention's name plus
            ".q_proj", ...).

    Returns:
        A short phrase naming the host and the reason, or None when the host can be converted.
    """
    for prefix, m in _ancestors(model, name):
        if isinstance(m, nn.MultiheadAttention):
            if prefix == "":
                return "the model itself is an nn.MultiheadAttention (wrap it in a module)"
            why = unsupported_attention(m)
            if why is not None:
                return f"{prefix}: {why}"
    return None


def prepare_hosts(model, names):
    """Converts, in place, the hosts above the target `names` (see the module doc) so that each name is an
    nn.Linear / conv submodule that a factorized module can replace.

    Args:
        model: the nn.Module, modified in place.
        names: the targets' dotted module names, an iterable of str.

    Returns:
        `model`.

    Raises:
        ValueError: when a target's host cannot be converted (unsupported_host says why).
    """
    for name in names:
        why = unsupported_host(model, name)
        if why is not None:
            raise ValueError(f"cannot factorize {name!r}: {why}")
        parts = name.split(".")
        for prefix in (".".join(parts[:i]) for i in range(len(parts))):  # looked up afresh: we replace some
            m = model.get_submodule(prefix)
            if isinstance(m, nn.TransformerEncoderLayer) and isinstance(m.self_attn, nn.MultiheadAttention):
                m.self_attn = SplitMultiheadAttention.from_mha(m.self_attn)
            elif isinstance(m, nn.MultiheadAttention):
                model.set_submodule(prefix, SplitMultiheadAttention.from_mha(m))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, SplitMultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = False  # the nested path would read in_proj_weight of the first layer
    return model


__all__ = ["SplitMultiheadAttention", "attention_modules", "block_names", "unsupported_host",
           "unsupported_attention", "prepare_hosts"]
