"""Loads the compiled extension trp_kernels._C once. A missing or broken build is not an error: the ops
fall back to the reference implementation and say so once."""
import importlib
import warnings

import torch

_state = {"loaded": None, "error": None, "warned": False}
_kernels = {}  # (op name, dispatch key) -> bool: a loaded library's registrations do not change


def load():
    """True when trp_kernels._C is importable (its TORCH_LIBRARY registrations are then live)."""
    if _state["loaded"] is None:
        try:
            importlib.import_module("trp_kernels._C")
            _state["loaded"] = True
        except Exception as exc:  # ImportError, undefined symbols, ABI mismatch: all mean "not built"
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def warn_fallback(op_name):
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"trp_kernels: compiled extension not available ({_state['error']}); "
            f"{op_name} and the other ops use the PyTorch reference implementation",
            RuntimeWarning,
            stacklevel=3,
        )


def error():
    load()
    return _state["error"]


def has_op(name):
    """Whether the compiled library registered `trp_kernels_C::name` (e.g. only CPU builds lack CUDA)."""
    return load() and hasattr(torch.ops.trp_kernels_C, name)


def has_kernel(name, dispatch_key):
    """Whether `trp_kernels_C::name` has a kernel for dispatch_key ("CPU" or "CUDA")."""
    if not has_op(name):
        return False
    key = (name, dispatch_key)
    if key not in _kernels:
        _kernels[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"trp_kernels_C::{name}", dispatch_key)
    return _kernels[key]
