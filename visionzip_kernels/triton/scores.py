"""Triton backend of the score ops (docs/spec.md "Scores"): kernels, launchers, custom ops.

Launch functions (plain tensors in, plain tensors out; validation is the caller's, see
``visionzip_kernels.scores``), then the custom ops ``visionzip::cls_scores_triton`` /
``received_scores_triton`` (also the CUDA kernels of the C++ ops, which have none of their own) and
the registry entries:

* :func:`cls_scores_triton`: one program per (image, head): online max / sum over key blocks, then
  a second sweep writing softmax(q . k^T * scale) into a (B, H, N) float32 buffer;
* :func:`received_scores_triton`: pass 1, one program per (image, head, query block): row
  log-sum-exp online over key blocks; pass 2, one program per (image, head, key block): sum over
  query blocks of exp(s - lse). Scores go through ``tl.dot`` one (BLOCK_M, BLOCK_N) tile at a time.

Both end with a head sum in torch, so every output element has one fixed summation order (no
atomics): results are deterministic. ``cu_seqlens`` becomes per-token segment bounds [lo, hi);
a block loops over the union of its rows' segments and masks what lies outside each row's own.
16-bit inputs go to ``tl.dot`` as they are (exact products, float32 accumulation); float32 uses
``input_precision="ieee"`` (TF32 would cost ~1e-3 relative in the logits). Under
``TRITON_INTERPRET=1`` everything is cast to float32 first (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _backends, _extension
from ..ops.scores import (
    check_cls_scores_inputs,
    check_cu_seqlens_values,
    check_received_scores_inputs,
    resolve_scale,
)
from ._utils import direct_call_ok, interpreting

_BLOCK = 64  # queries / keys per tile

_TL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _cls_scores_kernel(
    q_ptr, k_ptr, out_ptr,
    N, H, D,
    sq_b, sq_h, sk_b, sk_h, sk_n,
    scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_d, mask=dmask, other=0.0).to(tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # per-lane running max and sum
    l = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale
        s = tl.where(nmask, s, float("-inf"))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with nothing yet: no inf - inf
        l = l * tl.exp(m - m_safe) + tl.exp(s - m_safe)
        m = m_new
    m_all = tl.max(m, axis=0)
    lse = m_all + tl.log(tl.sum(l * tl.exp(m - m_all), axis=0))
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        kt = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale
        tl.store(out_ptr + pid * N + offs_n, tl.exp(s - lse), mask=nmask)


@triton.jit
def _tile_scores(q, k, scale, CAST_F32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 scores of a query tile (BLOCK_M, BLOCK_D) and a key tile (BLOCK_N, BLOCK_D)."""
    if CAST_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s * scale


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, lse_ptr, lo_ptr, hi_ptr,
    N, H, D,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    scale,
    HAS_SEG: tl.constexpr, CAST_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < N
    dmask = offs_d < D
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
        mask=mmask[:, None] & dmask[None, :], other=0.0,
    )
    if HAS_SEG:
        row_lo = tl.load(lo_ptr + offs_m, mask=mmask, other=N)
        row_hi = tl.load(hi_ptr + offs_m, mask=mmask, other=0)
        lo = tl.min(row_lo, axis=0)
        hi = tl.max(row_hi, axis=0)
    else:
        lo = 0
        hi = N
    k_base = k_ptr + b * sk_b + h * sk_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        nmask = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = _tile_scores(q, k, scale, CAST_F32)
        valid = nmask[None, :]
        if HAS_SEG:
            valid = valid & (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no inf - inf
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    l_i = tl.where(mmask, l_i, 1.0)  # rows past N: no log(0)
    tl.store(lse_ptr + pid_bh * N + offs_m, m_i + tl.log(l_i), mask=mmask)


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, lse_ptr, col_ptr, lo_ptr, hi_ptr,
    N, H, D,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n,
    scale,
    HAS_SEG: tl.constexpr, CAST_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    k = tl.load(
        k_ptr + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
        mask=nmask[:, None] & dmask[None, :], other=0.0,
    )
    if HAS_SEG:
        col_lo = tl.load(lo_ptr + offs_n, mask=nmask, other=N)
        col_hi = tl.load(hi_ptr + offs_n, mask=nmask, other=0)
        lo = tl.min(col_lo, axis=0)
        hi = tl.max(col_hi, axis=0)
    else:
        lo = 0
        hi = N
    q_base = q_ptr + b * sq_b + h * sq_h
    lse_base = lse_ptr + pid_bh * N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mmask = offs_m < hi
        q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=mmask, other=float("inf"))
        s = _tile_scores(q, k, scale, CAST_F32)
        valid = mmask[:, None] & nmask[None, :]
        if HAS_SEG:
            valid = valid & (offs_m[:, None] >= col_lo[None, :]) & (offs_m[:, None] < col_hi[None, :])
        p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(col_ptr + pid_bh * N + offs_n, acc, mask=nmask)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton score kernels take float16, bfloat16 or float32 q/k; got {q.dtype}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def cls_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """(B, N) float32 sum over heads of softmax(q . k^T * scale); q (B, H, d), k (B, H, N, d)."""
    _check_dtype(q)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    b, h, n, d = k.shape
    probs = torch.empty((b, h, n), device=k.device, dtype=torch.float32)
    if b * h > 0:
        _cls_scores_kernel[(b * h,)](
            q, k, probs, n, h, d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            resolve_scale(scale, d),
            BLOCK_N=_BLOCK, BLOCK_D=_block_d(d),
        )
    return probs.sum(dim=1)


