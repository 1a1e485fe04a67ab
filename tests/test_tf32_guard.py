"""lowrank_project's float32 projection GEMMs ignore the global TF32 switches (at::NoTF32Guard in
csrc/common/lowrank_driver.h, and the precision setting itself held at "ieee" by trp_kernels/precision.py for
the GEMM paths that read it: cuBLASLt, TunableOp), so the 1e-5 contract holds whatever the user's training script
set. Only a GPU shows it: the CPU has no TF32 (on the 2-core CPU, set_float32_matmul_precision("high") or
("medium") leaves lowrank_project's results bit for bit the same), so these are `cuda` tests; the setting held
during the call is checked on the CPU in tests/test_self_check.py."""
import pytest
import torch

import trp_kernels
from test_lowrank_project import check_projection, make_batch
from trp_kernels import _extension, precision

SHAPE = (4, 64, 576)  # a 64-filter 3x3 conv over 64 channels, channel scheme


@pytest.fixture(params=["allow_tf32", "matmul_precision_high", "cublaslt"])
def tf32_on(request):
    """TF32 switched on the ways a training script does; "cublaslt": through the precision setting with cuBLASLt
    as the preferred BLAS library, whose batched GEMMs read the setting and not at::NoTF32Guard."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.fp32_precision,
           torch.backends.cuda.preferred_blas_library())
    if request.param == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif request.param == "matmul_precision_high":
        torch.set_float32_matmul_precision("high")
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cuda.preferred_blas_library("cublaslt")
    yield
    torch.backends.cuda.preferred_blas_library(old[2])
    torch.backends.cuda.matmul.fp32_precision = old[1]
    torch.backends.cuda.matmul.allow_tf32 = old[0]


@pytest.mark.cuda
def test_tf32_really_is_on_for_plain_gemms(tf32_on):
    """The test below is not vacuous: under these settings an unguarded float32 projection of the same
    shapes misses the 1e-5 contract (on GPUs with TF32, i.e. Ampere or newer)."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no TF32 before Ampere")
    W = make_batch(*SHAPE, "decay", seed=3).cuda()
    Q = torch.linalg.qr(torch.randn(SHAPE[0], SHAPE[1], 8, dtype=torch.float64, device="cuda")).Q
    exact = Q @ (Q.mT @ W.double())
    fast = Q.float() @ (Q.float().mT @ W)
    assert float((fast.double() - exact).norm() / W.norm()) > 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["op", "warm", "jacobi", "lapack"])
def test_projection_keeps_the_contract_with_tf32_on(tf32_on, solver):
    """op / warm: the public lowrank_project (its own choice of eigensolver; a warm start's second call takes the
    warm step); jacobi / lapack: the compiled op with that eigensolver inside the precision guard the public op
    holds (the raw op alone has at::NoTF32Guard only, which cuBLASLt does not read)."""
    assert _extension.has_kernel("lowrank_project_solver", "CUDA")
    W = make_batch(*SHAPE, "decay", seed=3)
    for energy in (0.5, 0.9, 0.99):
        if solver in ("op", "warm"):
            state = trp_kernels.WarmStart() if solver == "warm" else None
            W_low, rank, G = trp_kernels.lowrank_project(W.cuda(), energy, subgradient=True, warm=state)
            if solver == "warm":  # the projected weights again: the warm step takes them
                W_in = W_low.cpu()
                W_low, rank, G = trp_kernels.lowrank_project(W_low, energy, subgradient=True, warm=state)
                assert bool(state.warm.all())
                check_projection(W_in, energy, W_low.cpu(), rank.cpu(), G.cpu())
                continue
        else:
            with precision.ieee_matmul("cuda"):
                W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project_solver(W.cuda(), energy, None, True, solver)
        check_projection(W, energy, W_low.cpu(), rank.cpu(), G.cpu())
