"""Mechanics of the "cuda" backend (the hand-written CUDA kernels, csrc/cuda) on CUDA tensors: channel
splits at real widths, targets in global scratch, the shared-memory limit, poisoned allocator
blocks, agreement with the CPU kernel, opcheck, CUDA graphs. The compress contract itself runs for
this backend in tests/test_compress.py.

Every test needs a CUDA device (marked ``gpu``: skipped and counted without one). The block
algorithm itself is also exercised on the CPU by tests/test_cuda_emulation.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import visionzip_kernels as vz
from tests.helpers import Case, check_against_reference, make_case
from visionzip_kernels import _extension

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels(request):
    if request.node.name == "test_extension_has_cuda_kernels":
        return
    if not _extension.HAS_CUDA_KERNELS:
        pytest.skip("the extension was built without the CUDA kernels (see test_extension_has_cuda_kernels)")


def run_cuda(case: Case) -> vz.CompressResult:
    return vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend="cuda", return_indices=True)


def test_extension_has_cuda_kernels():
    """With a GPU, a build from this repository must carry the CUDA kernels (setup.py, nvcc)."""
    assert _extension.HAS_CUDA_KERNELS, "visionzip_kernels._C has no CUDA kernel: rebuild with a CUDA torch and nvcc"
    assert vz.available_backends("cuda")[0] == "cuda"


# ---- kernel mechanics at real sizes ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, n, has_cls", [(5, 577, True), (5, 729, False), (1, 4097, True)])
def test_hidden_as_metric(b, n, has_cls, dtype):
    """keys absent: hidden (C = 1024) is the similarity metric."""
    case = make_case(b, n, 1024, form="rows", k=128, key_dim=None, has_cls=has_cls, dtype=dtype, device="cuda")
    check_against_reference(case, run_cuda(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b, c", [(1, 1024), (32, 1024), (3, 1152), (100, 1024)])
def test_channel_split_workloads(b, c, dtype):
    """Widths that make the binding split images over several blocks (S = 4 / 4 / 4 / 3 on 132 SMs;
    bit-identity across S is shown in tests/test_cuda_emulation.py, the oracle check here)."""
    case = make_case(b, 577, c, form="rows", k=64, key_dim=64, dtype=dtype, device="cuda")
    check_against_reference(case, run_cuda(case))


def test_targets_in_global_scratch():
    """C = 4096 hidden metric, Cx = 30: the normalised targets (480 KiB) exceed shared memory."""
    case = make_case(2, 577, 4096, form="rows", k=192, key_dim=None, dtype=torch.float16, device="cuda")
    check_against_reference(case, run_cuda(case))


def test_agrees_with_cpu_kernel():
    case = make_case(5, 577, 64, k=128, key_dim=16, lattice=True, dtype=torch.float32, device="cuda")
    gpu = run_cuda(case)
    cpu = vz.compress(case.hidden.cpu(), case.attn.cpu(), case.k, keys=case.keys.cpu(), backend="cpu",
                      return_indices=True)  # fmt: skip
    for g, c in zip(gpu[1:], cpu[1:]):
        assert torch.equal(g.cpu(), c)
    torch.testing.assert_close(gpu.output.cpu(), cpu.output, rtol=1e-6, atol=1e-6)


# ---- robustness ----


def test_outputs_fully_written_over_poisoned_memory():
    """Fill the caching allocator's free blocks with NaN first: every output element must be written."""
    case = make_case(5, 577, 256, k=128, key_dim=64, dtype=torch.float16, device="cuda")
    for _ in range(2):
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        del poison
        res = run_cuda(case)
        assert not res.output.isnan().any()
        check_against_reference(case, res)


def test_errors():
    h = torch.randn(2, 577, 64, device="cuda", dtype=torch.float64)
    a = torch.rand(2, 577, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.visionzip.compress(h, a, 64)
    h = torch.randn(1, 20000, 8, device="cuda")
    a = torch.rand(1, 20000, device="cuda")
    with pytest.raises(RuntimeError, match="shared memory"):
        torch.ops.visionzip.compress(h, a, 64, has_cls=False)


# ---- torch integration ----


def _op_args(case: Case):
    return (case.hidden, case.attn, case.k), dict(keys=case.keys, contextual=case.contextual, has_cls=case.has_cls)


@pytest.mark.parametrize("op", ["compress", "compress_with_indices"])
@pytest.mark.parametrize("has_cls", [True, False])
def test_opcheck(op, has_cls):
    case = make_case(2, 65, 32, k=16, has_cls=has_cls, dtype=torch.float16, device="cuda")
    args, kwargs = _op_args(case)
    torch.library.opcheck(getattr(torch.ops.visionzip, op).default, args, kwargs)


@pytest.mark.parametrize("has_cls, form", [(True, "full"), (False, "full"), (False, "rows")])
def test_cuda_graph_capture_and_replay(has_cls, form):
    """Captured once, replayed on new inputs copied into the static tensors."""
    cases = [make_case(3, 577, 64, k=64, form=form, has_cls=has_cls, dtype=torch.float16, device="cuda") for _ in range(3)]
    static = Case(cases[0].hidden.clone(), cases[0].attn.clone(), 64, keys=cases[0].keys.clone(), has_cls=has_cls)
    args, kwargs = _op_args(static)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.visionzip.compress_with_indices(*args, **kwargs)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.visionzip.compress_with_indices(*args, **kwargs)
    for case in itertools.chain(cases[1:], cases[:1]):
        for dst, src in ((static.hidden, case.hidden), (static.attn, case.attn), (static.keys, case.keys)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        eager = run_cuda(case)
        for g, e in zip(captured, eager):
            assert torch.equal(g, e)
        check_against_reference(case, vz.CompressResult(*captured))