def segment_bounds(cu_seqlens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token segment bounds (lo, hi), (N,) int32 each, from cu_seqlens; clamped to [0, N] so
    that malformed values cannot send a kernel out of bounds (validation happens before, in eager)."""
    cu = cu_seqlens.to(torch.int64).clamp(0, n)
    seg = torch.searchsorted(cu, torch.arange(n, device=cu.device), right=True) - 1
    seg = seg.clamp(0, cu.numel() - 2)
    return cu[seg].to(torch.int32), cu[seg + 1].to(torch.int32)


def received_scores_triton(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None
) -> torch.Tensor:
    """(B, N) float32 sum over heads and queries of softmax(Q K^T * scale); q, k (B, H, N, d);
    block-diagonal over the segments of ``cu_seqlens`` (B = 1) when given."""
    _check_dtype(q)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    b, h, n, d = k.shape
    lse = torch.empty((b, h, n), device=k.device, dtype=torch.float32)
    col = torch.empty((b, h, n), device=k.device, dtype=torch.float32)
    if b * h == 0:
        return col.sum(dim=1)
    has_seg = cu_seqlens is not None
    if has_seg:
        lo, hi = segment_bounds(cu_seqlens, n)
    else:
        lo = hi = lse  # unused placeholders (HAS_SEG=False)
    interp, f32 = interpreting(), q.dtype == torch.float32
    # The float32 "ieee" dot runs on FMA units with whole tiles in registers: 64 x 64 tiles spill
    # there (ptxas sm_90: 255 registers + ~1 KB spills, tools/check_triton_build.py), 32 x 32 do not.
    # The interpreter keeps 64: there each program instance costs, not registers.
    block = 32 if f32 and not interp else _BLOCK
    common = dict(HAS_SEG=has_seg, CAST_F32=interp or f32, BLOCK_M=block, BLOCK_N=block, BLOCK_D=_block_d(d))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    sc = resolve_scale(scale, d)
    grid = (b * h, triton.cdiv(n, block))
    _row_lse_kernel[grid](q, k, lse, lo, hi, n, h, d, *strides, sc, **common)
    _column_sums_kernel[grid](q, k, lse, col, lo, hi, n, h, d, *strides, sc, **common)
    return col.sum(dim=1)


# --------------------------------------------------------------------------------------------
# Custom ops, CUDA kernels of the C++ ops, registry entries. Tensor arguments of custom_op cannot be
# keyword-only, so the Triton ops take (q, k[, cu_seqlens], scale) positionally.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("visionzip::cls_scores_triton", mutates_args=())
def _cls_scores_op(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Triton cls_scores: q (B, H, d), k (B, H, N, d) -> (B, N) float32."""
    check_cls_scores_inputs(q, k, scale)
    return cls_scores_triton(q, k, scale)


@_cls_scores_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    b, n = check_cls_scores_inputs(q, k, scale)
    return q.new_empty((b, n), dtype=torch.float32)


@torch.library.custom_op("visionzip::received_scores_triton", mutates_args=())
def _received_scores_op(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None
) -> torch.Tensor:
    """Triton received_scores: q, k (B, H, N, d), cu_seqlens (S + 1,) or None -> (B, N) float32.
    cu_seqlens values are not read here (no host sync); the Python API checks them in eager mode."""
    check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
    return received_scores_triton(q, k, cu_seqlens, scale)


@_received_scores_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None
) -> torch.Tensor:
    b, n = check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
    return q.new_empty((b, n), dtype=torch.float32)


# CUDA kernels of the C++ ops, where the extension brings none. They apply the CPU kernels' checks,
# so the same op rejects the same input on every device: the cu_seqlens values are read on the host
# too (a sync), except under graph capture or tracing, where they cannot be.
if not _extension.has_kernel("visionzip::cls_scores", "CUDA"):

    @torch.library.impl("visionzip::cls_scores", "CUDA")
    def _cls_scores_cuda(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None) -> torch.Tensor:
        check_cls_scores_inputs(q, k, scale)
        return cls_scores_triton(q, k, scale)


if not _extension.has_kernel("visionzip::received_scores", "CUDA"):

    @torch.library.impl("visionzip::received_scores", "CUDA")
    def _received_scores_cuda(
        q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, cu_seqlens: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        check_received_scores_inputs(q, k, scale, cu_seqlens, check_values=False)
        if cu_seqlens is not None and not torch.cuda.is_current_stream_capturing():
            check_cu_seqlens_values(cu_seqlens, k.shape[2])
        return received_scores_triton(q, k, cu_seqlens, scale)


def _triton_cls_scores(q: torch.Tensor, k: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
    return cls_scores_triton(q, k, scale) if direct_call_ok(q, k) else torch.ops.visionzip.cls_scores_triton(q, k, scale)


def _triton_received_scores(
    q: torch.Tensor, k: torch.Tensor, scale: Optional[float], cu_seqlens: Optional[torch.Tensor]
) -> torch.Tensor:
    if direct_call_ok(q, k, cu_seqlens):
        return received_scores_triton(q, k, cu_seqlens, scale)
    return torch.ops.visionzip.received_scores_triton(q, k, cu_seqlens, scale)


_backends.register("cls_scores", "triton", _triton_cls_scores)
_backends.register("received_scores", "triton", _triton_received_scores)
