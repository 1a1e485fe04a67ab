# Over 300 lines: the Run (setup, epoch loop, checkpoints) and the end-of-training report share the run's state.
"""The training loop behind `trp train`: SGD + multi-step LR, TRP (RankPruner) on every iteration, a
checkpoint after every epoch (atomic), exact resume, and the end-of-training report.

Exact resume: the checkpoint holds model, optimizer, scheduler and pruner states plus every RNG the loop
draws from (torch - augmentation -, numpy, python, the train loader's shuffling generator); it is written
after the epoch's evaluation, so a resumed run replays the remaining epochs bit for bit on the CPU."""
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from trp import models
from trp._utils import storage
from trp._utils.weights import load_weights
from trp.app import checkpoint as ckpt
from trp.app import data as data_mod
from trp.app import runlock
from trp.app.config import RESUME_FIXED, SEED_LIMIT, check_resume, resolve_device
from trp.app.setup import (
    budget_args,
    check_scheduler,
    deterministic_mode,
    file_id,
    latency_cost,
    load_initial_weights,
    read_initial_weights,
    seed_everything,
    seed_worker,
)
from trp.deploy import decompose as decompose_mod
from trp.deploy import export, io, plots, records
from trp.deploy.report import report as trp_report
from trp.prune import distributed
from trp.prune.budget import check_reachable
from trp.prune.pruner import RankPruner

CHECKPOINT = "checkpoint.pt"
REPORT_FILES = ("decomposed.pt", "report.json", "ranks.png")  # what final_report writes into its directory
RUN_FILES = (CHECKPOINT,) + REPORT_FILES  # what a run writes into --out
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(RuntimeError):
    """Training cannot go on (diverged loss, bad resume); the message says what happened and why."""


