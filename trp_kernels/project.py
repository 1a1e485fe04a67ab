"""The batched low-rank projection op: trp_kernels::lowrank_project.

One schema (a torch.library custom op with a fake kernel, so torch.compile and opcheck work), several
kernels: the C++ CPU and CUDA kernels of trp_kernels._C when built, else the PyTorch reference.
TRP_PROJECT_BACKEND=auto|cpp|reference forces a choice (tests, benchmarks).

Warm start (trp_kernels/warm.py): lowrank_project(..., warm=WarmStart()) carries each matrix's kept basis
from one call to the next; the op trp_kernels::lowrank_project_warm is the functional form (basis in,
basis and the per-matrix "took the warm path" flags out)."""
import math
import os
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from . import _extension, precision, probes, reference, selfcheck
from . import warm as _warm

BACKEND_ENV = "TRP_PROJECT_BACKEND"
BACKENDS = ("auto", "cpp", "reference")


def _requested_backend():
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


def _dispatch_key(device):
    return "CUDA" if device.type == "cuda" else "CPU"


def backend_for(device: str | torch.device) -> str:
    """The implementation lowrank_project runs for tensors on `device`, under TRP_PROJECT_BACKEND.

    A CUDA device for which this build has no kernel image (e.g. sm_75 when built for 8.0;9.0+PTX) gets the
    reference, with a warning once.

    Args:
        device: a torch.device or its name ("cpu", "cuda:0", ...).

    Returns:
        "cpp" (the compiled kernels) or "reference" (the PyTorch reference).

    Raises:
        ValueError: TRP_PROJECT_BACKEND is not auto, cpp or reference.
        RuntimeError: TRP_PROJECT_BACKEND=cpp and the build has no kernel (or no kernel image) for the device.
    """
    device = torch.device(device)
    choice = _requested_backend()
    compiled = _extension.has_kernel("lowrank_project", _dispatch_key(device))
    if choice == "cpp" and not compiled:
        raise RuntimeError(f"{BACKEND_ENV}=cpp but trp_kernels._C has no lowrank_project kernel for "
                           f"{device.type} ({_extension.error() or 'built without it'})")
    if choice == "auto" and not compiled:
        _extension.warn_fallback("lowrank_project")
    if compiled and choice != "reference" and device.type == "cuda":
        why = _extension.cuda_image_missing(device)
        if why is not None:
            if choice == "cpp":
                raise RuntimeError(f"{BACKEND_ENV}=cpp but {why}")
            _extension.warn_once(f"cuda-image:{why}", f"trp_kernels: {why}; lowrank_project runs the PyTorch "
                                 "reference there")
            return "reference"
    return "cpp" if compiled and choice != "reference" else "reference"


