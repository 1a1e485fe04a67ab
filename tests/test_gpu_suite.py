"""benchmarks/gpu_suite.sh --dry-run: the device suite's script, step selections and table scripts work, so a
GPU slot is never spent on a broken suite. Also the shared results schema of the table scripts."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
# the dry run's steps (no build), in the order of value: checks, the projection's tests and tables, the convs'
STEPS = ["preflight", "build_checks", "self_checks", "lowrank_tests", "racecheck", "lowrank_table", "pruner_overhead",
         "conv_tests", "conv_layers", "conv_e2e"]


@pytest.mark.slow
def test_gpu_suite_dry_run(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine; the suite's own pytest runs set what they need
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())
    assert suite["dry_run"] is True
    assert [s["step"] for s in suite["steps"]] == STEPS
    assert all(s["rc"] == 0 for s in suite["steps"]), suite["steps"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    for name in ("lowrank_project_cpu.json", "pruner_overhead_cpu.json", "conv_e2e_cpu.json"):
        doc = json.loads((out / name).read_text())
        assert {"name", "date", "command", "machine", "complete", "rows"} <= set(doc), name
        assert doc["complete"] and doc["rows"], name
        assert doc["machine"]["torch"] and doc["date"].endswith("+00:00")
    assert "n=64" in (out / "sanitizer.log").read_text()
    checks = suite["backend_info"]["self_check"]
    assert checks["verdicts"] and all(v["ok"] for v in checks["verdicts"]) and checks["failure"] == "error"
    collected = re.findall(r"^(\d+)(?:/\d+)? tests? collected", (out / "tests.log").read_text(), re.M)
    assert len(collected) == 3 and all(int(n) > 0 for n in collected), collected  # build, lowrank, conv tests
    kinds = [r["weights"] for r in json.loads((out / "lowrank_project_cpu.json").read_text())["rows"]]
    assert kinds[0] == "trajectory" and "trp" in kinds  # the warm start's trajectory first, then the static rows


def _limits():
    out = subprocess.run(["bash", str(SUITE), "--limits"], capture_output=True, text=True, check=True).stdout
    pairs = [line.split() for line in out.splitlines()]
    return [(name, int(v)) for name, v in pairs if name != "budget"], int(dict(pairs)["budget"])


def test_step_limits_add_up_within_the_budget_in_the_order_the_steps_run():
    """No step is cut for lack of time when every step uses its whole limit; and the script runs its steps in the
    declared order (the order of value: checks first, the conv tables last)."""
    limits, budget = _limits()
    assert sum(v for _, v in limits) <= budget, limits
    body = SUITE.read_text().split("\nsummary() {", 1)[1]  # the steps' calls, after the helpers' definitions
    calls = re.findall(r"^\s*(?:\w+=\S+ )*(?:step|pytest_step) (\w+)", body, re.M)
    ran = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # racecheck: dry run or not
    assert ran == [name for name, _ in limits], ran


def test_preflight_names_a_missing_module_within_seconds(tmp_path):
    script = tmp_path / "uses_missing.py"
    script.write_text("import os\nimport no_such_module_trp\n\ndef later():\n    import another_missing_one\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite_preflight.py"), "--dry-run",
                           str(script), str(ROOT / "tests" / "test_lowrank_project.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "missing module no_such_module_trp (imported by uses_missing.py)" in proc.stdout
    assert "another_missing_one" not in proc.stdout  # imported inside a function: optional, not required


def test_a_failed_preflight_stops_the_suite(tmp_path):
    """The suite records the preflight and stops: no build, no tests, no tables spend the slot."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncase \"$1\" in *gpu_suite_preflight.py) echo 'preflight: missing module x'; "
                      f"exit 1;; esac\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHON=str(python))
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    assert [(s["step"], s["rc"]) for s in suite["steps"]] == [("preflight", 1)]
    assert "missing module x" in (out / "build.log").read_text()


def _lowrank_table_smoke(tmp_path, part):
    """benchmarks/lowrank_table.py --part `part` --smoke: (its stdout, the rows of its JSON)."""
    out = tmp_path / f"{part}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lowrank_table.py"), "--part", part,
                           "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())["rows"]


def test_lowrank_breakdown_smoke(tmp_path):
    """benchmarks/lowrank_table.py --part breakdown: the settled-step breakdown adds up and names its parts."""
    stdout, rows = _lowrank_table_smoke(tmp_path, "breakdown")
    assert [row["path"] for row in rows] == ["in place", "stacked"]  # the CPU's path and the GPU's
    for row in rows:
        assert row["weights"] == "settled" and row["steps"] == 2 and len(row["raw"]["step"]) == 2
        assert 0 < row["kernels_s"] <= row["ops_s"] <= row["step_s"] and row["loop_s"] > 0
        assert abs(row["ops_python_s"] + row["pruner_python_s"] + row["kernels_s"] - row["step_s"]) < 1e-9
    assert "settled RankPruner.step(), in place" in stdout


def test_lowrank_paths_smoke(tmp_path):
    """benchmarks/lowrank_table.py --part paths: both CPU paths timed per group, the warm step certified."""
    stdout, rows = _lowrank_table_smoke(tmp_path, "paths")
    assert rows and all(r["weights"] == "paths" and r["warm_certified"] == r["shape"][0] for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("cold_per_matrix_s", "cold_batched_s", "warm_per_matrix_s",
                                                "warm_batched_s"))
    assert "one matrix per thread" in stdout


def test_lowrank_widths_smoke(tmp_path):
    """benchmarks/lowrank_table.py --part widths: the full solve and the warm step per basis width, certified."""
    stdout, rows = _lowrank_table_smoke(tmp_path, "widths")
    assert [r["energy"] for r in rows] == [0.95, 0.9, 0.8, 0.7]
    assert all(r["weights"] == "widths" and r["warm_certified"] and r["cold_s"] > 0 and r["warm_s"] > 0 for r in rows)
    fractions = [r["basis_fraction"] for r in rows]
    assert fractions == sorted(fractions, reverse=True) and 0 < fractions[-1] < fractions[0] <= 1
    assert "warm / full" in stdout


def _bench_functions():
    """Every test function defined in benchmarks/bench_*.py, as (file name, function name)."""
    import ast
    found = set()
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        tree = ast.parse(path.read_text())
        found |= {(path.name, node.name) for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return found


@pytest.mark.slow
def test_make_bench_collects_and_runs_every_benchmark():
    """`make bench` runs `pytest benchmarks`: every benchmark is collected, and each runs once (--smoke)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
                           "--smoke", "--benchmark-disable", "-rs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    collect = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                              "benchmarks"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    ids = [line for line in collect.stdout.splitlines() if "::" in line]
    collected = {(line.split("::")[0].rsplit("/", 1)[-1], line.split("::")[1].split("[")[0]) for line in ids}
    expected = _bench_functions()
    assert expected and expected <= collected, sorted(expected - collected)
    recipe = (ROOT / "Makefile").read_text().split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "pytest" in recipe and "benchmarks" in recipe
