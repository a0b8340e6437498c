"""Fused attention in Triton: FlashAttention-2 forward and backward, for BERT-family encoders.

Kernels first (`_attention_fwd_kernel`, `_attention_bwd_preprocess_kernel`,
`_attention_bwd_dkdv_kernel`, `_attention_bwd_dq_kernel`), then the launchers `attention_fwd` /
`attention_bwd`, whose signatures are the schemas of fastbert::attention_fwd / attention_bwd in
csrc/ops.cpp (the front end, fastbert/ops/attention.py, registers them as fastbert::triton_attention_*).

Math (one (batch, head) pair; rows i are queries, columns j keys; c = scale):
  s_ij = c * q_i . k_j + bias_ij   (-inf where key j is masked: padding, causal j > i + Sk - Sq, j >= Sk,
                                   outside the window |i + Sk - Sq - j| > w)
Queries are the last Sq of Sk positions (bottom-right aligned; Sq = Sk when packed). Causal and the
window bound the key blocks a query tile visits (and the query blocks a key tile visits in dK/dV):
blocks outside the band are skipped, not masked.
  P_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
  Z_ij = keep_ij / (1 - p)   (dropout; Z = 1 when p = 0)
  o_i  = sum_j Z_ij P_ij v_j

Forward (online softmax). Keys are visited in blocks; per query row we carry the running max m, the
running sum l = sum_j exp(s_ij - m) and the unnormalised output acc = sum_j Z_ij exp(s_ij - m) v_j.
When a block raises the max from m to m', both l and acc are rescaled by exp(m - m'). At the end
o = acc / l and lse = m + log l (natural log). The exponentials are exp2((s - m) * log2 e).
A row with no visible key keeps m = -inf, l = 0: it writes o = 0 and lse = +inf. To avoid
exp(-inf - -inf) = NaN, the max used for the exponentials is replaced by 0 while it is -inf.

Backward. With dP~_ij = dO_i . v_j (gradient w.r.t. the dropped probability Z_ij P_ij):
  dV_j  = sum_i Z_ij P_ij dO_i
  dP_ij = Z_ij dP~_ij
  dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)         (softmax Jacobian)
        = P_ij (dP_ij - D_i),   D_i = sum_k P_ik Z_ik dO_i . v_k = dO_i . o_i
  dQ_i  = c * sum_j dS_ij k_j,   dK_j = c * sum_i dS_ij q_i      (d bias_ij = dS_ij: not produced)
D is one row-wise dot product (preprocess kernel). P is recomputed from the saved lse:
P_ij = exp2((s_ij - lse_i) * log2 e); lse_i = +inf makes the row's P (and so dS, dQ) exactly 0.
dK/dV are accumulated per key block over all query blocks, dQ per query block over all key blocks, in
two kernels: no atomics, so gradients are deterministic.

Precision (fp32 is held to "no worse than 2x PyTorch's own error"): the recomputed P is only as
good as its agreement with the lse of the forward pass. Every kernel therefore computes the scores
with the same expression, s = dot(q_tile, kT_tile) * scale (+ bias), in the same orientation (the
dK/dV kernel transposes P and dS rather than computing k q^T), so the forward and backward scores
agree bit for bit where the dot's accumulation order does not depend on the tile shape (fp32 FMA
dots on the GPU; equal tile shapes in the interpreter), and P_bwd = P_fwd up to the rounding of lse.
Measured in the interpreter (fp32, D = 128, scale 0.45): scores from k q^T in the dK/dV kernel
gave up to 3.4x PyTorch's error on dV; the shared expression gives at most 1.2x.

Dropout: the keep decision for score (b, h, i, j) is Philox(seed, offset) with offset
((b * H + h) * Sq + i) * Sk + j (Sq = Sk = max_seqlen when packed, i/j local to the sequence), kept
iff (r >> 1) >= floor(p * 2^31): the stream of fastbert.reference, bit for bit; the backward pass
regenerates it instead of storing a mask.

Padding and what it holds:
  - key padding mask / varlen: masked keys get probability 0, so their dK, dV are exactly 0.
  - a query row at a padding position is not special: it attends to the valid keys of its sequence
    (as Hugging Face's eager attention does), so its output is finite and defined.
  - a row that sees no key at all (a fully padded sequence; never with causal) gets out = 0,
    lse = +inf and zero gradients.
  - an attn_bias value below -1e20 (HF's fp32/bf16 finfo.min additive masks, -inf) masks its key
    exactly like a padding key: probability 0, and a row left with no key gives 0 (HF would give a
    uniform average, an artefact of finfo.min absorbing the scores). Without this such a score
    absorbs q.k and log(l), and the backward pass could not recompute P from lse. Larger biases
    (fp16's -65504, the old -10000) are added as they are.
  - the backward clamps the recomputed exponent s - lse at 0 (P <= 1 exactly), so rounding in a
    saved lse can never produce an overflowing P.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastbert import _runtime
from fastbert._runtime import new_empty
from fastbert.triton import configs

_LOG2E = 1.4426950408889634
# kernels can read module globals only when they are constexpr
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
# an additive bias below this (natural units) masks its key (see the module doc)
BIAS_MASKED = tl.constexpr(-1.0e20)

_INTERPRET = _runtime.triton_interpreter()


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, PACKED: tl.constexpr):
    """(row offset of the sequence in the packed layout, its query length, its key length)."""
    if PACKED:
        # int64 row offset: start * token stride can pass 2^31 on large packed batches
        start = tl.load(CuSeqlens + b).to(tl.int64)
        end = tl.load(CuSeqlens + b + 1).to(tl.int64)
        return start, (end - start).to(tl.int32), (end - start).to(tl.int32)
    else:
        return 0, seqlen_q, seqlen_k


@triton.jit
def _key_range(Mask, b, stride_mb, stride_mn, len_k, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """[lo, hi) covering every unmasked key, lo a multiple of BLOCK_N: key blocks outside it are all
    padding and are skipped (right padding, HF's usual layout, drops whole blocks at the end; left
    padding at the start). One pass over the mask row: O(Sk) loads against O(Sk * D) of work."""
    lo = 0
    hi = len_k
    if HAS_MASK:
        first = len_k
        last = 0
        for start in range(0, len_k, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            m = tl.load(Mask + b * stride_mb + offs * stride_mn, mask=offs < len_k, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(m, offs, len_k), axis=0))
            last = tl.maximum(last, tl.max(tl.where(m, offs + 1, 0), axis=0))
        lo = (first // BLOCK_N) * BLOCK_N
        hi = last
    return lo, hi


@triton.jit
def _load_bias(Bias, offs_m, offs_n, stride_bm, stride_bn, len_q, len_k):
    """Bias tile [BLOCK_M, BLOCK_N] in fp32; -inf where it masks (see module doc)."""
    bmask = (offs_m[:, None] < len_q) & (offs_n[None, :] < len_k)
    bias = tl.load(Bias + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn, mask=bmask, other=0.0)
    bias = bias.to(tl.float32)
    return tl.where(bias < BIAS_MASKED, float("-inf"), bias)


@triton.jit
def _dropout_scale(seed, off_bh, offs_m, offs_n, seqlen_q, seqlen_k, drop_threshold, drop_scale):
    """Z tile: 1/(1-p) where kept, 0 where dropped; offsets as in fastbert.reference (int64)."""
    offs = (off_bh.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    r = tl.randint(seed, offs)
    keep = (r >> 1).to(tl.int32) >= drop_threshold
    return tl.where(keep, drop_scale, 0.0)


@triton.jit
def _in_window(offs_n, pos_m, window, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: key j visible to the query at key position p under the window, and under
    causal too when CAUSAL: p - w <= j <= p + w (causal: p - w <= j <= p), as one unsigned compare of
    j - p + w against 2w (causal: w), so the band costs what the causal select alone costs."""
    rel = (offs_n[None, :] - pos_m[:, None] + window).to(tl.uint32)
    if CAUSAL:
        return rel <= tl.cast(window, tl.uint32)
    else:
        return rel <= tl.cast(2 * window, tl.uint32)