@torch.no_grad()
def evaluate(model, loader, device, all_ranks=False):
    """Top-1 accuracy in percent; all_ranks: over the samples of every rank's loader (torch.distributed)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    if all_ranks:
        correct, total = distributed.all_reduce_sum([correct, total], device)
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

    def __init__(self, cfg, resume=None, log=print, progress=True, init_state=None, resume_path=None):
        """Builds the run: data, model (with --init weights or the resumed state), optimizer, pruner.

        Args:
            cfg: the TrainConfig.
            resume: None, a checkpoint path or an already verified checkpoint dict.
            log: log(message) for the progress lines.
            progress: show a progress bar.
            init_state: cfg.init already read (read_initial_weights), so that a caller can check the file
                before anything else.
            resume_path: the file a `resume` dict was read from, for messages.

        Raises:
            ValueError: the checkpoint or the --init weights do not fit this run, or the data give no
                training batch (data.DataError), with what differs.
        """
        self.cfg, self.log, self.progress = cfg, log, progress
        if resume_path is None and isinstance(resume, (str, os.PathLike)):
            resume_path = resume
        self.resume_path = resume_path
        self.resume_what = "--resume" + (f" {resume_path}" if resume_path is not None else "")
        self.world = distributed.current()  # None: a single process
        self.rank = self.world.rank if self.world else 0
        self.device = resolve_device(cfg.device)
        if self.world:
            self.device = distributed.worker_device(self.device, self.world.local_rank, self.world.world_size)
        self.out = os.path.abspath(cfg.out)
        self.ckpt_path = os.path.join(self.out, CHECKPOINT)
        saved = None
        if resume is not None:
            saved = resume if isinstance(resume, dict) else ckpt.load_checkpoint(resume)
            check_resume(saved["config"], {k: getattr(cfg, k) for k in RESUME_FIXED}, self.resume_what)
            if cfg.epochs < saved["epoch"]:
                raise ValueError(f"{self.resume_what}: the checkpoint already has {saved['epoch']} epochs; "
                                 f"--epochs {cfg.epochs} would go back")
        elif cfg.init is not None and init_state is None:
            init_state = read_initial_weights(cfg.init)
        seed_everything(cfg.seed)
        self.bundle = data_mod.load(cfg.data, cfg.image_size, cfg.subset, seed=cfg.seed)
        self.model = models.build(cfg.model, num_classes=self.bundle.num_classes,
                                  in_channels=self.bundle.in_channels).to(self.device)
        if init_state is not None and saved is None:
            load_initial_weights(self.model, init_state, cfg.init)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.rank:  # augmentation: another stream per rank (the weights come from rank 0 through DDP)
            seed_everything((cfg.seed + self.rank) % SEED_LIMIT)
        if cfg.target_speedup is not None:  # reachable on this model? before any training
            check_reachable(self.model, cfg.scheme, cfg.target_speedup, self.bundle.input_size[1:],
                            "--target-speedup")
        latency = None
        if cfg.target_latency is not None:  # measured, and reachable? before any training
            latency = latency_cost(cfg, self.model, self.bundle)
        self.pruner = None
        if cfg.trp:  # under torch.distributed: sharded over the default group
            self.pruner = RankPruner(self.model, cfg.scheme, cfg.energy, cfg.period, cfg.nuclear,
                                     **budget_args(cfg, self.bundle, latency))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, cfg.schedule, cfg.lr_decay)
        self.train_loader, self.test_loader = data_mod.make_loaders(
            self.bundle, cfg.batch_size, cfg.seed, cfg.workers, self.rank, self.world.world_size if self.world else 1)
        if len(self.train_loader) == 0:  # a last batch of one sample is dropped (BatchNorm): none may be left
            world, n = self.world.world_size if self.world else 1, len(self.bundle.train)
            spread, each = (f" over {world} processes", " per process") if world > 1 else ("", "")
            fix = f"--subset {2 * world} or more" if cfg.subset is not None else "more data"
            raise data_mod.DataError(f"the training data ({n} sample{'s' if n != 1 else ''}{spread}) give no "
                                     f"batch of two or more samples{each}: use {fix}")
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        if cfg.deterministic:  # numpy / random in workers too (torch's are seeded by the loaders' generators)
            self.train_loader.worker_init_fn = self.test_loader.worker_init_fn = seed_worker
        self.epoch, self.history = 0, []
        self.saved_epoch = self.resumed_epoch = None  # the epochs of the checkpoints written / resumed from
        self._saving = None  # (epoch, file id before) of the checkpoint being written
        if saved is not None:
            self._restore(saved)
        self.net = self._training_module()

    def _training_module(self):
        """The module the training steps call: the model, DDP-wrapped over the processes, then compiled
        (torch.compile of the DDP module, as PyTorch recommends); they all share the model's parameters,
        which the pruner, the optimizer and the checkpoints use."""
        net = self.model
        if self.world:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        return torch.compile(net) if self.cfg.compile else net

    @property
    def report_loader(self):
        """The whole test set (the training loader of a rank holds its share only)."""
        if not self.world:
            return self.test_loader
        return data_mod.make_loaders(self.bundle, self.cfg.batch_size, self.cfg.seed, self.cfg.workers)[1]

    def _restore(self, saved):
        if saved["arch"] != self.model.trp_arch:
            raise ValueError(f"{self.resume_what}: checkpoint of architecture {saved['arch']}, this run builds "
                             f"{self.model.trp_arch}")
        load_weights(self.model, saved["model"], f"{self.resume_what}: checkpoint does not fit this run",
                     error=ckpt.CheckpointError)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.pruner is not None:
                self.pruner.load_state_dict(saved["pruner"])
            check_scheduler(saved["scheduler"], self.scheduler.state_dict())
            self.scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            # each rank's own RNG streams when the process count is the same; else rank 0's, ranks > 0
            # reseeded
            per_rank = saved.get("rng_ranks") or []
            same = self.world is not None and len(per_rank) == self.world.world_size
            ckpt.set_rng_state(per_rank[self.rank] if same else saved["rng"], self.train_loader.generator)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            text = str(exc).strip()
            raise ckpt.CheckpointError(f"{self.resume_what}: checkpoint does not fit this run: "
                                       f"{text.splitlines()[0] if text else type(exc).__name__}") from None
        self.epoch, self.history = int(saved["epoch"]), list(saved.get("history", []))
        self.resumed_epoch = self.epoch
        if self.rank and not same:
            seed_everything((self.cfg.seed + self.epoch + self.rank) % SEED_LIMIT)

    def state(self):
        """The checkpoint (called on every rank: the RNG states are gathered; rank 0 writes it)."""
        rng = ckpt.rng_state(self.train_loader.generator)
        extra = {}
        if self.world:
            extra["rng_ranks"] = distributed.all_gather_objects(rng)
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        pruner = self.pruner.state_dict() if self.pruner is not None else None
        if self.world and pruner is not None and "warm_bases" in pruner:
            # each rank holds the warm-start bases of the groups it projects: the checkpoint gets them all
            parts = distributed.all_gather_objects({k: v.cpu() for k, v in pruner["warm_bases"].items()})
            pruner["warm_bases"] = {k: v for part in parts for k, v in part.items()}
        return {"format": ckpt.FORMAT, "version": ckpt.VERSION, "config": self.cfg.to_dict(),
                "arch": dict(self.model.trp_arch), "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "pruner": pruner,
                "rng": rng, "history": self.history, **extra}

    def train_epoch(self):
        cfg, model = self.cfg, self.net
        model.train()
        if self.world:
            self.train_loader.sampler.set_epoch(self.epoch)
        amp = AMP_DTYPES[cfg.amp]
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress, dynamic_ncols=True, mininterval=0.5)
        criterion = nn.CrossEntropyLoss()
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, memory_format=memory_format), y.to(self.device)
            if self.pruner is not None:  # outside autocast: the projection stays in float32
                try:
                    self.pruner.step()
                except ValueError as exc:  # non-finite weights at the projection (the same on every rank)
                    raise self._diverged(f"{exc}") from None
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                out = model(x)
                loss = criterion(out, y)
            finite = bool(torch.isfinite(loss))
            if not (distributed.all_true(finite, self.device) if self.world else finite):  # all ranks stop
                where = f"at epoch {self.epoch + 1}, step {step + 1}"
                raise self._diverged(f"loss is {float(loss.detach())} {where}" if not finite
                                     else f"the loss of another process is not finite {where}")
            self.optimizer.zero_grad(set_to_none=True)
            # DDP: backward() all-reduces the gradients, so regularize() adds its (identical on every
            # rank) subgradient to the averaged gradients; fp16: to the unscaled ones
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if self.pruner is not None:
                self.pruner.regularize()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            rank = _mean_rank(self.pruner)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                            **({"rank": f"{rank:.1f}"} if rank is not None else {}), refresh=False)
        bar.close()
        if self.world:
            loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], self.device)
        return loss_sum / max(seen, 1), 100.0 * correct / max(seen, 1)

    def checkpoint_note(self, hint=False):
        """What the run leaves to continue from: the last checkpoint it wrote (also when interrupted just
        after the rename that put it in place), else the one it resumed from.

        Args:
            hint: add "; continue with --resume" when there is a checkpoint to continue from.

        Returns:
            One clause for a message.
        """
        saved = self.saved_epoch
        if self._saving is not None and self._saving[0] != saved and file_id(self.ckpt_path) != self._saving[1]:
            saved = self._saving[0]  # interrupted after the rename that put the new checkpoint in place
        more = "; continue with --resume" if hint else ""
        if saved is not None:
            return f"the last good checkpoint ({self.ckpt_path}, epoch {saved}) is untouched{more}"
        if self.resumed_epoch is not None:
            source = f" ({self.resume_path}, epoch {self.resumed_epoch})" if self.resume_path is not None else \
                f" (epoch {self.resumed_epoch})"
            return f"no checkpoint was written; the checkpoint it resumed from{source} is untouched{more}"
        return "no checkpoint was written"

    def _diverged(self, what):
        return TrainError(f"training diverged: {what}; {self.checkpoint_note()}; try a lower --lr")

    def fit(self, on_epoch_end=None):
        """Trains up to cfg.epochs, holding the run directory's lock (runlock) throughout."""
        with deterministic_mode(self.cfg.deterministic):
            if self.rank:  # only rank 0 writes into the run directory
                return self._fit(on_epoch_end)
            with runlock.locked(self.out):
                storage.clean_stale_temps(self.out, RUN_FILES)  # of dead writers only
                return self._fit(on_epoch_end)

    def _fit(self, on_epoch_end):
        cfg = self.cfg
        if self.epoch == 0:
            self.log(f"training {cfg.model} on {self.bundle.name} ({len(self.bundle.train)} train / "
                     f"{len(self.bundle.test)} test, input {self.bundle.input_size[1:]}) for {cfg.epochs} "
                     f"epochs; " + (f"TRP {cfg.scheme}, " + (f"target speed-up {cfg.target_speedup}"
                                                              if cfg.target_speedup else f"energy {cfg.energy}")
                                    + f", period {cfg.period}, nuclear "
                                    f"{cfg.nuclear} on {len(self.pruner.layers)} layers"
                                    if self.pruner else "plain baseline (no TRP)"))
        else:
            self.log(f"resuming {self.ckpt_path} after epoch {self.epoch} of {cfg.epochs}")
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            loss, train_acc = self.train_epoch()
            self.scheduler.step()
            if self.world:  # BatchNorm statistics of rank 0 everywhere: one model to test and save
                distributed.broadcast_buffers(self.model)
            if not _all_finite(self.model):
                raise self._diverged(f"non-finite weights after epoch {self.epoch + 1}")
            test_acc = evaluate(self.model, self.test_loader, self.device, all_ranks=self.world is not None)
            self.epoch += 1
            rank = _mean_rank(self.pruner)
            speedup = self.pruner.budget.speedup if self.pruner is not None and self.pruner.budget else None
            self.history.append({"epoch": self.epoch, "loss": loss, "train_acc": train_acc,
                                 "test_acc": test_acc, "mean_rank": rank, "lr": lr,
                                 **({"speedup": speedup} if speedup is not None else {})})
            state = self.state()
            if self.rank == 0:
                self._saving = (self.epoch, file_id(self.ckpt_path))
                ckpt.save_checkpoint(state, self.ckpt_path)
            self.saved_epoch = self.epoch
            self.log(f"epoch {self.epoch:3d}/{cfg.epochs}  loss {loss:.4f}  train {train_acc:6.2f}%  "
                     f"test {test_acc:6.2f}%" + (f"  mean rank {rank:5.1f}" if rank is not None else "")
                     + (f"  speed-up {speedup:.2f}x" if speedup is not None else "")
                     + f"  lr {lr:g}  {time.perf_counter() - t0:.1f}s")
            if on_epoch_end is not None:
                on_epoch_end(self)
        return self


