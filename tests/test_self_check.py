"""Kernels that check themselves on first use (trp_kernels/selfcheck.py, probes.py): a wrong kernel is injected
(wrapping the real C++ CPU projection, its warm step, and the Triton convs under TRITON_INTERPRET=1) and must
produce a warning, the reference's result and a failed verdict in backend_info(); the error mode raises; a good
kernel is checked once per signature; nothing is checked during a CUDA graph capture; ranks agree under
torch.distributed (2 gloo processes). Also the precision setting held at "ieee" while a projection runs, and the
decision to fall back on a GPU the build has no kernel image for."""
import warnings
from pathlib import Path

import pytest
import torch

import trp_kernels
from test_lowrank_project import check_projection, make_batch
from trp.prune import distributed
from trp_kernels import _extension, conv, precision, probes, project, reference, selfcheck, warm

HAS_CPP = _extension.has_kernel("lowrank_project", "CPU")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="trp_kernels._C not built")


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    """Each test starts without verdicts, checks the C++ CPU kernels too, and falls back (tests/conftest.py sets
    the error mode for the rest of the suite)."""
    monkeypatch.setenv(selfcheck.ENV, "all")
    monkeypatch.setenv(selfcheck.FAILURE_ENV, "fallback")
    selfcheck.reset()
    yield
    selfcheck.reset()


class Wrapped:
    """A kernel wrapped to count its calls and, when `wrong`, to corrupt its first output."""

    def __init__(self, real, wrong=True):
        self.real, self.wrong, self.calls = real, wrong, 0

    def __call__(self, *args):
        self.calls += 1
        out = self.real(*args)
        if not self.wrong:
            return out
        if isinstance(out, (tuple, list)):
            return (out[0] * 1.01, *out[1:])  # 1% off: far outside every dtype's tolerance
        return out * 1.01


def _wrap_op(monkeypatch, name, wrong=True):
    kernel = Wrapped(getattr(torch.ops.trp_kernels_C, name), wrong)
    monkeypatch.setattr(torch.ops.trp_kernels_C, name, kernel)
    return kernel


def _verdicts(kernel):
    return [v for v in trp_kernels.backend_info()["self_check"]["verdicts"] if v["kernel"] == kernel]


@needs_cpp
def test_a_wrong_projection_kernel_warns_falls_back_and_is_recorded(monkeypatch):
    kernel = _wrap_op(monkeypatch, "lowrank_project")
    W = make_batch(3, 24, 40, "decay", seed=1)
    with pytest.warns(RuntimeWarning, match="lowrank_project kernel on cpu disagrees with the float64 reference"):
        W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    check_projection(W, 0.9, W_low, rank, G)  # the reference's result, not the wrong kernel's
    info = trp_kernels.backend_info()["self_check"]
    assert info["unusable"] == ["lowrank_project@cpu"]
    (verdict,) = _verdicts("lowrank_project")
    assert verdict["ok"] is False and "W_low error" in verdict["detail"] and verdict["device"] == "cpu"
    calls = kernel.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the kernel is not used again, nor checked again
        out = trp_kernels.lowrank_project(make_batch(2, 30, 50, "flat", seed=2), 0.8)
    assert kernel.calls == calls and len(_verdicts("lowrank_project")) == 1
    check_projection(make_batch(2, 30, 50, "flat", seed=2), 0.8, *out[:2])


@needs_cpp
def test_the_error_mode_raises(monkeypatch):
    monkeypatch.setenv(selfcheck.FAILURE_ENV, "error")
    _wrap_op(monkeypatch, "lowrank_project")
    with pytest.raises(trp_kernels.SelfCheckError, match="disagrees with the float64 reference.*ranks"):
        trp_kernels.lowrank_project(make_batch(2, 20, 30, "decay"), 0.9)


