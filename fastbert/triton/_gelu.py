"""GELU math shared by the bias_gelu and linear_gelu Triton kernels (jit helpers, no kernels).

Every kernel computes it in fp32, whatever the storage dtype, and rounds once on store:

  exact ("none"):  gelu(h)  = h * Phi(h),  Phi(h) = 0.5 * (1 + erf(h / sqrt(2)))
                   gelu'(h) = Phi(h) + h * phi(h),  phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
     (d/dh [h Phi(h)] = Phi + h Phi', and Phi' is the normal density phi.)

  tanh ("tanh"):   gelu(h)  = 0.5 * h * (1 + tanh(u)),  u = c * (h + a h^3),  c = sqrt(2/pi), a = 0.044715
     0.5 * (1 + tanh(u)) = sigmoid(2u), so gelu(h) = h * s with s = sigmoid(2u): no tanh (libdevice)
     is needed, and no cancellation in 1 + tanh(u) near u = -inf.
                   gelu'(h) = s + h * ds/dh = s + h * 2 u' * s (1 - s),  u' = c * (1 + 3 a h^2)
     With t = exp(-2|u|) in (0, 1] (never overflows): s = 1/(1+t) for u >= 0 and t/(1+t) for u < 0,
     and s (1 - s) = t / (1+t)^2 in both cases, so very negative u gives 0 instead of 0 * inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastbert import _runtime

# exp for the GELU math. On a GPU tl.exp is ex2.approx after a rounded multiply by log2(e) (a few ulp
# off for |x| of a few units); libdevice's exp is accurate to 1 ulp, as PyTorch's expf is. Its division
# is correctly rounded (tl.math.div_rn) for the same reason; the interpreter has no libdevice and its
# tl.exp is numpy's (accurate), so it keeps tl.exp.
_LIBDEVICE_EXP = tl.constexpr(not _runtime.triton_interpreter())


@triton.jit
def _exp(x):
    if _LIBDEVICE_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)

# epilogue activations of the linear_gelu GEMM kernel
ACT_IDENTITY = 0
ACT_GELU_ERF = 1
ACT_GELU_TANH = 2
ACT_RELU = 3  # linear_act only
ACT_SILU = 4  # linear_act only
ACTIVATION = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH}
LINEAR_ACT = {"none": ACT_GELU_ERF, "tanh": ACT_GELU_TANH, "relu": ACT_RELU, "silu": ACT_SILU}

# Globals read inside @triton.jit must be tl.constexpr (the interpreter does not enforce it; the
# compiler does).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_A = tl.constexpr(0.044715)


@triton.jit
def gelu(h, TANH: tl.constexpr):
    """gelu(h) for fp32 h (see the module doc)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (h + _TANH_A * h * h * h)
        t = _exp(-2.0 * tl.abs(u))
        s = tl.where(u >= 0, tl.math.div_rn(1.0, 1.0 + t), tl.math.div_rn(t, 1.0 + t))
        return h * s
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def gelu_grad(h, TANH: tl.constexpr):
    """gelu'(h) for fp32 h (see the module doc)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (h + _TANH_A * h * h * h)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_A * h * h)
        t = _exp(-2.0 * tl.abs(u))
        r = tl.math.div_rn(1.0, 1.0 + t)
        s = tl.where(u >= 0, r, t * r)
        return s + h * (2.0 * du) * (t * r * r)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2))
        pdf = _INV_SQRT_2PI * _exp(-0.5 * h * h)
        return cdf + h * pdf


class on_device:
    """Launch on the tensor's CUDA device (Triton launches on the current device)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.is_cuda else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
