"""attn_implementation="fastbert": fastbert.ops.attention behind transformers' AttentionInterface.

Registered in BOTH interfaces: AttentionInterface (the attention function) and AttentionMaskInterface
(the mask builder). Without the mask function transformers would look up no mask builder for
"fastbert" and the padding mask would silently arrive as None. The mask builder is transformers' own
sdpa one: a boolean [B, 1, Sq, Sk] mask (True = attend), or None when nothing is masked.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastbert import ops

NAME = "fastbert"


def fastbert_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention-function signature: query/key/value [B, H, S, D]; returns ([B, Sq, H, D], None).

    The [B, H, S, D] inputs are transposed views of HF's [B, S, H, D] projections, which is the layout
    fastbert.ops.attention reads in place: no copies. A boolean mask becomes an additive 0/-inf bias
    (a float mask is already additive); with no mask, a causal module gets the causal flag.
    """
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    sq, sk = q.shape[1], k.shape[1]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    bias = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attention_mask, float("-inf"))
        else:
            bias = attention_mask.to(q.dtype)
        causal = False  # the mask already carries any causal structure
    elif causal and sq != sk:
        # decoding with a cache: query i sits at key position sk - sq + i (bottom-right aligned)
        if sq > 1:
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            bias = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        causal = False
    out = ops.attention(q, k, v, attn_bias=bias, causal=causal and sq > 1, scale=scaling,
                        dropout_p=float(dropout))  # HF passes 0.0 in eval mode
    return out, None


_registered = False


def register() -> None:
    """Register "fastbert" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    global _registered
    if _registered:
        return
    from fastbert.hf import compat

    compat.register_attention(NAME, fastbert_attention_forward)
    _registered = True
