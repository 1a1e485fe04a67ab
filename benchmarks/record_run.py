"""Run a command and record what it prints, in the results schema (benchmarks/harness.py): the command, the
machine, the date, the exit status, the seconds and the output lines, with the checkout's path made relative.
`make demo-record` records `make demo`'s job this way; benchmarks/pages.py turns the file into the README's block
and docs/benchmarks/demo.md.

    python benchmarks/record_run.py --out results/demo.json -- .venv/bin/trp train ...
"""
import argparse
import os
import subprocess
import sys
import time

import harness  # first: puts the checkout on sys.path


def relative(text):
    """The output with the checkout's absolute path dropped, so that a record does not depend on where it ran."""
    return text.replace(str(harness.ROOT) + os.sep, "").replace(str(harness.ROOT), ".")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the results file to write (JSON)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    shown = " ".join([os.path.basename(command[0])] + command[1:])
    name = os.path.splitext(os.path.basename(args.out))[0]
    results = harness.Results(args.out, name, "cpu")
    results.doc["command"] = shown
    t0 = time.perf_counter()
    # stdout only: progress bars and warnings go to stderr, which is passed through to the terminal
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=harness.ROOT)
    seconds = round(time.perf_counter() - t0, 1)
    sys.stdout.write(proc.stdout)
    results.doc["complete"] = proc.returncode == 0
    results.doc.update(returncode=proc.returncode, seconds=seconds, output=relative(proc.stdout).splitlines())
    results.write()
    print(f"wrote {args.out} (exit status {proc.returncode}, {seconds} s)")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
