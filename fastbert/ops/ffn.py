"""The GELU feed-forward: linear_gelu = gelu(x @ W^T + b) (BertIntermediate) and bias_gelu = gelu(x + b).

The dispatch points of both ops and their autograd Functions. Backends: triton (fastbert/triton/ffn.py,
registered below as fastbert::triton_{bias_gelu,linear_gelu}_{fwd,bwd}), cpu/cuda (fastbert._C, schemas
in csrc/ops.cpp: a GEMM then the fused bias_gelu kernel), torch (fastbert/reference.py under autograd).

linear_gelu's forward keeps the pre-activation x @ W^T + b (in x's dtype, as PyTorch's autograd does
for F.linear + F.gelu) only when a gradient is needed; the backward is g = gelu'(pre) * dy (the
bias_gelu backward kernel with no bias), dx = g @ W, dW = g^T @ x, db = sum_rows g.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP_BIAS_GELU = "bias_gelu"
OP_LINEAR_GELU = "linear_gelu"


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them).
# Outputs are allocated here (NaN-poisoned under FASTBERT_POISON_OUTPUTS=1) and filled by the kernels.
# ----------------------------------------------------------------------------------------------
def _empty_like(t: torch.Tensor, shape=None) -> torch.Tensor:
    return C.new_empty(tuple(t.shape) if shape is None else shape, dtype=t.dtype, device=t.device)


@torch.library.custom_op("fastbert::triton_bias_gelu_fwd", mutates_args=())
def _triton_bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    return C.triton_module(OP_BIAS_GELU).bias_gelu_fwd(x, bias, approximate, _empty_like(x))


@torch.library.custom_op("fastbert::triton_bias_gelu_bwd", mutates_args=())
def _triton_bias_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                          approximate: str) -> torch.Tensor:
    return C.triton_module(OP_BIAS_GELU).bias_gelu_bwd(grad_out, x, bias, approximate, _empty_like(x))


@torch.library.custom_op("fastbert::triton_linear_gelu_fwd", mutates_args=())
def _triton_linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            approximate: str, save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], weight.shape[0])
    out = _empty_like(x, shape)
    pre = _empty_like(x, shape) if save_pre else x.new_empty((0,))
    C.triton_module(OP_LINEAR_GELU).linear_gelu_fwd(x, weight, bias, approximate, out, pre if save_pre else None)
    return out, pre


@torch.library.custom_op("fastbert::triton_linear_gelu_bwd", mutates_args=())
def _triton_linear_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], pre: torch.Tensor,
                            approximate: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tk = C.triton_module(OP_LINEAR_GELU)
    # pre already holds the bias, so gelu' is evaluated at pre itself
    g = tk.bias_gelu_bwd(grad_out, pre, None, approximate, _empty_like(pre))
    if x.dtype == torch.float32:
        # fp32 stays IEEE whatever torch's TF32 switches say: the GEMM kernel with ieee products
        grad_x = tk.matmul_ieee(g, weight, _empty_like(x))
        grad_w = tk.matmul_ieee(g.t(), x, _empty_like(weight))
    else:
        # 16-bit: cuBLAS with fp32 accumulation, exactly what PyTorch's own backward runs
        grad_x = torch.matmul(g, weight)
        grad_w = torch.matmul(g.t(), x)
    grad_b = g.sum(0) if bias is not None else weight.new_empty((0,))
    return grad_x, grad_w, grad_b


def _bias_gelu_fwd_fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_bwd_fake(grad_out, x, bias, approximate):
    return x.new_empty(x.shape)


def _linear_gelu_fwd_fake(x, weight, bias, approximate, save_pre):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


def _linear_gelu_bwd_fake(grad_out, x, weight, bias, pre, approximate):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((0,)) if bias is None else bias.new_empty(bias.shape))


C.register_fake_both("bias_gelu_fwd", _bias_gelu_fwd_fake)
C.register_fake_both("bias_gelu_bwd", _bias_gelu_bwd_fake)
C.register_fake_both("linear_gelu_fwd", _linear_gelu_fwd_fake)
C.register_fake_both("linear_gelu_bwd", _linear_gelu_bwd_fake)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _kernel_check(x, **_) -> List[str]:
    if x.dtype not in C.KERNEL_DTYPES:
        return [f"dtype {x.dtype} (kernels take float16, bfloat16, float32)"]
    return []


def _dispatch_key(x, **_):
    """Everything _kernel_check reads (the Dispatchers cache decisions by it)."""
    return x.dtype


_CHECKS = {"triton": _kernel_check, "cuda": _kernel_check, "cpu": _kernel_check}
DISPATCH_BIAS_GELU = backends.Dispatcher(
    OP_BIAS_GELU, kernels=C.cpp_kernels("bias_gelu_fwd", "bias_gelu_bwd"), checks=_CHECKS, key=_dispatch_key)
DISPATCH_LINEAR_GELU = backends.Dispatcher(
    OP_LINEAR_GELU, kernels=C.cpp_kernels("linear_gelu_fwd", "linear_gelu_bwd"), checks=_CHECKS,
    key=_dispatch_key)


class _BiasGeluFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::bias_gelu, a C++ graph node)."""

    @staticmethod
    def forward(ctx, x, bias, approximate, backend):
        out = C.kernel(backend, OP_BIAS_GELU, "bias_gelu_fwd")(x, bias, approximate)
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x = C.kernel(ctx.backend, OP_BIAS_GELU, "bias_gelu_bwd")(grad_out.contiguous(), x, bias, ctx.approximate)
        need = ctx.needs_input_grad
        grad_b = grad_x.sum(0) if (bias is not None and need[1]) else None
        return grad_x if need[0] else None, grad_b, None, None


