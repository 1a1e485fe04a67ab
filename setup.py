"""Builds trp_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

TRP_KERNELS_CUDA=auto (default): CUDA sources are compiled when torch has CUDA and nvcc is found.
TRP_KERNELS_CUDA=0: CPU only.  TRP_KERNELS_CUDA=1: CUDA is required; failing to build it is an error.
A CPU-only build never fails because CUDA is missing.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _has_cudart(home):
    return any(
        glob.glob(os.path.join(home, sub, "libcudart.so*"))
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    )


def find_cuda_home():
    """The toolkit directory: nvcc on PATH may be a wrapper script or link outside the toolkit, so
    the answer is the candidate whose lib64 holds libcudart and whose bin holds nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for token in head.split():
                token = token.strip("'\"")
                if token.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and _has_cudart(home):
            return os.path.realpath(home)
    return None


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
    dirs = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def build_extensions():
    mode = _cuda_mode()
    cuda_home = find_cuda_home() if mode != "0" else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if not cpu_sources:
        return [], {}
    want_cuda = mode == "1" or (mode == "auto" and torch.version.cuda is not None and cuda_home)
    if mode == "1" and (torch.version.cuda is None or not cuda_home):
        sys.exit("TRP_KERNELS_CUDA=1 but CUDA cannot be built: "
                 f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home}")
    os.environ.setdefault("MAX_JOBS", "2")
    # sm_80 and sm_90 only, so that a build fits in CI's time (override for other GPUs).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]  # torch 2.14 headers need C++20
    define_macros = [("TRP_PYTHON_MODULE", "1")]
    if want_cuda and cuda_sources:
        print(f"trp_kernels: building CUDA kernels with toolkit {cuda_home}")
        ext = cpp_extension.CUDAExtension(
            "trp_kernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _pip_cuda_includes(),
            define_macros=define_macros + [("TRP_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
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


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import find_cuda_home
    ext_modules, cmdclass = build_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
