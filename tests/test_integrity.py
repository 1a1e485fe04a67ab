"""Integrity of saved files: a flipped byte inside a training checkpoint or a trp.save model file is caught on
every load - the library calls, every `trp` command and `--init` - with an error naming the file, before
anything is trained or written."""
import pytest
import torch

import trp
from cli_helpers import TINY, run_cli
from trp.app import checkpoint as ckpt
from trp.app.cli import main


def flip_tensor_byte(path, tensor):
    """Flips a high bit of the first element of `tensor` where the file stores it (torch's zip reader
    does not check CRCs, so torch.load alone returns the changed value)."""
    data = bytearray(path.read_bytes())
    needle = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "tensor bytes not found once in the file"
    data[at + 3] ^= 0x40  # float32, little endian: byte 3 holds the sign and the high exponent bits
    path.write_bytes(bytes(data))



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--epochs", "1", "--no-report", "--out", str(out)]) == 0
    return out


@pytest.fixture
def flipped(run_dir, tmp_path):
    """A copy of the run's checkpoint with one weight changed by a single flipped bit."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    weight = ckpt.load_checkpoint(path)["model"]["layer1.0.conv1.weight"]
    flip_tensor_byte(path, weight)
    raw = torch.load(path, map_location="cpu", weights_only=True)["model"]["layer1.0.conv1.weight"]
    assert not torch.equal(raw, weight)  # the damage is real and invisible to torch.load
    return path


def test_flipped_checkpoint_is_caught_on_load(flipped):
    with pytest.raises(ckpt.CheckpointError, match=f"{flipped}: corrupted"):
        ckpt.load_checkpoint(flipped)


@pytest.mark.parametrize("command", ["resume", "init", "eval", "decompose", "report"])
def test_every_command_rejects_a_flipped_checkpoint(command, flipped, tmp_path, capsys):
    args = {"resume": ["train", "--resume", flipped, "--epochs", "2", "--no-progress", "--no-report"],
            "init": ["train", *TINY, "--init", flipped, "--out", tmp_path / "new", "--no-report"],
            "eval": ["eval", flipped],
            "decompose": ["decompose", flipped, "-o", tmp_path / "compact.pt"],
            "report": ["report", flipped, "--out", tmp_path / "rep"]}[command]
    before = flipped.read_bytes()
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flipped}: corrupted" in err, err
    assert flipped.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # nothing written


def test_init_rejects_a_flipped_model_file(tmp_path, capsys):
    model = trp.models.build("resnet20")
    path = tmp_path / "dense.pt"
    trp.save(model, path)
    flip_tensor_byte(path, model.state_dict()["layer1.0.conv1.weight"])
    with pytest.raises(ValueError, match="corrupted"):
        trp.load(path)
    code, _, err = run_cli(capsys, "train", *TINY, "--init", path, "--out", tmp_path / "run", "--no-report")
    assert code == 2 and f"{path}: corrupted" in err, err
    assert not (tmp_path / "run").exists()


def test_init_from_intact_trp_files(run_dir, tmp_path, capsys):
    """--init takes a trp.save model file and a training checkpoint (both verified), not only state_dicts."""
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pt")["model"]
    model = trp.models.build("resnet20")
    model.load_state_dict(state)
    trp.save(model, tmp_path / "dense.pt")
    for i, source in enumerate((tmp_path / "dense.pt", run_dir / "checkpoint.pt")):
        out = tmp_path / f"run{i}"
        code, _, err = run_cli(capsys, "train", *TINY, "--no-trp", "--epochs", "1", "--lr", "1e-12",
                               "--weight-decay", "0", "--init", source, "--out", out, "--no-report")
        assert code == 0, err
        tuned = ckpt.load_checkpoint(out / "checkpoint.pt")["model"]
        torch.testing.assert_close(tuned["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"], atol=1e-6,
                                   rtol=0)


def test_old_or_unsealed_checkpoint_is_refused(run_dir, tmp_path):
    saved = ckpt.load_checkpoint(run_dir / "checkpoint.pt")
    del saved["sha256"]
    torch.save(saved, tmp_path / "unsealed.pt")
    with pytest.raises(ckpt.CheckpointError, match="no checksum"):
        ckpt.load_checkpoint(tmp_path / "unsealed.pt")
    torch.save(dict(saved, version=1), tmp_path / "v1.pt")
    with pytest.raises(ckpt.CheckpointError, match="version 1"):
        ckpt.load_checkpoint(tmp_path / "v1.pt")


def test_checkpoint_checksum_covers_every_part(run_dir, tmp_path):
    """Changing any part - a config value, the optimizer state, an RNG state - breaks the seal."""
    saved = ckpt.load_checkpoint(run_dir / "checkpoint.pt")
    edits = {"config": lambda s: s["config"].update(lr=1.0),
             "optimizer": lambda s: s["optimizer"]["param_groups"][0].update(momentum=0.5),
             "rng": lambda s: s["rng"]["torch"].add_(1),
             "history": lambda s: s["history"][0].update(loss=0.0),
             "metadata": lambda s: s["model"]._metadata[""].update(version=7)}
    for name, edit in edits.items():
        copy = ckpt.load_checkpoint(run_dir / "checkpoint.pt")
        edit(copy)
        torch.save(copy, tmp_path / f"{name}.pt")
        with pytest.raises(ckpt.CheckpointError, match="corrupted"):
            ckpt.load_checkpoint(tmp_path / f"{name}.pt")
    ckpt.save_checkpoint(saved, tmp_path / "resealed.pt")
    assert ckpt.load_checkpoint(tmp_path / "resealed.pt")["epoch"] == saved["epoch"]
