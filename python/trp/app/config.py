# Over 300 lines: every option of `trp train` with its rule, in one table.
"""The `trp train` options, declared once.

Each TrainConfig field carries, in its metadata, the CLI flag and help text, the argparse details, the
rule that validates it and whether a resumed run may change it. DEFAULTS, the resume rules, validation and
the parser (cli.py) are derived from these declarations: a new option is one field here (plus its line in
the README, which a test checks)."""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from trp import models
from trp._utils import checks
from trp.app import data as data_mod
from trp.core.rank import check_energy, check_threshold
from trp.core.schemes import check_scheme
from trp.cost.model import check_target_speedup
from trp.deploy.latency import RUNTIMES
from trp.prune.budget import SpeedupController
from trp.prune.pruner import NUCLEAR, check_nuclear, check_period, default_nuclear

SEED_LIMIT = 2 ** 63  # torch generators take 64 bits and the loaders also seed with seed + 1


def positive_int(text):
    """argparse type: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N, auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; valid: cpu, cuda, cuda:N, auto")
    return device


# --- rules: rule(value, flag) raises ValueError; data options are checked together (see validate) -------

def _optional(rule):
    return lambda v, flag: None if v is None else rule(v, flag)


def _string(v, flag):
    if not isinstance(v, str) or not v:
        raise ValueError(f"{flag} must be a non-empty string, got {v!r}")


def _bool(v, flag):
    if not isinstance(v, bool):
        raise ValueError(f"{flag} must be True or False, got {v!r}")


def _schedule(v, flag):
    if not isinstance(v, list) or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in v) \
            or v != sorted(set(v)):
        raise ValueError(f"{flag} must be increasing epoch numbers >= 1, got {v!r}")


def _one_of(*valid):
    def rule(v, flag):
        checks.choice(v, valid, flag)
    return rule


AMP_MODES = ("off", "bf16", "fp16")


def check_out_dir(v, flag="--out"):
    _string(v, flag)
    if os.path.exists(v) and not os.path.isdir(v):
        raise ValueError(f"{flag} {v} is a file, not a directory")


def _real(**bounds):
    return lambda v, flag: checks.real(v, flag, **bounds)


def _int(low, high=math.inf):
    return lambda v, flag: checks.integer(v, flag, low, high)


def _device_name(v, flag):
    """A device name as a record may hold it (whether this machine has that device is the run's business)."""
    _string(v, flag)
    if v != "auto":
        try:
            kind = torch.device(v).type
        except (RuntimeError, TypeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"{flag} must be cpu, cuda, cuda:N or auto, got {v!r}")


def option(default, flag, help, check=None, resume=False, record_check=None, since_v2=False, absent=None,
           **argparse_kw):
    """A TrainConfig field. help may use {default}; resume=True: a resumed run may change it.
    record_check: the rule for the value a checkpoint holds, when it differs from `check` (which may ask the
    machine); since_v2: added after the first checkpoints of format 2, which lack it (it reads as `absent`);
    absent: what a record without the option ran with, when that is not the default (None: the default)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, "check": check,
                                                         "resume": resume, "argparse": argparse_kw,
                                                         "record_check": record_check or check,
                                                         "since_v2": since_v2,
                                                         "absent": default if absent is None else absent})


# Defaults tuned for the embedded digits at 16x16 (make demo): a few minutes on a 2-core CPU; lr 0.05 rather
# than the paper's 0.1, which trains unsteadily on 1,347 images with a projection every step. See README.
# The field order is the order of `trp train --help`.
@dataclass
class TrainConfig:
    model: str = option("resnet20", "--model", "resnet20|32|44|56|110, vit_tiny|vit_small or torchvision:NAME "
                        "(default {default})",
                        lambda v, flag: models.check_name(v), metavar="NAME")
    data: str = option("digits", "--data", "digits (embedded, default) | cifar10:DIR (python batches) | "
                       "imagefolder:DIR (DIR/train, DIR/val) | arrays:FILE.npz (x_train, y_train, x_test, y_test)",
                       metavar="SPEC")
    image_size: int = option(None, "--image-size", "input side for digits (default 16), imagefolder "
                             "(default 224) and arrays (default: the images' side)", metavar="N", type=positive_int)
    subset: int = option(None, "--subset", "use a fixed random N train and N test samples", metavar="N",
                         type=positive_int)
    scheme: str = option("channel", "--scheme", "channel (default), spatial, nd (network decoupling, the "
                         "cheaper order per layer), nd_pointwise or nd_depthwise (one order for every layer)",
                         lambda v, flag: check_scheme(v), metavar="NAME")
    energy: float = option(0.9, "--energy", "fraction of squared singular values each projection keeps and "
                           "the final decomposition uses (default {default})", check_energy, metavar="E",
                           type=float)
    period: int = option(1, "--period", "project every PERIOD iterations (default {default})", check_period,
                         metavar="M", type=int)
    nuclear: float = option(None, "--nuclear", f"nuclear-norm weight lambda (default {NUCLEAR}; 0 with "
                            "--target-speedup or --target-latency)", _optional(check_nuclear),
                            metavar="L", type=float)
    trp: bool = option(True, "--no-trp", "train the plain baseline", lambda v, flag: _bool(v, "trp"),
                       action="store_false")
    epochs: int = option(30, "--epochs", "default {default}", _int(1), resume=True, metavar="N",
                         type=positive_int)
    lr: float = option(0.05, "--lr", "initial learning rate (default {default})", _real(low=0.0, low_open=True),
                       type=float)
    schedule: list = option(None, "--schedule", "epochs after which the lr is multiplied by --lr-decay "
                            "(default: 50%% and 75%% of --epochs)", _schedule, type=positive_int, nargs="+",
                            metavar="EPOCH")
    lr_decay: float = option(0.1, "--lr-decay", "default {default}", _real(low=0.0, high=1.0, low_open=True),
                             metavar="F", type=float)
    weight_decay: float = option(1e-4, "--weight-decay", "default {default}", _real(low=0.0), metavar="WD",
                                 type=float)
    momentum: float = option(0.9, "--momentum", "default {default}", _real(low=0.0, high=1.0, high_open=True),
                             metavar="MU", type=float)
    batch_size: int = option(64, "--batch-size", "default {default}", _int(1), metavar="N", type=positive_int)
    seed: int = option(0, "--seed", "default {default}", _int(0, SEED_LIMIT), metavar="N", type=int)
    device: str = option("cpu", "--device", "cpu (default), cuda, cuda:N or auto",
                         lambda v, flag: resolve_device(v), resume=True, record_check=_device_name, metavar="DEV")
    # execution options (a resumed run may change them: --nproc too, the checkpoint is the same on any count)
    nproc: int = option(1, "--nproc", "processes: N > 1 trains with DistributedDataParallel on N local "
                        "workers (gloo on the CPU, one GPU each with NCCL; --batch-size is the global batch). "
                        "Under torchrun: its WORLD_SIZE (default 1)", _int(1), resume=True, since_v2=True, metavar="N",
                        type=positive_int)
    amp: str = option("off", "--amp", "mixed precision: off (default), bf16, or fp16 with loss scaling; the "
                      "projection always runs in float32", _one_of(*AMP_MODES), resume=True, since_v2=True,
                      choices=AMP_MODES)
    channels_last: bool = option(False, "--channels-last", "channels-last memory format for the model and its "
                                 "inputs", _bool, resume=True, since_v2=True, action="store_true")
    compile: bool = option(False, "--compile", "torch.compile the model for training (the pruner works on its "
                           "parameters)", _bool, resume=True, since_v2=True, action="store_true")
    workers: int = option(0, "--workers", "DataLoader worker processes (default 0)", _int(0), metavar="N",
                          type=int)
    threshold: float = option(None, "--threshold", "decompose at the end by this absolute singular-value "
                              "cutoff instead of --energy", _optional(check_threshold), resume=True, metavar="T",
                              type=float)
    target_speedup: float = option(None, "--target-speedup", "steer the projections to this conv-MAC speed-up "
                                   "(ramped up over --budget-ramp of training) and decompose at it, instead "
                                   "of --energy (e.g. 2.2)", _optional(check_target_speedup), since_v2=True,
                                   metavar="S", type=float)
    target_latency: float = option(None, "--target-latency", "steer the projections to this latency speed-up, "
                                   "measured in --runtime at --latency-batch-size before training (ramped up over "
                                   "--budget-ramp), and decompose at it by measurement, instead of --energy "
                                   "(e.g. 1.5)", _optional(_real(low=1.0, low_open=True)), since_v2=True,
                                   metavar="S", type=float)
    runtime: str = option("eager", "--runtime", "where --target-latency measures: eager (PyTorch on --device) or "
                          "onnxruntime (CPU) (default {default})", lambda v, flag: checks.choice(v, RUNTIMES, flag),
                          since_v2=True, metavar="NAME")
    latency_batch_size: int = option(1, "--latency-batch-size", "the batch size --target-latency measures at "
                                     "(default {default})", _int(1), since_v2=True, metavar="N", type=positive_int)
    budget_ramp: float = option(0.5, "--budget-ramp", "with --target-speedup or --target-latency: the fraction "
                                "of training over which the goal ramps from 1x to the target (default {default}: "
                                "the first lr decay of the default --schedule)", _real(low=0.0, high=1.0),
                                since_v2=True, absent=0.25, metavar="F", type=float)
    budget_gain: float = option(SpeedupController.GAIN, "--budget-gain", "with --target-speedup or "
                                "--target-latency: the share of the cost above the goal one projection removes "
                                "(default {default})", _real(low=0.0, high=1.0, low_open=True), since_v2=True,
                                absent=1.0, metavar="G", type=float)
    deterministic: bool = option(False, "--deterministic", "deterministic algorithms, one CPU thread, seeded "
                                 "workers: a rerun on the same machine reproduces every number", _bool,
                                 since_v2=True, action="store_true")
    out: str = option("runs/trp", "--out", "run directory: checkpoint.pt, report.json, ranks.png, decomposed.pt "
                      "(default {default})", check_out_dir, resume=True, record_check=_string, metavar="DIR")
    # initial weights (a state_dict file such as a torchvision checkpoint, a trp checkpoint or model file):
    # TRP fine-tuning. Read and verified by the CLI before any work; unused on resume.
    init: str = option(None, "--init", "initial weights: a state_dict file (e.g. a torchvision checkpoint) or "
                       "a trp checkpoint, for TRP fine-tuning", _optional(_string), metavar="FILE")

    def __post_init__(self):
        if self.schedule is None:  # lr / decay at 50% and 75% of the run, as the paper's 81/122 of 164
            epochs = self.epochs if isinstance(self.epochs, int) else 1
            self.schedule = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        elif isinstance(self.schedule, tuple):
            self.schedule = list(self.schedule)
        if self.nuclear is None:  # a record holds the weight the run used
            target = self.target_speedup if self.target_speedup is not None else self.target_latency
            self.nuclear = default_nuclear(target)
        self.validate()

    def validate(self, record=False):
        """Every option against its rule, before any work.

        Args:
            record: use the rules for a checkpoint's values (which do not ask whether this machine has the
                device or the directory).

        Raises:
            ValueError: naming the option.
        """
        rule = "record_check" if record else "check"
        for f in dataclasses.fields(self):
            if f.metadata[rule] is not None:
                f.metadata[rule](getattr(self, f.name), f.metadata["flag"])
        data_mod.check_options(self.data, self.image_size, self.subset)
        if self.target_speedup is not None and self.threshold is not None:
            raise ValueError("--target-speedup and --threshold are alternative decomposition criteria: give one")
        if self.target_latency is not None and (self.target_speedup is not None or self.threshold is not None):
            raise ValueError("--target-latency, --target-speedup and --threshold are alternative decomposition "
                             "criteria: give one")
        if self.target_latency is not None and self.nproc != 1:
            raise ValueError("--target-latency measures in one process: it does not support --nproc > 1 yet")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, d):
        """The config a checkpoint holds, checked: a dict with every option (those added after the first
        checkpoints of format 2 may be missing: what the run had before they were options, see option()), no
        unknown one, each valid by its record rule.

        Args:
            d: the checkpoint's "config" record.

        Returns:
            The TrainConfig.

        Raises:
            ValueError: naming the missing, unknown or invalid option.
        """
        if not isinstance(d, dict):
            raise ValueError(f"must be a dict of options, got {type(d).__name__}")
        missing = [f.name for f in FIELDS if f.name not in d and not f.metadata["since_v2"]]
        unknown = [k for k in d if k not in DEFAULTS]
        if missing or unknown:
            raise ValueError(("lacks " + ", ".join(missing) if missing else "")
                             + ("; " if missing and unknown else "")
                             + ("has unknown options " + ", ".join(map(repr, unknown[:5])) + " (written by "
                                "another trp?)" if unknown else ""))
        cfg = object.__new__(cls)  # no __post_init__: a record's schedule is given, its checks are record rules
        for f in FIELDS:
            setattr(cfg, f.name, d.get(f.name, f.metadata["absent"]))
        cfg.validate(record=True)
        return cfg

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


FIELDS = dataclasses.fields(TrainConfig)
DEFAULTS = {f.name: f.default for f in FIELDS}
# Options a resumed run must share with its checkpoint (anything else would not continue the same run).
RESUME_FIXED = tuple(f.name for f in FIELDS if not f.metadata["resume"])
RESUME_CHANGEABLE = tuple(f.name for f in FIELDS if f.metadata["resume"])

PRESETS = {
    # the paper's CIFAR-10 recipe (scheme left to the user: the paper reports channel and spatial)
    "cifar10-paper": dict(lr=0.1, epochs=164, schedule=[81, 122], lr_decay=0.1, weight_decay=1e-4,
                          momentum=0.9, batch_size=128, energy=0.9, period=1, nuclear=3e-4),
    # the paper's ImageNet setting: TRP fine-tuning of a pretrained model (give it with --init), lr 1e-4 for 10 epochs,
    # the same SGD settings; batch 256 (the paper does not state it) and no lr decay in 10 epochs.
    "imagenet-paper": dict(lr=1e-4, epochs=10, schedule=[], lr_decay=0.1, weight_decay=1e-4, momentum=0.9,
                           batch_size=256, energy=0.9, period=1, nuclear=3e-4),
}


def check_preset(preset):
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")


def resolve_config(explicit, preset=None):
    """DEFAULTS < preset < explicitly given options -> TrainConfig. Unknown presets list the valid ones."""
    check_preset(preset)
    return TrainConfig(**{**DEFAULTS, **PRESETS.get(preset, {}), **explicit})


def check_resume(saved, explicit, what="--resume"):
    """Rejects explicitly given options that contradict the checkpoint's run.

    Args:
        saved: the checkpoint's config.
        explicit: {option: value} given on the command line.
        what: the option and file, for the message.

    Raises:
        ValueError: naming the option and both values.
    """
    for key in RESUME_FIXED:
        if key in explicit and explicit[key] != saved.get(key):
            raise ValueError(f"{what}: the checkpoint was trained with {key}={saved.get(key)!r}, "
                             f"not {explicit[key]!r}; drop the option or start a new run (--out)")


__all__ = ["TrainConfig", "AMP_MODES", "DEFAULTS", "PRESETS", "RESUME_FIXED", "RESUME_CHANGEABLE", "FIELDS", "option",
           "resolve_config", "resolve_device", "check_resume", "check_preset", "check_out_dir", "positive_int"]
