"""TRPLightningCallback: Trained Rank Pruning inside a Lightning (`lightning.pytorch.Trainer`) run.

    trainer = L.Trainer(max_epochs=10, accumulate_grad_batches=2, callbacks=[
        TRPLightningCallback(energy=0.9, nuclear=3e-4, layers=nn.Linear, decompose_at_end="ranks")])
    trainer.fit(module)                              # or trainer.fit(module, ckpt_path="last")

Where each pruner call sits in Lightning's loop (automatic optimization; one optimizer step over
accumulate_grad_batches micro-batches):

    on_train_batch_start      -> pruner.step()        the first micro-batch of an optimizer step only
    (training_step + backward of each micro-batch)
    precision plugin unscales (16-mixed)
    on_before_optimizer_step  -> pruner.regularize()  gradients accumulated and unscaled
    gradient clipping (gradient_clip_val), optimizer.step()
    state_dict / load_state_dict: the pruner state inside Lightning's checkpoints

The nuclear-norm term is added before Lightning clips the gradients (no callback hook comes between the
clipping and optimizer.step()): with gradient_clip_val it is clipped together with the loss gradient."""

from lightning.pytorch import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.trainer.states import TrainerFn

from .common import StepDriver, decomposed_path

OWNER = "TRPLightningCallback"


def check_trainer(trainer, pl_module):
    """Refuses the Lightning setups where the callback's hooks would not see what the pruner needs.

    Args:
        trainer: the lightning.pytorch.Trainer.
        pl_module: the LightningModule it fits.

    Raises:
        ValueError: manual optimization (the module steps its optimizers itself: no fixed optimizer step to
            hook), or 16-mixed precision with a fused optimizer (it unscales inside its own step(), after
            on_before_optimizer_step: regularize() would add to scaled gradients).
    """
    if not pl_module.automatic_optimization:
        raise ValueError(f"{OWNER}: manual optimization is not supported; call pruner.step() and "
                         "pruner.regularize() in your training_step instead")
    precision = trainer.precision_plugin
    if isinstance(precision, MixedPrecision) and precision.scaler is not None:
        fused = [type(o).__name__ for o in trainer.optimizers if getattr(o, "defaults", {}).get("fused")]
        if fused:
            raise ValueError(f"{OWNER}: a fused optimizer ({fused[0]}) unscales 16-mixed gradients inside its "
                             "step(), after the hook that adds the nuclear-norm term; use fused=False")


class TRPLightningCallback(Callback):
    """Drives a trp.RankPruner from a Lightning Trainer: projection once per optimizer step, the
    nuclear-norm term on the accumulated, unscaled gradients, the pruner state in Lightning's checkpoints
    (and back on resume), and optionally the decomposed model at the end.

    The pruner works on the LightningModule itself: layer names are its module names ("net.0" for a
    module that holds its network as self.net).

    Args:
        pruner: a trp.RankPruner built on the LightningModule, or None to build one from `options` when
            fitting starts (after Lightning has moved the module to its device).
        decompose_at_end: None (default); "ranks": at the end of training project once more and decompose
            exactly at the pruner's ranks; or a dict with one trp.decompose criterion ({"threshold": 0.05},
            {"energy": 0.9}, {"rank": 8}) applied to the final weights. The compact module is kept as
            `.compact` and written with trp.save to `decomposed_path` by the global-zero process.
        decomposed_path: file for the compact model (default: decomposed.pt in trainer.default_root_dir).
        **options: RankPruner options (scheme=, energy=, period=, nuclear=, layers=, exclude=,
            nuclear_every=, max_rank=, ...); `period` counts optimizer steps.

    Raises:
        TypeError: when an option is not a RankPruner option.
        ValueError: when both a pruner and options are given, or decompose_at_end is bad.
    """

    def __init__(self, pruner=None, *, decompose_at_end=None, decomposed_path=None, **options):
        self.driver = StepDriver(OWNER, pruner, options, decompose_at_end)
        self.decomposed_path = decomposed_path
        self._loaded = None  # a checkpoint's pruner state restored before the pruner exists

    @property
    def pruner(self):
        """The RankPruner (None before fitting starts when the callback builds it)."""
        return self.driver.pruner

    @property
    def compact(self):
        """The decomposed model after training (decompose_at_end), else None."""
        return self.driver.compact

    def on_fit_start(self, trainer, pl_module):
        """Builds (or checks) the pruner: after the strategy's setup, so the module is on its device and the
        optimizers exist; a checkpoint's pruner state restored before this point is applied now.

        Args:
            trainer: the lightning.pytorch.Trainer.
            pl_module: the LightningModule it fits.

        Raises:
            ValueError: when the Trainer setup is not supported (check_trainer) or the pruner does not fit.
        """
        check_trainer(trainer, pl_module)
        self.driver.attach(pl_module)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            self.driver.load_pruner_state(state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Called per micro-batch; step() runs on the first micro-batch of each optimizer step only, so that
        `period` counts optimizer steps whatever accumulate_grad_batches is.

        Args:
            trainer: the lightning.pytorch.Trainer.
            pl_module: the LightningModule it fits.
            batch: the micro-batch (not used).
            batch_idx: its index in the epoch, an int (not used).
        """
        self.driver.begin_step()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        """Once the gradients of all micro-batches are accumulated and, under 16-mixed, unscaled, before
        clipping and optimizer.step(): regularize(), once per optimizer step.

        Args:
            trainer: the lightning.pytorch.Trainer.
            pl_module: the LightningModule it fits.
            optimizer: the optimizer about to step (not used).
        """
        self.driver.before_optimizer_step()

    def state_dict(self):
        """{"pruner": RankPruner.state_dict()} for Lightning's checkpoints (empty before fitting)."""
        return {} if self.driver.pruner is None else {"pruner": self.driver.pruner.state_dict()}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        """Resuming a fit from a checkpoint without this callback's state would silently restart the pruner
        (Lightning then never calls load_state_dict): refused.

        Args:
            trainer: the lightning.pytorch.Trainer.
            pl_module: the LightningModule it fits.
            checkpoint: the checkpoint dict being loaded.

        Raises:
            ValueError: when the checkpoint holds no state of this callback.
        """
        if trainer.state.fn == TrainerFn.FITTING and self.state_key not in (checkpoint.get("callbacks") or {}):
            raise ValueError(f"{OWNER}: the checkpoint has no pruner state (saved without TRPLightningCallback); "
                             "resuming would restart the pruner")

    def load_state_dict(self, state_dict):
        """Restores the pruner state of a checkpoint: now if the pruner exists (strategies that restore after
        setup), else at on_fit_start.

        Args:
            state_dict: what state_dict() returned, {"pruner": RankPruner.state_dict()}.
        """
        state = state_dict.get("pruner")
        if self.driver.pruner is None:
            self._loaded = state
        else:
            self.driver.load_pruner_state(state)

    def on_train_end(self, trainer, pl_module):
        """decompose_at_end: decomposes the final module (every process; global zero writes it).

        Args:
            trainer: the lightning.pytorch.Trainer.
            pl_module: the LightningModule it fits.
        """
        path = decomposed_path(trainer.default_root_dir, self.decomposed_path) if trainer.is_global_zero else None
        self.driver.finish(pl_module, path)


__all__ = ["TRPLightningCallback", "check_trainer"]
