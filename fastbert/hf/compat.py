"""Every transformers internal fastbert touches, in one place, checked once at patch time.

fastbert bypasses most of a Hugging Face encoder's Python: it reads the modules' weights, calls a few
of HF's own modules and functions directly, and returns HF's output classes. Each of those is a
*touchpoint* listed in TOUCHPOINTS below. The rules for touching them:

  - call HF code with only the arguments that differ from their defaults, by keyword, under the
    parameter name the installed version uses (a rename, such as DistilBERT's `input_embeds` ->
    `inputs_embeds` or BERT's `past_key_values_length` -> `cache_length`, is an alias here);
  - check every touchpoint a model needs when it is patched (`check_model`): a mismatch leaves that
    model to HF's own code, with one warning naming the touchpoint and the transformers version
    (never a TypeError in the middle of a forward, never a wrong number);
  - optional touchpoints (gradient-checkpointing layers, output capturing, the attention
    interfaces) are probed; where one is missing, the feature built on it is off, and says so.

Tested range: transformers `TESTED[0]` to the newest 5.x (CI runs both ends; README "Versions").
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# the oldest and the newest transformers a test run has passed on (CI tests both ends)
TESTED = ("5.0.0", "5.24.0")
SUPPORTED = ">=5.0,<6"


class CompatError(TypeError):
    """A transformers internal fastbert relies on is not what it expects (names the touchpoint)."""


def version() -> str:
    import transformers

    return transformers.__version__


def _parse(v: str) -> Tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


_range_warned = False


def warn_if_outside_range() -> None:
    """One warning per process when the installed transformers is outside the declared range."""
    global _range_warned
    v = version()
    if _range_warned or (5, 0, 0) <= _parse(v) < (6, 0, 0):
        return
    _range_warned = True
    warnings.warn(f"fastbert: transformers {v} is outside the supported range {SUPPORTED} (tested {TESTED[0]} to "
                  f"{TESTED[1]}); each touchpoint is still checked at patch time", UserWarning, stacklevel=3)


def load(module: str, name: str):
    """getattr(import_module(module), name), or None when either is missing."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------
# calling HF code: resolved keyword names, only non-default arguments
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Call:
    """A touchpoint fastbert calls: the logical argument names it may pass and, for each, the names
    transformers has used for it (newest first)."""

    name: str                               # e.g. "BertEmbeddings.forward"
    args: Dict[str, Tuple[str, ...]]        # fastbert's name -> accepted parameter names

    def resolve(self, fn: Callable) -> Dict[str, Tuple[str, bool]]:
        """fastbert's name -> (the installed parameter name, whether it has no default); CompatError
        when one is missing."""
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError) as e:
            raise CompatError(f"{self.name}: cannot read its signature ({e})") from None
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        out = {}
        for logical, aliases in self.args.items():
            found = next((a for a in aliases if a in params), None)
            if found is None and not var_kw:
                raise CompatError(f"{self.name} takes none of {', '.join(map(repr, aliases))} in transformers "
                                  f"{version()} (parameters: {', '.join(params)})")
            required = found is not None and params[found].default is inspect.Parameter.empty
            out[logical] = (found or aliases[0], required)
        return out


def call(fn: Callable, names: Dict[str, Tuple[str, bool]], **values):
    """fn(**{installed name: value}) for the values that are not None, and for the parameters that have
    no default (the defaults stay defaults)."""
    return fn(**{names[k][0]: v for k, v in values.items() if v is not None or names[k][1]})


BERT_EMBEDDINGS = Call("<BERT-like>Embeddings.forward", {
    "input_ids": ("input_ids",), "token_type_ids": ("token_type_ids",), "position_ids": ("position_ids",),
    "inputs_embeds": ("inputs_embeds",)})
DISTILBERT_EMBEDDINGS = Call("distilbert Embeddings.forward", {
    "input_ids": ("input_ids",), "inputs_embeds": ("inputs_embeds", "input_embeds"),
    "position_ids": ("position_ids",)})


# ----------------------------------------------------------------------------------------------
# output classes
# ----------------------------------------------------------------------------------------------
def output_class(name: str, fields: Iterable[str]):
    """transformers.modeling_outputs.<name>, checked to take `fields`; CompatError otherwise."""
    cls = load("transformers.modeling_outputs", name)
    if cls is None:
        raise CompatError(f"transformers.modeling_outputs.{name} does not exist in transformers {version()}")
    have = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    missing = [f for f in fields if f not in have]
    if missing:
        raise CompatError(f"transformers.modeling_outputs.{name} has no field {', '.join(missing)} in transformers "
                          f"{version()}")
    return cls


# ----------------------------------------------------------------------------------------------
# gradient-checkpointing layers (transformers.modeling_layers.GradientCheckpointingLayer)
# ----------------------------------------------------------------------------------------------
def gradient_checkpointing_layer():
    """HF's base class of checkpointable layers, or None (then the twins checkpoint on their own)."""
    return load("transformers.modeling_layers", "GradientCheckpointingLayer")


# ----------------------------------------------------------------------------------------------
# output capturing (output_hidden_states / output_attentions through hooks)
# ----------------------------------------------------------------------------------------------
# transformers >= 5.1x records hidden states and attentions with forward hooks it installs once,
# inactive unless a collector is set (transformers.utils.output_capturing); 5.0 monkey-patches the
# recording modules' `forward` for one call and restores it as an instance attribute.
_CAPTURE_MODULE = "transformers.utils.output_capturing"


