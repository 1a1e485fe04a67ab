"""Projection of large matrices (n = min(p, q) from 2048) over short TRP trajectories: the certified subspace
iteration without the Gram matrix (trp_kernels.warm.large_step), the compiled Gram matrix's warm step, and the
fallbacks (certified random blocks, the full solve) all meet lowrank_project's contract.

The reference is exact without an SVD of the whole matrix: each matrix is built from its SVD,
W = H_l D H_r^T with H_l, H_r products of Householder reflections (orthogonal, applied in O(p q)) and D the
p x q diagonal of chosen singular values, so the energy-rule rank and the truncation H_l D_k H_r^T are known in
float64. A trajectory step is what TRP sees: the previous kept values, slightly changed, plus a small tail (the
update's energy), with slightly turned singular vectors."""
import pytest
import torch

import trp_kernels
from trp_kernels import project, reference, warm

ENERGY = 0.9
TOL = 1e-5  # the contract: W_low within 1e-5 of the truncated SVD, relative to ||W||


def unit(n, gen):
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    return v / v.norm()


def reflect(X, vectors, side):
    """X with the reflections I - 2 v v^T applied on the left (side 0: H X) or on the right (side 1: X H^T)."""
    for v in vectors:
        X = X - 2.0 * v[:, None] * (v @ X)[None, :] if side == 0 else X - 2.0 * (X @ v)[:, None] * v[None, :]
    return X


class Exact:
    """A p x q matrix with known SVD: H_l D H_r^T (see the module docstring)."""

    def __init__(self, p, q, s, left, right):
        self.p, self.q, self.s, self.left, self.right = p, q, s, left, right

    def build(self, k=None):
        s = self.s if k is None else torch.cat([self.s[:k], torch.zeros(self.s.numel() - k, dtype=torch.float64)])
        D = torch.zeros(self.p, self.q, dtype=torch.float64)
        D.diagonal()[:] = s
        return reflect(reflect(D, self.left, 0), self.right, 1)

    def rank(self, energy):
        """The energy rule's rank, after checking that the cut is not within the float32 input's rounding."""
        cum = self.s.square().cumsum(0) / self.s.square().sum()
        k = int(reference.energy_rank(self.s[None], energy)[0])
        assert float(cum[k - 1] - energy) > 1e-5 and (k == 1 or float(energy - cum[k - 2]) > 1e-5)
        return k

    def moved(self, k, turn, tail, gen):
        """The next matrix of a TRP run: the kept k values changed by up to 1%, a tail of relative size `tail`
        (the update), the singular vectors turned by about `turn`."""
        n = self.s.numel()
        kept = (self.s[:k] * (1 + 0.01 * torch.rand(k, generator=gen, dtype=torch.float64))).sort(
            descending=True).values
        rest = tail * float(self.s[0]) * (1 + torch.rand(n - k, generator=gen, dtype=torch.float64)).sort(
            descending=True).values / 2
        turned = [[(v + turn * unit(v.numel(), gen)) / (v + turn * unit(v.numel(), gen)).norm() for v in side]
                  for side in (self.left, self.right)]
        return Exact(self.p, self.q, torch.cat([kept, rest]), *turned)


def start(p, q, signal, gen, flat=False):
    n = min(p, q)
    if flat:  # a slowly decaying spectrum: no block short of most of n proves the energy rule's cut
        s = torch.linspace(1.0, 0.5, n, dtype=torch.float64)
    else:
        s = torch.cat([torch.logspace(0, -1.2, signal, dtype=torch.float64),
                       2e-3 * torch.rand(n - signal, generator=gen, dtype=torch.float64).sort(descending=True).values])
    return Exact(p, q, s, [unit(p, gen) for _ in range(3)], [unit(q, gen) for _ in range(3)])


def check(exact, W, W_low, rank, G=None):
    k = exact.rank(ENERGY)
    assert int(rank[0]) == k
    ref = exact.build(k)
    norm = float(exact.s.norm())
    assert float((W_low[0].double() - ref).norm()) <= TOL * norm
    if G is not None:  # U_k V_k^T: the truncation with unit singular values
        unit_values = Exact(exact.p, exact.q, torch.ones_like(exact.s), exact.left, exact.right)
        assert float((G[0].double() - unit_values.build(k)).norm()) <= 1e-4 * k ** 0.5
    return k


def trajectory(p, q, steps, gen, signal=120):
    """A short TRP run from a cold call: yields (step, state, rank) after checking each projection."""
    exact = start(p, q, signal, gen)
    state = trp_kernels.WarmStart()
    k = None
    for t in range(steps + 1):
        if t:
            exact = exact.moved(k, 1e-3, 1e-3, gen)
        W = exact.build().float()[None]
        k = check(exact, W, *trp_kernels.lowrank_project(W, ENERGY, subgradient=True, warm=state))
        yield t, state, k


@pytest.fixture
def large_from(monkeypatch):
    """Lowers the size from which the warm step skips the Gram matrix (warm.LARGE_MIN_N)."""
    return lambda n: monkeypatch.setattr(warm, "LARGE_MIN_N", n)


