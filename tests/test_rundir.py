"""The run directory: one `trp train` at a time (an OS lock that dies with its process), stale temporary files
of interrupted writes cleaned at the next start, every file written with the mode the umask gives."""
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

import trp
from cli_helpers import TINY as BASE
from cli_helpers import run_cli
from trp.app import checkpoint as ckpt
from trp.app import config, train
from trp.app import data as data_mod

TINY = BASE + ["--no-report", "--epochs", "1"]




def hold_lock(directory):
    """Another process holding `directory`'s run lock until it is killed."""
    code = ("import sys, time\nfrom trp.app.runlock import locked\nwith locked(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_busy_directory_fails_at_once_and_a_killed_holder_frees_it(tmp_path, capsys, monkeypatch):
    holder = hold_lock(tmp_path)
    try:
        with monkeypatch.context() as m:
            m.setattr(data_mod, "load", lambda *a, **k: pytest.fail("work started on a busy directory"))
            for extra in ([], ["--force"]):
                code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path, *extra)
                assert code == 2 and err.count("\n") == 1, err
                assert "in use by another `trp train`" in err and f"pid {holder.pid}" in err, err
        assert not (tmp_path / train.CHECKPOINT).exists()
    finally:
        holder.kill()  # a crash: the OS drops the lock with the process
        holder.wait()
    code, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path)
    assert code == 0, err
    holder = hold_lock(tmp_path)
    try:
        code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path, "--epochs", "2", "--no-progress")
        assert code == 2 and "in use" in err, err
    finally:
        holder.kill()
        holder.wait()
    assert ckpt.load_checkpoint(tmp_path / train.CHECKPOINT)["epoch"] == 1


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from trp.app.runlock import LockedError, locked
    with locked(tmp_path):
        with locked(tmp_path):  # the CLI holds it around Run.fit, which takes it too
            pass
        child = subprocess.run([sys.executable, "-c", "import sys\nfrom trp.app.runlock import locked\n"
                                "with locked(sys.argv[1]): pass", str(tmp_path)], capture_output=True, text=True)
        assert child.returncode != 0 and "in use" in child.stderr
    with locked(tmp_path):
        pass
    with pytest.raises(LockedError, match="not a directory"):
        with locked(tmp_path / ".trp.lock"):
            pass


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporary_files_are_cleaned_at_the_next_start(tmp_path):
    old = time.time() - 3 * 3600
    stale = [f".checkpoint.pt.{_dead_pid()}.ab3d_f9h.tmp",  # its writer is gone
             ".checkpoint.pt.x7k2m9q1.tmp"]                 # an older trp's name, hours old
    kept = [f".checkpoint.pt.{os.getpid()}.zz99zz99.tmp",  # a live writer
            ".report.json.a1b2c3d4.tmp",                      # an older trp's name, written just now
            "notes.tmp", ".other.tmp", "checkpoint.pt.12345678.tmp"]  # not our pattern
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    os.utime(tmp_path / stale[1], (old, old))
    for name in kept[2:]:
        os.utime(tmp_path / name, (old, old))
    cfg = config.resolve_config(dict(data="digits", image_size=8, subset=32, batch_size=16, epochs=1,
                                    schedule=[1], out=str(tmp_path)))
    train.Run(cfg, log=lambda *_: None, progress=False).fit()
    names = set(os.listdir(tmp_path))
    assert not names & set(stale), names
    assert set(kept) <= names


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(umask, tmp_path):
    model = trp.models.build("resnet20")
    old = os.umask(umask)
    try:
        trp.save(model, tmp_path / "model.pt")
        ckpt.save_checkpoint({"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": torch.ones(2)},
                             tmp_path / "ck.pt")
        from trp._utils.storage import atomic_write
        atomic_write(tmp_path / "report.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    for name in ("model.pt", "ck.pt", "report.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