def is_benign_hook(fn: Any) -> bool:
    """A hook transformers installs to capture outputs: inert while no collector is active, and the
    fused path returns hidden states itself, so it does not stop the fused path."""
    fn = getattr(fn, "__wrapped__", fn)
    return getattr(fn, "__module__", None) == _CAPTURE_MODULE and "capturing_hook" in getattr(fn, "__qualname__", "")


def is_benign_forward(module, fn: Any) -> bool:
    """An instance-level `forward` that is the module's own class forward (5.0's restore leaves one)."""
    return getattr(fn, "__func__", None) is type(module).forward and getattr(fn, "__self__", None) is module


_collector = []


def capture_active() -> bool:
    """True when an enclosing HF model is collecting outputs through hooks right now (the fused path
    would not run the modules those hooks sit on)."""
    if not _collector:
        _collector.append(load(_CAPTURE_MODULE, "_active_collector"))
    collector = _collector[0]
    if collector is None:
        return False
    try:
        active = collector.get()
    except Exception:  # a private helper changed shape: assume capturing, the safe answer
        return True
    return bool(active)


def hidden_state_selection_supported() -> bool:
    """transformers >= 5.2x accepts output_hidden_states=int or list of indices (None at unselected)."""
    return load(_CAPTURE_MODULE, "selected_hidden_states") is not None


def select_hidden_states(output_hidden_states, n_states: int) -> Optional[set]:
    """The indices `output_hidden_states` keeps, HF's semantics: None = all (a flag); an int or a list
    selects, negative indices count from the end, out-of-range ones select nothing."""
    if isinstance(output_hidden_states, bool) or output_hidden_states is None:
        return None
    if not hidden_state_selection_supported():
        return None  # older transformers treat any truthy value as "all"
    sel = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % n_states for i in sel if -n_states <= i < n_states}


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------
def activation_class(name: str):
    """The class transformers.activations.ACT2CLS builds for `name` (None when unknown)."""
    table = load("transformers.activations", "ACT2CLS")
    if not isinstance(table, dict) or name not in table:
        return None
    entry = table[name]
    return entry[0] if isinstance(entry, tuple) else entry


# ----------------------------------------------------------------------------------------------
# attention interfaces
# ----------------------------------------------------------------------------------------------
def register_attention(name: str, fn: Callable) -> None:
    """Register `fn` as attn_implementation=`name` in AttentionInterface, with HF's sdpa mask builder in
    AttentionMaskInterface (without it the mask would silently arrive as None)."""
    attention_interface = load("transformers", "AttentionInterface")
    mask_interface = load("transformers.masking_utils", "AttentionMaskInterface")
    sdpa_mask = load("transformers.masking_utils", "sdpa_mask")
    if attention_interface is None or mask_interface is None or sdpa_mask is None:
        raise CompatError(f"transformers {version()} has no AttentionInterface / AttentionMaskInterface / sdpa_mask")
    attention_interface.register(name, fn)
    mask_interface.register(name, sdpa_mask)


def sdpa_attention():
    """HF's sdpa attention function: what attn_implementation="fastbert" hands arguments it does not
    serve to."""
    fn = load("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    if fn is None:
        raise CompatError(f"transformers.integrations.sdpa_attention.sdpa_attention_forward is missing in "
                          f"transformers {version()}")
    return fn


# ----------------------------------------------------------------------------------------------
# the checks patch() runs
# ----------------------------------------------------------------------------------------------
def check_signature(fn: Callable, owner: str, names: Sequence[str]) -> List[str]:
    """Problems: parameters in `names` that `fn` does not take."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        return [f"{owner}: cannot read its signature ({e})"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    missing = [n for n in names if n not in params]
    return [f"{owner} takes no {', '.join(map(repr, missing))} in transformers {version()}"] if missing else []


def check_attributes(obj, owner: str, paths: Iterable[str]) -> List[str]:
    problems = []
    for path in paths:
        cur = obj
        for part in path.split("."):
            if not hasattr(cur, part):
                problems.append(f"{owner} has no attribute {path!r} in transformers {version()}")
                break
            cur = getattr(cur, part)
    return problems


TOUCHPOINTS: Tuple[Tuple[str, str], ...] = (
    ("embeddings", "each architecture's embedding module, called with input_ids / token_type_ids / position_ids / "
                   "inputs_embeds under the installed names (Call objects above), nothing else"),
    ("base forward", "the base model's forward parameters: bound to tell served arguments from the others"),
    ("layer layout", "attribute paths of q/k/v/output/LayerNorm/FFN modules in each layer (fastbert/hf/table.py)"),
    ("output classes", "transformers.modeling_outputs.* with last_hidden_state / hidden_states / pooler_output"),
    ("activations", "transformers.activations.ACT2CLS: the activation module a config name builds"),
    ("gradient checkpointing", "transformers.modeling_layers.GradientCheckpointingLayer (optional)"),
    ("output capturing", "transformers.utils.output_capturing hooks and collector (optional, 5.1x+)"),
    ("attention interfaces", "AttentionInterface / AttentionMaskInterface / sdpa_mask / sdpa_attention_forward"),
)
