"""Op-level cases: each fastbert op against the PyTorch composition it replaces, at a model's shapes.

  attention       fastbert.ops.attention on [B, S, H, D] views of one fused QKV tensor (and, as
                  fastbert-<b>-packed, on the valid tokens packed [total, H, D] with cu_seqlens), against
                  F.scaled_dot_product_attention restricted to each of its backends with
                  torch.nn.attention.sdpa_kernel (math, flash, efficient, cudnn); varlen cases pass a
                  key padding mask (SDPA: a bool [B, 1, 1, S] mask, which its flash backend refuses)
  add_layer_norm  add_layer_norm(x, w, b, residual=r, x_bias=xb) against F.layer_norm(x + xb + r, ...): the
                  epilogue of BertSelfOutput/BertOutput as the patched layers run it (the dense layer's
                  bias folded in as x_bias; dropout off, as in inference)
  linear_gelu     linear_gelu(x, W, b) against F.gelu(F.linear(x, W, b)) and against F.linear alone
                  (the GEMM a fused epilogue should cost nothing on top of)
  bias_gelu       bias_gelu(x, b) against F.gelu(x + b)
  gemm_qkv, gemm_o, gemm_ffn_in, gemm_ffn_out
                  the layer's four GEMMs, x @ W^T (no bias, no activation; inference, "fwd" only), on each
                  GEMM library this machine offers: torch-linear (F.linear: MKL on x86 CPUs, what HF
                  runs), onednn-packed (torch.ops.mkldnn._linear_pointwise on a weight packed once by
                  _reorder_linear_weight), fastbert-packed (fastbert's kernel, csrc/cpu/gemm.cpp, on its
                  packed weight) and fastbert-chosen (what the fused layer runs: fastbert/ops/cpu_gemm.py's
                  choice between its kernel and ATen's GEMM for this shape). CPU only, fp32 or 16-bit;
                  the fastest provider of a row is this machine's fastest measured GEMM for that shape.

Modes: "fwd" = an inference forward (no autograd graph); "bwd" = the backward alone, replayed from a
retained graph with a fixed upstream gradient; "fwd+bwd" = what the op costs in a training step: a
forward that builds the autograd graph, then the backward through it. "bwd" alone favours a
composition that materializes intermediates in its forward (F.layer_norm(x + xb + r) saves the sum, so
its LayerNorm backward reads one tensor where fastbert's add_layer_norm, which never writes the sum,
re-reads two; the composition then reads its gradient once more for xb's); "fwd+bwd" charges each
design for both halves. FLOPs and bytes (minimum traffic, element size e,
T = B * S tokens, hidden N, intermediate I, valid lengths L_b):
  attention     fwd 4 * H * D * sum L_b^2, bwd 2.5 x fwd (5 matmuls instead of 2)
  linear_gelu   fwd 2 * T * N * I, bwd 4 * T * N * I            (compute-bound: TFLOP/s, % of peak)
  add_layer_norm fwd (x, residual in; out) 3 * T * N * e, bwd (grad_out, x, residual in; grad out) 4 * T * N * e
                (the cpu backend's fp32 training forward also writes the pre-norm sum, which its backward
                reads instead of x and residual: one tensor moved from bwd to fwd, and written, not read)
  bias_gelu     fwd 2 * T * I * e, bwd (grad_out, x in; grad_x out) 3 * T * I * e   (memory-bound: GB/s)
  fwd+bwd       the sum of the two
max_abs_err: max |output - float64 reference| (fastbert.reference in float64 on the same inputs) over
valid tokens; for bwd and fwd+bwd, over every input gradient (valid tokens; padding queries get a zero upstream
gradient so every provider's valid-token gradients are defined the same way).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from fastbert import reference
from fastbert.bench import providers as P
from fastbert.bench import timing

GEMMS = ("gemm_qkv", "gemm_o", "gemm_ffn_in", "gemm_ffn_out")
OPS = ("attention", "add_layer_norm", "linear_gelu", "bias_gelu") + GEMMS
GEMM_PROVIDERS = ("torch-linear", "onednn-packed", "fastbert-packed", "fastbert-chosen")


def gemm_shape(op: str, hidden: int, inter: int):
    """(N, K) of one of the layer's GEMMs."""
    return {"gemm_qkv": (3 * hidden, hidden), "gemm_o": (hidden, hidden), "gemm_ffn_in": (inter, hidden),
            "gemm_ffn_out": (hidden, inter)}[op]
