"""The projection of many matrices in one call, in place: the CPU path RankPruner takes when every matrix it
projects has min(p, q) <= max_n(): on the matrices themselves where each is a contiguous view of its layer's
weight (ResNet-20/56 and ResNet-50 under the channel scheme: each conv weight [n, c, kh, kw] is the
n x c*kh*kw matrix), else on the groups' stacked copies, which the pruner then copies back (spatial,
channels_last).

Same results as lowrank_project with a WarmStart per group (the same per-matrix kernels, bit for bit: tests),
without what surrounds them there: stacking the layers into a batch and copying the results back, a new
subgradient tensor per call, one op call per group, and the host round trip that sends matrices whose
certificate failed to the full solve (here the thread that tried the warm step solves the matrix at once).
All matrices are checked before any is written: a NaN/Inf anywhere raises NonFiniteError and changes
nothing."""
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import _extension
from . import warm as _warm
from .project import WarmStart, backend_for, check_energy, check_max_rank, warm_usable


class NonFiniteError(ValueError):
    """Some matrix given to lowrank_project_ holds NaN or Inf; nothing was modified.

    Args:
        bad: the (group index, index in the group) of each matrix that holds NaN or Inf, a list of int pairs;
            the message names them.

    Attributes:
        bad: list of (group index, index in the group) of each such matrix.
    """

    def __init__(self, bad: list[tuple[int, int]]):
        self.bad: list[tuple[int, int]] = bad
        super().__init__(f"lowrank_project_: matrices {bad} (group, index) contain NaN or Inf; nothing was "
                         "modified")


def max_n() -> int:
    """The largest min(p, q) the in-place CPU op takes.

    Returns:
        That size, or 0 when the compiled extension lacks the op or TRP_PROJECT_BACKEND=reference asks for the
            PyTorch reference.
    """
    if not _extension.has_kernel("lowrank_project_inplace_", "CPU") or backend_for("cpu") != "cpp":
        return 0
    return torch.ops.trp_kernels_C.lowrank_project_inplace_max_n()


def _overlap(mats):
    """Whether two of the matrices share memory (the same weight twice, tied layers): the op's threads would
    then read and write the same memory concurrently."""
    spans = sorted((m.data_ptr(), m.data_ptr() + m.numel() * m.element_size()) for m in mats)
    return any(end > start for (_, end), (start, _) in zip(spans, spans[1:]))


def supports(groups: Sequence[Sequence[Tensor]]) -> bool:
    """Whether lowrank_project_ takes these groups of matrices.

    Args:
        groups: lists of 2-D tensors [p, q].

    Returns:
        True when every group is nonempty and holds contiguous CPU float32/float64 matrices of one shape and dtype
            with 1 <= min(p, q) <= max_n(), and no two matrices share memory.
    """
    limit = max_n()
    for mats in groups:
        if not mats:
            return False
        first = mats[0]
        if first.dim() != 2 or min(first.shape) > limit or min(first.shape) < 1 \
                or first.dtype not in (torch.float32, torch.float64):
            return False
        if any(m.device.type != "cpu" or not m.is_contiguous() or m.shape != first.shape or m.dtype != first.dtype
               for m in mats):
            return False
    return not _overlap([m for mats in groups for m in mats])


def kernel(*args: object) -> tuple:
    """Call the compiled op trp_kernels_C::lowrank_project_inplace_ (one name that benchmarks can time).

    Args:
        *args: the op's arguments, as lowrank_project_ passes them.

    Returns:
        The op's (finite flags, ranks, next bases, warm flags).
    """
    return torch.ops.trp_kernels_C.lowrank_project_inplace_(*args)


def lowrank_project_(groups: Sequence[Sequence[Tensor]], energy: float, warm: Sequence[WarmStart], *,
                     max_rank: Optional[int] = None, G: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Project every matrix of `groups` in place on its energy-rule truncated SVD.

    The same results as lowrank_project(torch.stack(group), energy, max_rank=max_rank, subgradient=G is not None,
    warm=warm[i]) followed by a copy back, bit for bit. All matrices are checked before any is written.

    Args:
        groups: lists of [p, q] tensors, one shape and dtype per list, for which supports() holds; written in
            place (they must not require grad).
        energy: fraction of the squared singular values each matrix keeps, in (0, 1].
        warm: one WarmStart per group, updated.
        max_rank: None (no cap), or the largest rank kept, an int >= 1.
        G: None, or one contiguous [B, p, q] buffer per group (the group's dtype, B its length) that receives
            the subgradient U_k V_k^T.

    Returns:
        One rank tensor (int64 [B]) per group.

    Raises:
        ValueError: energy or max_rank is invalid, or a matrix requires grad.
        TypeError: warm does not hold one WarmStart per group.
        RuntimeError: the compiled CPU op is not available (max_n() is 0).
        NonFiniteError: some matrix holds NaN or Inf (nothing was modified).
    """
    energy = check_energy(energy, "lowrank_project_: energy")
    check_max_rank(max_rank, "lowrank_project_: max_rank")
    if len(warm) != len(groups) or not all(isinstance(w, WarmStart) for w in warm):
        raise TypeError("lowrank_project_: warm must hold one trp_kernels.WarmStart per group")
    if max_n() == 0:
        raise RuntimeError("lowrank_project_: needs the compiled CPU op of trp_kernels._C "
                           f"({_extension.error() or 'not in this build, or TRP_PROJECT_BACKEND=reference'})")
    flat = [m for mats in groups for m in mats]
    if any(m.requires_grad for m in flat):
        raise ValueError("lowrank_project_: the matrices must not require grad (pass detached views, e.g. "
                         "weight.detach().view(n, -1))")
    sizes = [len(mats) for mats in groups]
    bases = [state.basis.contiguous() if warm_usable(state.basis, (len(mats), *mats[0].shape), "cpu", energy)
             else None for mats, state in zip(groups, warm)]
    finite, ranks, nexts, flags = kernel(
        flat, sizes, bases, [] if G is None else list(G), energy, max_rank, G is not None, *_warm.kernel_params())
    if not ranks:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        bad = [(i, j) for i, s in enumerate(starts) for j in range(sizes[i]) if not bool(finite[s + j])]
        raise NonFiniteError(bad)
    torch.autograd.graph.increment_version(flat)  # written through their data pointers
    if G is not None:
        torch.autograd.graph.increment_version(list(G))
    for state, basis, flag in zip(warm, nexts, flags):
        state.basis, state.warm = basis, flag
    return ranks