@needs_cpp
@pytest.mark.parametrize("setting, checked", [("0", False), ("1", False), ("all", True)])
def test_the_setting_turns_checks_off_and_leaves_cpu_kernels_unchecked_by_default(monkeypatch, setting, checked):
    """0: nothing is checked (a wrong kernel's result goes through: the user vouched for the setup); 1 (the
    default): the CUDA and Triton kernels only, the C++ CPU ones run the code CI runs."""
    monkeypatch.setenv(selfcheck.ENV, setting)
    kernel = _wrap_op(monkeypatch, "lowrank_project")
    W = make_batch(2, 20, 30, "decay")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        W_low = trp_kernels.lowrank_project(W, 0.9)[0]
    ref = reference.lowrank_project(W, 0.9)[0]
    assert torch.allclose(W_low, ref, atol=1e-5) == checked  # checked: the probe caught it, the reference ran
    assert kernel.calls == 1 and bool(_verdicts("lowrank_project")) == checked


@needs_cpp
def test_a_good_kernel_is_checked_once_per_signature(monkeypatch):
    kernel = _wrap_op(monkeypatch, "lowrank_project", wrong=False)
    for seed in range(3):
        W_low, rank, _ = trp_kernels.lowrank_project(make_batch(4, 24, 40, "decay", seed=seed), 0.9)
    assert kernel.calls == 1 + 3  # one probe, then the three calls
    trp_kernels.lowrank_project(make_batch(4, 24, 40, "decay").double(), 0.9)  # a new signature: float64
    trp_kernels.lowrank_project(make_batch(4, 40, 24, "decay"), 0.9)          # and another shape
    verdicts = _verdicts("lowrank_project")
    assert len(verdicts) == 3 and all(v["ok"] for v in verdicts), verdicts
    assert {v["signature"][1] for v in verdicts} == {"(24, 40)", "(40, 24)"}


@needs_cpp
@pytest.mark.parametrize("shape", [(2, 24, 40), (3, 40, 24), (1, 70, 90)])
def test_the_probe_has_a_clear_rank_and_passes_the_real_kernels(shape):
    """Designed spectra: the energy rule's rank is exact with a wide margin, and the compiled kernels pass."""
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        W, energy = probes.designed_batch(2, shape[1], shape[2], 5, dtype, "cpu")
        S = torch.linalg.svdvals(W.double())
        cum = S.square().cumsum(-1) / S.square().sum(-1, keepdim=True)
        assert bool((cum[:, 3] < energy - 0.01).all() and (cum[:, 4] > energy + 0.01).all())
        ok, detail = probes.projection(torch.ops.trp_kernels_C.lowrank_project, shape, dtype, "cpu", None, True)
        assert ok, detail
        ok, detail = probes.warm_step(warm.compiled_step, shape, dtype, "cpu", 4, None, True)
        assert ok and "certified" in detail and not detail.startswith("no probe"), detail


def test_the_warm_signature_splits_where_the_cuda_ritz_step_changes_eigensolver():
    header = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "block_kernels.h").read_text()
    assert f"constexpr int kJacobiMaxN = {probes.JACOBI_MAX_N};" in header


@needs_cpp
def test_a_wrong_warm_kernel_falls_back_to_its_specification(monkeypatch):
    wrong = Wrapped(warm.compiled_step)
    monkeypatch.setattr(warm, "compiled_step", wrong)
    monkeypatch.setattr(warm, "MIN_N", 16)
    gen = torch.Generator().manual_seed(0)
    W = make_batch(3, 24, 48, "decay", seed=3)
    state = trp_kernels.WarmStart()
    W_low = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)[0]  # the full solve, no warm kernel
    W = W_low + 1e-4 * torch.randn(W.shape, generator=gen)  # TRP's next step: projected weights, a small update
    with pytest.warns(RuntimeWarning, match="lowrank_project_warm kernel on cpu disagrees"):
        W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True, warm=state)
    check_projection(W, 0.9, W_low, rank, G)
    assert bool(state.warm.all())  # the warm step ran: the Python specification's
    assert trp_kernels.backend_info()["self_check"]["unusable"] == ["lowrank_project_warm@cpu"]


