# Over 300 lines: one parser and one handler per `trp` subcommand, which read best side by side.
"""The `trp` command: train (with TRP), decompose, eval, report, export.

Every error the user can cause (bad names, bad files, conflicting options, a diverged run) ends as one
line `trp: error: ...` on stderr and exit status 2, checked before any training work starts. Ctrl-C and
SIGTERM end as one line `trp: interrupted ...` (what is left to continue from) and exit status 130."""
import argparse
import contextlib
import json
import os
import signal
import sys
import time

import torch

from trp._utils import checks, storage
from trp.app import checkpoint as ckpt
from trp.app import config, runlock, setup
from trp.app import data as data_mod
from trp.app import train as train_mod
from trp.app.config import positive_int as _positive_int
from trp.core.attention import block_names
from trp.core.rank import check_energy, check_threshold
from trp.core.schemes import check_scheme
from trp.cost.flops import count_macs, count_params
from trp.cost.model import check_target_speedup
from trp.deploy import decompose as decompose_mod
from trp.deploy import export, io
from trp.deploy import latency as deploy
from trp.deploy.decompose import factorized_layers
from trp.deploy.latency import merge_back
from trp.deploy.latency_budget import Runtime
from trp.prune import distributed

LATENCY_FIT = "latency_fit.json"  # what `trp report --fit-latency` adds to the report's directory


class CLIError(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a command; the message says what is left to continue from."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 via main(), instead of usage + SystemExit
        raise CLIError(f"{self.prog}: {message}")


def _add_criterion(p, default_note, latency=False):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--energy", type=float, help=f"decompose keeping this fraction of squared singular values "
                                                f"({default_note})")
    g.add_argument("--threshold", type=float, help="decompose by an absolute singular-value cutoff instead "
                                                   "(the released code uses 0.05 after TRP)")
    g.add_argument("--target-speedup", type=float, help="decompose at ranks allocated across the layers for "
                                                        "this conv-MAC speed-up instead")
    if latency:
        g.add_argument("--target-latency", type=float, metavar="S",
                       help="decompose at ranks chosen so that the network runs S times faster than dense in "
                            "--runtime, by measurement (verified end to end)")
        p.add_argument("--runtime", choices=deploy.RUNTIMES, default="eager",
                       help="where --target-latency measures: eager (PyTorch on --device) or onnxruntime (CPU) "
                            "[eager]")
        p.add_argument("--latency-batch-size", metavar="N", type=_positive_int, default=1,
                       help="the batch size --target-latency measures at [1]")
        p.add_argument("--latency-threads", metavar="N", type=_positive_int,
                       help="intra-op threads --target-latency measures with (default: the runtime's)")
        p.add_argument("--latency-cache", metavar="FILE",
                       help="a JSON file of measured layer latencies, read if it exists and updated (default: "
                            "none)")


def _add_fit(p):
    """Latency-aware deployment options (trp.deploy.fit_latency)."""
    p.add_argument("--fit-latency", metavar="RUNTIME", choices=("eager", "onnxruntime"),
                   help="time every factorized layer against the dense layer it replaces in RUNTIME (eager: "
                        "PyTorch on the CPU; onnxruntime) and merge back every one that is not faster")
    p.add_argument("--fit-batch-size", metavar="N", type=_positive_int, default=1,
                   help="batch size the latency fit measures at (default 1)")
    p.add_argument("--fit-threads", metavar="N", type=_positive_int,
                   help="intra-op threads the latency fit measures with (default: the runtime's, all cores)")
    p.add_argument("--rank-multiple", metavar="N", type=_positive_int,
                   help="round every rank up to a multiple of N (e.g. 8), refactorized from the dense weights")


