"""visionzip::compress on CPU: the fused C++ kernel (backend "cpu") and the reference backend, checked
against the float64 oracle, plus the op contract (validation, opcheck, compile, determinism, poison)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import visionzip_kernels as vz
from tests.helpers import Case, check_against_reference, make_case

BACKENDS = ["cpu", "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # b, n, c, heads, has_cls, k
    (1, 577, 1024, 16, True, 64),  # LLaVA-1.5
    (3, 577, 96, 16, True, 128),
    (2, 729, 72, 4, False, 64),  # SigLIP-384, no CLS
    (5, 1025, 40, 1, True, 192),  # CLIP-448, one head
    (4, 37, 33, 3, True, 10),
    (2, 50, 17, 2, False, 7),
    (1, 5, 3, 1, True, 5),  # k = N
]


def run(backend: str, case: Case) -> vz.CompressResult:
    return vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend=backend, return_indices=True)


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty returns NaN (floats) / max int (ints) inside: unwritten outputs cannot pass."""
    prev_det, prev_fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["full", "rows", "scores"])
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "nokeys"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("cls" if s[4] else "nocls"))
def test_matches_oracle(backend, dtype, form, with_keys, shape):
    b, n, c, h, has_cls, k = shape
    case = make_case(b, n, c, heads=h, form=form, k=k, key_dim=16 if with_keys else None, has_cls=has_cls, dtype=dtype)
    with poisoned_allocations():
        res = run(backend, case)
    check_against_reference(case, res)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["full", "rows", "scores"])