def check_energy(energy: float, name: str = "energy") -> float:
    """The energy argument as a float, checked (trp reuses this rule).

    Args:
        energy: fraction of the squared singular values kept: a number (not a bool) in (0, 1].
        name: how the error message names the argument.

    Returns:
        float(energy).

    Raises:
        ValueError: energy is not a number in (0, 1] (NaN included).
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or math.isnan(energy) \
            or not 0.0 < energy <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of squared singular values "
                         f"kept), got {energy!r}")
    return float(energy)


def check_max_rank(max_rank: Optional[int], name: str = "max_rank") -> Optional[int]:
    """The max_rank argument, checked.

    Args:
        max_rank: None (no cap), or an int (not a bool) >= 1.
        name: how the error message names the argument.

    Returns:
        max_rank unchanged.

    Raises:
        ValueError: max_rank is neither None nor an int >= 1.
    """
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int)
                                 or max_rank < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {max_rank!r}")
    return max_rank


def validate(W: Tensor, energy: float, max_rank: Optional[int]) -> None:
    """Check lowrank_project's arguments (not the values of W: see check_finite).

    Args:
        W: the batch of matrices, which must be a floating-point tensor [B, p, q].
        energy: fraction of the squared singular values kept, in (0, 1].
        max_rank: None, or an int >= 1.

    Raises:
        ValueError: an argument is invalid.
    """
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"lowrank_project: W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 3:
        raise ValueError(f"lowrank_project: W must be 3-D [B, p, q], got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"lowrank_project: W must be floating point, got {W.dtype}")
    check_energy(energy, "lowrank_project: energy")
    check_max_rank(max_rank, "lowrank_project: max_rank")


def finite_flag(W: Tensor) -> Tensor:
    """Whether every matrix of W may be finite, without a host synchronisation.

    One sum per matrix: NaN and Inf propagate, but a finite overflow also gives False, so False needs
    finite_rows.

    Args:
        W: tensor [B, p, q].

    Returns:
        A 0-dim bool tensor on W's device: True when no matrix holds NaN or Inf.
    """
    return torch.isfinite(W.sum(dim=(1, 2))).all()


def finite_rows(W: Tensor) -> Tensor:
    """Whether each matrix of W is entirely finite (the exact, element-wise test).

    Args:
        W: tensor [B, p, q].

    Returns:
        A bool tensor [B].
    """
    return torch.isfinite(W).flatten(1).all(dim=1)


def check_finite(W: Tensor) -> None:
    """Raise when some matrix of W holds NaN or Inf (one host synchronisation in the usual case).

    Args:
        W: tensor [B, p, q].

    Raises:
        ValueError: naming the first batch index that holds NaN or Inf.
    """
    if W.numel() == 0 or bool(finite_flag(W)):
        return
    finite = finite_rows(W)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"lowrank_project: W[{bad}] contains NaN or Inf; nothing was computed")


def _compiled(W, max_rank, subgradient):
    """Whether the compiled full solve may run on W's device: built, chosen (backend_for) and trusted by its
    self-check (trp_kernels/selfcheck.py, first use per dtype and shape)."""
    if backend_for(W.device) != "cpp":
        return False
    if not selfcheck.applies(W.device, compiled_cpu=True) or W.shape[0] == 0 or min(W.shape[1:]) == 0:
        return True
    signature = (W.dtype, tuple(W.shape[1:]), "subgradient" if subgradient else "no subgradient",
                 "max_rank" if max_rank is not None else "energy rule")
    return selfcheck.verify("lowrank_project", W.device, signature, lambda: probes.projection(
        torch.ops.trp_kernels_C.lowrank_project, W.shape, W.dtype, W.device, max_rank, subgradient))


@torch.library.custom_op("trp_kernels::lowrank_project", mutates_args=())
def _lowrank_project_op(W: Tensor, energy: float, max_rank: Optional[int], subgradient: bool,
                        check: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    if check:
        check_finite(W)
    with precision.ieee_matmul(W.device.type):
        if _compiled(W, max_rank, subgradient):
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


def _cold_with_basis(W, energy, max_rank, subgradient, cpp):
    """The full solve plus the eigenvectors of the Gram matrix [B, n, n] float64 (columns, descending), by the
    compiled kernel when `cpp` (the caller has checked that it has lowrank_project_basis), else the reference."""
    if cpp:
        W_low, rank, G, basis = torch.ops.trp_kernels_C.lowrank_project_basis(W, energy, max_rank, subgradient)
    else:
        W_low, rank, G, basis = reference.lowrank_project_basis(W, energy, max_rank, subgradient)
    return W_low, rank, (G if subgradient else W.new_empty(0)), basis


def warm_usable(basis: Optional[Tensor], shape: Sequence[int], device: str | torch.device,
                energy: float) -> bool:
    """Whether a call takes the warm step from `basis`.

    That needs a state of this batch (trp_kernels.warm.is_basis, [B, n, m] with 1 <= m <= n, on the device)
    that is worth it (n >= MIN_N, m <= MAX_FRACTION * n), at an energy below 1 (which keeps every direction).

    Args:
        basis: the WarmStart's basis (None, or a tensor).
        shape: the matrices' shape (B, p, q); n = min(p, q).
        device: the matrices' device.
        energy: the call's energy, in (0, 1].

    Returns:
        Whether the warm step runs.
    """
    B, p, q = shape
    n = min(p, q)
    return (_warm.is_basis(basis) and basis.device == torch.device(device) and basis.shape[0] == B
            and basis.shape[1] == n and 1 <= basis.shape[2] <= n and n >= _warm.MIN_N
            and basis.shape[2] <= _warm.MAX_FRACTION * n and energy < 1.0)


def sketch_usable(shape: Sequence[int], device: str | torch.device, energy: float) -> bool:
    """Whether a call without a usable state first tries random blocks (trp_kernels.warm.sketched_step).

    Only large matrices (n >= SKETCH_MIN_N) on the CPU, where the full eigensolve costs tens of seconds, at an
    energy below 1.

    Args:
        shape: the matrices' shape (B, p, q); n = min(p, q).
        device: the matrices' device.
        energy: the call's energy, in (0, 1].

    Returns:
        Whether the random start is tried.
    """
    return torch.device(device).type == "cpu" and min(shape[1:]) >= _warm.SKETCH_MIN_N and energy < 1.0


def large_usable(basis: Tensor, shape: Sequence[int], device: str | torch.device) -> bool:
    """Whether a warm step (warm_usable holds) skips the Gram matrix (trp_kernels.warm.large_step).

    Large matrices (n >= LARGE_MIN_N) on the CPU with a narrow basis (m <= LARGE_MAX_FRACTION * n), where
    products with the matrix cost less than its Gram matrix.

    Args:
        basis: the WarmStart's basis [B, n, m], usable (warm_usable).
        shape: the matrices' shape (B, p, q); n = min(p, q).
        device: the matrices' device.

    Returns:
        Whether the warm step runs without the Gram matrix.
    """
    n = min(shape[1:])
    return (torch.device(device).type == "cpu" and n >= _warm.LARGE_MIN_N
            and basis.shape[2] <= _warm.LARGE_MAX_FRACTION * n)


def _compiled_warm(W, basis, max_rank, subgradient):
    """Whether the compiled warm step may run on W's device from `basis` (as _compiled: built and trusted). The
    shape class includes whether the basis is narrow enough for the Jacobi eigensolver of the Ritz step."""
    if not _extension.has_kernel("lowrank_project_warm", _dispatch_key(W.device)):
        return False
    if not selfcheck.applies(W.device, compiled_cpu=True):
        return True
    m = basis.shape[2]
    jacobi = probes.JACOBI_MAX_N
    signature = (W.dtype, tuple(W.shape[1:]), f"basis width {'<=' if m <= jacobi else '>'} {jacobi}",
                 "subgradient" if subgradient else "no subgradient",
                 "max_rank" if max_rank is not None else "energy rule")
    return selfcheck.verify("lowrank_project_warm", W.device, signature, lambda: probes.warm_step(
        _warm.compiled_step, W.shape, W.dtype, W.device, m, max_rank, subgradient))


class _Pending:
    """One batch's warm-start call between its launch (no host synchronisation) and its finish: the results so far
    and what the finish needs to know from the device (the largest rank; whether some matrix fell back)."""

    def __init__(self, W, energy, max_rank, subgradient, cpp, results, warm):  # cpp None: not decided yet
        self.W, self.energy, self.max_rank, self.subgradient, self.cpp = W, energy, max_rank, subgradient, cpp
        self.results, self.warm = results, warm  # (W_low, rank, G, vectors, ok); warm: ok is meaningful

    def device_values(self):
        """0-dim int64 tensors on the device: (largest rank, number of matrices that need the full solve)."""
        rank, ok = self.results[1], self.results[4]
        top = rank.max() if rank.numel() else rank.new_zeros(())
        return top, ((~ok).sum() if self.warm else rank.new_zeros(()))


def _warm_launch(W, basis, energy, max_rank, subgradient):
    """Runs one warm-start call up to the point where the host must look at the results (no synchronisation on the
    GPU): the full solve with its basis when `basis` is not a usable state, else the warm step."""
    B, p, q = W.shape
    n = min(p, q)
    with precision.ieee_matmul(W.device.type):
        key = _dispatch_key(W.device)
        if backend_for(W.device) != "cpp" or _extension.has_kernel("lowrank_project_basis", key):
            # the routes that run no compiled kernel: its self-check (a full solve of this shape on first use)
            # waits until some matrix falls back (_warm_finish)
            usable = warm_usable(basis, W.shape, W.device, energy)
            if usable and large_usable(basis, W.shape, W.device):
                return _Pending(W, energy, max_rank, subgradient, None,
                                _warm.large_step(W, basis, energy, max_rank, subgradient), warm=True)
            if not usable and sketch_usable(W.shape, W.device, energy):  # large and cold on the CPU
                return _Pending(W, energy, max_rank, subgradient, None,
                                _warm.sketched_step(W, energy, max_rank, subgradient), warm=True)
        cpp = _compiled(W, max_rank, subgradient)
        if cpp and not _extension.has_kernel("lowrank_project_basis", key):
            # a compiled extension older than the warm start: its full solve, as without a state (and no state)
            W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project(W, energy, max_rank, subgradient)
            no_state = W.new_zeros(B, n, 0, dtype=torch.float64)
            return _Pending(W, energy, max_rank, subgradient, cpp, (W_low, rank, G if subgradient else W.new_empty(0),
                                                                    no_state, rank.new_zeros(B, dtype=torch.bool)),
                            warm=False)
        if not warm_usable(basis, W.shape, W.device, energy):
            W_low, rank, G, full = _cold_with_basis(W, energy, max_rank, subgradient, cpp)
            return _Pending(W, energy, max_rank, subgradient, cpp,
                            (W_low, rank, G, full, rank.new_zeros(B, dtype=torch.bool)), warm=False)
        step = _warm.compiled_step if cpp and _compiled_warm(W, basis, max_rank, subgradient) else _warm.step
        return _Pending(W, energy, max_rank, subgradient, cpp, step(W, basis, energy, max_rank, subgradient),
                        warm=True)


def _fallback(W, energy, max_rank, subgradient, cpp):
    """The solve of matrices whose warm step failed its certificate: the full solve with its basis, tried first
    from certified random blocks where a cold call would (sketch_usable; large matrices on the CPU)."""
    if not sketch_usable(W.shape, W.device, energy):
        return _cold_with_basis(W, energy, max_rank, subgradient, cpp)
    W_low, rank, G, X, ok = _warm.sketched_step(W, energy, max_rank, subgradient)
    if bool(ok.all()):
        return W_low, rank, G, X
    cold = (~ok).nonzero().squeeze(1)
    c_low, c_rank, c_G, c_basis = _cold_with_basis(W[cold], energy, max_rank, subgradient, cpp)
    W_low[cold], rank[cold] = c_low, c_rank
    if subgradient:
        G[cold] = c_G
    vectors = torch.zeros(*X.shape[:2], max(X.shape[-1], int(c_rank.max())), dtype=X.dtype, device=X.device)
    vectors[..., :X.shape[-1]] = X
    vectors[cold] = c_basis[..., :vectors.shape[-1]]  # the full solve's basis has n columns
    return W_low, rank, G, vectors


def _warm_finish(pending, top, fallbacks):
    """(W_low, rank, G, next basis, ok) of a launched call, given its device values read on the host (`top`: the
    largest rank, `fallbacks`: how many matrices failed their certificate). Only when some did does this
    synchronise again (their full solve)."""
    W_low, rank, G, X, ok = pending.results
    if X.shape[-1] == 0:  # an extension without the warm start: no state
        return pending.results
    if not fallbacks:
        return W_low, rank, G, _warm.next_basis(X, rank, top), ok
    W, energy, max_rank, subgradient = pending.W, pending.energy, pending.max_rank, pending.subgradient
    B, n = W.shape[0], min(W.shape[1:])
    cold = (~ok).nonzero().squeeze(1)
    with precision.ieee_matmul(W.device.type):
        cpp = pending.cpp if pending.cpp is not None else _compiled(W, max_rank, subgradient)
        c_low, c_rank, c_G, c_basis = _fallback(W[cold], energy, max_rank, subgradient, cpp)
    W_low[cold], rank[cold] = c_low, c_rank
    if subgradient:
        G[cold] = c_G
    vectors = torch.zeros(B, n, max(X.shape[-1], int(c_rank.max()) if c_rank.numel() else 0),
                          dtype=X.dtype, device=X.device)
    vectors[..., :X.shape[-1]] = X
    width = min(vectors.shape[-1], c_basis.shape[-1])  # a fallback's basis holds at least its ranks
    vectors[cold] = 0.0
    vectors[cold, :, :width] = c_basis[..., :width]
    return W_low, rank, G, _warm.next_basis(vectors, rank), ok


def _host_values(pendings):
    """Each launched call's (largest rank, fallback count) as Python ints: one device-to-host copy (one
    synchronisation) per device for all of them."""
    values = [None] * len(pendings)
    by_device = {}
    for i, pending in enumerate(pendings):
        by_device.setdefault(pending.W.device, []).append(i)
    for indices in by_device.values():
        flat = torch.stack([v for i in indices for v in pendings[i].device_values()]).tolist()
        for j, i in enumerate(indices):
            values[i] = (int(flat[2 * j]), int(flat[2 * j + 1]))
    return values


@torch.library.custom_op("trp_kernels::lowrank_project_warm", mutates_args=())
def _lowrank_project_warm_op(W: Tensor, basis: Optional[Tensor], energy: float, max_rank: Optional[int],
                             subgradient: bool, check: bool = True
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if check:
        check_finite(W)
    pending = _warm_launch(W, basis, energy, max_rank, subgradient)
    return _warm_finish(pending, *_host_values([pending])[0])


@_lowrank_project_warm_op.register_fake
def _(W, basis, energy, max_rank, subgradient, check=True):
    B, p, q = W.shape
    n = min(p, q)
    m = torch.library.get_ctx().new_dynamic_size(min=0, max=max(n, 1))  # the largest rank (at least 1)
    G = W.new_empty(W.shape) if subgradient else W.new_empty(0)
    return (W.new_empty(W.shape), W.new_empty((B,), dtype=torch.int64), G,
            W.new_empty((B, n, m), dtype=torch.float64), W.new_empty((B,), dtype=torch.bool))


class WarmStart:
    """State that lets consecutive lowrank_project calls on slowly moving matrices skip the full eigensolve.

    Per matrix it holds the leading singular vectors of the smaller side found by the previous call, and which
    matrices of that call took the warm path. Pass the same object to every call on the same batch of matrices:

        state = trp_kernels.WarmStart()
        for ...:
            W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)

    The results meet the same contract as without it (each matrix is checked and, where the check fails,
    solved in full); only the time differs. A state from other matrices (another batch size, shape or device)
    is not an error: that call solves in full and starts a new state.

    Attributes:
        basis: None before the first call, else a float64 tensor [B, n, m] with n = min(p, q): each matrix's
            kept singular vectors as columns, zero columns up to the batch's largest rank m.
        warm: None before the first call, else a bool tensor [B]: which matrices of the last call took the
            warm path (on a call without a usable state, which large matrices took the certified random start).
    """

    def __init__(self):
        self.basis: Optional[Tensor] = None
        self.warm: Optional[Tensor] = None

    def reset(self) -> None:
        """Forget the state: the next call solves every matrix in full."""
        self.basis = self.warm = None

    def state_dict(self) -> dict:
        """The state to save (the basis; the warm flags describe the last call only and are not saved).

        Returns:
            A dict {"basis": None or the float64 tensor [B, n, m]}.
        """
        return {"basis": self.basis}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by state_dict.

        Args:
            state: a dict {"basis": None or a float64 tensor [B, n, m]}, as state_dict returns. A basis that
                does not fit the next call's matrices is not an error (that call solves in full).

        Raises:
            ValueError: state is not a dict, or its basis is neither None nor a 3-D float64 tensor.
        """
        basis = state.get("basis") if isinstance(state, dict) else None
        if not isinstance(state, dict) or (basis is not None and not _warm.is_basis(basis)):
            raise ValueError("WarmStart.load_state_dict: expected {'basis': None or a float64 tensor [B, n, m]}, "
                             f"got {state!r:.200}")
        self.basis, self.warm = basis, None

    def __repr__(self):
        shape = None if self.basis is None else tuple(self.basis.shape)
        return f"WarmStart(basis={shape})"


