"""Mechanics of the Triton backend of compress (visionzip::compress_triton / _with_indices): the
chunked selection, channel splits, the received-attention pre-pass, the custom ops, the direct
launch, packaging. The compress contract itself (oracle, ties, dtypes, strides, gradients, compile)
runs for this backend in tests/test_compress.py.

Without a CUDA device they run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), with small shapes; tests marked ``gpu`` run the real workloads on CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import visionzip_kernels as vz
from visionzip_kernels import CompressResult, _extension
from visionzip_kernels.reference import token_scores

from .helpers import check_against_reference, make_case, poisoned_allocations

TRITON = _extension.optional_module("visionzip_kernels.triton")
pytestmark = pytest.mark.skipif(TRITON is None, reason="triton is not installed")

if TRITON is not None:
    from visionzip_kernels.triton import _utils
    from visionzip_kernels.triton import compress as tc

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def run_triton(case, device_op: bool = True) -> CompressResult:
    """The with-indices op (or the launcher itself) on a case."""
    if device_op:
        return CompressResult(
            *torch.ops.visionzip.compress_triton_with_indices(case.hidden, case.attn, case.k, **case.kwargs())
        )
    return CompressResult(*tc.compress_triton(case.hidden, case.attn, case.k, **case.kwargs()))


# ---------------------------------------------------------------------------------------------
# Kernel mechanics (interpreter-sized shapes; non-powers of two everywhere)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form,has_cls", [("full", True), ("scores", False), ("full", False)])
def test_chunked_selection(monkeypatch, form, has_cls):
    """N larger than the token chunk: the bisection and prefix counts carry across chunks."""
    monkeypatch.setattr(tc, "MAX_BLOCK_N", 32)
    case = make_case(2, 100, 24, k=30, form=form, has_cls=has_cls, lattice=True, device=DEVICE)
    check_against_reference(case, run_triton(case), exact=True)


def test_many_targets_and_wide_rows():
    """Cx above one target tile (32) and C above one channel tile (1024)."""
    case = make_case(1, 90, 1100, k=60, contextual=40, key_dim=None, device=DEVICE)
    check_against_reference(case, run_triton(case))
    case = make_case(1, 80, 17, k=60, contextual=41, lattice=True, device=DEVICE)
    check_against_reference(case, run_triton(case), exact=True)


@pytest.mark.parametrize("splits,c", [(3, 33), (4, 50), (2, 17)])
@pytest.mark.parametrize("form,has_cls,with_keys", [("rows", True, True), ("full", False, False),
                                                    ("scores", True, False)])
def test_channel_splits_bit_identical(monkeypatch, splits, c, form, has_cls, with_keys):
    """Several programs per image (each a channel slice, uneven when C % S != 0) give exactly the
    one-program result, indices included, and satisfy the oracle; poisoned outputs catch a slice
    nobody wrote."""
    case = make_case(2, 45, c, k=14, form=form, has_cls=has_cls, key_dim=8 if with_keys else None, device=DEVICE)
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", 1)
    one = run_triton(case)
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", splits)
    with poisoned_allocations():
        many = run_triton(case)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    check_against_reference(case, many)


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_channel_splits_contextual_zero(monkeypatch, has_cls):
    """Cx = 0 with several programs: unassigned tokens map to -1 (written by no other phase)."""
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", 3)
    case = make_case(2, 40, 20, k=10, contextual=0, has_cls=has_cls, device=DEVICE)
    res = run_triton(case)
    check_against_reference(case, res)
    assert int((res.token_map == -1).sum()) == 2 * (40 - 10)


def test_channel_split_choice(monkeypatch):
    """About two programs per SM, >= MIN_SPLIT_CHANNELS channels each, <= 2 with hidden as metric."""
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", None)
    monkeypatch.setattr(_utils, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert _utils.channel_splits(1, 1024, False, cuda) == 4  # capped by 1024 / 256 channels
    assert _utils.channel_splits(32, 1024, False, cuda) == 4  # ceil(264 / 32) = 9 -> 4
    assert _utils.channel_splits(100, 1024, False, cuda) == 3
    assert _utils.channel_splits(256, 1024, False, cuda) == 2
    assert _utils.channel_splits(512, 1024, False, cuda) == 1
    assert _utils.channel_splits(1, 1024, True, cuda) == 2
    assert _utils.channel_splits(8, 200, False, cuda) == 1  # rows too narrow to split
    assert _utils.channel_splits(8, 1024, False, torch.device("cpu")) == 1  # the interpreter


def test_received_attention_prepass():
    """The no-CLS (B, H, N, N) pre-pass: float32 column sums over heads and queries."""
    case = make_case(2, 70, 4, heads=3, form="full", has_cls=False, device=DEVICE)
    attn = case.attn.to(torch.float16)
    n = attn.shape[-1]
    scores = torch.empty(2, n, dtype=torch.float32, device=DEVICE)
    tc._received_attention_kernel[(2, 3)](attn, *attn.stride(), scores, n, 3, BLOCK_Q=32, BLOCK_J=32)
    expected = token_scores(attn.double(), has_cls=False, dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-6)


def test_batch_zero():
    case = make_case(1, 20, 8, k=10, device=DEVICE)
    hidden, attn, keys = case.hidden[:0], case.attn[:0], case.keys[:0]
    out, dom, tgt, tmap = torch.ops.visionzip.compress_triton_with_indices(hidden, attn, 10, keys)
    assert out.shape == (0, 10, 8) and dom.shape == (0, 9) and tgt.shape == (0, 1) and tmap.shape == (0, 20)
    assert torch.ops.visionzip.compress_triton(hidden, attn, 10, keys).shape == (0, 10, 8)


# ---------------------------------------------------------------------------------------------
# The custom ops: their own checks, registration, compile, the direct launch
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
    case = make_case(2, 20, 8, k=10, device=DEVICE)
    h, a, keys = case.hidden, case.attn, case.keys
    op = torch.ops.visionzip.compress_triton
    bad = [
        ((h.double(), a.double(), 10), {}, "float64"),
        ((h, a[:, :, :, :-1], 10), {}, "attn"),
        ((h, a, 21), {}, "k must"),
        ((h, a, 10), dict(keys=keys[:, :-1]), "keys"),
        ((h, a, 10), dict(contextual=11), "contextual"),
        ((h, a, 4), dict(contextual=4, has_cls=True), "has_cls"),
        ((h.to(torch.int32), a, 10), {}, "hidden must be a floating"),
    ]
    for args, kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            op(*args, **kwargs)
        with pytest.raises(ValueError, match=msg):
            tc.compress_triton(*args, **kwargs)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    case = make_case(1, 20, 8, k=10)  # CPU tensors
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tc.compress_triton(case.hidden, case.attn, case.k, keys=case.keys)


@pytest.mark.parametrize(
    "kw", [dict(b=2, n=37, c=33, k=16), dict(b=1, n=30, c=8, k=12, has_cls=False, key_dim=None)]
)
def test_opcheck(kw):
    case = make_case(**kw, device=DEVICE)
    for op in (torch.ops.visionzip.compress_triton.default, torch.ops.visionzip.compress_triton_with_indices.default):
        torch.library.opcheck(op, (case.hidden, case.attn, case.k), case.kwargs())


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def fn(hidden, attn, keys):
        out, dom, tgt, tmap = torch.ops.visionzip.compress_triton_with_indices(hidden, attn, 16, keys)
        res = vz.compress(hidden, attn, 16, keys=keys, backend="triton", return_indices=True)
        return out, dom, tmap, torch.ops.visionzip.compress_triton(hidden, attn, 16, keys, has_cls=True), *res

    compiled = torch.compile(fn, fullgraph=True)
    case = make_case(2, 37, 20, k=16, device=DEVICE)
    got = compiled(case.hidden, case.attn, case.keys)
    want = fn(case.hidden, case.attn, case.keys)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_api_backend_and_registration():
    assert "triton" in vz.available_backends(DEVICE)
    case = make_case(2, 37, 20, k=16, device=DEVICE)
    res = vz.compress(case.hidden, case.attn, case.k, backend="triton", return_indices=True, **case.kwargs())
    check_against_reference(case, res)
    out = vz.compress(case.hidden, case.attn, case.k, backend="triton", **case.kwargs())
    assert torch.equal(out, res.output)
    # Without hand-written CUDA kernels the Triton kernels are visionzip::compress's CUDA kernel.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("visionzip::compress", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("visionzip::compress_with_indices", "CUDA")


def test_api_calls_the_launcher_directly_only_when_nothing_needs_the_op(monkeypatch):
    """Plain eager inference skips the custom op's Python dispatch; autograd, torch.compile and
    dispatch modes go through the op (which they need), with the same results."""
    from torch.utils._python_dispatch import TorchDispatchMode

    decisions = []
    decide = _utils.direct_call_ok
    monkeypatch.setattr(_utils, "direct_call_ok", lambda *t: decisions.append(decide(*t)) or decisions[-1])
    case = make_case(2, 37, 20, k=16, device=DEVICE)
    ref = run_triton(case)
    run = lambda **kw: vz.compress(case.hidden, case.attn, case.k, backend="triton", **case.kwargs(), **kw)  # noqa
    assert torch.equal(run(), ref.output) and decisions == [True]

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Counting():
        assert torch.equal(run(), ref.output)
    assert decisions == [True, False]
    hidden = case.hidden.clone().requires_grad_()
    out = vz.compress(hidden, case.attn, case.k, backend="triton", **case.kwargs())
    assert decisions == [True, False, False] and out.grad_fn is not None
    torch.testing.assert_close(out.detach(), ref.output, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(vz.compress(hidden, case.attn, case.k, backend="triton", **case.kwargs()), ref.output)
    assert decisions[-1] is True


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_records_the_op():
    """torch.jit.trace must see the custom op (a direct launch would leave only aten::empty in the graph)."""
    case = make_case(2, 37, 20, k=16, device=DEVICE)
    fn = lambda h, a, k: vz.compress(h, a, 16, keys=k, backend="triton")  # noqa: E731
    traced = torch.jit.trace(fn, (case.hidden, case.attn, case.keys), check_trace=False)
    assert "visionzip::compress_triton" in str(traced.graph)
    fresh = make_case(2, 37, 20, k=16, device=DEVICE, seed=9)
    torch.testing.assert_close(traced(fresh.hidden, fresh.attn, fresh.keys), run_triton(fresh).output, rtol=0, atol=0)


def test_package_imports_without_triton():
    """With triton unavailable the package still imports and no triton backend is offered."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import visionzip_kernels as vz
        assert "visionzip_kernels.triton" not in sys.modules
        assert "triton" not in vz.available_backends("cpu")
        assert "triton" not in vz.available_score_backends("cpu")
        import torch
        assert not hasattr(torch.ops.visionzip, "compress_triton")
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# GPU workloads (skipped without a CUDA device)
# ---------------------------------------------------------------------------------------------

