"""Packaging and build: setup.py's CUDA toolkit and architecture choice, the sdist -> wheel -> fresh
environment chain, and the PTX that the CUDA build ships beside the SASS."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile

import pytest

import trp_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    spec = importlib.util.spec_from_file_location("trp_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs as __main__
    return module


setup_py = _setup_module()


# --- CUDA toolkit and architectures -------------------------------------------------------------------

def _fake_toolkit(path):
    for sub, name in (("bin", "nvcc"), ("include", "cuda_runtime.h")):
        os.makedirs(path / sub, exist_ok=True)
        (path / sub / name).write_text("#!/bin/sh\n")
    os.chmod(path / "bin" / "nvcc", 0o755)
    return str(path)


@pytest.fixture
def no_cuda_env(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)


def test_cuda_toolkit_takes_torch_guess_when_it_is_a_toolkit(tmp_path, no_cuda_env):
    assert setup_py.cuda_toolkit(_fake_toolkit(tmp_path / "tk")) == str(tmp_path / "tk")


def test_cuda_toolkit_explicit_cuda_home_is_the_only_candidate(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    assert setup_py.cuda_toolkit(str(tmp_path / "missing")) is None  # not /usr/local/cuda behind its back
    monkeypatch.setenv("CUDA_HOME", _fake_toolkit(tmp_path / "tk"))
    assert setup_py.cuda_toolkit(str(tmp_path / "tk")) == str(tmp_path / "tk")


def test_cuda_toolkit_follows_an_nvcc_link_outside_the_toolkit(tmp_path, monkeypatch, no_cuda_env):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "local" / "bin").mkdir(parents=True)
    (tmp_path / "local" / "bin" / "nvcc").symlink_to(os.path.join(toolkit, "bin", "nvcc"))
    monkeypatch.setenv("PATH", str(tmp_path / "local" / "bin"))
    # torch's guess is the link's parent's parent, which holds no CUDA headers
    assert setup_py.cuda_toolkit(str(tmp_path / "local")) == toolkit


def test_cuda_toolkit_wrapper_script_falls_back_to_usr_local_cuda(tmp_path, monkeypatch, no_cuda_env):
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "local" / "bin").mkdir(parents=True)
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    expected = "/usr/local/cuda" if setup_py._is_toolkit("/usr/local/cuda") else None
    assert setup_py.cuda_toolkit(str(tmp_path / "local")) == expected


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_cuda_toolkit_on_this_machine(no_cuda_env):
    torch_guess = os.path.dirname(os.path.dirname(shutil.which("nvcc")))  # torch's guess without CUDA_HOME
    home = setup_py.cuda_toolkit(torch_guess)
    assert home is not None and setup_py._is_toolkit(home)


def test_arch_list_from_the_one_file_with_ptx(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    arches = setup_py.cuda_arch_list()
    assert arches.split(";")[-1].endswith("+PTX"), arches  # the newest architecture also as PTX
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert setup_py.cuda_arch_list() == "8.6"


# --- the built extension ships PTX ---------------------------------------------------------------------

def _cuobjdump():
    """cuobjdump: on PATH, in the CUDA toolkit, or the copy that Triton's wheel bundles."""
    home = setup_py.cuda_toolkit(os.environ.get("CUDA_HOME"))
    triton = importlib.util.find_spec("triton")
    candidates = [shutil.which("cuobjdump"), home and os.path.join(home, "bin", "cuobjdump")]
    if triton and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_cuda_build_ships_ptx_beside_sass():
    info = trp_kernels.backend_info()
    if not info["lowrank_project"]["compiled_cuda"]:
        pytest.skip("trp_kernels._C was built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton wheel)")
    lib = importlib.util.find_spec("trp_kernels._C").origin

    def listing(kind):
        out = subprocess.run([tool, f"--list-{kind}", lib], capture_output=True, text=True, check=True)
        return [line for line in out.stdout.splitlines() if line.startswith(f"{kind.upper()} file")]

    ptx, sass = listing("ptx"), listing("elf")
    assert ptx, f"no PTX in {lib}: a GPU newer than the SASS architectures could not run it"
    assert sass, f"no SASS in {lib}"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the default list: PTX of its last (newest) entry
        newest = setup_py.cuda_arch_list().split(";")[-1].replace("+PTX", "").replace(".", "")
        assert any(f"sm_{newest}" in line for line in ptx), ptx


