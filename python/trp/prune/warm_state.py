"""RankPruner's warm-start state in its state_dict: each projection group carries a trp_kernels.WarmStart
(the kept singular vectors of its matrices, [B, n, m] float64); saved per layer, so that a resumed run
starts its next projection from the same basis and continues exactly. A state without bases (or whose
bases no longer fit the group) is not an error: that group's next projection solves in full and rebuilds
the basis."""
import torch

from trp_kernels.warm import is_basis


def warm_bases(groups):
    """{layer name: its rows of the group's basis, [matrices of the layer, n, m]} for every group with one.

    Args:
        groups: the projection groups (each with .names and .warm, a trp_kernels.WarmStart).

    Returns:
        {layer name: basis tensor}.
    """
    out = {}
    for g in groups:
        basis = g.warm.basis
        if basis is not None and basis.shape[0] % len(g.names) == 0:
            per_layer = basis.shape[0] // len(g.names)  # explicit: -1 is ambiguous for an empty basis
            out.update(zip(g.names, basis.view(len(g.names), per_layer, *basis.shape[1:]).unbind(0)))
    return out


def restore_warm_basis(g, bases):
    """The group's basis from saved per-layer bases, or None when some layer has none or they do not stack
    (different widths).

    Args:
        g: the projection group.
        bases: {layer name: basis tensor}, as warm_bases() saved them.

    Returns:
        The group's basis on its weights' device, or None.

    Raises:
        ValueError: when bases is not a dict, or an entry is not a float64 tensor [matrices, n, m].
    """
    if not isinstance(bases, dict):
        raise ValueError(f"warm_bases must be a dict of tensors, got {type(bases).__name__}")
    parts = [bases.get(n) for n in g.names]
    for n, b in zip(g.names, parts):
        if b is not None and not is_basis(b):
            got = (b.dtype, tuple(b.shape)) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"warm_bases[{n!r}] must be a float64 tensor [matrices, n, m], got {got}")
    if any(b is None for b in parts) or len({tuple(b.shape) for b in parts}) != 1:
        return None
    return torch.cat(parts).to(g.targets[0].param.device)
