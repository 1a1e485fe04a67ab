"""RankPruner on models sharded with FSDP2 (torch.distributed.fsdp.fully_shard): the parameters are DTensors, each
rank holding a shard of every weight.

The projection needs whole matrices, so the pruner gathers them (DTensor.full_tensor(), an all-gather over the
parameter's mesh that every rank joins, one weight at a time) and every rank keeps only the full matrices of the
groups it projects (trp.prune.distributed's cost-balanced sharding). After the exchange of the results every rank
holds every group's projected matrices and subgradients, whole, and copies out the part of each that its own
shards cover: the placements say which part (DTensor's own rule, torch.distributed.tensor.distribute_tensor
without communication), so uneven shards, a sharded dimension other than 0 and replicated mesh dimensions need
nothing special. A target that is only some rows of its parameter (attention q/k/v) writes only those rows of
the shard.

Everything DTensor-specific lives here: the engine asks is_sharded() and calls gathered(), write_() and
add_to_grad_(); with plain tensors it never comes here."""
import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without torch.distributed: no parameter can be a DTensor
    DTensor = distribute_tensor = None


def is_sharded(param):
    """Whether a parameter is a DTensor (FSDP2's sharded parameters).

    Args:
        param: a tensor or Parameter.

    Returns:
        True or False.
    """
    return DTensor is not None and isinstance(param, DTensor)


def any_sharded(targets):
    """Whether some target's parameter is a DTensor.

    Args:
        targets: trp.core.targets.Target objects.

    Returns:
        True or False.
    """
    return any(is_sharded(t.param) for t in targets)


def gathered(target):
    """The target's whole matrix as a plain tensor: a DTensor parameter is gathered from every rank's shard
    (a collective: every rank of its mesh must call this for the same targets in the same order); a plain
    parameter's matrix is its view (Target.read()).

    Args:
        target: a trp.core.targets.Target.

    Returns:
        A tensor of the target's shape, in nn.Linear / nn.Conv2d layout.
    """
    if not is_sharded(target.param):
        return target.read()
    return target.view_of(target.param.detach().full_tensor())


def _local_part(full, like):
    """The part of `full` (a plain tensor of the DTensor `like`'s global shape) that this rank's shard of `like`
    holds, by `like`'s placements; no communication."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _in_shard(target, value, like):
    """(this rank's part of `value` placed at the target's position in a tensor shaped like the DTensor `like`,
    and the mask of the positions it covers there)."""
    full = torch.zeros(like.shape, dtype=like.dtype, device=value.device)
    mask = torch.zeros(like.shape, dtype=torch.bool, device=value.device)
    target.view_of(full).copy_(value)
    target.view_of(mask).fill_(True)
    return _local_part(full, like), _local_part(mask, like)


@torch.no_grad()
def write_(targets, values):
    """Copies each value (a target's whole matrix) into the target's parameter: a DTensor parameter's local shard
    receives its part, and only where the target lies (q/k/v rows keep the rest of the shard).

    Args:
        targets: trp.core.targets.Target objects.
        values: one tensor of the target's shape per target, the same on every rank.
    """
    for t, v in zip(targets, values):
        if not is_sharded(t.param):
            t.write_(v)
            continue
        local = t.param.detach().to_local()
        part, mask = _in_shard(t, v, t.param)
        local.copy_(torch.where(mask, part, local))


@torch.no_grad()
def add_to_grad_(targets, values, alpha):
    """Adds alpha * value to each target's rows of its parameter's .grad (a DTensor parameter: its local shard of
    the gradient; allocated as zeros when there is none yet); frozen parameters are skipped.

    Args:
        targets: trp.core.targets.Target objects.
        values: one tensor of the target's shape per target, the same on every rank.
        alpha: the factor, a float.
    """
    for t, v in zip(targets, values):
        if not is_sharded(t.param):
            grad = t.grad_view()
            if grad is not None:
                grad.add_(v.to(grad.dtype), alpha=alpha)
            continue
        if not t.param.requires_grad:
            continue
        if t.param.grad is None:
            t.param.grad = torch.zeros_like(t.param)
        grad = t.param.grad
        part, mask = _in_shard(t, v.to(grad.dtype), grad)
        grad.to_local().add_(torch.where(mask, part, torch.zeros_like(part)), alpha=alpha)


__all__ = ["is_sharded", "any_sharded", "gathered", "write_", "add_to_grad_"]
