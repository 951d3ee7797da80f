"""Triton backend of ``compress`` (docs/spec.md "Compress"): kernels, launcher, custom ops.

Design
------
One launch, grid ``(B, S)``: program (b, s) runs the whole pass for image b, in phases separated by
``tl.debug_barrier()`` (a CTA barrier: later phases read what other threads of the same program wrote
to its small global workspace), and writes output channels [s * C/S, (s + 1) * C/S). One program per
image (S = 1) would leave most of a GPU idle for small batches (B = 32 frames fill 32 of 132 SMs) and
could not reach the memory bandwidth; splitting the image by channels keeps one launch and no
grid-wide step: every program of an image repeats the cheap phases 1-3 and 5-8 (the attention rows
and the Ck = 64 metric, mostly L2 hits when the programs of an image run together) and the row phases
4 and 9, where the bytes are, are divided. ``_utils.channel_splits`` picks S for about two programs per SM and
at least 256 channels per program, at most 2 when the hidden states are the metric (every program
then reads them all for the assignment); S = 1 in the interpreter. The programs of an image write
identical index values, and per-channel sums keep their order, so results are bit-identical for
every S (tested).

1. scores: sum over heads of the attention rows (B, H, N) in float32, heads in order h = 0..H-1
   exactly as the C++ kernel does, turned into order-preserving int32 keys (-0.0 == +0.0, NaN below
   every number, CLS forced to the maximum);
2. top-D without sorting: a 32-step bisection finds the D-th largest key T; tokens above T are kept,
   and the first ``D - #(key > T)`` tokens equal to T in index order (a running prefix count), which
   is exactly the "ties toward the lower index" rule. Prefix sums give each kept token its output
   row (ascending index) and each other token its position in the remaining list;
3. ordered gather of the dominant rows into the output;
4. inverse L2 norms of the Cx targets' metric rows (keys, or hidden);
5. assignment: similarities of the remaining tokens against the targets with ``tl.dot`` on float32
   inputs (``input_precision="ieee"``), scaled by the targets' inverse norms (the members' own norms do
   not change the argmax), argmax with ties toward the lower target and NaN lowest;
6. a stable counting sort of the members by target (counts, offsets, placement) so that
7. each target's mean reads exactly its members' rows (R x C reads in all, no atomics, NaN-safe), 16
   rows a step as a (channels, 16) tile with 16-byte loads, summed elementwise into 16 slots and then
   by a fixed pairwise tree: the order never depends on the tile layout, so results are run-to-run
   and split-to-split bit-identical. Steps 6 and 7 are the segmented reduction group_pool shares
   (``_segmented.py``).

The received-attention form (no CLS, attn (B, H, N, N)) reads B*H*N*N elements: one program per image
could not use the GPU's bandwidth, so a second kernel (``_received_attention_kernel``, grid
(B, ceil(N / BLOCK_J))) first reduces it to (B, N) float32 scores, which the main kernel then takes as
the (B, 1, N) form. Its sum has a fixed order (per lane sequential over heads and query blocks, then a
tree over the query lanes): deterministic, but not the C++ kernel's sequential order.

Memory traffic per image (s = element size of each tensor): every hidden row is read once (the D
dominant rows by the gather, the R = N - D others by the means: N*C*s), the attention's needed part
once (H*N*s for the CLS row or per-head rows, N*s for scores; H*N*N*s plus a 4*N float32 round trip
for received attention), the metric rows of the remaining tokens once (R*Ck*s, the Cx target rows
again for each block of BLOCK_P members, from L1/L2), and it writes k*C*s output plus (D + Cx + N)*8
bytes of indices. The int32 workspace (6*N*4 bytes, L2-resident) is written once and re-read by the
phases, the keys up to 33 times by the bisection (once when N <= BLOCK_N, from registers).
For CLIP-L (N = 577, C = 1024, H = 16, Ck = 64, k = 192, fp16): about 1.18 MB hidden + 18 KB attention
+ 53 KB keys read, 393 KB + 6 KB written.
With S programs per image the attention rows and the metric are read S times, mostly from L2.
Limits: N < 2**31 (int32 token indices in the workspace; offsets are int64); C, Ck and Cx are tiled,
so the register footprint is fixed by the BLOCK_* constants, not by N, C or Cx (ptxas, sm_90a, from
tools/check_triton_build.py: 64-80 registers with BLOCK_N = 1024, 240-255 with BLOCK_N = 4096, no
spills on sm_90a, 32 B in one sm_80 variant; 12-32 KB of shared memory). The R*Cx*Ck similarity FMAs
of an image run in each of its programs (fine with Ck = 64 keys, slow-ish with the hidden states as
metric, Ck = C = 1024, and B = 1).
float64 hidden states are not supported (ValueError); attn and keys of any float dtype (float64
included) are converted to float32 on load, as the C++ kernel does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
from torch.types import Number
import triton.language as tl

from .. import _backends, _extension
from ..ops.compress import CompressPlan, CompressResult, check_compress_inputs, empty_outputs
from . import _utils
from ._segmented import member_lists, segment_sum
from ._utils import next_pow2

#: Largest token chunk of the selection phases (a power of 2). Tests lower it to cover the chunked path.
MAX_BLOCK_N = 4096


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order; -0.0 and +0.0 map to 0, every NaN to INT32_MIN."""
    x = tl.where(x == 0.0, 0.0, x)
    i = x.to(tl.int32, bitcast=True)
    key = i ^ ((i >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return tl.where(x != x, -2147483648, key)


@triton.jit
def _received_attention_kernel(
    att_ptr, s_ab, s_ah, s_aq, s_an,
    score_ptr,
    N, H,
    BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """score[b, j] = sum over heads and queries of attn[b, h, q, j] (float32), grid (B, cdiv(N, BLOCK_J))."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jm = j < N
    offs_q = tl.arange(0, BLOCK_Q)
    acc = tl.zeros([BLOCK_Q, BLOCK_J], dtype=tl.float32)
    base = att_ptr + b * s_ab
    for h in range(H):
        head = base + (tl.zeros([], dtype=tl.int64) + h) * s_ah
        for q0 in range(0, N, BLOCK_Q):
            q = q0 + offs_q
            m = (q < N)[:, None] & jm[None, :]
            ptr = head + q.to(tl.int64)[:, None] * s_aq + j[None, :] * s_an
            acc += tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(score_ptr + b * N + j, tl.sum(acc, axis=0), mask=jm)


@triton.jit
def _compress_kernel(
    hid_ptr, s_hb, s_hn, s_hc,  # hidden (B, N, C)
    att_ptr, s_ab, s_ah, s_an,  # attention rows (B, H, N)
    met_ptr, s_mb, s_mn, s_mc,  # metric (B, N, CM): keys or hidden
    out_ptr, dom_ptr, tgt_ptr, map_ptr,  # contiguous outputs (B, D+CX, C), (B, D), (B, CX), (B, N)
    ws_ptr, inv_ptr,  # workspaces: int32 (B * S, 6, N), float32 (B * S, max(CX, 1))
    N, C, CM, H, D, CX, STEP,
    C_SPLIT,  # channels per program: program (b, s) writes output channels [s * C_SPLIT, (s + 1) * C_SPLIT)
    HAS_CLS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,  # N <= BLOCK_N: the keys stay in registers during the bisection
    BLOCK_N: tl.constexpr,  # tokens per chunk (scores, selection)
    BLOCK_R: tl.constexpr,  # hidden rows per tile of the dominant gather (the means take 16 a step)
    BLOCK_C: tl.constexpr,  # channels per tile (dominant gather, means)
    BLOCK_P: tl.constexpr,  # remaining tokens per tile (assignment, counting sort)
    BLOCK_T: tl.constexpr,  # targets per tile
    BLOCK_K: tl.constexpr,  # metric channels per dot
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_lo = split * C_SPLIT
    c_hi = tl.minimum(c_lo + C_SPLIT, C)
    K = D + CX
    R = N - D
    # Every program of an image runs phases 1-3 and 5-8 itself (cheap: the attention rows and the
    # metric, mostly from L2 when the programs of an image run together) in a workspace of its own,
    # and writes the same index values; only the row phases 4 and 9 are split, by channels.
    ws = ws_ptr + (b * n_split + split) * (6 * N)
    keys_ws = ws
    rest_ws = ws + N  # token index of each remaining position
    lab_ws = ws + 2 * N  # target label of each remaining position
    mem_ws = ws + 3 * N  # members grouped by target (ascending token order inside a group)
    cnt_ws = ws + 4 * N  # members per target
    off_ws = ws + 5 * N  # first slot of each target's group in mem_ws
    inv_ws = inv_ptr + (b * n_split + split) * tl.maximum(CX, 1)
    out_b = out_ptr + b * K * C
    hid_b = hid_ptr + b * s_hb
    met_b = met_ptr + b * s_mb
    map_b = map_ptr + b * N
    dom_b = dom_ptr + b * D
    tgt_b = tgt_ptr + b * CX
    offs_n = tl.arange(0, BLOCK_N)

    # ---- 1. scores -> order keys (heads summed in order, like the C++ kernel) ----------------------
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        jm = j < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        arow = att_ptr + b * s_ab + j.to(tl.int64) * s_an
        for h in range(H):
            acc += tl.load(arow + (tl.zeros([], dtype=tl.int64) + h) * s_ah, mask=jm, other=0.0).to(tl.float32)
        key = _order_key(acc)
        if HAS_CLS:
            key = tl.where(j == 0, 2147483647, key)  # CLS always kept (and it wins ties by index)
        tl.store(keys_ws + j, key, mask=jm)
    tl.debug_barrier()

    # ---- 2. threshold T = D-th largest key: largest T with #(key >= T) >= D ---------------------
    # Keys are shifted to [0, 2**32) as int64; padding lanes get -1 and never count.
    lo = tl.full([], 0, dtype=tl.int64)  # invariant: #(u >= lo) >= D
    hi = tl.full([], 4294967296, dtype=tl.int64)  # invariant: #(u >= hi) < D (when D >= 1)
    if ONE_CHUNK:
        u1 = tl.load(keys_ws + offs_n, mask=offs_n < N, other=0).to(tl.int64) + 2147483648
        u1 = tl.where(offs_n < N, u1, -1)
        for _ in range(32):
            mid = (lo + hi) // 2
            ok = tl.sum((u1 >= mid).to(tl.int32), axis=0) >= D
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        greater = tl.sum((u1 > lo).to(tl.int32), axis=0)
    else:
        for _ in range(32):
            mid = (lo + hi) // 2
            cnt = tl.zeros([], dtype=tl.int32)
            for j0 in range(0, N, BLOCK_N):
                j = j0 + offs_n
                u = tl.load(keys_ws + j, mask=j < N, other=0).to(tl.int64) + 2147483648
                u = tl.where(j < N, u, -1)
                cnt += tl.sum((u >= mid).to(tl.int32), axis=0)
            ok = cnt >= D
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        greater = tl.zeros([], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_N):
            j = j0 + offs_n
            u = tl.load(keys_ws + j, mask=j < N, other=0).to(tl.int64) + 2147483648
            u = tl.where(j < N, u, -1)
            greater += tl.sum((u > lo).to(tl.int32), axis=0)
    thr = lo
    need_eq = D - greater  # tokens equal to T that are kept: the first ones by index

    # ---- 3. kept mask, output rows, remaining list, targets ------------------------------------
    carry_eq = tl.zeros([], dtype=tl.int32)
    carry_sel = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + offs_n
        jm = j < N
        u = tl.load(keys_ws + j, mask=jm, other=0).to(tl.int64) + 2147483648
        u = tl.where(jm, u, -1)
        eq = u == thr
        eq_rank = carry_eq + tl.cumsum(eq.to(tl.int32), axis=0)  # inclusive rank among ties
        sel = (u > thr) | (eq & (eq_rank <= need_eq))
        sel_incl = carry_sel + tl.cumsum(sel.to(tl.int32), axis=0)
        dpos = sel_incl - 1  # output row of a kept token
        rpos = j - sel_incl  # position of a remaining token in the remaining list
        rest = jm & (sel == 0)
        tl.store(dom_b + dpos, j.to(tl.int64), mask=sel)
        tl.store(map_b + j, dpos.to(tl.int64), mask=sel)
        # -1 only when nothing overwrites it: programs of one image must never write different values
        tl.store(map_b + j, tl.full([BLOCK_N], -1, dtype=tl.int64), mask=rest & (CX == 0))
        tl.store(rest_ws + rpos, j, mask=rest)
        is_tgt = rest & (rpos % STEP == 0) & (rpos // STEP < CX)
        tl.store(tgt_b + rpos // STEP, j.to(tl.int64), mask=is_tgt)
        carry_eq += tl.sum(eq.to(tl.int32), axis=0)
        carry_sel += tl.sum(sel.to(tl.int32), axis=0)
    tl.debug_barrier()

    # ---- 4. dominant block: rows of the kept tokens in ascending index --------------------------
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    for r0 in range(0, D, BLOCK_R):
        r = r0 + offs_r
        rm = r < D
        tok = tl.load(dom_b + r, mask=rm, other=0)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + offs_c
            m2 = rm[:, None] & (c < c_hi)[None, :]
            x = tl.load(hid_b + tok[:, None] * s_hn + c[None, :] * s_hc, mask=m2)
            tl.store(out_b + r[:, None] * C + c[None, :], x, mask=m2)

    # ---- 5. inverse norms of the targets' metric rows ------------------------------------------
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    for t0 in range(0, CX, BLOCK_T):
        t = t0 + offs_t
        tm = t < CX
        trow = tl.load(tgt_b + t, mask=tm, other=0)
        ss = tl.zeros([BLOCK_T], dtype=tl.float32)
        for m0 in range(0, CM, BLOCK_K):
            mk = m0 + offs_k
            x = tl.load(met_b + trow[:, None] * s_mn + mk[None, :] * s_mc,
                        mask=tm[:, None] & (mk < CM)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        inv = tl.div_rn(tl.full([BLOCK_T], 1.0, dtype=tl.float32), tl.maximum(tl.sqrt_rn(ss), 1e-12))
        tl.store(inv_ws + t, inv, mask=tm)
    tl.debug_barrier()

    # ---- 6. assignment: argmax_t <x_p, t_hat> (ties -> lower t, NaN lowest) ---------------------
    for p0 in range(0, R, BLOCK_P):
        p = p0 + offs_p
        pm = p < R
        tok = tl.load(rest_ws + p, mask=pm, other=0).to(tl.int64)
        best_key = tl.full([BLOCK_P], -2147483648, dtype=tl.int32)
        best_t = tl.zeros([BLOCK_P], dtype=tl.int32)
        for t0 in range(0, CX, BLOCK_T):
            t = t0 + offs_t
            tm = t < CX
            trow = tl.load(tgt_b + t, mask=tm, other=0)
            sims = tl.zeros([BLOCK_P, BLOCK_T], dtype=tl.float32)
            for m0 in range(0, CM, BLOCK_K):
                mk = m0 + offs_k
                km = mk < CM
                x = tl.load(met_b + tok[:, None] * s_mn + mk[None, :] * s_mc,
                            mask=pm[:, None] & km[None, :], other=0.0).to(tl.float32)
                y = tl.load(met_b + trow[None, :] * s_mn + mk[:, None] * s_mc,
                            mask=km[:, None] & tm[None, :], other=0.0).to(tl.float32)
                sims = tl.dot(x, y, sims, input_precision="ieee")
            inv = tl.load(inv_ws + t, mask=tm, other=0.0)
            key = _order_key(sims * inv[None, :])
            key = tl.where(tm[None, :], key, -2147483648)  # padding never beats a real target
            mx = tl.max(key, axis=1)
            arg = tl.min(tl.where(key == mx[:, None], t[None, :], 2147483647), axis=1)
            upd = mx > best_key  # strict: an earlier (lower) target keeps a tie
            best_t = tl.where(upd, arg, best_t)
            best_key = tl.where(upd, mx, best_key)
        is_tgt = (p % STEP == 0) & (p // STEP < CX)
        label = tl.where(is_tgt, p // STEP, best_t)  # targets label themselves
        tl.store(lab_ws + p, label, mask=pm)
        tl.store(map_b + tok, (D + label).to(tl.int64), mask=pm & (CX > 0))
    tl.debug_barrier()

    # ---- 7-8. members grouped by target: counts, offsets, stable placement (_segmented.py) ------
    member_lists(lab_ws, rest_ws, cnt_ws, off_ws, mem_ws, R, CX, STEP, CX,
                 TOKENS=True, BLOCK_P=BLOCK_P, BLOCK_G=BLOCK_T)

    # ---- 9. contextual rows: hidden[target] + sum(members) / max(count, 1) ----------------------
    for t in range(0, CX):
        n_mem = tl.load(cnt_ws + t)
        first = tl.load(off_ws + t)
        trow = tl.load(tgt_b + t)
        denom = tl.maximum(n_mem, 1).to(tl.float32)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + offs_c
            cm = c < c_hi
            total = segment_sum(hid_b, s_hn, s_hc, mem_ws + first, n_mem, c, cm, BLOCK_C)
            th = tl.load(hid_b + trow * s_hn + c * s_hc, mask=cm, other=0.0).to(tl.float32)
            res = th + tl.div_rn(total, tl.zeros([BLOCK_C], dtype=tl.float32) + denom)
            tl.store(out_b + (D + t) * C + c, res.to(out_ptr.dtype.element_ty), mask=cm)


def check_triton_inputs(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> CompressPlan:
    """:func:`check_compress_inputs` plus what the Triton backend cannot do (float64 hidden): the checks
    of the custom ops, which can be called directly. ValueError."""
    plan = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls)
    if hidden.dtype == torch.float64:
        raise ValueError(
            "the triton backend supports float16, bfloat16 and float32 hidden states; hidden is float64 "
            "(float64 runs on backend='cpu' or 'reference')"
        )
    return plan


def compress_triton(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: int,
    keys: Optional[torch.Tensor] = None,
    contextual: Optional[int] = None,
    has_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip compression with the Triton kernels (same contract as ``compress_reference``).

    Args:
        hidden: (B, N, C) float16/bfloat16/float32, CUDA (or CPU under TRITON_INTERPRET=1).
        attn: (B, H, N, N), (B, H, N) or (B, N); any float dtype (read as float32), any strides.
        k: output tokens per image, D dominant + Cx contextual.
        keys: (B, N, Ck) similarity metric, or None for ``hidden``.
        contextual: Cx (``k * 5 // 32`` when None).
        has_cls: token 0 is a CLS token (scored by its row, always kept).

    Returns:
        (output (B, k, C) in hidden's dtype, dominant_indices (B, D) int64, contextual_indices
        (B, Cx) int64, token_map (B, N) int64). No host synchronisation, static shapes.
    """
    plan = check_triton_inputs(hidden, attn, k, keys, contextual, has_cls)
    return launch_compress(plan, hidden, attn, keys, has_cls)


def launch_compress(
    plan: CompressPlan, hidden: torch.Tensor, attn: torch.Tensor, keys: Optional[torch.Tensor], has_cls: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compress_triton` for inputs already checked into ``plan`` (float16/bfloat16/float32
    hidden): allocation and launch only."""
    _utils.check_device("hidden", hidden)
    b, n, c = plan.batch, plan.tokens, plan.channels
    d, cx = plan.dominant, plan.contextual
    dev = hidden.device
    out = torch.empty((b, d + cx, c), dtype=hidden.dtype, device=dev)
    dom = torch.empty((b, d), dtype=torch.long, device=dev)
    tgt = torch.empty((b, cx), dtype=torch.long, device=dev)
    tmap = torch.empty((b, n), dtype=torch.long, device=dev)
    if b == 0:
        return out, dom, tgt, tmap
    interp = _utils.interpreting()

    # Attention as rows (B, H, N): the CLS row of each head, per-head rows, or scores.
    if attn.dim() == 4 and not has_cls:
        scores = torch.empty((b, n), dtype=torch.float32, device=dev)
        block_j = max(16, min(next_pow2(n), 64 if interp else 32))
        block_q = max(16, min(next_pow2(n), 64))
        _received_attention_kernel[(b, triton.cdiv(n, block_j))](
            attn, *attn.stride(), scores, n, attn.shape[1],
            BLOCK_Q=block_q, BLOCK_J=block_j, num_warps=4,
        )
        rows = scores.unsqueeze(1)
    elif attn.dim() == 4:
        rows = attn[:, :, 0, :]
    elif attn.dim() == 3:
        rows = attn
    else:
        rows = attn.unsqueeze(1)
    metric = keys if keys is not None else hidden
    cm = metric.shape[2]

    splits = _utils.channel_splits(b, c, keys is None, dev)
    c_split = -(-c // splits)
    ws = torch.empty((b * splits, 6, n), dtype=torch.int32, device=dev)
    inv = torch.empty((b * splits, max(cx, 1)), dtype=torch.float32, device=dev)
    # Zero-size outputs get a one-element stand-in pointer (never written: every store is masked off).
    dom_arg = dom if d > 0 else torch.empty(1, dtype=torch.long, device=dev)
    tgt_arg = tgt if cx > 0 else torch.empty(1, dtype=torch.long, device=dev)

    block_n = max(16, min(next_pow2(n), MAX_BLOCK_N))  # blocks of at least 16 lanes (tl.dot, layouts)
    _compress_kernel[(b, splits)](
        hidden, *hidden.stride(),
        rows, rows.stride(0), rows.stride(1), rows.stride(2),
        metric, *metric.stride(),
        out, dom_arg, tgt_arg, tmap,
        ws, inv,
        n, c, cm, rows.shape[1], d, cx, plan.step, c_split,
        HAS_CLS=bool(has_cls),
        ONE_CHUNK=n <= block_n,
        BLOCK_N=block_n,
        BLOCK_R=8,
        # a program's channel slice in one tile, up to 512 channels (2 per thread at 8 warps)
        BLOCK_C=max(16, min(next_pow2(c_split), 512)),
        BLOCK_P=32,
        BLOCK_T=16 if cx <= 16 else 32,
        BLOCK_K=max(16, min(next_pow2(cm), 64)),
        num_warps=8,
    )
    return out, dom, tgt, tmap


# ------------------------------------------------------------------------------------------------
# Custom ops (visionzip::compress_triton, compress_triton_with_indices) with their autograd, the
# CUDA kernel of visionzip::compress where the extension has none, and the registry entry. The
# argument types are those of the C++ schemas (k, contextual: Scalar; has_cls: bool?), so that
# check_triton_inputs sees a bool k or a None has_cls as passed and rejects it (docs/spec.md
# "Arguments").
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("visionzip::compress_triton", mutates_args=(), device_types=("cuda", "cpu"))
def _compress_triton(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: Number,
    keys: Optional[torch.Tensor] = None,  # not keyword-only: custom_op forbids kwarg-only tensors
    contextual: Optional[Number] = None,
    has_cls: Optional[bool] = True,
) -> torch.Tensor:
    """Triton kernel of compress: (B, k, C). CPU tensors only under TRITON_INTERPRET=1."""
    return compress_triton(hidden, attn, k, keys, contextual, has_cls)[0]


@torch.library.custom_op("visionzip::compress_triton_with_indices", mutates_args=(), device_types=("cuda", "cpu"))
def _compress_triton_with_indices(
    hidden: torch.Tensor,
    attn: torch.Tensor,
    k: Number,
    keys: Optional[torch.Tensor] = None,  # not keyword-only: custom_op forbids kwarg-only tensors
    contextual: Optional[Number] = None,
    has_cls: Optional[bool] = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel of compress_with_indices: (output, dominant_indices, contextual_indices, token_map)."""
    return compress_triton(hidden, attn, k, keys, contextual, has_cls)


@_compress_triton.register_fake
def _compress_triton_fake(hidden, attn, k, keys=None, contextual=None, has_cls=True):
    return empty_outputs(hidden, check_triton_inputs(hidden, attn, k, keys, contextual, has_cls))[0]


@_compress_triton_with_indices.register_fake
def _compress_triton_with_indices_fake(hidden, attn, k, keys=None, contextual=None, has_cls=True):
    return empty_outputs(hidden, check_triton_inputs(hidden, attn, k, keys, contextual, has_cls))


# Autograd: the formula of the C++ ops (visionzip::_compress_hidden_grad, csrc/autograd.cpp).
def _setup(ctx, inputs, output):
    hidden, attn, k, keys, contextual, has_cls = inputs
    ctx.save_for_backward(hidden, attn, keys)
    ctx.args = (k, contextual, has_cls)


def _backward(ctx, grad_out):
    hidden, attn, keys = ctx.saved_tensors
    # The forward kept no indices: recompute them (a second pass, only when training through the op).
    _, dom, ctx_idx, token_map = torch.ops.visionzip.compress_triton_with_indices(
        hidden.detach(), attn.detach(), ctx.args[0], None if keys is None else keys.detach(), *ctx.args[1:]
    )
    grad = torch.ops.visionzip._compress_hidden_grad(grad_out, token_map, ctx_idx, dom.shape[1])
    return grad, None, None, None, None, None


def _indices_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.dominant = output[1].shape[1]


def _indices_backward(ctx, grad_out, *_index_grads):
    ctx_idx, token_map = ctx.saved_tensors
    grad = torch.ops.visionzip._compress_hidden_grad(grad_out, token_map, ctx_idx, ctx.dominant)
    return grad, None, None, None, None, None


_compress_triton.register_autograd(_backward, setup_context=_setup)
_compress_triton_with_indices.register_autograd(_indices_backward, setup_context=_indices_setup)

if not _extension.HAS_CUDA_KERNELS:
    # The extension was built without CUDA kernels: visionzip::compress on CUDA tensors runs these
    # (which, like the CUDA kernels, reject float64 with a clear error).
    @torch.library.impl("visionzip::compress", "CUDA")
    def _compress_cuda(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
        return compress_triton(hidden, attn, k, keys, contextual, has_cls)[0]

    @torch.library.impl("visionzip::compress_with_indices", "CUDA")
    def _compress_with_indices_cuda(hidden, attn, k, *, keys=None, contextual=None, has_cls=True):
        return compress_triton(hidden, attn, k, keys, contextual, has_cls)


def _triton_compress(
    plan: CompressPlan, hidden: torch.Tensor, attn: torch.Tensor, keys: Optional[torch.Tensor], with_indices: bool
) -> Union[torch.Tensor, CompressResult]:
    """The "triton" backend: the launcher itself in plain eager inference, the custom op otherwise."""
    if _utils.direct_call_ok(hidden, attn, keys):
        result = CompressResult(*launch_compress(plan, hidden, attn, keys, plan.has_cls))
        return result if with_indices else result.output
    args = (hidden, attn, plan.k, keys, plan.contextual, plan.has_cls)
    if with_indices:
        return CompressResult(*torch.ops.visionzip.compress_triton_with_indices(*args))
    return torch.ops.visionzip.compress_triton(*args)


_backends.register("compress", "triton", _triton_compress)
