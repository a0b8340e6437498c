"""CPU fp32 inference GEMMs: ATen's (MKL) or fastbert's packed-weight kernel, whichever is faster here.

`linear(x, weight, bias, epilogue, cache=..., aten=...)` computes epilogue(x @ weight^T + bias) for the
fused layers' four GEMMs when no gradient is wanted. The candidates:
- "aten": the caller's own ATen path (`aten()`: F.linear, the three-GEMM QKV, the linear_gelu op);
- "fastbert": fastbert::cpu_packed_linear (csrc/cpu/gemm.cpp) on a weight packed once into 16-column
  fp32 panels and cached, with bias and GELU in the GEMM's last store. Its accumulation scheme is MKL's
  sgemm's (K in blocks of 192), so it rounds like the GEMM Hugging Face's model runs. bf16/fp16 inputs
  (a bf16/fp16 model, or CPU autocast, which rounds x, W and the bias to its dtype first, as it does for
  F.linear) are multiplied in fp32 (exact products, fp32 sums, one rounding at the end): on a CPU without native
  16-bit GEMMs (no AVX512-BF16/AMX) ATen's bf16 GEMM ran at 16-19 GFLOP/s against this kernel's fp32
  speed; where the CPU has them, the timing picks ATen's (oneDNN's) 16-bit GEMM.
oneDNN (torch.ops.mkldnn._linear_pointwise, packed weights) is not a candidate: on the development
machine its fp32 GEMMs had 2-3x MKL's error against float64 at K = 768 and 3072 (one accumulation
chain over all of K; docs/perf-notes.md), a loss of precision the numerical rule does not pay for.

Which one runs is chosen per shape class (rows rounded up to a power of two, N, K, epilogue, dtype) by timing
both on the first call of that class, interleaved, and kept for the process; `FASTBERT_CPU_GEMM=aten` or
`=fastbert` forces one (forcing "fastbert" where the kernel is missing raises). `fastbert.explain()`
lists the choices. The packed copy of a weight is keyed like the fused QKV weight (the Parameter's
identity, `_version`, data_ptr, dtype), so an optimizer step or load_state_dict repacks it.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

from fastbert import backends

CANDIDATES = ("aten", "fastbert")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPILOGUES = ("none", "gelu", "gelu_tanh")
_TIMED_CALLS = 2  # timed calls per candidate when a shape class is first seen (after one warm-up each)

_choices: Dict[Tuple, Tuple[str, str]] = {}  # shape class -> (candidate, why)


@functools.lru_cache(maxsize=None)
def _kernel_registered() -> bool:
    # asked once: a dispatcher lookup per GEMM call is avoidable work on the hot path
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastbert::cpu_packed_linear", "CPU")


def kernel_status() -> Tuple[bool, str]:
    """(usable, reason) for fastbert's packed-weight GEMM kernel."""
    ok, why = backends.extension_status()
    if not ok:
        return False, why
    if not _kernel_registered():
        return False, "fastbert._C was built without AVX2 + FMA (csrc/cpu/gemm.cpp needs both)"
    return True, "AVX2 + FMA packed-weight kernel (csrc/cpu/gemm.cpp)"


