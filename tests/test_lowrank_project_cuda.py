"""lowrank_project edge cases that matter most on the GPU (the CUDA Jacobi kernel is one thread block per
matrix in shared memory): sizes around the 48 KB default shared-memory limit and the kernel's n <= 64,
empty and very large batches, all-zero matrices, every dtype, a side stream, TF32 switched on. Each runs on
the CPU kernel too, so the same checks guard both builds; the `cuda` ones run in benchmarks/gpu_suite.sh."""
import pytest
import torch

import trp_kernels
from test_lowrank_project import check_projection, make_batch
from trp_kernels import _extension, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def solver_op(device, solver):
    """The compiled kernel with a forced eigensolver ("jacobi" or "lapack": cuSOLVER/LAPACK)."""
    if not _extension.has_kernel("lowrank_project_solver", "CUDA" if device == "cuda" else "CPU"):
        pytest.skip(f"trp_kernels._C has no {device} kernel")

    def run(W, energy, max_rank=None, subgradient=False):
        W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project_solver(
            W.to(device), energy, max_rank, subgradient, solver)
        return W_low.cpu(), rank.cpu(), (G.cpu() if subgradient else None)
    return run


# n = min(p, q): 54 fits the default 48 KB of shared memory, 55 needs the opt-in, 64 is the largest the
# Jacobi kernel takes, 65 goes to the library eigensolver.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["jacobi", "lapack"])
@pytest.mark.parametrize("n", [54, 55, 64, 65])
def test_sizes_around_the_shared_memory_limit(device, solver, n):
    if solver == "jacobi" and n > 64 and device == "cuda":
        pytest.skip("the CUDA Jacobi kernel takes n <= 64")
    run = solver_op(device, solver)
    for p, q in ((n, n + 9), (n + 3, n)):
        W = make_batch(3, p, q, "decay", seed=n)
        W_low, rank, G = run(W, 0.9, subgradient=True)
        check_projection(W, 0.9, W_low, rank, G)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_matrices(device):
    for shape in ((0, 5, 7), (0, 70, 80)):
        W = torch.empty(shape, device=device)
        W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
        assert W_low.shape == shape and rank.shape == (0,) and G.shape == shape
        assert W_low.device == W.device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_batch_of_200000_small_matrices(device):
    """One launch per group however many matrices (e.g. network decoupling projects every filter)."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(200_000, 3, 9, generator=gen)
    W_low, rank, _ = trp_kernels.lowrank_project(W.to(device), 0.8)
    ref_low, ref_rank, _ = reference.lowrank_project(W, 0.8)
    W_low, rank = W_low.cpu(), rank.cpu()
    # ranks agree except where the cumulative energy ties the threshold (Gaussian: essentially never)
    assert float((rank != ref_rank).double().mean()) < 1e-4
    same = rank == ref_rank
    err = (W_low - ref_low).flatten(1).norm(dim=1) / W.flatten(1).norm(dim=1)
    assert float(err[same].max()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_matrices(device):
    W = torch.zeros(5, 40, 60, device=device)
    W[2] = make_batch(1, 40, 60, "decay")[0].to(device)
    W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    assert rank.cpu()[[0, 1, 3, 4]].tolist() == [0, 0, 0, 0] and int(rank[2]) >= 1
    assert float(W_low[[0, 1, 3, 4]].abs().max()) == 0.0 and float(G[[0, 1, 3, 4]].abs().max()) == 0.0
    check_projection(W.cpu(), 0.9, W_low.cpu(), rank.cpu(), G.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype(device, dtype):
    W = make_batch(4, 24, 40, "decay", seed=5).to(device=device, dtype=dtype)
    W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    assert W_low.dtype == dtype and G.dtype == dtype and rank.dtype == torch.int64
    tol = {torch.float16: 4 * torch.finfo(torch.float16).eps, torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}
    check_projection(W.cpu(), 0.9, W_low.cpu(), rank.cpu(), tol=tol.get(dtype))


@pytest.mark.cuda
def test_side_stream_orders_with_its_inputs():
    """Work queued on a side stream: the op must run on the current stream, after the producer of W."""
    W = make_batch(8, 48, 64, "flat", seed=9).cuda()
    expected = trp_kernels.lowrank_project(W, 0.9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        Ws = W * 1.0  # produced on the side stream
        torch.cuda._sleep(10_000_000)  # delay so that a kernel on the wrong stream would read early
        # check_finite=False: its host read would wait for the side stream before any kernel is launched, and
        # the test could not fail
        got = trp_kernels.lowrank_project(Ws * 2.0, 0.9, check_finite=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(got[1], expected[1])
    assert torch.allclose(got[0], 2.0 * expected[0], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", ["allow_tf32", "matmul_precision_high"])
def test_tf32_switched_on_keeps_the_contract(setting):
    """The projection's float32 GEMMs must stay IEEE whatever the global TF32 setting (1e-5 contract)."""
    W = make_batch(6, 64, 200, "decay", seed=11).cuda()
    old_flag, old_precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        if setting == "allow_tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.set_float32_matmul_precision("high")
        W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        torch.set_float32_matmul_precision(old_precision)
    check_projection(W.cpu(), 0.9, W_low.cpu(), rank.cpu(), G.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 54, 55, 64])
def test_the_cuda_jacobi_kernel_equals_the_cpu_bit_for_bit(n):
    """The device code is compiled without FMA contraction (--fmad=false) and runs the block functions the CPU's
    one-thread path runs (csrc/common/block_kernels.h): the same eigenvalues and eigenvectors, bit for bit."""
    if not _extension.has_kernel("jacobi_eigh", "CUDA"):
        pytest.skip("trp_kernels._C has no CUDA kernel")
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(5, n, n, generator=gen, dtype=torch.float64)
    A = torch.cat([X + X.mT, X @ X.mT])
    ev_cpu, V_cpu = torch.ops.trp_kernels_C.jacobi_eigh(A)
    ev_gpu, V_gpu = torch.ops.trp_kernels_C.jacobi_eigh(A.cuda())
    assert torch.equal(ev_gpu.cpu(), ev_cpu) and torch.equal(V_gpu.cpu(), V_cpu)
