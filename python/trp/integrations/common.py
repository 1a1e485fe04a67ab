"""What the training-framework callbacks share, free of any framework: driving a RankPruner once per
optimizer step, the sealed pruner-state file, and the decomposition at the end of training.

A framework calls its hooks per micro-batch (gradient accumulation) and per optimizer step; the pruner must
see optimizer steps only: step() before the forward pass of the first micro-batch of each optimizer step
(so that `period` counts optimizer steps), regularize() once the gradients of all micro-batches are summed
and unscaled, right before optimizer.step(). StepDriver keeps that pairing whatever the hooks' schedule."""
import inspect
import os

from trp._utils.integrity import SEAL, digest, digest_tree, seal_problem, unsealed
from trp._utils.storage import atomic_save, read_torch
from trp.core.rank import check_criterion
from trp.core.selection import check_module
from trp.deploy import io
from trp.deploy.decompose import decompose
from trp.prune.pruner import RankPruner

STATE_FORMAT = "trp.pruner-state"
STATE_VERSION = 1
DECOMPOSED_FILE = "decomposed.pt"  # the compact model written at the end of training (trp.save)
AT_PRUNER_RANKS = "ranks"          # decompose_at_end= value: a final projection, then the pruner's ranks


def check_decompose_at_end(spec):
    """None, AT_PRUNER_RANKS, or {criterion: value} with exactly one trp.decompose rank criterion (energy=,
    threshold= or rank=), checked now so that a typo fails before training rather than after it.

    Args:
        spec: the callback's decompose_at_end= argument.

    Returns:
        None, AT_PRUNER_RANKS, or a one-item dict {kind: checked value}.

    Raises:
        ValueError: anything else.
    """
    if spec is None or spec == AT_PRUNER_RANKS:
        return spec
    if not isinstance(spec, dict) or not set(spec) <= {"energy", "threshold", "rank"}:
        raise ValueError(f"decompose_at_end must be None, {AT_PRUNER_RANKS!r} (decompose exactly at the pruner's "
                         f"ranks) or a dict with one of energy=, threshold=, rank=, got {spec!r}")
    kind, value = check_criterion(**spec)
    return {kind: value}


def check_pruner_options(options):
    """Raises TypeError naming an option that RankPruner(model, ...) does not take (before training).

    Args:
        options: the keyword arguments meant for RankPruner, a dict.

    Raises:
        TypeError: when an option is not a RankPruner parameter.
    """
    try:
        inspect.signature(RankPruner).bind(None, **options)
    except TypeError as exc:
        raise TypeError(f"not a RankPruner option: {exc}") from None


def weights_digest(pruner):
    """SHA-256 of the weights the pruner works on: ties a saved pruner state to the weights saved with it.

    Args:
        pruner: the RankPruner.

    Returns:
        The hex digest, a str.
    """
    return digest(STATE_FORMAT, {t.name: t.read() for t in pruner.targets})