def forced() -> Optional[str]:
    """FASTBERT_CPU_GEMM: "aten" / "fastbert" forces one candidate; unset or "auto" measures."""
    v = os.environ.get("FASTBERT_CPU_GEMM", "").strip().lower()
    if v in ("", "auto"):
        return None
    if v not in CANDIDATES:
        raise ValueError(f"FASTBERT_CPU_GEMM must be one of auto, {', '.join(CANDIDATES)}; got {v!r}")
    return v


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether this call may take the packed path at all: CPU inference (no autograd, no torch.compile)
    in fp32, bf16 or fp16 with x and weight of one dtype, or under CPU autocast (to bf16 or fp16), on the
    cpu backend (not when another backend is forced)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        ok = (torch.float32, torch.get_autocast_dtype("cpu"))
        if torch.get_autocast_dtype("cpu") not in DTYPES or x.dtype not in ok or weight.dtype not in ok:
            return False
        if bias is not None and bias.dtype not in ok:
            return False
    elif x.dtype not in DTYPES or weight.dtype != x.dtype:
        return False
    elif bias is not None and bias.dtype not in (x.dtype, torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return backends.forced_backend() in (None, "cpu")


class PackedWeight:
    """The packed copy of one weight, refreshed when the key the caller passes changes."""

    def __init__(self):
        self._key = None
        self._packed = None

    def invalidate(self) -> None:
        self._key = self._packed = None

    def get(self, weight: torch.Tensor, key: Hashable, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The packed copy of `weight` (first rounded to `dtype` if given, as autocast rounds it)."""
        key = (key, dtype)
        if key != self._key or self._packed is None:
            self._packed = None  # free the stale copy before packing the new one
            w = weight.detach()
            self._packed = torch.ops.fastbert.cpu_pack_weight(w.to(dtype) if dtype is not None else w)
            self._key = key
        return self._packed


def param_key(*tensors: Optional[torch.Tensor]) -> Tuple:
    """The cache key of weights held as Parameters (as FusedQKV keys the fused weight)."""
    return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors if t is not None)


def _shape_class(m: int, n: int, k: int, epilogue: str, dtype: torch.dtype) -> Tuple:
    rows = 1
    while rows < m:
        rows *= 2
    return (rows, n, k, epilogue, str(dtype).replace("torch.", ""))


def _choose(cls: Tuple, fast: Callable[[], torch.Tensor], aten: Callable[[], torch.Tensor]) -> Tuple[str, torch.Tensor]:
    """Time both candidates on this call (interleaved; best of _TIMED_CALLS each) and keep the faster."""
    best = {"aten": float("inf"), "fastbert": float("inf")}
    outs = {}
    for _ in range(1 + _TIMED_CALLS):
        for name, fn in (("fastbert", fast), ("aten", aten)):
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    pick = "fastbert" if best["fastbert"] < best["aten"] else "aten"
    ratio = best["aten"] / best["fastbert"] if best["fastbert"] > 0 else float("inf")
    _choices[cls] = (pick, f"fastbert kernel {best['fastbert'] * 1e3:.2f} ms, aten {best['aten'] * 1e3:.2f} ms "
                           f"(fastbert {ratio:.2f}x)")
    return pick, outs[pick]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], epilogue: str, *,
           cache: PackedWeight, key: Hashable, aten: Callable[[], torch.Tensor]) -> torch.Tensor:
    """epilogue(x @ weight^T + bias) over x's last dim, for an `eligible` call. `aten()` computes the
    same with ATen (the caller's path, also what runs when it is chosen); `cache` holds weight's packed
    copy under `key` (see param_key)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"fastbert.ops.cpu_gemm.linear: epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    want = forced()
    ok, why = kernel_status()
    if want == "aten" or (want is None and not ok):
        return aten()
    if not ok:
        raise backends.BackendUnavailableError(f"FASTBERT_CPU_GEMM=fastbert, but the kernel is unavailable: {why}")
    n, k = weight.shape
    # under autocast, x, W and the bias are rounded to its dtype first, as autocast does for F.linear
    wdt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    x2 = x.reshape(-1, k)
    if wdt is not None:
        x2 = x2.to(wdt)
        bias = bias.to(wdt) if bias is not None else None
    if not x2.is_contiguous():
        x2 = x2.contiguous()

    def fast() -> torch.Tensor:
        packed = cache.get(weight, key, wdt)
        return torch.ops.fastbert.cpu_packed_linear(x2, packed, n, bias, epilogue).view(*x.shape[:-1], n)

    if want == "fastbert":
        return fast()
    cls = _shape_class(x2.shape[0], n, k, epilogue, x2.dtype)
    choice = _choices.get(cls)
    if choice is None:
        cache.get(weight, key, wdt)  # packing is not part of the timing
        return _choose(cls, fast, aten)[1]
    return fast() if choice[0] == "fastbert" else aten()


def describe() -> list:
    """Lines for fastbert.explain(): the kernel's status and the choice made per shape class."""
    ok, why = kernel_status()
    f = os.environ.get("FASTBERT_CPU_GEMM", "").strip()
    lines = [f"cpu gemm: fastbert kernel {'available' if ok else 'unavailable'}: {why}; "
             + (f"FASTBERT_CPU_GEMM={f}" if f else "chosen per shape by timing")]
    for (rows, n, k, epi, dt), (pick, why) in sorted(_choices.items()):
        lines.append(f"  {dt} rows<={rows} N={n} K={k} epilogue={epi}: {pick} ({why})")
    return lines


def reset_choices() -> None:
    """Forget the measured choices (tests; a process whose load changed)."""
    _choices.clear()
