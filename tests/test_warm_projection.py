"""Warm-started lowrank_project (trp_kernels/warm.py, WarmStart): equal to the full solve within the contract
over SGD-like trajectories (rank changes, energy changes, max_rank), pathological matrices, fallback, the
compiled step against its Python specification, the op schema, and RankPruner carrying the state. The `cuda`
backend (the CUDA kernel: warm_driver.h on the device) runs in benchmarks/gpu_suite.sh."""
import io
import warnings

import pytest
import torch

import trp
import trp_kernels
from test_lowrank_project import check_projection, make_batch
from trp.core.schemes import to_matrix
from trp_kernels import WarmStart, _extension, project, warm

HAS_CPP = _extension.has_kernel("lowrank_project_warm", "CPU")
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
# cpp: the CPU kernel's own choice (one matrix per thread at these sizes); cpp-batched: its batched driver (the
# one large matrices and the GPU run); cuda: the compiled CUDA kernel on the GPU
BACKENDS = ["reference"] + (["cpp", "cpp-batched"] if HAS_CPP else []) + [CUDA]


def need_cuda_kernel():
    if not _extension.has_kernel("lowrank_project_warm", "CUDA"):
        pytest.skip(f"trp_kernels._C has no CUDA warm kernel ({_extension.error() or 'built without CUDA'})")


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.fixture(autouse=True)
def _small_matrices_too(monkeypatch):
    """The tests' small matrices (n >= 16) take the warm path too (warm.MIN_N is a speed threshold)."""
    monkeypatch.setattr(warm, "MIN_N", 16)


def solver_step(solver):
    """warm.compiled_step with the CPU kernel's path chosen explicitly."""
    real = warm.compiled_step  # the module's, even while a test has patched it
    return lambda W, basis, energy, max_rank, subgradient: real(W, basis, energy, max_rank, subgradient, solver)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "cuda":
        need_cuda_kernel()
    monkeypatch.setenv(project.BACKEND_ENV, "cpp" if request.param == "cuda" else request.param.split("-")[0])
    if request.param == "cpp-batched":
        monkeypatch.setattr(warm, "compiled_step", solver_step("batched"))
    return request.param


def cold(W, energy, max_rank=None):
    return trp_kernels.lowrank_project(W, energy, max_rank=max_rank, subgradient=True)


def assert_same_as_cold(W, energy, out, max_rank=None, svd=True):
    """The contract: the full solve's rank exactly, W_low within 1e-5 of it (relative to ||W||), G = U_k V_k^T
    (checked against float64 SVD, like every backend of the op, when `svd`)."""
    W_low, rank, G = out
    c_low, c_rank, _ = cold(W, energy, max_rank)
    assert torch.equal(rank, c_rank)
    err = (W_low - c_low).flatten(1).norm(dim=1) / W.flatten(1).norm(dim=1).clamp_min(1e-30)
    assert float(err.max()) <= 1e-5
    assert torch.isfinite(W_low).all() and torch.isfinite(G).all()
    if svd:
        check_projection(W, energy, W_low, rank, G, max_rank=max_rank)


def sgd_like(W_low, size, gen):
    """The next weights of a TRP run: the projected weights plus a dense update of relative size `size`."""
    rms = W_low.flatten(1).square().mean(dim=1).sqrt().clamp_min(1e-3)[:, None, None]
    return W_low + size * rms * torch.randn(W_low.shape, generator=gen, dtype=W_low.dtype).to(W_low.device)