def build_parser():
    S = argparse.SUPPRESS
    parser = _Parser(prog="trp", description="Trained Rank Pruning: train low-rank CNNs, decompose them, "
                                             "measure what it bought.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model (with TRP by default), then decompose and report",
                       argument_default=S)
    for f in config.FIELDS:  # the options of TrainConfig, declared there once
        meta = f.metadata
        t.add_argument(meta["flag"], dest=f.name, help=meta["help"].format(default=f.default), **meta["argparse"])
    t.add_argument("--preset", metavar="NAME", help=f"a published recipe: {', '.join(sorted(config.PRESETS))} "
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
    dc.add_argument("--scheme", help="channel, spatial, nd, nd_pointwise or nd_depthwise (default: the "
                                      "checkpoint's)")
    _add_criterion(dc, "default: the checkpoint's --threshold or --energy", latency=True)
    _add_fit(dc)

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
    rp.add_argument("--scheme", help="channel, spatial, nd, nd_pointwise or nd_depthwise (default: the "
                                      "checkpoint's)")
    _add_criterion(rp, "default: the checkpoint's --threshold or --energy")
    rp.add_argument("--device", default="cpu")
    _add_fit(rp)

    ex = sub.add_parser("export", help="decomposed model file or checkpoint -> ONNX, verified in onnxruntime, "
                                       "with dense vs decomposed latency there")
    ex.add_argument("model_file", metavar="MODEL")
    ex.add_argument("--out", "-o", required=True, help="ONNX file to write")
    ex.add_argument("--image-size", type=_positive_int,
                    help="input height = width (default: the checkpoint's; 32 for CIFAR ResNets, 224 otherwise)")
    ex.add_argument("--batch-size", type=_positive_int, default=1, help="batch size of the example input")
    ex.add_argument("--static-batch", action="store_true", help="fixed batch size (default: dynamic batch axis)")
    ex.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                    help="torch.onnx.export(dynamo=True) (default) or the TorchScript-based exporter")
    ex.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset version (default 18; the "
                                                                     "dynamo exporter writes 18 or later)")
    ex.add_argument("--threads", metavar="N", type=_positive_int,
                    help="onnxruntime threads for the latency comparison (default: all cores)")
    ex.add_argument("--scheme", help="for a checkpoint: channel, spatial, nd, nd_pointwise or nd_depthwise "
                                     "(default: the checkpoint's)")
    _add_criterion(ex, "for a checkpoint; default: its --threshold or --energy")
    return parser


def _log(msg):
    print(msg, flush=True)


def _train_config(ns):
    """(config, checkpoint to resume or None, --init state_dict or None, the checkpoint's path or None) from
    the command line; every option and file is checked here, before any work or write."""
    explicit = {f.name: getattr(ns, f.name) for f in config.FIELDS if hasattr(ns, f.name)}
    preset, resume = getattr(ns, "preset", None), getattr(ns, "resume", None)
    if resume is not None and ns.force:
        raise CLIError("--resume continues a run and --force starts it over: give one of them")
    if resume is not None and "init" in explicit:
        raise CLIError("--init gives a new run its weights and --resume continues from the checkpoint's: "
                       "give one of them")
    if explicit.get("trp") is False:
        if explicit.get("nuclear", 0) != 0:
            raise CLIError("--no-trp trains without the nuclear-norm term: drop --nuclear")
        if "period" in explicit:
            raise CLIError("--no-trp trains without projections: drop --period")
        explicit["nuclear"] = 0.0
    if "target_speedup" in explicit and "energy" in explicit:
        raise CLIError("--target-speedup steers the projections' energy itself: drop --energy")
    if "target_latency" in explicit and "energy" in explicit:
        raise CLIError("--target-latency steers the projections' energy itself: drop --energy")
    config.check_preset(preset)
    if resume is None:
        cfg = config.resolve_config(explicit, preset)
        init = setup.read_initial_weights(cfg.init) if cfg.init is not None else None
        return cfg, None, init, None
    path = resume or os.path.join(explicit.get("out", config.DEFAULTS["out"]), train_mod.CHECKPOINT)
    saved = ckpt.load_checkpoint(path)
    target = os.path.join(explicit["out"], train_mod.CHECKPOINT) if "out" in explicit else path
    if os.path.lexists(target) and not _same_file(target, path):
        raise CLIError(f"{target} exists: resuming {path} into {explicit['out']} would replace it; choose "
                       "another --out")
    given = {**config.PRESETS.get(preset, {}), **explicit}
    config.check_resume(saved["config"], {k: v for k, v in given.items() if k not in config.RESUME_CHANGEABLE},
                        f"--resume {path}")
    values = dict(saved["config"])
    values.update({k: v for k, v in explicit.items() if k in config.RESUME_CHANGEABLE})
    if "out" not in explicit:  # the run continues where its checkpoint lies
        values["out"] = os.path.dirname(os.path.abspath(path))
    return config.TrainConfig.from_dict(values), saved, None, path


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_fresh(out, force):
    existing = os.path.join(out, train_mod.CHECKPOINT)
    if os.path.lexists(existing) and not force:
        raise CLIError(f"{existing} exists: --resume to continue that run, --force to start over, or "
                       "another --out")