def decompose_criterion(energy, threshold, target_speedup=None, target_latency=None, runtime=None):
    """The decompose() keywords of a run's criterion: a target latency (with the trp.Runtime it measures in), else
    a target speed-up, else a threshold, else the energy."""
    if target_latency is not None:
        return {"target_latency": target_latency, "runtime": runtime}
    if target_speedup is not None:
        return {"target_speedup": target_speedup}
    return {"threshold": threshold} if threshold is not None else {"energy": energy}


def final_report(model, bundle, test_loader, device, scheme, energy=None, threshold=None, out=None,
                 log=print, latency_repeats=30, target_speedup=None, target_latency=None, runtime=None):
    """Dense vs decomposed (no fine-tuning): accuracies, trp.report table, speed-up, params, CPU latency;
    writes report.json, decomposed.pt (trp.save) and ranks.png into `out` when given. Returns the dict."""

    criterion = decompose_criterion(energy, threshold, target_speedup, target_latency, runtime)
    dense_acc = evaluate(model, test_loader, device)
    source = cpu_copy(model) if runtime is not None and runtime.name == "onnxruntime" else model
    compact = decompose_mod.decompose(source, scheme, **criterion, input_size=bundle.input_size[1:]).to(device)
    compact_acc = evaluate(compact, test_loader, device)
    dense_cpu, compact_cpu = cpu_copy(model), cpu_copy(compact)
    rep = trp_report(dense_cpu, compact_cpu, bundle.input_size, latency=True, warmup=5,
                     repeats=latency_repeats, device="cpu")
    t = rep.totals
    shown = dict(criterion, runtime=runtime.name) if runtime is not None else criterion
    result = {"data": bundle.name, "input_size": list(bundle.input_size), "scheme": scheme, **shown,
              "dense_acc": dense_acc, "decomposed_acc": compact_acc, "speedup": t["speedup"],
              "params_dense": t["params_dense"], "params_decomposed": t["params_compact"],
              "latency_dense_ms": t["latency_dense_s"] * 1e3, "latency_decomposed_ms": t["latency_compact_s"] * 1e3,
              "report": rep.to_dict()}
    if target_latency is not None:
        result["latency_budget"] = rec = compact.trp_latency_budget
        log(f"latency speed-up on {runtime.name} (batch {runtime.batch_size}): target {rec['target']:g}x, measured "
            f"{rec['measured']:.2f}x ({'met' if rec['met'] else 'NOT met'})")
    ort = _onnxruntime_latency(dense_cpu, compact_cpu, bundle.input_size, latency_repeats, log)
    if ort is not None:
        result.update(onnxruntime_latency_dense_ms=ort[0] * 1e3, onnxruntime_latency_decomposed_ms=ort[1] * 1e3)
    log(str(rep))
    if out is not None:
        os.makedirs(out, exist_ok=True)
        io.save(compact_cpu, os.path.join(out, "decomposed.pt"))
        result["plot"] = plots.rank_spectrum(dense_cpu, compact_cpu, scheme, os.path.join(out, "ranks.png"),
                                             energy=energy, threshold=threshold,
                                             target_speedup=target_speedup, target_latency=target_latency)
        text = json.dumps(result, indent=1, default=_json_default)
        storage.atomic_write(os.path.join(out, "report.json"), lambda f: f.write(text.encode()))
    crit = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items())
    log(f"dense accuracy:      {dense_acc:.2f}%")
    log(f"decomposed accuracy: {compact_acc:.2f}%  (no fine-tuning; {scheme} scheme, {crit})")
    log(f"speed-up ({t['macs_counted']} MACs, as the paper counts): {t['speedup']:.2f}x  "
        f"({t['macs_dense'] / 1e6:.2f}M -> {t['macs_compact'] / 1e6:.2f}M)")
    log(f"params: {t['params_dense'] / 1e6:.3f}M -> {t['params_compact'] / 1e6:.3f}M;  CPU latency (batch 1, "
        f"median): {t['latency_dense_s'] * 1e3:.2f} ms -> {t['latency_compact_s'] * 1e3:.2f} ms")
    if ort is not None:
        log(f"onnxruntime CPU latency (batch 1, median): {ort[0] * 1e3:.2f} ms -> {ort[1] * 1e3:.2f} ms "
            f"({ort[0] / ort[1]:.2f}x; `trp decompose --fit-latency onnxruntime` keeps only faster layers)")
    if out is not None:
        log(f"wrote {os.path.join(out, 'report.json')}, {os.path.join(out, 'ranks.png')}, "
            f"{os.path.join(out, 'decomposed.pt')}")
    return result


