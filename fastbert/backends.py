"""Which backends exist here, in which order each op tries them, and why one cannot serve an input.

Backends:
  triton  Triton kernels: CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 and only when forced
          (the interpreter is a test vehicle, orders of magnitude slower than the cpu backend)
  cuda    csrc/cuda kernels in fastbert._C, when it was built with CUDA
  cpu     csrc/cpu kernels in fastbert._C
  torch   fastbert/reference.py: plain PyTorch, runs anywhere; the fallback and the oracle

Each op (fastbert/ops/<op>.py) owns a `Dispatcher`: it asks each backend, in the op's default order for
the input's device, whether it can serve the input (`not_supported_reasons`), like xformers' dispatch,
and takes the first that can. A forced backend (`FASTBERT_BACKEND=name` or `with use_backend(name):`)
is the only one tried; if it cannot serve, `BackendUnavailableError` lists every backend's reasons.
Every decision is recorded so that `fastbert.explain()` can show which backend ran and why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import torch

from fastbert import _runtime

BACKENDS: Tuple[str, ...] = ("triton", "cuda", "cpu", "torch")

# Default order per device type, before any measurement says otherwise. Ops may override.
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve this input. The message lists every backend's reasons."""


# ----------------------------------------------------------------------------------------------
# forcing a backend
# ----------------------------------------------------------------------------------------------
_local = threading.local()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every fastbert op inside the block to run on backend `name` (None lifts any forcing)."""
    if name is not None:
        _check_name(name, "use_backend(name)")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_backend() -> Optional[str]:
    """The backend forced by `use_backend` (innermost wins) or else by FASTBERT_BACKEND, or None."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTBERT_BACKEND", "").strip()
    if env and env.lower() not in ("auto", "default"):
        return _check_name(env, "FASTBERT_BACKEND")
    return None


# ----------------------------------------------------------------------------------------------
# what is installed
# ----------------------------------------------------------------------------------------------
_cache: Dict[str, Tuple[bool, str]] = {}


def triton_status() -> Tuple[bool, str]:
    """(importable, reason) for Triton."""
    if "triton" not in _cache:
        try:
            import triton  # noqa: F401

            _cache["triton"] = (True, f"triton {triton.__version__}")
        except Exception as e:  # ImportError, or a broken install
            _cache["triton"] = (False, f"triton is not importable ({type(e).__name__}: {e})")
    return _cache["triton"]


triton_interpreter = _runtime.triton_interpreter


def extension_status() -> Tuple[bool, str]:
    """(importable, reason) for fastbert._C; importing it registers the C++ ops."""
    if "ext" not in _cache:
        try:
            from fastbert import _C

            kind = "with CUDA" if getattr(_C, "WITH_CUDA", 0) else "CPU only (no CUDA kernels in this build)"
            _scan_kernels()
            _cache["ext"] = (True, f"fastbert._C built {kind}")
        except Exception as e:
            _cache["ext"] = (
                False,
                f"fastbert._C is not importable ({type(e).__name__}: {e}); "
                "build it with `pip install --no-build-isolation -e .`",
            )
    return _cache["ext"]


def extension_has_cuda() -> bool:
    ok, _ = extension_status()
    if not ok:
        return False
    from fastbert import _C

    return bool(getattr(_C, "WITH_CUDA", 0))


# (op, dispatch key) -> has a kernel; filled once when fastbert._C is imported (registrations do not
# change afterwards), so that dispatch inside torch.compile'd code is plain dict lookups, not a
# pybind call that would break the graph.
_kernel_cache: Dict[Tuple[str, str], bool] = {}


