"""The oracle of ``group_pool`` (docs/spec.md "Group pool"): :func:`group_pool_reference`.

The dense one-hot formulation, in float32 (float64 for float64 values): A = one-hot(labels) as an
(M, N) matrix per image, out = (A @ values) / (A.sum(-1) + eps). When logits require a gradient the
assignment is GroupViT's straight-through one, A = hard + (soft - soft.detach()) with
soft = softmax(logits) over the groups: the same value (soft - soft.detach() is exactly 0), and
autograd then gives the straight-through gradient of logits that the kernels' formula
(``csrc/autograd.cpp``) must match. It is also the "reference" backend of the registry.
"""

from __future__ import annotations

from typing import Union

import torch

from .. import _backends
from .._validation import compute_dtype
from ..ops.group_pool import DEFAULT_EPS, GroupPoolPlan, GroupPoolResult, check_group_pool_inputs
from .compress import argmax_lowest


def group_labels(logits: torch.Tensor) -> torch.Tensor:
    """(B, M, N) logits -> (B, N) int64 argmax over m: ties to the lower m, NaN below every number
    (docs/spec.md "Ties and NaN"), compared in the logits' own dtype."""
    return argmax_lowest(logits.transpose(1, 2))


def group_pool_reference_from_plan(
    plan: GroupPoolPlan, logits: torch.Tensor, values: torch.Tensor
) -> GroupPoolResult:
    """The oracle on already validated arguments (see :func:`group_pool_reference`)."""
    acc = compute_dtype(values.dtype)
    labels = group_labels(logits)
    groups = torch.arange(plan.groups, device=logits.device)
    assign = (labels.unsqueeze(1) == groups.view(1, -1, 1)).to(acc)  # (B, M, N) one-hot
    if torch.is_grad_enabled() and logits.requires_grad:
        soft = torch.softmax(logits.to(acc), dim=1)
        assign = assign + (soft - soft.detach())  # straight-through: value of hard, gradient of soft
    out = (assign @ values.to(acc)) / (assign.sum(-1, keepdim=True) + plan.eps)
    counts = torch.zeros(plan.batch, plan.groups, dtype=torch.long, device=logits.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return GroupPoolResult(out.to(values.dtype), labels, counts)


def group_pool_reference(
    logits: torch.Tensor, values: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> GroupPoolResult:
    """Hard group pooling, the correctness oracle (docs/spec.md "Group pool").

    Args:
        logits: (B, M, N) assignment logits (groups x patches).
        values: (B, N, C) value rows.
        eps: finite, > 0, added to every group's count.

    Returns:
        :class:`GroupPoolResult`: output (B, M, C) in values' dtype, labels (B, N), counts (B, M).
    """
    plan = check_group_pool_inputs(logits, values, eps)
    return group_pool_reference_from_plan(plan, logits, values)


def _reference_group_pool(
    plan: GroupPoolPlan, logits: torch.Tensor, values: torch.Tensor, with_labels: bool
) -> Union[torch.Tensor, GroupPoolResult]:
    result = group_pool_reference_from_plan(plan, logits, values)
    return result if with_labels else result.output


_backends.register("group_pool", "reference", _reference_group_pool)
