"""Plain PyTorch versions of every fastbert op: they define the semantics.

Each function is correct in any floating dtype, float64 included, and computes in the dtype it is
given, the way the PyTorch/Hugging Face composition it stands for does (so at fp16 it also shows
PyTorch's own rounding error, the yardstick of the numerical rule of docs/design.md). They are the
oracle of every test and benchmark and the `torch` backend.

Dropout everywhere uses one counter-based RNG, identical bit for bit in every backend:
Philox4x32-10 keyed by a 64-bit seed, counter (offset_lo, offset_hi, 0, 0), first output word r;
an element is kept iff (r >> 1) >= floor(p * 2^31), and kept values are scaled by 1 / (1 - p).
This is the stream of `triton.language.randint(seed, offset)`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastbert import _runtime

# ----------------------------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors (values kept in [0, 2^32))
# ----------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = _runtime.PHILOX_KEY_A
_PHILOX_KEY_B = _runtime.PHILOX_KEY_B
_PHILOX_ROUND_A = _runtime.PHILOX_ROUND_A
_PHILOX_ROUND_B = _runtime.PHILOX_ROUND_B


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of constant `a` and uint32 values `b`.
    int64 cannot hold the full product, so split a into 16-bit halves:
    a*b = a_hi*b*2^16 + a_lo*b  =>  hi = (a_hi*b + (a_lo*b >> 16)) >> 16 (all terms < 2^49)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi = (a_hi * b + ((a_lo * b) >> 16)) >> 16
    lo = (a * b) & _M32  # int64 wraps modulo 2^64; the low 32 bits are exact
    return hi & _M32, lo


def philox_uint32(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """First Philox4x32 output word for each counter in `offsets` (int64 tensor); int64 in [0, 2^32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0


dropout_threshold = _runtime.dropout_threshold


def dropout_keep(seed, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask for the elements with linear indices `offsets`."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0].item())
    r31 = philox_uint32(seed, offsets) >> 1
    return r31 >= dropout_threshold(p)


def make_seed(device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh int64 seed tensor of shape [1] on `device`, drawn from torch's generator for that device
    (so torch.manual_seed makes fastbert's dropout reproducible) without a host sync."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device, generator=generator)


def _apply_dropout(t: torch.Tensor, p: float, seed, offsets: torch.Tensor) -> torch.Tensor:
    if p == 0.0:
        return t
    keep = dropout_keep(seed, offsets.to(t.device), p)
    return torch.where(keep, t * (1.0 / (1.0 - p)), torch.zeros((), dtype=t.dtype, device=t.device))


# ----------------------------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------------------------
def add_layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    residual: Optional[torch.Tensor] = None,
    x_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    seed=None,
    return_residual: bool = False,
):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, as BertSelfOutput/BertOutput do
    (weight/bias None: no scale/shift). Dropout offsets are the row-major linear indices of x viewed as
    [rows, N]. return_residual: (out, pre) with pre = dropout(x + x_bias) + residual, the pre-norm sum
    (a pre-norm block's residual stream)."""
    h = x if x_bias is None else x + x_bias
    if dropout_p > 0.0:
        offsets = torch.arange(h.numel(), device=h.device).reshape(h.shape)
        h = _apply_dropout(h, dropout_p, seed, offsets)
    if residual is not None:
        h = h + residual
    out = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return (out, h) if return_residual else out


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], *, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                approximate: str = "none") -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


ACTIVATIONS = ("none", "tanh", "relu", "silu")  # linear_act: exact GELU, tanh GELU, ReLU, SiLU


def apply_activation(x: torch.Tensor, act: str) -> torch.Tensor:
    if act in ("none", "tanh"):
        return F.gelu(x, approximate=act)
    if act == "relu":
        return F.relu(x)
    if act == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {act!r}")


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               activation: str = "none", weight_layout: str = "nk", gated: bool = False,
               dropout_p: float = 0.0, seed=None) -> torch.Tensor:
    """act(x W^T + b), W [F, K] ("nk", nn.Linear) or given as [K, F] ("kn", GPT-2's Conv1D, used as
    x @ W: no transposed copy). gated: F = 2N, h = x W^T + b, out = act(h[..., :N]) * h[..., N:]
    (ModernBertMLP: `input, gate = Wi(x).chunk(2)`, `act(input) * gate`). Dropout after that, offsets
    the row-major linear indices of the [rows, N] output."""
    act = activation
    h = F.linear(x, weight, bias) if weight_layout == "nk" else (
        torch.matmul(x, weight) if bias is None else torch.matmul(x, weight) + bias)
    if gated:
        a, lin = h.chunk(2, dim=-1)
        h = apply_activation(a, act) * lin
    else:
        h = apply_activation(h, act)
    if dropout_p > 0.0:
        offsets = torch.arange(h.numel(), device=h.device).reshape(h.shape)
        h = _apply_dropout(h, dropout_p, seed, offsets)
    return h


# attn_bias values below this mask their key (every backend: see fastbert/triton/attention.py)
BIAS_MASKED = -1.0e20


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed=None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v, per head, as HF's eager attention computes it.

    Padded: q [B, Sq, H, D], k/v [B, Sk, H, D]; attention_mask [B, Sk] (1/True = real token);
    attn_bias broadcastable to [B, H, Sq, Sk]. Packed: q/k/v [total, H, D] with cu_seqlens [B+1]
    (attn_bias is then not accepted). Queries are the last Sq of Sk positions (bottom-right aligned):
    query i sits at position i + Sk - Sq. causal: key j is visible to query i iff j <= i + Sk - Sq.
    window w: key j is visible iff |i + Sk - Sq - j| <= w (with causal: 0 <= i + Sk - Sq - j <= w).
    A key is masked by attention_mask, by causal, or by an attn_bias value below BIAS_MASKED (-1e20:
    -inf and HF's fp32/bf16 finfo.min masks; NaN too), as in every backend's kernels. A query row that
    sees no key gives 0 (HF would give a uniform average of v or NaN).
    Returns the output in q's layout, contiguous.
    """
    if cu_seqlens is not None:
        if attn_bias is not None:
            raise ValueError("attn_bias: not supported together with cu_seqlens")
        bounds = [int(t) for t in cu_seqlens.tolist()]
        S = int(max_seqlen) if max_seqlen is not None else max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        outs = []
        for b, (s0, s1) in enumerate(zip(bounds[:-1], bounds[1:])):
            o = _attention_padded(q[None, s0:s1], k[None, s0:s1], v[None, s0:s1], None, None, causal,
                                  scale, dropout_p, seed, batch_offset=b, s_q_total=S, s_k_total=S, window=window)
            outs.append(o[0])
        if not outs:
            return torch.empty_like(q)
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0].contiguous()
    return _attention_padded(q, k, v, attention_mask, attn_bias, causal, scale, dropout_p, seed, window=window)


def _attention_padded(q, k, v, attention_mask, attn_bias, causal, scale, dropout_p, seed,
                      batch_offset: int = 0, s_q_total: Optional[int] = None, s_k_total: Optional[int] = None,
                      window: Optional[int] = None):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    visible = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
        # a bias below BIAS_MASKED (-inf, HF's fp32/bf16 finfo.min masks) or NaN masks its key, as in
        # every kernel: a row left with no key gives 0 instead of softmax's NaN or uniform average
        visible = visible & (attn_bias >= BIAS_MASKED)
    if attention_mask is not None:
        visible = visible & attention_mask.to(torch.bool)[:, None, None, :]
    if causal or window is not None:
        # bottom-right aligned: query i is at key position i + Sk - Sq; rel = key - query position
        rel = (torch.arange(Sk, device=q.device)[None, :] - torch.arange(Sq, device=q.device)[:, None]
               - (Sk - Sq))
        if causal:
            visible = visible & (rel <= 0)
        if window is not None:
            visible = visible & (rel.abs() <= window)
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    # rows with no visible key: softmax over all -inf is NaN; define them as 0
    scores = scores.masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(~any_visible, 0.0)
    if dropout_p > 0.0:
        s_q_total = Sq if s_q_total is None else s_q_total
        s_k_total = Sk if s_k_total is None else s_k_total
        bidx = torch.arange(B, device=q.device)[:, None, None, None] + batch_offset
        hidx = torch.arange(H, device=q.device)[None, :, None, None]
        iidx = torch.arange(Sq, device=q.device)[None, None, :, None]
        jidx = torch.arange(Sk, device=q.device)[None, None, None, :]
        offsets = ((bidx * H + hidx) * s_q_total + iidx) * s_k_total + jidx
        probs = _apply_dropout(probs, dropout_p, seed, offsets)
    out = torch.matmul(probs, vh)  # [B, H, Sq, D]
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# rotary position embedding (transformers' apply_rotary_pos_emb: ModernBERT, Llama, GPT-NeoX)
# ----------------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) of the two halves of the last dim (transformers' rotate_half)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token: t - cu_seqlens[seq(t)] (restarting at 0 for each sequence), int64."""
    starts = cu_seqlens[:-1].long()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lens, output_size=total)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None):
    """(q * cos + rotate_half(q) * sin, the same for k), cos/sin cast to q's dtype first (as HF's rotary
    modules return them). Padded q, k [B, S, H, D]: cos/sin [S', D] (rows 0..S-1 used), [1 or B, S, D],
    or a [max_pos, D] table indexed by position_ids [1 or B, S]. Packed q, k [total, H, D] with
    cu_seqlens: a [max_pos, D] table indexed by each token's position within its sequence."""
    if cu_seqlens is not None:
        pos = rotary_positions(cu_seqlens, q.shape[0])
        c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    elif position_ids is not None:
        c, s = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
    elif cos.dim() == 2:
        n = q.shape[1]
        c, s = cos[:n][None, :, None, :], sin[:n][None, :, None, :]
    else:
        c, s = cos[:, :, None, :], sin[:, :, None, :]
    c, s = c.to(q.dtype), s.to(q.dtype)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
