"""THE table: which Hugging Face architectures fastbert patches, and where their pieces live.

Adding an architecture with a known layer layout is one `Architecture(...)` entry in ARCHITECTURES.
Classes are named as (module, class) strings and imported lazily, so that `import fastbert` never
imports transformers, and a transformers build lacking one model does not break the others.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastbert.hf import compat
from fastbert.hf.layouts import BERT_LAYOUT, DISTILBERT_LAYOUT, XLM_LAYOUT
from fastbert.nn.layers import Layout


def _bert_embed(base, a: Dict, mask, names: Dict[str, Tuple[str, bool]]) -> torch.Tensor:
    # the cache offset (past_key_values_length, cache_length since 5.24) is left at its default, 0
    return compat.call(base.embeddings, names, input_ids=a.get("input_ids"), position_ids=a.get("position_ids"),
                       token_type_ids=a.get("token_type_ids"), inputs_embeds=a.get("inputs_embeds"))


def _electra_embed(base, a: Dict, mask, names: Dict[str, Tuple[str, bool]]):
    h = _bert_embed(base, a, mask, names)
    if hasattr(base, "embeddings_project"):  # ELECTRA small: embedding_size != hidden_size
        h = base.embeddings_project(h)
    return h


def _distilbert_embed(base, a: Dict, mask, names: Dict[str, Tuple[str, bool]]):
    return compat.call(base.embeddings, names, input_ids=a.get("input_ids"), inputs_embeds=a.get("inputs_embeds"),
                       position_ids=a.get("position_ids"))


def _xlm_embed(base, a: Dict, mask, names: Dict[str, Tuple[str, bool]]):
    """XLMModel/FlaubertModel's embedding block (they have no embeddings module)."""
    ids, emb = a.get("input_ids"), a.get("inputs_embeds")
    bs, slen = ids.shape if ids is not None else emb.shape[:2]
    pos = a.get("position_ids")
    if pos is None:
        pos = base.position_ids[:, :slen].expand(bs, slen)
    if emb is None:
        emb = base.embeddings(ids)
    t = emb + base.position_embeddings(pos).expand_as(emb)
    langs = a.get("langs")
    if langs is not None and base.use_lang_emb and base.config.n_langs > 1:
        t = t + base.lang_embeddings(langs)
    if a.get("token_type_ids") is not None:
        t = t + base.embeddings(a["token_type_ids"])  # XLM embeds token types with the word table
    t = base.layer_norm_emb(t)
    t = F.dropout(t, p=base.dropout, training=base.training)
    if mask is not None:
        t = t * mask[..., None].to(t.dtype)
    return t


def _xlm_mask(base, a: Dict):
    """The padding mask XLM/FlaubertModel derive when no attention_mask is given: from `lengths`, or
    from the count of non-pad tokens (it assumes right padding, and so does this)."""
    if a.get("attention_mask") is not None:
        return a["attention_mask"]
    ids = a.get("input_ids")
    lengths = a.get("lengths")
    if lengths is None:
        if ids is None:
            return None
        lengths = (ids != base.pad_index).sum(dim=1)
    slen = ids.shape[1] if ids is not None else a["inputs_embeds"].shape[1]
    return torch.arange(slen, device=lengths.device)[None, :] < lengths[:, None]


class _XLMLayer(nn.Module):
    """One XLM/FlauBERT layer gathered from the model's parallel ModuleLists (see hf/layouts.py's XLM_LAYOUT). Not
    registered in the model: the model's own lists stay the owners of these modules."""

    def __init__(self, base, i: int):
        super().__init__()
        self.attention = base.attentions[i]
        self.layer_norm1 = base.layer_norm1[i]
        self.ffn = base.ffns[i]
        self.layer_norm2 = base.layer_norm2[i]
        self._base = (base,)

    @property
    def hidden_dropout(self) -> float:
        return float(self._base[0].dropout)


def _xlm_layers(base) -> List[nn.Module]:
    return [_XLMLayer(base, i) for i in range(base.n_layers)]


_XLM_LISTS = (("attention", "attentions"), ("layer_norm1", "layer_norm1"), ("ffn", "ffns"),
              ("layer_norm2", "layer_norm2"))


def _xlm_view_problems(base, i: int, twin) -> List[str]:
    """The twin of XLM layer i still holds the modules the model's lists hold at index i."""
    why = []
    for name, lst in _XLM_LISTS:
        modules = getattr(base, lst, None)
        if modules is None or i >= len(modules) or getattr(twin, name, None) is not modules[i]:
            why.append(f"{lst}[{i}] was replaced after patching")
    return why


def _xlm_reasons(base) -> List[str]:
    c = base.config
    why = []
    if getattr(base, "pre_norm", False):
        why.append("config.pre_norm=True (pre-LayerNorm layers)")
    if getattr(c, "causal", False) or not getattr(c, "is_encoder", True):
        why.append("a causal / decoder configuration")
    if base.training and getattr(base, "layerdrop", 0.0) > 0.0:
        why.append("LayerDrop in training mode")
    if c.n_layers != len(base.attentions):
        why.append("layers were pruned")
    return why


def _decoder_reasons(base) -> List[str]:
    config = base.config
    why = []
    if getattr(config, "is_decoder", False):
        why.append("config.is_decoder=True (causal decoder / KV cache)")
    if getattr(config, "add_cross_attention", False):
        why.append("config.add_cross_attention=True (cross-attention)")
    pet = getattr(config, "position_embedding_type", None)
    if pet not in (None, "absolute"):
        why.append(f"config.position_embedding_type={pet!r} (relative position embeddings)")
    return why


