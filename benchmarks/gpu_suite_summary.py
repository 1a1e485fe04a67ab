"""Folds the device suite's scratch files (step records, JUnit files, GPU and backend info) into one
suite.json, so that the suite returns few files. Called by benchmarks/gpu_suite.sh; exits 1 when a step
failed or was skipped for lack of time."""
import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import harness


def junit_summary(path):
    """Counts and the failing tests (name and the first line of the message) of one JUnit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:300] if message else ''}")
    return {**counts, "failed": failed}


def last_json_line(path):
    try:
        lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--dry-run", type=int, default=0)
    args = ap.parse_args(argv)
    steps = [json.loads(line) for line in (args.work / "steps.jsonl").read_text().splitlines() if line]
    for s in steps:
        xml = args.work / f"{s['step']}.xml"
        if xml.exists():
            s["tests"] = junit_summary(xml)
    gpu = args.work / "gpu.txt"
    doc = {"name": "gpu_suite", "date": harness.now_iso(), "dry_run": bool(args.dry_run),
           "seconds": args.seconds, "gpu": gpu.read_text().strip() if gpu.exists() else None,
           "machine": harness.machine("cuda" if not args.dry_run else "cpu"),
           "backend_info": last_json_line(args.work / "backend_info.log"), "steps": steps}
    args.out.write_text(json.dumps(doc, indent=1))
    for s in steps:
        tests = s.get("tests")
        counts = "" if not tests else (f"  tests {tests['tests']}, failures {tests['failures']}, errors "
                                       f"{tests['errors']}, skipped {tests['skipped']}")
        print(f"{s['step']:16s} rc {s.get('rc')}  {s.get('seconds', '-')} s{counts}")
        for name in (tests or {}).get("failed", [])[:20]:
            print(f"    FAILED {name}")
    print(f"suite: {args.seconds} s; wrote {args.out}")
    return 0 if all(s.get("rc") == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
