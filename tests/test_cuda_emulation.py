"""The CUDA kernels' block algorithm (compress, group_pool), run on the CPU under the host emulation
(tests/cuda_emulation).

Same oracle checks as the device backends, through the launch plan of the torch binding
(pre-pass slices, shared-memory or global-scratch targets, 16-byte or scalar paths). Needs g++
and the CUDA headers (cuda_fp16.h); GPU-only behaviour is covered by tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import visionzip_kernels as vz
from tests.cuda_emulation import build_runner, run_emulated, run_group_pool_emulated
from tests.helpers import Case, check_against_reference, make_case


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    try:
        return build_runner(tmp_path_factory.mktemp("cuda_emulation"))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _run(runner, case: Case, **kw):
    res, plan = run_emulated(runner, case.hidden, case.attn, case.k, **case.kwargs(), **kw)
    return res, plan


CASES = {
    "cls-full-f32": dict(b=2, n=65, c=32, k=16),
    "cls-full-f16-vec": dict(b=2, n=64, c=64, k=24, dtype=torch.float16),
    "nocls-full-f16-partials": dict(b=2, n=81, c=40, k=20, has_cls=False, dtype=torch.float16),
    "nocls-full-bf16-vec-partials": dict(b=1, n=64, c=32, k=12, has_cls=False, dtype=torch.bfloat16),
    "cls-rows-bf16": dict(b=2, n=97, c=24, k=20, form="rows", dtype=torch.bfloat16),
    "nocls-rows-f32-vec": dict(b=1, n=96, c=16, k=30, form="rows", has_cls=False),
    "nocls-scores-f32": dict(b=3, n=50, c=8, k=10, form="scores", has_cls=False),
    "hidden-metric-f16": dict(b=2, n=70, c=48, k=14, key_dim=None, dtype=torch.float16),
    "hidden-metric-odd-c": dict(b=2, n=70, c=20, k=14, key_dim=None, dtype=torch.float16),
    "big-metric-uncached": dict(b=1, n=60, c=16, k=12, key_dim=200),
    "pruning-cx0": dict(b=2, n=65, c=32, k=16, contextual=0),
    "d0-nocls": dict(b=2, n=65, c=32, k=10, contextual=10, has_cls=False),
    "d-equals-n": dict(b=1, n=33, c=16, k=33, contextual=0),
    "many-targets": dict(b=1, n=200, c=16, k=150, contextual=100),
    "one-remaining-per-target": dict(b=1, n=60, c=8, k=40, contextual=30, form="rows"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_matches_reference(runner, name):
    case = make_case(**CASES[name])
    res, _ = _run(runner, case)
    check_against_reference(case, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("form", ["full", "rows", "scores"])
def test_emulated_lattice_exact(runner, dtype, has_cls, form):
    """Exact scores and similarities with ties: the choices must equal the oracle's."""
    n = 64 if form != "full" else 48
    case = make_case(2, n, 16, k=20, form=form, has_cls=has_cls, dtype=dtype, lattice=True, key_dim=16)
    res, _ = _run(runner, case)
    check_against_reference(case, res, exact=True)


def test_emulated_lattice_hidden_metric(runner):
    case = make_case(2, 64, 16, k=20, key_dim=None, dtype=torch.float16, lattice=True)
    res, _ = _run(runner, case)
    check_against_reference(case, res, exact=True)


def test_emulated_nan_signed_zero_and_inf_ranking(runner):
    """NaN ranks below -inf, -0.0 ties +0.0 (lower index wins), +inf above everything."""
    vals = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1.0, -1.0])
    g = torch.Generator().manual_seed(5)
    scores = vals[torch.randint(0, len(vals), (2, 70), generator=g)]
    base = make_case(2, 70, 16, k=30, form="scores", has_cls=False, seed=1)
    for has_cls in (False, True):
        case = Case(base.hidden, scores, 30, keys=base.keys, has_cls=has_cls)
        res, _ = _run(runner, case)
        check_against_reference(case, res, exact=True)


def test_emulated_nan_metric(runner):
    """NaN similarities rank lowest in the assignment (as in the CPU kernel and the oracle)."""
    case = make_case(1, 64, 16, k=20, lattice=True, key_dim=16, seed=3)
    case.keys[0, 30:40] = float("nan")
    res, _ = _run(runner, case)
    check_against_reference(case, res, exact=True)


