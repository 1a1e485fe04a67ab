"""The CUDA kernels' block functions (csrc/common/block_kernels.h: the code the .cu launches) run on the CPU as a GPU
runs them, by the block emulator (csrc/emulator/block_emulator.cpp: one std::thread per CUDA thread, a barrier for
__syncthreads(), poisoned shared memory, the launcher's thread counts and shared-memory sizes), built with g++
(no torch) with and without ThreadSanitizer: bit-identical to the one-thread path (the CPU kernels') and race-free
for n in {1, 2, 3, 7, 16, 33, 54, 55, 64}. A variant with a planted missing barrier (TRP_PLANT_MISSING_BARRIER)
must fail both ways, so the test can fail. The binaries are cached under build/block_emulator by a hash of
their sources and flags."""
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "emulator" / "block_emulator.cpp"
HEADERS = [ROOT / "csrc" / "common" / name for name in ("block_kernels.h", "jacobi.h", "warm_certify.h")]
CACHE = ROOT / "build" / "block_emulator"
BASE_FLAGS = ["-std=c++20", "-pthread", "-ffp-contract=off", f"-I{ROOT / 'csrc'}"]
VARIANTS = {
    "plain": ["-O2"],
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
    "broken": ["-O2", "-DTRP_PLANT_MISSING_BARRIER"],
    "broken-tsan": ["-O1", "-g", "-fsanitize=thread", "-DTRP_PLANT_MISSING_BARRIER"],
}
SIZES = [1, 2, 3, 7, 16, 33, 54, 55, 64]
# report every race (not only the first), and exit 66 when there was one
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 report_signal_unsafe=0"}
RACE = "WARNING: ThreadSanitizer: data race"


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def _binary_path(variant):
    digest = hashlib.sha256()
    for path in [SOURCE, *HEADERS]:
        digest.update(path.read_bytes())
    digest.update(" ".join(BASE_FLAGS + VARIANTS[variant]).encode())
    return CACHE / f"{variant}-{digest.hexdigest()[:16]}"


def _tsan_unavailable(cxx, workdir):
    """None when -fsanitize=thread builds and runs a threaded program here, else why not (libtsan missing, or a
    kernel whose address-space layout ThreadSanitizer rejects)."""
    src = workdir / "tsan_probe.cpp"
    src.write_text("#include <thread>\nint x;\nint main() { std::thread t([] { x = 1; }); t.join(); return x - 1; }\n")
    exe = workdir / "tsan_probe"
    build = subprocess.run([cxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)], capture_output=True,
                           text=True)
    if build.returncode != 0:
        return f"{cxx} -fsanitize=thread does not build (is libtsan installed?): {build.stderr.strip()[:300]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        return f"a ThreadSanitizer program does not run here: {run.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """{variant: path of its binary, or the reason it is missing}: built in parallel (cached)."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the block emulator")
    CACHE.mkdir(parents=True, exist_ok=True)
    tsan_missing = _tsan_unavailable(cxx, tmp_path_factory.mktemp("tsan"))
    built, procs = {}, {}
    for variant, flags in VARIANTS.items():
        exe = _binary_path(variant)
        if "-fsanitize=thread" in flags and tsan_missing:
            built[variant] = tsan_missing
        elif exe.exists():
            built[variant] = exe
        else:
            tmp = exe.with_suffix(".tmp")
            procs[variant] = (exe, tmp, subprocess.Popen([cxx, *BASE_FLAGS, *flags, str(SOURCE), "-o", str(tmp)],
                                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for variant, (exe, tmp, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"building the {variant} block emulator failed:\n{err[-3000:]}"
        tmp.replace(exe)  # atomically: a concurrent run never sees half a binary
        built[variant] = exe
    return built


def _run(emulators, variant, *args):
    exe = emulators[variant]
    if not isinstance(exe, Path):
        pytest.skip(exe)
    env = dict(os.environ, **TSAN_ENV)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)


def _check_all_identical(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("block emulator: all identical")
    lines = proc.stdout.splitlines()
    for n in SIZES:  # every size ran, at the launcher's thread count
        assert any(line.startswith(f"jacobi n={n} ") and "identical" in line for line in lines), n
    assert any("512 threads" in line for line in lines)  # the largest block the launcher makes
    assert any(line.startswith("warm_certify") for line in lines) and any(line.startswith("select_rank")
                                                                        for line in lines)


def test_block_functions_equal_the_one_thread_path(emulators):
    _check_all_identical(_run(emulators, "plain"))


def test_block_functions_are_race_free_under_thread_sanitizer(emulators):
    proc = _run(emulators, "tsan")
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[-6000:]
    _check_all_identical(proc)


def test_a_missing_barrier_changes_results(emulators):
    """The planted bug (no barrier between the row and the column phase) is caught by the comparison alone."""
    proc = _run(emulators, "broken", "--sizes", "3,7,16", "--jacobi-only")
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "jacobi n=7 random: 32 threads" in proc.stdout and "DIFFERENT from the one-thread path" in proc.stdout
    assert proc.stdout.strip().endswith("block emulator: FAILED")


def test_a_missing_barrier_is_a_race_under_thread_sanitizer(emulators):
    proc = _run(emulators, "broken-tsan", "--sizes", "7", "--jacobi-only")
    assert RACE in proc.stderr, proc.stderr[-3000:]
    assert "jacobi_phase_rows" in proc.stderr or "jacobi_phase_cols" in proc.stderr
    assert proc.returncode != 0
