"""attention: softmax(q k^T * scale + bias + mask) v, fused (FlashAttention-2), forward and backward.

The dispatch point of the op and its autograd Function. Backends: triton (fastbert/triton/attention.py,
registered below as fastbert::triton_attention_{fwd,bwd}), cpu/cuda (fastbert._C, schemas in
csrc/ops.cpp), torch (fastbert/reference.py under autograd).

What the output holds (every backend): a query row at a padding position attends to the valid keys
of its sequence, like Hugging Face's eager attention, so it is finite and defined; a row that sees no
key at all (a sequence whose mask is all zeros) is 0, with zero gradients. Valid rows are what the
numerical rule of docs/design.md is checked on. Every backend, the torch reference included, treats an
attn_bias value below -1e20 (HF's fp32/bf16 finfo.min additive masks, -inf; NaN too) as masking its
key, so a row masked that way entirely gives 0 as well (fastbert/triton/attention.py explains why);
HF's own attention gives a uniform average or NaN there.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP = "attention"
# head dims the fused kernels serve; others (e.g. TinyBERT's 26) run on the torch backend
TRITON_MAX_HEAD_DIM = 128
CPP_HEAD_DIMS = "16..128, a multiple of 8"
# beyond this no BERT-family model goes, and the fused kernels would be slower than the reference
API_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_attention_fwd", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                attn_bias: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
                causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor], window: int = -1
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).attention_fwd(q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen,
                                             causal, scale, dropout_p, seed, window)


@torch.library.custom_op("fastbert::triton_attention_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor],
                cu_seqlens: Optional[torch.Tensor], max_seqlen: int, causal: bool, scale: float,
                dropout_p: float, seed: Optional[torch.Tensor], window: int = -1
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, cu_seqlens,
                                             max_seqlen, causal, scale, dropout_p, seed, window)


def _fwd_fake(q, k, v, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed,
              window=-1):
    if cu_seqlens is not None:  # packed [total, H, D]: lse [H, total]
        lse_shape = (q.shape[1], q.shape[0])
    else:  # [B, Sq, H, D]: lse [B, H, Sq]
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask, attn_bias, cu_seqlens, max_seqlen, causal, scale,
              dropout_p, seed, window=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


C.register_fake_both("attention_fwd", _fwd_fake)
C.register_fake_both("attention_bwd", _bwd_fake)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _common_reasons(q, attn_bias) -> List[str]:
    why = []
    if q.dtype not in C.KERNEL_DTYPES:
        why.append(f"dtype {q.dtype} (kernels take float16, bfloat16, float32)")
    if attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled():
        why.append("attn_bias requires grad (the fused kernels produce no gradient for the bias)")
    return why


def _triton_check(q, attn_bias, **_) -> List[str]:
    why = _common_reasons(q, attn_bias)
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        why.append(f"head dim {q.shape[-1]} > {TRITON_MAX_HEAD_DIM}")
    return why


def _cpp_check(q, attn_bias, **_) -> List[str]:
    why = _common_reasons(q, attn_bias)
    d = q.shape[-1]
    if not (16 <= d <= 128 and d % 8 == 0):
        why.append(f"head dim {d} (the C++ kernels take {CPP_HEAD_DIMS})")
    return why


# csrc/cuda/attention.cu pads the head dim to 32/64/128 in shared memory; its binding rejects others
CUDA_MAX_HEAD_DIM = 128


def _cuda_check(q, attn_bias, **_) -> List[str]:
    why = _common_reasons(q, attn_bias)
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        why.append(f"head dim {q.shape[-1]} (the CUDA kernels take 1..{CUDA_MAX_HEAD_DIM})")
    return why


def _dispatch_key(q, attn_bias, **_):
    """Everything the checks above read (the Dispatcher caches decisions by it)."""
    bias_grad = attn_bias is not None and attn_bias.requires_grad and torch.is_grad_enabled()
    return q.dtype, q.shape[-1], bias_grad


DISPATCH = backends.Dispatcher(
    OP,
    kernels=C.cpp_kernels("attention_fwd", "attention_bwd"),
    checks={"triton": _triton_check, "cuda": _cuda_check, "cpu": _cpp_check},
    key=_dispatch_key,
)


class _AttentionFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::attention, a C++ graph node)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, bias, cu_seqlens, max_seqlen, causal, scale, dropout_p, seed, window):
        out, lse = C.kernel("triton", OP, "attention_fwd")(q, k, v, mask, bias, cu_seqlens, max_seqlen, causal,
                                                          scale, dropout_p, seed, window)
        ctx.save_for_backward(q, k, v, out, lse, mask, bias, cu_seqlens, seed)
        ctx.args = (max_seqlen, causal, scale, dropout_p, window)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask, bias, cu_seqlens, seed = ctx.saved_tensors
        max_seqlen, causal, scale, dropout_p, window = ctx.args
        dq, dk, dv = C.kernel("triton", OP, "attention_bwd")(
            grad_out.contiguous(), q, k, v, out, lse, mask, bias, cu_seqlens, max_seqlen, causal, scale,
            dropout_p, seed, window)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _err(msg: str) -> str:
    return f"fastbert.ops.{OP}: {msg}"


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
    window: Optional[int] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + attn_bias, masked) v per head, fused; returns a contiguous tensor in q's layout.

    Padded: q [B, Sq, H, D], k/v [B, Sk, H, D]; any strides with a unit stride along D (e.g. slices of
    one fused QKV projection [B, S, 3, H, D] are read in place). attention_mask [B, Sk], bool or
    integer, 1/True = real token (HF convention). attn_bias: float, broadcastable to [B, H, Sq, Sk].
    Packed (padding-free): q/k/v [total, H, D] with cu_seqlens int32 [B + 1] (sequence starts, 0 first,
    total last) and optionally max_seqlen (given, no host sync is needed for CUDA tensors; then
    cu_seqlens is trusted). Queries are the last Sq of the Sk key positions (bottom-right aligned, as
    flash-attn and HF's KV cache): query i sits at position i + Sk - Sq (packed: Sq == Sk per sequence).
    causal: key j is visible to query i iff j <= i + Sk - Sq (needs Sq <= Sk; a key/value prefix).
    window w (int >= 0): a symmetric sliding window, key j visible iff |i + Sk - Sq - j| <= w (with
    causal: 0 <= i + Sk - Sq - j <= w), within each sequence; ModernBERT's local layers use
    w = local_attention // 2. The kernels skip key tiles outside the band (forward and backward).
    scale defaults to 1/sqrt(D). dropout_p > 0 drops attention probabilities with fastbert's Philox
    stream, seeded from torch's generator for q's device; backward regenerates the same mask.
    A query row that sees no key gives 0. fp16/bf16/fp32 run fused (fp32 is IEEE, no TF32); float64
    and head dims the kernels do not serve run the reference (fastbert.explain() says why).
    """
    C.check_tensor("q", q, op=OP)
    C.check_tensor("k", k, op=OP)
    C.check_tensor("v", v, op=OP)
    packed = cu_seqlens is not None
    rank = 3 if packed else 4
    layout = "[total, H, D] (packed, with cu_seqlens)" if packed else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(_err(f"{name} must be {layout}, got shape {tuple(t.shape)}"))
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(_err(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}"))
    C.check_same_device(OP, "q", q, k=k, v=v, attention_mask=attention_mask, attn_bias=attn_bias,
                        cu_seqlens=cu_seqlens)
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(_err(f"q, k, v must share the head dim, got {D}, {k.shape[-1]}, {v.shape[-1]}"))
    if not 1 <= D <= API_MAX_HEAD_DIM:
        raise ValueError(_err(f"head dim (q's last dim) must be in 1..{API_MAX_HEAD_DIM}, got {D}"))
    if k.shape[-2] != q.shape[-2] or v.shape[-2] != q.shape[-2]:
        raise ValueError(_err(f"q, k, v must have the same number of heads, got {q.shape[-2]}, {k.shape[-2]}, "
                              f"{v.shape[-2]}"))
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(_err(f"k and v must have the same leading dims, got {tuple(k.shape)} and {tuple(v.shape)}"))
    if packed:
        if k.shape[0] != q.shape[0]:
            raise ValueError(_err(f"packed q and k must hold the same tokens, got {q.shape[0]} and {k.shape[0]}"))
    elif k.shape[0] != q.shape[0]:
        raise ValueError(_err(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}"))
    if not isinstance(causal, bool):
        raise TypeError(_err(f"causal must be a bool, got {type(causal).__name__}"))
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(_err(f"window must be an int or None, got {type(window).__name__}"))
        if window < 0:
            raise ValueError(_err(f"window must be >= 0 (keys within window positions of the query), got {window}"))
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        scale = C.check_float(OP, "scale", scale, lo=-math.inf, hi=math.inf, lo_open=True)
    dropout_p = C.check_float(OP, "dropout_p", dropout_p, lo=0.0, hi=1.0)

    if packed:
        if attention_mask is not None:
            raise ValueError(_err("attention_mask: packed inputs (cu_seqlens) have no padding to mask"))
        if attn_bias is not None:
            raise ValueError(_err("attn_bias: not supported together with cu_seqlens"))
        if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
            raise TypeError(_err(f"max_seqlen must be an int, got {type(max_seqlen).__name__}"))
        if max_seqlen is not None and max_seqlen < 0:
            raise ValueError(_err(f"max_seqlen must be >= 0, got {max_seqlen}"))
        max_seqlen = C.check_cu_seqlens(OP, cu_seqlens, q.shape[0], max_seqlen)
        B, Sq, Sk = cu_seqlens.numel() - 1, max_seqlen, max_seqlen
    else:
        if max_seqlen is not None:
            raise ValueError(_err("max_seqlen is only meaningful with cu_seqlens (packed inputs)"))
        B, Sq, H, _ = q.shape
        Sk = k.shape[1]
        if causal and Sq > Sk:
            raise ValueError(_err(f"causal needs at most as many queries as keys (queries are the last Sq of Sk "
                                  f"positions), got Sq={Sq}, Sk={Sk}"))
        if attention_mask is not None:
            C.check_tensor("attention_mask", attention_mask, op=OP, ndim=(2,), dtypes=())
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
                raise TypeError(_err(f"attention_mask must be bool or integer (1 = token, 0 = padding), got "
                                     f"{attention_mask.dtype}; pass an additive float mask as attn_bias"))
            if tuple(attention_mask.shape) != (B, Sk):
                raise ValueError(_err(f"attention_mask must be [B, Sk] = [{B}, {Sk}], got "
                                      f"{tuple(attention_mask.shape)}"))
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask != 0
        if attn_bias is not None:
            C.check_tensor("attn_bias", attn_bias, op=OP)
            if attn_bias.dim() > 4:
                raise ValueError(_err(f"attn_bias must broadcast to [B, H, Sq, Sk], got shape "
                                      f"{tuple(attn_bias.shape)}"))
            try:
                shape = torch.broadcast_shapes(tuple(attn_bias.shape), (B, H, Sq, Sk))
            except RuntimeError:
                shape = None
            if shape != (B, H, Sq, Sk):
                raise ValueError(_err(f"attn_bias of shape {tuple(attn_bias.shape)} does not broadcast to "
                                      f"[B, H, Sq, Sk] = [{B}, {H}, {Sq}, {Sk}]"))
        max_seqlen = max(Sq, Sk)

    if window is not None and window >= max(Sq, Sk):
        window = None  # a window as long as the sequences hides no key
    decision = DISPATCH.choose(q.device, q=q, k=k, v=v, attn_bias=attn_bias)
    seed = reference.make_seed(q.device) if dropout_p > 0.0 else None
    if decision.backend == "torch" or q.numel() == 0 or k.numel() == 0 or B == 0:
        return reference.attention(q, k, v, attention_mask=attention_mask, attn_bias=attn_bias,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen if packed else None,
                                   causal=causal, scale=scale, dropout_p=dropout_p, seed=seed, window=window)
    # kernels read any strides but need a unit stride along D
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    args = (q, k, v, attention_mask, attn_bias, cu_seqlens, int(max_seqlen), causal, scale, dropout_p, seed,
            -1 if window is None else window)
    if C.needs_grad(q, k, v):
        if decision.backend in C.CPP_AUTOGRAD:
            return torch.ops.fastbert.attention(*args)  # C++ graph node (csrc/autograd.cpp)
        return _AttentionFn.apply(*args)
    return C.kernel(decision.backend, OP, "attention_fwd")(*args)[0]
