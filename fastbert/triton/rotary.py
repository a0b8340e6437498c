"""Triton kernel of rotary: the rotary position embedding of q and k, and its backward.

With x = (x1, x2) the two halves of a head (transformers' rotate_half convention) and c = (c1, c2),
s = (s1, s2) the halves of the cos/sin table row of the token's position:

    forward:   y1 = x1 c1 - x2 s1            y2 = x2 c2 + x1 s2
    backward:  dx1 = dy1 c1 + dy2 s2         dx2 = dy2 c2 - dy1 s1     (the transposed rotation)

so one kernel serves both (BACKWARD swaps and negates the sine halves), in fp32, rounded once.
Kernel first, then the launchers, which take their outputs preallocated (fastbert/ops/rotary.py
allocates them, NaN-poisoned under test).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.triton._gelu import on_device as _on_device


@triton.jit
def _rotary_kernel(
    X,  # [B, S, H, D] input (forward) or output gradient (backward), unit stride along D
    COS, SIN,  # cos/sin tables, unit stride along D, sharing strides (fp32 or X's dtype)
    POS,  # [B, S] int64 positions, contiguous (read only when HAS_POS)
    CU,  # [n_seqs + 1] int32 sequence starts (read only when PACKED; then B == 1, S == total)
    OUT,  # [B, S, H, D] result, contiguous
    T, S, H,  # sizes: T = B * S tokens
    stride_xb, stride_xs, stride_xh,  # X strides
    stride_cb, stride_cs,  # table strides per batch (0: shared) and per position row
    n_seqs,  # sequences in CU (PACKED)
    HALF: tl.constexpr,  # D // 2
    HAS_POS: tl.constexpr,  # table row = POS[b, s]
    PACKED: tl.constexpr,  # table row = t - CU[seq(t)]
    BACKWARD: tl.constexpr,  # apply the transposed rotation
    SEARCH: tl.constexpr,  # binary-search steps over CU (PACKED): >= ceil(log2(n_seqs)), a multiple of 4
    BLOCK_T: tl.constexpr, BLOCK_H2: tl.constexpr,  # tile: BLOCK_T tokens x BLOCK_H2 (>= HALF) pairs of one head
):
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    t64 = offs_t.to(tl.int64)
    b = t64 // S
    s = t64 % S
    if PACKED:
        # largest i < n_seqs with CU[i] <= t (empty sequences repeat a start: take the last of them)
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi = tl.zeros([BLOCK_T], dtype=tl.int32) + n_seqs
        # unrolled (a run-time trip count spilled 8 B on sm_90a); steps past convergence keep lo
        for _ in tl.static_range(SEARCH):
            mid = (lo + hi) // 2
            start = tl.load(CU + mid, mask=mask_t, other=0)
            below = start <= offs_t
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        row = t64 - tl.load(CU + lo, mask=mask_t, other=0).to(tl.int64)
        c_base = row * stride_cs
    elif HAS_POS:
        row = tl.load(POS + t64, mask=mask_t, other=0)
        c_base = row * stride_cs
    else:
        c_base = b * stride_cb + s * stride_cs
    offs_d = tl.arange(0, BLOCK_H2)
    mask = mask_t[:, None] & (offs_d < HALF)[None, :]
    c_ptr = c_base[:, None] + offs_d[None, :]
    c1 = tl.load(COS + c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + c_ptr, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    x_ptr = X + (b * stride_xb + s * stride_xs + h * stride_xh)[:, None] + offs_d[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    o_ptr = OUT + ((t64 * H + h) * (2 * HALF))[:, None] + offs_d[None, :]
    tl.store(o_ptr, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers (inputs are checked by fastbert/ops/rotary.py; outputs come preallocated)
# ----------------------------------------------------------------------------------------------
def _tile(half: int):
    # ~2K pairs per program: a memory-bound elementwise op, few registers
    block_h2 = triton.next_power_of_2(max(half, 1))
    block_t = max(1, min(64, 2048 // block_h2))
    return block_t, block_h2, 4


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor],
            cu_seqlens: Optional[torch.Tensor], out: torch.Tensor, backward: bool) -> torch.Tensor:
    if cu_seqlens is not None:  # packed [total, H, D]: one "batch" of total tokens
        total, heads, d = x.shape
        bsz, seq = 1, total
        sxb, sxs, sxh = 0, x.stride(0), x.stride(1)
    else:
        bsz, seq, heads, d = x.shape
        sxb, sxs, sxh = x.stride(0), x.stride(1), x.stride(2)
    tokens = bsz * seq
    if tokens == 0 or heads == 0:
        return out
    if cos.dim() == 3:
        scb = 0 if cos.shape[0] == 1 else cos.stride(0)
        scs = cos.stride(1)
    else:
        scb, scs = 0, cos.stride(0)
    n_seqs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
    search = -(-max(n_seqs - 1, 0).bit_length() // 4) * 4  # ceil(log2(n_seqs)) rounded up: few recompiles
    block_t, block_h2, warps = _tile(d // 2)
    grid = (triton.cdiv(tokens, block_t), heads)
    with _on_device(x):
        _rotary_kernel[grid](
            x, cos, sin, position_ids if position_ids is not None else x,
            cu_seqlens if cu_seqlens is not None else x, out,
            tokens, seq, heads, sxb, sxs, sxh, scb, scs, n_seqs,
            HALF=d // 2, HAS_POS=position_ids is not None, PACKED=cu_seqlens is not None, BACKWARD=backward,
            SEARCH=search if cu_seqlens is not None else 0,
            BLOCK_T=block_t, BLOCK_H2=block_h2, num_warps=warps)
    return out


def rotary_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               q_out: torch.Tensor, k_out: torch.Tensor):
    """q_out[:], k_out[:] = the rotated q, k. q, k: [B, S, H, D] (or packed [total, H, D] with cu_seqlens),
    unit stride along D; cos/sin: [R, D] or [1 or B, S, D], contiguous; position_ids: int64 [B, S] or None.
    Outputs contiguous."""
    _rotate(q, cos, sin, position_ids, cu_seqlens, q_out, False)
    _rotate(k, cos, sin, position_ids, cu_seqlens, k_out, False)
    return q_out, k_out


def rotary_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
               dq: torch.Tensor, dk: torch.Tensor):
    """dq[:], dk[:] = the transposed rotation of grad_q, grad_k (the layouts of rotary_fwd)."""
    _rotate(grad_q, cos, sin, position_ids, cu_seqlens, dq, True)
    _rotate(grad_k, cos, sin, position_ids, cu_seqlens, dk, True)
    return dq, dk