@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "nokeys"])
def test_tie_rules_exact_on_lattice_inputs(backend, dtype, form, has_cls, with_keys):
    # Scores and similarities are exact in any summation order and ties are frequent: choices must be identical.
    case = make_case(3, 201, 64, heads=5, form=form, k=40, key_dim=16 if with_keys else None,
                     has_cls=has_cls, dtype=dtype, lattice=True)
    check_against_reference(case, run(backend, case), exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "k,contextual,has_cls",
    [(16, 0, True), (16, 0, False), (16, 16, False), (1, 0, True), (33, 32, True), (61, None, True), (61, 40, False)],
)
def test_budget_splits(backend, k, contextual, has_cls):
    case = make_case(2, 61, 24, k=k, contextual=contextual, has_cls=has_cls)
    with poisoned_allocations():
        res = run(backend, case)
    check_against_reference(case, res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_and_signed_zero_scores(backend):
    n = 40
    scores = torch.rand(2, n)
    scores[:, 3] = scores[:, 7] = float("nan")
    scores[:, 5] = float("inf")
    scores[:, 9] = float("-inf")
    scores[:, 10], scores[:, 11] = -0.0, 0.0
    scores[1, 12:] = float("nan")  # more NaNs than non-NaN candidates in image 1
    hidden, keys = torch.randn(2, n, 8), torch.randn(2, n, 4)
    case = Case(hidden, scores, 20, keys=keys, contextual=2, has_cls=False)
    res = run(backend, case)
    check_against_reference(case, res, exact=True)
    assert 5 in res.dominant_indices[0].tolist() and 3 not in res.dominant_indices[0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    case = make_case(2, 129, 40, k=32, dtype=torch.float64)
    check_against_reference(case, run(backend, case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_input_dtypes(backend):
    case = make_case(2, 97, 40, k=24, dtype=torch.bfloat16)
    case.attn = case.attn.float()  # attention often arrives in float32 while hidden is bf16
    case.keys = case.keys.half()
    check_against_reference(case, run(backend, case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["full", "rows", "scores"])
def test_non_contiguous_inputs(backend, form):
    case = make_case(3, 65, 48, form=form, k=16)
    contiguous = run(backend, case)
    strided = Case(
        hidden=case.hidden.transpose(1, 2).contiguous().transpose(1, 2),
        attn=case.attn.transpose(-1, -2).contiguous().transpose(-1, -2)[..., :],
        k=case.k,
        keys=torch.stack([case.keys, case.keys], dim=-1)[..., 0],
        has_cls=case.has_cls,
    )
    assert not strided.hidden.is_contiguous() and not strided.keys.is_contiguous()
    if form != "scores":
        assert not strided.attn.is_contiguous()
    res = run(backend, strided)
    for a, b in zip(contiguous, res):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])  # B=1: loops inside the image go parallel; B=3: batch-parallel
def test_cpu_kernel_is_deterministic_across_runs_and_threads(dtype, batch):
    case = make_case(batch, 577, 256, heads=16, form="full", k=64, dtype=dtype, has_cls=False)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 4, 1):
            torch.set_num_threads(t)
            results.append(run("cpu", case))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_cpu_kernel_batch_parallel_equals_per_image():
    # B >= threads takes the batch-parallel path, B = 1 the intra-image path: same bits.
    case = make_case(6, 300, 64, k=48)
    whole = run("cpu", case)
    for i in range(6):
        one = vz.compress(case.hidden[i : i + 1], case.attn[i : i + 1], case.k, keys=case.keys[i : i + 1],
                          backend="cpu", return_indices=True)
        for a, b in zip(whole, one):
            assert torch.equal(a[i : i + 1], b)


def test_empty_batch():
    case = make_case(1, 20, 8, k=8)
    res = run("cpu", Case(case.hidden[:0], case.attn[:0], 8, keys=case.keys[:0]))
    assert res.output.shape == (0, 8, 8) and res.token_map.shape == (0, 20)


def test_default_backend_and_available_backends():
    assert vz.available_backends("cpu")[:2] == ["cpu", "reference"]
    case = make_case(1, 30, 8, k=8)
    out = vz.compress(case.hidden, case.attn, 8, keys=case.keys)
    assert torch.equal(out, torch.ops.visionzip.compress(case.hidden, case.attn, 8, keys=case.keys))
    with pytest.raises(ValueError, match="backend"):
        vz.compress(case.hidden, case.attn, 8, backend="tpu")
    with pytest.raises(ValueError, match="not available"):
        vz.compress(case.hidden, case.attn, 8, backend="cuda")


# ------------------------------------------------------------------------------------------------
# Bad inputs: the Python API raises ValueError naming the argument; the C++ op raises RuntimeError.
# ------------------------------------------------------------------------------------------------

_h, _a, _kk = torch.randn(2, 10, 8), torch.rand(2, 3, 10, 10), torch.randn(2, 10, 4)
BAD_INPUTS = {
    "hidden rank": (dict(hidden=torch.randn(10, 8)), "hidden"),
    "attn rank": (dict(attn=torch.rand(2, 3, 10, 10, 1)), "attn"),
    "attn batch": (dict(attn=torch.rand(3, 3, 10, 10)), "attn"),
    "attn tokens": (dict(attn=torch.rand(2, 3, 10, 9)), "attn"),
    "attn rows tokens": (dict(attn=torch.rand(2, 3, 11)), "attn"),
    "attn scores batch": (dict(attn=torch.rand(1, 10)), "attn"),
    "keys batch": (dict(keys=torch.randn(1, 10, 4)), "keys"),
    "keys tokens": (dict(keys=torch.randn(2, 9, 4)), "keys"),
    "keys rank": (dict(keys=torch.randn(2, 10)), "keys"),
    "hidden int": (dict(hidden=torch.ones(2, 10, 8, dtype=torch.int32)), "hidden"),
    "attn int": (dict(attn=torch.ones(2, 3, 10, 10, dtype=torch.int64)), "attn"),
    "keys bool": (dict(keys=torch.ones(2, 10, 4, dtype=torch.bool)), "keys"),
    "attn device": (dict(attn=torch.rand(2, 3, 10, 10, device="meta")), "device"),
    "k zero": (dict(k=0), "k"),
    "k above N": (dict(k=11), "k"),
    "contextual negative": (dict(contextual=-1), "contextual"),
    "contextual above k": (dict(k=5, contextual=6, has_cls=False), "contextual"),
    "no dominant with cls": (dict(k=5, contextual=5, has_cls=True), "dominant budget"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    override, match = BAD_INPUTS[name]
    args = dict(hidden=_h, attn=_a, k=4, keys=_kk, contextual=None, has_cls=True) | override
    with pytest.raises(ValueError, match=match):
        vz.compress(**args)
    with pytest.raises(ValueError, match=match):
        vz.compress_reference(**args)
    if name != "attn device":  # the meta tensor would route the op to the fake kernel
        with pytest.raises(RuntimeError, match="visionzip::compress"):
            torch.ops.visionzip.compress(args.pop("hidden"), args.pop("attn"), args.pop("k"), **args)


def test_bad_input_under_fake_tensors_raises_value_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        h, a = mode.from_tensor(_h), mode.from_tensor(_a)
        with pytest.raises(ValueError, match="k must satisfy"):
            torch.ops.visionzip.compress(h, a, 11)


# ------------------------------------------------------------------------------------------------
# Custom-op contract: opcheck, fake kernels, torch.compile.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["compress", "compress_with_indices"])
@pytest.mark.parametrize("form", ["full", "rows", "scores"])
def test_opcheck(op, form):
    case = make_case(2, 45, 12, form=form, k=12)
    torch.library.opcheck(
        getattr(torch.ops.visionzip, op).default,
        (case.hidden, case.attn, case.k),
        dict(keys=case.keys, contextual=3, has_cls=True),
    )
    torch.library.opcheck(getattr(torch.ops.visionzip, op).default, (case.hidden, case.attn, 9), dict(has_cls=False))
    # with a differentiable input, opcheck also checks the autograd registration
    torch.library.opcheck(getattr(torch.ops.visionzip, op).default,
                          (case.hidden.clone().requires_grad_(), case.attn, case.k), dict(keys=case.keys))


def test_torch_compile_fullgraph():
    case = make_case(2, 81, 32, k=16)

    @torch.compile(fullgraph=True, backend="inductor")
    def pipeline(hidden, attn, keys):
        res = vz.compress(hidden * 2, attn, 16, keys=keys, return_indices=True)
        return res.output + 1, res.token_map

    out, tmap = pipeline(case.hidden, case.attn, case.keys)
    ref = vz.compress(case.hidden * 2, case.attn, 16, keys=case.keys, return_indices=True)
    torch.testing.assert_close(out, ref.output + 1)
    assert torch.equal(tmap, ref.token_map)


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("has_cls,contextual", [(True, None), (False, None), (True, 0), (False, 8)])
def test_hidden_gradient_matches_reference_autograd(backend, has_cls, contextual):
    # Only hidden is differentiable (the choices are discrete): kept rows pass their gradient back,
    # members get 1/count of their contextual row's. The reference gets it from autograd of its gathers.
    if backend not in vz.available_backends("cpu"):
        pytest.skip("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    dtype = torch.float32 if backend == "triton" else torch.float64  # triton takes no float64
    tol = dict(rtol=1e-6, atol=1e-6) if backend == "triton" else dict(rtol=1e-12, atol=1e-12)
    case = make_case(2, 61, 12, k=20, contextual=contextual, has_cls=has_cls, dtype=dtype)
    grad = torch.randn(2, 20, 12, dtype=dtype)
    grads = []
    for indices in (False, True, "reference"):
        h = case.hidden.clone().requires_grad_()
        if indices == "reference":
            out = vz.compress_reference(h, case.attn, case.k, keys=case.keys, contextual=contextual, has_cls=has_cls)[0]
        else:
            out = vz.compress(h, case.attn, case.k, keys=case.keys, contextual=contextual, has_cls=has_cls,
                              backend=backend, return_indices=indices)
            out = out[0] if indices else out
        (out * grad).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[2], **tol)
    torch.testing.assert_close(grads[1], grads[2], **tol)
    assert grads[0].abs().sum() > 0


def test_float64_backends_are_filtered():
    assert vz.available_backends("cpu", torch.float64)[:2] == ["cpu", "reference"]
    cuda = vz.available_backends("cuda", torch.float64)
    assert "cuda" not in cuda and "triton" not in cuda and cuda[-1] == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_and_offset_inputs(backend):
    # stride-0 (expanded) tensors and views with a storage offset read the same values as dense copies
    base = make_case(1, 50, 16, k=12, heads=2)
    big = make_case(3, 50, 16, k=12, heads=2)
    case = Case(hidden=base.hidden.expand(2, -1, -1), attn=big.attn[1:], k=12, keys=big.keys[1:, :, 4:12])
    assert case.hidden.stride(0) == 0 and case.attn.storage_offset() > 0 and case.keys.storage_offset() > 0
    res = run(backend, case)
    check_against_reference(case, res)
    dense = Case(case.hidden.contiguous(), case.attn.contiguous(), 12, keys=case.keys.contiguous())
    for a, b in zip(res, run(backend, dense)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_hidden_with_float32_attention_and_keys(backend):
    case = make_case(2, 77, 24, k=20, dtype=torch.float64)
    case.attn, case.keys = case.attn.float(), case.keys.float()
    check_against_reference(case, run(backend, case))
