"""Before each fused forward: is every module the fused path bypasses still what it assumes?

The fused path reads a layer's weights and never calls the HF modules inside it, so anything attached
to those modules would silently not run. `Guard.check` answers, for one patched base model and one
call, the reasons the fused path cannot serve it (empty: it can):

  structure (re-examined only after a module, parameter or buffer was assigned anywhere in the
  process, which a global registration hook counts; cheap otherwise):
    - each layer slot is what the fused ops read: q/k/v/output/FFN Linears are plain nn.Linear with
      plain Parameters, or PEFT LoRA Linears fastbert serves (fastbert/hf/peft.py); LayerNorms are
      nn.LayerNorm with weight and bias; dropouts are nn.Dropout; the containers (attention, output,
      ...) and the activation have the classes they had at patch time; the patched layer list still
      holds the twins;
  every call:
    - no forward / pre / backward hook on a bypassed module (the encoder container, every module
      inside a layer, and the HF layers the twins replaced, for hooks registered before patching),
      except transformers' own output-capturing hooks, which are inert and whose outputs the fused
      path returns itself; no replaced `forward` (accelerate's hooks); no global module hook;
    - each LoRA layer is in a state fastbert serves (adapters can be switched, merged, disabled);
    - no enclosing HF model is capturing outputs through hooks right now.

Hooks on the twins themselves (model.encoder.layer[i] after patching, e.g. the ones transformers'
gradient-checkpointing tests register) run as usual: `check` reports them so that the call runs
padded, and they see [batch, seq, hidden] hidden states as an HF layer's hooks do.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from fastbert.hf import compat, peft
from fastbert.nn import fsdp
from fastbert.nn.layers import LinearParts, get_path

_epoch = [0]
_installed = [False]


def _bump(*_args):
    _epoch[0] += 1


def install() -> None:
    """Count every module / parameter / buffer assignment in the process (public torch hooks)."""
    if _installed[0]:
        return
    from torch.nn.modules import module as M

    M.register_module_module_registration_hook(_bump)
    M.register_module_parameter_registration_hook(_bump)
    M.register_module_buffer_registration_hook(_bump)
    _installed[0] = True


def resolve_linear(module: nn.Module) -> LinearParts:
    """fastbert.nn's `resolve_linear` for patched models: plain nn.Linear or a served LoRA Linear."""
    if type(module) is nn.Linear:
        return LinearParts(module)
    parts = peft.lora_parts(module)
    if isinstance(parts, str):  # the guard keeps such a call off the fused path; direct use says why
        raise TypeError(f"fastbert: {type(module).__name__}: {parts}")
    return parts


def _plain(t, sharded_ok: bool = False) -> bool:
    return t is None or type(t) in (nn.Parameter, torch.Tensor) or (sharded_ok and fsdp.is_dtensor(t))


def linear_problem(module, sharded_ok: bool = False) -> Tuple[Optional[str], Optional[LinearParts]]:
    """(why the fused path cannot read this Linear slot, or None; its parts when it can). sharded_ok: the
    slot is in a layer fully_shard wraps, whose hook gathers plain Parameters before the fused code reads."""
    if type(module) is nn.Linear:
        parts = LinearParts(module)
    elif peft.is_peft(module):
        parts = peft.lora_parts(module)
        if isinstance(parts, str):
            return parts, None
    else:
        return f"it is a {type(module).__module__}.{type(module).__qualname__}, not an nn.Linear", None
    lin = parts.linear
    if not (_plain(lin.weight, sharded_ok) and _plain(lin.bias, sharded_ok)):
        return f"its weight is a {type(lin.weight).__name__} (quantized or sharded)", None
    return None, parts


def _layer_norm_problem(module, sharded_ok: bool = False) -> Optional[str]:
    if type(module) is not nn.LayerNorm:
        return f"it is a {type(module).__module__}.{type(module).__qualname__}, not an nn.LayerNorm"
    if (module.weight is None or module.bias is None
            or not (_plain(module.weight, sharded_ok) and _plain(module.bias, sharded_ok))):
        return "it has no plain weight and bias"
    if len(module.normalized_shape) != 1:
        return f"it normalizes over {tuple(module.normalized_shape)}, not the last dim"
    return None


def _dropout_problem(obj) -> Optional[str]:
    if obj is None or type(obj) in (nn.Dropout, float, int):
        return None
    return f"it is a {type(obj).__name__}, not an nn.Dropout"


def container_paths(layout) -> Tuple[str, ...]:
    """Every module path that holds a layer slot without being one ("attention", "attention.self", ...)."""
    slots = [layout.o, layout.ln1, layout.drop1, layout.ffn_in, layout.act, layout.ffn_out, layout.ln2,
             layout.drop2] + [f"{layout.attention}.{p}" for p in (layout.q, layout.k, layout.v)]
    out: List[str] = []
    for path in [layout.attention] + [s for s in slots if s]:
        parts = path.split(".")
        for n in range(1, len(parts) + (path == layout.attention)):
            prefix = ".".join(parts[:n])
            if prefix not in out:
                out.append(prefix)
    return tuple(out)


@dataclasses.dataclass
class _Plan:
    epoch: int
    static: List[str]
    watched: List[Tuple[str, nn.Module, dict]]
    twins: List[dict]
    lora: List[Tuple[str, nn.Module]]


