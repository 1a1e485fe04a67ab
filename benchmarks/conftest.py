"""pytest-benchmark cases (`make bench`). `--smoke` runs every case once on small inputs: the test suite
uses it to check that every benchmark is collected and runs (tests/test_gpu_suite.py)."""
import pytest


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", help="every benchmark once, on small inputs")


@pytest.fixture
def smoke(request):
    return request.config.getoption("--smoke")


@pytest.fixture
def rounds(smoke):
    """rounds(n): n timed rounds, or 1 in a smoke run."""
    return lambda n: 1 if smoke else n
