"""The score ops (docs/spec.md "Scores"): token scores from q and k without the N x N matrix.

The original VisionZip code runs the whole vision tower with eager attention and
``output_attentions=True`` to read one layer's attention probabilities. Those scores only need the
selection layer's queries and keys:

* :func:`cls_scores` (CLS models: CLIP, LLaVA): sum over heads of softmax(q_cls . K^T * scale),
  O(N d) per head. Pass the result to ``compress`` as the (B, N) ``attn``.
* :func:`received_scores` (no-CLS models: SigLIP, Qwen2-VL): the attention each key receives, sum
  over heads and queries of softmax(Q K^T * scale), computed in two streaming passes over tiles
  (row log-sum-exp, then per key tile the sum over query tiles of exp(s - lse)). ``cu_seqlens``
  gives packed images (Qwen2-VL's layout) that attend only within themselves.

This module holds the argument checks, the fake kernels of ``torch.ops.visionzip.cls_scores`` /
``received_scores`` (defined in ``csrc/ops.cpp``, CPU kernels in ``csrc/cpu/scores_cpu.cpp``), their
registration as the "cpu" backend, and the public entries, which select through
``visionzip_kernels._backends``. The references are in ``visionzip_kernels.reference.scores``.

Layout: q and k are per-head, (B, H, N, d), as an attention module builds them before calling
SDPA; ``cls_scores`` takes the CLS query only, ``q[:, :, 0]`` of shape (B, H, d). Queries and keys
must cover the same N tokens (self-attention). Scores come back in float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _backends
from .._validation import (
    FLOAT_DTYPES,
    check_same_device,
    check_scale,
    check_tensor,
    compute_dtype,
    format_shape,
    is_tracing,
)

__all__ = [
    "available_score_backends",
    "check_cls_scores_inputs",
    "check_received_scores_inputs",
    "cls_scores",
    "received_scores",
    "resolve_scale",
    "score_dtype",
]

#: Dtype of the scores: float64 for float64 inputs, float32 otherwise, as compress computes them.
score_dtype = compute_dtype


def resolve_scale(scale: Optional[float], d: int) -> float:
    """The softmax scale: ``scale``, or 1/sqrt(d) when None."""
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------
# Argument checks (shared by the entries, the fake kernels, the references and the Triton ops)
# --------------------------------------------------------------------------------------------


def _check_pair_dtype_device(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got dtype {t.dtype}"
            )
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype; got q {q.dtype}, k {k.dtype}")
    check_same_device("k", k, "q", q)


def _check_k(k: torch.Tensor) -> tuple[int, int, int, int]:
    check_tensor("k", k, "(B, H, N, d)")
    if k.dim() != 4:
        raise ValueError(f"k must have shape (B, H, N, d) (per-head keys); got a {k.dim()}-D tensor of shape {format_shape(k)}")
    b, h, n, d = k.shape
    if h < 1 or n < 1 or d < 1:
        raise ValueError(f"k must have H >= 1 heads, N >= 1 tokens and head dim d >= 1; got shape {format_shape(k)}")
    return b, h, n, d


def check_cls_scores_inputs(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> tuple[int, int]:
    """Validate ``cls_scores`` arguments; returns the output shape (B, N).

    q: (B, H, d) CLS query per head; k: (B, H, N, d). Raises ``ValueError`` naming the argument.
    """
    b, h, n, d = _check_k(k)
    check_tensor("q", q, "(B, H, d)")
    if q.dim() != 3:
        raise ValueError(
            f"q must have shape (B, H, d) (the CLS query of every head, e.g. q[:, :, 0] of per-head queries); "
            f"got a {q.dim()}-D tensor of shape {format_shape(q)}"
        )
    if not (q.shape[0] == b and q.shape[1] == h and q.shape[2] == d):
        raise ValueError(f"q of shape {format_shape(q)} does not match k {format_shape(k)}: expected (B, H, d) = ({b}, {h}, {d})")
    _check_pair_dtype_device(q, k)
    check_scale(scale)
    return b, n


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n: int) -> None:
    """0 = c_0 <= c_1 <= ... <= c_S = N, read on the host (a device sync for CUDA tensors)."""
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at N = {n}; got {c[0]} ... {c[-1]}")
    bad = next((i for i in range(1, len(c)) if c[i] < c[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be non-decreasing; got {c[bad - 1]} then {c[bad]} at index {bad}")


def check_received_scores_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    check_values: bool = True,
) -> tuple[int, int]:
    """Validate ``received_scores`` arguments; returns the output shape (B, N).

    q, k: (B, H, N, d), same shape; cu_seqlens: None or (S + 1,) int32/int64 with
    0 = c_0 <= c_1 <= ... <= c_S = N, only with B = 1. The values of cu_seqlens are checked when
    ``check_values`` and they are readable (not under tracing); this reads them on the host.
    """
    b, h, n, d = _check_k(k)
    check_tensor("q", q, "(B, H, N, d)")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, N, d) (per-head queries); got a {q.dim()}-D tensor of shape {format_shape(q)}")
    if q.shape != k.shape:
        raise ValueError(
            f"q of shape {format_shape(q)} does not match k {format_shape(k)}: expected (B, H, N, d) = ({b}, {h}, {n}, {d}) "
            "(self-attention: queries and keys cover the same N tokens)"
        )
    _check_pair_dtype_device(q, k)
    check_scale(scale)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, "(S + 1,)")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must have shape (S + 1,) with S >= 1 segments; got shape {format_shape(cu_seqlens)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64; got dtype {cu_seqlens.dtype}")
        check_same_device("cu_seqlens", cu_seqlens, "q", q)
        if b != 1:
            raise ValueError(
                f"with cu_seqlens the images are packed along N, so B must be 1; got q, k of shape {format_shape(q)}"
            )
        if check_values and not is_tracing(cu_seqlens):
            check_cu_seqlens_values(cu_seqlens, n)
    return b, n


# --------------------------------------------------------------------------------------------
# Fake kernels of the C++ ops, and the ops as the "cpu" backend
# --------------------------------------------------------------------------------------------


@torch.library.register_fake("visionzip::cls_scores")
def _cls_scores_fake(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    b, n = check_cls_scores_inputs(q, k, scale)
    return q.new_empty((b, n), dtype=score_dtype(q.dtype))


@torch.library.register_fake("visionzip::received_scores")
def _received_scores_fake(
    q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    b, n = check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
    return q.new_empty((b, n), dtype=score_dtype(q.dtype))


def _extension_cls_scores(q: torch.Tensor, k: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    return torch.ops.visionzip.cls_scores(q, k, scale=scale)


def _extension_received_scores(
    q: torch.Tensor, k: torch.Tensor, scale: Optional[float], cu_seqlens: Optional[torch.Tensor]
) -> torch.Tensor:
    return torch.ops.visionzip.received_scores(q, k, scale=scale, cu_seqlens=cu_seqlens)


_backends.register("cls_scores", "cpu", _extension_cls_scores)
_backends.register("received_scores", "cpu", _extension_received_scores)


# --------------------------------------------------------------------------------------------
# Public entries
# --------------------------------------------------------------------------------------------


def available_score_backends(
    device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None
) -> list[str]:
    """Backends of the score ops on ``device`` (default: cuda if available, else cpu), fastest first;
    with ``dtype`` (q's), only those that take it.

    cpu: ["cpu", "reference"] (+ "triton" under ``TRITON_INTERPRET=1``, for testing);
    cuda: ["triton" if triton is installed, "reference"]; float64 runs on "cpu" and "reference" only.
    """
    return _backends.available("received_scores", device, dtype)


def cls_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """CLS attention scores of a CLS-model layer, without the N x N matrix.

    Args:
        q: (B, H, d) the CLS token's query in every head (``q[:, :, 0]`` of per-head queries).
        k: (B, H, N, d) per-head keys of the same layer (any strides; last dim contiguous is fastest).
        scale: softmax scale; None for 1/sqrt(d).
        backend: a name of :func:`available_score_backends`, or None for the fastest available.

    Returns:
        (B, N) float32 (float64 for float64 inputs): sum over heads of softmax(q . k^T * scale),
        which equals ``attn[:, :, 0, :].sum(1)`` of the layer's attention probabilities. Pass it to
        ``compress`` as ``attn`` (the CLS entry, index 0, is ignored there).
    """
    check_cls_scores_inputs(q, k, scale)
    _, impl = _backends.select("cls_scores", backend, q.device, q.dtype)
    return impl(q, k, scale)


def received_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention received by every token (no-CLS models), without the N x N matrix.

    Args:
        q: (B, H, N, d) per-head queries of the layer.
        k: (B, H, N, d) per-head keys (same N: self-attention).
        scale: softmax scale; None for 1/sqrt(d).
        cu_seqlens: None, or (S + 1,) int32/int64 cumulative segment lengths 0 = c_0 <= ... <= c_S = N
            for S images packed along N (Qwen2-VL's vision encoder): token i attends only to the
            tokens of its own segment. Requires B = 1. Its values are checked on the host in eager
            mode (a device sync for CUDA tensors); under torch.compile they are not checked.
        backend: a name of :func:`available_score_backends`, or None for the fastest available.

    Returns:
        (B, N) float32 (float64 for float64 inputs): sum over heads and queries of
        softmax(Q K^T * scale) (block-diagonal with ``cu_seqlens``), which equals
        ``attn.sum(dim=(1, 2))``. Pass it to ``compress(..., has_cls=False)`` as ``attn``.
    """
    check_received_scores_inputs(q, k, scale, cu_seqlens)
    _, impl = _backends.select("received_scores", backend, q.device, q.dtype)
    return impl(q, k, scale, cu_seqlens)
