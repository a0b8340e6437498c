"""Drop-in fastbert modules holding the same Parameter objects as the Hugging Face modules they
replace: `FastBertLayer.from_hf(hf_layer)`, `FastBertSelfAttention.from_hf(hf_self_attention)`.
No transformers import here (fastbert/hf knows about transformers)."""
from fastbert.nn.layers import (BERT_LAYOUT, DISTILBERT_LAYOUT, LAYOUTS, XLM_LAYOUT, FastBertLayer, FastBertSelfAttention,
                                FusedQKV, Layout, LowRank, detect_layout, invalidate_caches,
                                plain_linear)

__all__ = ["FastBertLayer", "FastBertSelfAttention", "FusedQKV", "Layout", "BERT_LAYOUT", "DISTILBERT_LAYOUT", "XLM_LAYOUT",
           "LAYOUTS", "detect_layout", "invalidate_caches", "LowRank", "plain_linear"]
