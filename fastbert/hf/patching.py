"""fastbert.patch / fastbert.unpatch: swap fused twins into Hugging Face models, in place.

What patch does to each supported base model found in `model` (BertModel, RobertaModel, ..., see
fastbert/hf/table.py; a head model, a PEFT model or a sentence-transformers wrapper holds one):
  - it checks the transformers touchpoints the model needs (fastbert/hf/compat.py); if one does not
    match, the model is left as it is, with one warning naming it (and `explain` says why);
  - each encoder layer in its nn.ModuleList is replaced by a twin (HFFastBertLayer: a
    fastbert.nn.FastBertLayer that is also a transformers GradientCheckpointingLayer) registering the
    HF layer's own children: state_dict keys, Parameter objects and storages stay the same, so an
    existing optimizer, save_pretrained and load_state_dict keep working;
  - XLM / FlauBERT have no layer modules (four parallel ModuleLists): their twins live beside the
    model, in the patch state, and the module tree is left exactly as it was;
  - the base model's `forward` is overridden on the instance by the fast path below (the class is
    untouched); unpatch deletes the override and puts the HF layers back.

The fast path: embeddings (HF's module) -> [pack] -> fused layers -> [unpack] -> pooler (HF's module).
Padding-free (padding_free=True, the default): with an attention mask that has padding, the real tokens
are gathered ONCE after the embeddings into [total_tokens, hidden], every layer runs on them with the
varlen attention (cu_seqlens), and the padding is restored ONCE at the end. The single host sync of a
forward is reading (total_tokens, max_seqlen) from the mask; no layer syncs.

Padding positions of the outputs (documented behaviour):
  - padding_free=True: last_hidden_state and hidden_states[1:] hold 0 at padding positions;
    hidden_states[0] is the embedding output, exactly as HF returns it (padding included);
  - padding_free=False: the layers run padded with a key mask, so padding positions hold what HF
    computes there (a padding query still attends to the real keys); XLM / FlauBERT define them as 0
    after every layer, in both modes, as HF does;
  - a sequence with no real token gives finite values (0 from attention), never NaN.
A head that reads a padding position sees 0 there in padding-free mode: BERT's pooler reads position
0, which is a real token with right padding (what BERT tokenizers do); for LEFT-padded batches use
padding_free=False, which reproduces HF at every position.

What each call runs (checked per call, see fastbert/hf/guard.py for the module checks):
  - served by the fused path: the table's arguments, `output_hidden_states` (True, or, where
    transformers supports it, indices selecting layers: unselected entries are None), `return_dict`,
    arguments that do not change the encoder's math (num_items_in_batch and the other loss arguments
    the Trainer and heads pass down, use_cache in encoder configurations), PEFT LoRA layers, hooks on
    the twins themselves (the call then runs padded, so they see [batch, seq, hidden]), HF's
    gradient checkpointing (the twins are the GradientCheckpointingLayers it finds and calls);
  - run on HF's original code with the HF layers put back for that call, said once per model and
    reason through `warnings`: output_attentions=True, cross-attention / KV cache / decoder configs,
    a 4D attention mask, an argument the fast path does not know, a hook or replaced forward on a
    module the fused path bypasses, a module that is not what the fused path reads (a quantized or
    subclassed Linear or LayerNorm, an unsupported PEFT layer).

Limits: a fallback call swaps the HF layers back into the module tree for its duration, so do not
run one patched model from several threads at once; a model split across devices by accelerate's
device_map is run on HF's code (its per-module hooks are replaced forwards).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Dict, List, Optional, Set

import torch
from torch import nn

from fastbert import backends
from fastbert.hf import compat, guard, table
from fastbert.hf.attention import register
from fastbert.nn import fsdp, padding
from fastbert.nn.layers import FastBertLayer, get_path

_STATE = "_fastbert_patch"
_REFUSED = "_fastbert_not_patched"  # touchpoint problems that kept a model unpatched, for explain()
# keyword arguments HF passes down that the fused path serves itself
_SERVED_KWARGS = ("output_hidden_states", "output_attentions", "return_dict")
# keyword arguments HF passes down that do not change what the encoder computes: loss arguments the
# Trainer and the heads forward to the base model, flags of outputs a BERT encoder does not have
_NEUTRAL_KWARGS = ("num_items_in_batch", "shift_labels", "output_router_logits", "return_loss")

_GCL = compat.gradient_checkpointing_layer()
if _GCL is not None:
    class HFFastBertLayer(FastBertLayer, _GCL):
        """The twin patch() puts in a Hugging Face model: a FastBertLayer that is also a transformers
        GradientCheckpointingLayer, so HF's activation checkpointing finds it, sets its flags and
        checkpointing function, and runs it through that function (with HF's own checkpoint options);
        the layer therefore does not checkpoint itself (`_outer_checkpointing`)."""

        _outer_checkpointing = True
else:  # pragma: no cover - transformers without GradientCheckpointingLayer: the twin checkpoints itself
    class HFFastBertLayer(FastBertLayer):
        """The twin patch() puts in a Hugging Face model (see FastBertLayer)."""


class UnsupportedModelError(TypeError):
    """patch(strict=True) found no supported base model; the message lists the supported ones."""


@dataclasses.dataclass
class _PatchState:
    arch: table.Architecture
    layer_list: Optional[nn.ModuleList]   # None: the twins live beside the model (XLM/FlauBERT)
    originals: List[nn.Module]
    fast: List[FastBertLayer]
    backend: Optional[str]
    padding_free: bool
    signature: inspect.Signature
    var_kw: Optional[str]
    embed_names: Dict[str, Any]
    output: type
    guard: guard.Guard
    warned: Set[str] = dataclasses.field(default_factory=set)
    fast_calls: int = 0
    fallback_calls: int = 0


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------
def patch(model: nn.Module, *, backend: Optional[str] = None, padding_free: bool = True,
          strict: bool = True) -> nn.Module:
    """Patch `model` in place (see the module doc) and return it.

    backend: None lets each op choose; a name ("triton", "cuda", "cpu", "torch") forces it inside the
    patched forward (fastbert.use_backend). padding_free: pack real tokens (see module doc).
    strict: an unsupported model raises UnsupportedModelError (a TypeError) listing the supported
    architectures; strict=False leaves it untouched with one warning. Patching twice is a no-op
    (the options of the second call replace the first's). A supported model whose transformers
    touchpoints do not match this transformers version is left untouched with one warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"fastbert.patch: backend must be None or one of {', '.join(backends.BACKENDS)}, "
                         f"got {backend!r}")
    if not isinstance(padding_free, bool):
        raise TypeError(f"fastbert.patch: padding_free must be a bool, got {type(padding_free).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"fastbert.patch: strict must be a bool, got {type(strict).__name__}")
    register()
    compat.warn_if_outside_range()
    found = []
    for m in model.modules():
        if any(m is f or _is_inside(m, f) for f in found):
            continue
        arch = table.find_architecture(m)
        if arch is None:
            continue
        found.append(m)
        state = m.__dict__.get(_STATE)
        if state is not None:
            state.backend, state.padding_free = backend, padding_free
            continue
        wrapped = fsdp.wrapper_of(m)
        if wrapped is not None:
            raise RuntimeError(
                f"fastbert.patch: {type(m).__name__} is already under FSDP ({wrapped[0]} is a "
                f"{type(wrapped[1]).__name__} managed by FSDP): call fastbert.patch(model) BEFORE fully_shard, then "
                "fully_shard the patched layers and the root (patching swaps the layer modules FSDP wraps)")
        problems = _touchpoint_problems(m, arch)
        if problems:
            m.__dict__[_REFUSED] = problems
            warnings.warn(f"fastbert: {type(m).__name__} is left to Hugging Face's code: transformers "
                          f"{compat.version()} does not match what fastbert relies on: {'; '.join(problems)}",
                          UserWarning, stacklevel=2)
            continue
        m.__dict__.pop(_REFUSED, None)
        _patch_base(m, arch, backend, padding_free)
    if not found:
        msg = (f"fastbert.patch: {type(model).__name__} holds no supported model; supported: "
               + "; ".join(table.supported_names()))
        if strict:
            raise UnsupportedModelError(msg)
        warnings.warn(msg + ". The model is left untouched (strict=False).", UserWarning, stacklevel=2)
    return model


def _is_inside(m: nn.Module, parent: nn.Module) -> bool:
    return any(m is c for c in parent.modules())


def _layer_modules(base: nn.Module, arch: table.Architecture) -> List[nn.Module]:
    return list(arch.layer_views(base)) if arch.layers is None else list(get_path(base, arch.layers))


def _touchpoint_problems(base: nn.Module, arch: table.Architecture) -> List[str]:
    """What of the transformers code this model runs does not match fastbert's touchpoints (compat)."""
    name = type(base).__name__
    fwd = base.__dict__.get("forward")
    if fwd is not None and not compat.is_benign_forward(base, fwd):
        # patching replaces the instance forward: whatever wrapped it (accelerate's hooks) would be lost
        return [f"{name}'s forward is already replaced (e.g. by accelerate's hooks)"]
    problems = compat.check_signature(type(base).forward, f"{name}.forward", arch.args)
    problems += compat.check_attributes(base, name, arch.attributes + ((arch.layers,) if arch.layers else ()))
    if arch.embeddings is not None:
        emb = getattr(base, "embeddings", None)
        if emb is None:
            problems.append(f"{name} has no embeddings module")
        else:
            try:
                arch.embeddings.resolve(emb.forward)
            except compat.CompatError as e:
                problems.append(str(e))
    fields = ["last_hidden_state", "hidden_states"] + (["pooler_output"] if arch.pooler else [])
    try:
        compat.output_class(arch.output, fields)
    except compat.CompatError as e:
        problems.append(str(e))
    if problems:
        return problems
    home = arch.layer[0]  # the modeling module whose classes the layout describes
    for i, layer in enumerate(_layer_modules(base, arch)):
        where = f"{arch.layers}.{i}" if arch.layers else f"layer {i}"
        if arch.layers is not None and type(layer).__module__ != home:
            problems.append(f"{where} is a {type(layer).__qualname__} from {type(layer).__module__}, not {home}")
            continue
        for path in guard.container_paths(arch.layout):
            try:
                obj = get_path(layer, path)
            except AttributeError:
                problems.append(f"{where} has no {path!r} in transformers {compat.version()}")
                continue
            if isinstance(obj, nn.Module) and type(obj).__module__ != home:
                problems.append(f"{where}.{path} is a {type(obj).__qualname__} from {type(obj).__module__}, "
                                f"not {home}")
        problems += compat.check_attributes(layer, where, [arch.layout.o, arch.layout.ln1, arch.layout.ffn_in,
                                                           arch.layout.act, arch.layout.ffn_out, arch.layout.ln2])
        problems += _activation_problems(base, arch, layer, where)
    return problems


def _activation_problems(base, arch, layer, where) -> List[str]:
    """The activation module is the one the config names (the fused path computes it from the name)."""
    act = get_path(layer, arch.layout.act)
    names = [getattr(base.config, n, None) for n in arch.layout.act_config]
    name = next((n for n in names if isinstance(n, str)), None)
    if name is None or not isinstance(act, nn.Module):
        return []
    cls = compat.activation_class(name)
    if cls is not None and type(act) is not cls:
        return [f"{where}.{arch.layout.act} is a {type(act).__name__}, but config activation {name!r} builds "
                f"{cls.__name__}"]
    return []


def _expected_types(layer: nn.Module, arch: table.Architecture) -> Dict[str, type]:
    out = {path: type(get_path(layer, path)) for path in guard.container_paths(arch.layout)}
    act = get_path(layer, arch.layout.act)
    if isinstance(act, nn.Module):
        out[arch.layout.act] = type(act)
    return out


def _patch_base(base: nn.Module, arch: table.Architecture, backend, padding_free) -> None:
    layers = _layer_modules(base, arch)
    expected = [_expected_types(layer, arch) for layer in layers]
    if arch.layers is None:  # no layer modules to swap: twins of per-layer views, kept in the state
        layer_list, originals, encoder_type = None, [], None
        fast = [FastBertLayer.from_hf(v, arch.layout, config=base.config, resolve_linear=guard.resolve_linear)
                for v in layers]
    else:
        layer_list = get_path(base, arch.layers)
        originals = layers
        encoder_type = type(get_path(base, arch.layers.rsplit(".", 1)[0])) if "." in arch.layers else None
        fast = []
        for layer in originals:
            f = HFFastBertLayer.from_hf(layer, arch.layout, config=base.config, resolve_linear=guard.resolve_linear)
            _sync_flags(layer, f)
            fast.append(f)
    sig = inspect.signature(type(base).forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    names = arch.embeddings.resolve(base.embeddings.forward) if arch.embeddings is not None else {}
    fields = ["last_hidden_state", "hidden_states"] + (["pooler_output"] if arch.pooler else [])
    state = _PatchState(arch, layer_list, originals, fast, backend, padding_free, sig, var_kw, names,
                        compat.output_class(arch.output, fields), guard.Guard(expected, encoder_type))
    if layer_list is not None:
        for i, f in enumerate(fast):
            layer_list[i] = f
    base.__dict__[_STATE] = state
    base.forward = _PatchedForward(base)


class _PatchedForward:
    """The instance-level `forward` of a patched base model. A small object rather than a bound method
    so that the model still pickles and deep-copies (a bound method pickles as getattr(model, its
    function's name)), and so that inspect.signature(model.forward) still shows HF's parameters (the
    Trainer reads it to pick dataset columns)."""

    def __init__(self, base: nn.Module):
        self.base = base

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.base).forward.__get__(self.base))

    def __call__(self, *args, **kwargs):
        return _patched_forward(self.base, *args, **kwargs)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo fastbert.patch: the HF layers go back in place and the forward override is removed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    modules = list(model.modules())
    for m in modules:  # refuse before changing anything
        state = m.__dict__.get(_STATE)
        sharded = [i for i, f in enumerate(state.fast) if fsdp.is_sharded_module(f)] if state else []
        if sharded:  # the HF layers are not what fully_shard wrapped: their parameters would stay sharded
            raise RuntimeError(f"fastbert.unpatch: the fused layers {sharded} of {type(m).__name__} are sharded by "
                               "FSDP's fully_shard; unpatch before sharding (or shard an unpatched copy)")
    for m in modules:
        m.__dict__.pop(_REFUSED, None)
        state = m.__dict__.get(_STATE)
        if state is None:
            continue
        _restore_originals(state)
        m.__dict__.pop("forward", None)
        del m.__dict__[_STATE]
    return model


def is_patched(model: nn.Module) -> bool:
    return any(_STATE in m.__dict__ for m in model.modules())


_CHECKPOINT_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")


def _sync_flags(src: nn.Module, dst: nn.Module) -> None:
    dst.training = src.training
    for attr in _CHECKPOINT_ATTRS:
        if attr in src.__dict__ or (attr == "gradient_checkpointing" and hasattr(dst, attr)):
            setattr(dst, attr, getattr(src, attr, False))


def _restore_originals(state: _PatchState) -> List[int]:
    """Put the HF layers back where the twins still are, carrying over what changed on the twins (flags,
    and children replaced on a twin after patching, so HF's code runs the same modules the fused path
    read); a slot that holds something else now (a module put there after patching) is left as it is.
    Returns the slots restored."""
    if state.layer_list is None:
        return []
    restored = []
    for i, (orig, f) in enumerate(zip(state.originals, state.fast)):
        if i >= len(state.layer_list) or state.layer_list[i] is not f:
            continue
        for name, child in f.named_children():
            if orig._modules.get(name) is not child:
                setattr(orig, name, child)
        _sync_flags(f, orig)
        state.layer_list[i] = orig
        restored.append(i)
    return restored


# ----------------------------------------------------------------------------------------------
# the patched forward
# ----------------------------------------------------------------------------------------------
def _fallback_reasons(base: nn.Module, state: _PatchState, a: Dict[str, Any], extra: Dict[str, Any]) -> List[str]:
    cfg = base.config
    arch = state.arch
    why = list(arch.config_reasons(base))
    for name, val in list(a.items()) + [(k, v) for k, v in extra.items() if k == "use_cache"]:
        if name in arch.args or val is None:
            continue
        if name == "use_cache" and (not val or not getattr(cfg, "is_decoder", False)):
            continue  # HF ignores use_cache in encoder configurations, and so can the fast path
        why.append(f"{name} is given")
    for name, val in extra.items():
        if name not in _SERVED_KWARGS + _NEUTRAL_KWARGS + ("use_cache",) and val is not None:
            why.append(f"argument {name!r} is not served by the fused path")
    out_att = extra.get("output_attentions")
    if out_att is None:
        out_att = getattr(cfg, "output_attentions", False)
    if out_att:
        why.append("output_attentions=True (the fused attention never materializes the probabilities)")
    ohs = extra.get("output_hidden_states")
    if ohs is not None and not isinstance(ohs, (bool, int, list, tuple)):
        why.append(f"output_hidden_states is a {type(ohs).__name__}")
    mask = a.get("attention_mask")
    if mask is not None:
        ref = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        if (not isinstance(mask, torch.Tensor) or mask.dim() != 2 or ref is None
                or tuple(mask.shape) != tuple(ref.shape[:2])):
            why.append("attention_mask is not a [batch, seq] padding mask")
    if (a.get("input_ids") is None) == (a.get("inputs_embeds") is None):
        why.append("exactly one of input_ids / inputs_embeds must be given (HF raises the error)")
    return why


def _note_fallback(base: nn.Module, state: _PatchState, reasons: List[str]) -> None:
    """Warn once per model and set of reasons."""
    key = "; ".join(reasons)
    if key in state.warned:
        return
    state.warned.add(key)
    warnings.warn(f"fastbert: {type(base).__name__} runs Hugging Face's original code for this call because "
                  f"{key}. (Said once per model and reason.)", UserWarning, stacklevel=4)


def _patched_forward(self: nn.Module, *args, **kwargs):
    state: _PatchState = self.__dict__[_STATE]
    try:
        bound = state.signature.bind(self, *args, **kwargs)
    except TypeError:
        return _fallback(self, state, args, kwargs)  # let HF raise its own error
    a = dict(bound.arguments)
    a.pop("self", None)
    extra = dict(a.pop(state.var_kw, {}) or {}) if state.var_kw else {}
    for name in _SERVED_KWARGS:  # explicit parameters in some models (XLM/FlauBERT), **kwargs in others
        if name in a:
            extra[name] = a.pop(name)
    reasons = _fallback_reasons(self, state, a, extra)
    module_reasons, twin_hooks = state.guard.check(self, state)
    reasons += module_reasons
    if reasons:
        sharded = [i for i, f in enumerate(state.fast) if fsdp.is_sharded_module(f)]
        if sharded:
            # HF's layers are not what fully_shard wrapped: their parameters would stay sharded
            raise RuntimeError(
                f"fastbert: {type(self).__name__} cannot run Hugging Face's code for this call (because "
                f"{'; '.join(reasons)}): its fused layers {sharded} are sharded by FSDP's fully_shard. Avoid what "
                "needs HF's code, or shard the model unpatched (fastbert.unpatch before fully_shard).")
        _note_fallback(self, state, reasons)
        return _fallback(self, state, args, kwargs)
    ctx = backends.use_backend(state.backend) if state.backend is not None else contextlib.nullcontext()
    with ctx:
        return _fast_forward(self, state, a, extra, padded=twin_hooks or not state.padding_free)


def _fallback(self: nn.Module, state: _PatchState, args, kwargs):
    state.fallback_calls += 1
    if state.layer_list is None:  # nothing was swapped: HF's forward runs HF's modules as they are
        return type(self).forward(self, *args, **kwargs)
    restored = _restore_originals(state)
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for i in restored:
            _sync_flags(state.originals[i], state.fast[i])
            state.layer_list[i] = state.fast[i]


def _fast_forward(self: nn.Module, state: _PatchState, a: Dict[str, Any], extra: Dict[str, Any], padded: bool):
    cfg = self.config
    arch = state.arch
    state.fast_calls += 1
    mask = arch.derive_mask(self, a) if arch.derive_mask is not None else a.get("attention_mask")
    h = arch.embed(self, a, mask, state.embed_names)  # [B, S, hidden]
    B, S, _ = h.shape
    want_hs = extra.get("output_hidden_states")
    if want_hs is None:
        want_hs = getattr(cfg, "output_hidden_states", False)
    n_states = len(state.fast) + 1
    selected = compat.select_hidden_states(want_hs, n_states) if want_hs else None
    return_dict = extra.get("return_dict")
    if return_dict is None:
        return_dict = getattr(cfg, "return_dict", True)

    valid = None
    plan = None
    if mask is not None and B * S > 0:
        valid = mask if mask.dtype == torch.bool else mask != 0
        valid = valid.to(h.device)
        if not padded:
            plan = padding.plan(valid)
            if not plan.has_padding:  # no padding at all: run padded, no mask, no gather
                plan, valid = None, None
    hs = None
    if want_hs:
        hs = [h if selected is None or 0 in selected else None]

    def keep(i):  # is hidden state i returned?
        return hs is not None and (selected is None or i in selected)

    if plan is not None:
        x = padding.pack(h, plan)
        for i, layer in enumerate(state.fast, 1):
            x = layer(x, cu_seqlens=plan.cu_seqlens, max_seqlen=plan.max_seqlen)
            if hs is not None:
                hs.append(padding.unpack(x, plan) if keep(i) else None)
        seq = hs[-1] if hs is not None and hs[-1] is not None and len(state.fast) else padding.unpack(x, plan)
    else:
        x = h
        zero = valid[..., None] if (arch.zero_padding and valid is not None) else None
        for i, layer in enumerate(state.fast, 1):
            x = layer(x, valid)
            if zero is not None:  # the model defines its padding positions as 0 after every layer
                x = x * zero.to(x.dtype)
            if hs is not None:
                hs.append(x if keep(i) else None)
        seq = x

    fields = {"last_hidden_state": seq}
    if hs is not None:
        fields["hidden_states"] = tuple(hs)
    if arch.pooler is not None:
        pooler = getattr(self, arch.pooler, None)
        fields["pooler_output"] = pooler(seq) if pooler is not None else None
    out = state.output(**fields)
    return out if return_dict else out.to_tuple()


# ----------------------------------------------------------------------------------------------
# explain
# ----------------------------------------------------------------------------------------------
def explain_model(model: nn.Module) -> List[str]:
    """One line per supported base model in `model` (patched or not) and per fused layer."""
    lines = []
    for name, m in model.named_modules():
        state = m.__dict__.get(_STATE)
        where = name or "(model)"
        if state is None:
            arch = table.find_architecture(m) if isinstance(m, nn.Module) else None
            if arch is not None:
                refused = m.__dict__.get(_REFUSED)
                lines.append(f"{where}: {type(m).__name__} ({arch.name}) NOT patched: HF code runs"
                             + (f" (transformers {compat.version()}: {'; '.join(refused)})" if refused else ""))
            continue
        lines.append(
            f"{where}: {type(m).__name__} patched as {state.arch.name}; backend "
            f"{state.backend or 'chosen per op'}; padding_free={state.padding_free}; "
            f"{state.fast_calls} fused call(s), {state.fallback_calls} call(s) on HF's code"
            + (f" (because {'; '.join(sorted(state.warned))})" if state.warned else ""))
        for i, f in enumerate(state.fast):
            at = f"{where}.{state.arch.layers}.{i}" if state.arch.layers else f"{where} layer {i} (beside the model)"
            ran = ", ".join(f"{op} on {d.backend}" + (" (forced)" if d.forced else "")
                            for op, d in f.last_backends.items())
            lines.append(f"  {at}: FastBertLayer({f.extra_repr()})" + (f"; last run: {ran}" if ran else ""))
    if not lines:
        lines.append(f"{type(model).__name__}: no supported Hugging Face model inside (nothing patched)")
    return lines
