"""Multiply-adds of attention modules, from the shapes of one call (trp.cost.flops.macs_by_layer's attention=True).

Attention: Q K^T and A V, each N * L * S * E for L queries, S keys and embedding E (all heads together).
Projections that an attention module applies itself, without calling a Linear module, are counted here too
(the packed in_proj and out_proj.weight of nn.MultiheadAttention, qkv/proj of torchvision's Swin window
attention); SplitMultiheadAttention calls its projection modules, which count themselves."""
import math

import torch.nn as nn

from trp.core.attention import SplitMultiheadAttention, is_attention
from trp.cost.macs import macs_per_output_pixel


def _arg(args, kwargs, i, name):
    return args[i] if len(args) > i else kwargs[name]


def attention_macs(module, args, kwargs, linear=False):
    """{part: MACs} of one call of an attention `module` with (args, kwargs): "attention", and with
    linear=True the projections it applies itself ("q_proj", "k_proj", "v_proj", "out_proj" of
    nn.MultiheadAttention; "qkv", "proj" of Swin).

    Args:
        module: the attention module (nn.MultiheadAttention, SplitMultiheadAttention or torchvision Swin's).
        args: the call's positional arguments, a tuple.
        kwargs: the call's keyword arguments, a dict.
        linear: add the projections the module applies itself. Default False.

    Returns:
        {part: MACs (int)}.
    """
    if isinstance(module, (nn.MultiheadAttention, SplitMultiheadAttention)):
        q, k = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key")
        if q.dim() == 3:  # batched: [N, L, E] or [L, N, E]
            n_dim = 0 if module.batch_first else 1
            N, L, S = q.shape[n_dim], q.shape[1 - n_dim], k.shape[1 - n_dim]
        else:
            N, L, S = 1, q.shape[0], k.shape[0]
        E = module.embed_dim
        out = {"attention": 2 * N * L * S * E}
        if linear and isinstance(module, nn.MultiheadAttention):
            out.update(q_proj=N * L * E * E, k_proj=N * S * module.kdim * E, v_proj=N * S * module.vdim * E,
                       out_proj=N * L * E * E)
        return out
    # Swin: x [B, H, W, C] padded to whole windows of ws0 x ws1 tokens; attention within each window
    B, H, W, C = _arg(args, kwargs, 0, "x").shape
    ws0, ws1 = module.window_size
    tokens = B * math.ceil(H / ws0) * ws0 * math.ceil(W / ws1) * ws1
    out = {"attention": 2 * tokens * ws0 * ws1 * C}
    if linear:  # per token: dense in*out, or a FactorizedLinear's rank*(in+out)
        out.update(qkv=tokens * macs_per_output_pixel(module.qkv), proj=tokens * macs_per_output_pixel(module.proj))
    return out


__all__ = ["is_attention", "attention_macs"]