def _check_run_files(out, report):
    """Every file the run will write into `out` may be written (absent or a regular file: not a
    directory, a link, a FIFO), checked before any work rather than after an epoch."""
    for name in train_mod.RUN_FILES if report else (train_mod.CHECKPOINT,):
        storage.check_output_file(os.path.join(out, name))


def _interrupt_note(ckpt_path, since_ns, resumed):
    """What an interrupted `--nproc` run leaves (its workers' state is gone): the checkpoint this run wrote
    (written after since_ns), else the one it resumed from, else none."""
    try:
        written = os.stat(ckpt_path).st_mtime_ns >= since_ns
    except OSError:
        written = False
    if written:
        return f"the last good checkpoint ({ckpt_path}) is untouched; continue with --resume"
    if resumed is not None:
        return f"no checkpoint was written; {resumed} is untouched; continue with --resume"
    return "no checkpoint was written"


def cmd_train(ns):
    """One process, or --nproc N local workers (DDP), or one worker of a torchrun job (RANK, WORLD_SIZE,
    LOCAL_RANK in the environment)."""
    start = time.perf_counter()
    world = distributed.torchrun_world()
    if world is not None:
        if "nproc" in ns and ns.nproc != world.world_size:
            raise CLIError(f"--nproc {ns.nproc} under torchrun, which started {world.world_size} processes: "
                           "drop --nproc")
        return _train_worker(world, "env://", ns, start)
    since = time.time_ns()
    cfg, saved, init, resumed = _train_config(ns)
    if cfg.nproc == 1:
        return _train(ns, cfg, saved, init, start, resumed)
    # everything a worker would refuse is refused here, before they start
    distributed.check_nproc(cfg.nproc, config.resolve_device(cfg.device),
                            "" if "nproc" in ns or resumed is None else f" (from the checkpoint {resumed})")
    runlock.check_free(cfg.out)
    if saved is None:
        _check_fresh(cfg.out, ns.force)
    _check_run_files(cfg.out, not ns.no_report)
    distributed.worker_device(config.resolve_device(cfg.device), cfg.nproc - 1, cfg.nproc)
    if cfg.batch_size % cfg.nproc:
        raise CLIError(f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple of "
                       f"--nproc {cfg.nproc}")
    del saved, init
    try:
        distributed.spawn(_train_worker, cfg.nproc, ns, start, workdir=cfg.out)
    except KeyboardInterrupt:
        raise Interrupted(_interrupt_note(os.path.join(os.path.abspath(cfg.out), train_mod.CHECKPOINT), since,
                                          resumed)) from None
    return 0


def _train_worker(world, init_method, ns, start):
    """A DDP worker of `trp train`: joins the process group, trains its share; rank 0 logs and writes."""
    os.environ["LOCAL_RANK"] = str(world.local_rank)
    cfg, saved, init, resumed = _train_config(ns)
    cfg = config.TrainConfig.from_dict({**cfg.to_dict(), "nproc": world.world_size})
    device = distributed.worker_device(config.resolve_device(cfg.device), world.local_rank, world.world_size)
    if "threads" not in ns and device.type == "cpu":  # the cores shared out, not oversubscribed
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
    with distributed.process_group(world, device, init_method):
        return _train(ns, cfg, saved, init, start, resumed, rank=world.rank)


