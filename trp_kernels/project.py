"""The batched low-rank projection op: trp_kernels::lowrank_project.

One schema (a torch.library custom op with a fake kernel, so torch.compile and opcheck work), several
kernels: the C++ CPU and CUDA kernels of trp_kernels._C when built, else the PyTorch reference.
TRP_PROJECT_BACKEND=auto|cpp|reference forces a choice (tests, benchmarks)."""
import math
import os
from typing import Optional

import torch
from torch import Tensor

from . import _extension, reference

BACKEND_ENV = "TRP_PROJECT_BACKEND"
BACKENDS = ("auto", "cpp", "reference")


def _requested_backend():
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def _dispatch_key(device):
    return "CUDA" if device.type == "cuda" else "CPU"


def backend_for(device):
    """The implementation lowrank_project runs for tensors on `device`: "cpp" or "reference"."""
    device = torch.device(device)
    choice = _requested_backend()
    compiled = _extension.has_kernel("lowrank_project", _dispatch_key(device))
    if choice == "cpp" and not compiled:
        raise RuntimeError(f"{BACKEND_ENV}=cpp but trp_kernels._C has no lowrank_project kernel for "
                           f"{device.type} ({_extension.error() or 'built without it'})")
    if choice == "auto" and not compiled:
        _extension.warn_fallback("lowrank_project")
    return "cpp" if compiled and choice != "reference" else "reference"


def check_energy(energy, name="energy"):
    """float(energy) if it is a number in (0, 1], else ValueError (trp reuses this rule)."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or math.isnan(energy) \
            or not 0.0 < energy <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of squared singular values "
                         f"kept), got {energy!r}")
    return float(energy)


def check_max_rank(max_rank, name="max_rank"):
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int)
                                 or max_rank < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {max_rank!r}")
    return max_rank


def validate(W, energy, max_rank):
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"lowrank_project: W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 3:
        raise ValueError(f"lowrank_project: W must be 3-D [B, p, q], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"lowrank_project: W must be floating point, got {W.dtype}")
    check_energy(energy, "lowrank_project: energy")
    check_max_rank(max_rank, "lowrank_project: max_rank")


def finite_flag(W):
    """A 0-dim bool tensor, False when some matrix of W [B, p, q] may hold NaN/Inf; no host sync. One sum
    per matrix: NaN and Inf propagate; a finite overflow also gives False, so False needs finite_rows."""
    return torch.isfinite(W.sum(dim=(1, 2))).all()


def finite_rows(W):
    """Bool [B]: whether each matrix of W is entirely finite (the exact, element-wise test)."""
    return torch.isfinite(W).flatten(1).all(dim=1)


def check_finite(W):
    """ValueError naming the first batch index holding NaN or Inf (one host sync in the usual case)."""
    if W.numel() == 0 or bool(finite_flag(W)):
        return
    finite = finite_rows(W)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"lowrank_project: W[{bad}] contains NaN or Inf; nothing was computed")


@torch.library.custom_op("trp_kernels::lowrank_project", mutates_args=())
def _lowrank_project_op(W: Tensor, energy: float, max_rank: Optional[int], subgradient: bool,
                        check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    if check:
        check_finite(W)
    if backend_for(W.device) == "cpp":
        W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project(W, energy, max_rank, subgradient)
    else:
        W_low, rank, G = reference.lowrank_project(W, energy, max_rank, subgradient)
    if G is None or not subgradient:
        G = W.new_empty(0)
    return W_low, rank, G


@_lowrank_project_op.register_fake
def _(W, energy, max_rank, subgradient, check=True):
    rank = W.new_empty((W.shape[0],), dtype=torch.int64)
    G = W.new_empty(W.shape) if subgradient else W.new_empty(0)
    return W.new_empty(W.shape), rank, G  # the kernels return contiguous results


def lowrank_project(W, energy, *, max_rank=None, subgradient=False, check_finite=True):
    """Project each matrix of W [B, p, q] on its truncated SVD.

    Returns (W_low, rank, G): rank[b] is the smallest k >= 1 keeping at least `energy` of the squared
    singular values (0 for an all-zero matrix, capped by max_rank), W_low[b] = U_k S_k V_k^T and
    G[b] = U_k V_k^T (the nuclear-norm subgradient) when subgradient=True, else None.
    float16/bfloat16 are computed in float32 and returned in W's dtype. W is never modified.
    NaN/Inf in W raise ValueError; check_finite=False skips that test (a host sync) for callers that
    have already made it (RankPruner checks all its groups at once) - the results are then undefined for
    non-finite input."""
    validate(W, energy, max_rank)
    W_low, rank, G = _lowrank_project_op(W, float(energy), max_rank, bool(subgradient), bool(check_finite))
    return W_low, rank, (G if subgradient else None)


def backend_info():
    return {
        "cpu": backend_for("cpu"),
        "cuda": backend_for("cuda") if torch.cuda.is_available() else None,
        "compiled_cpu": _extension.has_kernel("lowrank_project", "CPU"),
        "compiled_cuda": _extension.has_kernel("lowrank_project", "CUDA"),
    }
