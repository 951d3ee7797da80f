"""The group_pool contract (docs/spec.md "Group pool"), for every backend through one fixture.

``group_pool_backend`` (tests/conftest.py) yields each backend the registry declares for the op, on
each device type it runs on: cpu, reference and triton (its interpreter) on CPU tensors here; cuda,
triton and reference on CUDA tensors where a GPU is present (GPU tests, skipped and counted
otherwise). Labels and counts are exact comparisons, so they must equal the oracle's bit for bit; the
output is compared with the float64 oracle applied to them, with outputs allocated poisoned. The
gradients are checked against autograd of the dense straight-through formula in float64. The CUDA
kernel's block algorithm runs under the host emulation in tests/test_cuda_emulation.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import visionzip_kernels as vz
from tests.helpers import OUT_TOL, BackendUnderTest, backend_params, poisoned_allocations, require
from visionzip_kernels.reference import group_labels

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (B, M, N, C): N of CLIP-L/336 (577), SigLIP-384 (729) and CLIP-L/448 (1025); M not a power of two.
SHAPES = [(2, 64, 577, 96), (3, 37, 729, 40), (2, 100, 1025, 24), (4, 7, 50, 17), (1, 1, 5, 3), (2, 300, 40, 8)]
# The interpreter runs each program instance in Python: smaller (still odd, batched) shapes.
INTERPRETER_SHAPES = [(2, 37, 577, 24), (1, 29, 729, 16), (1, 70, 1025, 8), (3, 13, 37, 33), (1, 1, 5, 3),
                      (2, 50, 20, 8)]
GPU_SHAPES = SHAPES + [(8, 64, 576, 1024), (32, 64, 729, 1152), (1, 256, 4096, 64)]


def shapes_for(bk: BackendUnderTest) -> list[tuple]:
    if bk.interpreted:
        return INTERPRETER_SHAPES
    return GPU_SHAPES if bk.device == "cuda" else SHAPES


def make_inputs(b, m, n, c, *, dtype=torch.float32, logits_dtype=None, device="cpu", seed=None):
    """Fresh random (logits (B, M, N), values (B, N, C)); logits in ``logits_dtype`` (values' if None)."""
    seed = random.randrange(2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, m, n, generator=g) * 2
    values = torch.randn(b, n, c, generator=g)
    return logits.to(device=device, dtype=logits_dtype or dtype), values.to(device=device, dtype=dtype)


def expected_output(logits: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """The contract's arithmetic in float64 on the given labels (segmented sum / (count + eps))."""
    b, m, _ = logits.shape
    v, lab = values.double().cpu(), labels.cpu()
    sums = torch.zeros(b, m, v.shape[2], dtype=torch.float64).scatter_add_(1, lab.unsqueeze(-1).expand_as(v), v)
    counts = torch.zeros(b, m, dtype=torch.float64).scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float64))
    return (sums / (counts + eps).unsqueeze(-1)).to(values.dtype)


def check_result(res: vz.GroupPoolResult, logits: torch.Tensor, values: torch.Tensor, eps: float = 1.0) -> None:
    """Shapes and dtypes; labels (exact comparisons) and counts equal to the oracle's; output within the
    dtype's tolerance of the float64 arithmetic on those labels."""
    b, m, n = logits.shape
    c = values.shape[2]
    assert res.output.shape == (b, m, c) and res.output.dtype == values.dtype
    assert res.labels.shape == (b, n) and res.labels.dtype == torch.long
    assert res.counts.shape == (b, m) and res.counts.dtype == torch.long
    assert res.output.device == values.device
    want_labels = group_labels(logits.cpu())
    assert torch.equal(res.labels.cpu(), want_labels)
    want_counts = torch.zeros(b, m, dtype=torch.long).scatter_add_(1, want_labels, torch.ones_like(want_labels))
    assert torch.equal(res.counts.cpu(), want_counts)
    torch.testing.assert_close(res.output.cpu(), expected_output(logits, values, want_labels, eps),
                               **OUT_TOL[values.dtype])


def _backend_shape_params() -> list:
    return [
        pytest.param(p.values[0], shape, id=f"{p.id}-" + "x".join(map(str, shape)), marks=p.marks)
        for p in backend_params("group_pool")
        for shape in shapes_for(p.values[0])
    ]


def _run(bk: BackendUnderTest, logits, values, **kw) -> vz.GroupPoolResult:
    if not bk.takes(values.dtype, "group_pool"):
        with pytest.raises(ValueError, match="float64"):
            bk.group_pool(logits, values, **kw)
        pytest.skip(f"{bk.name} does not take {values.dtype} values (raises ValueError, checked)")
    return bk.group_pool(logits, values, **kw)


