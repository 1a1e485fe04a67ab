"""The float32 matmul precision setting held at IEEE float32 while the projection runs.

The projection's float32 GEMMs must stay IEEE float32 (TF32 rounds the inputs to 10 mantissa bits, bfloat16 to 8:
relative errors of 5e-4 and more, far outside the 1e-5 contract). at::NoTF32Guard (csrc/common/lowrank_driver.h)
covers the cuBLAS calls that consult it, but not the paths that read the precision setting itself: cuBLASLt's
batched GEMMs (torch.backends.cuda.preferred_blas_library("cublaslt")), TunableOp, and oneDNN's bfloat16 mode for
float32 matmuls on the CPU (torch.backends.mkldnn.matmul.fp32_precision = "bf16", or
set_float32_matmul_precision("medium"), on CPUs with bfloat16 units). So the setting itself is set to "ieee" for
the duration of a projection and restored after it.

The setting is process-wide, not per thread: while any thread projects, it reads "ieee" (other threads' float32
matmuls are then exact, and slower); the first thread in saves it and the last one out restores it."""
import contextlib
import threading
from collections.abc import Iterator

import torch

_lock = threading.Lock()
_holders = {}  # backend name -> number of projections holding it
_saved = {}    # backend name -> the user's setting, restored by the last holder


def _backend(device_type):
    """(name, the torch.backends object whose fp32_precision governs float32 matmuls on device_type) or None."""
    if device_type == "cuda":
        return "cuda", torch.backends.cuda.matmul
    if device_type == "cpu":
        return "mkldnn", getattr(torch.backends.mkldnn, "matmul", None)
    return None


@contextlib.contextmanager
def ieee_matmul(device_type: str) -> Iterator[None]:
    """Context in which float32 matmuls on `device_type` run in IEEE float32 (no TF32, no bfloat16).

    The setting is process-wide: the first thread in saves the user's setting and the last one out restores it.

    Args:
        device_type: the device type of the tensors the projection works on, "cuda" or "cpu"; any other
            type (or a torch without the fp32_precision setting) leaves everything as it is.

    Yields:
        Nothing; the setting holds until the context exits.
    """
    found = _backend(device_type)
    if found is None or found[1] is None or not hasattr(found[1], "fp32_precision"):
        yield
        return
    name, settings = found
    with _lock:
        if _holders.get(name, 0) == 0:
            _saved[name] = settings.fp32_precision
            if _saved[name] != "ieee":
                settings.fp32_precision = "ieee"
        _holders[name] = _holders.get(name, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _holders[name] -= 1
            if _holders[name] == 0 and settings.fp32_precision != _saved[name]:
                settings.fp32_precision = _saved[name]


__all__ = ["ieee_matmul"]