@needs_cpp
def test_nothing_is_checked_while_a_cuda_graph_is_captured(monkeypatch):
    monkeypatch.setattr(selfcheck, "_capturing", lambda device: True)
    kernel = _wrap_op(monkeypatch, "lowrank_project", wrong=False)
    trp_kernels.lowrank_project(make_batch(2, 20, 30, "decay"), 0.9)
    assert kernel.calls == 1 and not _verdicts("lowrank_project")  # ran unchecked; the next call outside checks


# --- the Triton convolutions, under the interpreter ------------------------------------------------------------

def _triton_or_skip():
    tri = conv._triton()
    if tri is None or not tri.interpreting():
        pytest.skip("needs triton under TRITON_INTERPRET=1 (a machine without GPU; tests/conftest.py)")
    return tri


@pytest.mark.triton
def test_a_wrong_triton_conv_warns_falls_back_and_is_recorded(monkeypatch):
    tri = _triton_or_skip()
    monkeypatch.setenv(conv.BACKEND_ENV, "triton")
    x, c_w, p_w, b = torch.randn(2, 8, 9, 9), torch.randn(4, 8, 3, 3), torch.randn(6, 4, 1, 1), torch.randn(6)
    good = trp_kernels.factorized_conv_channel(x, c_w, p_w, b, padding=1)
    assert trp_kernels.backend_info()["self_check"]["verdicts"][0]["ok"]  # the real kernel passed its check
    (verdict,) = _verdicts("triton_channel")
    assert "BLOCK_M: 64" in verdict["signature"][-1]  # the tile configuration that ran is part of it
    selfcheck.reset()
    wrong = Wrapped(tri.factorized_conv_channel)
    monkeypatch.setattr(tri, "factorized_conv_channel", wrong)
    with pytest.warns(RuntimeWarning, match="triton_channel kernel on cpu disagrees"):
        y = trp_kernels.factorized_conv_channel(x, c_w, p_w, b, padding=1)
    torch.testing.assert_close(y, reference.factorized_conv_channel(x, c_w, p_w, b, (1, 1), (1, 1, 1, 1), (1, 1)))
    torch.testing.assert_close(y, good, rtol=1e-4, atol=1e-4)
    assert trp_kernels.backend_info()["factorized_conv"]["last"]["channel"] == "torch"
    trp_kernels.factorized_conv_channel(x, c_w, p_w, b, padding=1)
    assert wrong.calls == 1  # unusable: not run again


@pytest.mark.triton
def test_the_conv_check_bound_passes_rounding_and_catches_an_edge_error():
    """The element-wise bound holds for the real kernel (in the dtypes the interpreter runs: its bfloat16 results are
    wrong, which is what the check then says), and a wrong border (one output column shifted) fails it, though it
    is a small part of the output."""
    tri = _triton_or_skip()
    args = ((1, 1), [1, 1, 1, 1], (1, 1))
    for dtype in (torch.float32, torch.float16):
        x, c_w, p_w = torch.randn(2, 16, 12, 12, dtype=dtype), torch.randn(8, 16, 3, 3, dtype=dtype), \
            torch.randn(16, 8, 1, 1, dtype=dtype)
        y = tri.factorized_conv_channel(x, c_w, p_w, None, *args)
        ok, detail = probes.convolution("channel", y, x, c_w, p_w, None, *args)
        assert ok, (dtype, detail)
        bad = y.clone()
        bad[..., -1] = y[..., -2]
        assert probes.convolution("channel", bad, x, c_w, p_w, None, *args)[0] is False, dtype


# --- ranks agree under torch.distributed ------------------------------------------------------------------------

