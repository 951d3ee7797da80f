"""The oracle (compress_reference) against the transcription of the original code, and its own rules."""

import pytest
import torch

from tests.helpers import check_structure, make_case
from visionzip_kernels import compress_reference, visionzip_eager
from visionzip_kernels.reference import rank_descending, select_dominant, token_scores


@pytest.mark.parametrize("form", ["full", "rows", "scores"])
@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("with_keys", [True, False])
@pytest.mark.parametrize("b,n,c,k", [(2, 577, 64, 64), (3, 101, 33, 20), (1, 729, 48, 128)])
def test_reference_matches_eager_transcription(form, has_cls, with_keys, b, n, c, k):
    # float64 continuous inputs: no ties, so the original topk/argmax and the oracle must agree.
    case = make_case(b, n, c, form=form, k=k, key_dim=16 if with_keys else None, has_cls=has_cls, dtype=torch.float64)
    ref = compress_reference(case.hidden, case.attn, case.k, **case.kwargs())
    check_structure(case, ref)
    eager = visionzip_eager(case.hidden, case.attn, case.k, **case.kwargs())
    torch.testing.assert_close(ref.output, eager, rtol=1e-12, atol=1e-12, msg=lambda m: f"{m}\n{case}")


@pytest.mark.parametrize("contextual", [0, 5])
def test_reference_matches_eager_budget_splits(contextual):
    case = make_case(2, 65, 24, k=21, contextual=contextual, dtype=torch.float64)
    ref = compress_reference(case.hidden, case.attn, case.k, **case.kwargs())
    eager = visionzip_eager(case.hidden, case.attn, case.k, **case.kwargs())
    torch.testing.assert_close(ref.output, eager, rtol=1e-12, atol=1e-12)


def test_rank_descending_rules():
    nan, inf = float("nan"), float("inf")
    v = torch.tensor([[1.0, nan, 3.0, 3.0, -inf, nan, -0.0, 0.0, inf]])
    # larger first; ties (3, 3) and (-0, +0) by lower index; -inf above NaN; NaNs by index
    assert rank_descending(v).tolist() == [[8, 2, 3, 0, 6, 7, 4, 1, 5]]


def test_select_dominant_keeps_cls_even_against_inf():
    scores = torch.tensor([[-5.0, float("inf"), 1.0, 2.0]])
    assert select_dominant(scores, 2, has_cls=True).tolist() == [[0, 1]]
    assert select_dominant(scores, 2, has_cls=False).tolist() == [[1, 3]]


def test_contextual_definition_by_hand():
    # N=6, k=3, Cx=1, no CLS: scores pick tokens 4 and 5; remaining [0, 1, 2, 3], target position 0 (token 0);
    # members 1, 2, 3 -> contextual = h0 + mean(h1, h2, h3).
    hidden = torch.arange(6, dtype=torch.float64).view(1, 6, 1) * torch.tensor([1.0, 10.0]).view(1, 1, 2)
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.9, 0.8]], dtype=torch.float64)
    res = compress_reference(hidden, scores, 3, contextual=1, has_cls=False)
    assert res.dominant_indices.tolist() == [[4, 5]]
    assert res.contextual_indices.tolist() == [[0]]
    assert res.token_map.tolist() == [[2, 2, 2, 2, 0, 1]]
    expected = torch.tensor([[[4.0, 40.0], [5.0, 50.0], [0 + 2.0, 0 + 20.0]]], dtype=torch.float64)
    torch.testing.assert_close(res.output, expected)


def test_targets_spacing_and_empty_target():
    # R = 7 remaining, Cx = 3 -> step 2, targets at positions 0, 2, 4. Keys make target 1 attract nobody.
    n = 9
    hidden = torch.randn(1, n, 4, dtype=torch.float64)
    keys = torch.zeros(1, n, 2, dtype=torch.float64)
    scores = torch.zeros(1, n, dtype=torch.float64)
    scores[0, 0] = scores[0, 1] = 1.0  # dominant: tokens 0, 1 (no CLS); remaining 2..8
    keys[0, :, 0] = 1.0
    keys[0, 4, :] = torch.tensor([0.0, 1.0])  # target at position 2 (token 4) is orthogonal to all others
    res = compress_reference(hidden, scores, 5, keys=keys, contextual=3, has_cls=False)
    assert res.contextual_indices.tolist() == [[2, 4, 6]]
    # all non-targets tie between targets 0 and 2 (cosine 1) -> lower target 0
    assert res.token_map[0, [3, 5, 7, 8]].tolist() == [2, 2, 2, 2]
    members = hidden[0, [3, 5, 7, 8]].mean(0)
    torch.testing.assert_close(res.output[0, 2], hidden[0, 2] + members)
    torch.testing.assert_close(res.output[0, 3], hidden[0, 4])  # no members: the target itself
    torch.testing.assert_close(res.output[0, 4], hidden[0, 6])


