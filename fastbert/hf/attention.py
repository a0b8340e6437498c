"""attn_implementation="fastbert": fastbert.ops.attention behind transformers' AttentionInterface.

Registered in BOTH interfaces: AttentionInterface (the attention function) and AttentionMaskInterface
(the mask builder). Without the mask function transformers would look up no mask builder for
"fastbert" and the padding mask would silently arrive as None. The mask builder is transformers' own
sdpa one: a boolean [B, 1, Sq, Sk] mask (True = attend), or None when nothing is masked.

Every keyword argument a model passes is either served or handed on, never dropped:
  - served: `position_bias` (T5's relative bias, added to the scores like any additive bias),
    `cu_seq_lens_q/k` and `max_length_q/k` (HF's padding-free collator: the packed sequences attend
    each to itself, through the varlen kernels, when no mask is given; a mask, which HF builds
    block-diagonal for packed sequences, is used as it is), `sliding_window` (the mask HF builds
    already carries the window, as HF's sdpa relies on);
  - ignored because they do not change attention's math: the arguments listed in NEUTRAL;
  - anything else: the call goes to HF's own sdpa attention with every argument, and one warning
    per set of argument names says so.
A query row that sees no key (all of its keys masked) gives 0 on every backend.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from fastbert import ops

NAME = "fastbert"
SERVED = ("position_bias", "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# arguments HF hands every attention function that do not change what attention computes
NEUTRAL = ("output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
           "position_ids", "cache_position", "use_cache", "return_dict", "shift_labels", "layer_idx")
_warned = set()


def _as_bias(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = attend) as an additive 0 / -inf bias; a float mask is already additive."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _to_hf_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, why: str):
    from fastbert.hf import compat

    names = tuple(sorted(kwargs))
    if names not in _warned:
        _warned.add(names)
        warnings.warn(f"fastbert: attn_implementation='fastbert' hands this call to Hugging Face's sdpa attention "
                      f"because {why}. (Said once per set of arguments.)", UserWarning, stacklevel=3)
    return compat.sdpa_attention()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)


def fastbert_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers attention-function signature: query/key/value [B, H, S, D]; returns ([B, Sq, H, D], None).

    The [B, H, S, D] inputs are transposed views of HF's [B, S, H, D] projections, which is the layout
    fastbert.ops.attention reads in place: no copies. A boolean mask becomes an additive 0/-inf bias
    (a float mask is already additive); with no mask, a causal module gets the causal flag.
    """
    unknown = sorted(k for k, v in kwargs.items() if k not in SERVED + NEUTRAL and v is not None)
    if unknown:
        return _to_hf_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs,
                           f"fastbert does not serve {', '.join(map(repr, unknown))}")
    if query.shape[1] != key.shape[1]:
        return _to_hf_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs,
                           "query and key have different numbers of heads (grouped-query attention)")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    sq, sk = q.shape[1], k.shape[1]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    position_bias = kwargs.get("position_bias")
    if cu_q is not None and attention_mask is None and position_bias is None:
        if q.shape[0] != 1 or cu_k is None or (cu_k is not cu_q and not torch.equal(cu_k, cu_q)) or sq != sk:
            return _to_hf_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs,
                               "cu_seq_lens_q / cu_seq_lens_k describe different packings")
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu_q[1:] - cu_q[:-1]).max())
        out = ops.attention(q[0], k[0], v[0], cu_seqlens=cu_q.to(torch.int32), max_seqlen=int(max_len),
                            causal=causal and sq > 1, scale=scaling, dropout_p=float(dropout))
        return out[None], None
    bias = _as_bias(attention_mask, q.dtype)
    if attention_mask is not None:
        causal = False  # the mask already carries any causal structure
    elif causal and sq != sk:
        # decoding with a cache: query i sits at key position sk - sq + i (bottom-right aligned)
        if sq > 1:
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            bias = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        causal = False
    if position_bias is not None:
        pb = position_bias.to(q.dtype)
        if causal:  # HF's sdpa folds the causal structure into the bias it adds (create_position_bias_mask)
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            pb = pb.masked_fill(~keep, float("-inf"))
            causal = False
        bias = pb if bias is None else bias + pb
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
