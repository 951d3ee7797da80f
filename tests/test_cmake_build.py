"""The CMake (libtorch) build: CMakeLists.txt builds libvisionzip_kernels.so, and loading it with
torch.ops.load_library exposes torch.ops.visionzip.compress with the CPU kernel.

CPU-only (-DVISIONZIP_WITH_CUDA=OFF) to keep it to about a minute; the CUDA sources' compile is
covered by tests/test_cuda_build.py. The library is loaded in a fresh interpreter, since this one
already registered the visionzip ops through visionzip_kernels._C.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import check_against_reference, make_case
from visionzip_kernels import CompressResult

ROOT = Path(__file__).resolve().parents[1]

LOAD_AND_RUN = r"""
import sys, torch
lib, inputs, outputs = sys.argv[1:]
torch.ops.load_library(lib)
case = torch.load(inputs)
res = torch.ops.visionzip.compress_with_indices(case["hidden"], case["attn"], case["k"], keys=case["keys"],
                                                has_cls=case["has_cls"])
out = torch.ops.visionzip.compress(case["hidden"], case["attn"], case["k"], keys=case["keys"],
                                   has_cls=case["has_cls"])
assert torch.equal(out, res[0])
assert torch._C._dispatch_has_kernel_for_dispatch_key("visionzip::compress", "CPU")
torch.save(list(res), outputs)
"""


def test_cmake_cpu_build_loads_and_runs(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    build = tmp_path / "build"
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build), "-DVISIONZIP_WITH_CUDA=OFF",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
    ]  # fmt: skip
    for cmd in (configure, [cmake, "--build", str(build), "-j2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lib = build / "libvisionzip_kernels.so"
    assert lib.exists(), sorted(p.name for p in build.iterdir())

    for has_cls in (True, False):
        case = make_case(3, 65, 32, k=16, has_cls=has_cls, dtype=torch.float16)
        inputs, outputs = tmp_path / "in.pt", tmp_path / "out.pt"
        torch.save(dict(hidden=case.hidden, attn=case.attn, k=case.k, keys=case.keys, has_cls=has_cls), inputs)
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_AND_RUN, str(lib), str(inputs), str(outputs)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        check_against_reference(case, CompressResult(*torch.load(outputs)))