@triton.jit
def _band_keys(lo, hi, start_m, q_shift, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Narrow the key range [lo, hi) to the band of query rows [start_m, start_m + BLOCK_M) (key
    positions start_m + q_shift ...): key blocks outside it are skipped. lo stays a multiple of BLOCK_N
    and hi >= lo."""
    if CAUSAL:
        hi = tl.minimum(hi, start_m + q_shift + BLOCK_M)
    if WINDOW:
        if not CAUSAL:
            hi = tl.minimum(hi, start_m + q_shift + BLOCK_M + window)
        first = tl.maximum(start_m + q_shift - window, 0)
        lo = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
    if CAUSAL or WINDOW:
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _band_queries(len_q, start_n, q_shift, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi) covering the query rows that can see a key of block [start_n, start_n + BLOCK_N) (row i
    is key position i + q_shift); lo a multiple of BLOCK_M, lo <= hi <= len_q."""
    lo = 0
    hi = len_q
    if CAUSAL:
        lo = tl.maximum(start_n - q_shift, 0)
    if WINDOW:
        if not CAUSAL:
            lo = tl.maximum(start_n - q_shift - window, 0)
        hi = tl.minimum(hi, start_n + BLOCK_N - q_shift + window)
    lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOW:
        hi = tl.maximum(hi, lo)
    return lo, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_row, bias_base, seed, off_bh,
               lo, hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
               stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
               BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
               HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). MASK_KEYS=False is the fast path for blocks
    that end before the sequence does: unmasked loads, no bounds select (padding keys and causal
    still get their per-element select)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < len_k
        kT_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASK_KEYS:
            kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * sm_scale
        if HAS_BIAS:
            s += _load_bias(bias_base, offs_m, offs_n, stride_bm, stride_bn, len_q, len_k)
        if HAS_MASK:
            if MASK_KEYS:  # the mask load gives 0 past the end: it covers n_ok too
                key_ok = tl.load(mask_row + offs_n * stride_mn, mask=n_ok, other=0) != 0
            else:
                key_ok = tl.load(mask_row + offs_n * stride_mn) != 0
            s = tl.where(key_ok[None, :], s, float("-inf"))
        elif MASK_KEYS:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if WINDOW:  # the window and causal in one select
            s = tl.where(_in_window(offs_n, pos_m, window, CAUSAL), s, float("-inf"))
        elif CAUSAL:
            s = tl.where(offs_n[None, :] <= pos_m[:, None], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2((s - m_use[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            p = p * _dropout_scale(seed, off_bh, offs_m, offs_n, seqlen_q, seqlen_k, drop_threshold, drop_scale)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V,                    # [B, S, H, D] strided views (unit stride on D), or packed [total, H, D]
    Out,                        # output, contiguous in q's layout
    Lse,                        # fp32 [B, H, Sq] (padded) or [H, total] (packed): natural-log logsumexp
    Mask,                       # uint8 view of the bool key padding mask [B, Sk] (HAS_MASK)
    Bias,                       # additive bias, a [B, H, Sq, Sk] view, stride 0 where broadcast (HAS_BIAS)
    CuSeqlens,                  # int32 [B + 1] sequence starts (PACKED)
    Seed,                       # int64 [1] Philox seed (DROPOUT)
    stride_qb, stride_qs, stride_qh,   # q strides: batch (0 when packed), token, head
    stride_kb, stride_ks, stride_kh,   # k strides
    stride_vb, stride_vs, stride_vh,   # v strides
    stride_ob, stride_os, stride_oh,   # out strides
    stride_lb, stride_lh,              # lse strides: batch (0 when packed), head; rows are unit stride
    stride_mb, stride_mn,              # mask strides
    stride_bb, stride_bh, stride_bm, stride_bn,  # bias strides
    H,                          # number of heads
    seqlen_q, seqlen_k,         # padded: Sq, Sk; packed: max_seqlen for both (grid, dropout offsets)
    sm_scale,                   # softmax scale (1/sqrt(D) by default)
    drop_threshold,             # floor(p * 2^31): 31-bit randoms below it are dropped
    drop_scale,                 # 1 / (1 - p)
    window,                     # sliding window w >= 0: key j visible iff |i + Sk - Sq - j| <= w (WINDOW)
    seq_bucket,                 # max(Sq, Sk) rounded up to a power of two: the shape class (configs.py)
    HEAD_D: tl.constexpr,       # head dim D
    BLOCK_D: tl.constexpr,      # D rounded up to a power of two >= 16 (masked)
    BLOCK_M: tl.constexpr,      # query rows per program
    BLOCK_N: tl.constexpr,      # keys per inner step
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WINDOW: tl.constexpr,       # a sliding window bounds the visible keys (key blocks outside it skipped)
):
    # 1-D grid, query blocks of one (b, h) adjacent so their K/V stay hot in L2
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % num_m) * BLOCK_M
    off_bh = pid // num_m
    b = off_bh // H
    h = off_bh % H
    b64 = b.to(tl.int64)  # batch offsets in int64: b * batch stride can pass 2^31
    seq_start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, PACKED)
    if start_m >= len_q:  # packed: this sequence is shorter than max_seqlen
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < len_q

    q_base = Q + b64 * stride_qb + seq_start * stride_qs + h * stride_qh
    k_base = K + b64 * stride_kb + seq_start * stride_ks + h * stride_kh
    v_base = V + b64 * stride_vb + seq_start * stride_vs + h * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)

    kv_lo, kv_hi = _key_range(Mask, b64, stride_mb, stride_mn, len_k, BLOCK_N, HAS_MASK)
    # queries are the last Sq of Sk positions (bottom-right aligned; 0 when packed): row i is key position
    # i + q_shift, and causal / the window bound the key blocks this tile visits
    q_shift = seqlen_k - seqlen_q
    kv_lo, kv_hi = _band_keys(kv_lo, kv_hi, start_m, q_shift, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    pos_m = offs_m + q_shift
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    bias_base = Bias + b64 * stride_bb + h * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # every key block but a last partial one lies inside the sequence (kv_hi <= len_k): run those
    # on the fast path, the tail with bounds masks
    full_hi = kv_lo + ((kv_hi - kv_lo) // BLOCK_N) * BLOCK_N
    mask_row = Mask + b64 * stride_mb
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_row, bias_base, seed, off_bh,
                               kv_lo, full_hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q,
                               seqlen_k, stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale,
                               drop_threshold, drop_scale, window, BLOCK_N, False, BLOCK_D == HEAD_D, HAS_MASK,
                               HAS_BIAS, CAUSAL, DROPOUT, WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_row, bias_base, seed, off_bh,
                               full_hi, kv_hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q,
                               seqlen_k, stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale,
                               drop_threshold, drop_scale, window, BLOCK_N, True, BLOCK_D == HEAD_D, HAS_MASK,
                               HAS_BIAS, CAUSAL, DROPOUT, WINDOW)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # acc is 0 on empty rows: they write 0
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe) * LN2)
    o_base = Out + b64 * stride_ob + seq_start * stride_os + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b64 * stride_lb + h * stride_lh + seq_start + offs_m, lse, mask=m_ok)


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO,                    # contiguous [rows, H, D] (rows = B * Sq, or total when packed)
    Delta,                      # fp32, lse's layout: rowsum(dO * O)
    rows,                       # B * Sq or total
    rows_per_batch,             # Sq (padded) or total (packed: all rows in "batch" 0)
    stride_db, stride_dh,       # delta strides: batch, head
    H,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < rows
    msk = r_ok[:, None] & (offs_d[None, :] < HEAD_D)
    ptr = (offs_r[:, None].to(tl.int64) * H + h) * HEAD_D + offs_d[None, :]
    o = tl.load(Out + ptr, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + ptr, mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    bq = offs_r // rows_per_batch
    i = offs_r % rows_per_batch
    tl.store(Delta + bq * stride_db + h * stride_dh + i, delta, mask=r_ok)


@triton.jit
def _dkdv_inner(dk, dv, kT, vT, q_base, do_base, l_base, d_base, bias_base, seed, off_bh,
                lo, hi, offs_n, kpos, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
                stride_qs, stride_dos, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
                BLOCK_M: tl.constexpr, MASK_Q: tl.constexpr, EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr):
    """dK/dV contributions of query blocks [lo, hi) to one key block. No per-element select is needed
    for bounds or padding: a row past the end loads q = dO = 0 and lse = +inf (P = 0), and a padding
    or out-of-range key only touches its own dK/dV row, which the caller zeroes or never stores.
    MASK_Q=False (blocks inside the sequence) loads without masks. Scores are computed as q kT, the
    very expression of the forward pass (see "Precision" in the module doc); P and dS are transposed
    for the dK/dV dots."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < len_q
        q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dos + offs_d[None, :]
        if MASK_Q:
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(l_base + offs_m, mask=m_ok, other=float("inf"))
            Di = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse = tl.load(l_base + offs_m)
            Di = tl.load(d_base + offs_m)
        s = tl.dot(q, kT, input_precision="ieee") * sm_scale
        if HAS_BIAS:
            s += _load_bias(bias_base, offs_m, offs_n, stride_bm, stride_bn, len_q, len_k)
        p = tl.math.exp2(tl.minimum((s - lse[:, None]) * LOG2E, 0.0))
        # kpos = offs_n - q_shift: the keys' positions in query rows
        if WINDOW:  # the window and causal in one select
            p = tl.where(_in_window(kpos, offs_m, window, CAUSAL), p, 0.0)
        elif CAUSAL:
            p = tl.where(kpos[None, :] <= offs_m[:, None], p, 0.0)
        dp = tl.dot(do, vT, input_precision="ieee")
        if DROPOUT:
            z = _dropout_scale(seed, off_bh, offs_m, offs_n, seqlen_q, seqlen_k, drop_threshold, drop_scale)
            dv = tl.dot(tl.trans((p * z).to(do.dtype)), do, dv, input_precision="ieee")
            dp = dp * z
        else:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision="ieee")
        ds = p * (dp - Di[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,                    # as in the forward kernel
    DO,                         # grad of out, contiguous in q's layout (same strides as out)
    Lse, Delta,                 # fp32, lse layout (see forward)
    DK, DV,                     # outputs, contiguous in k's / v's layout
    Mask, Bias, CuSeqlens, Seed,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,   # dO strides
    stride_dkb, stride_dks, stride_dkh,   # dK (and dV: same layout) strides
    stride_lb, stride_lh,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, seqlen_q, seqlen_k,
    sm_scale,                   # softmax scale (dK = scale * dS^T q)
    drop_threshold, drop_scale,
    window,                     # sliding window (WINDOW; see the forward kernel)
    seq_bucket,                 # the shape class (see the forward kernel)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows per inner step
    BLOCK_N: tl.constexpr,      # keys per program
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
):
    # one program per key block; tiles are held transposed ([keys, queries]) so that dV and dK come
    # out of the dots directly as [BLOCK_N, D]
    num_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    start_n = (pid % num_n) * BLOCK_N
    off_bh = pid // num_n
    b = off_bh // H
    h = off_bh % H
    b64 = b.to(tl.int64)  # batch offsets in int64: b * batch stride can pass 2^31
    seq_start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, PACKED)
    if start_n >= len_k:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_ok = offs_n < len_k
    kT = tl.load(K + b64 * stride_kb + h * stride_kh + (seq_start + offs_n[None, :]) * stride_ks + offs_d[:, None],
                 mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    vT = tl.load(V + b64 * stride_vb + h * stride_vh + (seq_start + offs_n[None, :]) * stride_vs + offs_d[:, None],
                 mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    key_ok = n_ok
    if HAS_MASK:
        key_ok = key_ok & (tl.load(Mask + b64 * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)

    q_base = Q + b64 * stride_qb + seq_start * stride_qs + h * stride_qh
    do_base = DO + b64 * stride_dob + seq_start * stride_dos + h * stride_doh
    l_base = Lse + b64 * stride_lb + h * stride_lh + seq_start
    d_base = Delta + b64 * stride_lb + h * stride_lh + seq_start
    bias_base = Bias + b64 * stride_bb + h * stride_bh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    # causal: queries before this key block see none of its keys; window: nor do those farther than w
    q_shift = seqlen_k - seqlen_q
    m_lo, m_hi = _band_queries(len_q, start_n, q_shift, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    kpos = offs_n - q_shift
    if HAS_MASK:  # a block of padding keys only: nothing to accumulate, dK = dV = 0
        m_hi = tl.where(tl.max(key_ok.to(tl.int32), axis=0) > 0, m_hi, m_lo)
    full_hi = m_lo + ((m_hi - m_lo) // BLOCK_M) * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, kT, vT, q_base, do_base, l_base, d_base, bias_base, seed, off_bh,
                         m_lo, full_hi, offs_n, kpos, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
                         stride_qs, stride_dos, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
                         BLOCK_M, False, BLOCK_D == HEAD_D, HAS_BIAS, CAUSAL, DROPOUT, WINDOW)
    dk, dv = _dkdv_inner(dk, dv, kT, vT, q_base, do_base, l_base, d_base, bias_base, seed, off_bh,
                         full_hi, m_hi, offs_n, kpos, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
                         stride_qs, stride_dos, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
                         BLOCK_M, True, BLOCK_D == HEAD_D, HAS_BIAS, CAUSAL, DROPOUT, WINDOW)
    if HAS_MASK:  # padding keys have probability 0 everywhere: exactly zero gradients
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)

    dk = dk * sm_scale
    st_mask = n_ok[:, None] & d_ok[None, :]
    dk_ptr = b64 * stride_dkb + h * stride_dkh + (seq_start + offs_n[:, None]) * stride_dks + offs_d[None, :]
    tl.store(DK + dk_ptr, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + dk_ptr, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, Di, k_base, v_base, mask_row, bias_base, seed, off_bh,
              lo, hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
              stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
              BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, HAS_MASK: tl.constexpr,
              HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr):
    """dQ contributions of key blocks [lo, hi). A key past the end loads k = v = 0 and so adds
    nothing; padding keys (real k, v) and causal need their per-element select."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < len_k
        kT_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]
        vT_ptrs = v_base + offs_n[None, :] * stride_vs + offs_d[:, None]
        if MASK_KEYS:
            kT = tl.load(kT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * sm_scale
        if HAS_BIAS:
            s += _load_bias(bias_base, offs_m, offs_n, stride_bm, stride_bn, len_q, len_k)
        p = tl.math.exp2(tl.minimum((s - lse[:, None]) * LOG2E, 0.0))
        if HAS_MASK:
            key_ok = tl.load(mask_row + offs_n * stride_mn, mask=n_ok, other=0) != 0
            p = tl.where(key_ok[None, :], p, 0.0)
        if WINDOW:  # the window and causal in one select
            p = tl.where(_in_window(offs_n, pos_m, window, CAUSAL), p, 0.0)
        elif CAUSAL:
            p = tl.where(offs_n[None, :] <= pos_m[:, None], p, 0.0)
        dp = tl.dot(do, vT, input_precision="ieee")
        if DROPOUT:
            dp = dp * _dropout_scale(seed, off_bh, offs_m, offs_n, seqlen_q, seqlen_k, drop_threshold, drop_scale)
        ds = p * (dp - Di[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision="ieee")
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta,
    DQ,                         # output, contiguous in q's layout
    Mask, Bias, CuSeqlens, Seed,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_mb, stride_mn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, seqlen_q, seqlen_k,
    sm_scale,
    drop_threshold, drop_scale,
    window,                     # sliding window (WINDOW; see the forward kernel)
    seq_bucket,                 # the shape class (see the forward kernel)
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,      # query rows per program
    BLOCK_N: tl.constexpr,      # keys per inner step
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
):
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    start_m = (pid % num_m) * BLOCK_M
    off_bh = pid // num_m
    b = off_bh // H
    h = off_bh % H
    b64 = b.to(tl.int64)  # batch offsets in int64: b * batch stride can pass 2^31
    seq_start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, PACKED)
    if start_m >= len_q:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    m_ok = offs_m < len_q
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + (seq_start + offs_m[:, None]) * stride_qs + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + (seq_start + offs_m[:, None]) * stride_dos + offs_d[None, :],
                 mask=md_mask, other=0.0)
    lse = tl.load(Lse + b64 * stride_lb + h * stride_lh + seq_start + offs_m, mask=m_ok, other=float("inf"))
    Di = tl.load(Delta + b64 * stride_lb + h * stride_lh + seq_start + offs_m, mask=m_ok, other=0.0)

    k_base = K + b64 * stride_kb + seq_start * stride_ks + h * stride_kh
    v_base = V + b64 * stride_vb + seq_start * stride_vs + h * stride_vh
    kv_lo, kv_hi = _key_range(Mask, b64, stride_mb, stride_mn, len_k, BLOCK_N, HAS_MASK)
    q_shift = seqlen_k - seqlen_q  # see the forward kernel
    kv_lo, kv_hi = _band_keys(kv_lo, kv_hi, start_m, q_shift, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    pos_m = offs_m + q_shift
    bias_base = Bias + b64 * stride_bb + h * stride_bh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    mask_row = Mask + b64 * stride_mb
    full_hi = kv_lo + ((kv_hi - kv_lo) // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, Di, k_base, v_base, mask_row, bias_base, seed, off_bh,
                   kv_lo, full_hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
                   stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
                   BLOCK_N, False, BLOCK_D == HEAD_D, HAS_MASK, HAS_BIAS, CAUSAL, DROPOUT, WINDOW)
    dq = _dq_inner(dq, q, do, lse, Di, k_base, v_base, mask_row, bias_base, seed, off_bh,
                   full_hi, kv_hi, offs_m, pos_m, offs_d, d_ok, len_q, len_k, seqlen_q, seqlen_k,
                   stride_ks, stride_vs, stride_mn, stride_bm, stride_bn, sm_scale, drop_threshold, drop_scale, window,
                   BLOCK_N, True, BLOCK_D == HEAD_D, HAS_MASK, HAS_BIAS, CAUSAL, DROPOUT, WINDOW)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + (seq_start + offs_m[:, None]) * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=md_mask)