class _LinearGeluFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::linear_gelu, a C++ graph node)."""

    @staticmethod
    def forward(ctx, x, weight, bias, approximate, save_pre, backend):
        out, pre = C.kernel(backend, OP_LINEAR_GELU, "linear_gelu_fwd")(x, weight, bias, approximate, save_pre)
        ctx.save_for_backward(x, weight, bias, pre)
        ctx.approximate = approximate
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, pre = ctx.saved_tensors
        grad_x, grad_w, grad_b = C.kernel(ctx.backend, OP_LINEAR_GELU, "linear_gelu_bwd")(
            grad_out.contiguous(), x, weight, bias, pre, ctx.approximate)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if (bias is not None and need[2]) else None, None, None, None)


def _check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"fastbert.ops.{op}: {name} has dtype {t.dtype}, expected {ref_name}'s dtype {ref.dtype}")


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], *, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) in one pass: F.gelu(x + bias, approximate=approximate).

    x: [..., N] (float16, bfloat16, float32; float64 runs on the torch backend); bias: [N] of x's dtype,
    or None. approximate: "none" (exact erf GELU, BERT's) or "tanh". The sum and the GELU are computed
    in fp32 and rounded once. Returns a tensor of x's shape and dtype.
    """
    op = OP_BIAS_GELU
    C.check_tensor("x", x, op=op)
    if x.dim() < 1:
        raise ValueError(f"fastbert.ops.{op}: x must have at least 1 dim, got a scalar")
    n = x.shape[-1]
    C.check_tensor("bias", bias, op=op, ndim=(1,), optional=True)
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"fastbert.ops.{op}: bias has shape {tuple(bias.shape)}, expected ({n},) to match x's last dim")
    _check_same_dtype(op, "x", x, bias=bias)
    C.check_same_device(op, "x", x, bias=bias)
    approximate = C.check_approximate(op, approximate)

    decision = DISPATCH_BIAS_GELU.choose(x.device, x=x, bias=bias)
    if decision.backend == "torch" or x.numel() == 0:
        return reference.bias_gelu(x, bias, approximate=approximate)
    x2 = x.reshape(-1, n).contiguous()
    b = bias.contiguous() if bias is not None else None
    if C.needs_grad(x, bias):
        if decision.backend in C.CPP_AUTOGRAD:
            out = torch.ops.fastbert.bias_gelu(x2, b, approximate)  # C++ graph node (csrc/autograd.cpp)
        else:
            out = _BiasGeluFn.apply(x2, b, approximate, decision.backend)
    else:
        out = C.kernel(decision.backend, OP_BIAS_GELU, "bias_gelu_fwd")(x2, b, approximate)
    return out.reshape(x.shape)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                approximate: str = "none") -> torch.Tensor:
    """gelu(x @ weight^T + bias) as one GEMM with bias + GELU in its epilogue:
    F.gelu(F.linear(x, weight, bias), approximate=approximate).

    x: [..., K] (float16, bfloat16, float32; float64 runs on the torch backend); weight: [N, K] and
    bias: [N] (or None), both of x's dtype. approximate: "none" (exact erf GELU, BERT's) or "tanh".
    The GEMM accumulates in fp32 (IEEE products at fp32, never TF32); bias and GELU are applied to the
    fp32 accumulator and the result rounded once. Returns [..., N] in x's dtype.
    """
    op = OP_LINEAR_GELU
    C.check_tensor("x", x, op=op)
    if x.dim() < 1:
        raise ValueError(f"fastbert.ops.{op}: x must have at least 1 dim, got a scalar")
    C.check_tensor("weight", weight, op=op, ndim=(2,))
    C.check_tensor("bias", bias, op=op, ndim=(1,), optional=True)
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"fastbert.ops.{op}: weight has shape {tuple(weight.shape)}, expected (N, {k}): "
                         "its second dim must match x's last dim")
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"fastbert.ops.{op}: bias has shape {tuple(bias.shape)}, expected ({n},) to match "
                         "weight's first dim")
    _check_same_dtype(op, "x", x, weight=weight, bias=bias)
    C.check_same_device(op, "x", x, weight=weight, bias=bias)
    approximate = C.check_approximate(op, approximate)

    decision = DISPATCH_LINEAR_GELU.choose(x.device, x=x, weight=weight, bias=bias)
    if decision.backend == "torch" or x.numel() == 0 or n == 0:
        return reference.linear_gelu(x, weight, bias, approximate=approximate)
    x2 = x.reshape(-1, k).contiguous()
    w, b = weight.contiguous(), bias.contiguous() if bias is not None else None
    if C.needs_grad(x, weight, bias):
        if decision.backend in C.CPP_AUTOGRAD:
            out = torch.ops.fastbert.linear_gelu(x2, w, b, approximate)  # C++ graph node (csrc/autograd.cpp)
        else:
            out = _LinearGeluFn.apply(x2, w, b, approximate, True, decision.backend)
    else:
        out = C.kernel(decision.backend, OP_LINEAR_GELU, "linear_gelu_fwd")(x2, w, b, approximate, False)[0]
    return out.reshape(*x.shape[:-1], n)
