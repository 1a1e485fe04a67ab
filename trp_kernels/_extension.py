"""Loads the compiled extension trp_kernels._C once. A missing or broken build is not an error: the ops
fall back to the reference implementation and say so once."""
import importlib
import warnings

import torch

_state = {"loaded": None, "error": None, "warned": False}
_kernels = {}  # (op name, dispatch key) -> bool: a loaded library's registrations do not change
_images = {}   # CUDA device index -> version of this build's kernel image the driver picked (0: none)
_warned = set()


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


def warn_once(key, message):
    """A RuntimeWarning with `message`, once per process for each `key`."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def image_missing(capability, image):
    """The reason the CUDA kernels cannot run on a device of compute capability (major, minor) given the version
    of the kernel image the driver picked for it (trp_kernels_C::cuda_kernel_image: e.g. 80 for sm_80 SASS, 90 for
    sm_90 SASS or PTX, 0 when the build has none it can run), or None when they can."""
    if image:
        return None
    return (f"the compiled CUDA kernels have no image for compute capability {capability[0]}.{capability[1]} "
            "(rebuild with TORCH_CUDA_ARCH_LIST including it; csrc/cuda_arches.txt lists the default)")


def cuda_image(index):
    """trp_kernels_C::cuda_kernel_image for CUDA device `index`, asked once per device."""
    if index not in _images:
        _images[index] = int(torch.ops.trp_kernels_C.cuda_kernel_image(index))
    return _images[index]


def cuda_image_missing(device):
    """image_missing for a CUDA device (None when the build has no CUDA kernels to run there anyway)."""
    if not has_op("cuda_kernel_image"):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return image_missing(torch.cuda.get_device_capability(index), cuda_image(index))


def cuda_images():
    """{device index: kernel image version} of the devices asked so far (trp_kernels.backend_info)."""
    return dict(_images)
