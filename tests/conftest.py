"""Test-wide setup. On machines without a GPU, Triton kernels run in the interpreter; this must be
decided before anything imports triton."""

import os
import shutil

if not os.path.exists("/dev/nvidia0") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# "auto" precision on a CPU with native bf16 (AVX512-BF16, AMX) picks bf16; the suite's tolerances
# are for fp32 runs, so it runs as on any other CPU (subprocesses inherit it); tests of the bf16
# path set precision = "bf16" themselves
os.environ.setdefault("EMBER_CPU_BF16", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

_BNB_REPLACED: list[str] = []


def pytest_configure(config):
    from tests.bnb_cpu import install

    _BNB_REPLACED[:] = install()  # before any test imports bitsandbytes' ops


def pytest_report_header(config):
    if _BNB_REPLACED:
        return [f"bitsandbytes: native CPU {', '.join(_BNB_REPLACED)} disagree with bitsandbytes' "
                "reference kernels on this host; the oracle tests use the reference "
                "(tests/bnb_cpu.py)"]
    return []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def one_thread():
    """One torch thread for tiny models (on a loaded 2-core machine two spinning OpenMP threads
    made a 2 s training run take over 2 minutes); torch's setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
