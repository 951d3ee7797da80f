"""The oracle of ``compress`` (docs/spec.md "Compress"): :func:`compress_reference`.

Static shapes, gathers instead of masks, float32 arithmetic (float64 for float64 inputs), ties
toward the lower token index, NaN ranked below every number; it also returns the indices of the
pass. Every backend's tests and every benchmark compare against it. It is also the "reference"
backend of the registry (any device, every float dtype).

The helpers (:func:`token_scores`, :func:`select_dominant`, ...) are the stages of the oracle,
exposed so that tests can check a backend's choices stage by stage.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backends
from .._validation import compute_dtype
from ..ops.compress import CompressPlan, CompressResult, check_compress_inputs, contextual_step


# --------------------------------------------------------------------------------------------
# Oracle stages
# --------------------------------------------------------------------------------------------


def token_scores(attn: torch.Tensor, *, has_cls: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token importance, (B, N) in ``dtype`` (docs/spec.md "Scores of the tokens").

    attn (B, H, N, N): CLS row summed over heads if ``has_cls`` else attention received (sum over
    heads and queries); (B, H, N): summed over heads; (B, N): taken as is. With ``has_cls`` the
    entry of the CLS token itself is meaningless: :func:`select_dominant` forces it in.

    Every token's score is summed in the same order, so bitwise equal attention columns (uniform
    background, padding) get equal scores and the tie rule decides between them. A plain
    ``attn.sum(dim=1)`` does not guarantee that (it vectorises across tokens and adds the last
    N mod (vector width) columns in another order; a reduction along a contiguous axis depends on
    each row's alignment). So rows are added with elementwise adds only, which round every token
    alike: over heads one head at a time (h = 0..H-1, the C++ kernel's order), over the H x N rows of
    the received form by a pairwise tree of row halves.
    """
    if attn.dim() == 2:
        return attn.to(dtype)
    if attn.dim() == 4 and not has_cls:
        b, h, q, n = attn.shape
        rows = attn.reshape(b, h * q, n).to(dtype)
        while rows.shape[1] > 1:
            half = rows.shape[1] // 2
            summed = rows[:, :half] + rows[:, half : 2 * half]
            rows = torch.cat([summed, rows[:, 2 * half :]], dim=1) if rows.shape[1] % 2 else summed
        return rows[:, 0]
    rows = attn[:, :, 0, :] if attn.dim() == 4 else attn
    score = rows[:, 0].to(dtype)
    for head in range(1, rows.shape[1]):
        score = score + rows[:, head].to(dtype)
    return score


def rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim of ``values`` best first: larger first, ties toward the lower
    index, NaN below every number (NaNs among themselves by index). Shape of ``values``, int64."""
    nan = values.isnan()
    filled = values.masked_fill(nan, float("-inf"))
    order = torch.sort(filled, dim=-1, descending=True, stable=True).indices
    # A second stable sort on the NaN flag moves NaNs behind -inf without disturbing the rest.
    by_nan = torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
    return order.gather(-1, by_nan)


def argmax_lowest(values: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim with the same rules as :func:`rank_descending`, int64."""
    nan = values.isnan()
    filled = values.masked_fill(nan, float("-inf"))
    hit = (filled == filled.amax(dim=-1, keepdim=True)) & ~nan
    return hit.to(torch.uint8).argmax(dim=-1)  # first hit = lowest index; an all-NaN row gives 0


def select_dominant(scores: torch.Tensor, dominant: int, *, has_cls: bool) -> torch.Tensor:
    """(B, N) scores -> (B, D) int64 indices of the dominant tokens in ascending order.

    With ``has_cls`` token 0 is always kept and counts inside ``dominant``.
    """
    if has_cls:
        scores = scores.clone()
        scores[:, 0] = float("inf")  # ties go to the lower index, so CLS wins even against +inf
    top = rank_descending(scores)[:, :dominant]
    return top.sort(dim=1).values


def remaining_indices(dominant_indices: torch.Tensor, n: int) -> torch.Tensor:
    """(B, D) kept indices -> (B, N - D) indices of the other tokens, in original order."""
    b, d = dominant_indices.shape
    kept = torch.zeros(b, n, dtype=torch.uint8, device=dominant_indices.device)
    kept.scatter_(1, dominant_indices, 1)
    return torch.sort(kept, dim=1, stable=True).indices[:, : n - d]


