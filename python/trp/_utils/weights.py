"""Loading a state dict into a module: keys and shapes compared first, so that a mismatch is one clear error
raised before anything is written."""
import torch


def mismatch(model, state, limit=5):
    """None when `state` has exactly the keys and shapes of model.state_dict(), else what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: shape {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    for label, items in (("missing keys ", missing), ("unexpected keys ", unexpected), ("", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(label + ", ".join(items[:limit]) + more)
    return "; ".join(parts) or None


def load_weights(model, state, what, error=ValueError, assign=False):
    """model.load_state_dict(state) once keys and shapes are known to match; otherwise, or when a module's
    own checks refuse the state, raises error(f"{what}: <what differs>") - a mismatch before any write."""
    problem = mismatch(model, state)
    if problem is None:
        try:
            model.load_state_dict(state, assign=assign)
            return model
        except (RuntimeError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise error(f"{what}: {problem}")


__all__ = ["mismatch", "load_weights"]
