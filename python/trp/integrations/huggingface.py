"""TRPTrainerCallback: Trained Rank Pruning inside a Hugging Face `transformers.Trainer` run.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[
        TRPTrainerCallback(energy=0.9, nuclear=3e-4, decompose_at_end="ranks")])  # the blocks' Linears
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

Where each pruner call sits in the Trainer's loop (transformers >= 4.45; one optimizer step, with
gradient_accumulation_steps micro-batches):

    on_step_begin          -> pruner.step()        before the first micro-batch's forward pass
    (forward + backward of each micro-batch; on_substep_end between them)
    clip_grad_norm_        (accelerate unscales fp16 gradients here, then clips)
    on_pre_optimizer_step  -> pruner.regularize()  summed gradients, unscaled and clipped
    optimizer.step()
    on_save                -> the pruner state into the checkpoint folder

The nuclear-norm term is thus added after gradient clipping: it is not clipped, so `nuclear` keeps its
meaning whatever max_grad_norm is (Lightning's hook, by contrast, comes before its clipping)."""
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .common import StepDriver, decomposed_path

OWNER = "TRPTrainerCallback"


def state_file(args):
    """The pruner state's file name inside a checkpoint folder: one per process when several train (each
    keeps its own share of the warm-start bases), as the Trainer does with its RNG states.

    Args:
        args: the Trainer's TrainingArguments (world_size and process_index are read).

    Returns:
        The file name, a str.
    """
    return "trp_pruner.pt" if args.world_size <= 1 else f"trp_pruner_{args.process_index}.pt"


def check_training_args(args, state):
    """Refuses the Trainer setups where the callback's hooks would not see what the pruner needs.

    Args:
        args: the Trainer's TrainingArguments.
        state: its TrainerState.

    Raises:
        ValueError: DeepSpeed or FSDP (sharded weights and gradients), a hyperparameter search (a model per
            trial), fp16 without gradient clipping (the Trainer unscales fp16 gradients when it clips them:
            without clipping regularize() would add to scaled gradients).
    """
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(f"{OWNER}: DeepSpeed and FSDP are not supported (the pruner needs whole weights and "
                         "gradients on every process)")
    if state.is_hyper_param_search:
        raise ValueError(f"{OWNER}: hyperparameter search is not supported (the callback holds one pruner for "
                         "one model)")
    if getattr(args, "fp16", False) and not (args.max_grad_norm or 0) > 0:
        raise ValueError(f"{OWNER}: fp16 training needs max_grad_norm > 0: the Trainer unscales the gradients "
                         "when it clips them, and the nuclear-norm term must go to unscaled gradients")


class TRPTrainerCallback(TrainerCallback):
    """Drives a trp.RankPruner from a transformers.Trainer: projection once per optimizer step, the
    nuclear-norm term on the accumulated gradients, the pruner state in every checkpoint (and back on
    resume), and optionally the decomposed model at the end.

    Args:
        pruner: a trp.RankPruner built on the model given to the Trainer, or None to build one from
            `options` when training begins.
        decompose_at_end: None (default); "ranks": at the end of training project once more and decompose
            exactly at the pruner's ranks (the compact model computes what the projected model does); or a
            dict with one trp.decompose criterion ({"threshold": 0.05}, {"energy": 0.9}, {"rank": 8}) applied
            to the final weights. The compact model is kept as `.compact` and written with trp.save to
            `decomposed_path` by the process that saves.
        decomposed_path: file for the compact model (default: decomposed.pt in args.output_dir).
        **options: RankPruner options (scheme=, energy=, period=, nuclear=, layers=, exclude=,
            nuclear_every=, max_rank=, ...); `period` counts optimizer steps.

    Raises:
        TypeError: when an option is not a RankPruner option.
        ValueError: when both a pruner and options are given, or decompose_at_end is bad.
    """

    def __init__(self, pruner=None, *, decompose_at_end=None, decomposed_path=None, **options):
        self.driver = StepDriver(OWNER, pruner, options, decompose_at_end)
        self.decomposed_path = decomposed_path

    @property
    def pruner(self):
        """The RankPruner (None before training begins when the callback builds it)."""
        return self.driver.pruner

    @property
    def compact(self):
        """The decomposed model after training (decompose_at_end), else None."""
        return self.driver.compact

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Builds (or checks) the pruner on the Trainer's model, now on its device. On a resumed run (the
        Trainer has loaded the checkpoint's weights and state, global_step > 0) the pruner state saved in
        that checkpoint is restored: a resumed run continues exactly.

        Args:
            args: the Trainer's TrainingArguments.
            state: the Trainer's TrainerState (global_step: the optimizer steps done).
            control: the Trainer's TrainerControl (not used).
            model: the model being trained.
            **kwargs: the Trainer's other callback arguments (not used).

        Raises:
            ValueError: when the Trainer setup is not supported, or the checkpoint has no usable pruner state.
        """
        check_training_args(args, state)
        self.driver.attach(model)
        if state.global_step > 0:
            self._restore(args, state)

    def _restore(self, args, state):
        # The Trainer tells callbacks the resumed step, not the folder: its own checkpoints of this output
        # dir are named by step. The weight digest in the file catches a checkpoint of another run there.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, state_file(args))
        if not os.path.isdir(folder):
            raise ValueError(f"{OWNER}: the run resumes at step {state.global_step}, but {folder} does not "
                             "exist: resume from a checkpoint of args.output_dir, where the pruner state is")
        if not os.path.exists(path):
            raise ValueError(f"{OWNER}: {folder} has no pruner state ({state_file(args)}): it was saved "
                             "without TRPTrainerCallback; resuming would restart the pruner")
        self.driver.load_state(path, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        """Called once per optimizer step, before the forward pass of its first micro-batch: step().

        Args:
            args: the Trainer's TrainingArguments.
            state: the Trainer's TrainerState (global_step: the optimizer steps done).
            control: the Trainer's TrainerControl (not used).
            **kwargs: the Trainer's other callback arguments (not used).
        """
        self.driver.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After the last micro-batch's backward, the unscaling and the clipping, right before
        optimizer.step(): regularize(), once per optimizer step.

        Args:
            args: the Trainer's TrainingArguments.
            state: the Trainer's TrainerState (global_step: the optimizer steps done).
            control: the Trainer's TrainerControl (not used).
            **kwargs: the Trainer's other callback arguments (not used).
        """
        self.driver.before_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        """After the Trainer wrote checkpoint-<global_step>: the pruner state into that folder (every
        process its own file), written atomically.

        Args:
            args: the Trainer's TrainingArguments.
            state: the Trainer's TrainerState (global_step: the optimizer steps done).
            control: the Trainer's TrainerControl (not used).
            **kwargs: the Trainer's other callback arguments (not used).
        """
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.driver.save_state(os.path.join(folder, state_file(args)), state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """decompose_at_end: decomposes the final model (every process; the one that saves writes it).

        Args:
            args: the Trainer's TrainingArguments.
            state: the Trainer's TrainerState (global_step: the optimizer steps done).
            control: the Trainer's TrainerControl (not used).
            model: the trained model.
            **kwargs: the Trainer's other callback arguments (not used).
        """
        path = decomposed_path(args.output_dir, self.decomposed_path) if args.should_save else None
        self.driver.finish(model, path)


__all__ = ["TRPTrainerCallback", "check_training_args", "state_file"]
