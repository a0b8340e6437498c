"""What the fused layers and the patching need to know about FSDP (torch.distributed.fsdp), in one place.

FSDP2's `fully_shard` keeps each parameter sharded (a DTensor) between uses; the forward pre-hook of the
module it was applied to all-gathers it into an unsharded Parameter that is the SAME object at every
gather, its storage freed after use and refilled by the next gather with its version counter preserved
(FSDP copies under torch.autograd._unsafe_preserve_version_counter). Identity, `_version` and even
`data_ptr` can then stay the same across an optimizer step, so a cache keyed on them (the fused QKV
weight, the packed CPU GEMM weights) could hand back the weights from before the step: the fused
layers keep no weight cache for a module FSDP manages (`managed`), and build the fused weight each call.

Everything here reads public torch API or falls back to "not FSDP's" (the slower, still exact answer).
"""
from __future__ import annotations

import sys

from torch import nn


def _fsdp_classes():
    """(FSDPModule, FSDPState), or Nones. Nothing is FSDP's until torch.distributed.fsdp is imported, so
    fastbert never imports it itself (it pulls in DTensor: a slower `import fastbert`)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return None, None
    try:  # public since torch 2.6
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = None
    try:  # the state whose bound methods are the hooks fully_shard registers (private: probed)
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - a torch that moved it: FSDP's hooks count as user hooks
        FSDPState = None
    return FSDPModule, FSDPState


def managed(module: nn.Module) -> bool:
    """Does FSDP (fully_shard or the FullyShardedDataParallel wrapper) manage this module's parameters?
    Both set `_is_fsdp_managed_module` on every module they manage (for torch.compile)."""
    return bool(module.__dict__.get("_is_fsdp_managed_module", False))


def is_sharded_module(module: nn.Module) -> bool:
    """Was fully_shard applied to this very module (its hooks gather its parameters)?"""
    cls = _fsdp_classes()[0]
    return cls is not None and isinstance(module, cls)


def is_own_hook(hook) -> bool:
    """Is this forward (pre-)hook one fully_shard registered? Those gather and free parameters and
    cast inputs, whatever the layout of the hidden states, so a fused layer can keep its packed layout."""
    cls = _fsdp_classes()[1]
    return cls is not None and isinstance(getattr(hook, "__self__", None), cls)


def is_dtensor(t) -> bool:
    """A DTensor: what fully_shard leaves as a parameter between uses."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def wrapper_of(model: nn.Module):
    """(name, module) of the first module in `model` FSDP already manages or wraps, else None."""
    for name, m in model.named_modules():
        if managed(m) or is_sharded_module(m) or type(m).__name__ == "FullyShardedDataParallel":
            return name or "(model)", m
    return None
