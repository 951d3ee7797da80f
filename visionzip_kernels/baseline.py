"""The eager baselines of the benchmarks: VisionZip as the original code writes it, and the dense
one-hot group pooling. Not oracles.

:func:`visionzip_eager` transcribes the official implementation (boolean masks, ``masked_select``,
``isin``, one-hot matrix products, all in the input dtype). Its ``topk`` breaks ties arbitrarily and
it computes in the input dtype, so it agrees with the contract (docs/spec.md "Compress") only on
inputs without ties; tests compare it with the oracle on tie-free float64 inputs only. Correctness
is judged against ``visionzip_kernels.reference.compress_reference``.

:func:`group_pool_dense_eager` is hard group pooling (docs/spec.md "Group pool") as a model writes
it: a one-hot assignment from ``argmax``, then the dense (M x N) @ (N x C) product over the count,
in the values' dtype (``argmax`` ranks NaN highest, unlike the contract).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops.compress import default_contextual
from .ops.group_pool import DEFAULT_EPS


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


def group_pool_dense_eager(logits: torch.Tensor, values: torch.Tensor, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """logits (B, M, N), values (B, N, C) -> (B, M, C): A = one-hot(argmax over m), (A @ values) /
    (A.sum(-1) + eps), the O(M N C) dense formulation the group_pool kernels replace."""
    assign = torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).transpose(1, 2).to(values.dtype)
    return (assign @ values) / (assign.sum(dim=-1, keepdim=True) + eps)
