"""The segmented reduction of the Triton kernels, shared by compress's contextual means
(``compress.py``) and group_pool's group sums (``group_pool.py``): docs/spec.md "Group pool".

Two ``@triton.jit`` helpers, inlined into the kernels that call them:

* :func:`member_lists`: a stable counting sort of positions by label (counts, exclusive offsets,
  placement in ascending position order) in a program's workspace, so that
* :func:`segment_sum` reads exactly a group's member rows (no atomics, NaN-safe) and adds them in a
  fixed order that depends on neither the tile layout nor the channel split.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def member_lists(
    lab_ws, tok_ws, cnt_ws, off_ws, mem_ws,
    R, G, STEP, EXCLUDED,
    TOKENS: tl.constexpr,  # mem_ws holds tok_ws[p] (True) or the position p itself (False)
    BLOCK_P: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Group the positions p < R by label lab_ws[p] in [0, G): cnt_ws[g] members, the first at
    off_ws[g] in mem_ws, in ascending p. Positions p = i * STEP with i < EXCLUDED are not members
    (compress's targets; EXCLUDED = 0: every position is). Ends with a barrier."""
    offs_p = tl.arange(0, BLOCK_P)
    offs_g = tl.arange(0, BLOCK_G)
    # members per group and group offsets (exclusive prefix over groups)
    carry_off = tl.zeros([], dtype=tl.int32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + offs_g
        gm = g < G
        cnt = tl.zeros([BLOCK_G], dtype=tl.int32)
        for p0 in range(0, R, BLOCK_P):
            p = p0 + offs_p
            member = (p < R) & ((p % STEP != 0) | (p // STEP >= EXCLUDED))
            lab = tl.load(lab_ws + p, mask=member, other=-1)
            hit = (lab[:, None] == g[None, :]) & member[:, None]
            cnt += tl.sum(hit.to(tl.int32), axis=0)
        tl.store(cnt_ws + g, cnt, mask=gm)
        tl.store(off_ws + g, carry_off + tl.cumsum(cnt, axis=0) - cnt, mask=gm)
        carry_off += tl.sum(cnt, axis=0)
    tl.debug_barrier()

    # stable placement of the members into their groups
    for g0 in range(0, G, BLOCK_G):
        g = g0 + offs_g
        gm = g < G
        off = tl.load(off_ws + g, mask=gm, other=0)
        seen = tl.zeros([BLOCK_G], dtype=tl.int32)
        for p0 in range(0, R, BLOCK_P):
            p = p0 + offs_p
            member = (p < R) & ((p % STEP != 0) | (p // STEP >= EXCLUDED))
            lab = tl.load(lab_ws + p, mask=member, other=-1)
            if TOKENS:
                tok = tl.load(tok_ws + p, mask=member, other=0)
            else:
                tok = p
            hit = ((lab[:, None] == g[None, :]) & member[:, None]).to(tl.int32)
            slot = off[None, :] + seen[None, :] + tl.cumsum(hit, axis=0) - 1
            slot_p = tl.sum(tl.where(hit != 0, slot, 0), axis=1)
            tl.store(mem_ws + slot_p, tok, mask=tl.sum(hit, axis=1) > 0)
            seen += tl.sum(hit, axis=0)
    tl.debug_barrier()


@triton.jit
def segment_sum(src, s_n, s_c, members, n_mem, c, cm, BLOCK_C: tl.constexpr):
    """float32 (BLOCK_C,) sum over the n_mem rows listed at members[0:n_mem] of src[row * s_n + c * s_c]
    (channels c, mask cm).

    Members in steps of 16 rows: a (BLOCK_C, 16) tile (channels contiguous: 16-byte loads, 16 rows
    in flight), accumulated elementwise (slot r sums members r, r + 16, ... in order), then a fixed
    pairwise tree over the 16 slots through reshape/split. Every addition is elementwise, so the
    order, and the bits, cannot depend on the tile layout, which changes with BLOCK_C and so with the
    channel split (tl.sum's order would).
    """
    offs_m = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_C, 16], dtype=tl.float32)
    for q0 in range(0, n_mem, 16):
        q = q0 + offs_m
        qm = q < n_mem
        rows = tl.load(members + q, mask=qm, other=0).to(tl.int64)
        acc += tl.load(src + rows[None, :] * s_n + c[:, None] * s_c,
                       mask=cm[:, None] & qm[None, :], other=0.0).to(tl.float32)
    s0, s1 = tl.split(tl.reshape(acc, [BLOCK_C, 8, 2]))
    s0, s1 = tl.split(tl.reshape(s0 + s1, [BLOCK_C, 4, 2]))
    s0, s1 = tl.split(tl.reshape(s0 + s1, [BLOCK_C, 2, 2]))
    s0, s1 = tl.split(s0 + s1)
    return s0 + s1