def test_emulated_mixed_dtypes(runner):
    """attn / keys in float32 (or float64, upcast by the binding) with half hidden states."""
    case = make_case(2, 65, 32, k=16, dtype=torch.float16)
    case.attn, case.keys = case.attn.float(), case.keys.double()
    res, _ = _run(runner, case)
    check_against_reference(case, res)
    case = make_case(2, 66, 32, k=16, has_cls=False, dtype=torch.bfloat16)
    case.attn = case.attn.double()
    res, _ = _run(runner, case)
    check_against_reference(case, res)


def test_emulated_global_target_scratch(runner):
    """Normalised targets in global scratch when they do not fit in shared memory."""
    case = make_case(2, 65, 32, k=24, key_dim=64)
    res, plan = _run(runner, case, smem_limit=2500)  # the layout needs ~2100 B without targets, 2736 B with
    assert "targets_in_smem=0" in plan, plan
    check_against_reference(case, res)


def test_emulated_misaligned_attn(runner):
    """An attn view at an odd element offset takes the scalar path, same results."""
    case = make_case(2, 64, 16, k=20, form="rows", dtype=torch.float16, lattice=True, key_dim=16)
    res_aligned, _ = _run(runner, case)
    res_odd, _ = _run(runner, case, attn_offset=1)
    for a, b in zip(res_aligned, res_odd):
        assert torch.equal(a, b)
    check_against_reference(case, res_odd, exact=True)


def test_emulated_partial_slices_match_single_pass(runner):
    """Received attention split over row slices ranks like the one-block pass (lattice: exact)."""
    case = make_case(2, 48, 16, k=16, has_cls=False, lattice=True, key_dim=16)
    one, plan_one = _run(runner, case, num_sms=0)  # no SMs to fill: one slice, no pre-pass
    many, plan_many = _run(runner, case, num_sms=64)
    assert "slices=1" in plan_one and "slices=1" not in plan_many, (plan_one, plan_many)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    check_against_reference(case, many, exact=True)


@pytest.mark.parametrize(
    "kw, threads",
    [
        (dict(b=1, n=577, c=64, k=64, key_dim=64, dtype=torch.float16), 512),
        (dict(b=1, n=1025, c=32, k=64, contextual=6, form="rows", has_cls=False, key_dim=16, dtype=torch.bfloat16), 128),
    ],
    ids=["clip-577-f16-512threads", "1025-rows-nocls-bf16-128threads"],
)
def test_emulated_realistic_sizes(runner, kw, threads):
    """Realistic token counts, one at the production block size (512 threads; slow to emulate)."""
    case = make_case(**kw)
    res, _ = _run(runner, case, threads=threads)
    check_against_reference(case, res)


@pytest.mark.parametrize(
    "kw, splits",
    [
        (dict(b=2, n=65, c=64, k=16, dtype=torch.float16), 3),  # 16-byte path, slices 24 + 24 + 16
        (dict(b=2, n=70, c=40, k=14, key_dim=None), 2),  # float32, hidden as metric, slices 24 + 16
        (dict(b=1, n=64, c=20, k=20, form="rows", has_cls=False, dtype=torch.bfloat16), 2),  # scalar path
        (dict(b=2, n=81, c=64, k=20, has_cls=False, dtype=torch.float16), 4),  # with the score pre-pass
        (dict(b=2, n=65, c=48, k=16, contextual=0), 3),  # Cx = 0: unassigned tokens map to -1
    ],
    ids=["f16-vec", "f32-hidden-metric", "bf16-scalar", "f16-partials", "cx0"],
)
def test_emulated_channel_splits_bit_identical(runner, kw, splits):
    """Several blocks per image (channel slices) give exactly the one-block result, indices included."""
    case = make_case(**kw)
    one, plan_one = _run(runner, case, splits=1)
    many, plan_many = _run(runner, case, splits=splits)
    assert "splits=1 " in plan_one and f"splits={splits} " in plan_many, (plan_one, plan_many)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    check_against_reference(case, many)


def test_emulated_channel_splits_global_scratch(runner):
    """Each block of an image normalises the targets into its own slot of the global scratch."""
    case = make_case(2, 65, 32, k=24, key_dim=64)
    one, _ = _run(runner, case, smem_limit=2500, splits=1)
    many, plan = _run(runner, case, smem_limit=2500, splits=2)
    assert "targets_in_smem=0" in plan and "splits=2 " in plan, plan
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_emulated_channel_split_choice(runner):
    """The binding's choice: ~2 blocks per SM, >= 256 channels each, <= 2 with the hidden metric."""
    case = make_case(1, 40, 1024, k=10, key_dim=16)
    res, plan = _run(runner, case, num_sms=132)
    assert "splits=4 split_channels=256" in plan, plan
    check_against_reference(case, res)
    case = make_case(1, 40, 1024, k=10, key_dim=None)
    _, plan = _run(runner, case, num_sms=132)
    assert "splits=2 split_channels=512" in plan, plan
    case = make_case(300, 20, 512, k=6, key_dim=4)
    _, plan = _run(runner, case, num_sms=132)
    assert "splits=1 " in plan, plan


