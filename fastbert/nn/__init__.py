"""Drop-in fastbert modules holding the same Parameter objects as the Hugging Face modules they
replace: `FastBertLayer.from_hf(hf_layer)`, `FastBertSelfAttention.from_hf(hf_self_attention)`.
No transformers import here: fastbert/hf knows about transformers, and registers the HF layouts and
activation names with this package when imported (`import fastbert.hf`, or pass `layout=`).
`fastbert.nn.padding` packs padded batches into real tokens and back."""
from fastbert.nn import padding
from fastbert.nn.layers import (FastBertLayer, FastBertSelfAttention, FusedQKV, Layout, LinearParts, LowRank,
                                detect_layout, invalidate_caches, plain_linear, register_activation_resolver,
                                register_layouts)

__all__ = ["FastBertLayer", "FastBertSelfAttention", "FusedQKV", "Layout", "LinearParts", "LowRank", "detect_layout",
           "invalidate_caches", "plain_linear", "register_layouts", "register_activation_resolver", "padding"]
