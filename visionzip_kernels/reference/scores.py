"""The oracles of the score ops (docs/spec.md "Scores"): plain softmax over the materialised
N x N matrix, in float32 (float64 for float64 inputs). Tests compare every backend with them; they
are also the "reference" backend of the registry.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from ..ops.scores import check_cls_scores_inputs, check_received_scores_inputs, resolve_scale, score_dtype


def cls_scores_reference(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """(B, N) sum over heads of softmax(q . k^T * scale), q (B, H, d), k (B, H, N, d); plain softmax."""
    check_cls_scores_inputs(q, k, scale)
    dt = score_dtype(q.dtype)
    s = torch.einsum("bhd,bhnd->bhn", q.to(dt), k.to(dt)) * resolve_scale(scale, k.shape[-1])
    return torch.softmax(s, dim=-1).sum(dim=1)


def segment_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(N,) int64: the segment of each token (empty segments own no token)."""
    pos = torch.arange(n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.to(torch.int64), pos, right=True) - 1


def received_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, N) sum over heads and queries of softmax(Q K^T * scale); plain softmax over the full
    (B, H, N, N) matrix, block-diagonal (-inf outside a token's segment) with ``cu_seqlens``."""
    check_received_scores_inputs(q, k, scale, cu_seqlens)
    dt = score_dtype(q.dtype)
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * resolve_scale(scale, k.shape[-1])
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, k.shape[2])
        s = s.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    return torch.softmax(s, dim=-1).sum(dim=(1, 2))


_backends.register("cls_scores", "reference", lambda q, k, scale: cls_scores_reference(q, k, scale=scale))
_backends.register(
    "received_scores",
    "reference",
    lambda q, k, scale, cu_seqlens: received_scores_reference(q, k, scale=scale, cu_seqlens=cu_seqlens),
)
