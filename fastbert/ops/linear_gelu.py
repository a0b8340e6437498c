"""linear_gelu = gelu(x @ W^T + b) (BertIntermediate): one GEMM with bias + GELU in its epilogue.

The dispatch point of the op and its autograd Function. Backends: triton (fastbert/triton/linear_gelu.py,
registered below as fastbert::triton_linear_gelu_{fwd,bwd}), cpu/cuda (fastbert._C, schemas in
csrc/ops.cpp: a GEMM then the fused bias_gelu kernel; csrc/cpu/linear_gelu.cpp,
csrc/cuda_bindings/linear_gelu.cpp), torch (fastbert/reference.py under autograd). Tests:
tests/ops/test_linear_gelu.py (the cpu/cuda specifics: test_cpu_backend.py, test_cuda_backend.py).

The forward keeps the pre-activation x @ W^T + b (in x's dtype, as PyTorch's autograd does for
F.linear + F.gelu) only when a gradient is needed; the backward is g = gelu'(pre) * dy (the bias_gelu
backward kernel with no bias), dx = g @ W, dW = g^T @ x, db = sum_rows g.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP = "linear_gelu"


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them).
# Outputs are allocated here (NaN-poisoned under FASTBERT_POISON_OUTPUTS=1) and filled by the kernels.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_linear_gelu_fwd", mutates_args=())
def _triton_linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            approximate: str, save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], weight.shape[0])
    out = C.empty_like(x, shape)
    pre = C.empty_like(x, shape) if save_pre else x.new_empty((0,))
    C.triton_module(OP).linear_gelu_fwd(x, weight, bias, approximate, out, pre if save_pre else None)
    return out, pre


@torch.library.custom_op("fastbert::triton_linear_gelu_bwd", mutates_args=())
def _triton_linear_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], pre: torch.Tensor,
                            approximate: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tk = C.triton_module(OP)
    # pre already holds the bias, so gelu' is evaluated at pre itself
    g = C.triton_module("bias_gelu").bias_gelu_bwd(grad_out, pre, None, approximate, C.empty_like(pre))
    if x.dtype == torch.float32:
        # fp32 stays IEEE whatever torch's TF32 switches say: the GEMM kernel with ieee products
        grad_x = tk.matmul_ieee(g, weight, C.empty_like(x))
        grad_w = tk.matmul_ieee(g.t(), x, C.empty_like(weight))
    else:
        # 16-bit: cuBLAS with fp32 accumulation, exactly what PyTorch's own backward runs
        grad_x = torch.matmul(g, weight)
        grad_w = torch.matmul(g.t(), x)
    grad_b = g.sum(0) if bias is not None else weight.new_empty((0,))
    return grad_x, grad_w, grad_b


def _linear_gelu_fwd_fake(x, weight, bias, approximate, save_pre):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


def _linear_gelu_bwd_fake(grad_out, x, weight, bias, pre, approximate):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((0,)) if bias is None else bias.new_empty(bias.shape))


C.register_fake_both("linear_gelu_fwd", _linear_gelu_fwd_fake)
C.register_fake_both("linear_gelu_bwd", _linear_gelu_bwd_fake)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
DISPATCH = backends.Dispatcher(
    OP, kernels=C.cpp_kernels("linear_gelu_fwd", "linear_gelu_bwd"), checks=C.DTYPE_CHECKS, key=C.dtype_key)


class _LinearGeluFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::linear_gelu, a C++ graph node)."""

    @staticmethod
    def forward(ctx, x, weight, bias, approximate, save_pre):
        out, pre = C.kernel("triton", OP, "linear_gelu_fwd")(x, weight, bias, approximate, save_pre)
        ctx.save_for_backward(x, weight, bias, pre)
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, pre = ctx.saved_tensors
        grad_x, grad_w, grad_b = C.kernel("triton", OP, "linear_gelu_bwd")(
            grad_out.contiguous(), x, weight, bias, pre, ctx.approximate)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if (bias is not None and need[2]) else None, None, None)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                approximate: str = "none") -> torch.Tensor:
    """gelu(x @ weight^T + bias) as one GEMM with bias + GELU in its epilogue:
    F.gelu(F.linear(x, weight, bias), approximate=approximate).

    x: [..., K] (float16, bfloat16, float32; float64 runs on the torch backend); weight: [N, K] and
    bias: [N] (or None), both of x's dtype. approximate: "none" (exact erf GELU, BERT's) or "tanh".
    The GEMM accumulates in fp32 (IEEE products at fp32, never TF32); bias and GELU are applied to the
    fp32 accumulator and the result rounded once. Returns [..., N] in x's dtype.
    """
    op = OP
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
    C.check_same_dtype(op, "x", x, weight=weight, bias=bias)
    C.check_same_device(op, "x", x, weight=weight, bias=bias)
    approximate = C.check_approximate(op, approximate)

    decision = DISPATCH.choose(x.device, x=x, weight=weight, bias=bias)
    if decision.backend == "torch" or x.numel() == 0 or n == 0:
        return reference.linear_gelu(x, weight, bias, approximate=approximate)
    x2 = x.reshape(-1, k).contiguous()
    w, b = weight.contiguous(), bias.contiguous() if bias is not None else None
    if C.needs_grad(x, weight, bias):
        if decision.backend in C.CPP_AUTOGRAD:
            out = torch.ops.fastbert.linear_gelu(x2, w, b, approximate)  # C++ graph node (csrc/autograd.cpp)
        else:
            out = _LinearGeluFn.apply(x2, w, b, approximate, True)
    else:
        out = C.kernel(decision.backend, OP, "linear_gelu_fwd")(x2, w, b, approximate, False)[0]
    return out.reshape(*x.shape[:-1], n)
