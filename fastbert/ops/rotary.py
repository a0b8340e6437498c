"""rotary: the rotary position embedding of q and k (transformers' apply_rotary_pos_emb, rotate_half
convention), for ModernBERT and GPT-NeoX/Llama-style models.

The dispatch point of the op and its autograd Function. Backends: triton (fastbert/triton/rotary.py,
registered below as fastbert::triton_rotary_{fwd,bwd}), cpu/cuda (fastbert._C, schemas in csrc/ops.cpp;
csrc/cpu/rotary.cpp, csrc/cuda/rotary.cu + csrc/cuda_bindings/rotary.cpp), torch (fastbert/reference.py
under autograd). Tests: tests/ops/test_rotary.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP = "rotary"
KERNELS = ("rotary_fwd", "rotary_bwd")


def _err(msg: str) -> str:
    return f"fastbert.ops.{OP}: {msg}"


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them).
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_rotary_fwd", mutates_args=())
def _triton_rotary_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: Optional[torch.Tensor],
                       cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).rotary_fwd(q, k, cos, sin, position_ids, cu_seqlens, C.empty_like(q), C.empty_like(k))


@torch.library.custom_op("fastbert::triton_rotary_bwd", mutates_args=())
def _triton_rotary_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: Optional[torch.Tensor],
                       cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).rotary_bwd(grad_q, grad_k, cos, sin, position_ids, cu_seqlens,
                                          C.empty_like(grad_q), C.empty_like(grad_k))


def _rotary_fake(q, k, cos, sin, position_ids, cu_seqlens):
    return q.new_empty(q.shape), k.new_empty(k.shape)


C.register_fake_both("rotary_fwd", _rotary_fake)
C.register_fake_both("rotary_bwd", _rotary_fake)


# ----------------------------------------------------------------------------------------------
# dispatch: the kernels take q's dtype in {fp16, bf16, fp32} and tables of fp32 or q's dtype
# ----------------------------------------------------------------------------------------------
def _check(q, cos, **_):
    why = C.dtype_check(q)
    if cos.dtype not in (torch.float32, q.dtype):
        why.append(f"cos/sin dtype {cos.dtype} (kernels take float32 or q's dtype {q.dtype})")
    return why


def _key(q, cos, **_):
    return q.dtype, cos.dtype


DISPATCH = backends.Dispatcher(OP, kernels=C.cpp_kernels(*KERNELS),
                               checks={"triton": _check, "cuda": _check, "cpu": _check}, key=_key)


class _RotaryFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::rotary, a C++ graph node)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, cu_seqlens):
        q_out, k_out = C.kernel("triton", OP, "rotary_fwd")(q, k, cos, sin, position_ids, cu_seqlens)
        ctx.save_for_backward(cos, sin, position_ids, cu_seqlens)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
        dq, dk = C.kernel("triton", OP, "rotary_bwd")(grad_q.contiguous(), grad_k.contiguous(), cos, sin,
                                                      position_ids, cu_seqlens)
        return dq, dk, None, None, None, None


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def _check_position_ids(position_ids, bsz: int, seq: int, rows: int) -> torch.Tensor:
    """position_ids [1 or B, S] integers in [0, rows) -> int64 [B, S] contiguous (the kernels' form)."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(_err(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}"))
    if position_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(_err(f"position_ids must be torch.int64 or torch.int32, got {position_ids.dtype}"))
    if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, bsz):
        raise ValueError(_err(f"position_ids has shape {tuple(position_ids.shape)}, expected ({bsz}, {seq}) or "
                              f"(1, {seq})"))
    if position_ids.numel():
        lo, hi = int(position_ids.min()), int(position_ids.max())  # a host sync for CUDA tensors
        if lo < 0 or hi >= rows:
            raise ValueError(_err(f"position_ids must lie in [0, {rows}) (the rows of cos/sin), got values in "
                                  f"[{lo}, {hi}]"))
    return position_ids.to(torch.int64).expand(bsz, seq).contiguous()


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           position_ids: Optional[torch.Tensor] = None,
           cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin): transformers'
    apply_rotary_pos_emb, rotate_half(x) = cat(-x2, x1) over the halves of the head dim.

    Padded: q [B, S, H, D], k [B, S, Hk, D] (Hk may differ from H), any strides with unit stride along D
    (e.g. views of one fused QKV projection: read in place); cos/sin [R, D] with R >= S (row s for
    position s), [1 or B, S, D] (HF's rotary modules), or, with position_ids [1 or B, S] (int64/int32,
    values in [0, R)), a [R, D] table indexed by them. Packed (padding-free): q [total, H, D],
    k [total, Hk, D] with cu_seqlens int32 [B + 1]; positions restart at 0 in each sequence (token t
    of sequence i has position t - cu_seqlens[i]) and index a [R, D] table (R >= the longest sequence).
    D even. dtypes: q and k float16/bfloat16/float32 (float64 runs on the torch backend), cos/sin float32
    or q's dtype; the kernels compute in fp32 and round once. Returns new contiguous tensors of q's and k's
    shapes and dtype.

    cos and sin are constants, as HF's rotary buffers are: no gradient flows to them (they are detached on
    every backend). Gradients flow to q and k: the transposed rotation, exact. position_ids and cu_seqlens
    are read on the host for a bounds check (a sync for CUDA tensors).
    """
    C.check_tensor("q", q, op=OP)
    C.check_tensor("k", k, op=OP)
    C.check_tensor("cos", cos, op=OP)
    C.check_tensor("sin", sin, op=OP)
    C.check_same_dtype(OP, "q", q, k=k)
    C.check_same_dtype(OP, "cos", cos, sin=sin)
    C.check_same_device(OP, "q", q, k=k, cos=cos, sin=sin, position_ids=position_ids, cu_seqlens=cu_seqlens)
    packed = cu_seqlens is not None
    layout = "[total, H, D] (packed, with cu_seqlens)" if packed else "[B, S, H, D]"
    want = 3 if packed else 4
    for name, t in (("q", q), ("k", k)):
        if t.dim() != want:
            raise ValueError(_err(f"{name} must be {layout}, got shape {tuple(t.shape)}"))
    d = q.shape[-1]
    if d % 2:
        raise ValueError(_err(f"q's head dim must be even (rotary pairs dims i and i + D/2), got {d}"))
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != d:
        raise ValueError(_err(f"k has shape {tuple(k.shape)}, expected q's {tuple(q.shape)} up to its head count"))
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(_err(f"{name} must have unit stride along its head dim, got strides {t.stride()}"))
    if cos.shape != sin.shape:
        raise ValueError(_err(f"sin has shape {tuple(sin.shape)}, expected cos's {tuple(cos.shape)}"))
    if cos.dim() not in (2, 3) or cos.shape[-1] != d:
        raise ValueError(_err(f"cos must be [R, {d}] or [B, S, {d}] (last dim q's head dim), got shape "
                              f"{tuple(cos.shape)}"))
    if packed:
        if position_ids is not None:
            raise ValueError(_err("position_ids cannot be given with cu_seqlens: packed positions come from "
                                  "cu_seqlens"))
        if cos.dim() != 2:
            raise ValueError(_err(f"cos must be a [max_pos, {d}] table with cu_seqlens, got shape "
                                  f"{tuple(cos.shape)}"))
        longest = C.check_cu_seqlens(OP, cu_seqlens, q.shape[0])  # a host sync: positions index the tables
        if longest > cos.shape[0]:
            raise ValueError(_err(f"cos has {cos.shape[0]} rows but cu_seqlens holds a sequence of {longest} "
                                  "tokens"))
    else:
        bsz, seq = q.shape[0], q.shape[1]
        if position_ids is not None:
            if cos.dim() != 2:
                raise ValueError(_err(f"cos must be a [max_pos, {d}] table with position_ids, got shape "
                                      f"{tuple(cos.shape)}"))
            position_ids = _check_position_ids(position_ids, bsz, seq, cos.shape[0])
        elif cos.dim() == 2:
            if cos.shape[0] < seq:
                raise ValueError(_err(f"cos has {cos.shape[0]} rows, fewer than the sequence length {seq}"))
        elif cos.shape[1] != seq or cos.shape[0] not in (1, bsz):
            raise ValueError(_err(f"cos has shape {tuple(cos.shape)}, expected ({bsz}, {seq}, {d}) or "
                                  f"(1, {seq}, {d})"))
    cos, sin = cos.detach(), sin.detach()  # constants: see the docstring

    decision = DISPATCH.choose(q.device, q=q, cos=cos)
    if decision.backend == "torch" or q.numel() == 0 or k.numel() == 0:
        q_out, k_out = reference.rotary(q, k, cos, sin, position_ids=position_ids, cu_seqlens=cu_seqlens)
        return q_out.contiguous(), k_out.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if C.needs_grad(q, k):
        if decision.backend in C.CPP_AUTOGRAD:
            return tuple(torch.ops.fastbert.rotary(q, k, cos, sin, position_ids, cu_seqlens))  # csrc/autograd.cpp
        return _RotaryFn.apply(q, k, cos, sin, position_ids, cu_seqlens)
    return tuple(C.kernel(decision.backend, OP, "rotary_fwd")(q, k, cos, sin, position_ids, cu_seqlens))