# --- sdist -> wheel -> a fresh environment ---------------------------------------------------------------

SMOKE = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import trp, trp_kernels
    from trp_kernels import reference
    for module in (trp, trp_kernels):
        assert module.__file__.startswith(sys.prefix), module.__file__
    info = trp_kernels.backend_info()
    assert info["extension_loaded"] and info["lowrank_project"]["cpu"] == "cpp", info
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(3, 12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(3, 20, 12, generator=g, dtype=torch.float64))
    W = U @ torch.diag(0.7 ** torch.arange(12.0, dtype=torch.float64)) @ V.mT
    W_low, rank, G = trp_kernels.lowrank_project(W, 0.9, subgradient=True)
    R_low, R_rank, R_G = reference.lowrank_project(W, 0.9, None, True)
    assert torch.equal(rank, R_rank) and torch.allclose(W_low, R_low, atol=1e-9), (rank, R_rank)
    assert torch.allclose(G, R_G, atol=1e-8)
    x = torch.randn(2, 3, 9, 9, generator=g)
    c, p, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g), torch.randn(5, generator=g)
    y = trp_kernels.factorized_conv_channel(x, c, p, b, stride=2, padding=1)
    assert torch.allclose(y, F.conv2d(F.conv2d(x, c, None, 2, 1), p, b), atol=1e-5)
    print("sdist install ok", trp_kernels.__file__)
""")


def _run(*cmd, **kwargs):
    env = dict(os.environ, TRP_KERNELS_CUDA="0", PIP_NO_INPUT="1")
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, **kwargs)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
def test_sdist_builds_a_wheel_that_works_outside_the_tree(tmp_path):
    pytest.importorskip("build", reason="pypa build (dev extra) makes the sdist")
    egg_info = os.path.join(ROOT, "trp.egg-info")
    had_egg_info = os.path.exists(egg_info)
    try:
        _run(sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", tmp_path / "dist", ROOT)
    finally:
        if not had_egg_info:  # the sdist's metadata step writes it into the tree
            shutil.rmtree(egg_info, ignore_errors=True)
    (sdist,) = glob.glob(str(tmp_path / "dist" / "trp-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "requirements/pinned.txt", "LICENSE",
              "mkdocs.yml", "docs/index.md"}
    needed |= {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
               if os.path.isfile(f)}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"

    # The wheel is built from the unpacked sdist alone (pip builds it in a temporary directory).
    _run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", tmp_path / "wheels", sdist)
    (wheel,) = glob.glob(str(tmp_path / "wheels" / "trp-*.whl"))
    # every Python module of both packages, subpackages (trp.models, trp_kernels.triton) included
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    modules = {os.path.join("trp", os.path.relpath(f, os.path.join(ROOT, "python", "trp")))
               for f in glob.glob(os.path.join(ROOT, "python", "trp", "**", "*.py"), recursive=True)}
    modules |= {os.path.relpath(f, ROOT)
                for f in glob.glob(os.path.join(ROOT, "trp_kernels", "**", "*.py"), recursive=True)}
    assert not modules - in_wheel, f"missing from the wheel: {sorted(modules - in_wheel)}"

    # A fresh venv that sees this interpreter's packages (torch, ...) through a .pth file, without copying
    # them; the .pth entries come after the venv's own site-packages, so the wheel's trp wins.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = _run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(site, "outer-site-packages.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    # --ignore-installed: the outer environment's own (editable) trp must not count as installed here
    _run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--ignore-installed", wheel)
    out = _run(py, "-c", SMOKE, cwd=tmp_path)
    assert "sdist install ok" in out and str(venv) in out