def target_positions(remaining: int, contextual: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the contextual targets inside the remaining list: 0, step, 2 step, ... (Cx,)."""
    if contextual == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.arange(contextual, device=device, dtype=torch.long) * contextual_step(remaining, contextual)


def normalize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalise the last dim in ``dtype`` (a zero row stays zero, as ``F.normalize``)."""
    x = x.to(dtype)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def assign_to_targets(metric_normed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, R, Ck) normalised metric of the remaining tokens -> (B, R) target label of each token.

    Targets are labelled with themselves; every other token with the target of highest cosine
    similarity (ties toward the lower target, NaN lowest).
    """
    b, r, _ = metric_normed.shape
    targets = metric_normed[:, positions, :]
    sims = torch.bmm(metric_normed, targets.transpose(1, 2))  # (B, R, Cx)
    labels = argmax_lowest(sims)
    labels[:, positions] = torch.arange(positions.numel(), device=labels.device).expand(b, -1)
    return labels


def member_positions(remaining: int, positions: torch.Tensor) -> torch.Tensor:
    """Positions inside the remaining list that are not targets (the tokens merged away)."""
    is_target = torch.zeros(remaining, dtype=torch.uint8, device=positions.device)
    is_target[positions] = 1
    # A stable sort instead of nonzero() keeps the shape static (torch.compile, CUDA graphs).
    return torch.sort(is_target, stable=True).indices[: remaining - positions.numel()]


def merge_contextual(
    hidden_remaining: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """contextual[t] = hidden[target t] + mean(hidden of the members of t), (B, Cx, C) in ``dtype``."""
    b, r, c = hidden_remaining.shape
    cx = positions.numel()
    members = member_positions(r, positions)
    flat_labels = (labels[:, members] + torch.arange(b, device=labels.device).unsqueeze(1) * cx).reshape(-1)
    sums = torch.zeros(b * cx, c, dtype=dtype, device=hidden_remaining.device)
    sums.index_add_(0, flat_labels, hidden_remaining[:, members, :].reshape(-1, c).to(dtype))
    counts = torch.zeros(b * cx, dtype=dtype, device=hidden_remaining.device)
    counts.index_add_(0, flat_labels, torch.ones_like(flat_labels, dtype=dtype))
    means = (sums / counts.clamp_min(1).unsqueeze(1)).view(b, cx, c)
    return hidden_remaining[:, positions, :].to(dtype) + means


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, M) -> (B, M, C), as whole-row copies (faster than an expanded gather)."""
    b, n, c = x.shape
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * n).reshape(-1)
    return x.reshape(b * n, c).index_select(0, flat).view(b, index.shape[1], c)


def compress_reference_from_plan(
    plan: CompressPlan,
    hidden: torch.Tensor,
    attn: torch.Tensor,
    keys: Optional[torch.Tensor],
) -> CompressResult:
    """The oracle on already validated arguments (see :func:`compress_reference`)."""
    acc = compute_dtype(hidden.dtype)
    b, n, _ = hidden.shape
    d, cx = plan.dominant, plan.contextual
    scores = token_scores(attn, has_cls=plan.has_cls, dtype=acc)
    dominant = select_dominant(scores, d, has_cls=plan.has_cls)
    rest = remaining_indices(dominant, n)
    positions = target_positions(n - d, cx, device=hidden.device)

    token_map = torch.full((b, n), -1, dtype=torch.long, device=hidden.device)
    token_map.scatter_(1, dominant, torch.arange(d, device=hidden.device).expand(b, -1))
    blocks = [_gather_rows(hidden, dominant)]
    if cx > 0:
        metric = keys if keys is not None else hidden
        labels = assign_to_targets(normalize_rows(_gather_rows(metric, rest), acc), positions)
        token_map.scatter_(1, rest, labels + d)
        blocks.append(merge_contextual(_gather_rows(hidden, rest), labels, positions, acc).to(hidden.dtype))
    output = torch.cat(blocks, dim=1)
    return CompressResult(output, dominant, rest[:, positions], token_map)


def compress_reference(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> CompressResult:
    """VisionZip compression, the correctness oracle (docs/spec.md "Compress").

    Args:
        hidden: (B, N, C) hidden states of the selection layer.
        attn: (B, H, N, N) attention probabilities, (B, H, N) one row per head, or (B, N) scores.
        k: output tokens per image, D dominant + Cx contextual.
        keys: (B, N, Ck) similarity metric (keys averaged over heads); ``hidden`` when None.
        contextual: Cx; ``k * 5 // 32`` when None.
        has_cls: token 0 is a CLS token: it is scored by its attention row and always kept.

    Returns:
        :class:`CompressResult` with ``output`` (B, k, C) in hidden's dtype and the indices.
    """
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    return compress_reference_from_plan(plan, hidden, attn, keys)


def _reference_compress(
    plan: CompressPlan, hidden: torch.Tensor, attn: torch.Tensor, keys: Optional[torch.Tensor], with_indices: bool
) -> Union[torch.Tensor, CompressResult]:
    result = compress_reference_from_plan(plan, hidden, attn, keys)
    return result if with_indices else result.output


_backends.register("compress", "reference", _reference_compress)
