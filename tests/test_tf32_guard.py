"""lowrank_project's float32 projection GEMMs ignore the global TF32 switches (at::NoTF32Guard in
csrc/common/lowrank_driver.h), so the 1e-5 contract holds whatever the user's training script set.
Only a GPU shows it: the CPU has no TF32 (on the 2-core CPU, set_float32_matmul_precision("high") or
("medium") leaves lowrank_project's results bit for bit the same), so these are `cuda` tests."""
import pytest
import torch

from trp_kernels import _extension
from test_lowrank_project import check_projection, make_batch

SHAPE = (4, 64, 576)  # a 64-filter 3x3 conv over 64 channels, channel scheme


@pytest.fixture(params=["allow_tf32", "matmul_precision_high"])
def tf32_on(request):
    old = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    if request.param == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("high")
    yield
    torch.backends.cuda.matmul.allow_tf32 = old[0]
    torch.set_float32_matmul_precision(old[1])


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
@pytest.mark.parametrize("solver", ["jacobi", "lapack"])
def test_projection_keeps_the_contract_with_tf32_on(tf32_on, solver):
    assert _extension.has_kernel("lowrank_project_solver", "CUDA")
    W = make_batch(*SHAPE, "decay", seed=3)
    for energy in (0.5, 0.9, 0.99):
        W_low, rank, G = torch.ops.trp_kernels_C.lowrank_project_solver(W.cuda(), energy, None, True, solver)
        check_projection(W, energy, W_low.cpu(), rank.cpu(), G.cpu())
