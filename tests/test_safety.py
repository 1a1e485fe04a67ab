"""Files and safety: no file is ever written through a symbolic link or truncated in place, only regular
files are read, a failing write names its file and leaves the previous one intact, Ctrl-C and SIGTERM end
with `trp: interrupted` (exit 130), and what the messages of an interrupted or refused run say."""
import contextlib
import errno
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import trp
from cli_helpers import TINY, run_cli
from trp._utils import storage
from trp.app import checkpoint as ckpt
from trp.app import cli, runlock
from trp.app import train as train_mod
from trp.deploy import plots
from trp.prune import distributed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run with its report: the inputs of the commands below."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _one_line_error(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and err.startswith("trp: error: "), err
    for needle in needles:
        assert str(needle) in err, err


# --- the run lock -------------------------------------------------------------------------------------------

def test_lock_never_follows_a_link_nor_truncates_a_file_it_did_not_make(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    lock = tmp_path / "run" / runlock.LOCK_NAME
    lock.parent.mkdir()
    cases = {"symbolic link": lambda: lock.symlink_to(victim),
             "2 hard links": lambda: os.link(victim, lock),
             "other data than a PID": lambda: lock.write_text("my notes"),
             "not a regular file": lambda: os.mkfifo(lock)}
    for why, plant in cases.items():
        plant()
        with pytest.raises(runlock.LockedError, match=why):
            with runlock.locked(lock.parent):
                pass
        assert victim.read_text() == "precious"
        if why == "other data than a PID":
            assert lock.read_text() == "my notes"
        lock.unlink()
    lock.write_text("12345\n")  # a lock file an earlier run left: reused, now with this PID
    with runlock.locked(lock.parent):
        assert lock.read_text() == f"{os.getpid()}\n"
    lock.unlink()
    with runlock.locked(lock.parent):  # created: a regular file, ours
        assert lock.read_text() == f"{os.getpid()}\n" and not lock.is_symlink()


# --- no write through a link, for every file the CLI writes --------------------------------------------------

def _train_case(name):
    return lambda t, trained: (["train", *TINY, "--epochs", "1", "--force", "--out", t / "run"], t / "run" / name)


def _report_case(name, *extra):
    return lambda t, trained: (["report", trained / "checkpoint.pt", "--out", t / "rep", *extra], t / "rep" / name)


WRITTEN = {
    "train .trp.lock": _train_case(runlock.LOCK_NAME),
    "train checkpoint.pt": _train_case(train_mod.CHECKPOINT),
    "train report.json": _train_case("report.json"),
    "train ranks.png": _train_case("ranks.png"),
    "train decomposed.pt": _train_case("decomposed.pt"),
    "report report.json": _report_case("report.json"),
    "report ranks.png": _report_case("ranks.png"),
    "report decomposed.pt": _report_case("decomposed.pt"),
    "report latency_fit.json": _report_case(cli.LATENCY_FIT, "--fit-latency", "eager"),
    "decompose -o": lambda t, trained: (["decompose", trained / "checkpoint.pt", "-o", t / "out.pt"], t / "out.pt"),
    "export -o": lambda t, trained: (["export", trained / "decomposed.pt", "-o", t / "m.onnx"], t / "m.onnx"),
    "resume into --out": lambda t, trained: (["train", "--resume", trained / "checkpoint.pt", "--out", t / "run",
                                              "--epochs", "2", "--no-report"], t / "run" / train_mod.CHECKPOINT),
}


@pytest.mark.parametrize("case", sorted(WRITTEN))
def test_no_file_is_written_through_a_symbolic_link(case, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod.Run, "fit", lambda self, *a: pytest.fail("work started before the check"))
    args, target = WRITTEN[case](tmp_path, trained)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target.parent.mkdir(exist_ok=True)
    target.symlink_to(victim)
    code, _, err = run_cli(capsys, *args)
    _one_line_error(code, err, target)
    assert victim.read_bytes() == b"precious" and target.is_symlink()


def test_api_writers_refuse_links_and_special_files(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    model = trp.models.build("resnet20")
    (tmp_path / "link.pt").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.pt")
    for name, why in (("link.pt", "symbolic link"), ("fifo.pt", "FIFO")):
        for write in (lambda p: trp.save(model, p), lambda p: ckpt.save_checkpoint({"x": 1}, p),
                      lambda p: storage.atomic_write(p, lambda f: f.write(b"new"))):
            with pytest.raises(storage.NotRegularFile, match=why):
                write(tmp_path / name)
    assert victim.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["fifo.pt", "link.pt", "victim"]


def test_links_named_like_temporaries_or_rendezvous_are_left_alone(tmp_path):
    victim_file, victim_dir = tmp_path / "victim", tmp_path / "victim_dir"
    victim_file.write_bytes(b"precious")
    victim_dir.mkdir()
    (victim_dir / "keep").write_bytes(b"precious")
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    temp_link = run / f".checkpoint.pt.{dead}.abcd1234.tmp"
    rdv_link = run / f"{distributed.RENDEZVOUS_PREFIX}{dead}-abcd1234"
    temp_link.symlink_to(victim_file)
    rdv_link.symlink_to(victim_dir)
    stale = run / f"{distributed.RENDEZVOUS_PREFIX}{dead}-stale123"  # a killed parent's: removed
    stale.mkdir()
    (stale / "rendezvous").write_bytes(b"")
    live = run / f"{distributed.RENDEZVOUS_PREFIX}{os.getpid()}-live1234"  # a running parent's: kept
    live.mkdir()
    assert storage.clean_stale_temps(run, train_mod.RUN_FILES) == []
    assert distributed.clean_stale_rendezvous(run) == [stale.name]
    assert temp_link.is_symlink() and rdv_link.is_symlink() and live.is_dir() and not stale.exists()
    assert victim_file.read_bytes() == b"precious" and (victim_dir / "keep").read_bytes() == b"precious"


# --- reads: regular files only ----------------------------------------------------------------------------

@contextlib.contextmanager
def _no_hang(seconds=60):
    def fail(*_):
        raise AssertionError(f"still waiting after {seconds} s (reading a FIFO?)")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("special", ["fifo", "device"])
def test_fifos_and_devices_are_refused_on_read(special, tmp_path, capsys):
    if special == "fifo":
        path = tmp_path / "model.pt"
        os.mkfifo(path)
        why = "is a FIFO, not a regular file"
    else:
        path = "/dev/zero"
        why = "is a character device, not a regular file"
    commands = (["eval", path], ["decompose", path, "-o", tmp_path / "o.pt"], ["report", path],
                ["export", path, "-o", tmp_path / "o.onnx"], ["train", "--resume", path, "--no-report"],
                ["train", *TINY, "--init", path, "--out", tmp_path / "run"])
    with _no_hang():
        for args in commands:
            code, _, err = run_cli(capsys, *args)
            _one_line_error(code, err, f"{path} {why}")
        for load in (trp.load, ckpt.load_checkpoint):
            with pytest.raises(storage.NotRegularFile, match=why):
                load(path)
    assert not (tmp_path / "run").exists() and not (tmp_path / "o.pt").exists()


# --- failing writes: disk full, I/O errors, interrupts -------------------------------------------------------

class _FailingFile:
    """The OS file under a write: fails once `limit` bytes were written (ENOSPC, EIO or an interrupt)."""

    def __init__(self, f, fault, limit):
        self._f, self._fault, self._left = f, fault, limit

    def write(self, data):
        if len(data) > self._left:
            self._f.write(bytes(memoryview(data)[:self._left]))
            raise self._fault()
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


FAULTS = {"disk full": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
          "input/output error": lambda: OSError(errno.EIO, os.strerror(errno.EIO)),
          "interrupt": KeyboardInterrupt}


@contextlib.contextmanager
def failing_writes(monkeypatch, fault, name, limit=100):
    """Every write to a temporary of the file `name` fails after `limit` bytes."""
    real = os.fdopen

    def fdopen(fd, *args, **kw):
        f = real(fd, *args, **kw)
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        return _FailingFile(f, FAULTS[fault], limit) if target.startswith(f".{name}.") else f

    with monkeypatch.context() as m:
        m.setattr(os, "fdopen", fdopen)
        yield


def _writers(trained):
    state = ckpt.load_checkpoint(trained / "checkpoint.pt")
    compact = trp.load(trained / "decomposed.pt")
    dense = train_mod.model_from_checkpoint(state)
    return {
        "checkpoint.pt": lambda p: ckpt.save_checkpoint(state, p),
        "decomposed.pt": lambda p: trp.save(compact, p),
        "ranks.png": lambda p: plots.rank_spectrum(dense, compact, "channel", p, energy=0.9),
        "report.json": lambda p: storage.atomic_write(p, lambda f: f.write(b"{" + b" " * 1000 + b"}")),
        "m.onnx": lambda p: trp.export_onnx(compact, p, (3, 8, 8), exporter="torchscript", opset=17),
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_write_keeps_the_previous_file_and_names_its_own(fault, trained, tmp_path, monkeypatch):
    for name, write in _writers(trained).items():
        path = tmp_path / name
        path.write_bytes(b"previous")
        with failing_writes(monkeypatch, fault, name):
            expected = KeyboardInterrupt if fault == "interrupt" else storage.WriteError
            with pytest.raises(expected) as info:
                write(path)
        if fault != "interrupt":
            assert str(info.value) == f"cannot write {path}: {fault}", name
        assert path.read_bytes() == b"previous", name
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], name  # no temporary left
        path.unlink()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_fsync_and_rename_failures_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_bytes(b"previous")
    for call in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(os, call, lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
            with pytest.raises(storage.WriteError, match=f"cannot write {path}: input/output error"):
                storage.atomic_write(path, lambda f: f.write(b"new"))
        assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["report.json"]


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
def test_cli_disk_full_and_interrupt_while_writing_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    before = (run / "checkpoint.pt").read_bytes()
    args = ["train", "--resume", "--out", run, "--epochs", "2", "--no-report", "--no-progress"]
    with failing_writes(monkeypatch, "disk full", "checkpoint.pt", limit=10_000):
        code, _, err = run_cli(capsys, *args)
    _one_line_error(code, err, f"cannot write {run / 'checkpoint.pt'}: disk full")
    with failing_writes(monkeypatch, "interrupt", "checkpoint.pt", limit=10_000):
        code, _, err = run_cli(capsys, *args)
    assert code == 130 and err.count("\n") == 1, err
    assert err.startswith(f"trp: interrupted (no checkpoint was written; the checkpoint it resumed from "
                          f"({run / 'checkpoint.pt'}, epoch 1) is untouched; continue with --resume)"), err
    assert (run / "checkpoint.pt").read_bytes() == before
    assert sorted(os.listdir(run)) == [".trp.lock", "checkpoint.pt"]


def test_cli_report_disk_full_names_the_file(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "_onnxruntime_latency", lambda *a: None)  # not what this test is about
    out = tmp_path / "rep"
    with failing_writes(monkeypatch, "disk full", "report.json", limit=10):
        code, _, err = run_cli(capsys, "report", trained / "checkpoint.pt", "--out", out)
    _one_line_error(code, err, f"cannot write {out / 'report.json'}: disk full")
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# --- interrupts and their messages ---------------------------------------------------------------------------

def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod.Run, "train_epoch", interrupted)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 130 and err == "trp: interrupted (no checkpoint was written)\n", err


def test_ctrl_c_just_after_the_checkpoint_is_in_place_names_it(tmp_path, capsys, monkeypatch):
    real = ckpt.save_checkpoint

    def save_then_interrupt(state, path):  # e.g. during the directory's fsync, after the rename
        real(state, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_interrupt)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "2", "--no-report", "--out", out)
    assert code == 130 and err == (f"trp: interrupted (the last good checkpoint ({out / train_mod.CHECKPOINT}, "
                                   "epoch 1) is untouched; continue with --resume)\n"), err
    assert ckpt.load_checkpoint(out / train_mod.CHECKPOINT)["epoch"] == 1


def test_divergence_after_resuming_elsewhere_names_the_checkpoint_that_is_left(trained, tmp_path, capsys,
                                                                                  monkeypatch):
    def diverge(self):
        raise self._diverged("loss is nan")
    monkeypatch.setattr(train_mod.Run, "train_epoch", diverge)
    code, _, err = run_cli(capsys, "train", "--resume", trained / "checkpoint.pt", "--out", tmp_path / "new",
                           "--epochs", "2", "--no-report")
    _one_line_error(code, err, "no checkpoint was written; the checkpoint it resumed from "
                               f"({trained / 'checkpoint.pt'}, epoch 1) is untouched")
    assert "untouched" in err and str(tmp_path / "new" / "checkpoint.pt") not in err


def _popen(args, cwd):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "python"), root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "trp", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_ends_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    proc = _popen(["train", *TINY, "--epochs", "100", "--no-report", "--out", out], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / train_mod.CHECKPOINT).exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("trp: interrupted (the last good checkpoint ("), err
    assert "continue with --resume" in err and "Traceback" not in err
    ckpt.load_checkpoint(out / train_mod.CHECKPOINT)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# --- refused early, with the right words -----------------------------------------------------------------------