# ----------------------------------------------------------------------------------------------
# launch configs: fastbert/triton/configs.py's table by default, its candidates under FASTBERT_AUTOTUNE=1
# ----------------------------------------------------------------------------------------------
_FLAGS = ["HEAD_D", "PACKED", "HAS_MASK", "HAS_BIAS", "CAUSAL", "DROPOUT", "WINDOW"]
_JIT = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}
# keyed on the sequence length bucket, not the length: a varlen workload whose max_seqlen changes every
# batch would otherwise re-tune every batch (tensor dtypes are keyed implicitly); results kept on disk
_AUTOTUNED = {name: triton.autotune(configs=configs.attention_autotune_configs(name), key=_FLAGS + ["seq_bucket"],
                                    prune_configs_by={"early_config_prune": configs.prune_attention(name)},
                                    cache_results=True)(fn)
              for name, fn in _JIT.items()}


def _launch(name: str, grid, args, a, device, dtype):
    """Launch attention kernel `name` with its table config (or through its autotuner)."""
    flags = a["flags"]
    if _runtime.triton_autotune() and not _INTERPRET:
        _AUTOTUNED[name][grid](*args, **flags)
        return
    cfg = configs.attention(name, configs.family(device), dtype, flags["BLOCK_D"], a["seq_bucket"],
                            heavy=flags["HAS_BIAS"] and flags["DROPOUT"])
    _JIT[name][grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# launchers (signatures = csrc/ops.cpp attention_fwd / attention_bwd)
# ----------------------------------------------------------------------------------------------
def seq_bucket(sq: int, sk: int) -> int:
    """max(Sq, Sk) rounded up to a power of two in [16, 8192]: the shape class configs are chosen by."""
    return min(max(16, triton.next_power_of_2(max(sq, sk, 1))), 8192)


def _strides3(t: torch.Tensor, packed: bool):
    """(batch, token, head) strides of a [B, S, H, D] or packed [total, H, D] tensor."""
    if packed:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _common_args(q, k, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed,
                 window=-1):
    """Everything the kernels take besides the tensors' own pointers and strides."""
    packed = cu_seqlens is not None
    if packed:
        total, H, D = q.shape
        B = cu_seqlens.numel() - 1
        Sq = Sk = int(max_seqlen)
    else:
        total = 0
        B, Sq, H, D = q.shape
        Sk = k.shape[1]
    # Triton loads bool as bytes; a uint8 view is the same memory, no copy
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    bias = attn_bias.expand(B, H, Sq, Sk) if attn_bias is not None else None
    dropout = dropout_p > 0.0
    return dict(
        packed=packed, B=B, H=H, D=D, Sq=Sq, Sk=Sk, total=total,
        # unused pointer arguments get q: the constexpr flags compile their loads away
        mask=mask if mask is not None else q,
        mstr=(mask.stride(0), mask.stride(1)) if mask is not None else (0, 0),
        bias=bias if bias is not None else q,
        bstr=tuple(bias.stride()) if bias is not None else (0, 0, 0, 0),
        cu=cu_seqlens if packed else q,
        seed=seed if dropout else q,
        sm_scale=float(scale),
        drop_threshold=_runtime.dropout_threshold(dropout_p) if dropout else 0,
        drop_scale=1.0 / (1.0 - dropout_p) if dropout else 1.0,
        # a window at least as long as the sequences hides nothing: run the unwindowed kernels (also
        # keeps position + window in int32)
        window=int(window) if 0 <= window < max(Sq, Sk) else 0,
        seq_bucket=seq_bucket(Sq, Sk),
        flags=dict(HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), PACKED=packed,
                   HAS_MASK=key_padding_mask is not None, HAS_BIAS=attn_bias is not None,
                   CAUSAL=bool(causal), DROPOUT=dropout, WINDOW=0 <= window < max(Sq, Sk)),
    )


