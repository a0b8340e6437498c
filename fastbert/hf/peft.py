"""PEFT LoRA layers in the fused path: which ones fastbert serves, and the updates it adds.

A `peft.tuners.lora.Linear` wraps an nn.Linear (`base_layer`) and adds, for each active adapter,
lora_B(lora_A(lora_dropout(x))) * scaling to its output. The fused layer reads the base weights (the
QKV GEMM, the bias epilogues) and adds the same updates (fastbert.nn.LowRank), so inference and
LoRA training compute what PEFT computes. Served: several active adapters, merged adapters (the base
weights already hold them), disabled adapters. Not served, so the model runs HF/PEFT's code with one
warning: LoRA variants (DoRA and the others PEFT keeps in `lora_variant`), disabled adapters that
are still merged (PEFT unmerges them inside its forward), any other PEFT layer type. Nothing here
imports peft: modules are recognised by their class's module path, so no PEFT install is needed.
"""
from __future__ import annotations

from typing import Tuple, Union

from torch import nn

from fastbert.nn.layers import LinearParts, LowRank

_LORA_MODULE = "peft.tuners.lora"


def is_peft(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


def _is_lora_linear(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear" and cls.__module__.startswith(_LORA_MODULE)


def lora_parts(module: nn.Module) -> Union[LinearParts, str]:
    """(base nn.Linear, updates) for a LoRA Linear fastbert serves, else the reason it does not."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not _is_lora_linear(module):
        return f"it is a {name} (a PEFT layer fastbert does not serve)"
    try:
        base = module.base_layer
        merged, disabled = bool(module.merged), bool(module.disable_adapters)
        active = list(module.active_adapters)
        lora_a, lora_b, drop, scaling = module.lora_A, module.lora_B, module.lora_dropout, module.scaling
    except AttributeError as e:
        return f"its PEFT version lacks an attribute fastbert reads ({e})"
    if type(base) is not nn.Linear:
        return f"its base layer is a {type(base).__name__}, not an nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (transposed weights)"
    # PEFT merges and unmerges through weight.data, unseen by version counters: the merged adapters
    # are part of the fused-weight cache key
    token = tuple(getattr(module, "merged_adapters", ()))
    if disabled:
        if merged:
            return "its adapters are disabled but merged (PEFT unmerges them in its forward)"
        return LinearParts(base, (), token)
    if merged:  # PEFT's forward: base_layer(x) alone, the weights already hold the updates
        return LinearParts(base, (), token)
    variants = getattr(module, "lora_variant", {}) or {}
    use_dora = getattr(module, "use_dora", {}) or {}
    cast = bool(getattr(module, "cast_input_dtype_enabled", True))
    terms = []
    for adapter in active:
        if adapter not in lora_a.keys():
            continue
        if adapter in variants or use_dora.get(adapter, False):
            return f"adapter {adapter!r} is a LoRA variant (DoRA or another lora_variant)"
        terms.append(LowRank(lora_a[adapter], lora_b[adapter], drop[adapter], float(scaling[adapter]), cast))
    return LinearParts(base, tuple(terms), token)


def called_modules(parts: LinearParts) -> Tuple[nn.Module, ...]:
    """The modules the fused path calls as modules for these updates (their hooks run as usual)."""
    return tuple(m for t in parts.low_rank for m in (t.a, t.b, t.dropout) if m is not None)
