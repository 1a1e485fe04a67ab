"""The device suite's preflight (benchmarks/gpu_suite.sh runs it first): within seconds, before the build and the
tests spend the slot, names every module that the suite's files import at module level and this Python cannot
find, and (unless --dry-run) a missing GPU or CUDA toolkit. Exits 1 with one line per problem.

    python benchmarks/gpu_suite_preflight.py [--dry-run] FILE...

FILE: the suite's test files and scripts. Their top-level imports (not those inside functions or try blocks:
optional ones) are looked up with importlib.util.find_spec, which imports nothing; modules of this checkout
(tests/, benchmarks/, python/trp, trp_kernels) count as present. pytest's plugins named in pyproject.toml's
addopts are required too (pytest-benchmark for --benchmark-disable)."""
import argparse
import ast
import importlib.util
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# plugins the options of [tool.pytest.ini_options] addopts need, by option prefix
ADDOPTS_PLUGINS = {"--benchmark-": "pytest_benchmark"}


def top_level_imports(path):
    """The top-level module names a file imports unconditionally (module body statements only)."""
    names = set()
    for node in ast.parse(Path(path).read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def local_modules():
    """Modules this checkout provides: the test helpers, the benchmark scripts and the two packages."""
    found = {"trp", "trp_kernels", "conftest"}
    for folder in (ROOT / "tests", ROOT / "benchmarks"):
        found |= {p.stem for p in folder.glob("*.py")}
    return found


def addopts_plugins():
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'addopts\s*=\s*"([^"]*)"', text)
    opts = match.group(1).split() if match else []
    return {plugin for prefix, plugin in ADDOPTS_PLUGINS.items() if any(o.startswith(prefix) for o in opts)}


def missing_modules(files):
    """{module: [files importing it]} for the modules find_spec cannot find."""
    sys.path[:0] = [str(ROOT / "python"), str(ROOT)]
    needed = {}
    for f in files:
        for name in top_level_imports(f):
            needed.setdefault(name, []).append(Path(f).name)
    for plugin in addopts_plugins():
        needed.setdefault(plugin, []).append("pyproject.toml addopts")
    skip = set(sys.stdlib_module_names) | local_modules()
    return {name: sorted(users) for name, users in sorted(needed.items())
            if name not in skip and importlib.util.find_spec(name) is None}


def device_problems():
    """What the GPU steps need beyond modules: a visible GPU and a CUDA toolkit for the build."""
    import torch

    problems = []
    if not torch.cuda.is_available():
        problems.append(f"no CUDA device visible to torch {torch.__version__} (torch.version.cuda = "
                        f"{torch.version.cuda})")
    sys.path.insert(0, str(ROOT))
    from torch.utils import cpp_extension

    from setup import cuda_toolkit  # the build's own toolkit lookup
    if cuda_toolkit(cpp_extension.CUDA_HOME) is None:
        problems.append("no CUDA toolkit (nvcc and cuda_runtime.h) for the build: set CUDA_HOME")
    if shutil.which("compute-sanitizer") is None:
        print("preflight: compute-sanitizer not on PATH: the racecheck step will fail", flush=True)
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="modules only (no GPU, no toolkit needed)")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    problems = [f"missing module {name} (imported by {', '.join(users)})"
                for name, users in missing_modules(args.files).items()]
    if not problems and not args.dry_run:
        problems += device_problems()
    for p in problems:
        print(f"preflight: {p}", flush=True)
    print(f"preflight: {'FAILED' if problems else 'ok'} ({len(args.files)} files)", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