def _lse_layout(a, device):
    """A new fp32 tensor in lse's layout, and its (batch, head) strides."""
    if a["packed"]:
        t = new_empty((a["H"], a["total"]), dtype=torch.float32, device=device)
        return t, 0, a["total"]
    t = new_empty((a["B"], a["H"], a["Sq"]), dtype=torch.float32, device=device)
    return t, a["H"] * a["Sq"], a["Sq"]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  attn_bias: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                  causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor], window: int = -1
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out contiguous in q's layout, lse fp32). Arguments as checked by fastbert.ops.attention."""
    a = _common_args(q, k, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed,
                     window)
    packed = a["packed"]
    out = new_empty(q.shape, dtype=q.dtype, device=q.device)
    lse, slb, slh = _lse_layout(a, q.device)
    if a["B"] == 0 or a["Sq"] == 0 or q.numel() == 0:
        return out, lse
    grid = lambda META: (triton.cdiv(a["Sq"], META["BLOCK_M"]) * a["B"] * a["H"],)  # noqa: E731
    _launch("fwd", grid, (
        q, k, v, out, lse, a["mask"], a["bias"], a["cu"], a["seed"],
        *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(out, packed),
        slb, slh, *a["mstr"], *a["bstr"],
        a["H"], a["Sq"], a["Sk"], a["sm_scale"], a["drop_threshold"], a["drop_scale"], a["window"], a["seq_bucket"],
    ), a, q.device, q.dtype)
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor],
                  cu_seqlens: Optional[torch.Tensor], max_seqlen: int, causal: bool, scale: float,
                  dropout_p: float, seed: Optional[torch.Tensor], window: int = -1
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v), each contiguous in its input's layout. grad_out: out's layout."""
    a = _common_args(q, k, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed,
                     window)
    packed = a["packed"]
    dq = new_empty(q.shape, dtype=q.dtype, device=q.device)
    dk = new_empty(k.shape, dtype=k.dtype, device=k.device)
    dv = new_empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or a["B"] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    D, H = a["D"], a["H"]
    BLOCK_D = a["flags"]["BLOCK_D"]

    delta, slb, slh = _lse_layout(a, q.device)
    rows = out.numel() // (H * D)
    pre_block = 64
    _attention_bwd_preprocess_kernel[(triton.cdiv(rows, pre_block), H)](
        out, grad_out, delta, rows, a["total"] if packed else a["Sq"], slb, slh, H,
        HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_block,
    )
    common = (*a["mstr"], *a["bstr"], H, a["Sq"], a["Sk"], a["sm_scale"],
              a["drop_threshold"], a["drop_scale"], a["window"], a["seq_bucket"])
    grid_kv = lambda META: (triton.cdiv(a["Sk"], META["BLOCK_N"]) * a["B"] * H,)  # noqa: E731
    _launch("dkdv", grid_kv, (
        q, k, v, grad_out, lse, delta, dk, dv, a["mask"], a["bias"], a["cu"], a["seed"],
        *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(grad_out, packed),
        *_strides3(dk, packed), slb, slh, *common,
    ), a, q.device, q.dtype)
    grid_q = lambda META: (triton.cdiv(a["Sq"], META["BLOCK_M"]) * a["B"] * H,)  # noqa: E731
    _launch("dq", grid_q, (
        q, k, v, grad_out, lse, delta, dq, a["mask"], a["bias"], a["cu"], a["seed"],
        *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(grad_out, packed),
        *_strides3(dq, packed), slb, slh, *common,
    ), a, q.device, q.dtype)
    return dq, dk, dv