# ------------------------------------------------------------------------------------------------
# group_pool (csrc/cuda/group_pool_kernel.cuh): the segmented sum it shares with compress
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_pool_runner(tmp_path_factory):
    try:
        return build_runner(tmp_path_factory.mktemp("cuda_emulation"), "group_pool_runner.cpp")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _pool_inputs(b, m, n, c, dtype=torch.float32, logits_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, m, n, generator=g) * 2).to(logits_dtype or dtype)
    return logits, torch.randn(b, n, c, generator=g).to(dtype)


POOL_CASES = {
    "f32-vec": dict(b=2, m=13, n=65, c=32),
    "f16-vec": dict(b=2, m=7, n=64, c=64, dtype=torch.float16),
    "bf16-scalar-odd-c": dict(b=1, m=9, n=70, c=20, dtype=torch.bfloat16),
    "f32-f64-logits": dict(b=2, m=5, n=50, c=16, logits_dtype=torch.float64),
    "f16-bf16-logits-widened": dict(b=1, m=6, n=40, c=16, dtype=torch.float16, logits_dtype=torch.bfloat16),
    "more-groups-than-patches": dict(b=2, m=70, n=33, c=8),
    "one-group": dict(b=1, m=1, n=20, c=8),
}


@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_emulated_group_pool_bit_identical_to_cpu(group_pool_runner, name):
    """The CUDA kernel sums members in ascending patch order in float32 and divides by count + eps,
    as the C++ CPU kernel does: identical labels, counts and output bits (and so the oracle's)."""
    kw = dict(POOL_CASES[name])
    logits, values = _pool_inputs(kw.pop("b"), kw.pop("m"), kw.pop("n"), kw.pop("c"), **kw)
    res, _ = run_group_pool_emulated(group_pool_runner, logits, values, 0.5)
    cpu = vz.group_pool(logits, values, eps=0.5, backend="cpu", return_labels=True)
    for a, b in zip(res, cpu):
        assert torch.equal(a, b), name
    ref = vz.group_pool_reference(logits, values, eps=0.5)
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.counts, ref.counts)


def test_emulated_group_pool_ties_and_nan(group_pool_runner):
    logits = torch.tensor([[[float("nan"), float("nan"), -0.0, float("-inf"), 1.0],
                            [float("nan"), 1.0, 0.0, float("-inf"), float("inf")],
                            [float("nan"), 1.0, -1.0, -5.0, float("inf")]]])
    values = torch.randn(1, 5, 8)
    res, _ = run_group_pool_emulated(group_pool_runner, logits, values)
    assert res.labels.tolist() == [[0, 1, 0, 2, 1]]
    assert res.counts.tolist() == [[2, 2, 1]]


def test_emulated_group_pool_realistic_size(group_pool_runner):
    """B = 2, M = 64, N = 577 at the production block size (512 threads; slow to emulate)."""
    logits, values = _pool_inputs(2, 64, 577, 64, dtype=torch.bfloat16)
    res, _ = run_group_pool_emulated(group_pool_runner, logits, values, threads=512)
    for a, b in zip(res, vz.group_pool(logits, values, backend="cpu", return_labels=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [2, 3])
def test_emulated_group_pool_channel_splits(group_pool_runner, splits):
    """Several blocks per image give exactly the one-block result; only block (b, 0) writes the
    labels and counts, which the poisoned output buffers would show if it did not."""
    logits, values = _pool_inputs(2, 11, 60, 64, dtype=torch.float16)
    one, plan_one = run_group_pool_emulated(group_pool_runner, logits, values, splits=1)
    many, plan_many = run_group_pool_emulated(group_pool_runner, logits, values, splits=splits)
    assert "splits=1 " in plan_one and f"splits={splits} " in plan_many, (plan_one, plan_many)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_emulated_group_pool_split_choice_and_smem(group_pool_runner):
    logits, values = _pool_inputs(1, 8, 40, 1024)
    _, plan = run_group_pool_emulated(group_pool_runner, logits, values, num_sms=132)
    assert "splits=4 split_channels=256" in plan and "smem=356 " in plan, plan  # 8 N + 4 (M + 1) bytes
    with pytest.raises(RuntimeError, match="shared memory"):
        run_group_pool_emulated(group_pool_runner, logits, values, smem_limit=300)
