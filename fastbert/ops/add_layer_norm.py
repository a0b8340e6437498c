"""add_layer_norm: LayerNorm(dropout(x + x_bias) + residual), the epilogue of BertSelfOutput/BertOutput,
and with return_residual=True also the pre-norm sum itself (the residual stream of pre-norm blocks: GPT-2,
ModernBERT).

The dispatch point of the op and its autograd Function. Backends: triton (fastbert/triton/add_layer_norm.py,
registered below as fastbert::triton_add_layer_norm_{fwd,fwd_pre,bwd}), cpu/cuda (fastbert._C, schemas in
csrc/ops.cpp), torch (fastbert/reference.py under autograd).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C

OP = "add_layer_norm"
MAX_HIDDEN = 8192


# ----------------------------------------------------------------------------------------------
# Triton kernels as torch ops (custom_op + register_fake: opcheck and torch.compile trace them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastbert::triton_add_layer_norm_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], x_bias: Optional[torch.Tensor], eps: float,
                dropout_p: float, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).add_layer_norm_fwd(x, weight, bias, residual, x_bias, eps, dropout_p, seed)


@torch.library.custom_op("fastbert::triton_add_layer_norm_fwd_pre", mutates_args=())
def _triton_fwd_pre(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor], x_bias: Optional[torch.Tensor], eps: float,
                    dropout_p: float, seed: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).add_layer_norm_fwd_pre(x, weight, bias, residual, x_bias, eps, dropout_p, seed)


@torch.library.custom_op("fastbert::triton_add_layer_norm_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], x_bias: Optional[torch.Tensor],
                mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor],
                grad_pre_out: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return C.triton_module(OP).add_layer_norm_bwd(grad_out, x, weight, bias, residual, x_bias, mean, rstd,
                                                  dropout_p, seed, grad_pre_out)


def _fwd_fake(x, weight, bias, residual, x_bias, eps, dropout_p, seed):
    rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


def _fwd_pre_fake(x, weight, bias, residual, x_bias, eps, dropout_p, seed):
    return _fwd_fake(x, weight, bias, residual, x_bias, eps, dropout_p, seed) + (x.new_empty(x.shape),)


def _bwd_fake(grad_out, x, weight, bias, residual, x_bias, mean, rstd, dropout_p, seed, grad_pre_out=None):
    # parameter gradients in the parameter's dtype; without weight, bias's gradient in bias's own dtype
    p_dtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else x.dtype)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape if dropout_p > 0 else (0,)),
        x.new_empty(weight.shape if weight is not None else (0,), dtype=p_dtype),
        x.new_empty(bias.shape if bias is not None else (0,), dtype=p_dtype),
        x.new_empty((0,)) if x_bias is None else x_bias.new_empty(x_bias.shape),
    )


C.register_fake_both("add_layer_norm_fwd", _fwd_fake)
C.register_fake_both("add_layer_norm_fwd_pre", _fwd_pre_fake)
C.register_fake_both("add_layer_norm_bwd", _bwd_fake)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def _kernel_check(x, weight, bias=None, x_bias=None, **_) -> List[str]:
    why = []
    if x.dtype not in C.KERNEL_DTYPES:
        why.append(f"dtype {x.dtype} (kernels take float16, bfloat16, float32)")
    if x.shape[-1] > MAX_HIDDEN:
        why.append(f"hidden size {x.shape[-1]} > {MAX_HIDDEN}")
    # bias has weight's dtype (the front end checks it); without weight, bias's own dtype counts
    param, name = (weight, "weight") if weight is not None else (bias, "bias")
    if param is not None and param.dtype not in (x.dtype, torch.float32):
        why.append(f"{name} dtype {param.dtype} is neither x's dtype nor float32")
    if x_bias is not None and x_bias.dtype not in (x.dtype, torch.float32):
        why.append(f"x_bias dtype {x_bias.dtype} is neither x's dtype nor float32")
    return why


def _dispatch_key(x, weight, bias=None, x_bias=None, **_):
    """Everything _kernel_check reads (the Dispatcher caches decisions by it)."""
    param = weight if weight is not None else bias
    return (x.dtype, x.shape[-1] > MAX_HIDDEN, None if param is None else param.dtype, weight is None,
            None if x_bias is None else x_bias.dtype)


DISPATCH = backends.Dispatcher(
    OP,
    kernels=C.cpp_kernels("add_layer_norm_fwd", "add_layer_norm_fwd_pre", "add_layer_norm_bwd"),
    checks={"triton": _kernel_check, "cuda": _kernel_check, "cpu": _kernel_check},
    key=_dispatch_key,
)


class _AddLayerNormFn(torch.autograd.Function):
    """The triton backend's autograd (the cpu/cuda backends use fastbert::add_layer_norm(_pre), whose graph
    node is C++: csrc/autograd.cpp). return_pre: also return the pre-norm sum, whose incoming gradient the
    backward kernel adds to the gradient of the sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, x_bias, eps, dropout_p, seed, return_pre):
        if return_pre:
            out, mean, rstd, pre = C.kernel("triton", OP, "add_layer_norm_fwd_pre")(
                x, weight, bias, residual, x_bias, eps, dropout_p, seed)
        else:
            out, mean, rstd = C.kernel("triton", OP, "add_layer_norm_fwd")(
                x, weight, bias, residual, x_bias, eps, dropout_p, seed)
        ctx.save_for_backward(x, weight, bias, residual, x_bias, mean, rstd, seed)
        ctx.has_residual = residual is not None
        ctx.has_x_bias = x_bias is not None
        ctx.dropout_p = dropout_p
        return (out, pre) if return_pre else out

    @staticmethod
    def backward(ctx, grad_out, grad_pre_out=None):
        x, weight, bias, residual, x_bias, mean, rstd, seed = ctx.saved_tensors
        if grad_out is None:  # only pre was used: the LayerNorm contributes nothing
            grad_out = torch.zeros_like(x)
        g_pre, g_x, g_w, g_b, g_xb = C.kernel("triton", OP, "add_layer_norm_bwd")(
            grad_out.contiguous(), x, weight, bias, residual, x_bias, mean, rstd, ctx.dropout_p, seed,
            None if grad_pre_out is None else grad_pre_out.contiguous())
        if ctx.dropout_p == 0.0:
            g_x = g_pre
        need = ctx.needs_input_grad
        return (
            g_x if need[0] else None,
            g_w if (weight is not None and need[1]) else None,
            g_b if (bias is not None and need[2]) else None,
            g_pre if (ctx.has_residual and need[3]) else None,
            g_xb if (ctx.has_x_bias and need[4]) else None,
            None, None, None, None,
        )