GPU_WORKLOADS = [
    # (B, N, has_cls, form, k, dtype)
    (1, 577, True, "full", 64, torch.float16),
    (5, 577, True, "full", 128, torch.bfloat16),
    (32, 577, True, "full", 192, torch.float16),
    (32, 577, True, "rows", 64, torch.float32),
    (1, 729, False, "full", 64, torch.bfloat16),
    (5, 729, False, "full", 192, torch.float32),
    (32, 729, False, "full", 128, torch.float16),
    (5, 729, False, "scores", 64, torch.bfloat16),
    (1, 1025, True, "full", 192, torch.float16),
    (5, 1025, True, "rows", 128, torch.float32),
    (1, 4097, True, "rows", 192, torch.bfloat16),
    (5, 4097, False, "scores", 128, torch.float16),
    (1, 4097, False, "full", 64, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,c,with_keys,dtype", [(1, 1024, True, torch.float16), (32, 1024, True, torch.float32),
                                                  (8, 1152, False, torch.bfloat16), (3, 1024, True, torch.float32)])
def test_gpu_channel_splits_bit_identical(monkeypatch, b, c, with_keys, dtype):
    """The automatic channel split (several programs per image, so another BLOCK_C and tile layout)
    equals one program per image exactly: the means add members in a fixed order per lane."""
    case = make_case(b, 577, c, k=64, dtype=dtype, key_dim=64 if with_keys else None, device="cuda")
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", None)
    assert _utils.channel_splits(b, c, not with_keys, case.hidden.device) > 1
    auto = run_triton(case)
    monkeypatch.setattr(_utils, "CHANNEL_SPLITS", 1)
    one = run_triton(case)
    for x, y in zip(auto, one):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("b,n,has_cls,form,k,dtype", GPU_WORKLOADS)  # C = 1024: the widths that split
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "hidden"])
def test_gpu_workloads(b, n, has_cls, form, k, dtype, with_keys):
    case = make_case(b, n, 1024, heads=16, form=form, k=k, key_dim=64 if with_keys else None, has_cls=has_cls,
                     dtype=dtype, device="cuda")
    res = run_triton(case)
    check_against_reference(case, res)
    assert torch.equal(res.output, run_triton(case).output)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_gpu_cuda_graph(has_cls):
    n = 577 if has_cls else 729
    case = make_case(4, n, 1024, heads=16, k=128, key_dim=64, has_cls=has_cls, dtype=torch.bfloat16,
                     device="cuda")
    static = [case.hidden.clone(), case.attn.clone(), case.keys.clone()]
    op = torch.ops.visionzip.compress_triton_with_indices
    run = lambda: op(static[0], static[1], 128, static[2], None, has_cls)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    fresh = make_case(4, n, 1024, heads=16, k=128, key_dim=64, has_cls=has_cls, dtype=torch.bfloat16,
                      device="cuda")
    for dst, src in zip(static, (fresh.hidden, fresh.attn, fresh.keys)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    check_against_reference(fresh, CompressResult(*captured))
    for x, y in zip(captured, run()):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(_extension.HAS_CUDA_KERNELS, reason="the extension has its own CUDA kernels")
def test_gpu_compress_op_dispatches_to_triton():
    case = make_case(5, 577, 1024, heads=16, k=64, key_dim=64, dtype=torch.float16, device="cuda")
    res = CompressResult(*torch.ops.visionzip.compress_with_indices(case.hidden, case.attn, 64, keys=case.keys))
    check_against_reference(case, res)
    case64 = make_case(2, 577, 64, heads=4, k=64, dtype=torch.float64, device="cuda")  # as the CUDA kernels: an error
    with pytest.raises(ValueError, match="float64"):
        torch.ops.visionzip.compress(case64.hidden, case64.attn, 64, keys=case64.keys)
