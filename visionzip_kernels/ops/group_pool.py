"""The ``group_pool`` op (docs/spec.md "Group pool"): argument checks, fake kernels, public entry.

Hard grouping of N patches into M groups (VisToG's grouping, assigned as in GroupViT's assign block):
every patch joins the group whose logit is largest, and each group's output is the sum of its
members' value rows divided by (count + eps). The kernels compute it as a segmented sum, O(N C)
per image, instead of the dense (M x N) one-hot product, O(M N C).

``torch.ops.visionzip.group_pool`` / ``group_pool_with_labels`` are defined in C++ (``csrc/ops.cpp``,
kernels in ``csrc/cpu`` and ``csrc/cuda``, autograd in ``csrc/autograd.cpp``); this module gives them
their fake kernels, registers them as the "cpu" and "cuda" backends of the registry, and defines
:func:`group_pool`, which validates once and selects a backend through ``visionzip_kernels._backends``.
The oracle is ``visionzip_kernels.reference.group_pool``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

from .. import _backends
from .._validation import check_bool, check_float, check_same_device, check_tensor, format_shape

__all__ = [
    "DEFAULT_EPS",
    "GroupPoolPlan",
    "GroupPoolResult",
    "available_group_pool_backends",
    "check_group_pool_inputs",
    "group_pool",
]

#: GroupViT's ``assign_eps``: out_m = sum / (count_m + 1).
DEFAULT_EPS = 1.0


@dataclass(frozen=True)
class GroupPoolPlan:
    """Static sizes of one ``group_pool`` call (Python ints, or SymInts under tracing). Its C++ twin
    is ``GroupPoolPlan`` in ``csrc/group_pool_common.h``."""

    batch: int  # B
    groups: int  # M
    patches: int  # N
    channels: int  # C
    eps: float


class GroupPoolResult(NamedTuple):
    """Output of a group pool together with the assignment it made (docs/spec.md "Group pool").

    output: (B, M, C) in values' dtype, sum of each group's value rows / (count + eps).
    labels: (B, N) int64, the group of every patch (argmax over m of logits[:, m, j]).
    counts: (B, M) int64, patches per group (0 for an empty group).
    """

    output: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor


def check_eps(eps: object) -> float:
    """eps: a real number (int or float, not a bool), finite and > 0 (an empty group then gives 0)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps must be a float (finite, > 0); got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0 (out_m = sum / (count_m + eps), count_m may be 0); got {eps}")
    return float(eps)


def check_group_pool_inputs(logits: torch.Tensor, values: torch.Tensor, eps: float = DEFAULT_EPS) -> GroupPoolPlan:
    """Validate the arguments of ``group_pool`` and return its static sizes.

    logits: (B, M, N) floating; values: (B, N, C) floating, on logits' device; eps finite and > 0.
    Raises ``ValueError`` naming the offending argument.
    """
    check_tensor("logits", logits, "(B, M, N)")
    check_tensor("values", values, "(B, N, C)")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, M, N); got a {logits.dim()}-D tensor of shape {format_shape(logits)}")
    if values.dim() != 3:
        raise ValueError(f"values must have shape (B, N, C); got a {values.dim()}-D tensor of shape {format_shape(values)}")
    check_float("logits", logits)
    check_float("values", values)
    b, m, n = logits.shape
    if m < 1 or n < 1:
        raise ValueError(f"logits must have M >= 1 groups and N >= 1 patches; got shape {format_shape(logits)}")
    if values.shape[0] != b or values.shape[1] != n or values.shape[2] < 1:
        raise ValueError(
            f"values of shape {format_shape(values)} does not match logits {format_shape(logits)}: expected "
            f"(B, N, C) = ({b}, {n}, C) with C >= 1"
        )
    check_same_device("values", values, "logits", logits)
    return GroupPoolPlan(batch=b, groups=m, patches=n, channels=values.shape[2], eps=check_eps(eps))


def empty_outputs(values: torch.Tensor, plan: GroupPoolPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (output, labels, counts) for ``plan``."""
    idx = dict(dtype=torch.long)
    return (
        values.new_empty((plan.batch, plan.groups, plan.channels)),
        values.new_empty((plan.batch, plan.patches), **idx),
        values.new_empty((plan.batch, plan.groups), **idx),
    )


# ------------------------------------------------------------------------------------------------
# Fake kernels of the C++ ops, and the ops as the "cpu" / "cuda" backends
# ------------------------------------------------------------------------------------------------


@torch.library.register_fake("visionzip::group_pool")
def _group_pool_fake(logits, values, *, eps=DEFAULT_EPS) -> torch.Tensor:
    return empty_outputs(values, check_group_pool_inputs(logits, values, eps))[0]


@torch.library.register_fake("visionzip::group_pool_with_labels")
def _group_pool_with_labels_fake(logits, values, *, eps=DEFAULT_EPS):
    return empty_outputs(values, check_group_pool_inputs(logits, values, eps))


def _extension_group_pool(
    plan: GroupPoolPlan, logits: torch.Tensor, values: torch.Tensor, with_labels: bool
) -> Union[torch.Tensor, GroupPoolResult]:
    """The C++ op, which dispatches on the device: its CPU kernel, or its CUDA kernel."""
    if with_labels:
        return GroupPoolResult(*torch.ops.visionzip.group_pool_with_labels(logits, values, eps=plan.eps))
    return torch.ops.visionzip.group_pool(logits, values, eps=plan.eps)


_backends.register("group_pool", "cpu", _extension_group_pool)
_backends.register("group_pool", "cuda", _extension_group_pool)


# ------------------------------------------------------------------------------------------------
# Public entry
# ------------------------------------------------------------------------------------------------


def available_group_pool_backends(
    device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """Backends of ``group_pool`` that run on ``device`` (default: cuda if available, else cpu),
    fastest first; with ``dtype`` (values'), only those that take it.

    cpu: ["cpu", "reference"] (+ "triton" under ``TRITON_INTERPRET=1``, for testing);
    cuda: ["cuda" if the extension has CUDA kernels, "triton" if triton is installed, "reference"];
    float64 values run on "cpu" and "reference" only.
    """
    return _backends.available("group_pool", device, dtype)


def group_pool(
    logits: torch.Tensor,
    values: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    backend: Optional[str] = None,
    return_labels: bool = False,
) -> Union[torch.Tensor, GroupPoolResult]:
    """Pool N patches into M groups by their argmax logit (docs/spec.md "Group pool").

    Args:
        logits: (B, M, N) assignment logits of M groups (semantic tokens) x N patches, any float dtype.
        values: (B, N, C) the patches' value rows (float16/bfloat16/float32/float64).
        eps: added to every group's count, finite and > 0 (default 1.0, GroupViT's ``assign_eps``).
        backend: a name of :func:`available_group_pool_backends`, or None for the fastest available.
        return_labels: also return the labels and the group sizes.

    Returns:
        (B, M, C) in values' dtype, out[b, m] = sum over patches j with label j == m of values[b, j]
        / (count[b, m] + eps), where label j = argmax over m of logits[b, m, j] (ties to the lower m,
        NaN below every number); or a :class:`GroupPoolResult` when ``return_labels``.
        Differentiable in values (exact) and in logits (straight-through: the gradient of the same
        formula with softmax(logits) over m in place of the one-hot labels).
    """
    plan = check_group_pool_inputs(logits, values, eps)
    check_bool("return_labels", return_labels)
    _, impl = _backends.select("group_pool", backend, values.device, values.dtype)
    return impl(plan, logits, values, bool(return_labels))