@pytest.mark.parametrize("shape", [(3, 20, 44), (3, 36, 18)])
def test_fifty_step_trajectory_equals_full_solve(backend, shape):
    """Ranks shrink as TRP projects, grow after a larger update, and follow energy changes (a budget)."""
    if backend == "reference" and shape[1] > shape[2] and HAS_CPP:
        pytest.skip("the reference's p > q case: test_compiled_step_matches_its_python_specification")
    gen = torch.Generator().manual_seed(shape[1])
    W = (make_batch(*shape, "decay", seed=3) + 0.05 * make_batch(*shape, "flat", seed=4)).to(device_of(backend))
    state, warm_calls, ranks = WarmStart(), 0, set()
    for t in range(50):
        energy = (0.9, 0.8, 0.95)[(t // 10) % 3]
        out = trp_kernels.lowrank_project(W, energy, subgradient=True, warm=state)
        assert_same_as_cold(W, energy, out, svd=t % 7 == 0)
        assert state.warm.shape == (shape[0],) and state.basis.shape[:2] == (shape[0], min(shape[1:]))
        assert state.basis.shape[2] == max(int(out[1].max()), 1)
        warm_calls += int(state.warm.sum())
        ranks.update(out[1].tolist())
        W = sgd_like(out[0], 0.3 if t % 10 == 9 else 0.01, gen)
    assert warm_calls >= 0.6 * 49 * shape[0], warm_calls  # the warm path carried most of the trajectory
    assert len(ranks) >= 4


def test_trajectory_with_max_rank_and_float64(backend):
    """max_rank decides the rank at every step (energy 0.99999 wants more than 6 directions)."""
    gen = torch.Generator().manual_seed(1)
    W = make_batch(3, 24, 40, "flat", seed=5, dtype=torch.float64).to(device_of(backend))
    state, warm_calls = WarmStart(), 0
    for t in range(12):
        out = trp_kernels.lowrank_project(W, 0.99999, max_rank=6, subgradient=True, warm=state)
        assert out[1].tolist() == [6, 6, 6]
        assert_same_as_cold(W, 0.99999, out, max_rank=6, svd=t % 4 == 0)
        warm_calls += int(state.warm.sum())
        W = sgd_like(out[0], 0.01, gen)
    assert warm_calls >= 2 * 11


def test_pathological_matrices(backend):
    """Repeated singular values, a zeroed matrix, a sudden large update: NaN-free and within the contract."""
    gen = torch.Generator().manual_seed(2)
    dev = device_of(backend)
    W = torch.cat([make_batch(2, 24, 48, "repeated", seed=6), make_batch(2, 24, 48, "decay", seed=7)]).to(dev)
    state = WarmStart()
    out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
    for t in range(6):
        W = sgd_like(out[0], 0.01, gen)
        if t == 2:
            W[1] = 0.0   # a layer set to zero
        if t == 4:
            W[3] = torch.randn(24, 48, generator=gen).to(dev)  # a sudden large update
        out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
        assert_same_as_cold(W, 0.9, out)
        if t == 2:
            assert out[1][1] == 0 and float(out[0][1].abs().max()) == 0.0
        if t == 4:
            assert not bool(state.warm[3])  # the update is not "small": the full solve
    # exactly repeated singular values at the cut: still the same rank and a best approximation
    W = make_batch(3, 20, 40, "repeated", seed=8).to(dev)
    state = WarmStart()
    for _ in range(3):
        out = trp_kernels.lowrank_project(W, 0.5, subgradient=True, warm=state)
        assert_same_as_cold(W, 0.5, out)


@pytest.mark.parametrize("corrupt", ["nan", "random", "repeated-column", "shape", "device-dtype"])
def test_a_bad_state_falls_back_to_the_full_solve(backend, corrupt):
    """A corrupted state is never an error: a repeated column makes Cholesky QR break down, whose garbage Q must
    not reach the eigensolver (it raised "linalg.eigh: ... failed to converge" before)."""
    dev = device_of(backend)
    W = make_batch(3, 20, 36, "decay", seed=9).to(dev)
    state = WarmStart()
    trp_kernels.lowrank_project(W, 0.9, warm=state)
    gen = torch.Generator().manual_seed(3)
    if corrupt == "nan":
        state.basis[1] = float("nan")
    elif corrupt == "random":
        state.basis = torch.linalg.qr(torch.randn(3, 20, state.basis.shape[2], generator=gen,
                                                  dtype=torch.float64))[0].to(dev)
    elif corrupt == "repeated-column":
        assert state.basis.shape[2] >= 2
        state.basis[..., 1] = state.basis[..., 0]
    elif corrupt == "shape":
        state.basis = state.basis[:2]
    else:
        state.basis = state.basis.float()
    out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
    assert_same_as_cold(W, 0.9, out)
    if corrupt in ("shape", "device-dtype", "repeated-column"):
        assert not bool(state.warm.any())
    if corrupt == "nan":
        assert not bool(state.warm[1])
    assert state.basis.shape[:2] == (3, 20) and state.basis.dtype == torch.float64
    assert state.basis.device == W.device


@pytest.mark.parametrize("solver", ["auto", "per_matrix", "batched", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_compiled_step_matches_its_python_specification(solver, dtype):
    """The CPU kernel's paths (solver) and the CUDA kernel (the spec run on the GPU too) against warm.step."""
    if solver == "cuda":
        need_cuda_kernel()
    elif not HAS_CPP:
        pytest.skip("trp_kernels._C not built")
    gen = torch.Generator().manual_seed(4)
    step = warm.compiled_step if solver == "cuda" else solver_step(solver)
    for shape in [(5, 24, 70), (4, 40, 18)]:
        W = (make_batch(*shape, "decay", seed=11) + 0.05 * make_batch(*shape, "flat", seed=12)).to(device_of(solver))
        W_low, rank, _, full = project._cold_with_basis(W, 0.9, None, True, True)
        basis = warm.next_basis(full, rank)
        basis[0, :, -1] = 0.0  # a zero column (a matrix of lower rank than the batch's largest)
        W = sgd_like(W_low, 0.01, gen).to(dtype)
        W[2] = 0.0  # an all-zero matrix: rank 0, certified
        for max_rank in (None, 3):
            py = warm.step(W, basis, 0.9, max_rank, True)
            cc = step(W, basis, 0.9, max_rank, True)
            assert cc[0].dtype == dtype and cc[2].dtype == dtype and cc[3].shape == basis.shape
            assert int(cc[1][2]) == 0 and bool(cc[4][2]) and float(cc[0][2].abs().max()) == 0.0
            assert torch.equal(py[4], cc[4]) and bool(py[4].any())
            ok = py[4]
            assert torch.equal(py[1][ok], cc[1][ok])
            tol = 1e-5 if dtype != torch.bfloat16 else 2 * torch.finfo(dtype).eps
            for a, b in ((py[0], cc[0]), (py[2], cc[2])):
                torch.testing.assert_close(a[ok].float(), b[ok].float(), rtol=0, atol=tol)
            # Ritz vectors: the same up to the sign of each column
            live = ok & (py[1] > 0)
            dots = (py[3] * cc[3]).sum(-2)[live][:, :int(py[1][live].min())]
            torch.testing.assert_close(dots.abs(), torch.ones_like(dots), rtol=0, atol=1e-9)


def test_op_schema_and_fake_kernel():
    W = make_batch(3, 18, 30, "decay", seed=13)
    _, rank, _, full = project._cold_with_basis(W, 0.9, None, False, HAS_CPP)
    basis = warm.next_basis(full, rank)
    for args in [(W, basis, 0.9, None, True, True), (W, None, 0.8, 4, False, True)]:
        torch.library.opcheck(torch.ops.trp_kernels.lowrank_project_warm.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_warm_start_api_and_bad_input():
    W = make_batch(2, 16, 30, "decay", seed=14)
    with pytest.raises(TypeError, match="warm"):
        trp_kernels.lowrank_project(W, 0.9, warm={"basis": None})
    state = WarmStart()
    assert trp_kernels.lowrank_project(W, 0.9, warm=state)[2] is None
    restored = WarmStart()
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.basis, state.basis) and "WarmStart(basis=(2, 16" in repr(restored)
    for bad in [None, {"basis": "x"}, {"basis": torch.zeros(3, 3)}, {"basis": torch.zeros(1, 3, 3)}]:
        with pytest.raises(ValueError, match="WarmStart.load_state_dict"):
            restored.load_state_dict(bad)
    state.reset()
    assert state.basis is None and state.warm is None
    # smaller matrices than warm.MIN_N, empty batches: the full solve, and a state of the right shape
    small = make_batch(2, 6, 9, "decay")
    trp_kernels.lowrank_project(small, 0.9, warm=state)
    assert state.basis.shape[:2] == (2, 6) and not bool(state.warm.any())
    out = trp_kernels.lowrank_project(torch.empty(0, 20, 30), 0.9, subgradient=True, warm=WarmStart())
    assert out[0].shape == (0, 20, 30) and out[1].shape == (0,)
    with pytest.raises(ValueError, match="NaN or Inf"):
        trp_kernels.lowrank_project(torch.full((1, 20, 20), float("nan")), 0.9, warm=state)


@pytest.mark.skipif(not HAS_CPP, reason="trp_kernels._C not built")
def test_an_extension_built_before_the_warm_start_runs_its_full_solve(monkeypatch):
    real = _extension.has_kernel
    monkeypatch.setattr(_extension, "has_kernel", lambda name, key: name == "lowrank_project" and real(name, key))
    W = make_batch(3, 20, 36, "decay", seed=15)
    state = WarmStart()
    for _ in range(2):
        out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
        assert_same_as_cold(W, 0.9, out)
        assert state.basis.shape == (3, 20, 0) and not bool(state.warm.any())


def _train(model, pruner, steps, seed=0, after_step=None):
    """`steps` SGD iterations with the pruner's step and regularize; after_step(): called after each
    pruner.step(), before the update."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    device = next(model.parameters()).device
    for _ in range(steps):
        pruner.step()
        if after_step is not None:
            after_step()
        loss = model(torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()


def _net():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 20, 3, padding=1), torch.nn.Conv2d(20, 24, 3, padding=1),
                               torch.nn.Conv2d(24, 24, 3, padding=1)).double()


def test_rank_pruner_carries_and_saves_the_warm_state():
    model = _net()
    pruner = trp.RankPruner(model, "channel", energy=0.5, nuclear=1e-3)  # ranks below warm.MAX_FRACTION
    _train(model, pruner, 4)
    assert any(bool(g.warm.warm.any()) for g in pruner._groups)  # the warm path ran
    state = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, state)
    assert set(pruner.state_dict()["warm_bases"]) == set(pruner.layer_names)

    def resumed(drop_bases):
        state.seek(0)
        saved = torch.load(state, weights_only=True)
        if drop_bases:
            del saved["pruner"]["warm_bases"]  # a state saved without it: rebuilt by a full solve
        m = _net()
        m.load_state_dict(saved["model"])
        p = trp.RankPruner(m, "channel", energy=0.5, nuclear=1e-3)
        p.load_state_dict(saved["pruner"])
        _train(m, p, 3, seed=1)
        return m, p

    _train(model, pruner, 3, seed=1)
    exact, _ = resumed(drop_bases=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, exact.state_dict()[k]), k
    rebuilt, p2 = resumed(drop_bases=True)
    assert p2.ranks == pruner.ranks
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, rebuilt.state_dict()[k], rtol=0, atol=1e-6)


def test_a_sharded_pruner_saves_and_keeps_only_the_bases_of_its_own_groups():
    """Under torch.distributed a rank updates the bases of the groups it projects only: it must neither save
    another rank's (stale after a resume) nor keep them from a loaded state."""
    model = _net()
    pruner = trp.RankPruner(model, "channel", energy=0.5, nuclear=1e-3)
    _train(model, pruner, 2)
    state = pruner.state_dict()
    assert set(state["warm_bases"]) == set(pruner.layer_names) and len(pruner._groups) == 2

    class OwnsFirst:  # the part of trp.distributed.Sharding the pruner asks: group 0 is this rank's
        def owns(self, i):
            return i == 0

    pruner._sharding = OwnsFirst()
    assert set(pruner.state_dict()["warm_bases"]) == set(pruner._groups[0].names)
    pruner.load_state_dict(state)
    assert pruner._groups[0].warm.basis is not None and pruner._groups[1].warm.basis is None


def test_lowrank_project_many_equals_one_call_per_batch(backend):
    """Several batches with their warm states in one call (one host read for all): the same results and states as
    one lowrank_project call per batch, a batch without a state included; bad arguments are refused."""
    gen = torch.Generator().manual_seed(4)
    dev = device_of(backend)
    Ws = [make_batch(3, 20, 36, "decay", seed=1).to(dev), make_batch(2, 40, 24, "decay", seed=2).to(dev),
          make_batch(4, 16, 30, "flat", seed=3).to(dev)]
    many, single = [WarmStart(), WarmStart(), None], [WarmStart(), WarmStart(), None]
    for t in range(3):
        outs = trp_kernels.lowrank_project_many(Ws, 0.9, subgradient=True, warms=many)
        for W, state, out in zip(Ws, single, outs):
            ref = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
            assert all(torch.equal(a, b) for a, b in zip(out, ref))
        for a, b in zip(many[:2], single[:2]):
            assert torch.equal(a.basis, b.basis) and torch.equal(a.warm, b.warm)
        Ws = [sgd_like(out[0], 0.01, gen) for out in outs]
    assert bool(many[0].warm.any())  # the warm path ran
    with pytest.raises(TypeError, match="one trp_kernels.WarmStart"):
        trp_kernels.lowrank_project_many(Ws, 0.9, warms=[WarmStart()])
    with pytest.raises(ValueError, match="NaN or Inf"):
        trp_kernels.lowrank_project_many([torch.full((1, 20, 20), float("nan"))], 0.9, warms=[WarmStart()])


class HostReads:
    """Counts the calls that read tensor values on the host (on a GPU each is a synchronisation), wherever they
    happen (inside custom ops too): the Tensor methods that do it, wrapped while the context is open."""
    READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.calls = []
        self.active = False
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))

    def _counting(self, name, method):
        def wrapper(t, *args, **kwargs):
            if self.active:
                self.calls.append(name)
            return method(t, *args, **kwargs)
        return wrapper

    def __enter__(self):
        self.calls, self.active = [], True
        return self

    def __exit__(self, *exc):
        self.active = False


def _convs(widths, device):
    """A chain of convs with distinct output widths (one pruner group each, the first conv aside) whose weights
    have decaying spectra (ranks well below warm.MAX_FRACTION of n: the warm step takes them)."""
    layers, c = [torch.nn.Conv2d(3, 8, 3)], 8
    for i, w in enumerate(widths):
        conv = torch.nn.Conv2d(c, w, 3)
        with torch.no_grad():
            conv.weight.copy_(make_batch(1, w, c * 9, "decay", seed=i)[0].view(w, c, 3, 3))
        layers.append(conv)
        c = w
    return torch.nn.Sequential(*layers).to(device)


def _host_reads_per_step(widths, device, counter, steps=3):
    model = _convs(widths, device)
    pruner = trp.RankPruner(model, "channel", energy=0.9, nuclear=1e-3)
    pruner.inplace = False  # the stacked path: the GPU's (the CPU's in-place op is one C++ call)
    assert len(pruner._groups) == len(widths)
    gen = torch.Generator().manual_seed(0)
    reads = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-4 * torch.randn(p.shape, generator=gen).to(device))  # a small SGD-like step
        with counter:
            pruner.step()
        reads.append(counter.calls)
    assert all(bool(g.warm.warm.all()) for g in pruner._groups)  # the warm path ran in the last step
    return reads


@pytest.mark.parametrize("backend", ["reference"] + (["cpp"] if HAS_CPP else []))
def test_rank_pruner_step_reads_the_device_the_same_few_times_whatever_the_number_of_groups(backend, monkeypatch):
    """RankPruner.step() on the stacked path: one read for the finiteness check and one for all groups' warm
    results (their largest ranks and fallbacks), not two more per group (on a GPU each read is a synchronisation)."""
    monkeypatch.setenv(project.BACKEND_ENV, backend)
    counter = HostReads(monkeypatch)
    one, four = _host_reads_per_step([16], "cpu", counter), _host_reads_per_step([16, 20, 24, 28], "cpu", counter)
    assert [len(r) for r in one] == [len(r) for r in four] == [2, 2, 2], (one, four)


@pytest.mark.cuda
def test_rank_pruner_warm_step_synchronises_the_same_few_times_whatever_the_number_of_groups():
    """The same on the GPU, counted by CUDA's synchronisation debug mode (the C++ kernels' own syncs too: the Ritz
    step's eigensolve is the Jacobi kernel, no cuSOLVER info check)."""
    need_cuda_kernel()
    counts = []
    for widths in ([16], [16, 20, 24, 28]):
        model = _convs(widths, "cuda")
        pruner = trp.RankPruner(model, "channel", energy=0.9, nuclear=1e-3)
        for _ in range(2):
            pruner.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pruner.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(bool(g.warm.warm.all()) for g in pruner._groups)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] <= 2, counts