def _scan_kernels() -> None:
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("fastbert::") and not name.startswith("fastbert::triton_"):
            op = name.split("::", 1)[1].split(".", 1)[0]
            for key in ("CPU", "CUDA"):
                _kernel_cache[(op, key)] = bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.fastbert.<op> exists and has a kernel for `dispatch_key` ("CPU"/"CUDA")."""
    if not extension_status()[0]:
        return False
    return _kernel_cache.get((op, dispatch_key), False)


def device_reasons(backend: str, device: torch.device, kernels: Sequence[str] = (), forced: bool = False) -> List[str]:
    """Why `backend` cannot run on `device` at all (empty list: it can). `kernels` are the C++ op names
    (e.g. "add_layer_norm_fwd") the op needs from the cpu/cuda backends."""
    dev = device.type
    if backend == "torch":
        return []
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return [why]
        if dev == "cuda":
            if triton_interpreter():
                return ["TRITON_INTERPRET=1 is set: Triton kernels run in the interpreter, which serves CPU tensors"]
            return []
        if dev == "cpu":
            if not triton_interpreter():
                return ["Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"]
            if not forced:
                return ["the Triton interpreter serves CPU tensors only when forced (it is a test vehicle)"]
            return []
        return [f"Triton does not serve {dev} tensors"]
    if backend in ("cuda", "cpu"):
        if dev != backend:
            return [f"the {backend} backend serves {backend} tensors, got {dev} tensors"]
        ok, why = extension_status()
        if not ok:
            return [why]
        if backend == "cuda" and not extension_has_cuda():
            return ["fastbert._C was built without CUDA (CPU torch, no nvcc, or FASTBERT_SKIP_CUDA_BUILD=1)"]
        key = "CUDA" if backend == "cuda" else "CPU"
        missing = [k for k in kernels if not has_kernel(k, key)]
        if missing:
            return [f"fastbert._C has no {key} kernel for {', '.join('fastbert::' + k for k in missing)}"]
        return []
    raise ValueError(f"unknown backend {backend!r}")


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decision:
    op: str
    backend: str
    forced: bool
    # backend -> reasons it could not serve (only backends that were asked)
    rejected: Tuple[Tuple[str, Tuple[str, ...]], ...]

    def describe(self) -> str:
        head = f"{self.op}: {self.backend}" + (" (forced)" if self.forced else "")
        lines = [head] + [f"    {b} skipped: {'; '.join(r)}" for b, r in self.rejected]
        return "\n".join(lines)


# op name -> last decision taken (for explain())
_last_decisions: Dict[str, Decision] = {}


# A check returns the reasons a backend cannot serve the given input beyond the device ones.
Check = Callable[..., List[str]]


class Dispatcher:
    """The one place an op chooses its backend.

    op:       public op name ("attention", "add_layer_norm", ...)
    kernels:  backend -> C++/Triton op names it needs (for the cpu/cuda availability check)
    checks:   backend -> function(**inputs) -> list of reasons specific to this input
    order:    device type -> backend order (defaults to DEFAULT_ORDER)
    key:      function(**inputs) -> a hashable summary of everything the checks read (dtypes, head
              dim, ...). With it, decisions are cached per (device type, forced backend, key): a call
              costs a dict lookup instead of asking every backend (docs/perf-notes.md). What the
              device checks read besides the key
              (installed packages, the built extension) does not change within a process;
              TRITON_INTERPRET is part of the cache key where it matters (CUDA tensors, forced triton).
    """

    def __init__(
        self,
        op: str,
        *,
        kernels: Optional[Dict[str, Sequence[str]]] = None,
        checks: Optional[Dict[str, Check]] = None,
        order: Optional[Dict[str, Sequence[str]]] = None,
        key: Optional[Callable[..., Hashable]] = None,
    ) -> None:
        self.op = op
        self.kernels = dict(kernels or {})
        self.checks: Dict[str, Check] = dict(checks or {})
        self.order = {k: tuple(v) for k, v in (order or DEFAULT_ORDER).items()}
        self.key = key
        self._decisions: Dict[Hashable, Decision] = {}

    def set_check(self, backend: str, check: Check) -> None:
        self.checks[_check_name(backend, "set_check(backend)")] = check
        self._decisions.clear()

    def reasons(self, backend: str, device: torch.device, forced: bool = False, **inputs) -> List[str]:
        why = device_reasons(backend, device, self.kernels.get(backend, ()), forced=forced)
        if why:
            return why
        check = self.checks.get(backend)
        return list(check(**inputs)) if check is not None else []

    def choose(self, device: torch.device, **inputs) -> Decision:
        forced = forced_backend()
        cache_key = None
        if self.key is not None:
            dev = device.type
            interp = triton_interpreter() if dev == "cuda" or forced == "triton" else None
            cache_key = (dev, forced, interp, self.key(**inputs))
            cached = self._decisions.get(cache_key)
            if cached is not None:
                _last_decisions[self.op] = cached
                return cached
        if forced is not None:
            why = self.reasons(forced, device, forced=True, **inputs)
            if why:
                all_reasons = [f"  {b}: "
                               + ("; ".join(self.reasons(b, device, forced=(b == forced), **inputs)) or "can serve")
                               for b in BACKENDS]
                raise BackendUnavailableError(
                    f"fastbert.ops.{self.op}: backend {forced!r} was forced but cannot serve this input.\n"
                    + "\n".join(all_reasons)
                )
            decision = Decision(self.op, forced, True, ())
        else:
            rejected = []
            order = self.order.get(device.type, ("torch",))
            chosen = None
            for b in order:
                why = self.reasons(b, device, **inputs)
                if not why:
                    chosen = b
                    break
                rejected.append((b, tuple(why)))
            if chosen is None:  # torch is last in every order and always serves; keep a guard anyway
                chosen = "torch"
            decision = Decision(self.op, chosen, False, tuple(rejected))
        if cache_key is not None:
            self._decisions[cache_key] = decision
        _last_decisions[self.op] = decision
        return decision


def last_decisions() -> Dict[str, Decision]:
    return dict(_last_decisions)