class StepDriver:
    """One RankPruner driven from a framework's hooks (see the module doc).

    Args:
        owner: the callback's name, which starts every error message.
        pruner: a RankPruner built by the user for the trained model, or None to build one at attach().
        options: RankPruner keyword arguments (scheme=, energy=, period=, nuclear=, layers=, ...) for the
            pruner built at attach(); empty when `pruner` is given.
        decompose_at_end: see check_decompose_at_end.

    Raises:
        ValueError: when both a pruner and options are given, or decompose_at_end is bad.
        TypeError: when the pruner is not a RankPruner, or an option is not a RankPruner option.
    """

    def __init__(self, owner, pruner=None, options=None, decompose_at_end=None):
        options = dict(options or {})
        if pruner is not None:
            if not isinstance(pruner, RankPruner):
                raise TypeError(f"{owner}: pruner must be a trp.RankPruner, got {type(pruner).__name__}")
            if options:
                raise ValueError(f"{owner}: give a pruner or RankPruner options ({', '.join(sorted(options))}), "
                                 "not both")
        try:
            check_pruner_options(options)
            self.decompose_at_end = check_decompose_at_end(decompose_at_end)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{owner}: {exc}") from None
        self.owner, self.pruner, self.options = owner, pruner, options
        self.open = False     # step() ran for the current optimizer step and regularize() has not yet
        self.compact = None   # the decomposed model, after finish()

    def attach(self, model):
        """Builds the pruner for `model` (first call, from the options), or checks that the given pruner
        works on `model`'s parameters.

        Args:
            model: the nn.Module the framework trains (unwrapped).

        Returns:
            The RankPruner.

        Raises:
            ValueError: the pruner selects no layer of `model`, or was built for another model.
        """
        check_module(model)
        if self.pruner is None:
            try:
                self.pruner = RankPruner(model, **self.options)
            except ValueError as exc:
                raise ValueError(f"{self.owner}: {exc}") from None
        else:
            own = {id(p) for p in model.parameters()}
            foreign = [t.name for t in self.pruner.targets if id(t.param) not in own]
            if foreign:
                raise ValueError(f"{self.owner}: the pruner was built for another model (the trained model has "
                                 f"no parameter of {', '.join(foreign[:3])}); build it on the model you train")
        return self.pruner

    def begin_step(self):
        """Before the first forward pass of an optimizer step: pruner.step() (projects every `period`
        optimizer steps). A second call before the optimizer step (more micro-batches) does nothing."""
        if not self.open:
            self.pruner.step()
            self.open = True

    def before_optimizer_step(self):
        """After all micro-batches' backward passes (gradients summed and unscaled), before
        optimizer.step(): pruner.regularize(), once per optimizer step.

        Raises:
            RuntimeError: an optimizer step that no training batch announced (a hook schedule this driver
                does not know: the nuclear term would be added for the wrong step), or trainable pruned
                weights of which none has a gradient (the pruner works on another model than the trained
                one).
        """
        if not self.open:
            raise RuntimeError(f"{self.owner}: an optimizer step without a training batch before it; the "
                               "callback supports one optimizer step per accumulation window (automatic "
                               "optimization)")
        trainable = [t.param for t in self.pruner.targets if t.param.requires_grad]
        if trainable and all(p.grad is None for p in trainable):
            raise RuntimeError(f"{self.owner}: none of the pruned weights has a gradient at the optimizer step: "
                               "the pruner works on another model than the one being trained")
        self.pruner.regularize()
        self.open = False

    def state_payload(self, step):
        """The pruner's state for a checkpoint at optimizer step `step`, with the digest of the weights it
        goes with, sealed by a SHA-256 of everything (plain data and tensors: weights_only-loadable).

        Args:
            step: the optimizer step of the checkpoint, an int.

        Returns:
            The sealed payload, a dict.
        """
        body = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": int(step),
                "weights_sha256": weights_digest(self.pruner), "pruner": self.pruner.state_dict()}
        return {**body, SEAL: digest_tree(body)}

    def save_state(self, path, step):
        """Writes state_payload(step) to `path` atomically (a crash leaves the old file or the new one).

        Args:
            path: the file to write.
            step: the optimizer step of the checkpoint, an int.
        """
        atomic_save(self.state_payload(step), path)

    def load_state(self, path, step):
        """Restores the pruner from the file save_state wrote, after checking that it is intact, that it was
        saved at optimizer step `step` and with the weights the model holds now.

        Args:
            path: the file save_state wrote.
            step: the optimizer step the run resumes at, an int.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a damaged or foreign file, another step, other weights, another layer selection.
        """
        obj = read_torch(path)
        body = unsealed(obj) if isinstance(obj, dict) else {}
        if body.get("format") != STATE_FORMAT or body.get("version") != STATE_VERSION:
            raise ValueError(f"{self.owner}: {path} is not a pruner state written by this trp")
        if seal_problem(obj, lambda: digest_tree(body)) is not None:
            raise ValueError(f"{self.owner}: {path}: corrupted: its contents do not match its checksum")
        if body.get("step") != step:
            raise ValueError(f"{self.owner}: {path} holds the pruner state of step {body.get('step')}, the run "
                             f"resumes at step {step}")
        if body.get("weights_sha256") != weights_digest(self.pruner):
            raise ValueError(f"{self.owner}: {path} was saved with other weights than the model resumes with "
                             "(a checkpoint of another run?)")
        self.load_pruner_state(body.get("pruner"))

    def load_pruner_state(self, state):
        """pruner.load_state_dict(state), its ValueError prefixed with the owner.

        Args:
            state: a RankPruner.state_dict().

        Raises:
            ValueError: when the state does not fit the pruner (the pruner is unchanged).
        """
        try:
            self.pruner.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{self.owner}: {exc}") from None
        self.open = False

    def finish(self, model, path=None):
        """decompose_at_end: the compact model (also kept as self.compact) written to `path` by trp.save
        when a path is given; None without decompose_at_end.

        With AT_PRUNER_RANKS the pruner projects once more (the optimizer has moved the weights since the
        last projection: `model` is left projected, the model TRP training ends with) and the layers are
        decomposed at exactly those ranks, so the compact model computes what the projected one does. A
        criterion dict decomposes the weights as they are (trp.decompose, on the pruner's layers).

        Args:
            model: the trained model (the one attach() was given).
            path: where to write the compact model, or None (e.g. on a process that does not save).
        """
        spec = self.decompose_at_end
        if spec is None:
            return None
        if spec == AT_PRUNER_RANKS:
            self.pruner.project()
            # an all-zero matrix has rank 0: one (zero) component represents it exactly
            criterion = {"rank": {n: max(int(r), 1) for n, r in self.pruner.ranks.items()}}
        else:
            criterion = spec
        self.compact = decompose(model, self.pruner.scheme, layers=self.pruner.layer_names, **criterion)
        if path is not None:
            io.save(self.compact, path)
        return self.compact


def decomposed_path(directory, path=None):
    """`path` when given, else DECOMPOSED_FILE in `directory`.

    Args:
        directory: the run's output folder.
        path: the user's file for the compact model, or None. Default None.

    Returns:
        The path, a str.
    """
    return os.fspath(path) if path is not None else os.path.join(os.fspath(directory), DECOMPOSED_FILE)


__all__ = ["StepDriver", "check_decompose_at_end", "check_pruner_options", "weights_digest", "decomposed_path",
           "STATE_FORMAT", "DECOMPOSED_FILE", "AT_PRUNER_RANKS"]
