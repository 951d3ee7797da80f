"""Triton backend of ``group_pool`` (docs/spec.md "Group pool"): kernel, launcher, custom ops.

One launch, grid ``(B, S)``: program (b, s) handles image b and writes output channels
[s * C/S, (s + 1) * C/S) (``_utils.channel_splits``: about two programs per SM, at least 256 channels
each; S = 1 in the interpreter). Phases, separated by ``tl.debug_barrier()`` (later phases read what
other threads of the program wrote to its small global workspace):

1. labels: per block of BLOCK_N patches, the running argmax over the M group rows of logits (rows
   read contiguously along N), ties to the lower m, NaN lowest, compared in float32 (float64 for
   float64 logits: both exact); written to the workspace and to ``labels`` (int64);
2. a stable counting sort of the patches by label (``_segmented.member_lists``, compress's): the
   group sizes (written to ``counts``) and each group's members in ascending patch order;
3. per group and channel tile, the sum of its members' value rows (``_segmented.segment_sum``,
   compress's means loop: 16 rows in flight, elementwise slot sums, a fixed pairwise tree), divided
   by count + eps with ``tl.div_rn``.

Every program of an image repeats phases 1-2 (logits: M x N elements, mostly L2 hits when the
programs of an image run together) and writes identical labels and counts; only phase 3, where the
bytes are, is split. Per-channel sums keep their order, so the output is bit-identical for every S
and run to run. Memory traffic per image: N*C values read once, M*N logits read (S times, L2), M*C
written, plus 8*(N + M) bytes of labels and counts; the int32 workspace is 2*(N + M) elements.
float64 values are not supported (ValueError); logits may be any float dtype.
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from .. import _backends, _extension
from ..ops.group_pool import (
    DEFAULT_EPS,
    GroupPoolPlan,
    GroupPoolResult,
    check_group_pool_inputs,
    empty_outputs,
)
from . import _utils
from ._segmented import member_lists, segment_sum
from ._utils import next_pow2


@triton.jit
def _group_pool_kernel(
    lg_ptr, s_lb, s_lm, s_ln,  # logits (B, M, N)
    val_ptr, s_vb, s_vn, s_vc,  # values (B, N, C)
    out_ptr, lab_ptr, cnt_ptr,  # contiguous outputs (B, M, C), (B, N) int64, (B, M) int64
    ws_ptr,  # int32 workspace (B * S, 2 * (N + M))
    M, N, C, C_SPLIT, eps,
    CMP: tl.constexpr,  # comparison dtype of the logits: tl.float32, or tl.float64 for float64 logits
    BLOCK_N: tl.constexpr,  # patches per block of the label phase
    BLOCK_P: tl.constexpr,  # patches per tile of the counting sort
    BLOCK_G: tl.constexpr,  # groups per tile of the counting sort
    BLOCK_C: tl.constexpr,  # channels per tile of the sums
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_lo = split * C_SPLIT
    c_hi = tl.minimum(c_lo + C_SPLIT, C)
    ws = ws_ptr + (b * n_split + split) * (2 * (N + M))
    lab_ws = ws  # label of each patch
    mem_ws = ws + N  # patches grouped by label (ascending inside a group)
    cnt_ws = ws + 2 * N  # members per group
    off_ws = ws + 2 * N + M  # first slot of each group in mem_ws
    lg_b = lg_ptr + b * s_lb
    val_b = val_ptr + b * s_vb
    offs_n = tl.arange(0, BLOCK_N)

    # ---- 1. labels: argmax over m, groups in ascending order, a later one wins only if strictly better
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        jm = j < N
        col = lg_b + j.to(tl.int64) * s_ln
        best = tl.load(col, mask=jm, other=0.0).to(CMP)
        arg = tl.zeros([BLOCK_N], dtype=tl.int32)
        for m in range(1, M):
            x = tl.load(col + (tl.zeros([], dtype=tl.int64) + m) * s_lm, mask=jm, other=0.0).to(CMP)
            take = (x == x) & ((best != best) | (x > best))  # x == x: not NaN
            best = tl.where(take, x, best)
            arg = tl.where(take, m, arg)
        tl.store(lab_ws + j, arg, mask=jm)
        tl.store(lab_ptr + b * N + j, arg.to(tl.int64), mask=jm)
    tl.debug_barrier()

    # ---- 2. counting sort of the patches by label (shared with compress) --------------------------
    member_lists(lab_ws, lab_ws, cnt_ws, off_ws, mem_ws, N, M, 1, 0,
                 TOKENS=False, BLOCK_P=BLOCK_P, BLOCK_G=BLOCK_G)
    offs_g = tl.arange(0, BLOCK_G)
    for g0 in range(0, M, BLOCK_G):
        g = g0 + offs_g
        tl.store(cnt_ptr + b * M + g, tl.load(cnt_ws + g, mask=g < M, other=0).to(tl.int64), mask=g < M)

    # ---- 3. out[m] = sum of the members' rows / (count + eps) -------------------------------------
    offs_c = tl.arange(0, BLOCK_C)
    for m in range(0, M):
        n_mem = tl.load(cnt_ws + m)
        first = tl.load(off_ws + m)
        den = n_mem.to(tl.float32) + eps
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + offs_c
            cm = c < c_hi
            total = segment_sum(val_b, s_vn, s_vc, mem_ws + first, n_mem, c, cm, BLOCK_C)
            res = tl.div_rn(total, tl.zeros([BLOCK_C], dtype=tl.float32) + den)
            tl.store(out_ptr + (b * M + m) * C + c, res.to(out_ptr.dtype.element_ty), mask=cm)


def check_triton_inputs(logits: torch.Tensor, values: torch.Tensor, eps: float = DEFAULT_EPS) -> GroupPoolPlan:
    """:func:`check_group_pool_inputs` plus what the Triton backend cannot do (float64 values): the
    checks of the custom ops, which can be called directly. ValueError."""
    plan = check_group_pool_inputs(logits, values, eps)
    if values.dtype == torch.float64:
        raise ValueError(
            "the triton backend supports float16, bfloat16 and float32 values; values is float64 "
            "(float64 runs on backend='cpu' or 'reference')"
        )
    return plan


def launch_group_pool(
    plan: GroupPoolPlan, logits: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output (B, M, C), labels (B, N), counts (B, M)) for inputs already checked into ``plan``
    (float16/bfloat16/float32 values, any strides): allocation and launch only, no host sync."""
    _utils.check_device("values", values)
    out, labels, counts = empty_outputs(values, plan)
    b, m, n, c = plan.batch, plan.groups, plan.patches, plan.channels
    if b == 0:
        return out, labels, counts
    splits = _utils.channel_splits(b, c, False, values.device)
    c_split = -(-c // splits)
    ws = torch.empty((b * splits, 2 * (n + m)), dtype=torch.int32, device=values.device)
    _group_pool_kernel[(b, splits)](
        logits, *logits.stride(),
        values, *values.stride(),
        out, labels, counts, ws,
        m, n, c, c_split, plan.eps,
        CMP=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        BLOCK_N=max(16, min(next_pow2(n), 512)),
        BLOCK_P=32,  # (32, BLOCK_G) tiles, as compress's counting sort
        BLOCK_G=16 if m <= 16 else 32,
        # a program's channel slice in one tile, up to 512 channels (2 per thread at 8 warps)
        BLOCK_C=max(16, min(next_pow2(c_split), 512)),
        num_warps=8,
    )
    return out, labels, counts


def group_pool_triton(
    logits: torch.Tensor, values: torch.Tensor, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard group pooling with the Triton kernel (same contract as ``group_pool_reference``).

    Args:
        logits: (B, M, N) any float dtype, any strides; CUDA (or CPU under TRITON_INTERPRET=1).
        values: (B, N, C) float16/bfloat16/float32, any strides.
        eps: finite, > 0.

    Returns:
        (output (B, M, C) in values' dtype, labels (B, N) int64, counts (B, M) int64).
    """
    return launch_group_pool(check_triton_inputs(logits, values, eps), logits, values)


# ------------------------------------------------------------------------------------------------
# Custom ops (visionzip::group_pool_triton, group_pool_triton_with_labels) with their autograd, the
# CUDA kernels of visionzip::group_pool where the extension has none, and the registry entry.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("visionzip::group_pool_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _group_pool_triton(logits: torch.Tensor, values: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Triton kernel of group_pool: (B, M, C). CPU tensors only under TRITON_INTERPRET=1."""
    return group_pool_triton(logits, values, eps)[0]


@torch.library.custom_op("visionzip::group_pool_triton_with_labels", mutates_args=(), device_types=("cuda", "cpu"))
def _group_pool_triton_with_labels(
    logits: torch.Tensor, values: torch.Tensor, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel of group_pool_with_labels: (output, labels, counts)."""
    return group_pool_triton(logits, values, eps)


@_group_pool_triton.register_fake
def _group_pool_triton_fake(logits, values, eps=DEFAULT_EPS):
    return empty_outputs(values, check_triton_inputs(logits, values, eps))[0]


@_group_pool_triton_with_labels.register_fake
def _group_pool_triton_with_labels_fake(logits, values, eps=DEFAULT_EPS):
    return empty_outputs(values, check_triton_inputs(logits, values, eps))


# Autograd: the formulas of the C++ ops (visionzip::_group_pool_values_grad / _logits_grad,
# csrc/autograd.cpp). The forward of the output-only op keeps no labels: they are recomputed.
def _pool_grads(ctx, grad_out, labels, counts):
    logits, values = ctx.saved_tensors[:2]
    grad_logits = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_logits = torch.ops.visionzip._group_pool_logits_grad(grad_out, logits, values, labels, counts, ctx.eps)
    if ctx.needs_input_grad[1]:
        grad_values = torch.ops.visionzip._group_pool_values_grad(grad_out, labels, counts, ctx.eps)
    return grad_logits, grad_values, None


def _setup(ctx, inputs, output):
    logits, values, eps = inputs
    ctx.save_for_backward(logits, values)
    ctx.eps = eps


def _backward(ctx, grad_out):
    logits, values = ctx.saved_tensors
    _, labels, counts = torch.ops.visionzip.group_pool_triton_with_labels(logits.detach(), values.detach(), ctx.eps)
    return _pool_grads(ctx, grad_out, labels, counts)


def _labels_setup(ctx, inputs, output):
    logits, values, eps = inputs
    ctx.save_for_backward(logits, values, output[1], output[2])
    ctx.eps = eps


def _labels_backward(ctx, grad_out, *_index_grads):
    return _pool_grads(ctx, grad_out, *ctx.saved_tensors[2:])


_group_pool_triton.register_autograd(_backward, setup_context=_setup)
_group_pool_triton_with_labels.register_autograd(_labels_backward, setup_context=_labels_setup)

if not _extension.has_kernel("visionzip::group_pool", "CUDA"):
    # The extension was built without CUDA kernels: visionzip::group_pool on CUDA tensors runs these
    # (which, like the CUDA kernels, reject float64 values with a clear error).
    @torch.library.impl("visionzip::group_pool", "CUDA")
    def _group_pool_cuda(logits, values, *, eps=DEFAULT_EPS):
        return group_pool_triton(logits, values, eps)[0]

    @torch.library.impl("visionzip::group_pool_with_labels", "CUDA")
    def _group_pool_with_labels_cuda(logits, values, *, eps=DEFAULT_EPS):
        return group_pool_triton(logits, values, eps)


def _triton_group_pool(
    plan: GroupPoolPlan, logits: torch.Tensor, values: torch.Tensor, with_labels: bool
) -> Union[torch.Tensor, GroupPoolResult]:
    """The "triton" backend: the launcher itself in plain eager inference, the custom op otherwise."""
    if _utils.direct_call_ok(logits, values):
        result = GroupPoolResult(*launch_group_pool(plan, logits, values))
        return result if with_labels else result.output
    if with_labels:
        return GroupPoolResult(*torch.ops.visionzip.group_pool_triton_with_labels(logits, values, plan.eps))
    return torch.ops.visionzip.group_pool_triton(logits, values, plan.eps)


_backends.register("group_pool", "triton", _triton_group_pool)