def test_a_directory_in_place_of_the_checkpoint_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod.Run, "fit", lambda self, *a: pytest.fail("trained before the check"))
    (tmp_path / "run" / train_mod.CHECKPOINT).mkdir(parents=True)
    code, _, err = run_cli(capsys, "train", *TINY, "--force", "--out", tmp_path / "run")
    _one_line_error(code, err, f"{tmp_path / 'run' / train_mod.CHECKPOINT} is a directory")


def test_resuming_into_another_runs_directory_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / train_mod.CHECKPOINT).write_bytes(b"another run's")
    code, _, err = run_cli(capsys, "train", "--resume", trained / "checkpoint.pt", "--out", other, "--epochs", "2")
    _one_line_error(code, err, f"{other / train_mod.CHECKPOINT} exists")
    assert (other / train_mod.CHECKPOINT).read_bytes() == b"another run's"


def test_nproc_is_bounded_by_the_machine_also_from_a_checkpoint(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(distributed, "spawn", lambda *a, **k: pytest.fail("workers started"))
    cores = distributed.usable_cpus()
    code, _, err = run_cli(capsys, "train", *TINY, "--nproc", "100000", "--out", tmp_path / "a")
    _one_line_error(code, err, f"--nproc 100000 is more workers than the {cores} CPU cores")
    saved = ckpt.load_checkpoint(trained / "checkpoint.pt")
    saved["config"]["nproc"] = 4096
    saved["rng_ranks"] = [saved["rng"]] * 512
    ckpt.save_checkpoint(saved, tmp_path / "big.pt")  # sealed: crafted, but intact
    code, _, err = run_cli(capsys, "train", "--resume", tmp_path / "big.pt", "--epochs", "2", "--no-report")
    _one_line_error(code, err, f"--nproc 4096 (from the checkpoint {tmp_path / 'big.pt'}) is more workers than",
                    f"--nproc {cores} or fewer")


@pytest.mark.parametrize("opset, exporter", [(1, "dynamo"), (99, "dynamo"), (17, "dynamo"), (21, "torchscript"),
                                             (6, "torchscript")])
def test_opset_out_of_range_is_refused_before_exporting(opset, exporter, trained, tmp_path, capsys, monkeypatch):
    from trp.deploy import export
    monkeypatch.setattr(export, "onnx_bytes", lambda *a, **k: pytest.fail("exported"))
    code, _, err = run_cli(capsys, "export", trained / "decomposed.pt", "-o", tmp_path / "m.onnx",
                           "--opset", opset, "--exporter", exporter)
    low, high = export.opset_range(exporter)
    _one_line_error(code, err, f"opset must be an int in [{low}, {high}] for the {exporter} exporter, got {opset}")
    with pytest.raises(ValueError, match="opset must be"):
        export.module_bytes(torch.nn.Linear(2, 2), torch.zeros(1, 2), exporter, opset=opset)
    assert not (tmp_path / "m.onnx").exists()


def test_a_subset_without_a_training_batch_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", "digits", "--image-size", "8", "--subset", "1",
                           "--epochs", "1", "--no-progress", "--out", tmp_path / "run")
    _one_line_error(code, err, "the training data (1 sample) give no batch of two or more samples",
                    "--subset 2 or more")
    assert not (tmp_path / "run" / train_mod.CHECKPOINT).exists()