@pytest.mark.parametrize("device, shape, dtype", [
    ("cpu", (2, 770, 900), torch.float32), ("cpu", (1, 1000, 790), torch.float64),
    pytest.param("cuda", (2, 770, 900), torch.float32, marks=pytest.mark.cuda),
    pytest.param("cuda", (1, 1536, 1536), torch.float32, marks=pytest.mark.cuda)])
def test_large_matrices_take_the_blocked_gram_matrix(device, shape, dtype):
    """n >= 768 (ResNet-50 spatial's sizes, up to its largest on the GPU): the batched drivers (the CPU's above
    n = 1024, the GPU's) build the Gram matrix tile by tile (the lower triangle, mirrored). Their full solve
    and warm step after a 1% update, and the CPU's own choice, against float64 SVD."""
    if device == "cuda":
        need_cuda_kernel()
    elif not HAS_CPP:
        pytest.skip("trp_kernels._C not built")
    gen = torch.Generator().manual_seed(4)
    W = make_batch(*shape, "decay", seed=21, dtype=dtype).to(device)
    W_low, rank, G, basis = torch.ops.trp_kernels_C.lowrank_project_basis(W, 0.9, None, True)
    check_projection(W, 0.9, W_low, rank, G)
    if device == "cpu":  # the CPU's own choice below took the per-matrix full solve at these sizes
        check_projection(W, 0.9, *torch.ops.trp_kernels_C.lowrank_project_solver(W, 0.9, None, True,
                                                                                   "lapack_batched"))
    W, state = sgd_like(W_low, 0.01, gen), warm.next_basis(basis, rank)
    for solver in ("batched", "auto") if device == "cpu" else (None,):  # None: the device's own kernel
        out = warm.compiled_step(W, state, 0.9, None, True, solver)
        assert bool(out[4].all())
        check_projection(W, 0.9, *out[:3])