MODES = ("fwd", "bwd", "fwd+bwd")
SDPA_BACKENDS = ("math", "flash", "efficient", "cudnn")


def op_provider_names(op: str) -> List[str]:
    fast = [f"fastbert-{b}" for b in P.FASTBERT_BACKENDS]
    if op == "attention":
        packed = [f"fastbert-{b}-packed" for b in P.FASTBERT_BACKENDS]
        return fast + packed + [f"torch-sdpa-{b}" for b in SDPA_BACKENDS]
    if op == "add_layer_norm":
        return fast + ["torch-add+layer_norm"]
    if op == "linear_gelu":
        return fast + ["torch-linear+gelu", "torch-linear"]
    if op == "bias_gelu":
        return fast + ["torch-add+gelu"]
    if op in GEMMS:
        return list(GEMM_PROVIDERS)
    raise ValueError(f"--ops: unknown op {op!r}; choose from {', '.join(OPS)}")


class Skip(Exception):
    """This provider cannot run this case here; the message says why."""


@dataclasses.dataclass
class Case:
    """Inputs of one op case: `sets[i]` is a tuple of tensors; `valid` a bool mask over tokens [B, S]."""
    op: str
    sets: list
    valid: torch.Tensor
    grad_idx: tuple          # which tensors of a set get gradients in "bwd"
    flops_fwd: Optional[float]
    bytes_fwd: Optional[float]
    flops_bwd: Optional[float]
    bytes_bwd: Optional[float]

    def flops(self, mode: str) -> Optional[float]:
        return _per_mode(mode, self.flops_fwd, self.flops_bwd)

    def nbytes(self, mode: str) -> Optional[float]:
        return _per_mode(mode, self.bytes_fwd, self.bytes_bwd)


def _per_mode(mode: str, fwd: Optional[float], bwd: Optional[float]) -> Optional[float]:
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    if mode == "fwd+bwd":
        return None if fwd is None or bwd is None else fwd + bwd
    raise ValueError(f"unknown op mode {mode!r} ({', '.join(MODES)})")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]


