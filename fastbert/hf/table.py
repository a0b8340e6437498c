"""THE table: which Hugging Face architectures fastbert patches, and where their pieces live.

Adding an architecture with a known layer layout is one `Architecture(...)` entry in ARCHITECTURES.
Classes are named as (module, class) strings and imported lazily, so that `import fastbert` never
imports transformers, and a transformers build lacking one model does not break the others.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Tuple

from fastbert.nn.layers import BERT_LAYOUT, DISTILBERT_LAYOUT, Layout


def _bert_embed(base, a: Dict) -> "torch.Tensor":  # noqa: F821
    return base.embeddings(input_ids=a.get("input_ids"), position_ids=a.get("position_ids"),
                           token_type_ids=a.get("token_type_ids"), inputs_embeds=a.get("inputs_embeds"),
                           past_key_values_length=0)


def _electra_embed(base, a: Dict):
    h = _bert_embed(base, a)
    if hasattr(base, "embeddings_project"):  # ELECTRA small: embedding_size != hidden_size
        h = base.embeddings_project(h)
    return h


def _distilbert_embed(base, a: Dict):
    return base.embeddings(a.get("input_ids"), a.get("inputs_embeds"), a.get("position_ids"))


def _decoder_reasons(config) -> List[str]:
    why = []
    if getattr(config, "is_decoder", False):
        why.append("config.is_decoder=True (causal decoder / KV cache)")
    if getattr(config, "add_cross_attention", False):
        why.append("config.add_cross_attention=True (cross-attention)")
    pet = getattr(config, "position_embedding_type", None)
    if pet not in (None, "absolute"):
        why.append(f"config.position_embedding_type={pet!r} (relative position embeddings)")
    return why


def _distilbert_reasons(config) -> List[str]:
    return []


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    model_types: Tuple[str, ...]           # config.model_type values
    model: Tuple[str, str]                 # (module, class) of the bare base model that gets patched
    layer: Tuple[str, str]                 # (module, class) of its encoder layer
    layers: str                            # dotted path, in the base model, of the nn.ModuleList of layers
    layout: Layout                         # where q/k/v/o/LayerNorms/FFN live inside one layer
    embed: Callable                        # (base model, bound forward args) -> [B, S, hidden]
    output: str                            # transformers.modeling_outputs class the base model returns
    pooler: Optional[str]                  # attribute holding the pooler (may be None at runtime)
    args: Tuple[str, ...]                  # forward arguments the fast path serves when not None
    config_reasons: Callable = _decoder_reasons  # config -> reasons the fast path cannot serve

    def model_class(self):
        return _load(self.model)

    def layer_class(self):
        return _load(self.layer)


def _load(spec: Tuple[str, str]):
    try:
        return getattr(importlib.import_module(spec[0]), spec[1])
    except (ImportError, AttributeError):
        return None


_M = "transformers.models"
_BERT_ARGS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")
_BERT_OUT = "BaseModelOutputWithPoolingAndCrossAttentions"


def _bert_like(name: str, module: str, prefix: str, model_types=None) -> Architecture:
    return Architecture(
        name=name, model_types=model_types or (name,),
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
        name="electra", model_types=("electra",),
        model=(f"{_M}.electra.modeling_electra", "ElectraModel"),
        layer=(f"{_M}.electra.modeling_electra", "ElectraLayer"),
        layers="encoder.layer", layout=BERT_LAYOUT, embed=_electra_embed,
        output="BaseModelOutputWithPastAndCrossAttentions", pooler=None, args=_BERT_ARGS),
    Architecture(
        name="distilbert", model_types=("distilbert",),
        model=(f"{_M}.distilbert.modeling_distilbert", "DistilBertModel"),
        layer=(f"{_M}.distilbert.modeling_distilbert", "TransformerBlock"),
        layers="transformer.layer", layout=DISTILBERT_LAYOUT, embed=_distilbert_embed, output="BaseModelOutput",
        pooler=None, args=("input_ids", "attention_mask", "inputs_embeds", "position_ids"),
        config_reasons=_distilbert_reasons),
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
