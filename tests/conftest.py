"""Shared test setup. Triton kernels run under the interpreter when no GPU is present: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, at collection start. A kernel whose first-use
self-check fails (trp_kernels/selfcheck.py) is an error in the tests, not a silent fallback to the reference."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRP_KERNELS_SELF_CHECK_FAILURE", "error")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