def _train(ns, cfg, saved, init, start, resumed=None, rank=0):
    if rank == 0:
        runlock.check_free(cfg.out)  # a directory another `trp train` is using fails now, not after loading
        if saved is None:
            _check_fresh(cfg.out, ns.force)
        _check_run_files(cfg.out, not ns.no_report)
    if "threads" in ns:
        torch.set_num_threads(ns.threads)
    log = _log if rank == 0 else (lambda msg: None)
    run = train_mod.Run(cfg, resume=saved, log=log, progress=rank == 0 and not ns.no_progress, init_state=init,
                        resume_path=resumed)
    # held through the report; Run.fit takes it again; other ranks write nothing
    with runlock.locked(run.out) if rank == 0 else contextlib.nullcontext():
        if saved is None and rank == 0:
            _check_fresh(cfg.out, ns.force)  # again under the lock: a run may have started meanwhile
        try:
            run.fit()
        except KeyboardInterrupt:
            raise Interrupted(run.checkpoint_note(hint=True)) from None
        if ns.no_report or rank != 0:
            return 0
        try:
            runtime = (setup.latency_runtime(cfg.runtime, cfg.latency_batch_size, run.out)
                       if cfg.target_latency is not None else None)
            train_mod.final_report(run.model, run.bundle, run.report_loader, run.device, cfg.scheme,
                                   **train_mod.decompose_criterion(cfg.energy, cfg.threshold, cfg.target_speedup,
                                                                   cfg.target_latency, runtime),
                                   out=run.out, log=_log)
        except KeyboardInterrupt:
            raise Interrupted(f"training finished: {run.ckpt_path} is kept; `trp report {run.ckpt_path}` writes "
                              "the report") from None
    _log(f"total time {time.perf_counter() - start:.0f} s")
    return 0


def _checkpoint_model(path, device="cpu"):
    saved = ckpt.load_checkpoint(path)
    return saved, train_mod.model_from_checkpoint(saved, device, path)


def _check_deploy_args(ns):
    """The explicitly given scheme and criterion, checked before the checkpoint is read."""
    if ns.scheme is not None:
        check_scheme(ns.scheme)
    if ns.energy is not None:
        check_energy(ns.energy, "--energy")
    if ns.threshold is not None:
        check_threshold(ns.threshold, "--threshold")
    if ns.target_speedup is not None:
        check_target_speedup(ns.target_speedup, "--target-speedup")


def _deploy_args(ns, cfg):
    scheme = ns.scheme or cfg["scheme"]
    if ns.energy is not None or ns.threshold is not None or ns.target_speedup is not None:
        return scheme, train_mod.decompose_criterion(ns.energy, ns.threshold, ns.target_speedup)
    runtime = None
    if cfg.get("target_latency") is not None:  # measured again here: the run's timings may be of another machine
        runtime = Runtime(cfg.get("runtime", "eager"), batch_size=cfg.get("latency_batch_size", 1))
    return scheme, train_mod.decompose_criterion(cfg["energy"], cfg.get("threshold"), cfg.get("target_speedup"),
                                                 cfg.get("target_latency"), runtime)


