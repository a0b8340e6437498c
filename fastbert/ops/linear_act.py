"""linear_act = [dropout](act(x W^T + b) [* (x W_l^T + b_l)]): the feed-forward's first half, generalized
for pre-norm models (GPT-2's Conv1D layout, ModernBERT's gated GLU, T5 v1.1's gated GELU, ReLU/SiLU).

The cases fastbert.ops.linear_gelu serves (GELU exact/tanh, an nn.Linear weight, no gate, no dropout) go
to linear_gelu itself: same kernels, same dispatch, nothing added. Every other case is dispatched here:
cpu: fastbert._C's linear_act_fwd/_bwd (csrc/cpu/linear_act.cpp, row-blocked: the [M, 2N] gated product
never exists in full; the backward recomputes h), under the Python autograd Function below; triton:
the plain form (any activation, either layout) on linear_gelu's GEMM kernel (ACTIVATION 3/4 = ReLU/SiLU,
a "kn" weight as a transposed view); the gated form and dropout on triton, and every case on cuda, have
no kernel yet, so those checks refuse with the reason (fastbert.explain() shows it) and on CUDA tensors
the torch backend (fastbert/reference.py under autograd) runs: never a silently different result.
Tests: tests/ops/test_linear_act.py.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from fastbert import backends, reference
from fastbert.ops import _common as C
from fastbert.ops.linear_gelu import linear_gelu

OP = "linear_act"
LAYOUTS = ("nk", "kn")


def _triton_check(x, activation, weight_layout, gated, dropout_p, **_) -> List[str]:
    """triton: the plain form (any activation, either layout) is linear_gelu's GEMM kernel with the
    activation in its epilogue; the gated form and dropout have no Triton kernel yet."""
    why = C.dtype_check(x)
    new = (["gated=True"] if gated else []) + (["dropout_p > 0"] if dropout_p > 0.0 else [])
    if new:
        why.append(", ".join(new) + ": no Triton linear_act kernel for the gated form or dropout yet")
    return why


def _no_kernel_check(x, activation, weight_layout, gated, dropout_p, **_) -> List[str]:
    """cuda: no linear_act kernel; linear_gelu's cases never reach this dispatcher."""
    why = C.dtype_check(x)
    new = []
    if activation not in ("none", "tanh"):
        new.append(f"activation={activation!r}")
    if weight_layout != "nk":
        new.append(f"weight_layout={weight_layout!r}")
    if gated:
        new.append("gated=True")
    if dropout_p > 0.0:
        new.append("dropout_p > 0")
    if new:
        why.append(", ".join(new) + ": no linear_act kernel on this backend yet (it serves only "
                   "linear_gelu's cases: GELU, 'nk' weight, no gate, no dropout)")
    return why


def _key(x, activation, weight_layout, gated, dropout_p, **_):
    return (x.dtype, activation, weight_layout, bool(gated), dropout_p > 0.0)


DISPATCH = backends.Dispatcher(
    OP, kernels={"cpu": ("linear_act_fwd", "linear_act_bwd")},
    checks={"triton": _triton_check, "cuda": _no_kernel_check, "cpu": C.dtype_check}, key=_key)


# the Triton plain form (linear_gelu's kernel, ACTIVATION 1-4; "kn": a transposed view, no copy)
@torch.library.custom_op("fastbert::triton_linear_act_fwd", mutates_args=())
def _triton_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                weight_kn: bool, save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], weight.shape[1] if weight_kn else weight.shape[0])
    out = C.empty_like(x, shape)
    pre = C.empty_like(x, shape) if save_pre else x.new_empty((0,))
    C.triton_module("linear_gelu").linear_act_fwd(x, weight, bias, activation, weight_kn, out,
                                                  pre if save_pre else None)
    return out, pre