class Guard:
    """The checks for one patched base model (see the module doc); `expected` holds, per layer, the
    class each container path and the activation had at patch time."""

    def __init__(self, expected: List[Dict[str, type]], encoder_type: Optional[type]):
        install()
        self.expected = expected
        self.encoder_type = encoder_type
        self._plan: Optional[_Plan] = None

    def __getstate__(self):  # a copy (deepcopy, pickle) rebuilds its plan from its own modules
        return {**self.__dict__, "_plan": None}

    def check(self, base: nn.Module, state) -> Tuple[List[str], bool]:
        """(reasons the fused path cannot serve this call, whether any twin carries hooks)."""
        plan = self._plan
        if plan is None or plan.epoch != _epoch[0]:
            plan = self._plan = self._build(base, state)
        why = list(plan.static)
        why.extend(_global_hooks())
        if any(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
               or "forward" in d for _, _, d in plan.watched):  # the common case, no hook anywhere, in one pass
            for name, module, d in plan.watched:
                why.extend(_hook_reasons(name, module, d))
        for name, module in plan.lora:
            problem, _ = linear_problem(module)
            if problem:
                why.append(f"{name}: {problem}")
        if compat.capture_active():
            why.append("an enclosing Hugging Face model is capturing outputs through hooks")
        return why, any(_user_hooks(d) for d in plan.twins)

    def _build(self, base: nn.Module, state) -> _Plan:
        epoch = _epoch[0]
        arch, layout = state.arch, state.arch.layout
        static: List[str] = []
        watched: List[Tuple[str, nn.Module, dict]] = []
        twins: List[dict] = []
        lora: List[Tuple[str, nn.Module]] = []
        if arch.layers is not None:
            enc_path = arch.layers.rsplit(".", 1)[0] if "." in arch.layers else None
            if enc_path:
                enc = get_path(base, enc_path)
                if type(enc) is not self.encoder_type:
                    static.append(f"{enc_path} is now a {type(enc).__name__}")
                watched.append((enc_path, enc, enc.__dict__))
            try:
                current = get_path(base, arch.layers)
            except AttributeError:
                current = None
            if current is not state.layer_list:
                static.append(f"{arch.layers} was replaced after patching")
        for i, twin in enumerate(state.fast):
            where = f"{arch.layers}.{i}" if arch.layers else f"layer {i}"
            if state.layer_list is not None:
                if i >= len(state.layer_list) or state.layer_list[i] is not twin:
                    static.append(f"{where} was replaced after patching")
                    continue
                orig = state.originals[i]
                watched.append((f"{where} (the Hugging Face layer it replaced)", orig, orig.__dict__))
                twins.append(twin.__dict__)
            else:
                static.extend(arch.view_problems(base, i, twin))
            static.extend(self._layer_problems(where, twin, layout, self.expected[i], lora, watched))
        return _Plan(epoch, static, watched, twins, lora)

    def _layer_problems(self, where, twin, layout, expected, lora, watched) -> List[str]:
        why = []
        for path, cls in expected.items():
            try:
                obj = twin.at(path)
            except AttributeError:
                why.append(f"{where}.{path} is gone")
                continue
            if type(obj) is not cls:
                why.append(f"{where}.{path} is a {type(obj).__name__}, not the {cls.__name__} it was when patched")
        if why:
            return why
        called: Set[int] = set()
        sharded = fsdp.is_sharded_module(twin)
        att = layout.attention
        for path in [f"{att}.{layout.q}", f"{att}.{layout.k}", f"{att}.{layout.v}", layout.o, layout.ffn_in,
                     layout.ffn_out]:
            module = twin.at(path)
            problem, parts = linear_problem(module, sharded)
            if problem:
                why.append(f"{where}.{path}: {problem}")
                continue
            if parts.linear is not module:  # a LoRA layer: its state is re-read at every call
                lora.append((f"{where}.{path}", module))
                called.update(id(m) for m in peft.called_modules(parts))
        for path in (layout.ln1, layout.ln2):
            problem = _layer_norm_problem(twin.at(path), sharded)
            if problem:
                why.append(f"{where}.{path}: {problem}")
        for path in (layout.drop1, layout.drop2, f"{att}.{layout.attn_dropout}" if layout.attn_dropout else None):
            if path:
                problem = _dropout_problem(twin.at(path))
                if problem:
                    why.append(f"{where}.{path}: {problem}")
        if twin._act_kind is None:  # the activation module is called as it is: its hooks run
            act = twin.at(layout.act)
            if isinstance(act, nn.Module):
                called.update(id(m) for m in act.modules())
        for name, module in twin.named_modules(prefix=where):
            if module is twin or id(module) in called:
                continue
            watched.append((name, module, module.__dict__))
        return why


_HOOK_KINDS = (("_forward_hooks", "a forward hook"), ("_forward_pre_hooks", "a forward pre-hook"),
               ("_backward_hooks", "a backward hook"), ("_backward_pre_hooks", "a backward pre-hook"))


def _hook_reasons(name: str, module: nn.Module, d: dict) -> List[str]:
    why = []
    for attr, what in _HOOK_KINDS:
        hooks = d.get(attr)
        if hooks and not all(compat.is_benign_hook(h) for h in hooks.values()):
            why.append(f"{name} has {what}")
    fwd = d.get("forward")
    if fwd is not None and not compat.is_benign_forward(module, fwd):
        why.append(f"{name} has its forward replaced (e.g. by accelerate's hooks)")
    return why


def _user_hooks(d: dict) -> bool:
    """Does a twin (its __dict__) carry a hook or a replaced forward, other than fully_shard's own?"""
    if "forward" in d:
        return True
    return any(not fsdp.is_own_hook(h) for attr, _ in _HOOK_KINDS for h in (d.get(attr) or {}).values())


def _global_hooks() -> List[str]:
    from torch.nn.modules import module as M

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    if any(getattr(M, n, None) for n in names):
        return ["a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"]
    return []
