"""Compile-only checks of the built CUDA kernels (trp_kernels/_C*.so, sm_80/sm_90 from csrc/cuda_arches.txt), read
from the binary with cuobjdump (bundled with Triton): each kernel's launch bounds equal the launcher's largest
block (csrc/common/block_kernels.h) and its registers fit them (more than 65536 / threads registers per thread
and every launch of that size fails, on a GPU only); no spills; and no fused multiply-add in the device code
(--fmad=false: the GPU computes bit for bit what the CPU's one-thread path computes, docs/design/gpu-trust.md).
Skipped when the extension was built without CUDA."""
import re
import subprocess
from pathlib import Path

import pytest

import trp_kernels
from test_triton_compile import nvidia_tool
from trp_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
HEADER = (ROOT / "csrc" / "common" / "block_kernels.h").read_text()
REGISTERS_PER_BLOCK = 65536  # sm_80 and sm_90


def _constant(name):
    return int(re.search(rf"constexpr int {name} = (\d+);", HEADER).group(1))


# kernel name (as in the mangled symbol) -> the constant its launcher's block size is bounded by
KERNELS = {"jacobi_eigh_kernel": "kJacobiMaxThreads", "warm_certify_kernel": "kPerMatrixThreads",
           "select_rank_kernel": "kPerMatrixThreads"}


@pytest.fixture(scope="module")
def library():
    if not _extension.has_kernel("lowrank_project", "CUDA"):
        pytest.skip(f"trp_kernels._C built without CUDA kernels ({_extension.error() or 'CPU-only build'})")
    cuobjdump = nvidia_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither bundled with Triton nor in a CUDA toolkit)")
    (so,) = Path(trp_kernels.__file__).parent.glob("_C*.so")
    return cuobjdump, so


def _dump(library, flag):
    cuobjdump, so = library
    return subprocess.run([cuobjdump, flag, str(so)], capture_output=True, text=True, check=True).stdout


def _kernel_of(symbol):
    return next((k for k in KERNELS if k in symbol), None)


def test_each_kernel_declares_and_fits_its_launch_bounds(library):
    """Per architecture image: EIATTR_MAX_THREADS (__launch_bounds__) = the launcher's largest block, and the
    registers per thread times that many threads fit a block's register file, without a stack frame."""
    usage = {}  # (arch, kernel) -> (registers, stack, local)
    arch = kernel = None
    for line in _dump(library, "--dump-resource-usage").splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif (m := re.search(r"Function (\S+):", line)) and _kernel_of(m.group(1)):
            kernel = _kernel_of(m.group(1))
        elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)) and kernel:
            usage[(arch, kernel)] = tuple(map(int, m.groups()))
            kernel = None
    bounds = {}  # (arch, kernel) -> max threads recorded in the cubin
    arch = section = None
    lines = _dump(library, "-elf").splitlines()
    for i, line in enumerate(lines):
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif line.startswith("."):
            section = _kernel_of(line) if line.startswith(".nv.info.") else None
        elif section and "EIATTR_MAX_THREADS" in line:
            value = next(v for v in lines[i + 1:i + 4] if "Value:" in v)
            bounds[(arch, section)] = int(value.split("Value:")[1].split()[0], 16)
    archs = {a for a, _ in usage}
    assert archs, "no kernel found in the binary"
    for arch in sorted(archs):
        for kernel, constant in KERNELS.items():
            threads = _constant(constant)
            regs, stack, local = usage[(arch, kernel)]
            assert bounds.get((arch, kernel)) == threads, (arch, kernel, bounds.get((arch, kernel)), threads)
            assert regs * threads <= REGISTERS_PER_BLOCK, (arch, kernel, regs, threads)
            assert stack == 0 and local == 0, (arch, kernel, stack, local)


def test_the_device_code_has_no_fused_multiply_add(library):
    """The PTX (the 9.0+PTX image) of the project's kernels: no fma.rn (nvcc contracts a * b + c without
    --fmad=false; IEEE division and square root are single PTX instructions, so any fma is a contraction)."""
    ptx = _dump(library, "-ptx")
    if ".entry" not in ptx:
        pytest.skip("the build embeds no PTX (TORCH_CUDA_ARCH_LIST without +PTX)")
    entries = re.split(r"\.entry ", ptx)[1:]
    ours = [e for e in entries if _kernel_of(e.split("(", 1)[0])]
    assert len(ours) >= len(KERNELS), [e.split("(", 1)[0] for e in entries]
    for entry in ours:
        assert "fma.rn" not in entry, entry.split("(", 1)[0]
        assert "mul.f64" in entry or "mul.rn.f64" in entry or "setp" in entry  # the dump holds the body
