"""trp_kernels.lowrank_project: every built backend against float64 SVD, bad input, opcheck, compile,
the shared Jacobi core, backend selection and fallback (CUDA toolkit discovery: test_packaging.py)."""
import math
import warnings

import pytest
import torch

import trp_kernels
from trp_kernels import _extension, project, reference
from trp_kernels import warm as warm_mod

HAS_CPP = _extension.has_kernel("lowrank_project", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="trp_kernels._C not built")
ENERGIES = (0.5, 0.9, 0.99, 1.0)
TIE = 1e-6  # ranks may differ where the cumulative energy is this close to the threshold


# --- test matrices and the float64 ground truth ----------------------------------------------------

def orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def spectrum(kind, k, gen):
    i = torch.arange(k, dtype=torch.float64)
    if kind == "decay":
        return 0.8 ** i
    if kind == "flat":
        return 1.0 + 0.5 * torch.rand(k, generator=gen, dtype=torch.float64).sort(descending=True).values
    if kind == "lowrank":
        return torch.where(i < max(1, k // 3), 0.7 ** i, torch.zeros_like(i))
    if kind == "repeated":
        return torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)[(i * 4 / k).long()]
    if kind == "zero":
        return torch.zeros(k, dtype=torch.float64)
    raise ValueError(kind)


def make_batch(B, p, q, kind, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    k = min(p, q)
    mats = [orthonormal(p, k, gen) @ torch.diag(spectrum(kind, k, gen)) @ orthonormal(q, k, gen).T
            for _ in range(B)]
    return torch.stack(mats).to(dtype) if B else torch.empty(0, p, q, dtype=dtype)


def acceptable_rank(S, energy, max_rank, rank):
    """Whether `rank` satisfies the energy rule for singular values S (float64) up to TIE."""
    s2 = S.square()
    total = float(s2.sum())
    if total == 0.0:
        return rank == 0
    cum = torch.cumsum(s2, 0) / total
    k = int(rank)
    if k < 1 or k > S.numel():
        return False
    if max_rank is not None and k == max_rank:
        return bool(cum[k - 2] < energy + TIE) if k >= 2 else True
    reaches = bool(cum[k - 1] >= energy - TIE)
    first = k == 1 or bool(cum[k - 2] < energy + TIE)
    return reaches and first


def check_projection(W, energy, W_low, rank, G=None, max_rank=None, tol=None):
    """W_low, rank (and G) against float64 SVD of W, matrix by matrix."""
    W64 = W.to(torch.float64)
    tol = tol if tol is not None else {torch.float32: 1e-5, torch.float64: 1e-9}.get(W.dtype, 1e-2)
    assert W_low.dtype == W.dtype and W_low.shape == W.shape
    assert rank.dtype == torch.int64 and rank.shape == (W.shape[0],)
    ref_rank = reference.energy_rank(torch.linalg.svdvals(W64), energy, max_rank) if W.shape[0] else rank
    for b in range(W.shape[0]):
        U, S, Vh = torch.linalg.svd(W64[b], full_matrices=False)
        k = int(rank[b])
        norm = float(S.norm())
        assert acceptable_rank(S, energy, max_rank, k), (b, k, int(ref_rank[b]), S[:8])
        low = W_low[b].to(torch.float64)
        if norm == 0.0:
            assert k == 0 and float(low.abs().max()) == 0.0
            if G is not None:
                assert float(G[b].abs().max()) == 0.0
            continue
        # Well separated at the cut (relative gap > 1e-2: float32 SVD, the reference, resolves the
        # subspace to ~1e-6 there): the truncated SVD is unique, compare it directly.
        gap = k == S.numel() or float(S[k - 1] - S[k]) > 1e-2 * float(S[0])
        if gap:
            ref = (U[:, :k] * S[:k]) @ Vh[:k]
            assert float((low - ref).norm()) <= tol * norm, (b, k, float((low - ref).norm()) / norm)
            if G is not None and float(S[k - 1]) > 1e-4 * float(S[0]):
                refG = U[:, :k] @ Vh[:k]
                err = float((G[b].to(torch.float64) - refG).norm())
                assert err <= max(tol, 1e-5) * 10 * math.sqrt(k), (b, k, err)
        else:  # close or equal singular values at the cut: W_low must still be a best rank-k approximation
            s_low = torch.linalg.svdvals(low)
            assert float((s_low[:k] - S[:k]).norm()) <= tol * norm * 10
            assert float(s_low[k:].norm()) <= tol * norm * 10
            err = float((W64[b] - low).norm())
            assert abs(err - float(S[k:].norm())) <= tol * norm * 10


# --- backends ----------------------------------------------------------------------------------------

def run_reference(W, energy, max_rank=None, subgradient=False):
    return reference.lowrank_project(W, energy, max_rank, subgradient)


def cpp_solver(solver, device="cpu"):
    def run(W, energy, max_rank=None, subgradient=False):
        W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project_solver(
            W.to(device), energy, max_rank, subgradient, solver)
        return W_low.cpu(), rank.cpu(), (G.cpu() if subgradient else None)
    return run


def public(W, energy, max_rank=None, subgradient=False):
    return trp_kernels.lowrank_project(W, energy, max_rank=max_rank, subgradient=subgradient)


CPU_BACKENDS = {"reference": run_reference, "public": public}
if HAS_CPP:
    CPU_BACKENDS.update({f"cpp-{s}": cpp_solver(s) for s in ("auto", "jacobi", "lapack", "lapack_batched")})


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
@pytest.mark.parametrize("kind", ["decay", "flat", "lowrank", "repeated", "zero"])
# (2, 13, 31) and (1, 1, 7): odd row counts and row lengths for the per-matrix path's Gram kernel (2 x 4 tiles,
# 4-wide vectors)
@pytest.mark.parametrize("shape", [(3, 12, 20), (2, 21, 9), (2, 13, 31), (1, 1, 7)])
def test_against_svd(backend, kind, shape):
    W = make_batch(*shape, kind, seed=len(kind) * 31 + shape[1])  # deterministic (str hash is not)
    W_in = W.clone()
    for energy in ENERGIES:
        W_low, rank, G = CPU_BACKENDS[backend](W, energy, subgradient=True)
        check_projection(W, energy, W_low, rank, G)
        # without the subgradient the CPU kernel may project on the discarded directions instead
        W_low2, rank2, G2 = CPU_BACKENDS[backend](W, energy)
        assert G2 is None and torch.equal(rank2, rank)
        check_projection(W, energy, W_low2, rank2)
        assert torch.equal(W, W_in)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_batch_of_64_mixed_with_zero_matrices(backend):
    kinds = ["decay", "flat", "lowrank", "repeated"]
    W = torch.cat([make_batch(16, 16, 36, k, seed=i) for i, k in enumerate(kinds)])
    W[5] = 0.0
    W[40] = 0.0
    W_low, rank, G = CPU_BACKENDS[backend](W, 0.9, subgradient=True)
    assert rank[5] == 0 and rank[40] == 0
    check_projection(W, 0.9, W_low, rank, G)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_single_matrix_float64_and_max_rank(backend):
    W = make_batch(1, 10, 30, "flat", seed=3, dtype=torch.float64)
    W_low, rank, _ = CPU_BACKENDS[backend](W, 0.99)
    check_projection(W, 0.99, W_low, rank)
    W_low, rank, G = CPU_BACKENDS[backend](W, 0.99, max_rank=3, subgradient=True)
    assert int(rank[0]) == 3
    check_projection(W, 0.99, W_low, rank, G, max_rank=3)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_its_dtype(backend, dtype):
    W = make_batch(4, 8, 24, "decay", seed=1).to(dtype)
    W_low, rank, G = CPU_BACKENDS[backend](W, 0.9, subgradient=True)
    assert W_low.dtype == dtype and G.dtype == dtype
    # the float32 computation, rounded once to the output dtype
    check_projection(W.float(), 0.9, W_low.float(), rank, tol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", sorted(CPU_BACKENDS))
def test_empty_batch(backend):
    W = torch.empty(0, 5, 7)
    W_low, rank, G = CPU_BACKENDS[backend](W, 0.9, subgradient=True)
    assert W_low.shape == (0, 5, 7) and rank.shape == (0,) and rank.dtype == torch.int64
    assert G.shape == (0, 5, 7)


def test_public_op_returns_none_without_subgradient():
    W = make_batch(2, 6, 9, "decay")
    _, _, G = trp_kernels.lowrank_project(W, 0.9)
    assert G is None
    _, _, G = torch.ops.trp_kernels.lowrank_project(W, 0.9, None, False)
    assert G.numel() == 0


@needs_cpp
def test_cpp_and_reference_agree_exactly_on_ranks_of_typical_weights():
    torch.manual_seed(1)
    W = torch.randn(18, 32, 288) * 0.05
    _, r_ref, _ = run_reference(W, 0.9)
    _, r_cpp, _ = cpp_solver("auto")(W, 0.9)
    assert torch.equal(r_ref, r_cpp)


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"] + (["cpp"] if HAS_CPP else []))
def test_bad_input(backend, monkeypatch):
    monkeypatch.setenv(project.BACKEND_ENV, backend)
    W = make_batch(4, 5, 6, "decay")
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        Wb = W.clone()
        Wb[2, 1, 3] = bad_value
        before = Wb.clone()
        with pytest.raises(ValueError, match=r"W\[2\]"):
            trp_kernels.lowrank_project(Wb, 0.9)
        assert torch.equal(Wb, before) or (torch.isnan(Wb) == torch.isnan(before)).all()
    for energy in (0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.9", None):
        with pytest.raises(ValueError, match="energy"):
            trp_kernels.lowrank_project(W, energy)
    for shape in ((5, 6), (1, 2, 5, 6), ()):
        with pytest.raises(ValueError, match="3-D"):
            trp_kernels.lowrank_project(torch.zeros(shape), 0.9)
    for dtype in (torch.int32, torch.int64, torch.bool, torch.uint8):
        with pytest.raises(ValueError, match="floating"):
            trp_kernels.lowrank_project(torch.zeros(2, 3, 4, dtype=dtype), 0.9)
    for max_rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_rank"):
            trp_kernels.lowrank_project(W, 0.9, max_rank=max_rank)
    with pytest.raises(ValueError):
        trp_kernels.lowrank_project([[[1.0]]], 0.9)
    assert torch.equal(W, make_batch(4, 5, 6, "decay"))


def test_large_finite_values_are_not_rejected():
    W = torch.full((2, 3, 4), 3e38)  # finite, but each matrix's sum overflows float32
    W[1] = make_batch(1, 3, 4, "decay")[0]
    W_low, rank, _ = trp_kernels.lowrank_project(W, 0.9)
    assert int(rank[0]) == 1 and torch.isfinite(W_low[1]).all()


# --- torch.library integration --------------------------------------------------------------------------

@pytest.mark.parametrize("args", [(0.9, None, True), (0.5, 2, False), (1.0, None, False)])
def test_opcheck(args):
    W = make_batch(3, 7, 11, "decay")
    torch.library.opcheck(torch.ops.trp_kernels.lowrank_project.default, (W, *args))
    torch.library.opcheck(torch.ops.trp_kernels.lowrank_project.default, (W.transpose(1, 2), *args))


def test_torch_compile():
    W = make_batch(4, 9, 15, "flat")

    def step(w):
        low, rank, g = trp_kernels.lowrank_project(w, 0.9, subgradient=True)
        return low * 2.0 + 3e-4 * g, rank

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    low_c, rank_c = compiled(W)
    low_e, rank_e = step(W)
    torch.testing.assert_close(low_c, low_e)
    assert torch.equal(rank_c, rank_e)


# --- the shared Jacobi core ------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64])
def test_jacobi_core_against_eigh(n):
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
    sym = X + X.mT
    psd_deficient = X[:, :, : max(1, n // 2)] @ X[:, :, : max(1, n // 2)].mT
    Q = torch.stack([orthonormal(n, n, gen) for _ in range(2)])
    lam = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0]).repeat(n)[:n].to(torch.float64)
    repeated = Q @ torch.diag_embed(lam.expand(2, n)) @ Q.mT
    for A in (sym, psd_deficient, repeated, torch.zeros(1, n, n, dtype=torch.float64)):
        evals, evecs = torch.ops.trp_kernels_C.jacobi_eigh(A)
        ref = torch.linalg.eigvalsh(A).flip(-1)
        scale = max(1.0, float(A.abs().max()))
        assert float((evals - ref).abs().max()) <= 1e-12 * scale * n
        assert (evals[:, :-1] >= evals[:, 1:]).all()
        eye = torch.eye(n, dtype=torch.float64)
        assert float((evecs.mT @ evecs - eye).abs().max()) <= 1e-12 * n
        assert float((A @ evecs - evecs * evals.unsqueeze(1)).abs().max()) <= 1e-12 * scale * n


@needs_cpp
def test_jacobi_core_float32_input_and_bad_shape():
    A = torch.randn(2, 5, 5)
    A = A + A.mT
    evals, evecs = torch.ops.trp_kernels_C.jacobi_eigh(A)
    assert evals.dtype == torch.float64
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(A.double()).flip(-1))
    with pytest.raises(RuntimeError):
        torch.ops.trp_kernels_C.jacobi_eigh(torch.zeros(2, 3, 4))


# --- backend selection and fallback ----------------------------------------------------------------------

def test_backend_info():
    info = trp_kernels.backend_info()
    assert info["extension_loaded"] is HAS_CPP
    lr = info["lowrank_project"]
    assert lr["compiled_cpu"] is HAS_CPP
    assert lr["cpu"] == ("cpp" if HAS_CPP else "reference")
    assert lr["compiled_cuda"] == _extension.has_kernel("lowrank_project", "CUDA")
    assert (lr["cuda"] is None) == (not torch.cuda.is_available())


def test_backend_env(monkeypatch):
    monkeypatch.setenv(project.BACKEND_ENV, "reference")
    assert project.backend_for("cpu") == "reference"
    monkeypatch.setenv(project.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError):
        project.backend_for("cpu")


def test_fallback_when_extension_absent(monkeypatch):
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "error": "ImportError: simulated",
                                               "warned": False})
    monkeypatch.setenv(project.BACKEND_ENV, "auto")
    W = make_batch(2, 6, 10, "decay")
    with pytest.warns(RuntimeWarning, match="simulated"):
        W_low, rank, _ = trp_kernels.lowrank_project(W, 0.9)
    check_projection(W, 0.9, W_low, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        trp_kernels.lowrank_project(W, 0.9)
    assert trp_kernels.backend_info()["lowrank_project"]["cpu"] == "reference"
    monkeypatch.setenv(project.BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match="cpp"):
        trp_kernels.lowrank_project(W, 0.9)


# --- CUDA ---------------------------------------------------------------------------------------------------

CUDA_SOLVERS = ("auto", "jacobi", "lapack")


@pytest.mark.cuda
@pytest.mark.parametrize("solver", CUDA_SOLVERS)
@pytest.mark.parametrize("kind", ["decay", "flat", "lowrank", "repeated", "zero"])
@pytest.mark.parametrize("shape", [(3, 12, 20), (2, 21, 9), (64, 16, 36), (4, 64, 80)])
def test_cuda_against_svd(solver, kind, shape):
    assert _extension.has_kernel("lowrank_project", "CUDA"), trp_kernels.backend_info()
    W = make_batch(*shape, kind, seed=7)
    if shape[0] == 64:
        W[3] = 0.0
    run = cpp_solver(solver, "cuda")
    for energy in ENERGIES:
        W_low, rank, G = run(W, energy, subgradient=True)
        check_projection(W, energy, W_low, rank, G)
    W_low, rank, G = run(W, 0.99, max_rank=2, subgradient=True)
    check_projection(W, 0.99, W_low, rank, G, max_rank=2)


@pytest.mark.cuda
def test_cuda_public_op_large_n_dtypes_and_bad_input():
    W = make_batch(3, 96, 200, "decay", seed=2).cuda()  # n > 64: ATen eigh on the device
    W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    assert W_low.is_cuda and rank.is_cuda and G.is_cuda
    check_projection(W.cpu(), 0.9, W_low.cpu(), rank.cpu(), G.cpu())
    for dtype in (torch.float16, torch.bfloat16):
        Wh = W.to(dtype)
        W_low, rank, _ = trp_kernels.lowrank_project(Wh, 0.9)
        assert W_low.dtype == dtype
        check_projection(Wh.float().cpu(), 0.9, W_low.float().cpu(), rank.cpu(),
                         tol=4 * torch.finfo(dtype).eps)
    Wb = W.clone()
    Wb[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"W\[1\]"):
        trp_kernels.lowrank_project(Wb, 0.9)
    torch.library.opcheck(torch.ops.trp_kernels.lowrank_project.default, (W[:, :20, :30], 0.9, None, True))


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64])
def test_cuda_jacobi_core_matches_cpu(n):
    X = torch.randn(5, n, n, dtype=torch.float64)
    A = X + X.mT
    ev_gpu, V_gpu = torch.ops.trp_kernels_C.jacobi_eigh(A.cuda())
    ev_ref = torch.linalg.eigvalsh(A).flip(-1)
    assert float((ev_gpu.cpu() - ev_ref).abs().max()) <= 1e-12 * float(A.abs().max()) * n
    V = V_gpu.cpu()
    assert float((A @ V - V * ev_gpu.cpu().unsqueeze(1)).abs().max()) <= 1e-12 * float(A.abs().max()) * n


