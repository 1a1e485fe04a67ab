"""The `trp` command end to end on a tiny digits subset, and its handling of bad input."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch

import trp
from cli_helpers import TINY, run_cli
from trp.app import checkpoint as ckpt
from trp.app.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny TRP run shared by the end-to-end tests (train is the slow part)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_report_plot_and_model(trained):
    assert {"checkpoint.pt", "report.json", "ranks.png", "decomposed.pt"} <= set(os.listdir(trained))
    rep = json.loads((trained / "report.json").read_text())
    for key in ("dense_acc", "decomposed_acc", "speedup", "params_dense", "params_decomposed",
                "latency_dense_ms", "latency_decomposed_ms"):
        assert isinstance(rep[key], (int, float)), key
    assert rep["speedup"] > 1 and rep["params_decomposed"] < rep["params_dense"]
    assert len(rep["report"]["layers"]) == 21  # 19 convs + 2 shortcut convs of ResNet-20
    assert (trained / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compact = trp.load(trained / "decomposed.pt")
    assert len(trp.factorized_layers(compact)) > 0


def test_decompose_eval_report(trained, tmp_path, capsys):
    model_file = tmp_path / "compact.pt"
    code, out, err = run_cli(capsys, "decompose", trained / "checkpoint.pt", "--out", model_file,
                             "--energy", "0.8")
    assert code == 0, err
    assert "speed-up" in out and model_file.exists()
    compact = trp.load(model_file)
    assert len(trp.factorized_layers(compact)) > 0

    # eval of the dense checkpoint (its own data config) and of the decomposed file (data given)
    code, out, err = run_cli(capsys, "eval", trained / "checkpoint.pt")
    assert code == 0, err
    assert "dense checkpoint" in out and "48 test images" in out
    code, out, err = run_cli(capsys, "eval", model_file, "--image-size", "8", "--subset", "48")
    assert code == 0, err
    assert "model file" in out and "accuracy" in out

    report_dir = tmp_path / "rep"
    code, out, err = run_cli(capsys, "report", trained / "checkpoint.pt", "--out", report_dir,
                             "--threshold", "0.05")
    assert code == 0, err
    assert "decomposed accuracy" in out and "speed-up" in out and "| layer |" in out
    rep = json.loads((report_dir / "report.json").read_text())
    assert rep["threshold"] == 0.05 and (report_dir / "ranks.png").exists()


def test_resume_continues_exactly(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(full), "--no-report"]) == 0
    assert main(["train", *TINY, "--epochs", "1", "--out", str(cut), "--no-report"]) == 0
    assert not (cut / "report.json").exists()
    code, out, err = run_cli(capsys, "train", "--resume", "--out", cut, "--epochs", "2", "--no-progress",
                             "--no-report")
    assert code == 0, err
    assert "resuming" in out
    a = ckpt.load_checkpoint(full / "checkpoint.pt")
    b = ckpt.load_checkpoint(cut / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["pruner"]["steps"] == b["pruner"]["steps"]


def test_help_via_subprocess():
    r = subprocess.run([sys.executable, "-m", "trp", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for cmd in ("train", "decompose", "eval", "report"):
        assert cmd in r.stdout


def _bad_cases(tmp):
    other = tmp / "other"
    return {
        "unknown model": (["train", *TINY, "--model", "resnet21"], "unknown model 'resnet21'; valid: resnet110"),
        "unknown data": (["train", *TINY, "--data", "mnist"], "unknown data set 'mnist'; valid: digits"),
        "unknown scheme": (["train", *TINY, "--scheme", "vh"], "unknown scheme 'vh'.*'channel', 'spatial'"),
        "unknown preset": (["train", *TINY, "--preset", "imagenet"], "unknown preset.*cifar10-paper"),
        "no-trp with nuclear": (["train", *TINY, "--no-trp", "--nuclear", "1e-4"], "--no-trp.*--nuclear"),
        "no-trp with period": (["train", *TINY, "--no-trp", "--period", "2"], "--no-trp.*--period"),
        "missing cifar dir": (["train", "--data", f"cifar10:{tmp / 'nocifar'}"], "does not exist"),
        "energy and threshold": (["decompose", "x.pt", "-o", "y.pt", "--energy", "0.9", "--threshold", "0.1"],
                                 "not allowed with"),
        "bad energy": (["train", *TINY, "--energy", "2"], "energy must be"),
        "unknown command": (["fly"], "invalid choice"),
        "bad epochs": (["train", "--epochs", "zero"], "expected an integer"),
        "no cuda": (["train", *TINY, "--device", "cuda:7"], "CUDA is not available|cuda"),
        "resume nothing": (["train", "--resume", "--out", str(other)], "no such file"),
        # every option is validated before any work (finite, in range)
        "inf threshold": (["train", *TINY, "--threshold", "inf"], "--threshold must be a finite number >= 0"),
        "negative threshold": (["train", *TINY, "--threshold", "-1"], "--threshold must be"),
        "inf weight decay": (["train", *TINY, "--weight-decay", "inf"], "--weight-decay must be a finite"),
        "nan momentum": (["train", *TINY, "--momentum", "nan"], "--momentum must be"),
        "nan lr decay": (["train", *TINY, "--lr-decay", "nan"], "--lr-decay must be"),
        "inf lr": (["train", *TINY, "--lr", "inf"], "--lr must be"),
        "inf nuclear": (["train", *TINY, "--nuclear", "inf"], "nuclear must be a finite"),
        "nan energy": (["train", *TINY, "--energy", "nan"], "energy must be"),
        "zero period": (["train", *TINY, "--period", "0"], "period must be an int >= 1"),
        "negative workers": (["train", *TINY, "--workers", "-1"], "--workers must be"),
        "huge seed": (["train", *TINY, "--seed", str(2 ** 70)], r"--seed must be an int in \[0, 2\*\*63\)"),
        "negative seed": (["train", *TINY, "--seed", "-1"], "--seed must be"),
        "tiny image": (["train", *TINY, "--image-size", "2"], r"image size must be an int in \[4, 64\] for digits"),
        "huge image": (["train", "--data", f"imagefolder:{tmp}", "--image-size", "100000"],
                       r"image size must be an int in \[4, 1024\], got 100000"),
        "cifar image size": (["train", "--data", f"cifar10:{tmp}", "--image-size", "16"], "32x32"),
        "missing init": (["train", *TINY, "--init", str(tmp / "nothing.pt")], "nothing.pt: no such file"),
        "out is a file": (["train", *TINY, "--out", str(tmp / "afile")], "afile is a file, not a directory"),
        "init with resume": (["train", "--resume", str(tmp / "x.pt"), "--init", "w.pt"],
                             "--init.*--resume|--resume.*--init"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases(__import__("pathlib").Path("/nonexistent"))))
def test_bad_input_one_line_exit_2_before_any_work(case, tmp_path, capsys):
    args, match = _bad_cases(tmp_path)[case]
    out_dir = tmp_path / "out"
    (tmp_path / "afile").write_text("not a directory")
    if args[0] == "train" and "--out" not in args:
        args = args + ["--out", out_dir]
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("trp: error:"), err
    import re
    assert re.search(match, err), err
    assert not out_dir.exists()  # rejected before any work
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_corrupted_and_foreign_files(trained, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((trained / "checkpoint.pt").read_bytes()[:5000])  # truncated
    for cmd in (["eval", bad], ["report", bad], ["decompose", bad, "-o", tmp_path / "o.pt"],
                ["train", "--resume", bad]):
        code, _, err = run_cli(capsys, *cmd)
        assert code == 2 and "corrupted" in err and err.count("\n") == 1, (cmd, err)
    # a decomposed model file is not a training checkpoint
    code, _, err = run_cli(capsys, "report", trained / "decomposed.pt")
    assert code == 2 and "not a `trp train` checkpoint" in err
    # a checkpoint whose weights belong to another architecture
    saved = ckpt.load_checkpoint(trained / "checkpoint.pt")
    saved["arch"] = dict(saved["arch"], name="resnet32")
    saved["config"]["model"] = "resnet32"
    foreign = tmp_path / "foreign.pt"
    ckpt.save_checkpoint(saved, foreign)  # sealed: intact, but of another architecture
    code, _, err = run_cli(capsys, "eval", foreign)
    assert code == 2 and "do not fit its architecture" in err
    # resume with another model than the checkpoint's, and an existing run without --resume/--force
    code, _, err = run_cli(capsys, "train", "--resume", trained / "checkpoint.pt", "--model", "resnet32")
    assert code == 2 and "model='resnet20'" in err
    code, _, err = run_cli(capsys, "train", *TINY, "--out", trained)
    assert code == 2 and "--resume" in err and "--force" in err


def test_init_loads_weights_and_rejects_foreign_ones(trained, tmp_path, capsys):
    start = ckpt.load_checkpoint(trained / "checkpoint.pt")["model"]
    weights = tmp_path / "pretrained.pt"
    torch.save(start, weights)  # a plain state_dict file, as torchvision checkpoints are
    out = tmp_path / "finetune"
    code, _, err = run_cli(capsys, "train", *TINY, "--no-trp", "--epochs", "1", "--lr", "1e-12",
                           "--weight-decay", "0", "--init", weights, "--no-report", "--out", out)
    assert code == 0, err
    tuned = ckpt.load_checkpoint(out / "checkpoint.pt")["model"]
    assert torch.allclose(tuned["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"], atol=1e-6)
    foreign = tmp_path / "resnet32.pt"
    torch.save(trp.models.build("resnet32").state_dict(), foreign)
    code, _, err = run_cli(capsys, "train", *TINY, "--init", foreign, "--out", tmp_path / "bad")
    assert code == 2 and "do not fit resnet20" in err and err.count("\n") == 1, err
    assert "unexpected keys layer1.3.conv1.weight" in err, err  # names what does not fit
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
    partial = {k: v for k, v in start.items() if not k.startswith("fc.")}
    partial["layer1.0.conv1.weight"] = partial["layer1.0.conv1.weight"][:, :4]
    torch.save(partial, weights)
    code, _, err = run_cli(capsys, "train", *TINY, "--init", weights, "--out", tmp_path / "bad")
    assert code == 2 and "missing keys fc.weight, fc.bias" in err, err
    assert "layer1.0.conv1.weight: shape (16, 4, 3, 3) in the file, (16, 16, 3, 3) in the model" in err, err


def test_file_messages(trained, tmp_path, capsys):
    """A directory is not a missing file; a file that safe loading refuses is named as such, never with
    advice to load it unsafely; a directory given as an output file fails before any work."""
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2 and f"{tmp_path} is a directory, not a file" in err, err
    code, _, err = run_cli(capsys, "decompose", trained / "checkpoint.pt", "-o", tmp_path)
    assert code == 2 and f"{tmp_path} is a directory" in err, err

    torch.save({"model": datetime.date(2024, 1, 1)}, tmp_path / "pickle.pt")
    for cmd in (["eval"], ["report"], ["train", "--resume"]):
        code, _, err = run_cli(capsys, *cmd, tmp_path / "pickle.pt")
        assert code == 2 and err.count("\n") == 1, err
        assert "not a trp/torch checkpoint or holds disallowed objects" in err, err
        assert "weights_only" not in err and "can still be loaded" not in err, err


def test_written_files_have_the_umask_mode(trained):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "report.json", "ranks.png", "decomposed.pt"):
        assert os.stat(trained / name).st_mode & 0o777 == 0o666 & ~umask, name


def test_train_options_have_one_declaration():
    """DEFAULTS, the resume rules, the parser and the CLI page (docs/guides/cli.md) all follow the TrainConfig
    fields."""
    import dataclasses
    import pathlib

    from trp.app import cli, config
    fields = [f.name for f in dataclasses.fields(config.TrainConfig)]
    assert list(config.DEFAULTS) == fields
    assert set(config.RESUME_FIXED) | set(config.RESUME_CHANGEABLE) == set(fields)
    assert set(config.RESUME_CHANGEABLE) == {"epochs", "device", "threshold", "out", "nproc", "amp", "channels_last",
                                             "compile"}
    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train_parser._actions for s in a.option_strings}
    page = (pathlib.Path(__file__).parents[1] / "docs" / "guides" / "cli.md").read_text()
    for f in dataclasses.fields(config.TrainConfig):
        flag = f.metadata["flag"]
        assert flag in flags, flag
        assert f"`{flag}" in page, f"docs/guides/cli.md does not list {flag}"
