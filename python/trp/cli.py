"""The `trp` command: train (with TRP), decompose, eval, report.

Every error the user can cause (bad names, bad files, conflicting options, a diverged run) ends as one
line `trp: error: ...` on stderr and exit status 2, checked before any training work starts."""
import argparse
import os
import sys
import time

from . import checkpoint as ckpt
from . import data as data_mod
from . import train as train_mod

# train options whose defaults come from train.DEFAULTS / --preset; argparse leaves them out when not given
TRAIN_KEYS = ("model", "data", "image_size", "subset", "scheme", "energy", "period", "nuclear", "epochs", "lr",
              "schedule", "lr_decay", "weight_decay", "momentum", "batch_size", "seed", "device", "workers",
              "threshold", "init", "out")
RESUME_CHANGEABLE = ("epochs", "device", "threshold", "out")


class CLIError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 via main(), instead of usage + SystemExit
        raise CLIError(f"{self.prog}: {message}")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _add_criterion(p, default_note):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=float, help=f"decompose keeping this fraction of squared singular values "
                                                f"({default_note})")
    g.add_argument("--threshold", type=float, help="decompose by an absolute singular-value cutoff instead "
                                                   "(the released code uses 0.05 after TRP)")


def build_parser():
    S = argparse.SUPPRESS
    d = train_mod.DEFAULTS
    parser = _Parser(prog="trp", description="Trained Rank Pruning: train low-rank CNNs, decompose them, "
                                             "measure what it bought.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model (with TRP by default), then decompose and report",
                       argument_default=S)
    t.add_argument("--model", metavar="NAME", help=f"resnet20|32|44|56|110 or torchvision:NAME (default {d['model']})")
    t.add_argument("--data", metavar="SPEC", help="digits (embedded, default) | cifar10:DIR (python batches) | "
                                  "imagefolder:DIR (DIR/train, DIR/val)")
    t.add_argument("--image-size", metavar="N", type=_positive_int, help="input side for digits (default 16) and "
                                                            "imagefolder (default 224)")
    t.add_argument("--subset", metavar="N", type=_positive_int, help="use a fixed random N train and N test samples")
    t.add_argument("--scheme", metavar="NAME", help="channel (default) or spatial")
    t.add_argument("--energy", metavar="E", type=float, help=f"fraction of squared singular values each projection keeps "
                                                f"and the final decomposition uses (default {d['energy']})")
    t.add_argument("--period", metavar="M", type=int, help=f"project every PERIOD iterations (default {d['period']})")
    t.add_argument("--nuclear", metavar="L", type=float, help=f"nuclear-norm weight lambda (default {d['nuclear']})")
    t.add_argument("--no-trp", action="store_true", default=False, help="train the plain baseline")
    t.add_argument("--epochs", metavar="N", type=_positive_int, help=f"default {d['epochs']}")
    t.add_argument("--lr", type=float, help=f"initial learning rate (default {d['lr']})")
    t.add_argument("--schedule", type=_positive_int, nargs="+", metavar="EPOCH",
                   help="epochs after which the lr is multiplied by --lr-decay (default: 50%% and 75%% of "
                        "--epochs)")
    t.add_argument("--lr-decay", metavar="F", type=float, help=f"default {d['lr_decay']}")
    t.add_argument("--weight-decay", metavar="WD", type=float, help=f"default {d['weight_decay']}")
    t.add_argument("--momentum", metavar="MU", type=float, help=f"default {d['momentum']}")
    t.add_argument("--batch-size", metavar="N", type=_positive_int, help=f"default {d['batch_size']}")
    t.add_argument("--seed", metavar="N", type=int, help=f"default {d['seed']}")
    t.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:N or auto")
    t.add_argument("--workers", metavar="N", type=int, help="DataLoader worker processes (default 0)")
    t.add_argument("--threshold", metavar="T", type=float, help="decompose at the end by this absolute singular-value "
                                                   "cutoff instead of --energy")
    t.add_argument("--out", metavar="DIR", help=f"run directory: checkpoint.pt, report.json, ranks.png, decomposed.pt "
                                 f"(default {d['out']})")
    t.add_argument("--init", metavar="FILE", help="initial weights: a state_dict file (e.g. a torchvision "
                                                  "checkpoint) or a trp checkpoint, for TRP fine-tuning")
    t.add_argument("--preset", metavar="NAME", help=f"a published recipe: {', '.join(sorted(train_mod.PRESETS))} "
                                    "(explicit options override it)")
    t.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue the run in --out (or the checkpoint CKPT) exactly where it stopped")
    t.add_argument("--force", action="store_true", default=False,
                   help="start over even if --out already holds a checkpoint")
    t.add_argument("--threads", metavar="N", type=_positive_int, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", default=False, help="no progress bar")
    t.add_argument("--no-report", action="store_true", default=False,
                   help="skip the end-of-training decomposition and report (run `trp report` later)")

    dc = sub.add_parser("decompose", help="checkpoint -> decomposed model file (trp.save format)")
    dc.add_argument("checkpoint")
    dc.add_argument("--out", "-o", required=True, help="decomposed model file to write")
    dc.add_argument("--scheme", help="default: the checkpoint's")
    _add_criterion(dc, "default: the checkpoint's --threshold or --energy")

    ev = sub.add_parser("eval", help="accuracy of a training checkpoint or a decomposed model file")
    ev.add_argument("model_file")
    ev.add_argument("--data", help="default: the checkpoint's data set (digits for a model file)")
    ev.add_argument("--image-size", type=_positive_int)
    ev.add_argument("--subset", type=_positive_int)
    ev.add_argument("--batch-size", type=_positive_int, default=256)
    ev.add_argument("--device", default="cpu")

    rp = sub.add_parser("report", help="dense vs decomposed: accuracies, per-layer table, speed-up, "
                                       "latency, report.json and ranks.png")
    rp.add_argument("checkpoint")
    rp.add_argument("--out", help="directory for report.json, ranks.png, decomposed.pt (default: the "
                                  "checkpoint's directory)")
    rp.add_argument("--scheme", help="default: the checkpoint's")
    _add_criterion(rp, "default: the checkpoint's --threshold or --energy")
    rp.add_argument("--device", default="cpu")
    return parser


def _log(msg):
    print(msg, flush=True)


def cmd_train(ns):
    start = time.perf_counter()
    explicit = {k: getattr(ns, k) for k in TRAIN_KEYS if hasattr(ns, k)}
    if "threads" in ns:
        import torch
        torch.set_num_threads(ns.threads)
    if ns.no_trp:
        if explicit.get("nuclear", 0) > 0:
            raise CLIError("--no-trp trains without the nuclear-norm term: drop --nuclear")
        if "period" in explicit:
            raise CLIError("--no-trp trains without projections: drop --period")
        explicit.update(trp=False, nuclear=0.0)
    preset = getattr(ns, "preset", None)
    if preset is not None and preset not in train_mod.PRESETS:
        raise CLIError(f"unknown preset {preset!r}; valid: {', '.join(sorted(train_mod.PRESETS))}")
    resume = getattr(ns, "resume", None)
    if resume is not None:
        if ns.force:
            raise CLIError("--resume continues a run and --force starts it over: give one of them")
        path = resume or os.path.join(explicit.get("out", train_mod.DEFAULTS["out"]), train_mod.CHECKPOINT)
        saved = ckpt.load_checkpoint(path)
        given = dict(explicit)
        if preset is not None:
            given = {**train_mod.PRESETS[preset], **given}
        train_mod.check_resume(saved["config"], {k: v for k, v in given.items()
                                                 if k not in RESUME_CHANGEABLE})
        values = dict(saved["config"])
        values.update({k: v for k, v in explicit.items() if k in RESUME_CHANGEABLE})
        if "out" not in explicit:  # the run continues where its checkpoint lies
            values["out"] = os.path.dirname(os.path.abspath(path))
        cfg = train_mod.TrainConfig.from_dict(values)
    else:
        cfg = train_mod.resolve_config(explicit, preset)
        existing = os.path.join(cfg.out, train_mod.CHECKPOINT)
        if os.path.exists(existing) and not ns.force:
            raise CLIError(f"{existing} exists: --resume to continue that run, --force to start over, or "
                           "another --out")
        saved = None
    run = train_mod.Run(cfg, resume=saved, log=_log, progress=not ns.no_progress)
    run.fit()
    if ns.no_report:
        return 0
    train_mod.final_report(run.model, run.bundle, run.test_loader, run.device, cfg.scheme,
                           **_criterion(cfg.energy, cfg.threshold), out=run.out, log=_log)
    _log(f"total time {time.perf_counter() - start:.0f} s")
    return 0


def _criterion(energy, threshold):
    return {"threshold": threshold} if threshold is not None else {"energy": energy}


def _checkpoint_model(path, device="cpu"):
    saved = ckpt.load_checkpoint(path)
    return saved, train_mod.model_from_checkpoint(saved, device)


def _deploy_args(ns, cfg):
    scheme = ns.scheme or cfg["scheme"]
    from .schemes import check_scheme
    check_scheme(scheme)
    if ns.energy is not None or ns.threshold is not None:
        return scheme, _criterion(ns.energy, ns.threshold)
    return scheme, _criterion(cfg["energy"], cfg.get("threshold"))


def cmd_decompose(ns):
    from . import io
    from .decompose import decompose
    from .flops import count_macs, count_params

    saved, model = _checkpoint_model(ns.checkpoint)
    scheme, crit = _deploy_args(ns, saved["config"])
    compact = decompose(model, scheme, **crit)
    out_dir = os.path.dirname(os.path.abspath(ns.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"directory {out_dir} does not exist")
    io.save(compact, ns.out)
    size = (1, saved["arch"].get("in_channels", 3), *(2 * [_image_size(saved["config"])]))
    md, mc = count_macs(model, size), count_macs(compact, size)
    _log(f"wrote {ns.out}: {scheme} scheme, {', '.join(f'{k} {v}' for k, v in crit.items())}; conv MACs "
         f"{md / 1e6:.2f}M -> {mc / 1e6:.2f}M (speed-up {md / mc:.2f}x), params "
         f"{count_params(model) / 1e6:.3f}M -> {count_params(compact) / 1e6:.3f}M")
    return 0


def _image_size(cfg):
    if cfg.get("image_size"):
        return cfg["image_size"]
    kind, _ = data_mod.parse_spec(cfg["data"])
    return {"digits": 16, "cifar10": 32}.get(kind, 224)


def cmd_eval(ns):
    from . import io

    device = train_mod.resolve_device(ns.device)
    obj = ckpt.load_file(ns.model_file)
    if ckpt.is_checkpoint(obj):
        saved, model = _checkpoint_model(ns.model_file, device)
        cfg = saved["config"]
        spec, size, subset, kind = ns.data or cfg["data"], ns.image_size or cfg.get("image_size"), \
            ns.subset or cfg.get("subset"), "dense checkpoint"
        seed = cfg.get("seed", 0)
    else:
        model = io.load(ns.model_file).to(device)
        spec, size, subset, kind, seed = ns.data or "digits", ns.image_size, ns.subset, "model file", 0
    arch = getattr(model, "trp_arch", {}) or {}
    bundle = data_mod.load(spec, size, subset, seed=seed)
    if arch.get("num_classes", bundle.num_classes) != bundle.num_classes:
        raise CLIError(f"{ns.model_file} predicts {arch['num_classes']} classes, {spec} has "
                       f"{bundle.num_classes}")
    _, test_loader = data_mod.make_loaders(bundle, ns.batch_size)
    acc = train_mod.evaluate(model, test_loader, device)
    _log(f"{ns.model_file} ({kind}, {arch.get('name', '?')}): accuracy {acc:.2f}% on {bundle.name} "
         f"({len(bundle.test)} test images, input {bundle.input_size[1:]})")
    return 0


def cmd_report(ns):
    device = train_mod.resolve_device(ns.device)
    saved, model = _checkpoint_model(ns.checkpoint, device)
    cfg = saved["config"]
    scheme, crit = _deploy_args(ns, cfg)
    bundle = data_mod.load(cfg["data"], cfg.get("image_size"), cfg.get("subset"), seed=cfg.get("seed", 0))
    _, test_loader = data_mod.make_loaders(bundle, cfg.get("batch_size", 128), cfg.get("seed", 0))
    out = ns.out or os.path.dirname(os.path.abspath(ns.checkpoint))
    _log(f"{ns.checkpoint}: {saved['arch'].get('name')} after {saved['epoch']} epochs on {bundle.name}")
    train_mod.final_report(model, bundle, test_loader, device, scheme, **crit, out=out, log=_log)
    return 0


COMMANDS = {"train": cmd_train, "decompose": cmd_decompose, "eval": cmd_eval, "report": cmd_report}


def main(argv=None):
    try:
        ns = build_parser().parse_args(argv)
        return COMMANDS[ns.command](ns)
    except KeyboardInterrupt:
        print("trp: interrupted (the last epoch's checkpoint is kept; continue with --resume)", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError, train_mod.TrainError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"trp: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