@pytest.mark.parametrize("spectrum", ["trp_like", "flat"])
def test_large_cold_projection_starts_from_random_blocks(spectrum, monkeypatch):
    """n >= SKETCH_MIN_N without a state: a certified random block (a decaying spectrum, as after TRP) or the
    full solve (a flat one) - either way the float64 SVD's rank and W_low within 1e-5, and U_k V_k^T. The
    limit is lowered to keep the reference SVD cheap (benchmarks/large_layer.py times VGG's 4096 x 25088)."""
    monkeypatch.setattr(warm_mod, "SKETCH_MIN_N", 600)
    gen = torch.Generator().manual_seed(0)
    p, q = 600, 1100
    if spectrum == "trp_like":
        W = torch.randn(p, 60, generator=gen) @ torch.randn(60, q, generator=gen) / 8 + 1e-3 * torch.randn(
            p, q, generator=gen)
    else:
        W = torch.randn(p, q, generator=gen)
    state = trp_kernels.WarmStart()
    W_low, rank, G = trp_kernels.lowrank_project(W[None], 0.9, subgradient=True, warm=state)
    assert bool(state.warm[0]) == (spectrum == "trp_like")  # the certified random start, or the full solve
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    k = int(reference.energy_rank(S, 0.9))
    assert int(rank[0]) == k
    ref = (U[:, :k] * S[:k]) @ Vh[:k]
    assert float((W_low[0].double() - ref).norm() / W.double().norm()) <= 1e-5
    assert float((G[0].double() - U[:, :k] @ Vh[:k]).norm() / math.sqrt(k)) <= 1e-4
    assert state.basis.shape == (1, p, k)