@pytest.mark.slow
@pytest.mark.parametrize("gram_free", [True, False])
def test_trajectory_2048_by_3000(gram_free, large_from, monkeypatch):
    """A cold call (certified random blocks), then warm steps: without the Gram matrix (large_step) or with the
    compiled one, each certified; the exact rank and truncation at every step."""
    large_from(2048 if gram_free else 10 ** 9)
    used = []
    real = warm.large_step
    monkeypatch.setattr(warm, "large_step", lambda *a: used.append(1) or real(*a))
    gen = torch.Generator().manual_seed(1)
    for t, state, _ in trajectory(2048, 3000, 3, gen):
        assert bool(state.warm[0])  # the random start, then the warm step: no full solve
    assert len(used) == (3 if gram_free else 0)


@pytest.mark.slow
@pytest.mark.parametrize("n,steps,seed", [(4096, 2, 2), (8192, 1, 4)])
def test_square_trajectory_without_the_gram_matrix(n, steps, seed, monkeypatch):
    """n = 4096 and 8192 (Llama-7B-like; the largest the contract covers): a cold call (certified random
    blocks), then warm steps that take large_step (n >= LARGE_MIN_N, a narrow basis), each certified: the exact
    rank and truncation at every step."""
    used = []
    real = warm.large_step
    monkeypatch.setattr(warm, "large_step", lambda *a: used.append(1) or real(*a))
    gen = torch.Generator().manual_seed(seed)
    for t, state, _ in trajectory(n, n, steps, gen):
        assert bool(state.warm[0])
    assert len(used) == steps


@pytest.mark.slow
def test_rank_growing_beyond_the_basis_widens_the_block(large_from, monkeypatch):
    """A call at a lower energy, then one at ENERGY on the same spectrum, slightly turned: the rank outgrows the
    basis, the block gets random columns (or the fallbacks run); the rank and truncation stay exact."""
    large_from(2048)
    used = []
    real = warm.large_step
    monkeypatch.setattr(warm, "large_step", lambda *a: used.append(1) or real(*a))
    gen = torch.Generator().manual_seed(3)
    exact = start(2048, 2100, 120, gen)
    state = trp_kernels.WarmStart()
    W = exact.build().float()[None]
    low = int(trp_kernels.lowrank_project(W, 0.7, warm=state)[1][0])
    assert low == int(reference.energy_rank(exact.s[None], 0.7)[0])
    exact = exact.moved(exact.s.numel(), 1e-3, 0.0, gen)
    W = exact.build().float()[None]
    assert check(exact, W, *trp_kernels.lowrank_project(W, ENERGY, subgradient=True, warm=state)) > low
    assert used == [1]


def test_subspace_iteration_proves_the_exact_subspace():
    """warm.subspace_iteration from a slightly turned basis, against the exact subspace, and None where the
    spectrum is flat (nothing proven in LARGE_MAX_STEPS products)."""
    gen = torch.Generator().manual_seed(4)
    before = start(700, 500, 60, gen)
    m = before.rank(ENERGY)  # the previous call kept m directions; an update adds a small tail
    exact = before.moved(m, 0.0, 1e-3, gen)
    k = exact.rank(ENERGY)
    A = exact.build()
    right = reflect(torch.eye(500, dtype=torch.float64), exact.right, 0)  # the exact right singular vectors
    turned = torch.linalg.qr(right[:, :m] + 1e-3 * torch.randn(500, m, generator=gen, dtype=torch.float64)).Q
    theta, X, r = warm.subspace_iteration(A, turned, ENERGY, None)
    assert r == k
    V = right[:, :k]
    sines = torch.linalg.svdvals(X[:, :k] - V @ (V.mT @ X[:, :k]))
    assert float(sines.max()) <= warm.SUBSPACE_TOL
    assert torch.allclose(theta[:k], exact.s[:k].square(), rtol=1e-8)
    flat = start(700, 500, 60, gen, flat=True)
    assert warm.subspace_iteration(flat.build(), turned, ENERGY, None) is None


@pytest.mark.slow
@pytest.mark.parametrize("sketch", [True, False])
def test_flat_spectrum_fails_the_certificate_and_falls_back(sketch, large_from, monkeypatch):
    """A state from a decaying spectrum, then a flat one: large_step's certificate fails, the certified random
    blocks (tried where sketch_usable) fail too, and the full solve gives the exact answer."""
    large_from(1600)
    monkeypatch.setattr(warm, "SKETCH_MIN_N", 1600 if sketch else 10 ** 9)
    tried = []
    real = warm.sketched_step
    monkeypatch.setattr(warm, "sketched_step", lambda *a: tried.append(1) or real(*a))
    gen = torch.Generator().manual_seed(5)
    p, q = 1700, 1800
    exact = start(p, q, 60, gen)
    state = trp_kernels.WarmStart()
    W = exact.build().float()[None]
    check(exact, W, *trp_kernels.lowrank_project(W, ENERGY, subgradient=True, warm=state))
    assert project.large_usable(state.basis, W.shape, W.device)
    flat = start(p, q, 60, gen, flat=True)
    W = flat.build().float()[None]
    out = trp_kernels.lowrank_project(W, ENERGY, subgradient=True, warm=state)
    assert not bool(state.warm[0])
    check(flat, W, *out)
    assert state.basis.shape == (1, p, flat.rank(ENERGY))
    assert len(tried) == (2 if sketch else 0)  # the cold call's random start, and the fallback's