# ------------------------------------------------------------------------------------------------
# Against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bk,shape", _backend_shape_params())
def test_matches_oracle(bk, shape, dtype):
    bk = require(bk, "group_pool")
    logits, values = make_inputs(*shape, dtype=dtype, device=bk.device)
    with poisoned_allocations():
        res = _run(bk, logits, values)
    check_result(res, logits, values)
    out = vz.group_pool(logits, values, backend=bk.name)  # the output-only path
    assert torch.equal(out, res.output)


def test_ties_nan_inf_and_signed_zero(group_pool_backend):
    """Ties go to the lower group, NaN ranks below every number (an all-NaN column gets group 0),
    -0.0 ties +0.0, +-inf are ordinary extremes (docs/spec.md "Ties and NaN")."""
    bk = group_pool_backend
    g = torch.Generator().manual_seed(0)
    b, m, n = 2, 6, 40
    logits = (torch.randint(0, 3, (b, m, n), generator=g) / 2).float()  # many exact ties
    logits[0, :, 0] = float("nan")  # all NaN -> 0
    logits[0, :, 1] = torch.tensor([float("nan"), 1.0, float("nan"), 1.0, 0.5, 1.0])  # -> 1
    logits[0, :, 2] = torch.tensor([-0.0, 0.0, -0.0, -1.0, -2.0, float("nan")])  # -> 0
    logits[0, :, 3] = torch.tensor([0.0, -0.0, 0.0, -1.0, -2.0, -3.0])  # -> 0
    logits[0, :, 4] = float("-inf")  # all -inf -> 0
    logits[0, :, 5] = torch.tensor([float("nan"), float("-inf"), float("-inf"), -5.0, float("nan"), -5.0])  # -> 3
    logits[0, :, 6] = torch.tensor([1.0, float("inf"), 2.0, float("inf"), float("nan"), 0.0])  # -> 1
    logits[1, :, :] = 0.0  # every column tied -> group 0 for all; groups 1..5 empty
    values = torch.randn(b, n, 8, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        lg, v = logits.to(device=bk.device, dtype=dtype), values.to(device=bk.device)
        res = bk.group_pool(lg, v)
        assert res.labels[0, :7].tolist() == [0, 1, 0, 0, 0, 3, 1], dtype
        assert (res.labels[1] == 0).all()
        check_result(res, lg, v)


def test_empty_groups_are_exactly_zero(group_pool_backend):
    """A group without members has count 0 and output 0 / (0 + eps) = 0 exactly (eps > 0)."""
    bk = group_pool_backend
    logits, values = make_inputs(3, 11, 50, 24, device=bk.device, seed=1)
    logits[:, 5:, :] = -1e4  # groups 5..10 never win
    logits[1, 0, :] = 1e4  # image 1: everything in group 0
    with poisoned_allocations():
        res = bk.group_pool(logits, values, eps=1e-6)
    assert (res.counts[:, 5:] == 0).all() and res.counts[1, 0] == 50 and (res.counts[1, 1:] == 0).all()
    assert (res.output[:, 5:] == 0).all() and (res.output[1, 1:] == 0).all()
    check_result(res, logits, values, eps=1e-6)


@pytest.mark.parametrize("eps", [1e-6, 0.5, 1.0, 3, 1e3])
def test_eps(group_pool_backend, eps):
    """out = sum / (count + eps) for any finite eps > 0 (an int too); eps = 1e-6 is nearly the mean."""
    bk = group_pool_backend
    logits, values = make_inputs(2, 9, 61, 16, device=bk.device)
    res = bk.group_pool(logits, values, eps=eps)
    check_result(res, logits, values, eps=float(eps))
    if eps == 1e-6:
        means = expected_output(logits, values, res.labels, 0.0).float()
        full = res.counts.cpu() > 0
        torch.testing.assert_close(res.output.cpu()[full], means[full], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logits_dtype,values_dtype",
                         [(torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                          (torch.bfloat16, torch.float16), (torch.float64, torch.float16),
                          (torch.float16, torch.float64)])
def test_mixed_dtypes(group_pool_backend, logits_dtype, values_dtype):
    """Logits of any float dtype, compared exactly in it: float64 logits that differ beyond float32
    precision still pick the larger one."""
    bk = group_pool_backend
    logits, values = make_inputs(2, 5, 33, 16, dtype=values_dtype, logits_dtype=logits_dtype, device=bk.device)
    if logits_dtype == torch.float64:
        logits.clamp_(max=0.5)
        logits[:, 1, :] = 1.0
        logits[:, 3, :] = 1.0 + 2.0**-40  # equal to 1.0 in float32
    res = _run(bk, logits, values)
    check_result(res, logits, values)
    if logits_dtype == torch.float64:
        assert (res.labels == 3).all()


def test_non_contiguous_and_expanded_inputs(group_pool_backend):
    bk = group_pool_backend
    logits, values = make_inputs(3, 10, 65, 48, device=bk.device)
    want = bk.group_pool(logits, values)
    strided_logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
    strided_values = torch.stack([values, values], dim=-1)[..., 1]
    assert not strided_logits.is_contiguous() and not strided_values.is_contiguous()
    for a, b in zip(want, bk.group_pool(strided_logits, strided_values)):
        assert torch.equal(a, b)
    expanded = bk.group_pool(logits[:1].expand(2, -1, -1), values[1:])  # stride 0, storage offset
    check_result(expanded, logits[:1].expand(2, -1, -1), values[1:])


def test_empty_batch(group_pool_backend):
    bk = group_pool_backend
    logits, values = make_inputs(1, 4, 20, 8, device=bk.device)
    res = bk.group_pool(logits[:0], values[:0])
    assert res.output.shape == (0, 4, 8) and res.labels.shape == (0, 20) and res.counts.shape == (0, 4)


def test_deterministic(group_pool_backend):
    """Bit-identical outputs run to run (docs/spec.md "Numerics")."""
    bk = group_pool_backend
    logits, values = make_inputs(2, 30, 129, 40, device=bk.device)
    first = bk.group_pool(logits, values)
    for _ in range(2):
        for a, b in zip(first, bk.group_pool(logits, values)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3])  # B=1: channel slices in parallel; B=3: images in parallel
def test_cpu_deterministic_across_threads(dtype, batch):
    logits, values = make_inputs(batch, 64, 577, 1024, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 4, 1):
            torch.set_num_threads(t)
            results.append(vz.group_pool(logits, values, backend="cpu", return_labels=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    single = [vz.group_pool(logits[i : i + 1], values[i : i + 1], backend="cpu") for i in range(batch)]
    assert torch.equal(torch.cat(single), results[0].output)  # per image = batched


def test_triton_channel_splits_bit_identical():
    """Several programs per image (channel slices) give exactly the one-program result."""
    bk = require(BackendUnderTest("triton", "cpu"), "group_pool")
    from visionzip_kernels.triton import _utils

    logits, values = make_inputs(2, 9, 70, 72, dtype=torch.float16)
    saved = _utils.CHANNEL_SPLITS
    try:
        _utils.CHANNEL_SPLITS = 1
        one = bk.group_pool(logits, values)
        _utils.CHANNEL_SPLITS = 3
        many = bk.group_pool(logits, values)
    finally:
        _utils.CHANNEL_SPLITS = saved
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    check_result(many, logits, values)


# ------------------------------------------------------------------------------------------------
# Gradients: values exact, logits straight-through (docs/spec.md "Group pool", "Gradients")
# ------------------------------------------------------------------------------------------------


def groupvit_straight_through(logits: torch.Tensor, values: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupViT's assign step written as GroupViT writes it (hard_softmax over the groups, then the
    assignment normalised by its row sums + eps, then the product), no gumbel noise, in float64."""
    soft = logits.softmax(dim=1)
    index = soft.max(dim=1, keepdim=True)[1]
    hard = torch.zeros_like(logits).scatter_(1, index, 1.0)
    assign = hard - soft.detach() + soft
    assign = assign / (assign.sum(dim=-1, keepdim=True) + eps)
    return assign @ values


def test_reference_gradient_is_groupvit_straight_through():
    """The oracle's autograd (one-hot + (soft - soft.detach())) is GroupViT's straight-through
    estimator: same gradients to 1e-10 in float64, same output up to the rounding GroupViT's
    hard - soft + soft adds."""
    logits, values = make_inputs(2, 7, 45, 12, dtype=torch.float64, seed=3)
    grad = torch.randn(2, 7, 12, dtype=torch.float64)
    grads = []
    for fn in (groupvit_straight_through, lambda lg, v, eps: vz.group_pool_reference(lg, v, eps=eps).output):
        lg, v = logits.clone().requires_grad_(), values.clone().requires_grad_()
        out = fn(lg, v, 0.5)
        (out * grad).sum().backward()
        grads.append((out.detach(), lg.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("needs", ["both", "logits", "values"])
@pytest.mark.parametrize("return_labels", [False, True])
def test_gradients_match_dense_reference(group_pool_backend, needs, return_labels):
    """Both gradients against autograd of the dense straight-through oracle, float64 (1e-10) where
    the backend takes it, float32 otherwise."""
    bk = group_pool_backend
    f64 = bk.takes(torch.float64, "group_pool")
    dtype = torch.float64 if f64 else torch.float32
    tol = dict(rtol=1e-10, atol=1e-10) if f64 else dict(rtol=1e-5, atol=1e-5)
    logits, values = make_inputs(2, 9, 61, 12, dtype=dtype, device=bk.device)
    logits[0, 3] += 2.0  # a large group and some empty ones
    grad = torch.randn(2, 9, 12, dtype=dtype, device=bk.device)
    got = []
    for oracle in (False, True):
        lg = logits.clone().requires_grad_(needs in ("both", "logits"))
        v = values.clone().requires_grad_(needs in ("both", "values"))
        if oracle:
            out = vz.group_pool_reference(lg.double(), v.double(), eps=0.5).output
        else:
            res = vz.group_pool(lg, v, eps=0.5, backend=bk.name, return_labels=return_labels)
            out = res.output if return_labels else res
        (out * grad).sum().backward()
        got.append((lg.grad, v.grad))
    for a, b in zip(*got):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), **tol)
        assert a.abs().sum() > 0


def test_gradient_formula_ops_directly():
    """visionzip::_group_pool_logits_grad / _values_grad (what every backend's autograd calls) on
    half-precision gradients keep the dtypes and agree with the float64 formula."""
    logits, values = make_inputs(2, 5, 40, 16, dtype=torch.bfloat16)
    res = vz.group_pool(logits, values, return_labels=True)
    grad = torch.randn(2, 5, 16).to(torch.bfloat16)
    gl = torch.ops.visionzip._group_pool_logits_grad(grad, logits, values, res.labels, res.counts, 1.0)
    gv = torch.ops.visionzip._group_pool_values_grad(grad, res.labels, res.counts, 1.0)
    assert gl.dtype == logits.dtype and gv.dtype == values.dtype
    lg, v = logits.double().requires_grad_(), values.double().requires_grad_()
    (vz.group_pool_reference(lg, v).output * grad.double()).sum().backward()
    torch.testing.assert_close(gl.double(), lg.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gv.double(), v.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# torch.compile, opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_labels", [False, True])
def test_torch_compile_fullgraph(group_pool_backend, return_labels):
    bk = group_pool_backend
    logits, values = make_inputs(2, 12, 81, 32, device=bk.device)

    def pipeline(logits, values):
        res = vz.group_pool(logits * 2, values, eps=0.5, backend=bk.name, return_labels=return_labels)
        return (res.output + 1, res.labels, res.counts) if return_labels else res + 1

    torch._dynamo.reset()
    got = torch.compile(pipeline, fullgraph=True)(logits, values)
    want = pipeline(logits, values)
    for g, w in zip(*((got, want) if return_labels else ((got,), (want,)))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_torch_compile_fullgraph_backward(group_pool_backend):
    """Training through the op under torch.compile: the same gradients as eager."""
    bk = group_pool_backend
    logits, values = make_inputs(2, 6, 40, 16, device=bk.device)
    grad = torch.randn(2, 6, 16, device=bk.device)

    def step(logits, values):
        out = vz.group_pool(logits, values, backend=bk.name)
        return (out * grad).sum()

    torch._dynamo.reset()
    grads = []
    for fn in (torch.compile(step, fullgraph=True), step):
        lg, v = logits.clone().requires_grad_(), values.clone().requires_grad_()
        fn(lg, v).backward()
        grads.append((lg.grad, v.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["group_pool", "group_pool_with_labels"])
def test_opcheck(op):
    logits, values = make_inputs(2, 7, 45, 12)
    fn = getattr(torch.ops.visionzip, op).default
    torch.library.opcheck(fn, (logits, values), dict(eps=0.5))
    torch.library.opcheck(fn, (logits.double(), values.half()))
    # with differentiable inputs, opcheck also checks the autograd registration
    torch.library.opcheck(fn, (logits.clone().requires_grad_(), values.clone().requires_grad_()), dict(eps=2))


@pytest.mark.parametrize("op", ["group_pool_triton", "group_pool_triton_with_labels"])
def test_opcheck_triton_ops(op):
    require(BackendUnderTest("triton", "cpu"), "group_pool")
    logits, values = make_inputs(2, 5, 20, 16)
    fn = getattr(torch.ops.visionzip, op).default
    torch.library.opcheck(fn, (logits, values, 0.5))
    torch.library.opcheck(fn, (logits.clone().requires_grad_(), values.clone().requires_grad_(), 1.0))


# ------------------------------------------------------------------------------------------------
# Selection and errors (the API, the oracle and the ops apply one set of rules)
# ------------------------------------------------------------------------------------------------


def test_default_backend_and_available_backends():
    assert vz.available_group_pool_backends("cpu")[:2] == ["cpu", "reference"]
    assert vz.available_group_pool_backends("cpu", torch.float64)[:2] == ["cpu", "reference"]
    cuda = vz.available_group_pool_backends("cuda", torch.float64)
    assert "cuda" not in cuda and "triton" not in cuda and cuda[-1] == "reference"
    assert vz.available_group_pool_backends("meta") == ["reference"]
    logits, values = make_inputs(1, 4, 30, 8)
    assert torch.equal(vz.group_pool(logits, values), torch.ops.visionzip.group_pool(logits, values))
    with pytest.raises(ValueError, match="backend must be one of"):
        vz.group_pool(logits, values, backend="tpu")
    with pytest.raises(ValueError, match="not available"):
        vz.group_pool(logits, values, backend="cuda")


_lg, _v = torch.randn(2, 4, 10), torch.randn(2, 10, 8)
BAD_INPUTS = {
    "logits rank": (dict(logits=torch.randn(4, 10)), "logits"),
    "values rank": (dict(values=torch.randn(10, 8)), "values"),
    "values batch": (dict(values=torch.randn(3, 10, 8)), "values"),
    "values patches": (dict(values=torch.randn(2, 9, 8)), "values"),
    "values no channels": (dict(values=torch.randn(2, 10, 0)), "values"),
    "no groups": (dict(logits=torch.randn(2, 0, 10), values=torch.randn(2, 10, 8)), "logits"),
    "no patches": (dict(logits=torch.randn(2, 4, 0), values=torch.randn(2, 0, 8)), "logits"),
    "logits int": (dict(logits=torch.ones(2, 4, 10, dtype=torch.int64)), "logits"),
    "values bool": (dict(values=torch.ones(2, 10, 8, dtype=torch.bool)), "values"),
    "values device": (dict(values=torch.randn(2, 10, 8, device="meta")), "device"),
    "eps zero": (dict(eps=0.0), "eps"),
    "eps negative": (dict(eps=-1.0), "eps"),
    "eps nan": (dict(eps=float("nan")), "eps"),
    "eps inf": (dict(eps=float("inf")), "eps"),
    "eps bool": (dict(eps=True), "eps"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    override, match = BAD_INPUTS[name]
    args = dict(logits=_lg, values=_v, eps=1.0) | override
    with pytest.raises(ValueError, match=match):
        vz.group_pool(**args)
    with pytest.raises(ValueError, match=match):
        vz.group_pool_reference(**args)
    if name != "values device":  # the meta tensor would route the op to the fake kernel
        for op in (torch.ops.visionzip.group_pool, torch.ops.visionzip.group_pool_with_labels):
            with pytest.raises(RuntimeError, match=f"visionzip::group_pool.*{match}"):
                op(args["logits"], args["values"], eps=args["eps"])


@pytest.mark.parametrize("eps", ["1", None, np.int64(1), 1 + 0j])
def test_eps_type(eps):
    """eps is a real number: the API and the oracle reject other types with ValueError, the ops
    with RuntimeError (or the dispatcher's TypeError for what is not a number at all)."""
    for call in (vz.group_pool, vz.group_pool_reference):
        with pytest.raises(ValueError, match="eps must be"):
            call(_lg, _v, eps=eps)
    if isinstance(eps, np.integer):
        return  # the dispatcher takes a numpy int as a Scalar: a number, accepted by the op
    with pytest.raises((RuntimeError, TypeError), match="eps"):
        torch.ops.visionzip.group_pool(_lg, _v, eps=eps)


def test_return_labels_must_be_bool():
    with pytest.raises(ValueError, match="return_labels must be a bool"):
        vz.group_pool(_lg, _v, return_labels=1)


def test_bad_input_under_fake_tensors_raises_value_error():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        lg, v = mode.from_tensor(_lg), mode.from_tensor(_v)
        with pytest.raises(ValueError, match="eps must be finite and > 0"):
            torch.ops.visionzip.group_pool(lg, v, eps=0.0)
        with pytest.raises(ValueError, match="values of shape"):
            torch.ops.visionzip.group_pool(lg, v[:, :5])
