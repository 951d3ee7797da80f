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