def _distilbert_reasons(base) -> List[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    model: Tuple[str, str]                 # (module, class) of the bare base model that gets patched
    layer: Tuple[str, str]                 # (module, class) of its encoder layer: the module is where the
                                           # classes of its containers come from (checked at patch time)
    layers: Optional[str]                  # dotted path, in the base model, of the nn.ModuleList of layers
    layout: Layout                         # where q/k/v/o/LayerNorms/FFN live inside one layer
    embed: Callable                        # (base model, bound forward args, [B, S] mask or None) -> [B, S, hidden]
    output: str                            # transformers.modeling_outputs class the base model returns
    pooler: Optional[str]                  # attribute holding the pooler (may be None at runtime)
    args: Tuple[str, ...]                  # forward arguments the fast path serves when not None
    config_reasons: Callable = _decoder_reasons  # base model -> reasons the fast path cannot serve now
    # architectures without a layer module (XLM/FlauBERT): base -> one view module per layer; the
    # twins then live beside the model instead of in its module tree
    layer_views: Optional[Callable] = None
    derive_mask: Optional[Callable] = None  # (base, args) -> the [B, S] mask the model uses when none is given
    zero_padding: bool = False              # the model zeroes padding positions after every layer
    embeddings: Optional[compat.Call] = compat.BERT_EMBEDDINGS  # the embedding module's forward, as called
    attributes: Tuple[str, ...] = ()        # base-model attributes `embed` reads (checked at patch time)
    view_problems: Optional[Callable] = None  # (base, i, twin) -> why layer i's view is stale (XLM)

    def model_class(self):
        return _load(self.model)


def _load(spec: Tuple[str, str]):
    try:
        return getattr(importlib.import_module(spec[0]), spec[1])
    except (ImportError, AttributeError):
        return None


_M = "transformers.models"
_XLM_ATTRIBUTES = ("position_ids", "embeddings", "position_embeddings", "use_lang_emb",
                   "layer_norm_emb", "dropout", "pad_index", "n_layers", "attentions", "layer_norm1", "ffns",
                   "layer_norm2")
_BERT_ARGS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_BERT_OUT = "BaseModelOutputWithPoolingAndCrossAttentions"


def _bert_like(name: str, module: str, prefix: str) -> Architecture:
    return Architecture(
        name=name,
        model=(f"{_M}.{module}.modeling_{module}", f"{prefix}Model"),
        layer=(f"{_M}.{module}.modeling_{module}", f"{prefix}Layer"),
        layers="encoder.layer", layout=BERT_LAYOUT, embed=_bert_embed, output=_BERT_OUT, pooler="pooler",
        args=_BERT_ARGS)


ARCHITECTURES: Tuple[Architecture, ...] = (
    _bert_like("bert", "bert", "Bert"),
    _bert_like("roberta", "roberta", "Roberta"),
    _bert_like("xlm-roberta", "xlm_roberta", "XLMRoberta"),
    _bert_like("camembert", "camembert", "Camembert"),
    Architecture(
        name="electra",
        model=(f"{_M}.electra.modeling_electra", "ElectraModel"),
        layer=(f"{_M}.electra.modeling_electra", "ElectraLayer"),
        layers="encoder.layer", layout=BERT_LAYOUT, embed=_electra_embed,
        output="BaseModelOutputWithPastAndCrossAttentions", pooler=None, args=_BERT_ARGS),
    Architecture(
        name="distilbert",
        model=(f"{_M}.distilbert.modeling_distilbert", "DistilBertModel"),
        layer=(f"{_M}.distilbert.modeling_distilbert", "TransformerBlock"),
        layers="transformer.layer", layout=DISTILBERT_LAYOUT, embed=_distilbert_embed, output="BaseModelOutput",
        pooler=None, args=("input_ids", "attention_mask", "inputs_embeds", "position_ids"),
        config_reasons=_distilbert_reasons, embeddings=compat.DISTILBERT_EMBEDDINGS),
    Architecture(
        name="xlm",
        model=(f"{_M}.xlm.modeling_xlm", "XLMModel"),
        layer=(f"{_M}.xlm.modeling_xlm", "MultiHeadAttention"),
        layers=None, layout=XLM_LAYOUT, embed=_xlm_embed, output="BaseModelOutput", pooler=None,
        args=("input_ids", "attention_mask", "langs", "token_type_ids", "position_ids", "lengths", "inputs_embeds"),
        config_reasons=_xlm_reasons, layer_views=_xlm_layers, derive_mask=_xlm_mask, zero_padding=True,
        embeddings=None, attributes=_XLM_ATTRIBUTES, view_problems=_xlm_view_problems),
    Architecture(
        name="flaubert",
        model=(f"{_M}.flaubert.modeling_flaubert", "FlaubertModel"),
        layer=(f"{_M}.flaubert.modeling_flaubert", "MultiHeadAttention"),
        layers=None, layout=XLM_LAYOUT, embed=_xlm_embed, output="BaseModelOutput", pooler=None,
        args=("input_ids", "attention_mask", "langs", "token_type_ids", "position_ids", "lengths", "inputs_embeds"),
        config_reasons=_xlm_reasons, layer_views=_xlm_layers, derive_mask=_xlm_mask, zero_padding=True,
        embeddings=None, attributes=_XLM_ATTRIBUTES, view_problems=_xlm_view_problems),
)


def supported_names() -> List[str]:
    return [f"{a.name} ({a.model[1]} and every model holding one)" for a in ARCHITECTURES]


def find_architecture(module) -> Optional[Architecture]:
    """The table entry whose base-model class `module` is an instance of (exact class match first)."""
    for arch in ARCHITECTURES:
        cls = arch.model_class()
        if cls is not None and type(module) is cls:
            return arch
    for arch in ARCHITECTURES:
        cls = arch.model_class()
        if cls is not None and isinstance(module, cls):
            return arch
    return None
