"""Everything in fastbert that knows about Hugging Face transformers.

    import fastbert
    model = fastbert.patch(model)     # fused twins swapped in, in place (see fastbert/hf/patching.py)
    fastbert.unpatch(model)           # HF modules back

Importing fastbert.hf registers attn_implementation="fastbert" with transformers' AttentionInterface
and AttentionMaskInterface, so `from_pretrained(..., attn_implementation="fastbert")` and
`model.set_attn_implementation("fastbert")` route the attention (alone) through fastbert.ops.attention.
`import fastbert` itself never imports transformers; this package does.
"""
from fastbert.hf.attention import fastbert_attention_forward, register
from fastbert.hf.patching import UnsupportedModelError, explain_model, is_patched, patch, unpatch
from fastbert.hf.table import ARCHITECTURES, Architecture, find_architecture

try:
    register()
except ImportError:  # transformers is not installed: patch() will raise when called
    pass

__all__ = ["patch", "unpatch", "explain_model", "is_patched", "register", "fastbert_attention_forward",
           "UnsupportedModelError", "ARCHITECTURES", "Architecture", "find_architecture"]
