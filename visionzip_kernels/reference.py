"""PyTorch implementations of VisionZip (SPEC sections 1-3).

Two functions, two purposes:

* :func:`visionzip_eager` transcribes the original VisionZip code (boolean masks, ``masked_select``,
  ``isin``, one-hot matrix products, all in the input dtype). It is the "eager" baseline of every
  benchmark. Its ``topk`` breaks ties arbitrarily and it computes in the input dtype, so it agrees
  with the contract only on inputs without ties.
* :func:`compress_reference` is the correctness oracle of every backend: static shapes, gathers
  instead of masks, float32 arithmetic (float64 for float64 inputs), ties toward the lower token
  index, NaN ranked below every number. It also returns the indices of the pass.

The helpers below it (:func:`token_scores`, :func:`select_dominant`, ...) are the stages of the
oracle, exposed so that tests can check a backend's choices stage by stage.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._validation import CompressPlan, check_compress_inputs, contextual_step, default_contextual


class CompressResult(NamedTuple):
    """Output of a compress pass together with the choices it made.

    output: (B, k, C), hidden's dtype: dominant rows (ascending token index) then contextual rows.
    dominant_indices: (B, D) int64, ascending token indices of the dominant tokens (CLS first if kept).
    contextual_indices: (B, Cx) int64, token index of each contextual target, in target order.
    token_map: (B, N) int64, the output row each token ends up in: its row in the dominant block,
        D + t for a token merged into (or being) contextual target t, -1 for a token dropped
        (only when Cx = 0).
    """

    output: torch.Tensor
    dominant_indices: torch.Tensor
    contextual_indices: torch.Tensor
    token_map: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Internal accumulation dtype: float64 for float64 inputs, float32 otherwise (SPEC 2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Oracle stages
# --------------------------------------------------------------------------------------------


def token_scores(attn: torch.Tensor, *, has_cls: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token importance, (B, N) in ``dtype``.

    attn (B, H, N, N): CLS row summed over heads if ``has_cls`` else attention received (sum over
    heads and queries); (B, H, N): summed over heads; (B, N): taken as is. With ``has_cls`` the
    entry of the CLS token itself is meaningless: :func:`select_dominant` forces it in.
    """
    if attn.dim() == 4:
        if has_cls:
            return attn[:, :, 0, :].to(dtype).sum(dim=1)
        return attn.sum(dim=(1, 2), dtype=dtype)
    if attn.dim() == 3:
        return attn.to(dtype).sum(dim=1)
    return attn.to(dtype)


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
    """VisionZip compression, the correctness oracle (SPEC 1-3).

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


# --------------------------------------------------------------------------------------------
# Eager transcription of the original code (benchmark baseline)
# --------------------------------------------------------------------------------------------


def visionzip_eager(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    *,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> torch.Tensor:
    """VisionZip written the way the original implementation writes it, in the input dtype.

    Same arguments as :func:`compress_reference`; returns only the (B, k, C) output.
    """
    contextual_num = default_contextual(k) if contextual is None else contextual
    dominant_num = k - contextual_num
    metric = keys if keys is not None else hidden
    batch, n, channels = hidden.shape

    if attn.dim() == 4:
        score = attn[:, :, 0, 1:].sum(dim=1) if has_cls else attn.sum(dim=(1, 2))
    elif attn.dim() == 3:
        score = attn.sum(dim=1)[:, 1:] if has_cls else attn.sum(dim=1)
    else:
        score = attn[:, 1:] if has_cls else attn

    if has_cls:
        topk_indices = score.topk(dominant_num - 1, dim=1).indices + 1
        zeros = torch.zeros((batch, 1), dtype=topk_indices.dtype, device=topk_indices.device)
        all_indices = torch.cat([zeros, topk_indices], dim=1)
    else:
        all_indices = score.topk(dominant_num, dim=1).indices

    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(batch, dominant_num, channels)
    if contextual_num == 0:
        return dominant_tokens

    metric_filtered = metric[mask].view(batch, n - dominant_num, metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(batch, n - dominant_num, channels)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=metric_normalized.device)
    target_indices = target_indices[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]

    others = ~torch.isin(torch.arange(metric_normalized.shape[1], device=metric_normalized.device), target_indices)
    tokens_to_merge = metric_normalized[:, others, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(
        tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
        dtype=hidden_filtered.dtype, device=metric_normalized.device,
    )
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_filtered[:, others, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1).to(hidden.dtype)
