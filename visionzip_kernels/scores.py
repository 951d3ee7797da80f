"""VisionZip token scores from q and k, without the N x N attention matrix (SPEC 4).

The original VisionZip code runs the whole vision tower with eager attention and
``output_attentions=True`` to read one layer's attention probabilities. Those scores only need the
selection layer's queries and keys:

* :func:`cls_scores` (CLS models: CLIP, LLaVA): sum over heads of softmax(q_cls . K^T * scale),
  O(N d) per head. Pass the result to ``compress`` as the (B, N) ``attn``.
* :func:`received_scores` (no-CLS models: SigLIP, Qwen2-VL): the attention each key receives, sum
  over heads and queries of softmax(Q K^T * scale), computed in two streaming passes over tiles
  (row log-sum-exp, then per key tile the sum over query tiles of exp(s - lse)). ``cu_seqlens``
  gives packed images (Qwen2-VL's layout) that attend only within themselves.

The rest of the tower keeps SDPA / FlashAttention. Scores come back in float32 (float64 for
float64 inputs), like every score inside ``compress``.

Layout: q and k are per-head, (B, H, N, d), as an attention module builds them before calling
SDPA; ``cls_scores`` takes the CLS query only, ``q[:, :, 0]`` of shape (B, H, d). Queries and keys
must cover the same N tokens (self-attention); cross-attention lengths are not supported.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from ._validation import FLOAT_DTYPES, format_shape
from .reference import compute_dtype

SCORE_BACKENDS = ("reference", "cpu", "triton")

__all__ = [
    "SCORE_BACKENDS",
    "available_score_backends",
    "check_cls_scores_inputs",
    "check_received_scores_inputs",
    "cls_scores",
    "cls_scores_reference",
    "received_scores",
    "received_scores_reference",
]


# --------------------------------------------------------------------------------------------
# Validation (shared by the entry points, the fake kernels and the Triton ops)
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: object, form: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {form}; got {type(t).__name__}")


def _check_pair_dtype_device(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64); got dtype {t.dtype}"
            )
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype; got q {q.dtype}, k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}; both must be on one device")


def _check_scale(scale: Optional[float]) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None (None: 1/sqrt(d)); got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")


def _check_k(k: torch.Tensor) -> tuple[int, int, int, int]:
    _check_tensor("k", k, "(B, H, N, d)")
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
    _check_tensor("q", q, "(B, H, d)")
    if q.dim() != 3:
        raise ValueError(
            f"q must have shape (B, H, d) (the CLS query of every head, e.g. q[:, :, 0] of per-head queries); "
            f"got a {q.dim()}-D tensor of shape {format_shape(q)}"
        )
    if tuple(q.shape) != (b, h, d):
        raise ValueError(f"q of shape {format_shape(q)} does not match k {format_shape(k)}: expected (B, H, d) = ({b}, {h}, {d})")
    _check_pair_dtype_device(q, k)
    _check_scale(scale)
    return b, n


def _is_tracing(t: torch.Tensor) -> bool:
    """True for fake / traced tensors, whose values cannot (and must not) be read."""
    from torch._subclasses.fake_tensor import FakeTensor

    return torch.compiler.is_compiling() or isinstance(t, FakeTensor) or t.device.type == "meta"


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
    _check_tensor("q", q, "(B, H, N, d)")
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, N, d) (per-head queries); got a {q.dim()}-D tensor of shape {format_shape(q)}")
    if q.shape != k.shape:
        raise ValueError(
            f"q of shape {format_shape(q)} does not match k {format_shape(k)}: expected (B, H, N, d) = ({b}, {h}, {n}, {d}) "
            "(self-attention: queries and keys cover the same N tokens)"
        )
    _check_pair_dtype_device(q, k)
    _check_scale(scale)
    if cu_seqlens is not None:
        _check_tensor("cu_seqlens", cu_seqlens, "(S + 1,)")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must have shape (S + 1,) with S >= 1 segments; got shape {format_shape(cu_seqlens)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64; got dtype {cu_seqlens.dtype}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; both must be on one device")
        if b != 1:
            raise ValueError(
                f"with cu_seqlens the images are packed along N, so B must be 1; got q, k of shape {format_shape(q)}"
            )
        if check_values and not _is_tracing(cu_seqlens):
            c = cu_seqlens.tolist()
            if c[0] != 0 or c[-1] != n:
                raise ValueError(f"cu_seqlens must start at 0 and end at N = {n}; got {c[0]} ... {c[-1]}")
            bad = next((i for i in range(1, len(c)) if c[i] < c[i - 1]), None)
            if bad is not None:
                raise ValueError(f"cu_seqlens must be non-decreasing; got {c[bad - 1]} then {c[bad]} at index {bad}")
    return b, n


# Dtype of the scores: float64 for float64 inputs, float32 otherwise (SPEC 2), as compress computes.
score_dtype = compute_dtype


def _scale(scale: Optional[float], d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


# --------------------------------------------------------------------------------------------
# Reference (plain softmax, materialises the N x N matrix: for tests)
# --------------------------------------------------------------------------------------------


def cls_scores_reference(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
    """(B, N) sum over heads of softmax(q . k^T * scale), q (B, H, d), k (B, H, N, d); plain softmax."""
    check_cls_scores_inputs(q, k, scale)
    dt = score_dtype(q.dtype)
    s = torch.einsum("bhd,bhnd->bhn", q.to(dt), k.to(dt)) * _scale(scale, k.shape[-1])
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
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * _scale(scale, k.shape[-1])
    if cu_seqlens is not None:
        seg = segment_ids(cu_seqlens, k.shape[2])
        s = s.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    return torch.softmax(s, dim=-1).sum(dim=(1, 2))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def available_score_backends(device: Union[torch.device, str, None] = None) -> list[str]:
    """Score backends that can run on ``device`` (default: cuda if available, else cpu), fastest first.

    cpu: ["cpu", "reference"] (+ "triton" under ``TRITON_INTERPRET=1``, for testing);
    cuda: ["triton" if triton is installed, "reference"].
    """
    from . import ops  # late import: ops imports this module's validation

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        names = ["cpu", "reference"]
        if ops.HAS_TRITON_SCORES and ops.TRITON.interpreting():
            names.append("triton")
        return names
    if device.type == "cuda" and ops.HAS_TRITON_SCORES:
        return ["triton", "reference"]
    return ["reference"]


def _pick_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    names = available_score_backends(device)
    if backend is None:
        # The Triton kernels take 16- and 32-bit floats only: float64 on a GPU uses the reference.
        if names[0] == "triton" and dtype == torch.float64:
            return "reference"
        return names[0]
    if backend not in SCORE_BACKENDS:
        raise ValueError(f"backend must be one of {SCORE_BACKENDS} or None; got {backend!r}")
    if backend not in names:
        raise ValueError(f"backend {backend!r} is not available for tensors on {device}; available: {names}")
    if backend == "triton" and dtype == torch.float64:
        raise ValueError("backend 'triton' supports float16, bfloat16 and float32 q/k; got float64 (use 'cpu' or 'reference')")
    return backend


def cls_scores(
    q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """CLS attention scores of a CLS-model layer, without the N x N matrix.

    Args:
        q: (B, H, d) the CLS token's query in every head (``q[:, :, 0]`` of per-head queries).
        k: (B, H, N, d) per-head keys of the same layer (any strides; last dim contiguous is fastest).
        scale: softmax scale; None for 1/sqrt(d).
        backend: "cpu", "triton", "reference" or None for the fastest available.

    Returns:
        (B, N) float32 (float64 for float64 inputs): sum over heads of softmax(q . k^T * scale),
        which equals ``attn[:, :, 0, :].sum(1)`` of the layer's attention probabilities. Pass it to
        ``compress`` as ``attn`` (the CLS entry, index 0, is ignored there).
    """
    check_cls_scores_inputs(q, k, scale)
    backend = _pick_backend(backend, q.device, q.dtype)
    if backend == "reference":
        return cls_scores_reference(q, k, scale=scale)
    if backend == "triton":
        return torch.ops.visionzip.cls_scores_triton(q, k, scale)
    return torch.ops.visionzip.cls_scores(q, k, scale=scale)


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
        backend: "cpu", "triton", "reference" or None for the fastest available.

    Returns:
        (B, N) float32 (float64 for float64 inputs): sum over heads and queries of
        softmax(Q K^T * scale) (block-diagonal with ``cu_seqlens``), which equals
        ``attn.sum(dim=(1, 2))``. Pass it to ``compress(..., has_cls=False)`` as ``attn``.
    """
    check_received_scores_inputs(q, k, scale, cu_seqlens)
    backend = _pick_backend(backend, q.device, q.dtype)
    if backend == "reference":
        return received_scores_reference(q, k, scale=scale, cu_seqlens=cu_seqlens)
    if backend == "triton":
        return torch.ops.visionzip.received_scores_triton(q, k, cu_seqlens, scale)
    return torch.ops.visionzip.received_scores(q, k, scale=scale, cu_seqlens=cu_seqlens)