def make_case(op: str, dims: tuple, batch: int, seq: int, lengths, dtype, device, n_sets: Optional[int] = None) -> Case:
    """dims = (hidden, heads, intermediate). `lengths` = valid length per sequence (attention only)."""
    hidden, heads, inter = dims
    d = hidden // heads
    T = batch * seq
    e = torch.tensor([], dtype=dtype).element_size()
    valid = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        valid[b, :n] = True

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    if op == "attention":
        per_set = 3 * T * hidden * e
        fl = 4.0 * heads * d * sum(n * n for n in lengths)
        make = lambda: (rnd(batch, seq, 3, heads, d),)  # noqa: E731
        cfg = dict(grad_idx=(0,), flops_fwd=fl, bytes_fwd=None, flops_bwd=2.5 * fl, bytes_bwd=None)
    elif op == "add_layer_norm":
        per_set = 2 * T * hidden * e
        make = lambda: (rnd(batch, seq, hidden), rnd(batch, seq, hidden), 1.0 + rnd(hidden, scale=0.1),  # noqa: E731
                        rnd(hidden, scale=0.1), rnd(hidden, scale=0.1))
        cfg = dict(grad_idx=(0, 1, 2, 3, 4), flops_fwd=None, bytes_fwd=3.0 * T * hidden * e, flops_bwd=None,
                   bytes_bwd=4.0 * T * hidden * e)
    elif op == "linear_gelu":
        per_set = T * hidden * e
        w, b = rnd(inter, hidden, scale=hidden ** -0.5), rnd(inter, scale=0.1)  # weights shared, like a model's
        make = lambda: (rnd(batch, seq, hidden), w, b)  # noqa: E731
        fl = 2.0 * T * hidden * inter
        cfg = dict(grad_idx=(0, 1, 2), flops_fwd=fl, bytes_fwd=None, flops_bwd=2.0 * fl, bytes_bwd=None)
    elif op == "bias_gelu":
        per_set = T * inter * e
        b = rnd(inter, scale=0.1)
        make = lambda: (rnd(batch, seq, inter), b)  # noqa: E731
        cfg = dict(grad_idx=(0, 1), flops_fwd=None, bytes_fwd=2.0 * T * inter * e, flops_bwd=None,
                   bytes_bwd=3.0 * T * inter * e)
    elif op in GEMMS:
        n_out, k_in = gemm_shape(op, hidden, inter)
        per_set = T * k_in * e
        w = rnd(n_out, k_in, scale=k_in ** -0.5)
        make = lambda: (rnd(batch, seq, k_in), w)  # noqa: E731
        cfg = dict(grad_idx=(), flops_fwd=2.0 * T * n_out * k_in, bytes_fwd=None, flops_bwd=None, bytes_bwd=None)
    else:
        raise ValueError(f"--ops: unknown op {op!r}")
    n = n_sets or timing.rotation_count(per_set, torch.device(device))
    return Case(op, [make() for _ in range(n)], valid, **cfg)


