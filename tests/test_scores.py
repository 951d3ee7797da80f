"""The score ops (docs/spec.md "Scores"): cls_scores / received_scores without the N x N matrix.

Every backend ("cpu": the C++ kernels, "triton": under TRITON_INTERPRET=1 on CPU) is compared with
the plain-softmax reference evaluated in float64 on the same input values.

Error bound: the kernels read q and k (float32, or bfloat16/float16 converted exactly to float32)
and compute logits, exp and sums in float32. Each softmax term then carries a relative error of a
few float32 ulps times the logit magnitude (|s| <~ 5 here), and each score is a sum of positive
terms, so the relative error of every score stays below RTOL = 2e-5 (measured: <= ~1e-6 at
N = 577, a few 1e-6 at N = 4097). The same bound holds for bfloat16 inputs, since the products of
bfloat16 values are exact in float32: rounding q, k to bfloat16 changes the scores themselves (by
~1e-2), not the kernels' error against the softmax of those rounded values.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import visionzip_kernels as vz
from visionzip_kernels import cls_scores, cls_scores_reference, received_scores, received_scores_reference
from visionzip_kernels import available_score_backends

RTOL = 2e-5
ATOL = 1e-12  # only for exact zeros (exp underflow in both)

CPU_BACKENDS = [b for b in available_score_backends("cpu") if b != "reference"]
HAS_TRITON = "triton" in CPU_BACKENDS
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed (or TRITON_INTERPRET unset)")


def make_qk(b: int, h: int, n: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g) * 1.5
    k = torch.randn(b, h, n, d, generator=g)
    return q.to(dtype).to(device), k.to(dtype).to(device)


def assert_scores_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = ((out.double() - ref.double()).abs() - ATOL).clamp_min(0) / ref.double().abs().clamp_min(1e-30)
    assert err.max().item() <= RTOL, f"max relative error {err.max().item():.3g} > {RTOL}"


# (N, B, H, d): the large N with few heads and a small head dim to keep the suite fast.
CLS_SHAPES = [(577, 2, 4, 64), (729, 2, 3, 64), (1025, 1, 2, 64), (4097, 1, 2, 32)]
RECEIVED_SHAPES = [(577, 2, 2, 64), (729, 1, 2, 64), (1025, 1, 1, 32), (4097, 1, 1, 16)]
TRITON_RECEIVED_MAX_N = 1025  # the interpreter costs ~0.7 ms per program and loop step


def _params(shapes, max_n_triton=None):
    out = []
    for backend in CPU_BACKENDS:
        for dtype in (torch.float32, torch.bfloat16):
            for shape in shapes:
                if backend == "triton" and max_n_triton is not None and shape[0] > max_n_triton:
                    continue
                marks = [pytest.mark.slow] if shape[0] > 1100 else []
                out.append(pytest.param(backend, dtype, shape, id=f"{backend}-{str(dtype)[6:]}-N{shape[0]}", marks=marks))
    return out


# --------------------------------------------------------------------------------------------
# Agreement with the softmax reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,shape", _params(CLS_SHAPES))
def test_cls_scores_match_reference(backend, dtype, shape):
    n, b, h, d = shape
    q, k = make_qk(b, h, n, d, dtype, seed=n)
    out = cls_scores(q[:, :, 0], k, backend=backend)
    assert out.dtype == torch.float32
    ref = cls_scores_reference(q[:, :, 0].double(), k.double())
    assert_scores_close(out, ref)
    torch.testing.assert_close(out.sum(1), torch.full((b,), float(h)), rtol=1e-5, atol=0)  # rows sum to 1


@pytest.mark.parametrize("backend,dtype,shape", _params(RECEIVED_SHAPES, TRITON_RECEIVED_MAX_N))
def test_received_scores_match_reference(backend, dtype, shape):
    n, b, h, d = shape
    q, k = make_qk(b, h, n, d, dtype, seed=n + 1)
    out = received_scores(q, k, backend=backend)
    assert out.dtype == torch.float32
    ref = received_scores_reference(q.double(), k.double())
    assert_scores_close(out, ref)
    torch.testing.assert_close(out.sum(1), torch.full((b,), float(h * n), dtype=torch.float32), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_other_dtypes_scale_and_strides(backend):
    """float16 (and float64 on the CPU kernel) inputs, an explicit scale, non-contiguous q/k as an
    attention module makes them: (B, N, H, d) projections viewed per head with transpose(1, 2)."""
    b, h, n, d = 2, 3, 200, 48
    g = torch.Generator().manual_seed(5)
    qp = torch.randn(b, n, h * d, generator=g)
    kp = torch.randn(b, n, h * d, generator=g)
    q = qp.view(b, n, h, d).transpose(1, 2)
    k = kp.view(b, n, h, d).transpose(1, 2)
    assert not k.is_contiguous()
    dtypes = [torch.float16] + ([torch.float64] if backend == "cpu" else [])
    for dt in dtypes:
        qd, kd = q.to(dt), k.to(dt)
        out_r = received_scores(qd, kd, scale=0.2, backend=backend)
        out_c = cls_scores(qd[:, :, 0], kd, scale=0.2, backend=backend)
        assert out_r.dtype == out_c.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        assert_scores_close(out_r, received_scores_reference(qd.double(), kd.double(), scale=0.2))
        assert_scores_close(out_c, cls_scores_reference(qd[:, :, 0].double(), kd.double(), scale=0.2))
    if backend == "cpu":  # float64 is computed in float64
        ref = received_scores_reference(q.double(), k.double())
        out = received_scores(q.double(), k.double(), backend="cpu")
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_and_edge_sizes(backend):
    """N = 1 (softmax of one element), N not a multiple of the tile, d not a power of two, B = 0."""
    for n, d in [(1, 8), (5, 3), (63, 17), (65, 64), (130, 80)]:
        q, k = make_qk(2, 2, n, d, seed=n)
        assert_scores_close(received_scores(q, k, backend=backend), received_scores_reference(q.double(), k.double()))
        assert_scores_close(
            cls_scores(q[:, :, 0], k, backend=backend), cls_scores_reference(q[:, :, 0].double(), k.double())
        )
    q, k = make_qk(0, 2, 10, 8)
    assert received_scores(q, k, backend=backend).shape == (0, 10)
    assert cls_scores(q[:, :, 0], k, backend=backend).shape == (0, 10)


# --------------------------------------------------------------------------------------------
# cu_seqlens (packed images, block-diagonal attention)
# --------------------------------------------------------------------------------------------

SEGMENTS = [64, 0, 150, 1, 333]  # an empty segment, a one-token segment, non-tile-aligned bounds


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cu_seqlens_segments(backend, index_dtype):
    n = sum(SEGMENTS)
    q, k = make_qk(1, 2, n, 32, seed=3)
    cu = torch.tensor([0] + list(torch.tensor(SEGMENTS).cumsum(0)), dtype=index_dtype)
    out = received_scores(q, k, cu_seqlens=cu, backend=backend)
    assert_scores_close(out, received_scores_reference(q.double(), k.double(), cu_seqlens=cu))
    # Equivalent to scoring each image alone.
    parts = []
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if s1 > s0:
            parts.append(received_scores(q[:, :, s0:s1], k[:, :, s0:s1], backend=backend))
    torch.testing.assert_close(out, torch.cat(parts, dim=1), rtol=1e-5, atol=0)
    # Every segment's scores sum to heads x its length (each query's softmax sums to 1).
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[0, s0:s1].sum(), torch.tensor(2.0 * (s1 - s0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cu_seqlens_single_segment_equals_none(backend):
    q, k = make_qk(1, 2, 300, 32, seed=4)
    cu = torch.tensor([0, 300], dtype=torch.int32)
    a = received_scores(q, k, cu_seqlens=cu, backend=backend)
    b = received_scores(q, k, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# Scores -> compress equals compress with the full attention matrix (item 5 of the issue)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "no-cls"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scores_then_compress_equals_full_attention(backend, has_cls):
    b, h, n, d, c, budget = 2, 4, 577, 32, 96, 64
    q, k = make_qk(b, h, n, d, seed=11 + has_cls)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(b, n, c, generator=g)
    keys = k.mean(dim=1)  # VisionZip's metric: the layer's keys averaged over heads, (B, N, d)
    attn = torch.softmax((q @ k.transpose(-1, -2)) * d**-0.5, dim=-1)  # what output_attentions returns
    if has_cls:
        scores = cls_scores(q[:, :, 0], k, backend=backend)
        torch.testing.assert_close(scores, attn[:, :, 0, :].sum(1), rtol=1e-5, atol=1e-7)
    else:
        scores = received_scores(q, k, backend=backend)
        torch.testing.assert_close(scores, attn.sum(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    full = vz.compress(hidden, attn, budget, keys=keys, has_cls=has_cls, backend="cpu", return_indices=True)
    fast = vz.compress(hidden, scores, budget, keys=keys, has_cls=has_cls, backend="cpu", return_indices=True)
    for name in ("dominant_indices", "contextual_indices", "token_map"):
        assert torch.equal(getattr(fast, name), getattr(full, name)), name
    torch.testing.assert_close(fast.output, full.output, rtol=0, atol=0)


def test_hf_clip_sdpa_hooks_give_eager_attention_scores():
    """The capture used by benchmarks/bench_scores.py: q/k from forward hooks on a CLIP layer's
    q_proj / k_proj under SDPA give the scores of that layer's eager attention probabilities."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
    )
    torch.manual_seed(0)
    # One config object each: _from_config records the attention implementation in the config.
    eager = transformers.CLIPVisionModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    sdpa = transformers.CLIPVisionModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    pixels = torch.randn(2, 3, 56, 56)
    layer = getattr(sdpa, "vision_model", sdpa).encoder.layers[-2].self_attn  # transformers 4 / 5 layouts
    captured = {}
    hooks = [
        layer.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        layer.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    with torch.no_grad():
        ref = eager(pixels, output_attentions=True).attentions[-2]
        sdpa(pixels)
    for hk in hooks:
        hk.remove()
    bsz, n, _ = captured["q"].shape
    heads, hd = layer.num_heads, layer.head_dim
    q = captured["q"].view(bsz, n, heads, hd).transpose(1, 2)
    k = captured["k"].view(bsz, n, heads, hd).transpose(1, 2)
    torch.testing.assert_close(cls_scores(q[:, :, 0], k, scale=layer.scale), ref[:, :, 0].sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(received_scores(q, k, scale=layer.scale), ref.sum((1, 2)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Operator registration: opcheck, torch.compile
# --------------------------------------------------------------------------------------------


def _opcheck_cases():
    q, k = make_qk(2, 2, 70, 16, seed=1)
    q1, k1 = make_qk(1, 2, 70, 16, seed=2)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    cases = [
        ("cls_scores", (q[:, :, 0], k), {}),
        ("cls_scores", (q[:, :, 0].bfloat16(), k.bfloat16()), {"scale": 0.3}),
        ("received_scores", (q, k), {}),
        ("received_scores", (q1, k1), {"cu_seqlens": cu, "scale": 0.25}),
    ]
    if HAS_TRITON:
        cases += [
            ("cls_scores_triton", (q[:, :, 0], k, None), {}),
            ("received_scores_triton", (q1, k1, cu, 0.25), {}),
            ("received_scores_triton", (q, k, None, None), {}),
        ]
    return [pytest.param(op, args, kwargs, id=f"{op}-{i}") for i, (op, args, kwargs) in enumerate(cases)]


@pytest.mark.parametrize("op,args,kwargs", _opcheck_cases())
def test_opcheck(op, args, kwargs):
    torch.library.opcheck(getattr(torch.ops.visionzip, op), args, kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """scores -> compress in one graph: static shapes, no host sync, no graph break."""
    torch._dynamo.reset()

    def cls_pipeline(hidden, q, k, keys):
        return vz.compress(hidden, cls_scores(q[:, :, 0], k, backend=backend), 32, keys=keys, backend="cpu")

    def received_pipeline(hidden, q, k, keys, cu):
        s = received_scores(q, k, cu_seqlens=cu, backend=backend)
        return vz.compress(hidden, s, 32, keys=keys, has_cls=False, backend="cpu")

    q, k = make_qk(1, 2, 130, 16, seed=7)
    hidden = torch.randn(1, 130, 24)
    keys = k.mean(1)
    cu = torch.tensor([0, 50, 130], dtype=torch.int32)
    for fn, args in ((cls_pipeline, (hidden, q, k, keys)), (received_pipeline, (hidden, q, k, keys, cu))):
        compiled = torch.compile(fn, fullgraph=True)  # inductor; the custom ops stay opaque calls
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_q4, _k4 = make_qk(1, 2, 10, 8)
_q2b, _k2b = make_qk(2, 2, 10, 8)

BAD_CLS = [
    ((_q4, _k4), {}, r"q must have shape \(B, H, d\).*4-D"),
    ((_q4[:, :, 0], _k4[0]), {}, r"k must have shape \(B, H, N, d\).*3-D"),
    ((_q4[:, :1, 0], _k4), {}, r"q of shape \(1, 1, 8\) does not match k \(1, 2, 10, 8\).*\(1, 2, 8\)"),
    ((_q4[:, :, 0, :4], _k4), {}, r"does not match k .*expected \(B, H, d\) = \(1, 2, 8\)"),
    ((_q4[:, :, 0].long(), _k4), {}, r"q must be a floating tensor.*torch.int64"),
    ((_q4[:, :, 0], _k4.half()), {}, r"q and k must have the same dtype; got q torch.float32, k torch.float16"),
    ((_q4[:, :, 0], _k4), {"scale": float("nan")}, r"scale must be finite"),
    ((_q4[:, :, 0], _k4), {"scale": "x"}, r"scale must be a float or None"),
    ((_q4[:, :, 0], _k4), {"backend": "cuda"}, r"backend 'cuda' does not implement cls_scores"),
    ((_q4[:, :, 0], _k4[:, :, :0]), {}, r"N >= 1 tokens"),
    ((_q4[:, :, 0].to("meta"), _k4), {}, r"k is on cpu but q is on meta"),
]

_cu = lambda *v, dt=torch.int32: torch.tensor(v, dtype=dt)  # noqa: E731

BAD_RECEIVED = [
    ((_q4[:, :, 0], _k4), {}, r"q must have shape \(B, H, N, d\).*3-D"),
    ((_q4[:, :, :5], _k4), {}, r"q of shape \(1, 2, 5, 8\) does not match k \(1, 2, 10, 8\).*self-attention"),
    ((_q4, _k4.bfloat16()), {}, r"same dtype"),
    ((_q4.int(), _k4.int()), {}, r"q must be a floating tensor"),
    ((_q4, _k4), {"cu_seqlens": _cu(0, 4, 10, dt=torch.float32)}, r"cu_seqlens must be int32 or int64"),
    ((_q4, _k4), {"cu_seqlens": _cu(10)}, r"cu_seqlens must have shape \(S \+ 1,\)"),
    ((_q4, _k4), {"cu_seqlens": _cu(0, 4, 10).view(1, 3)}, r"cu_seqlens must have shape \(S \+ 1,\)"),
    ((_q4, _k4), {"cu_seqlens": _cu(1, 4, 10)}, r"must start at 0 and end at N = 10; got 1 \.\.\. 10"),
    ((_q4, _k4), {"cu_seqlens": _cu(0, 4, 9)}, r"must start at 0 and end at N = 10"),
    ((_q4, _k4), {"cu_seqlens": _cu(0, 6, 4, 10)}, r"non-decreasing; got 6 then 4"),
    ((_q2b, _k2b), {"cu_seqlens": _cu(0, 4, 10)}, r"B must be 1"),
    ((_q4, _k4), {"cu_seqlens": [0, 10]}, r"cu_seqlens must be a torch.Tensor"),
    ((_q4, _k4), {"backend": "nope"}, r"backend must be one of"),
]


@pytest.mark.parametrize("args,kwargs,match", BAD_CLS, ids=[m[:30] for *_, m in BAD_CLS])
def test_cls_scores_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls_scores(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,match", BAD_RECEIVED, ids=[m[:30] for *_, m in BAD_RECEIVED])
def test_received_scores_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        received_scores(*args, **kwargs)


def test_cpp_op_checks_without_python():
    """The C++ op guards its own memory accesses (RuntimeError) when called directly."""
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.visionzip.received_scores(_q4, _k4, cu_seqlens=_cu(0, 6, 4, 10))
    with pytest.raises(RuntimeError, match="end at N = 10"):
        torch.ops.visionzip.received_scores(_q4, _k4, cu_seqlens=_cu(0, 4, 12))
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.visionzip.cls_scores(_q4[:, :, 0], _k4.double())
    with pytest.raises(RuntimeError, match=r"q must have shape \(B, H, d\)"):
        torch.ops.visionzip.cls_scores(_q4, _k4)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_ops_reject_a_scale_that_is_not_finite(scale):
    """The ops apply the API's rule (docs/spec.md "Arguments"): a NaN or infinite scale is an error,
    not a NaN result; on every backend that has a raw op."""
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.visionzip.cls_scores(_q4[:, :, 0], _k4, scale=scale)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        torch.ops.visionzip.received_scores(_q4, _k4, scale=scale)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="scale must be finite"):
            torch.ops.visionzip.cls_scores_triton(_q4[:, :, 0], _k4, scale)
        with pytest.raises(ValueError, match="scale must be finite"):
            torch.ops.visionzip.received_scores_triton(_q4, _k4, None, scale)


@pytest.mark.gpu
def test_cuda_ops_reject_what_the_cpu_ops_reject():
    """On CUDA tensors the C++ score ops run the Triton kernels: the same malformed cu_seqlens and
    scale are rejected there as on the CPU (not clamped)."""
    q, k = _q4.cuda(), _k4.cuda()
    for cu, match in ((_cu(0, 6, 4, 10), "non-decreasing"), (_cu(0, 4, 12), "end at N = 10")):
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.visionzip.received_scores(q, k, cu_seqlens=cu.cuda())
    with pytest.raises((RuntimeError, ValueError), match="scale must be finite"):
        torch.ops.visionzip.cls_scores(q[:, :, 0], k, scale=float("nan"))


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_cpu_bit_identical_across_thread_counts_and_runs():
    q, k = make_qk(2, 3, 700, 64, seed=9)
    q1, k1 = make_qk(1, 3, 700, 64, seed=10)
    cu = torch.tensor([0, 100, 333, 700])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            results.append(
                (
                    cls_scores(q[:, :, 0], k, backend="cpu"),
                    received_scores(q, k, backend="cpu"),
                    received_scores(q1, k1, cu_seqlens=cu, backend="cpu"),
                )
            )
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_triton
def test_triton_run_to_run_identical():
    q, k = make_qk(1, 2, 150, 32, seed=13)
    cu = torch.tensor([0, 70, 150])
    a = received_scores(q, k, cu_seqlens=cu, backend="triton")
    b = received_scores(q, k, cu_seqlens=cu, backend="triton")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Memory: nothing N x N
# --------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import sys, torch
import visionzip_kernels as vz

def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 16, 4096, 64, generator=g)
k = torch.randn(1, 16, 4096, 64, generator=g)
vz.cls_scores(q[:, :, 0], k, backend="cpu")  # load lazily initialised code paths
vz.received_scores(q[:, :1, :128], k[:, :1, :128], backend="cpu")
base = status()["VmRSS"]
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
out = vz.received_scores(q, k, backend="cpu")
out_cls = vz.cls_scores(q[:, :, 0], k, backend="cpu")
peak = status()["VmHWM"] - base
assert out.shape == (1, 4096) and abs(out.sum().item() - 16 * 4096) < 1e-2 * 16 * 4096
print(peak)
"""


@pytest.mark.slow
def test_cpu_peak_memory_far_below_attention_matrix():
    """B=1, H=16, N=4096, d=64: the attention matrix alone is H*N*N*4 bytes = 1 GiB. The kernels
    allocate (B, H, N) vectors and one tile per thread; the process's resident-set high-water mark
    (reset right before the call; a fresh subprocess so pytest's heap does not blur it) must grow
    by less than 32 MiB."""
    matrix = 16 * 4096 * 4096 * 4
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    peak = int(res.stdout.strip().splitlines()[-1])
    assert peak < 32 * 2**20, f"peak RSS growth {peak / 2**20:.1f} MiB (matrix: {matrix / 2**30:.0f} GiB)"
    assert peak < matrix / 32


@pytest.mark.gpu
def test_cuda_peak_memory_far_below_attention_matrix():
    q, k = make_qk(1, 16, 4096, 64, torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = received_scores(q, k, backend="triton")
    cls_scores(q[:, :, 0], k, backend="triton")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    ref = received_scores_reference(q[:, :2].double(), k[:, :2].double())
    assert_scores_close(received_scores(q[:, :2], k[:, :2], backend="triton").cpu(), ref.cpu())
    assert out.shape == (1, 4096)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_triton_matches_reference(dtype):
    q, k = make_qk(2, 4, 1025, 64, dtype, seed=21, device="cuda")
    assert_scores_close(received_scores(q, k, backend="triton"), received_scores_reference(q.double(), k.double()))
    assert_scores_close(
        cls_scores(q[:, :, 0], k, backend="triton"), cls_scores_reference(q[:, :, 0].double(), k.double())
    )
    # The C++ ops dispatch to the Triton kernels on CUDA tensors.
    assert_scores_close(
        torch.ops.visionzip.received_scores(q, k), received_scores_reference(q.double(), k.double())
    )
    cu = torch.tensor([0, 300, 1025], device="cuda", dtype=torch.int32)
    q1, k1 = q[:1], k[:1]
    assert_scores_close(
        received_scores(q1, k1, cu_seqlens=cu, backend="triton"),
        received_scores_reference(q1.double(), k1.double(), cu_seqlens=cu),
    )


@needs_triton
@pytest.mark.parametrize("with_segments", [False, True], ids=["plain", "cu_seqlens"])
def test_triton_float32_gpu_tiles(monkeypatch, with_segments):
    """On a GPU float32 inputs take 32 x 32 tiles (64 x 64 spill there); the interpreter normally keeps
    64, so run the GPU tiling here by making the launcher believe it is compiling."""
    from visionzip_kernels.triton import scores as ts

    class Spy:  # records the launch grids
        def __init__(self, kernel):
            self.kernel, self.grids = kernel, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(ts, "interpreting", lambda: False)
    spy = Spy(ts._row_lse_kernel)
    monkeypatch.setattr(ts, "_row_lse_kernel", spy)
    q, k = make_qk(1, 2, 77, 40, seed=11)
    cu = torch.tensor([0, 30, 30, 77], dtype=torch.int32) if with_segments else None
    out = ts.received_scores_triton(q, k, cu)
    assert spy.grids == [(2, 3)]  # 32-token tiles: cdiv(77, 32)
    assert_scores_close(out, received_scores_reference(q.double(), k.double(), cu_seqlens=cu))
