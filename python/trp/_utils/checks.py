"""Number rules shared by the API (RankPruner, rank criteria) and the `trp train` options, so that each rule
and its wording live in one place, and the one model rule every entry point shares (materialized).
(trp_kernels keeps the op's own energy / max_rank rules: it cannot import trp; trp reuses those.)"""
import math


def _bound(x):
    if isinstance(x, int) and x > 2 ** 16 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}"


def _bounds(low, high, low_open, high_open):
    if high == math.inf:
        return f"{'>' if low_open else '>='} {_bound(low)}"
    return f"in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"


def real(value, name, low=-math.inf, high=math.inf, low_open=False, high_open=False, what=""):
    """float(value) if it is a finite number (not a bool) within the bounds, else ValueError naming `name`;
    `what` says what the value means."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{name} must be a finite number {_bounds(low, high, low_open, high_open)}{what}, "
                         f"got {value!r}")
    return float(value)


def integer(value, name, low, high=math.inf, what=""):
    """`value` if it is an int (not a bool) in [low, high), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise ValueError(f"{name} must be an int {_bounds(low, high, False, True)}{what}, got {value!r}")
    return value


def choice(value, valid, name, unknown=False):
    """`value` if it is one of `valid`, else ValueError: "NAME must be one of a, b, got 'x'", or with
    unknown=True "unknown NAME 'x'; valid choices: 'a', 'b'"."""
    if value not in valid:
        if unknown:
            raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(repr, valid))}")
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")
    return value


def materialized(model, what):
    """Checks that no parameter or buffer of `model` is on the meta device (a model built without data,
    e.g. under torch.device("meta")): nothing can be computed from it or saved.

    Args:
        model: an nn.Module.
        what: the entry point, for the message.

    Returns:
        model.

    Raises:
        ValueError: naming the first parameter or buffer on the meta device.
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ValueError(f"{what}: the model's {kind} {name!r} is on the meta device (it holds no data): "
                                 "materialize the model first (e.g. model.to_empty(device='cpu') and load its "
                                 "weights)")
    return model


__all__ = ["real", "integer", "materialized"]
