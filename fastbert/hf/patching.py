"""fastbert.patch / fastbert.unpatch: swap fused twins into Hugging Face models, in place.

What patch does to each supported base model found in `model` (BertModel, RobertaModel, ..., see
fastbert/hf/table.py; a head model or a sentence-transformers wrapper holds one):
  - each encoder layer in its nn.ModuleList is replaced by a fastbert.nn.FastBertLayer that registers
    the HF layer's own children: state_dict keys, Parameter objects and storages stay the same, so an
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

Limits: a fallback call swaps the HF layers back into the module tree for its duration, so do not
run one patched model from several threads at once; a model split across devices by accelerate's
device_map is not supported (its per-layer device hooks sit on the HF layers the twins replace).

A call the kernels cannot serve (output_attentions=True, cross-attention / KV cache / decoder configs,
a 4D attention mask, an argument the fast path does not know) runs HF's original forward with the HF
layers put back for that call, and says so once per model and reason through `warnings`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Dict, List, Optional, Set

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import backends
from fastbert.hf import table
from fastbert.hf.attention import register
from fastbert.nn.layers import FastBertLayer, _get

_STATE = "_fastbert_patch"
# keyword arguments HF forwards through **kwargs that the fast path understands
_KNOWN_KWARGS = ("output_hidden_states", "output_attentions", "return_dict")


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
    warned: Set[str] = dataclasses.field(default_factory=set)
    fast_calls: int = 0
    fallback_calls: int = 0


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------
def patch(model: nn.Module, *, backend: Optional[str] = None, padding_free: bool = True, strict: bool = True) -> nn.Module:
    """Patch `model` in place (see the module doc) and return it.

    backend: None lets each op choose; a name ("triton", "cuda", "cpu", "torch") forces it inside the
    patched forward (fastbert.use_backend). padding_free: pack real tokens (see module doc).
    strict: an unsupported model raises UnsupportedModelError (a TypeError) listing the supported
    architectures; strict=False leaves it untouched with one warning. Patching twice is a no-op
    (the options of the second call replace the first's).
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
    found = []
    for m in model.modules():
        if any(m is f or _is_inside(m, f) for f in found):
            continue
        arch = table.find_architecture(m)
        if arch is not None:
            found.append(m)
            state = m.__dict__.get(_STATE)
            if state is not None:
                state.backend, state.padding_free = backend, padding_free
            else:
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


def _patch_base(base: nn.Module, arch: table.Architecture, backend, padding_free) -> None:
    if arch.layers is None:  # no layer modules to swap: twins of per-layer views, kept in the state
        layer_list, originals = None, []
        fast = [FastBertLayer.from_hf(v, arch.layout, config=base.config) for v in arch.layer_views(base)]
        _finish_patch(base, arch, backend, padding_free, layer_list, originals, fast)
        return
    layer_list = _get(base, arch.layers)
    originals = list(layer_list)
    fast = []
    for layer in originals:
        f = FastBertLayer.from_hf(layer, arch.layout, config=base.config)
        f.gradient_checkpointing = bool(getattr(layer, "gradient_checkpointing", False))
        f.train(layer.training)
        fast.append(f)
    _finish_patch(base, arch, backend, padding_free, layer_list, originals, fast)


def _finish_patch(base, arch, backend, padding_free, layer_list, originals, fast) -> None:
    sig = inspect.signature(type(base).forward)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    state = _PatchState(arch, layer_list, originals, fast, backend, padding_free, sig, var_kw)
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
    for m in list(model.modules()):
        state = m.__dict__.get(_STATE)
        if state is None:
            continue
        for i, (orig, f) in enumerate(zip(state.originals, state.fast)):
            _sync_flags(f, orig)
            state.layer_list[i] = orig
        m.__dict__.pop("forward", None)
        del m.__dict__[_STATE]
    return model


def is_patched(model: nn.Module) -> bool:
    return any(_STATE in m.__dict__ for m in model.modules())


def _sync_flags(src: nn.Module, dst: nn.Module) -> None:
    dst.training = src.training
    if hasattr(dst, "gradient_checkpointing"):
        dst.gradient_checkpointing = bool(getattr(src, "gradient_checkpointing", False))


# ----------------------------------------------------------------------------------------------
# the patched forward
# ----------------------------------------------------------------------------------------------
def _fallback_reasons(base: nn.Module, state: _PatchState, a: Dict[str, Any], extra: Dict[str, Any]) -> List[str]:
    cfg = base.config
    arch = state.arch
    why = list(arch.config_reasons(base))
    for name, val in a.items():
        if name in arch.args or val is None:
            continue
        if name == "use_cache" and (not val or not getattr(cfg, "is_decoder", False)):
            continue  # HF ignores use_cache in encoder configurations, and so can the fast path
        why.append(f"{name} is given")
    for name, val in extra.items():
        if name not in _KNOWN_KWARGS and val is not None:
            why.append(f"argument {name!r} is not served by the fused path")
    out_att = extra.get("output_attentions")
    if out_att is None:
        out_att = getattr(cfg, "output_attentions", False)
    if out_att:
        why.append("output_attentions=True (the fused attention never materializes the probabilities)")
    ohs = extra.get("output_hidden_states")
    if ohs is not None and not isinstance(ohs, bool):
        why.append("output_hidden_states selects layers by index")
    mask = a.get("attention_mask")
    if mask is not None:
        ref = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or ref is None or tuple(mask.shape) != tuple(ref.shape[:2]):
            why.append("attention_mask is not a [batch, seq] padding mask")
    if (a.get("input_ids") is None) == (a.get("inputs_embeds") is None):
        why.append("exactly one of input_ids / inputs_embeds must be given (HF raises the error)")
    return why


def _warn_once(base: nn.Module, state: _PatchState, reasons: List[str]) -> None:
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
    for name in _KNOWN_KWARGS:  # explicit parameters in some models (XLM/FlauBERT), **kwargs in others
        if name in a:
            extra[name] = a.pop(name)
    reasons = _fallback_reasons(self, state, a, extra)
    if reasons:
        _warn_once(self, state, reasons)
        return _fallback(self, state, args, kwargs)
    ctx = backends.use_backend(state.backend) if state.backend is not None else contextlib.nullcontext()
    with ctx:
        return _fast_forward(self, state, a, extra)


def _fallback(self: nn.Module, state: _PatchState, args, kwargs):
    state.fallback_calls += 1
    if state.layer_list is None:  # nothing was swapped: HF's forward runs HF's modules as they are
        return type(self).forward(self, *args, **kwargs)
    for i, (orig, f) in enumerate(zip(state.originals, state.fast)):
        _sync_flags(f, orig)
        state.layer_list[i] = orig
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        for i, f in enumerate(state.fast):
            state.layer_list[i] = f


def _pack_plan(valid: torch.Tensor):
    """(indices of real tokens in the flattened [B*S], cu_seqlens int32 [B+1], max_seqlen, total) from a
    boolean [B, S] mask. Reading (total, max_seqlen) to the host is the one sync of a forward: the sizes
    of the packed tensors and the attention grid depend on them."""
    seqlens = valid.sum(1, dtype=torch.int32)
    total, max_len = (int(t) for t in torch.stack([seqlens.sum(), seqlens.max()]).tolist())
    flat = valid.reshape(-1)
    if hasattr(torch, "nonzero_static"):
        idx = torch.nonzero_static(flat, size=total).reshape(-1)  # size known: no second sync
    else:  # pragma: no cover
        idx = flat.nonzero().reshape(-1)
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return idx, cu, max_len, total


def _fast_forward(self: nn.Module, state: _PatchState, a: Dict[str, Any], extra: Dict[str, Any]):
    import transformers.modeling_outputs as mo

    cfg = self.config
    arch = state.arch
    state.fast_calls += 1
    mask = arch.derive_mask(self, a) if arch.derive_mask is not None else a.get("attention_mask")
    h = arch.embed(self, a, mask)  # [B, S, hidden]
    B, S, H = h.shape
    want_hs = extra.get("output_hidden_states")
    if want_hs is None:
        want_hs = bool(getattr(cfg, "output_hidden_states", False))
    return_dict = extra.get("return_dict")
    if return_dict is None:
        return_dict = getattr(cfg, "return_dict", True)

    valid = None
    plan = None
    if mask is not None and B * S > 0:
        valid = mask if mask.dtype == torch.bool else mask != 0
        valid = valid.to(h.device)
        if state.padding_free:
            plan = _pack_plan(valid)
            if plan[3] == B * S:  # no padding at all: run padded, no mask, no gather
                plan, valid = None, None
    hs = [h] if want_hs else None
    if plan is not None:
        idx, cu, max_len, _ = plan

        def unpack(t):
            return t.new_zeros(B * S, t.shape[-1]).index_copy(0, idx, t).view(B, S, t.shape[-1])

        x = h.reshape(B * S, H).index_select(0, idx)
        for layer in state.fast:
            x = layer(x, cu_seqlens=cu, max_seqlen=max_len)
            if hs is not None:
                hs.append(unpack(x))
        seq = hs[-1] if hs is not None and len(state.fast) else unpack(x)
    else:
        x = h
        zero = valid[..., None] if (arch.zero_padding and valid is not None) else None
        for layer in state.fast:
            x = layer(x, valid)
            if zero is not None:  # the model defines its padding positions as 0 after every layer
                x = x * zero.to(x.dtype)
            if hs is not None:
                hs.append(x)
        seq = x

    fields = {"last_hidden_state": seq}
    if hs is not None:
        fields["hidden_states"] = tuple(hs)
    if arch.pooler is not None:
        pooler = getattr(self, arch.pooler, None)
        fields["pooler_output"] = pooler(seq) if pooler is not None else None
    out = getattr(mo, arch.output)(**fields)
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
                lines.append(f"{where}: {type(m).__name__} ({arch.name}) NOT patched: HF code runs")
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
