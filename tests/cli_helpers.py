"""Shared by the tests that drive the `trp` command: a tiny, quick training setup and an in-process run."""
from trp.app.cli import main

# digits at 8x8, 48 samples, batches of 16: a training epoch takes a few seconds on a 2-core CPU
TINY = ["--data", "digits", "--image-size", "8", "--subset", "48", "--batch-size", "16", "--seed", "1",
        "--schedule", "1", "--no-progress"]


def run_cli(capsys, *args):
    """(exit status, stdout, stderr) of `trp ARGS` run in this process."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
