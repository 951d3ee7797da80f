"""The compress contract (docs/spec.md "Compress"), for every backend through one fixture.

``compress_backend`` (tests/conftest.py) yields each backend the registry declares, on each device
type it runs on: cpu, reference and triton (its interpreter) on CPU tensors here; cuda, triton and
reference on CUDA tensors where a GPU is present (GPU tests, skipped and counted otherwise). Every
result is compared with the float64 oracle (tests/helpers.py) on fresh random inputs with poisoned
outputs; lattice inputs pin the tie rules. Backend-specific mechanics (thread determinism, channel
splits, the CUDA emulation, build checks) live in test_cpu.py, test_triton.py, test_cuda*.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import visionzip_kernels as vz
from tests.helpers import (
    BackendUnderTest,
    Case,
    backend_params,
    check_against_reference,
    require,
    make_case,
    poisoned_allocations,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = ["full", "rows", "scores"]

# (B, N, C, H, has_cls, k): N deliberately not a power of two; B > 1.
SHAPES = [
    (1, 577, 1024, 16, True, 64),  # LLaVA-1.5
    (3, 577, 96, 16, True, 128),
    (2, 729, 72, 4, False, 64),  # SigLIP-384, no CLS
    (5, 1025, 40, 1, True, 192),  # CLIP-448, one head
    (4, 37, 33, 3, True, 10),
    (2, 50, 17, 2, False, 7),
    (1, 5, 3, 1, True, 5),  # k = N
]
# The interpreter runs each program instance in Python: small shapes (still odd, batched, chunked).
INTERPRETER_SHAPES = [
    (2, 37, 33, 3, True, 16),
    (1, 65, 33, 4, True, 24),
    (3, 129, 20, 2, True, 40),
    (2, 50, 33, 2, False, 20),
    (1, 37, 17, 3, False, 12),
    (1, 5, 3, 1, True, 5),
]
# On a GPU: the real workloads, N up to 4097.
GPU_SHAPES = SHAPES + [(32, 577, 64, 16, True, 192), (5, 729, 64, 16, False, 128), (1, 4097, 64, 4, True, 512),
                       (1, 4097, 64, 4, False, 256)]


def shapes_for(bk: BackendUnderTest) -> list[tuple]:
    if bk.interpreted:
        return INTERPRETER_SHAPES
    return GPU_SHAPES if bk.device == "cuda" else SHAPES


def shape_id(s: tuple) -> str:
    return "x".join(map(str, s[:4])) + ("cls" if s[4] else "nocls")


def case_for(bk: BackendUnderTest, *args, **kwargs) -> Case:
    return make_case(*args, device=bk.device, **kwargs)


# ------------------------------------------------------------------------------------------------
# Against the oracle
# ------------------------------------------------------------------------------------------------


def _backend_shape_params() -> list:
    """(backend, shape) pairs: each backend with its own shape list."""
    return [
        pytest.param(p.values[0], shape, id=f"{p.id}-{shape_id(shape)}", marks=p.marks)
        for p in backend_params()
        for shape in shapes_for(p.values[0])
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "nokeys"])
@pytest.mark.parametrize("bk,shape", _backend_shape_params())
def test_matches_oracle(bk, shape, dtype, form, with_keys):
    compress_backend = require(bk)
    b, n, c, h, has_cls, k = shape
    case = case_for(compress_backend, b, n, c, heads=h, form=form, k=k, key_dim=16 if with_keys else None,
                    has_cls=has_cls, dtype=dtype)
    with poisoned_allocations():
        res = compress_backend.run(case)
    check_against_reference(case, res)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "nokeys"])
def test_tie_rules_exact_on_lattice_inputs(compress_backend, dtype, form, has_cls, with_keys):
    """Scores and similarities exact in any summation order, ties frequent: identical choices."""
    n = 61 if compress_backend.interpreted else 201
    case = case_for(compress_backend, 3, n, 64, heads=5, form=form, k=n // 5, key_dim=16 if with_keys else None,
                    has_cls=has_cls, dtype=dtype, lattice=True)
    check_against_reference(case, compress_backend.run(case), exact=True)


@pytest.mark.parametrize(
    "k,contextual,has_cls",
    [(16, 0, True), (16, 0, False), (16, 16, False), (1, 0, True), (1, 1, False), (33, 32, True), (61, None, True),
     (61, 40, False), (61, 0, False), (61, 3, True)],
)
def test_budget_splits(compress_backend, k, contextual, has_cls):
    """Pure pruning (Cx = 0), pure merging (D = 0, no CLS), k = 1, many targets, k = N."""
    case = case_for(compress_backend, 2, 61, 24, k=k, contextual=contextual, has_cls=has_cls)
    with poisoned_allocations():
        res = compress_backend.run(case)
    check_against_reference(case, res)
    if contextual == 0:
        assert int((res.token_map == -1).sum()) == 2 * (61 - k)


@pytest.mark.parametrize(
    "n,k,cx,has_cls",
    [(40, 40, 0, False), (40, 40, 3, True), (1, 1, 0, True), (1, 1, 1, False), (7, 7, 7, False), (9, 5, 4, True)],
)
def test_degenerate_budgets(compress_backend, n, k, cx, has_cls):
    """k = N, a single token, only contextual tokens, more targets than members."""
    case = case_for(compress_backend, 2, n, 5, k=k, contextual=cx, has_cls=has_cls, form="rows")
    with poisoned_allocations():
        res = compress_backend.run(case)
    check_against_reference(case, res)


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_nan_inf_and_signed_zero_scores(compress_backend, has_cls):
    """NaN ranks below every number, -0.0 ties +0.0, +-inf are ordinary extremes (docs/spec.md
    "Ties and NaN"); an all-NaN image keeps its lowest indices."""
    n = 50
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 8, (3, n), generator=g).float() / 8
    scores[0, ::3] = float("nan")
    scores[0, 5], scores[0, 6], scores[0, 7] = 0.0, -0.0, 0.0
    scores[1, :] = float("nan")
    scores[1, 30] = -0.0
    scores[2, 3], scores[2, 4], scores[2, 9] = float("inf"), float("-inf"), float("inf")
    scores[2, 10:30] = -0.0
    scores[2, 30:] = 0.0
    base = make_case(3, n, 16, k=20, seed=1, lattice=True)
    case = Case(base.hidden, scores, 20, keys=base.keys, contextual=4, has_cls=has_cls)
    case = Case(*(t.to(compress_backend.device) for t in (case.hidden, case.attn)), 20,
                keys=case.keys.to(compress_backend.device), contextual=4, has_cls=has_cls)
    res = compress_backend.run(case)
    check_against_reference(case, res, exact=True)
    if not has_cls:
        assert 3 in res.dominant_indices[2].tolist() and 4 not in res.dominant_indices[2].tolist()


def test_identical_attention_columns_tie_to_the_lower_index(compress_backend):
    """Bitwise equal attention columns (uniform background, padding) get equal scores, so the tie
    rule decides: the lower index is kept. For every form and N mod vector width (a plain
    ``attn.sum(dim=1)`` rounds the last columns differently and broke this in the reference)."""
    for n in (61, 64, 77) if compress_backend.interpreted else (61, 64, 577, 729):
        g = torch.Generator().manual_seed(n)
        for form, has_cls in (("rows", True), ("full", True), ("full", False)):
            attn = torch.rand((1, 16, n) if form == "rows" else (1, 16, n, n), generator=g)
            twin = n - 1  # the last column: a copy of column 5, both well above every other column
            attn[..., 5] = attn[..., 5] * 0.1 + 2.0
            attn[..., twin] = attn[..., 5]
            k = 2 if has_cls else 1  # room for the CLS token and one of the pair
            dev = compress_backend.device
            case = Case(torch.randn(1, n, 8, generator=g).to(dev), attn.to(dev), k, contextual=0, has_cls=has_cls)
            kept = compress_backend.run(case).dominant_indices[0].tolist()
            assert 5 in kept and twin not in kept, (form, n, kept)


@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_nan_metric_rows_rank_lowest(compress_backend, has_cls):
    """A NaN metric row is assigned to target 0; a NaN target never attracts a finite row."""
    case = case_for(compress_backend, 1, 60, 16, k=20, form="rows", lattice=True, has_cls=has_cls, seed=3)
    first = compress_backend.run(case)
    targets = first.contextual_indices[0].tolist()
    d = first.dominant_indices.shape[1]
    member = next(j for j in range(60) if int(first.token_map[0, j]) >= d and j not in targets)
    case.keys[0, targets[1]] = float("nan")
    case.keys[0, member] = float("nan")
    res = compress_backend.run(case)
    check_against_reference(case, res, exact=True)
    assert int(res.token_map[0, member]) == d  # NaN row -> target 0


@pytest.mark.parametrize("form", ["full", "rows"])
def test_heads_summed_in_order(compress_backend, form):
    """Scores are float32 sums over heads in order h = 0..H-1 (docs/spec.md "Scores of the tokens").

    Token 5 gets 1.0 from head 0 and 2**-24 from each of the 15 other heads: summed in order it stays
    1.0 (each addition rounds back to even), summed in any other order it exceeds token 9's 1 + 2**-23.
    """
    case = case_for(compress_backend, 2, 40, 8, heads=16, k=4, contextual=2, form=form)
    rows = torch.zeros(2, 16, 40, device=compress_backend.device)
    rows[:, 0, :] = 0.01
    rows[:, 0, 5] = 1.0
    rows[:, 1:, 5] = 2.0**-24
    rows[:, 0, 9] = 1.0 + 2.0**-23
    if form == "full":
        case.attn.zero_()
        case.attn[:, :, 0, :] = rows
    else:
        case.attn = rows
    res = compress_backend.run(case)
    assert res.dominant_indices.tolist() == [[0, 9]] * 2
    check_against_reference(case, res)  # the float64 oracle prefers token 5: a near tie it accepts


# ------------------------------------------------------------------------------------------------
# Dtypes, strides, batch edge cases
# ------------------------------------------------------------------------------------------------


def test_float64_inputs(compress_backend):
    case = case_for(compress_backend, 2, 129, 40, k=32, dtype=torch.float64)
    if not compress_backend.takes(torch.float64):
        with pytest.raises(ValueError, match="float64"):
            compress_backend.run(case)
        return
    check_against_reference(case, compress_backend.run(case))
    case.attn, case.keys = case.attn.float(), case.keys.float()  # float64 hidden, float32 attn / keys
    check_against_reference(case, compress_backend.run(case))


@pytest.mark.parametrize("hidden_dtype,attn_dtype,keys_dtype",
                         [(torch.bfloat16, torch.float32, torch.float16), (torch.float16, torch.float32, torch.float64),
                          (torch.float32, torch.float64, torch.float64)])
def test_mixed_input_dtypes(compress_backend, hidden_dtype, attn_dtype, keys_dtype):
    """Attention often arrives in float32 while hidden is 16-bit; keys in any float dtype."""
    case = case_for(compress_backend, 2, 97, 40, k=24, dtype=hidden_dtype)
    case.attn, case.keys = case.attn.to(attn_dtype), case.keys.to(keys_dtype)
    check_against_reference(case, compress_backend.run(case))


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_inputs(compress_backend, form):
    case = case_for(compress_backend, 3, 65, 48, form=form, k=16)
    contiguous = compress_backend.run(case)
    strided = Case(
        hidden=case.hidden.transpose(1, 2).contiguous().transpose(1, 2),
        attn=case.attn.transpose(-1, -2).contiguous().transpose(-1, -2),
        k=case.k,
        keys=torch.stack([case.keys, case.keys], dim=-1)[..., 0],
        has_cls=case.has_cls,
    )
    assert not strided.hidden.is_contiguous() and not strided.keys.is_contiguous()
    if form != "scores":
        assert not strided.attn.is_contiguous()
    for a, b in zip(contiguous, compress_backend.run(strided)):
        assert torch.equal(a, b)


def test_expanded_and_offset_inputs(compress_backend):
    """Stride-0 (expanded) tensors and views with a storage offset read the same values as copies."""
    base = case_for(compress_backend, 1, 50, 16, k=12, heads=2)
    big = case_for(compress_backend, 3, 50, 16, k=12, heads=2)
    case = Case(hidden=base.hidden.expand(2, -1, -1), attn=big.attn[1:], k=12, keys=big.keys[1:, :, 4:12])
    assert case.hidden.stride(0) == 0 and case.attn.storage_offset() > 0 and case.keys.storage_offset() > 0
    res = compress_backend.run(case)
    check_against_reference(case, res)
    dense = Case(case.hidden.contiguous(), case.attn.contiguous(), 12, keys=case.keys.contiguous())
    for a, b in zip(res, compress_backend.run(dense)):
        assert torch.equal(a, b)


def test_empty_batch(compress_backend):
    case = case_for(compress_backend, 1, 20, 8, k=8)
    res = compress_backend.run(Case(case.hidden[:0], case.attn[:0], 8, keys=case.keys[:0]))
    assert res.output.shape == (0, 8, 8) and res.dominant_indices.shape == (0, 7)
    assert res.contextual_indices.shape == (0, 1) and res.token_map.shape == (0, 20)


def test_deterministic(compress_backend):
    """The same inputs give bit-identical outputs run to run (docs/spec.md "Numerics")."""
    for has_cls in (True, False):
        case = case_for(compress_backend, 2, 65, 33, k=24, form="full", has_cls=has_cls, key_dim=None)
        first = compress_backend.run(case)
        for _ in range(2):
            for a, b in zip(first, compress_backend.run(case)):
                assert torch.equal(a, b)


def test_output_only_equals_with_indices(compress_backend):
    case = case_for(compress_backend, 2, 45, 24, k=12)
    out = vz.compress(case.hidden, case.attn, case.k, keys=case.keys, backend=compress_backend.name)
    assert torch.equal(out, compress_backend.run(case).output)


# ------------------------------------------------------------------------------------------------
# Autograd, torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_cls,contextual", [(True, None), (False, None), (True, 0), (False, 8)])
def test_hidden_gradient_matches_reference_autograd(compress_backend, has_cls, contextual):
    """Only hidden is differentiable (the choices are discrete): kept rows pass their gradient back,
    members get 1/count of their contextual row's. The reference gets it from autograd of its gathers."""
    f64 = compress_backend.takes(torch.float64)
    dtype = torch.float64 if f64 else torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if f64 else dict(rtol=1e-6, atol=1e-6)
    case = case_for(compress_backend, 2, 61, 12, k=20, contextual=contextual, has_cls=has_cls, dtype=dtype)
    grad = torch.randn(2, 20, 12, dtype=dtype, device=compress_backend.device)
    grads = []
    for indices in (False, True, "oracle"):
        h = case.hidden.clone().requires_grad_()
        if indices == "oracle":
            out = vz.compress_reference(h, case.attn, case.k, keys=case.keys, contextual=contextual,
                                        has_cls=has_cls).output
        else:
            out = vz.compress(h, case.attn, case.k, keys=case.keys, contextual=contextual, has_cls=has_cls,
                              backend=compress_backend.name, return_indices=indices)
            out = out[0] if indices else out
        (out * grad).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[2], **tol)
    torch.testing.assert_close(grads[1], grads[2], **tol)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("return_indices", [False, True])
