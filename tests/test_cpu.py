"""Mechanics of the "cpu" backend (the fused C++ kernels, csrc/cpu): results bit-identical across
runs and thread counts, and between the batch-parallel and the intra-image paths. The compress
contract itself runs for this backend in tests/test_compress.py."""

from __future__ import annotations

import pytest
import torch

import visionzip_kernels as vz
from tests.helpers import make_case

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(case) -> vz.CompressResult:
    return vz.compress(case.hidden, case.attn, case.k, **case.kwargs(), backend="cpu", return_indices=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])  # B=1: loops inside the image go parallel; B=3: batch-parallel
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_deterministic_across_runs_and_threads(dtype, batch, has_cls):
    case = make_case(batch, 577, 256, heads=16, form="full", k=64, dtype=dtype, has_cls=has_cls)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 4, 1):
            torch.set_num_threads(t)
            results.append(run(case))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_batch_parallel_equals_per_image():
    """B >= threads takes the batch-parallel path, B = 1 the intra-image path: same bits."""
    case = make_case(6, 300, 64, k=48)
    whole = run(case)
    for i in range(6):
        one = vz.compress(case.hidden[i : i + 1], case.attn[i : i + 1], case.k, keys=case.keys[i : i + 1],
                          backend="cpu", return_indices=True)
        for a, b in zip(whole, one):
            assert torch.equal(a[i : i + 1], b)


def test_heads_summed_like_the_reference():
    """CLS rows summed over heads one head at a time, h = 0..H-1: the C++ kernel's float32 scores are
    the reference's bit for bit, so both rank any near tie the same way."""
    case = make_case(2, 577, 32, heads=16, form="rows", k=64, contextual=0)
    assert torch.equal(run(case).dominant_indices, vz.compress_reference(case.hidden, case.attn, 64, contextual=0,
                                                                        keys=case.keys).dominant_indices)


@pytest.mark.parametrize(
    "case",
    [
        make_case(3, 577, 96, heads=16, form="rows", k=64, seed=11),
        make_case(2, 201, 40, heads=4, form="full", k=30, has_cls=False, seed=12),
        make_case(2, 300, 33, heads=3, form="full", k=50, contextual=0, has_cls=False, dtype=torch.bfloat16, seed=13),
    ],
    ids=["cls-rows", "nocls-full", "bf16-cx0"],
)
def test_phase_profile_runs_the_kernel(case):
    """The diagnostic op of benchmarks/profile_compress_cpu.py (phases timed one by one, nothing
    overlapped) computes compress's output bit for bit, and times every phase that runs."""
    secs, out = torch.ops.visionzip._compress_cpu_phases(case.hidden, case.attn, case.k, **case.kwargs())
    assert torch.equal(out, run(case).output)
    assert secs.shape == (6,) and secs.dtype == torch.float64
    scores, selection, targets, assignment, slots, pass_ = secs.tolist()
    assert scores > 0 and selection > 0 and slots > 0 and pass_ > 0
    if case.kwargs().get("contextual") == 0:
        assert targets == 0 and assignment == 0  # no contextual tokens: those phases do not run
    else:
        assert targets > 0 and assignment > 0


def test_phase_profile_checks_its_arguments():
    case = make_case(1, 50, 8, k=10)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.visionzip._compress_cpu_phases(case.hidden, case.attn, 51)