def _act_grad(h: torch.Tensor, act: str) -> torch.Tensor:
    """act'(h) in fp32 (h fp32)."""
    if act == "relu":
        return (h > 0).to(h.dtype)
    if act == "silu":
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if act == "tanh":
        c, a = 0.7978845608028654, 0.044715
        t = torch.tanh(c * (h + a * h ** 3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * a * h * h)
    return 0.5 * (1 + torch.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * torch.exp(-0.5 * h * h)


@torch.library.custom_op("fastbert::triton_linear_act_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                pre: torch.Tensor, activation: str,
                weight_kn: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # g = dy * act'(pre) in fp32, rounded once to x's dtype (what the GEMMs take)
    g = (grad_out.float() * _act_grad(pre.float(), activation)).to(x.dtype)
    w_nk = weight.t() if weight_kn else weight  # [N, K] view, no copy
    if x.dtype == torch.float32:
        tk = C.triton_module("linear_gelu")
        grad_x = tk.matmul_ieee(g, w_nk, C.empty_like(x))
        grad_w = (tk.matmul_ieee(x.t(), g, C.empty_like(weight)) if weight_kn
                  else tk.matmul_ieee(g.t(), x, C.empty_like(weight)))
    else:
        grad_x = torch.matmul(g, w_nk)
        grad_w = torch.matmul(x.t(), g) if weight_kn else torch.matmul(g.t(), x)
    grad_b = g.float().sum(0).to(bias.dtype) if bias is not None else weight.new_empty((0,))
    return grad_x, grad_w, grad_b


@_triton_fwd.register_fake
def _(x, weight, bias, activation, weight_kn, save_pre):
    shape = (x.shape[0], weight.shape[1] if weight_kn else weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@_triton_bwd.register_fake
def _(grad_out, x, weight, bias, pre, activation, weight_kn):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((0,)) if bias is None else bias.new_empty(bias.shape))


class _TritonLinearActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, weight_kn):
        out, pre = torch.ops.fastbert.triton_linear_act_fwd(x, weight, bias, activation, weight_kn, True)
        ctx.save_for_backward(x, weight, bias, pre)
        ctx.args = (activation, weight_kn)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, pre = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.fastbert.triton_linear_act_bwd(
            grad_out.contiguous(), x, weight, bias, pre, *ctx.args)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if (bias is not None and need[2]) else None, None, None)


def _fwd_fake(x, weight, bias, activation, weight_kn, gated, dropout_p, seed):
    f = weight.shape[1] if weight_kn else weight.shape[0]
    return x.new_empty((x.shape[0], f // 2 if gated else f))


def _bwd_fake(grad_out, x, weight, bias, activation, weight_kn, gated, dropout_p, seed):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((0,)) if bias is None else bias.new_empty(bias.shape))


if backends.extension_status()[0] and hasattr(torch.ops.fastbert, "linear_act_fwd"):
    torch.library.register_fake("fastbert::linear_act_fwd")(_fwd_fake)
    torch.library.register_fake("fastbert::linear_act_bwd")(_bwd_fake)


class _LinearActFn(torch.autograd.Function):
    """The cpu backend's autograd: the forward saves only its inputs and the seed; the backward kernel
    recomputes h and regenerates the dropout mask from the seed."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, weight_kn, gated, dropout_p, seed):
        out = C.kernel("cpu", OP, "linear_act_fwd")(x, weight, bias, activation, weight_kn, gated, dropout_p, seed)
        ctx.save_for_backward(x, weight, bias, seed)
        ctx.args = (activation, weight_kn, gated, dropout_p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, seed = ctx.saved_tensors
        activation, weight_kn, gated, dropout_p = ctx.args
        grad_x, grad_w, grad_b = C.kernel("cpu", OP, "linear_act_bwd")(
            grad_out.contiguous(), x, weight, bias, activation, weight_kn, gated, dropout_p, seed)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_w if need[1] else None,
                grad_b if (bias is not None and need[2]) else None, None, None, None, None, None)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
               activation: str = "none", weight_layout: str = "nk", gated: bool = False,
               dropout_p: float = 0.0) -> torch.Tensor:
    """act(x @ W^T + bias), optionally gated, then optional dropout.

    x: [..., K] (float16, bfloat16, float32, float64). weight, bias (or None): x's dtype.
    weight_layout: "nk" (default): weight [F, K], nn.Linear's; "kn": weight [K, F] (GPT-2's Conv1D),
    multiplied in place as x @ weight (a transposed view, never a transposed copy).
    activation: "none" (exact erf GELU), "tanh" (tanh GELU), "relu", "silu".
    gated=False: out = act(h), h = x W^T + bias, F = N outputs.
    gated=True: one weight holds both halves, F = 2N; rows [0:N] of an "nk" weight (columns [0:N] of a
    "kn" one) and bias[0:N] are the ACTIVATED half, rows [N:2N] the linear half:
    out = act(h[..., :N]) * h[..., N:], exactly ModernBertMLP's `input, gate = Wi(x).chunk(2, dim=-1)`,
    `act(input) * gate` (so pass ModernBERT's Wi.weight/Wi.bias as they are).
    dropout_p > 0: dropout on the output (after the activation / the gated product), seeded from torch's
    generator for x's device (torch.manual_seed makes it reproducible), Philox keyed as the other ops'
    dropout (fastbert.reference.dropout_keep over the output's row-major indices); the backward uses the
    same mask. Returns [..., N] in x's dtype.
    The linear_gelu cases (activation "none"/"tanh", "nk", gated=False, dropout_p=0) run
    fastbert.ops.linear_gelu's kernels; the others run the cpu kernel on CPU tensors; on CUDA tensors the
    plain form runs Triton and the gated form / dropout the torch backend for now (explain() says why).
    fp32 is IEEE fp32 (no TF32); 16-bit inputs accumulate in fp32 and round once.
    """
    op = OP
    C.check_tensor("x", x, op=op)
    if x.dim() < 1:
        raise ValueError(f"fastbert.ops.{op}: x must have at least 1 dim, got a scalar")
    C.check_tensor("weight", weight, op=op, ndim=(2,))
    C.check_tensor("bias", bias, op=op, ndim=(1,), optional=True)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"fastbert.ops.{op}: activation must be one of {reference.ACTIVATIONS} ('none' is the "
                         f"exact erf GELU, 'tanh' the tanh GELU), got {activation!r}")
    if weight_layout not in LAYOUTS:
        raise ValueError(f"fastbert.ops.{op}: weight_layout must be 'nk' (weight [N, K], nn.Linear) or 'kn' "
                         f"(weight [K, N], Conv1D), got {weight_layout!r}")
    if not isinstance(gated, bool):
        raise TypeError(f"fastbert.ops.{op}: gated must be a bool, got {type(gated).__name__}")
    dropout_p = C.check_float(op, "dropout_p", dropout_p, lo=0.0, hi=1.0)
    k = x.shape[-1]
    if weight_layout == "nk":
        wk, f = weight.shape[1], weight.shape[0]
        expect = "(F, {k}) for weight_layout='nk': its second dim".format(k=k)
    else:
        wk, f = weight.shape[0], weight.shape[1]
        expect = "({k}, F) for weight_layout='kn': its first dim".format(k=k)
    if wk != k:
        raise ValueError(f"fastbert.ops.{op}: weight has shape {tuple(weight.shape)}, expected {expect} must "
                         "match x's last dim")
    if gated and f % 2:
        raise ValueError(f"fastbert.ops.{op}: weight has {f} output features; gated=True needs an even number "
                         "(2N: the activated half, then the linear half)")
    if bias is not None and bias.shape[0] != f:
        raise ValueError(f"fastbert.ops.{op}: bias has shape {tuple(bias.shape)}, expected ({f},) to match "
                         "weight's output features")
    C.check_same_dtype(op, "x", x, weight=weight, bias=bias)
    C.check_same_device(op, "x", x, weight=weight, bias=bias)

    if activation in ("none", "tanh") and weight_layout == "nk" and not gated and dropout_p == 0.0:
        return linear_gelu(x, weight, bias, approximate=activation)  # the existing kernels, unchanged
    decision = DISPATCH.choose(x.device, x=x, activation=activation, weight_layout=weight_layout, gated=gated,
                               dropout_p=dropout_p)
    seed = reference.make_seed(x.device) if dropout_p > 0.0 else None
    n = weight.shape[1 if weight_layout == "kn" else 0] // (2 if gated else 1)
    if decision.backend == "torch" or x.numel() == 0 or n == 0:
        return reference.linear_act(x, weight, bias, activation=activation, weight_layout=weight_layout,
                                    gated=gated, dropout_p=dropout_p, seed=seed)
    # weight goes as it is: a "kn" weight (or a transposed view of an nn.Linear one) is multiplied in
    # place, never copied
    x2 = x.reshape(-1, k)
    b = bias.contiguous() if bias is not None else None
    kn = weight_layout == "kn"
    if decision.backend == "triton":
        if C.needs_grad(x, weight, bias):
            out = _TritonLinearActFn.apply(x2, weight, b, activation, kn)
        else:
            out = torch.ops.fastbert.triton_linear_act_fwd(x2, weight, b, activation, kn, False)[0]
    elif C.needs_grad(x, weight, bias):
        out = _LinearActFn.apply(x2, weight, b, activation, kn, gated, dropout_p, seed)
    else:
        out = C.kernel("cpu", OP, "linear_act_fwd")(x2, weight, b, activation, kn, gated, dropout_p, seed)
    return out.reshape(*x.shape[:-1], n)
