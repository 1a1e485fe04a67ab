"""Callbacks that run Trained Rank Pruning where users train: a Hugging Face `transformers.Trainer`
(TRPTrainerCallback, trp.integrations.huggingface) and Lightning (TRPLightningCallback,
trp.integrations.lightning). Each drives a trp.RankPruner once per optimizer step, saves its state with the
framework's checkpoints and restores it on resume, and can decompose the model at the end.

The frameworks are optional (the `huggingface` and `lightning` extras): `import trp` imports neither, and
each callback's module imports its framework when the callback is first asked for."""
import importlib

# callback name -> (module that defines it, the distribution that module needs)
_CALLBACKS = {"TRPTrainerCallback": ("huggingface", "transformers"),
              "TRPLightningCallback": ("lightning", "lightning")}


def __getattr__(name):
    """trp.integrations.TRPTrainerCallback / TRPLightningCallback, imported on first use (PEP 562): the
    framework is loaded only by who uses its callback."""
    if name not in _CALLBACKS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, needs = _CALLBACKS[name]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != needs:
            raise
        raise ImportError(f"trp.integrations.{name} needs {needs}: pip install 'trp[{module}]'") from None


def __dir__():
    return sorted([*globals(), *_CALLBACKS])


__all__ = list(_CALLBACKS)