def test_oracle_check_rejects_wrong_results():
    """The shared checker must fail on a wrong output, a wrong dominant token or a wrong assignment."""
    from tests.helpers import check_against_reference

    case = make_case(2, 101, 16, k=20, dtype=torch.float32)
    good = compress_reference(case.hidden, case.attn, case.k, **case.kwargs())
    check_against_reference(case, good)

    out = good.output.clone()
    out[1, -1, 3] += 1e-3
    with pytest.raises(AssertionError):
        check_against_reference(case, good._replace(output=out))

    # A dominant set that is not a top-D set: the near-tie check must reject it (called directly,
    # since the structural checks would already reject this inconsistent result).
    from tests.helpers import _check_near_ties

    scores = case.attn[:, :, 0, :].sum(1)
    dom = good.dominant_indices.clone()
    weakest_kept = dom[0, 1:][scores[0, dom[0, 1:]].argmin()]
    weakest = int(scores[0, 1:].argmin()) + 1
    dom[0][dom[0] == weakest_kept] = weakest
    with pytest.raises(AssertionError, match="not a top-D set"):
        _check_near_ties(case, good._replace(dominant_indices=dom.sort(1).values), 1e-5, 1e-5)

    # Move one merged token to the target it is least similar to.
    tmap = good.token_map.clone()
    d = good.dominant_indices.shape[1]
    is_target = torch.zeros_like(tmap[0], dtype=torch.bool)
    is_target[good.contextual_indices[0]] = True
    j = int(((tmap[0] >= d) & ~is_target).nonzero()[-1])  # a merged member, not a target
    keys = torch.nn.functional.normalize(case.keys[0].double(), dim=-1)
    sims = keys[j] @ keys[good.contextual_indices[0]].T
    tmap[0, j] = d + int(sims.argmin())
    with pytest.raises(AssertionError, match="not assigned to their most similar target"):
        _check_near_ties(case, good._replace(token_map=tmap), 1e-5, 1e-5)
    with pytest.raises(AssertionError):
        check_against_reference(case, good._replace(token_map=tmap))


def test_argmax_lowest_rules():
    from visionzip_kernels.reference import argmax_lowest

    nan, inf = float("nan"), float("inf")
    v = torch.tensor([[1.0, 3.0, 3.0], [nan, nan, nan], [nan, -inf, -inf], [nan, 2.0, nan], [-0.0, 0.0, -1.0]])
    assert argmax_lowest(v).tolist() == [1, 0, 1, 1, 0]


def test_reference_compiles_fullgraph():
    # compile(reference) is a benchmark baseline: it must trace as one graph (static shapes, no nonzero()).
    case = make_case(2, 77, 24, k=16)
    compiled = torch.compile(compress_reference, fullgraph=True, dynamic=False)
    got = compiled(case.hidden, case.attn, case.k, keys=case.keys)
    ref = compress_reference(case.hidden, case.attn, case.k, keys=case.keys)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_token_scores_equal_for_identical_columns(dtype):
    """Every token's score is summed in one order: bitwise equal attention columns get bitwise equal
    scores whatever their position (a plain sum over heads rounded the last N mod (vector width)
    columns differently), so the tie rule, not rounding, decides between them."""
    g = torch.Generator().manual_seed(0)
    for n in (5, 17, 61, 64, 65, 127, 577, 729):
        for shape, has_cls in (((2, 16, n), True), ((2, 16, n, n), True), ((2, 7, n, n), False)):
            attn = torch.rand(shape, generator=g).to(dtype)
            for j in range(1, n):
                attn[..., j] = attn[..., 0] if j % 2 else attn[..., j]
            scores = token_scores(attn, has_cls=has_cls, dtype=torch.float64 if dtype == torch.float64 else
                                  torch.float32)
            odd = scores[:, 1::2]
            assert torch.equal(odd, scores[:, :1].expand_as(odd)), (n, shape)