def test_torch_compile_fullgraph(compress_backend, return_indices):
    case = case_for(compress_backend, 2, 81, 32, k=16)

    def pipeline(hidden, attn, keys):
        res = vz.compress(hidden * 2, attn, 16, keys=keys, backend=compress_backend.name,
                          return_indices=return_indices)
        return (res.output + 1, res.token_map) if return_indices else res + 1

    torch._dynamo.reset()
    got = torch.compile(pipeline, fullgraph=True)(case.hidden, case.attn, case.keys)
    want = pipeline(case.hidden, case.attn, case.keys)
    for g, w in zip(*((got, want) if return_indices else ((got,), (want,)))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_dynamic_shapes_compile_once():
    """vz.compress under torch.compile(dynamic=True, fullgraph=True): one graph for every (B, N).

    Formatting an error message with symbolic sizes before a check fails would guard on them and
    recompile for each new N (and hit the recompile limit at the 9th)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=True, fullgraph=True)
    def f(hidden, attn, keys):
        return vz.compress(hidden, attn, 16, keys=keys, return_indices=True)

    for i, n in enumerate((40, 41, 57, 64, 77, 100, 129, 130, 201, 257)):
        case = make_case(1 + i % 3, n, 8, k=16, form=FORMS[i % 3], seed=n)
        got = f(case.hidden, case.attn, case.keys)
        want = vz.compress(case.hidden, case.attn, 16, keys=case.keys, return_indices=True)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert counter.frame_count == 3, counter.frame_count  # one graph per attn form (its rank differs)


# ------------------------------------------------------------------------------------------------
# Selection and errors (the API, the oracle and the C++ op apply one set of rules)
# ------------------------------------------------------------------------------------------------


def test_default_backend_and_available_backends():
    assert vz.available_backends("cpu")[:2] == ["cpu", "reference"]
    assert vz.available_backends("cpu", torch.float64)[:2] == ["cpu", "reference"]
    cuda = vz.available_backends("cuda", torch.float64)
    assert "cuda" not in cuda and "triton" not in cuda and cuda[-1] == "reference"
    assert vz.available_backends("meta") == ["reference"]
    case = make_case(1, 30, 8, k=8)
    out = vz.compress(case.hidden, case.attn, 8, keys=case.keys)
    assert torch.equal(out, torch.ops.visionzip.compress(case.hidden, case.attn, 8, keys=case.keys))
    with pytest.raises(ValueError, match="backend must be one of"):
        vz.compress(case.hidden, case.attn, 8, backend="tpu")
    with pytest.raises(ValueError, match="not available"):
        vz.compress(case.hidden, case.attn, 8, backend="cuda")


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


# (k, contextual, has_cls) of the wrong type (docs/spec.md "Arguments"): the Python entries reject
# each; the compiled ops reject all but a number or numpy bool as has_cls, which the dispatcher
# converts to a bool before any code of the package runs (the schema's `bool?`).
BAD_ARGUMENT_TYPES = {
    "k bool": (dict(k=True), "k must be an int", True),
    "k float": (dict(k=4.0), "k must be an int", True),
    "k numpy int": (dict(k=np.int64(4)), "k must be an int|Expected a value of type 'number'", True),
    "contextual bool": (dict(contextual=False), "contextual must be an int", True),
    "contextual float": (dict(contextual=1.0), "contextual must be an int", True),
    "has_cls None": (dict(has_cls=None), "has_cls must be a bool", True),
    "has_cls str": (dict(has_cls="yes"), "has_cls must be a bool|Expected a value of type 'Optional\\[bool\\]'",
                    True),
    "has_cls int": (dict(has_cls=1), "has_cls must be a bool", False),
    "has_cls numpy bool": (dict(has_cls=np.bool_(True)), "has_cls must be a bool", False),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENT_TYPES))
def test_argument_types_one_rule_everywhere(name):
    """The API, the oracle, the C++ ops and the Triton ops reject the same argument types: a bool
    passed as k is not silently k = 1, None is not silently has_cls = False."""
    override, match, op_rejects = BAD_ARGUMENT_TYPES[name]
    args = dict(k=4, contextual=None, has_cls=True) | override
    python_match = match.split("|")[0]
    with pytest.raises(ValueError, match=python_match):
        vz.compress(_h, _a, **args)
    with pytest.raises(ValueError, match=python_match):
        vz.compress_reference(_h, _a, **args)
    k = args.pop("k")
    ops = [lambda: torch.ops.visionzip.compress(_h, _a, k, **args),
           lambda: torch.ops.visionzip.compress_with_indices(_h, _a, k, **args)]
    if "triton" in vz.available_backends("cpu"):
        ops.append(lambda: torch.ops.visionzip.compress_triton(_h, _a, k, None, args["contextual"], args["has_cls"]))
    for call in ops:
        if op_rejects:
            with pytest.raises((ValueError, RuntimeError), match=match):
                call()
        else:
            out = call()
            assert (out[0] if isinstance(out, tuple) else out).shape == (2, 4, 8)


def test_bad_input_under_fake_tensors_raises_value_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        h, a = mode.from_tensor(_h), mode.from_tensor(_a)
        with pytest.raises(ValueError, match="k must satisfy"):
            torch.ops.visionzip.compress(h, a, 11)
        with pytest.raises(ValueError, match="k must be an int"):
            torch.ops.visionzip.compress(h, a, True)


# ------------------------------------------------------------------------------------------------
# Custom-op contract of the C++ ops (their CPU kernels; the GPU ones in test_cuda.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["compress", "compress_with_indices"])
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(op, form):
    case = make_case(2, 45, 12, form=form, k=12)
    fn = getattr(torch.ops.visionzip, op).default
    torch.library.opcheck(fn, (case.hidden, case.attn, case.k), dict(keys=case.keys, contextual=3, has_cls=True))
    torch.library.opcheck(fn, (case.hidden, case.attn, 9), dict(has_cls=False))
    # with a differentiable input, opcheck also checks the autograd registration
    torch.library.opcheck(fn, (case.hidden.clone().requires_grad_(), case.attn, case.k), dict(keys=case.keys))