def _gemm_fn(provider: str, device: torch.device) -> Callable:
    """x @ W^T on one GEMM library; packing (where there is one) happens once, outside the timed calls."""
    if provider == "torch-linear":
        return lambda x, w: F.linear(x, w)
    if device.type != "cpu":
        raise Skip(f"{provider} is a CPU GEMM")
    packs = {}

    def packed(w, make):
        if id(w) not in packs:
            packs[id(w)] = (w, make(w))  # w kept alive, so its id stays its own
        return packs[id(w)][1]

    if provider == "onednn-packed":
        mk = getattr(torch.ops, "mkldnn", None)
        if not (torch.backends.mkldnn.is_available() and hasattr(mk, "_reorder_linear_weight")
                and hasattr(mk, "_linear_pointwise")):
            raise Skip("this torch has no oneDNN linear entry points (torch.ops.mkldnn._linear_pointwise)")

        def run(x, w):
            pw = packed(w, lambda t: mk._reorder_linear_weight(t, x.numel() // x.shape[-1]))
            return mk._linear_pointwise(x, pw, None, "none", [], "")
        return run
    from fastbert.ops import cpu_gemm

    ok, why = cpu_gemm.kernel_status()
    if provider == "fastbert-packed":
        if not ok:
            raise Skip(why)

        def run(x, w):
            pw = packed(w, torch.ops.fastbert.cpu_pack_weight)
            x2 = x.reshape(-1, x.shape[-1])
            return torch.ops.fastbert.cpu_packed_linear(x2, pw, w.shape[0], None, "none").view(*x.shape[:-1], -1)
        return run
    if provider == "fastbert-chosen":
        cache = cpu_gemm.PackedWeight()

        def run(x, w):
            if not cpu_gemm.eligible(x, w, None):
                raise Skip("not a CPU inference GEMM fastbert/ops/cpu_gemm.py serves")
            return cpu_gemm.linear(x, w, None, "none", cache=cache, key=(id(w),), aten=lambda: F.linear(x, w))
        return run
    raise ValueError(f"unknown GEMM provider {provider!r}")


def provider_fn(op: str, provider: str, device: torch.device, heads: int) -> Callable:
    """A callable taking one input set and returning the op's output (raises Skip if it cannot run)."""
    if op in GEMMS:
        return _gemm_fn(provider, device)
    if provider.startswith("fastbert-"):
        backend = provider.split("-", 1)[1]
        why = P.backend_unavailable(backend, device)
        if why:
            raise Skip(why)
        try:
            import fastbert.ops as fops

            fop = getattr(fops, op)
        except (ImportError, AttributeError) as e:
            raise Skip(f"fastbert.ops.{op} is not available: {type(e).__name__}: {e}")

        def run(*xs):
            with P.forcing(backend):
                return _call_fastbert(op, fop, xs, heads)
        return run
    if op == "attention":
        sdpa = _sdpa_backend(provider.rsplit("-", 1)[1])

        def run(qkv, mask=None):
            from torch.nn.attention import sdpa_kernel

            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, S, D] strided views
            with sdpa_kernel([sdpa]):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return o.transpose(1, 2)
        return run
    if provider == "torch-add+layer_norm":
        return lambda x, r, w, b, xb: F.layer_norm(x + xb + r, (x.shape[-1],), w, b, 1e-12)
    if provider == "torch-linear+gelu":
        return lambda x, w, b: F.gelu(F.linear(x, w, b))
    if provider == "torch-linear":
        return lambda x, w, b: F.linear(x, w, b)
    if provider == "torch-add+gelu":
        return lambda x, b: F.gelu(x + b)
    raise ValueError(f"unknown op provider {provider!r} for {op}")


def _call_fastbert(op, fop, xs, heads):
    if op == "attention":
        qkv, mask = xs[0], (xs[1] if len(xs) > 1 else None)
        q, k, v = qkv.unbind(2)
        return fop(q, k, v, attention_mask=mask)
    if op == "add_layer_norm":
        x, r, w, b, xb = xs
        return fop(x, w, b, residual=r, x_bias=xb, eps=1e-12)
    return fop(*xs)


def reference_fn(op: str, provider: str) -> Callable:
    """The float64 oracle for a provider's output (F.linear alone for torch-linear)."""
    if op == "attention":
        def ref(qkv, mask=None):
            q, k, v = qkv.unbind(2)
            return reference.attention(q, k, v, attention_mask=mask)
        return ref
    if op == "add_layer_norm":
        return lambda x, r, w, b, xb: reference.add_layer_norm(x, w, b, residual=r, x_bias=xb, eps=1e-12)
    if op == "linear_gelu":
        if provider == "torch-linear":
            return lambda x, w, b: F.linear(x, w, b)
        return lambda x, w, b: reference.linear_gelu(x, w, b)
    if op == "bias_gelu":
        return lambda x, b: reference.bias_gelu(x, b)
    if op in GEMMS:
        return lambda x, w: F.linear(x, w)
    raise ValueError(op)


def _args(case: Case, i: int, varlen: bool, for_sdpa: bool):
    xs = case.sets[i]
    if case.op == "attention" and varlen:
        mask = case.valid[:, None, None, :] if for_sdpa else case.valid
        return xs + (mask,)
    return xs


def _valid_mask(case: Case, t: torch.Tensor) -> Optional[torch.Tensor]:
    """case.valid broadcast to a [B, S, ...] tensor; None for tensors that are not per token."""
    B, S = case.valid.shape
    if t.dim() >= 2 and tuple(t.shape[:2]) == (B, S):
        return case.valid.reshape(B, S, *([1] * (t.dim() - 2))).expand_as(t)
    return None


def _err(a: torch.Tensor, ref: torch.Tensor, valid: Optional[torch.Tensor]) -> float:
    d = (a.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    if valid is not None:
        d = d[valid]
    return float(d.max()) if d.numel() else 0.0


def prepare(case: Case, provider: str, mode: str, varlen: bool, device: torch.device, heads: int):
    """(call(i), max_abs_err): `call(i)` runs one (op, provider, mode) on input set i; the error is
    measured on set 0 against the float64 reference. Raises Skip if the provider cannot run here."""
    with warnings.catch_warnings():  # an SDPA backend refusing an input warns before it raises
        warnings.simplefilter("ignore")
        if provider.endswith("-packed") and case.op == "attention":
            return _prepare_packed(case, provider, mode, device)
        return _prepare(case, provider, mode, varlen, device, heads)


def _prepare_packed(case: Case, provider: str, mode: str, device: torch.device):
    """fastbert attention on packed (padding-free) tokens: q/k/v [total, H, D] views of one packed
    QKV tensor, with cu_seqlens and max_seqlen given (so no host sync). Packing happens outside the
    timed calls, as padding-free patching does once per forward for all layers. The error is against
    the float64 padded reference at the valid tokens."""
    assert case.op == "attention"
    backend = provider.split("-")[1]
    why = P.backend_unavailable(backend, device)
    if why:
        raise Skip(why)
    try:
        import fastbert.ops as fops

        fop = fops.attention
    except (ImportError, AttributeError) as e:
        raise Skip(f"fastbert.ops.attention is not available: {type(e).__name__}: {e}")
    valid = case.valid
    lengths = valid.sum(1)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    max_len = int(lengths.max()) if lengths.numel() else 0

    def fn(qkvp):
        q, k, v = qkvp.unbind(1)
        with P.forcing(backend):
            return fop(q, k, v, cu_seqlens=cu, max_seqlen=max_len)

    packed = [xs[0][valid].detach() for xs in case.sets]  # [total, 3, H, D]
    qkv0 = case.sets[0][0].detach().double()

    def ref_padded(qkv):
        q, k, v = qkv.unbind(2)
        return reference.attention(q, k, v, attention_mask=valid)

    if mode == "fwd":
        try:
            with torch.no_grad():
                out = fn(packed[0])
        except RuntimeError as e:
            raise Skip(f"{type(e).__name__}: {_first_line(e)}")
        err = _err(out, ref_padded(qkv0)[valid], None)

        def call(i):
            with torch.no_grad():
                fn(packed[i])
        return call, err
    leaves = [t.clone().requires_grad_(True) for t in packed]
    try:
        outs = [fn(t) for t in leaves]
        gouts = [torch.randn_like(o) for o in outs]
        (g,) = torch.autograd.grad(outs[0], [leaves[0]], gouts[0], retain_graph=True)
    except RuntimeError as e:
        raise Skip(f"{type(e).__name__}: {_first_line(e)}")
    r_in = qkv0.clone().requires_grad_(True)
    r_out = ref_padded(r_in)
    g_pad = torch.zeros_like(r_out)
    g_pad[valid] = gouts[0].double()
    (rg,) = torch.autograd.grad(r_out, [r_in], g_pad)
    err = _err(g, rg[valid], None)

    if mode == "bwd":
        def call(i):
            torch.autograd.grad(outs[i], [leaves[i]], gouts[i], retain_graph=True)
    else:  # fwd+bwd: a fresh graph per call
        del outs

        def call(i):
            torch.autograd.grad(fn(leaves[i]), [leaves[i]], gouts[i])
    return call, err


def _prepare(case: Case, provider: str, mode: str, varlen: bool, device: torch.device, heads: int):
    fn = provider_fn(case.op, provider, device, heads)
    sdpa = provider.startswith("torch-sdpa")
    ref = reference_fn(case.op, provider)
    n = len(case.sets)
    args0 = _args(case, 0, varlen, sdpa)
    ref_args = tuple(t.detach().double() if t.is_floating_point() else t for t in _args(case, 0, varlen, False))

    if case.op in GEMMS and mode != "fwd":
        raise Skip("the GEMM rows time inference (fwd) only")
    if mode == "fwd":
        try:
            with torch.no_grad():
                out = fn(*args0)
        except RuntimeError as e:  # e.g. "No available kernel" from sdpa_kernel, a backend refusal
            raise Skip(f"{type(e).__name__}: {_first_line(e)}")
        err = _err(out, ref(*ref_args), _valid_mask(case, out))

        def call(i):
            with torch.no_grad():
                fn(*_args(case, i, varlen, sdpa))
    elif mode in ("bwd", "fwd+bwd"):
        args, leaves, outs, gouts = [], [], [], []
        for i in range(n):
            xs = [t.detach().requires_grad_(j in case.grad_idx) for j, t in enumerate(case.sets[i])]
            a = tuple(xs) + _args(case, i, varlen, sdpa)[len(xs):]
            try:
                o = fn(*a)
            except RuntimeError as e:
                raise Skip(f"{type(e).__name__}: {_first_line(e)}")
            g = torch.randn_like(o)
            vm = _valid_mask(case, o)
            if vm is not None:
                g = g * vm.to(g.dtype)  # padding queries: zero upstream gradient
            args.append(a)
            leaves.append([xs[j] for j in case.grad_idx])
            outs.append(o)
            gouts.append(g)
        try:
            grads = torch.autograd.grad(outs[0], leaves[0], gouts[0], retain_graph=True)
        except RuntimeError as e:
            raise Skip(f"{type(e).__name__}: {_first_line(e)}")
        r_in = [t.detach().double().requires_grad_(j in case.grad_idx) for j, t in enumerate(case.sets[0])]
        r_out = ref(*(tuple(r_in) + ref_args[len(r_in):]))
        r_grads = torch.autograd.grad(r_out, [r_in[j] for j in case.grad_idx], gouts[0].double())
        err = max(_err(g, rg, _valid_mask(case, g)) for g, rg in zip(grads, r_grads))

        if mode == "bwd":
            def call(i):
                torch.autograd.grad(outs[i], leaves[i], gouts[i], retain_graph=True)
        else:  # fwd+bwd: a fresh graph per call
            outs.clear()

            def call(i):
                torch.autograd.grad(fn(*args[i]), leaves[i], gouts[i])
    else:
        raise ValueError(mode)
    return call, err


def run_case(case: Case, provider: str, mode: str, varlen: bool, device: torch.device, heads: int,
             quick: bool) -> dict:
    """Time one (op, provider, mode) on `case`; returns timing, max_abs_err, peak_mem_mb."""
    call, err = prepare(case, provider, mode, varlen, device, heads)
    n = len(case.sets)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = timing.bench(call, n, device, quick=quick)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"timing": t, "max_abs_err": err, "peak_mem_mb": peak}


def run_providers(case: Case, providers, mode: str, varlen: bool, device: torch.device, heads: int,
                  quick: bool) -> dict:
    """Every provider of one (case, mode): provider -> run_case's dict, or the exception that stopped it.
    On CPU all providers are prepared first and then timed against each other in interleaved rounds
    (timing.bench_interleaved: a drifting machine slows them alike); on a GPU, whose timings do not
    drift that way and whose memory may not hold every provider's retained graphs at once, one after
    another (run_case)."""
    device = torch.device(device)
    out = {}
    if not timing.interleave(device):
        for prov in providers:
            try:
                out[prov] = run_case(case, prov, mode, varlen, device, heads, quick)
            except Exception as e:  # noqa: BLE001 -- reported per provider by the caller
                out[prov] = e
        return out
    calls, errs = {}, {}
    for prov in providers:
        try:
            calls[prov], errs[prov] = prepare(case, prov, mode, varlen, device, heads)
        except Exception as e:  # noqa: BLE001
            out[prov] = e
    try:
        timings = timing.bench_interleaved(calls, len(case.sets), device, quick=quick)
    except Exception as e:  # noqa: BLE001 -- a failure while timing: every provider of the round
        timings = {prov: e for prov in calls}
    for prov in calls:
        t = timings[prov]
        out[prov] = t if isinstance(t, BaseException) else {"timing": t, "max_abs_err": errs[prov], "peak_mem_mb": None}
    return {prov: out[prov] for prov in providers}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:3])[:400] if lines else type(e).__name__