def lowrank_project(W: Tensor, energy: float, *, max_rank: Optional[int] = None, subgradient: bool = False,
                    check_finite: bool = True, warm: Optional[WarmStart] = None
                    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Project each matrix of a batch on its truncated SVD, keeping a fraction of its energy.

    rank[b] is the smallest k >= 1 whose leading k squared singular values keep at least `energy` of their
    total (0 for an all-zero matrix), capped by max_rank; W_low[b] = U_k S_k V_k^T and, when asked,
    G[b] = U_k V_k^T (the nuclear-norm subgradient). float16 / bfloat16 are computed in float32 and returned
    in W's dtype; W is never modified. Runs the compiled C++/CUDA kernels when built, else the PyTorch
    reference (TRP_PROJECT_BACKEND=auto|cpp|reference forces a choice).

    Args:
        W: floating-point tensor [B, p, q] (B >= 0 matrices of p x q), on the CPU or a CUDA device.
        energy: fraction of the squared singular values (the energy) each matrix keeps, in (0, 1];
            1 keeps every nonzero direction.
        max_rank: None (no cap), or the largest rank kept, an int >= 1.
        subgradient: also return G, the nuclear-norm subgradient U_k V_k^T (default False).
        check_finite: test W for NaN/Inf first, one host synchronisation (default True). False is for
            callers that have tested W already; the results are undefined for non-finite input then.
        warm: None, or a WarmStart carried between calls on the same slowly moving matrices: each call
            starts from the previous call's kept basis and updates it (same results, less time).

    Returns:
        A tuple (W_low, rank, G): W_low has W's shape and dtype, rank is int64 [B], G has W's shape and
            dtype when subgradient is True, else None.

    Raises:
        ValueError: W is not a 3-D floating-point tensor, energy is not in (0, 1], max_rank is not None
            or an int >= 1, (check_finite) some matrix holds NaN or Inf, or TRP_PROJECT_BACKEND holds an
            invalid value.
        TypeError: warm is neither None nor a WarmStart.
        RuntimeError: TRP_PROJECT_BACKEND=cpp and the compiled extension has no kernel for W's device.
    """
    validate(W, energy, max_rank)
    if warm is not None:
        if not isinstance(warm, WarmStart):
            raise TypeError(f"lowrank_project: warm must be a trp_kernels.WarmStart or None, got "
                            f"{type(warm).__name__}")
        W_low, rank, G, warm.basis, warm.warm = _lowrank_project_warm_op(
            W, warm.basis, float(energy), max_rank, bool(subgradient), bool(check_finite))
        return W_low, rank, (G if subgradient else None)
    W_low, rank, G = _lowrank_project_op(W, float(energy), max_rank, bool(subgradient), bool(check_finite))
    return W_low, rank, (G if subgradient else None)


def _check_finite_each(Ws):
    for W in Ws:
        check_finite(W)


def lowrank_project_many(Ws: list[Tensor], energy: float, *, max_rank: Optional[int] = None,
                         subgradient: bool = False, warms: Optional[list[Optional[WarmStart]]] = None,
                         check_finite: bool = True) -> list[tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Run lowrank_project on several batches of matrices with one host synchronisation per device.

    Each batch's call runs up to the point where its results must be read on the host, then one copy reads
    them all (instead of two synchronisations per batch on the warm path). Results equal lowrank_project's
    on each batch.

    Args:
        Ws: list of floating-point tensors [B_i, p_i, q_i] (e.g. one per layer shape; any shapes, dtypes
            and devices).
        energy: fraction of the squared singular values each matrix keeps, in (0, 1] (as lowrank_project).
        max_rank: None (no cap), or the largest rank kept, an int >= 1, for every batch.
        subgradient: also return each batch's nuclear-norm subgradient G (default False).
        warms: None, or a list with one WarmStart (or None: no warm start) per batch, same length as Ws.
        check_finite: test each batch for NaN/Inf first, one synchronisation per batch (default True).

    Returns:
        A list with one (W_low, rank, G or None) tuple per batch, as lowrank_project returns.

    Raises:
        ValueError: a batch is not a valid input (lowrank_project's checks) or holds NaN or Inf.
        TypeError: warms is not None or a list of WarmStart / None of the same length as Ws.
    """
    warms = [None] * len(Ws) if warms is None else list(warms)
    if len(warms) != len(Ws) or not all(w is None or isinstance(w, WarmStart) for w in warms):
        raise TypeError("lowrank_project_many: warms must be None or one trp_kernels.WarmStart (or None) per batch")
    for W in Ws:
        validate(W, energy, max_rank)
    out = [None] * len(Ws)
    pending = []
    for i, (W, state) in enumerate(zip(Ws, warms)):
        if state is None:
            out[i] = lowrank_project(W, energy, max_rank=max_rank, subgradient=subgradient,
                                     check_finite=check_finite)
            continue
        if check_finite:
            _check_finite_each([W])
        pending.append((i, _warm_launch(W, state.basis, float(energy), max_rank, bool(subgradient))))
    for (i, p), values in zip(pending, _host_values([p for _, p in pending])):
        W_low, rank, G, warms[i].basis, warms[i].warm = _warm_finish(p, *values)
        out[i] = (W_low, rank, G if subgradient else None)
    return out


def backend_info() -> dict:
    """Which implementation lowrank_project runs on each device type.

    Returns:
        A dict: "cpu" and "cuda" ("cpp" or "reference"; "cuda" is None without a CUDA device),
            "compiled_cpu" and "compiled_cuda" (whether the extension has the kernel) and "cuda_kernel_images"
            ({device index: kernel image version} of the devices asked so far).
    """
    return {
        "cpu": backend_for("cpu"),
        "cuda": backend_for("cuda") if torch.cuda.is_available() else None,
        "compiled_cpu": _extension.has_kernel("lowrank_project", "CPU"),
        "compiled_cuda": _extension.has_kernel("lowrank_project", "CUDA"),
        "cuda_kernel_images": _extension.cuda_images(),
    }