@pytest.mark.parametrize("cut_gap", [1e-1, 1e-3, 1e-6])
def test_the_subspace_bound_holds_where_the_kept_and_next_values_are_close(cut_gap):
    """warm.subspace_bound against the exact angle (float64 eigh): never below it, over blocks tilted by
    1e-2 .. 1e-8 from the exact top-m eigenvectors and cuts where the kept and the next eigenvalue are close.
    There the first-order bound ||R_{1:k}|| / gap_k is useless (far above 1) and the second-order one is not."""
    gen = torch.Generator().manual_seed(21)
    n, m, B = 60, 14, 4
    lam = torch.cat([torch.linspace(2.0, 1.0, m), 1e-3 * torch.rand(n - m, generator=gen, dtype=torch.float64)])
    lam = lam.to(torch.float64)
    lam[7] = lam[6] - cut_gap  # the cut after 7 directions: a close pair
    V = torch.linalg.qr(torch.randn(B, n, n, generator=gen, dtype=torch.float64))[0]
    M = V @ torch.diag_embed(lam.expand(B, n)) @ V.mT
    rank = torch.full((B,), 7)
    Vk = V[:, :, :7]
    seen_second_order = False
    for tilt in (1e-2, 1e-4, 1e-6, 1e-8):
        basis = V[:, :, :m] + tilt * torch.randn(B, n, m, generator=gen, dtype=torch.float64)
        theta, X, res2, usable = warm.rayleigh_ritz(M, basis, steps=0)
        assert bool(usable.all())
        bound = warm.subspace_bound(M.diagonal(dim1=-2, dim2=-1).sum(-1), theta, res2, rank)
        Xk = X[:, :, :7]
        true = (Vk - Xk @ (Xk.mT @ Vk)).flatten(1).norm(dim=1)  # ||sin angle||_F
        assert bool((true <= bound * (1 + 1e-9) + 1e-13).all()), (tilt, true, bound)
        first = res2[:, :7].sum(-1).sqrt() / (theta[:, 6] - theta[:, 7])  # no first-order bound beats this
        seen_second_order |= bool((bound < 1e-3 * first).all() & (bound < 1e-2).all())
    assert seen_second_order or cut_gap > 1e-3  # at a wide cut the first-order bound is as good