def _onnxruntime_latency(dense, compact, input_size, repeats, log):
    """(dense s, decomposed s) in onnxruntime on the CPU, or None when onnxruntime is not installed or the
    model does not export (an extra of the report: it never fails it)."""
    if not export.onnxruntime_available():
        return None
    try:
        return export.compare_ort(dense, compact, input_size, repeats=repeats)
    except Exception as exc:  # e.g. an operator the ONNX exporter does not support
        log(f"onnxruntime latency skipped: the model does not export to ONNX ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})")
        return None


def cpu_copy(model):
    """A deep copy of `model` on the CPU in eval mode, with its trp_arch record."""
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


def model_from_checkpoint(saved, device="cpu", path="checkpoint"):
    """The dense model of a (verified) training checkpoint, first built on the meta device and matched with
    the checkpoint's weights (records.dry_run), so that nothing is allocated for an architecture record
    whose sizes are not those of its weights.

    Args:
        saved: the checkpoint (checkpoint.load_checkpoint / verify_checkpoint).
        device: where the model goes.
        path: the file it was read from, for messages.

    Returns:
        The model, on `device`.

    Raises:
        checkpoint.CheckpointError: the architecture record does not build or does not fit the weights.
    """
    what = f"{path}: the checkpoint's weights do not fit its architecture {saved.get('arch')}"

    def build(meta=False):
        try:
            model = models.build_from_arch(saved["arch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{what}: {exc}") from None
        return load_weights(model, saved["model"], what, error=ckpt.CheckpointError, assign=meta)

    try:
        records.check_arch(saved["arch"], saved["model"], path)
        records.dry_run(lambda: build(meta=True), saved["model"], path)
    except records.RecordError as exc:
        raise ckpt.CheckpointError(str(exc)) from None
    return build().to(device)


__all__ = ["TrainError", "Run", "evaluate", "cpu_copy", "decompose_criterion", "final_report", "model_from_checkpoint",
           "CHECKPOINT", "REPORT_FILES", "RUN_FILES"]