def cmd_decompose(ns):
    _check_deploy_args(ns)
    storage.check_output_file(ns.out)
    out_dir = os.path.dirname(os.path.abspath(ns.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"directory {out_dir} does not exist")
    runtime = None
    if ns.target_latency is not None:
        checks.real(ns.target_latency, "--target-latency", 1.0, low_open=True)
        if ns.latency_cache is not None:
            storage.check_output_file(ns.latency_cache)
        runtime = Runtime(ns.runtime, batch_size=ns.latency_batch_size, threads=ns.latency_threads,
                          cache=ns.latency_cache)
    saved, model = _checkpoint_model(ns.checkpoint)
    size = (1, saved["arch"].get("in_channels", 3), *(2 * [_image_size(saved["config"])]))
    if runtime is None:
        scheme, crit = _deploy_args(ns, saved["config"])
        compact = decompose_mod.decompose(model, scheme, **crit, input_size=size)
    else:
        scheme, crit = ns.scheme or saved["config"]["scheme"], {"target_latency": ns.target_latency}
        compact = decompose_mod.decompose(model, scheme, **crit, input_size=size, runtime=runtime)
        rec = compact.trp_latency_budget
        _log(f"latency on {ns.runtime} at batch {ns.latency_batch_size}: target {rec['target']:g}x, measured "
             f"{rec['measured']:.2f}x ({'met' if rec['met'] else 'NOT met'}) after {len(rec['attempts'])} "
             f"allocation(s)")
    compact = _deploy_fit(ns, compact, model, size[1:])
    io.save(compact, ns.out)
    wide = bool(block_names(model))  # a transformer: count its Linear layers and attention too
    md, mc = (count_macs(m, size, linear=wide, attention=wide) for m in (model, compact))
    _log(f"wrote {ns.out}: {scheme} scheme, {', '.join(f'{k} {v}' for k, v in crit.items())}; "
         f"{'conv + linear + attention' if wide else 'conv'} MACs "
         f"{md / 1e6:.2f}M -> {mc / 1e6:.2f}M (speed-up {md / mc:.2f}x), params "
         f"{count_params(model) / 1e6:.3f}M -> {count_params(compact) / 1e6:.3f}M")
    return 0


def _image_size(cfg):
    if cfg.get("image_size"):
        return cfg["image_size"]
    kind, _ = data_mod.parse_spec(cfg["data"])
    return {"digits": 16, "cifar10": 32}.get(kind, 224)


def cmd_eval(ns):
    device = config.resolve_device(ns.device)
    kind, obj = ckpt.read_run_file(ns.model_file)
    if kind == "checkpoint":
        saved = obj
        model = train_mod.model_from_checkpoint(saved, device, ns.model_file)
        cfg = saved["config"]
        spec, size, subset, kind = ns.data or cfg["data"], ns.image_size or cfg.get("image_size"), \
            ns.subset or cfg.get("subset"), "dense checkpoint"
        seed = cfg.get("seed", 0)
    elif kind == "model":
        model = io.from_payload(obj, ns.model_file).to(device)
        spec, size, subset, kind, seed = ns.data or "digits", ns.image_size, ns.subset, "model file", 0
    else:
        raise CLIError(f"{ns.model_file} is neither a `trp train` checkpoint nor a trp model file (trp.save)")
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
    device = config.resolve_device(ns.device)
    _check_deploy_args(ns)
    if ns.rank_multiple is not None and ns.fit_latency is None:
        raise CLIError("--rank-multiple in `trp report` applies to the latency fit: add --fit-latency")
    if ns.out is not None:
        config.check_out_dir(ns.out)
    out = ns.out or os.path.dirname(os.path.abspath(ns.checkpoint))
    for name in train_mod.REPORT_FILES + ((LATENCY_FIT,) if ns.fit_latency is not None else ()):
        storage.check_output_file(os.path.join(out, name))  # before any work, not after the report
    saved, model = _checkpoint_model(ns.checkpoint, device)
    cfg = saved["config"]
    scheme, crit = _deploy_args(ns, cfg)
    bundle = data_mod.load(cfg["data"], cfg.get("image_size"), cfg.get("subset"), seed=cfg.get("seed", 0))
    _, test_loader = data_mod.make_loaders(bundle, cfg.get("batch_size", 128), cfg.get("seed", 0))
    _log(f"{ns.checkpoint}: {saved['arch'].get('name')} after {saved['epoch']} epochs on {bundle.name}")
    train_mod.final_report(model, bundle, test_loader, device, scheme, **crit, out=out, log=_log)
    if ns.fit_latency is not None:
        dense = train_mod.cpu_copy(model)
        size = tuple(bundle.input_size)[-3:]
        fit = _deploy_fit(ns, decompose_mod.decompose(dense, scheme, **crit, input_size=size), dense, size, report=True)
        path = os.path.join(out, LATENCY_FIT)
        text = json.dumps(fit.to_dict(), indent=1)
        storage.atomic_write(path, lambda f: f.write(text.encode()))
        _log(f"wrote {path}")
    return 0


def _deploy_fit(ns, compact, dense, input_size, report=False):
    """--rank-multiple and --fit-latency applied to a decomposed model: the model to deploy, or with
    report=True the LatencyFit (None without --fit-latency)."""
    if ns.fit_latency is None:
        if ns.rank_multiple is not None:
            compact = deploy.round_ranks(compact, ns.rank_multiple, dense)
        return None if report else compact
    fitted, fit = deploy.fit_latency(compact.cpu(), tuple(input_size)[-3:], ns.fit_latency,  # (C, H, W)
                                     batch_size=ns.fit_batch_size, threads=ns.fit_threads,
                                     multiple=ns.rank_multiple, dense=dense.cpu())
    _log(str(fit))
    return fit if report else fitted


def cmd_export(ns):
    _check_deploy_args(ns)
    export.check_opset(ns.opset, ns.exporter)
    storage.check_output_file(ns.out)
    kind, obj = ckpt.read_run_file(ns.model_file)
    if kind == "checkpoint":
        saved = obj
        dense = train_mod.model_from_checkpoint(saved, "cpu", ns.model_file)
        scheme, crit = _deploy_args(ns, saved["config"])
        size = ns.image_size or _image_size(saved["config"])
        chw = (saved["arch"].get("in_channels", 3), size, size)
        model = decompose_mod.decompose(dense, scheme, **crit, input_size=chw)
    elif kind == "model":
        if ns.scheme is not None or ns.energy is not None or ns.threshold is not None \
                or ns.target_speedup is not None:
            raise CLIError("--scheme / --energy / --threshold / --target-speedup decompose a checkpoint; "
                           f"{ns.model_file} is already a model file")
        model = io.from_payload(obj, ns.model_file)
        dense = merge_back(model) if factorized_layers(model) else model
        arch = getattr(model, "trp_arch", {}) or {}
        size = ns.image_size or (32 if str(arch.get("name", "")).startswith("resnet") else 224)
    else:
        raise CLIError(f"{ns.model_file} is neither a `trp train` checkpoint nor a trp model file (trp.save)")
    channels = (getattr(model, "trp_arch", {}) or {}).get("in_channels", 3)
    shape = (ns.batch_size, channels, size, size)
    try:
        info = export.export_onnx(model, ns.out, shape, dynamic_batch=not ns.static_batch, exporter=ns.exporter,
                                  opset=ns.opset)
    except RuntimeError as exc:  # torch.onnx's errors: an operator without an ONNX form, a failed trace
        raise CLIError(f"{ns.model_file} does not export to ONNX with the {ns.exporter} exporter: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    errors = ", ".join(f"batch {n}: {e:.1e}" for n, e in info["errors"].items())
    _log(f"wrote {ns.out} ({info['bytes'] / 1e6:.2f} MB, {ns.exporter} exporter, "
         f"{'static' if ns.static_batch else 'dynamic'} batch, input {'x'.join(map(str, shape))}); "
         f"onnxruntime matches eager (max rel. error {errors})")
    t_dense, t_model = export.compare_ort(dense, model, shape, threads=ns.threads)
    _log(f"onnxruntime CPU latency (batch {ns.batch_size}, {ns.threads or 'all'} threads, median): dense "
         f"{t_dense * 1e3:.2f} ms, this model {t_model * 1e3:.2f} ms ({t_dense / t_model:.2f}x)")
    return 0


COMMANDS = {"train": cmd_train, "decompose": cmd_decompose, "eval": cmd_eval, "report": cmd_report,
            "export": cmd_export}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (in the main thread, where signals are handled):
    writes in progress are cleaned up and the command ends with `trp: interrupted`."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    with _sigterm_interrupts():
        try:
            ns = build_parser().parse_args(argv)
            return COMMANDS[ns.command](ns)
        except Interrupted as exc:
            print(f"trp: interrupted ({exc})", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print("trp: interrupted", file=sys.stderr)
            return 130
        except (CLIError, ValueError, OSError, ImportError, train_mod.TrainError, distributed.WorkerError) as exc:
            msg = " ".join(str(exc).split()) or type(exc).__name__
            print(f"trp: error: {msg}", file=sys.stderr)
            return 2

