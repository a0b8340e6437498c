"""Shared plumbing of the op front ends: argument checks, output allocation, kernel lookup."""
from __future__ import annotations

import importlib
from typing import Iterable, List, Optional, Sequence

import torch

from fastbert import _runtime, backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



# ----------------------------------------------------------------------------------------------
# argument checks: TypeError for the wrong kind of thing, ValueError for the wrong shape/value
# ----------------------------------------------------------------------------------------------
def check_tensor(name: str, t, *, op: str, ndim: Optional[Iterable[int]] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"fastbert.ops.{op}: {name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastbert.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes and t.dtype not in dtypes:
        raise TypeError(f"fastbert.ops.{op}: {name} has dtype {t.dtype}; expected one of "
                        + ", ".join(str(d) for d in dtypes))
    if ndim is not None:
        ndim = tuple(ndim)
        if t.dim() not in ndim:
            want = " or ".join(str(n) for n in ndim)
            raise ValueError(f"fastbert.ops.{op}: {name} must have {want} dims, got shape {tuple(t.shape)}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"fastbert.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_float(op: str, name: str, value, *, lo: float, hi: float, lo_open: bool = False,
                hi_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fastbert.ops.{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"fastbert.ops.{op}: {name} must be in {lb}{lo}, {hi}{rb}, got {value}")
    return value


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"fastbert.ops.{op}: {name} has dtype {t.dtype}, expected {ref_name}'s dtype {ref.dtype}")


def check_cu_seqlens(op: str, cu_seqlens: torch.Tensor, total: int, max_seqlen: Optional[int] = None) -> int:
    """Validate packed-sequence offsets (int32 [B + 1]: 0 first, non-decreasing, `total` last) and return
    max_seqlen: the given one (checked against the longest sequence) or the longest. Reading the values
    is a host sync for CUDA tensors: a CUDA caller that gives max_seqlen is trusted and not read."""
    check_tensor("cu_seqlens", cu_seqlens, op=op, ndim=(1,), dtypes=())
    err = f"fastbert.ops.{op}: cu_seqlens must"
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{err} be torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{err} hold at least one value (0), got an empty tensor")
    if max_seqlen is not None and cu_seqlens.device.type != "cpu":
        return max_seqlen
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{err} start at 0, got {bounds[0]}")
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{err} be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{err} end at the number of packed tokens {total}, got {bounds[-1]}")
    longest = max(lens, default=0)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"fastbert.ops.{op}: max_seqlen {max_seqlen} is shorter than the longest sequence in "
                         f"cu_seqlens ({longest})")
    return max_seqlen


def check_approximate(op: str, approximate) -> str:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.ops.{op}: approximate must be 'none' (exact erf GELU) or 'tanh', "
                         f"got {approximate!r}")
    return approximate


# ----------------------------------------------------------------------------------------------
# output allocation
# ----------------------------------------------------------------------------------------------
new_empty = _runtime.new_empty  # every kernel output (NaN-poisoned under FASTBERT_POISON_OUTPUTS=1)


def empty_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    """new_empty with t's dtype and device (and shape, unless given)."""
    return new_empty(tuple(t.shape) if shape is None else shape, dtype=t.dtype, device=t.device)


# ----------------------------------------------------------------------------------------------
# the dtype-only backend checks of the elementwise / GEMM ops (bias_gelu, linear_gelu)
# ----------------------------------------------------------------------------------------------
def dtype_check(x, **_) -> List[str]:
    if x.dtype not in KERNEL_DTYPES:
        return [f"dtype {x.dtype} (kernels take float16, bfloat16, float32)"]
    return []


def dtype_key(x, **_):
    """Everything dtype_check reads (the Dispatchers cache decisions by it)."""
    return x.dtype


DTYPE_CHECKS = {"triton": dtype_check, "cuda": dtype_check, "cpu": dtype_check}


# ----------------------------------------------------------------------------------------------
# kernels per backend
# ----------------------------------------------------------------------------------------------
def kernel(backend: str, op: str, name: str):
    """The torch.ops callable implementing kernel `name` (e.g. "add_layer_norm_fwd") of public op `op`
    on `backend` ("triton", "cuda" or "cpu"). Triton kernels are registered as fastbert::triton_<name>
    by the op module; the cpu/cuda ones are the C++ ops of fastbert._C."""
    k = _kernels.get((backend, name))
    if k is not None:
        return k
    if backend == "triton":
        k = getattr(torch.ops.fastbert, "triton_" + name)
    elif backend in ("cpu", "cuda"):
        backends.extension_status()
        k = getattr(torch.ops.fastbert, name)
    else:
        raise ValueError(f"no kernel table for backend {backend!r}")
    _kernels[(backend, name)] = k
    return k


_kernels: dict = {}  # (backend, kernel name) -> torch.ops callable, looked up once


def triton_module(op: str):
    """Import fastbert/triton/<op>.py lazily, so `import fastbert` never imports triton."""
    return importlib.import_module(f"fastbert.triton.{op}")


def register_fake_both(name: str, fake) -> None:
    """Register `fake` as the meta kernel of fastbert::triton_<name> and, when fastbert._C is loaded,
    of its C++ twin fastbert::<name> (same schema, same output shapes)."""
    torch.library.register_fake(f"fastbert::triton_{name}")(fake)
    if backends.extension_status()[0] and hasattr(torch.ops.fastbert, name):
        torch.library.register_fake(f"fastbert::{name}")(fake)


def needs_grad(*tensors) -> bool:
    """Whether autograd will want a backward through an op taking `tensors`. When it will not (inference,
    torch.no_grad), the front ends call the forward kernel directly: no autograd Function, nothing saved."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Backends whose training path is the C++ differentiable op fastbert::<op> (csrc/autograd.cpp) rather than
# the op module's Python autograd.Function: a C++ graph node costs a fraction of a Python one per call.
CPP_AUTOGRAD = ("cpu", "cuda")


def cpp_kernels(*names: str):
    """The C++ kernel names an op needs from the cpu and cuda backends (for Dispatcher(kernels=...))."""
    return {"cpu": names, "cuda": names}