def _agreement_worker(world, init_method):
    torch.set_num_threads(1)
    selfcheck.reset()
    import os
    os.environ[selfcheck.ENV] = "all"
    if world.rank == 1:  # only rank 1's kernel is wrong
        torch.ops.trp_kernels_C.lowrank_project = Wrapped(torch.ops.trp_kernels_C.lowrank_project)
    with distributed.process_group(world, "cpu", init_method):
        W = make_batch(2, 20, 30, "decay")
        with warnings.catch_warnings(record=True), selfcheck.agreement():
            warnings.simplefilter("always")
            trp_kernels.lowrank_project(W, 0.9)
        info = selfcheck.info()
        if info["unusable"] != ["lowrank_project@cpu"]:
            raise ValueError(f"rank {world.rank}: {info}")
        if world.rank == 0 and "failed on another rank" not in info["verdicts"][0]["detail"]:
            raise ValueError(f"rank 0 does not say why: {info['verdicts']}")


@needs_cpp
@pytest.mark.slow
def test_ranks_agree_on_a_verdict():
    """Inside selfcheck.agreement() the kernel is unusable on every rank when its check failed on one."""
    distributed.spawn(_agreement_worker, 2)


# --- the precision setting around the projection ------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("warm_start", [False, True])
def test_the_float32_matmul_precision_is_ieee_while_projecting_and_restored_after(monkeypatch, warm_start):
    """cuBLASLt, TunableOp and oneDNN's bfloat16 mode read the setting itself (not at::NoTF32Guard): it must say
    "ieee" during the kernels (seen from inside an injected kernel), and the user's value after."""
    seen = []
    real = torch.ops.trp_kernels_C.lowrank_project_basis

    def spy(*args):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real(*args)

    monkeypatch.setattr(torch.ops.trp_kernels_C, "lowrank_project_basis", spy)
    monkeypatch.setenv(selfcheck.ENV, "0")
    old = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        state = trp_kernels.WarmStart() if warm_start else None
        W_low, rank, G = trp_kernels.lowrank_project(make_batch(2, 20, 30, "decay"), 0.9, subgradient=True,
                                                     warm=state)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
    if warm_start:
        assert seen == ["ieee"]
    check_projection(make_batch(2, 20, 30, "decay"), 0.9, W_low, rank, G)


def test_the_precision_guard_nests_across_threads():
    """The first holder saves the user's setting, the last one restores it."""
    settings = torch.backends.cuda.matmul
    old = settings.fp32_precision
    settings.fp32_precision = "tf32"
    try:
        with precision.ieee_matmul("cuda"):
            with precision.ieee_matmul("cuda"):
                assert settings.fp32_precision == "ieee"
            assert settings.fp32_precision == "ieee"
        assert settings.fp32_precision == "tf32"
    finally:
        settings.fp32_precision = old


# --- a GPU the build has no kernel image for ------------------------------------------------------------------

def test_a_gpu_without_a_kernel_image_falls_back_with_a_warning(monkeypatch):
    """The decision, on the CPU: a device whose capability this build has no image for (sm_75 with 8.0;9.0+PTX)
    runs the reference; one it has an image for (SASS or PTX) runs the compiled kernels."""
    monkeypatch.setattr(_extension, "has_kernel", lambda name, key: True)
    monkeypatch.setattr(_extension, "has_op", lambda name: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: {0: (7, 5), 1: (9, 0), 2: (12, 0)}[index])
    monkeypatch.setattr(_extension, "_images", {0: 0, 1: 90, 2: 90})  # what cudaFuncGetAttributes reported
    monkeypatch.setattr(_extension, "_warned", set())
    monkeypatch.delenv(project.BACKEND_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=r"no image for compute capability 7\.5"):
        assert project.backend_for("cuda:0") == "reference"
    assert project.backend_for("cuda") == "reference"  # the current device; warned once
    assert project.backend_for("cuda:1") == "cpp" and project.backend_for("cuda:2") == "cpp"  # SASS; PTX JIT
    monkeypatch.setenv(project.BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match="TRP_PROJECT_BACKEND=cpp but the compiled CUDA kernels have no image"):
        project.backend_for("cuda:0")
    assert _extension.image_missing((8, 6), 80) is None and "8.6" in _extension.image_missing((8, 6), 0)