@pytest.mark.parametrize("shape", [(3, 128, 128), (2, 180, 110)])
def test_flat_spectra_are_certified_by_the_second_order_bound(backend, shape):
    """A wide layer at initialisation (a flat spectrum: the kept and the next singular value close) on a
    TRP trajectory: every warm step is certified (the first-order bound alone fails most of them) and equals
    the full solve."""
    gen = torch.Generator().manual_seed(22)
    W = (torch.randn(shape, generator=gen) / shape[2] ** 0.5).to(device_of(backend))
    state = WarmStart()
    out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
    for t in range(6):
        W = sgd_like(out[0], 0.03, gen)
        out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
        assert_same_as_cold(W, 0.9, out, svd=t == 5)
        if t > 0:  # the first: the basis may be wider than warm.MAX_FRACTION * n
            assert bool(state.warm.all()), (t, out[1])


@pytest.mark.parametrize("scale", [1e21, 1e-21])
def test_weights_far_outside_float32_gram_range_stay_warm(backend, scale):
    """The first power step runs in float32 on M / trace(M): weights scaled by 1e21 (a Gram matrix beyond
    float32's largest number) or 1e-21 (below its smallest normal one) still take the warm path and equal the
    full solve."""
    gen = torch.Generator().manual_seed(23)
    W = (make_batch(3, 24, 40, "decay", seed=14, dtype=torch.float64) * scale).to(device_of(backend))
    state = WarmStart()
    out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
    for t in range(3):
        rms = out[0].flatten(1).square().mean(dim=1).sqrt()[:, None, None]  # (sgd_like's floor is 1e-3)
        W = out[0] + 0.01 * rms * torch.randn(W.shape, generator=gen, dtype=W.dtype).to(W.device)
        out = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
        assert_same_as_cold(W, 0.9, out, svd=False)
        assert bool(state.warm.all())


@pytest.mark.cuda
def test_rank_pruner_on_the_gpu_projects_warm_within_the_contract():
    """RankPruner on a CUDA model: one stacked op call per group (the CUDA warm kernel, one host
    synchronisation per group); every projection equals the full solve of the weights it projected."""
    need_cuda_kernel()
    model = _net().cuda()
    pruner = trp.RankPruner(model, "channel", energy=0.5, nuclear=1e-3)  # ranks below warm.MAX_FRACTION
    warm_steps = []

    def check(before):  # the weights pruner.step() just wrote against the full solve of those it read
        assert pruner.path == "stacked"
        warm_steps.append(any(bool(g.warm.warm.any()) for g in pruner._groups))
        for W, (name, m) in zip(before, pruner.layers):
            after = to_matrix(m.weight.detach(), "channel")[None]
            rank = torch.tensor([pruner.ranks[name]], device=after.device)
            assert_same_as_cold(W[None], 0.5, (after, rank, torch.zeros_like(after)), svd=False)

    for t in range(6):
        before = [to_matrix(m.weight.detach(), "channel").clone() for _, m in pruner.layers]
        _train(model, pruner, 1, seed=t, after_step=lambda: check(before))
    assert sum(warm_steps) >= 3

