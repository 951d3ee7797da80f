"""Test configuration.

Without a CUDA device the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET
must be set before the first ``@triton.jit`` runs, so before the package is imported.
Tests marked ``gpu`` are skipped without a CUDA device, and the summary says how many. The
``compress_backend`` and ``group_pool_backend`` fixtures parametrise the contract suites over every
backend.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import visionzip_kernels  # noqa: E402,F401

from tests.helpers import BackendUnderTest, backend_params, require  # noqa: E402

HAS_GPU = torch.cuda.is_available()

# tests/vllm needs vLLM, which lives in its own environment (`make test-vllm`).
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm/*"]


@pytest.fixture(params=backend_params())
def compress_backend(request) -> BackendUnderTest:
    """The backend the compress contract suite (tests/test_compress.py) runs on: each one available
    here (Triton on CPU tensors only in its interpreter; GPU ones only with a CUDA device)."""
    return require(request.param)


@pytest.fixture(params=backend_params("group_pool"))
def group_pool_backend(request) -> BackendUnderTest:
    """The backend the group_pool contract suite (tests/test_group_pool.py) runs on."""
    return require(request.param, "group_pool")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "GPU test" in str(r.longrepr)]
    ran = [
        r
        for key in ("passed", "failed")
        for r in terminalreporter.stats.get(key, [])
        if "gpu" in getattr(r, "keywords", {})
    ]
    terminalreporter.write_line(
        f"GPU tests: {len(skipped)} skipped (no CUDA device), {len(ran)} ran"
        if not HAS_GPU
        else f"GPU tests: {len(ran)} ran on {torch.cuda.get_device_name()}"
    )
