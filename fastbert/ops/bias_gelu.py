"""bias_gelu = gelu(x + b) in one elementwise pass: the epilogue of linear_gelu on the cpu/cuda backends.

The dispatch point of the op and its autograd Function. Backends: triton (fastbert/triton/bias_gelu.py,
registered below as fastbert::triton_bias_gelu_{fwd,bwd}), cpu/cuda (fastbert._C, schemas in
csrc/ops.cpp; csrc/cpu/bias_gelu.cpp, csrc/cuda/bias_gelu.cu), torch (fastbert/reference.py under
autograd). Tests: tests/ops/test_bias_gelu.py (the cpu/cuda specifics: test_cpu_backend.py,
test_cuda_backend.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP = "bias_gelu"


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them).
# Outputs are allocated here (NaN-poisoned under FASTBERT_POISON_OUTPUTS=1) and filled by the kernels.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_bias_gelu_fwd", mutates_args=())
def _triton_bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    return C.triton_module(OP).bias_gelu_fwd(x, bias, approximate, C.empty_like(x))


@torch.library.custom_op("fastbert::triton_bias_gelu_bwd", mutates_args=())
def _triton_bias_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                          approximate: str) -> torch.Tensor:
    return C.triton_module(OP).bias_gelu_bwd(grad_out, x, bias, approximate, C.empty_like(x))


def _bias_gelu_fwd_fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_bwd_fake(grad_out, x, bias, approximate):
    return x.new_empty(x.shape)


C.register_fake_both("bias_gelu_fwd", _bias_gelu_fwd_fake)
C.register_fake_both("bias_gelu_bwd", _bias_gelu_bwd_fake)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
DISPATCH = backends.Dispatcher(
    OP, kernels=C.cpp_kernels("bias_gelu_fwd", "bias_gelu_bwd"), checks=C.DTYPE_CHECKS, key=C.dtype_key)


class _BiasGeluFn(torch.autograd.Function):
    """The triton backend's autograd (cpu/cuda: fastbert::bias_gelu, a C++ graph node)."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        out = C.kernel("triton", OP, "bias_gelu_fwd")(x, bias, approximate)
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x = C.kernel("triton", OP, "bias_gelu_bwd")(grad_out.contiguous(), x, bias, ctx.approximate)
        need = ctx.needs_input_grad
        grad_b = grad_x.sum(0) if (bias is not None and need[1]) else None
        return grad_x if need[0] else None, grad_b, None


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], *, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) in one pass: F.gelu(x + bias, approximate=approximate).

    x: [..., N] (float16, bfloat16, float32; float64 runs on the torch backend); bias: [N] of x's dtype,
    or None. approximate: "none" (exact erf GELU, BERT's) or "tanh". The sum and the GELU are computed
    in fp32 and rounded once. Returns a tensor of x's shape and dtype.
    """
    op = OP
    C.check_tensor("x", x, op=op)
    if x.dim() < 1:
        raise ValueError(f"fastbert.ops.{op}: x must have at least 1 dim, got a scalar")
    n = x.shape[-1]
    C.check_tensor("bias", bias, op=op, ndim=(1,), optional=True)
    if bias is not None and bias.shape[0] != n:
        raise ValueError(f"fastbert.ops.{op}: bias has shape {tuple(bias.shape)}, expected ({n},) to match x's "
                         "last dim")
    C.check_same_dtype(op, "x", x, bias=bias)
    C.check_same_device(op, "x", x, bias=bias)
    approximate = C.check_approximate(op, approximate)

    decision = DISPATCH.choose(x.device, x=x, bias=bias)
    if decision.backend == "torch" or x.numel() == 0:
        return reference.bias_gelu(x, bias, approximate=approximate)
    x2 = x.reshape(-1, n).contiguous()
    b = bias.contiguous() if bias is not None else None
    if C.needs_grad(x, bias):
        if decision.backend in C.CPP_AUTOGRAD:
            out = torch.ops.fastbert.bias_gelu(x2, b, approximate)  # C++ graph node (csrc/autograd.cpp)
        else:
            out = _BiasGeluFn.apply(x2, b, approximate)
    else:
        out = C.kernel(decision.backend, OP, "bias_gelu_fwd")(x2, b, approximate)
    return out.reshape(x.shape)
