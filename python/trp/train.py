"""The training loop behind `trp train`: SGD + multi-step LR, TRP (RankPruner) on every iteration, a
checkpoint after every epoch (atomic), exact resume, and the end-of-training report.

Exact resume: the checkpoint holds model, optimizer, scheduler and pruner states plus every RNG the loop
draws from (torch - augmentation -, numpy, python, the train loader's shuffling generator); it is written
after the epoch's evaluation, so a resumed run replays the remaining epochs bit for bit on the CPU."""
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import data as data_mod
from . import models

CHECKPOINT = "checkpoint.pt"

# Tuned for the embedded digits at 16x16 (make demo): a few minutes on a 2-core CPU; lr 0.05 rather than
# the paper's 0.1, which trains unsteadily on 1,347 images with a projection every step. See README.
DEFAULTS = dict(model="resnet20", data="digits", image_size=None, subset=None, scheme="channel",
                energy=0.9, period=1, nuclear=3e-4, trp=True, epochs=30, lr=0.05, schedule=None,
                lr_decay=0.1, weight_decay=1e-4, momentum=0.9, batch_size=64, seed=0, device="cpu",
                workers=0, threshold=None, init=None, out="runs/trp")

PRESETS = {
    # PAPER.md, CIFAR-10 recipe (scheme left to the user: the paper reports channel and spatial)
    "cifar10-paper": dict(lr=0.1, epochs=164, schedule=[81, 122], lr_decay=0.1, weight_decay=1e-4,
                          momentum=0.9, batch_size=128, energy=0.9, period=1, nuclear=3e-4),
    # PAPER.md, ImageNet: TRP fine-tuning of a pretrained model (give it with --init), lr 1e-4 for 10 epochs,
    # the same SGD settings; batch 256 (the paper does not state it) and no lr decay in 10 epochs.
    "imagenet-paper": dict(lr=1e-4, epochs=10, schedule=[], lr_decay=0.1, weight_decay=1e-4, momentum=0.9,
                           batch_size=256, energy=0.9, period=1, nuclear=3e-4),
}

# Options a resumed run must share with its checkpoint (anything else would not continue the same run).
RESUME_FIXED = ("model", "data", "image_size", "subset", "scheme", "energy", "period", "nuclear", "trp",
                "lr", "schedule", "lr_decay", "weight_decay", "momentum", "batch_size", "seed", "workers")


class TrainError(RuntimeError):
    """Training cannot go on (diverged loss, bad resume); the message says what happened and why."""