def test_energy_with_target_speedup_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *TINY, "--energy", "0.8", "--target-speedup", "2", "--out", tmp_path)
    _one_line_error(code, err, "--target-speedup", "drop --energy")


def test_wrong_input_size_meta_models_and_non_modules_are_clear_errors(tmp_path):
    model = trp.models.build("resnet20")
    calls = {"count_macs": lambda m, s: trp.count_macs(m, s), "report": lambda m, s: trp.report(m, m, s),
             "measure_latency": lambda m, s: trp.measure_latency(m, s, warmup=0, repeats=1),
             "RankPruner": lambda m, s: trp.RankPruner(m, target_speedup=2, input_size=s),
             "decompose": lambda m, s: trp.decompose(m, "channel", target_speedup=2, input_size=s)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"input of size \(1, 1, 32, 32\) does not run through the model.*"
                                             r"3 channels"):
            call(model, (1, 32, 32))
    with torch.device("meta"):
        meta = trp.models.build("resnet20")
    for name, call in {**calls, "decompose": lambda m, s: trp.decompose(m, "channel", energy=0.9),
                       "RankPruner": lambda m, s: trp.RankPruner(m),
                       "save": lambda m, s: trp.save(m, tmp_path / "meta.pt")}.items():
        with pytest.raises(ValueError, match="on the meta device"):
            call(meta, (3, 32, 32))
    with pytest.raises(TypeError, match="nn.Module, got str"):
        trp.save("x", tmp_path / "x.pt")
    assert os.listdir(tmp_path) == []


def test_decompose_of_a_nan_model_names_the_layer():
    model = trp.models.build("resnet20")
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="layer 'layer2.0.conv1' has NaN or infinite weights"):
        trp.decompose(model, "channel", energy=0.9)


def test_imagefolder_class_mismatch_names_the_classes(tmp_path):
    from PIL import Image

    from trp.app import data
    for split, cls in (("train", "cat"), ("val", "dog")):
        (tmp_path / split / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "a.png")
    with pytest.raises(data.DataError, match=r"cat only in train/; dog only in val/"):
        data.load(f"imagefolder:{tmp_path}", 8)
