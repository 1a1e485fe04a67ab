"""Builds trp_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

TRP_KERNELS_CUDA=auto (default): CUDA sources are compiled when torch has CUDA and a toolkit is found.
TRP_KERNELS_CUDA=0: CPU only.  TRP_KERNELS_CUDA=1: CUDA is required; failing to build it is an error.
A CPU-only build never fails because CUDA is missing. Build with `pip install --no-build-isolation`: the
extension links against the torch that is installed.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ARCH_FILE = os.path.join(ROOT, "csrc", "cuda_arches.txt")  # also read by CMakeLists.txt


# The device code's flags (CMakeLists.txt has the same): --fmad=false, see cxx_flags in build_extensions.
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--fmad=false"]


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST, else the list in csrc/cuda_arches.txt (e.g. "8.0;9.0+PTX")."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    with open(ARCH_FILE) as f:
        return next(line.strip() for line in f if line.strip() and not line.startswith("#"))


def _is_toolkit(home):
    return bool(home) and all(os.path.isfile(os.path.join(home, *p))
                              for p in (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def cuda_toolkit(torch_guess):
    """The CUDA toolkit to compile with. `torch_guess` is torch.utils.cpp_extension.CUDA_HOME: $CUDA_HOME
    or $CUDA_PATH when set (then the only candidate), else the directory above nvcc's bin/. Where nvcc on PATH
    is a link or wrapper script outside the toolkit (/usr/local/bin/nvcc), that guess is /usr/local, which
    holds no CUDA headers: then the link's target, else /usr/local/cuda. None: no toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return torch_guess if _is_toolkit(torch_guess) else None
    nvcc = shutil.which("nvcc")
    target = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    return next((h for h in (torch_guess, target, "/usr/local/cuda") if _is_toolkit(h)), None)


def _cuda_mode():
    mode = os.environ.get("TRP_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TRP_KERNELS_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _pip_cuda_includes():
    """Headers of the CUDA libraries that torch's wheels ship (cuBLAS, cuSPARSE, ...): ATen's CUDA
    headers include them, and a bare toolkit install may lack them."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    bases = (spec.submodule_search_locations or []) if spec else []
    return sorted({d for base in bases for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d)})


def build_extensions():
    mode = _cuda_mode()
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if not cpu_sources:
        return [], {}
    cuda_home = cuda_toolkit(cpp_extension.CUDA_HOME) if mode != "0" and torch.version.cuda else None
    if mode == "1" and not cuda_home:
        sys.exit("TRP_KERNELS_CUDA=1 but CUDA cannot be built: "
                 f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home} (set CUDA_HOME)")
    os.environ.setdefault("MAX_JOBS", "2")
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch 2.14 headers need C++20. No contraction of a * b + c into FMAs, on the host (-ffp-contract=off: GCC
    # contracts by default where the target has FMA, e.g. aarch64) nor on the device (--fmad=false): the CPU's
    # one-thread path and the GPU's kernels compute the same expressions bit for bit (docs/design/gpu-trust.md).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    define_macros = [("TRP_PYTHON_MODULE", "1")]
    if cuda_home and cuda_sources:
        # cpp_extension reads its module-level CUDA_HOME when it compiles (nvcc, include and library paths).
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
        print(f"trp_kernels: building CUDA kernels with toolkit {cuda_home} for {cuda_arch_list()}")
        ext = cpp_extension.CUDAExtension(
            "trp_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _pip_cuda_includes(),
            define_macros=define_macros + [("TRP_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        print("trp_kernels: building the C++ CPU kernels only"
              + ("" if mode == "0" else f" (torch CUDA={torch.version.cuda}, toolkit={cuda_home})"))
        ext = cpp_extension.CppExtension(
            "trp_kernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its functions
    ext_modules, cmdclass = build_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