@dataclass
class TrainConfig:
    model: str = DEFAULTS["model"]
    data: str = DEFAULTS["data"]
    image_size: int = None
    subset: int = None
    scheme: str = DEFAULTS["scheme"]
    energy: float = DEFAULTS["energy"]
    period: int = DEFAULTS["period"]
    nuclear: float = DEFAULTS["nuclear"]
    trp: bool = True
    epochs: int = DEFAULTS["epochs"]
    lr: float = DEFAULTS["lr"]
    schedule: list = field(default=None)
    lr_decay: float = DEFAULTS["lr_decay"]
    weight_decay: float = DEFAULTS["weight_decay"]
    momentum: float = DEFAULTS["momentum"]
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = DEFAULTS["seed"]
    device: str = DEFAULTS["device"]
    workers: int = DEFAULTS["workers"]
    threshold: float = None
    init: str = None  # initial weights (a state_dict file, e.g. a torchvision checkpoint): TRP fine-tuning
    out: str = DEFAULTS["out"]

    def __post_init__(self):
        if self.schedule is None:  # lr / decay at 50% and 75% of the run, as the paper's 81/122 of 164
            self.schedule = sorted({max(1, self.epochs // 2), max(1, (3 * self.epochs) // 4)})
        self.schedule = [int(m) for m in self.schedule]
        self.validate()

    def validate(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        need(isinstance(self.epochs, int) and self.epochs >= 1, f"epochs must be an int >= 1, got {self.epochs}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 < self.lr_decay <= 1, f"lr decay must be in (0, 1], got {self.lr_decay}")
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(all(m >= 1 for m in self.schedule) and self.schedule == sorted(set(self.schedule)),
             f"schedule must be increasing epoch numbers >= 1, got {self.schedule}")
        need(isinstance(self.workers, int) and self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(self.threshold is None or self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}")
        if self.trp:  # RankPruner's own checks, before any work
            from .pruner import _check_config
            _check_config(self.scheme, self.energy, self.period, self.nuclear, "projection")
        else:
            from .rank import check_energy
            from .schemes import check_scheme
            check_scheme(self.scheme)
            check_energy(self.energy)
        data_mod.parse_spec(self.data)
        models.check_name(self.model)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def resolve_config(explicit, preset=None):
    """DEFAULTS < preset < explicitly given options -> TrainConfig. Unknown presets list the valid ones."""
    values = {k: v for k, v in DEFAULTS.items()}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
        values.update(PRESETS[preset])
    values.update(explicit)
    return TrainConfig(**values)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N, auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; valid: cpu, cuda, cuda:N, auto")
    return device


def check_resume(saved, explicit):
    """Rejects explicitly given options that contradict the checkpoint's run."""
    for key in RESUME_FIXED:
        if key in explicit and explicit[key] != saved.get(key):
            raise ValueError(f"--resume: the checkpoint was trained with {key}={saved.get(key)!r}, "
                             f"not {explicit[key]!r}; drop the option or start a new run (--out)")


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


def _all_finite(model):
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _mean_rank(pruner):
    if pruner is None:
        return None
    ranks = [r for r in pruner.ranks.values() if r is not None]
    return sum(ranks) / len(ranks) if ranks else None


class Run:
    """One training run: data, model, optimizer, scheduler, pruner and their checkpointing."""

    def __init__(self, cfg, resume=None, log=print, progress=True):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = resolve_device(cfg.device)
        self.out = os.path.abspath(cfg.out)
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        saved = None
        if resume is not None:
            saved = resume if isinstance(resume, dict) else ckpt.load_checkpoint(resume)
            check_resume(saved["config"], {k: getattr(cfg, k) for k in RESUME_FIXED})
            if cfg.epochs < saved["epoch"]:
                raise ValueError(f"--resume: the checkpoint already has {saved['epoch']} epochs; "
                                 f"--epochs {cfg.epochs} would go back")
        _seed_everything(cfg.seed)
        self.bundle = data_mod.load(cfg.data, cfg.image_size, cfg.subset, seed=cfg.seed)
        self.model = models.build(cfg.model, num_classes=self.bundle.num_classes,
                                  in_channels=self.bundle.in_channels).to(self.device)
        if cfg.init is not None and saved is None:
            load_initial_weights(self.model, cfg.init)
        self.pruner = None
        if cfg.trp:
            from .pruner import RankPruner
            self.pruner = RankPruner(self.model, cfg.scheme, cfg.energy, cfg.period, cfg.nuclear)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, cfg.schedule, cfg.lr_decay)
        self.train_loader, self.test_loader = data_mod.make_loaders(self.bundle, cfg.batch_size, cfg.seed,
                                                                    cfg.workers)
        self.epoch, self.history = 0, []
        if saved is not None:
            self._restore(saved)

    def _restore(self, saved):
        if saved["arch"] != self.model.trp_arch:
            raise ValueError(f"--resume: checkpoint of architecture {saved['arch']}, this run builds "
                             f"{self.model.trp_arch}")
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            if self.pruner is not None:
                self.pruner.load_state_dict(saved["pruner"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"--resume: checkpoint does not fit this run: "
                                       f"{str(exc).splitlines()[0]}") from None
        ckpt.set_rng_state(saved["rng"], self.train_loader.generator)
        self.epoch, self.history = int(saved["epoch"]), list(saved.get("history", []))

    def state(self):
        return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": self.cfg.to_dict(),
                "arch": dict(self.model.trp_arch), "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "pruner": self.pruner.state_dict() if self.pruner is not None else None,
                "rng": ckpt.rng_state(self.train_loader.generator), "history": self.history}

    def train_epoch(self):
        from tqdm import tqdm

        cfg, model = self.cfg, self.model
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        criterion = nn.CrossEntropyLoss()
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device), y.to(self.device)
            if self.pruner is not None:
                try:
                    self.pruner.step()
                except ValueError as exc:  # non-finite weights at the projection
                    raise self._diverged(f"{exc}") from None
            out = model(x)
            loss = criterion(out, y)
            if not torch.isfinite(loss):
                raise self._diverged(f"loss is {float(loss.detach())} at epoch {self.epoch + 1}, step {step + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.pruner is not None:
                self.pruner.regularize()
            self.optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            rank = _mean_rank(self.pruner)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            **({"rank": f"{rank:.1f}"} if rank is not None else {}), refresh=False)
        bar.close()
        return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    def _diverged(self, what):
        where = (f"the last good checkpoint ({self.ckpt_path}, epoch {self.epoch}) is untouched"
                 if self.epoch > 0 else "no checkpoint was written")
        return TrainError(f"training diverged: {what}; {where}; try a lower --lr")

    def fit(self, on_epoch_end=None):
        cfg = self.cfg
        os.makedirs(self.out, exist_ok=True)
        if self.epoch == 0:
            self.log(f"training {cfg.model} on {self.bundle.name} ({len(self.bundle.train)} train / "
                     f"{len(self.bundle.test)} test, input {self.bundle.input_size[1:]}) for {cfg.epochs} "
                     f"epochs; " + (f"TRP {cfg.scheme}, energy {cfg.energy}, period {cfg.period}, nuclear "
                                    f"{cfg.nuclear} on {len(self.pruner.layers)} layers"
                                    if self.pruner else "plain baseline (no TRP)"))
        else:
            self.log(f"resuming {self.ckpt_path} after epoch {self.epoch} of {cfg.epochs}")
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss, train_acc = self.train_epoch()
            self.scheduler.step()
            if not _all_finite(self.model):
                raise self._diverged(f"non-finite weights after epoch {self.epoch + 1}")
            test_acc = evaluate(self.model, self.test_loader, self.device)
            self.epoch += 1
            rank = _mean_rank(self.pruner)
            self.history.append({"epoch": self.epoch, "loss": loss, "train_acc": train_acc,
                                 "test_acc": test_acc, "mean_rank": rank, "lr": lr})
            ckpt.atomic_save(self.state(), self.ckpt_path)
            self.log(f"epoch {self.epoch:3d}/{cfg.epochs}  loss {loss:.4f}  train {train_acc:6.2f}%  "
                     f"test {test_acc:6.2f}%" + (f"  mean rank {rank:5.1f}" if rank is not None else "")
                     + f"  lr {lr:g}  {time.perf_counter() - t0:.1f}s")
            if on_epoch_end is not None:
                on_epoch_end(self)
        return self


def load_initial_weights(model, path):
    """Loads a state_dict file (or a training checkpoint's model) into `model`; every key must match."""
    state = ckpt.load_file(path)
    if ckpt.is_checkpoint(state):
        state = state["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ckpt.CheckpointError(f"--init {path}: not a state_dict (a dict of tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"--init {path}: weights do not fit {model.trp_arch['name']}: "
                                   f"{str(exc).splitlines()[0]}") from None


def _seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def final_report(model, bundle, test_loader, device, scheme, energy=None, threshold=None, out=None,
                 log=print, latency_repeats=30):
    """Dense vs decomposed (no fine-tuning): accuracies, trp.report table, speed-up, params, CPU latency;
    writes report.json, decomposed.pt (trp.save) and ranks.png into `out` when given. Returns the dict."""
    from . import io, plots
    from .decompose import decompose
    from .report import report as trp_report

    criterion = {"threshold": threshold} if threshold is not None else {"energy": energy}
    dense_acc = evaluate(model, test_loader, device)
    compact = decompose(model, scheme, **criterion)
    compact_acc = evaluate(compact, test_loader, device)
    dense_cpu, compact_cpu = _cpu_copy(model), _cpu_copy(compact)
    rep = trp_report(dense_cpu, compact_cpu, bundle.input_size, latency=True, warmup=5,
                     repeats=latency_repeats, device="cpu")
    t = rep.totals
    result = {"data": bundle.name, "input_size": list(bundle.input_size), "scheme": scheme, **criterion,
              "dense_acc": dense_acc, "decomposed_acc": compact_acc, "speedup": t["speedup"],
              "params_dense": t["params_dense"], "params_decomposed": t["params_compact"],
              "latency_dense_ms": t["latency_dense_s"] * 1e3, "latency_decomposed_ms": t["latency_compact_s"] * 1e3,
              "report": rep.to_dict()}
    log(str(rep))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        io.save(compact_cpu, os.path.join(out, "decomposed.pt"))
        result["plot"] = plots.rank_spectrum(dense_cpu, compact_cpu, scheme, os.path.join(out, "ranks.png"),
                                             energy=energy, threshold=threshold)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
    crit = f"threshold {threshold}" if threshold is not None else f"energy {energy}"
    log(f"dense accuracy:      {dense_acc:.2f}%")
    log(f"decomposed accuracy: {compact_acc:.2f}%  (no fine-tuning; {scheme} scheme, {crit})")
    log(f"speed-up (conv MACs, as the paper counts): {t['speedup']:.2f}x  "
        f"({t['macs_dense'] / 1e6:.2f}M -> {t['macs_compact'] / 1e6:.2f}M)")
    log(f"params: {t['params_dense'] / 1e6:.3f}M -> {t['params_compact'] / 1e6:.3f}M;  CPU latency (batch 1, "
        f"median): {t['latency_dense_s'] * 1e3:.2f} ms -> {t['latency_compact_s'] * 1e3:.2f} ms")
    if out is not None:
        log(f"wrote {os.path.join(out, 'report.json')}, {os.path.join(out, 'ranks.png')}, "
            f"{os.path.join(out, 'decomposed.pt')}")
    return result


def _cpu_copy(model):
    import copy
    m = copy.deepcopy(model).cpu().eval()
    arch = getattr(model, "trp_arch", None)
    if arch is not None:
        m.trp_arch = dict(arch)
    return m


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    return str(obj)


def model_from_checkpoint(saved, device="cpu"):
    """The dense model of a training checkpoint, on `device`."""
    try:
        model = models.build_from_arch(saved["arch"])
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint's weights do not fit its architecture {saved.get('arch')}: "
                                   f"{str(exc).splitlines()[0]}") from None
    return model.to(device)


__all__ = ["DEFAULTS", "PRESETS", "TrainConfig", "TrainError", "Run", "resolve_config", "resolve_device",
           "evaluate", "final_report", "model_from_checkpoint", "CHECKPOINT"]
