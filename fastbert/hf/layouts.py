"""Where each Hugging Face encoder layer keeps its pieces (fastbert.nn.Layout), and how a config's
activation name maps to the way fastbert computes it. Importing this module registers both with
fastbert.nn (so `FastBertLayer.from_hf(hf_layer)` finds the layout and the activation on its own);
fastbert/hf/table.py assigns a layout to each architecture.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from fastbert.nn import layers as nn_layers
from fastbert.nn.layers import Layout

BERT_LAYOUT = Layout(
    name="bert", attention="attention.self", q="query", k="key", v="value", heads="num_attention_heads",
    attn_dropout="dropout", o="attention.output.dense", ln1="attention.output.LayerNorm",
    drop1="attention.output.dropout", ffn_in="intermediate.dense", act="intermediate.intermediate_act_fn",
    ffn_out="output.dense", ln2="output.LayerNorm", drop2="output.dropout", act_config=("hidden_act",))

DISTILBERT_LAYOUT = Layout(
    name="distilbert", attention="attention", q="q_lin", k="k_lin", v="v_lin", heads="n_heads",
    attn_dropout="dropout", o="attention.out_lin", ln1="sa_layer_norm", drop1=None, ffn_in="ffn.lin1",
    act="ffn.activation", ffn_out="ffn.lin2", ln2="output_layer_norm", drop2="ffn.dropout",
    act_config=("activation",))

# XLM / FlauBERT have no layer module: their layers are four parallel ModuleLists in the model. The
# layer here is a view holding attention / layer_norm1 / ffn / layer_norm2 of one index, plus the
# model's hidden dropout probability as `hidden_dropout` (fastbert/hf/table.py builds it).
XLM_LAYOUT = Layout(
    name="xlm", attention="attention", q="q_lin", k="k_lin", v="v_lin", heads="n_heads", attn_dropout="dropout",
    o="attention.out_lin", ln1="layer_norm1", drop1="hidden_dropout", ffn_in="ffn.lin1", act="ffn.act",
    ffn_out="ffn.lin2", ln2="layer_norm2", drop2="ffn.dropout", act_config=("gelu_activation",))

LAYOUTS = (BERT_LAYOUT, DISTILBERT_LAYOUT, XLM_LAYOUT)

# HF activation names -> how fastbert computes them (FastBertLayer's `activation`). "none"/"tanh" go to
# linear_gelu (exact erf GELU and the tanh approximation; never substituted for each other);
# "relu"/"silu" are F.linear + the torch function; any other name runs the HF module's own activation.
GELU_EXACT = ("gelu",)
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh")
ACTIVATIONS: Dict[str, Tuple[str, Optional[str]]] = {
    **{n: ("gelu", "none") for n in GELU_EXACT},
    **{n: ("gelu", "tanh") for n in GELU_TANH},
    "relu": ("relu", None),
    "silu": ("silu", None),
    "swish": ("silu", None),
}


def activation_kind(config, names: Tuple[str, ...]) -> Optional[Tuple[str, Optional[str]]]:
    """The activation kind the first of the config fields `names` that is set asks for (None: unknown)."""
    if config is None:
        return None
    for n in names:
        act = getattr(config, n, None)
        if isinstance(act, str):
            return ACTIVATIONS.get(act)
        if n == "gelu_activation" and isinstance(act, bool):  # XLM/FlauBERT: exact GELU or ReLU
            return ("gelu", "none") if act else ("relu", None)
    return None


nn_layers.register_layouts(*LAYOUTS)
nn_layers.register_activation_resolver(activation_kind)