def add_layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    residual: Optional[torch.Tensor] = None,
    x_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    return_residual: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, in one pass.

    x, residual: [..., N], same shape and dtype (float16, bfloat16, float32; float64 runs on the
    torch backend). weight, bias, x_bias: [N], x's dtype or float32 (bias in weight's dtype); weight None
    means no scale, bias None no shift (ModernBERT's norm_bias=False). Statistics are computed in fp32.
    dropout_p > 0 applies dropout (seeded from torch's generator for x's device; the backward pass
    regenerates the same mask). Returns a tensor of x's shape and dtype.

    return_residual=True returns (out, pre) instead, pre = dropout(x + x_bias) + residual (= dropout(x +
    x_bias) without residual): the residual stream a pre-norm block (GPT-2, ModernBERT) carries on, in x's
    dtype, rounded once from the kernels' fp32 sum, out = LayerNorm(pre). Gradients flow through both.
    """
    op = OP
    C.check_tensor("x", x, op=op)
    if x.dim() < 1:
        raise ValueError(f"fastbert.ops.{op}: x must have at least 1 dim, got a scalar")
    n = x.shape[-1]
    C.check_tensor("weight", weight, op=op, ndim=(1,), optional=True)
    C.check_tensor("bias", bias, op=op, ndim=(1,), optional=True)
    C.check_tensor("residual", residual, op=op, optional=True)
    C.check_tensor("x_bias", x_bias, op=op, ndim=(1,), optional=True)
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is not None and t.shape[0] != n:
            raise ValueError(f"fastbert.ops.{op}: {name} has shape {tuple(t.shape)}, expected ({n},) to match "
                             "x's last dim")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"fastbert.ops.{op}: residual has shape {tuple(residual.shape)}, expected x's shape "
                             f"{tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"fastbert.ops.{op}: residual has dtype {residual.dtype}, expected x's dtype {x.dtype}")
    if bias is not None and weight is not None and bias.dtype != weight.dtype:
        raise TypeError(f"fastbert.ops.{op}: bias has dtype {bias.dtype}, expected weight's dtype {weight.dtype}")
    C.check_same_device(op, "x", x, weight=weight, bias=bias, residual=residual, x_bias=x_bias)
    eps = C.check_float(op, "eps", eps, lo=0.0, hi=float("inf"), lo_open=True)
    dropout_p = C.check_float(op, "dropout_p", dropout_p, lo=0.0, hi=1.0)
    if not isinstance(return_residual, bool):
        raise TypeError(f"fastbert.ops.{op}: return_residual must be a bool, got {type(return_residual).__name__}")

    decision = DISPATCH.choose(x.device, x=x, weight=weight, bias=bias, residual=residual, x_bias=x_bias)
    seed = reference.make_seed(x.device) if dropout_p > 0.0 else None
    if decision.backend == "torch" or x.numel() == 0:
        # Mixed dtypes (fp32 parameters with fp16/bf16/fp64 x) run in the promoted dtype, which
        # F.layer_norm accepts on every device; the op returns x's dtype on every backend.
        ct = x.dtype
        for t in (weight, bias, x_bias):
            if t is not None:
                ct = torch.promote_types(ct, t.dtype)

        def cast(t):
            return t if t is None or t.dtype == ct else t.to(ct)

        res = reference.add_layer_norm(cast(x), cast(weight), cast(bias), residual=cast(residual),
                                       x_bias=cast(x_bias), eps=eps, dropout_p=dropout_p, seed=seed,
                                       return_residual=return_residual)
        if not return_residual:
            return res if res.dtype == x.dtype else res.to(x.dtype)
        out, pre = (t if t.dtype == x.dtype else t.to(x.dtype) for t in res)
        return out, (pre.clone() if pre is x else pre)  # a new tensor, as the kernels return
    flat = x.dim() == 2  # already [rows, N]: no reshapes (each costs ~1.5 us of Python)
    x2 = (x if flat else x.reshape(-1, n)).contiguous()
    r2 = None if residual is None else (residual if flat else residual.reshape(-1, n)).contiguous()
    args = (x2, weight.contiguous() if weight is not None else None, bias.contiguous() if bias is not None else None,
            r2, x_bias.contiguous() if x_bias is not None else None, eps, dropout_p, seed)
    if return_residual:
        if C.needs_grad(x, weight, bias, residual, x_bias):
            if decision.backend in C.CPP_AUTOGRAD:
                out, pre = torch.ops.fastbert.add_layer_norm_pre(*args)  # C++ graph node (csrc/autograd.cpp)
            else:
                out, pre = _AddLayerNormFn.apply(*args, True)
        else:
            out, _, _, pre = C.kernel(decision.backend, OP, "add_layer_norm_fwd_pre")(*args)
        return (out, pre) if flat else (out.reshape(x.shape), pre.reshape(x.shape))
    if C.needs_grad(x, weight, bias, residual, x_bias):
        if decision.backend in C.CPP_AUTOGRAD:
            out = torch.ops.fastbert.add_layer_norm(*args)  # C++ graph node (csrc/autograd.cpp)
        else:
            out = _AddLayerNormFn.apply(*args, False)
    else:
        out = C.kernel(decision.backend, OP, "add_layer_norm_fwd")(*args)[0]
    return out if flat else out.reshape(x.shape)
