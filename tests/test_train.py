"""Training loop: exact resume, atomic checkpoints, divergence handling, configuration rules."""
import os

import pytest
import torch

from trp.app import checkpoint as ckpt
from trp.app import config, runlock, train


def tiny(out, **kw):
    values = dict(data="digits", image_size=8, subset=48, batch_size=16, epochs=2, schedule=[1],
                  out=str(out), seed=3)
    values.update(kw)
    return config.resolve_config(values)


def quiet(*_):
    pass


def fit(cfg, on_epoch_end=None, **kw):
    return train.Run(cfg, log=quiet, progress=False, **kw).fit(on_epoch_end)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(tmp_path):
    full = fit(tiny(tmp_path / "full"))

    def stop_after_first(run):
        if run.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(tiny(tmp_path / "cut"), on_epoch_end=stop_after_first)
    saved = ckpt.load_checkpoint(tmp_path / "cut" / train.CHECKPOINT)
    assert saved["epoch"] == 1
    resumed = fit(tiny(tmp_path / "cut"), resume=str(tmp_path / "cut" / train.CHECKPOINT))
    assert resumed.epoch == 2
    assert_same_state(full.model.state_dict(), resumed.model.state_dict())
    assert full.pruner.state_dict()["steps"] == resumed.pruner.state_dict()["steps"] > 0
    assert full.pruner.ranks == resumed.pruner.ranks
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    # the momentum buffers too: a further epoch would also match
    for sa, sb in zip(full.optimizer.state_dict()["state"].values(),
                      resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_checkpoint_never_half_written(tmp_path, monkeypatch):
    run = fit(tiny(tmp_path, epochs=1))
    path = tmp_path / train.CHECKPOINT
    before = path.read_bytes()

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial checkpoint bytes")  # a torn write, then the crash
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    run.cfg.epochs = 2
    with pytest.raises(OSError, match="simulated"):
        run.fit()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    # no temporary file left behind (the run lock's file stays: only its flock matters)
    assert sorted(os.listdir(tmp_path)) == sorted([runlock.LOCK_NAME, train.CHECKPOINT])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def blow_up(run):  # epoch 2 then runs at an absurd learning rate
        for g in run.optimizer.param_groups:
            g["lr"] = 1e30

    path = tmp_path / train.CHECKPOINT
    with pytest.raises(train.TrainError, match="diverged.*epoch 1\\) is untouched"):
        fit(tiny(tmp_path, epochs=3), on_epoch_end=blow_up)
    saved = ckpt.load_checkpoint(path)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_nan_in_first_epoch_writes_no_checkpoint(tmp_path):
    with pytest.raises(train.TrainError, match="no checkpoint was written"):
        fit(tiny(tmp_path, lr=1e30, nuclear=0.0))
    assert not (tmp_path / train.CHECKPOINT).exists()


def test_baseline_without_trp(tmp_path):
    run = fit(tiny(tmp_path, epochs=1, trp=False, nuclear=0.0))
    assert run.pruner is None
    assert ckpt.load_checkpoint(tmp_path / train.CHECKPOINT)["pruner"] is None


def test_preset_and_explicit_options():
    cfg = config.resolve_config({"epochs": 3}, preset="cifar10-paper")
    assert (cfg.lr, cfg.schedule, cfg.weight_decay, cfg.batch_size, cfg.nuclear, cfg.epochs) == \
        (0.1, [81, 122], 1e-4, 128, 3e-4, 3)
    assert config.resolve_config({"epochs": 20}).schedule == [10, 15]
    with pytest.raises(ValueError, match="unknown preset 'imagenet'; valid: cifar10-paper"):
        config.resolve_config({}, preset="imagenet")


@pytest.mark.parametrize("bad, match", [
    ({"scheme": "diagonal"}, "unknown scheme.*channel.*spatial"),
    ({"energy": 1.5}, "energy"), ({"period": 0}, "period"), ({"nuclear": -1.0}, "nuclear"),
    ({"data": "mnist"}, "unknown data set 'mnist'; valid: digits"),
    ({"schedule": [5, 2]}, "schedule"), ({"lr": 0.0}, "lr"),
    ({"threshold": float("inf")}, "threshold"), ({"weight_decay": float("inf")}, "weight-decay"),
    ({"weight_decay": -1.0}, "weight-decay"), ({"momentum": float("nan")}, "momentum"),
    ({"lr_decay": float("nan")}, "lr-decay"), ({"lr": float("inf")}, "lr"), ({"seed": 2 ** 70}, "seed"),
    ({"seed": 1.5}, "seed"), ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch-size"),
    ({"subset": 0}, "subset"), ({"workers": -1}, "workers"), ({"image_size": 3}, "image size"),
    ({"device": "tpu"}, "device"), ({"trp": "yes"}, "trp"), ({"model": None}, "model"),
])
def test_bad_config_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        config.resolve_config(bad)


def test_resume_rejects_other_run_options(tmp_path):
    fit(tiny(tmp_path, epochs=1))
    path = str(tmp_path / train.CHECKPOINT)
    with pytest.raises(ValueError, match="model='resnet20'"):
        train.Run(tiny(tmp_path, model="resnet32"), resume=path, log=quiet)
    with pytest.raises(ValueError, match="would go back"):
        saved = ckpt.load_checkpoint(path)
        saved["epoch"] = 5
        train.Run(tiny(tmp_path), resume=saved, log=quiet)
