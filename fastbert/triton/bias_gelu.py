"""Triton kernels of bias_gelu: gelu(x + b) in one elementwise pass, and its backward.

Kernels first, then the launchers. The launchers take their outputs preallocated (the op front end,
fastbert/ops/bias_gelu.py, allocates them, NaN-poisoned under test); the GELU math is in _gelu.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastbert.triton._gelu import gelu as _gelu
from fastbert.triton._gelu import gelu_grad as _gelu_grad
from fastbert.triton._gelu import on_device as _on_device


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # [rows, N] input, unit stride along N
    B,  # [N] bias (read only when HAS_BIAS)
    OUT,  # [rows, N] gelu(X + B), contiguous
    rows, N,  # sizes
    stride_x,  # X row stride
    HAS_BIAS: tl.constexpr,  # add B before the activation
    TANH: tl.constexpr,  # tanh GELU instead of exact erf GELU
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: BLOCK_R rows x BLOCK_N columns
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_r < rows)[:, None] & mask_n[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    # x + b in fp32: one rounding at the store instead of PyTorch's two (after the add, after gelu)
    h = tl.load(X + r64 * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = _gelu(h, TANH)
    tl.store(OUT + r64 * N + offs_n[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,  # [rows, N] gradient of the output, unit stride along N
    X,  # [rows, N] forward input, unit stride along N
    B,  # [N] forward bias (read only when HAS_BIAS)
    DX,  # [rows, N] gelu'(X + B) * DY, contiguous (also the bias gradient before the row sum)
    rows, N,  # sizes
    stride_dy, stride_x,  # row strides
    HAS_BIAS: tl.constexpr,  # the forward added B
    TANH: tl.constexpr,  # tanh GELU instead of exact erf GELU
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,  # tile: BLOCK_R rows x BLOCK_N columns
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_r < rows)[:, None] & mask_n[None, :]
    r64 = offs_r.to(tl.int64)[:, None]
    h = tl.load(X + r64 * stride_x + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(DY + r64 * stride_dy + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    dx = _gelu_grad(h, TANH) * dy
    tl.store(DX + r64 * N + offs_n[None, :], dx.to(DX.dtype.element_ty), mask=mask)

# ----------------------------------------------------------------------------------------------
# launchers (inputs are checked by fastbert/ops/bias_gelu.py; outputs come preallocated)
# ----------------------------------------------------------------------------------------------
def _elementwise_tile(N: int):
    # ~4K elements per program: enough bytes in flight per SM for a memory-bound op, few registers
    block_n = min(triton.next_power_of_2(max(N, 1)), 1024)
    block_r = max(1, 4096 // block_n)
    return block_r, block_n, (4 if block_r * block_n >= 2048 else 2)


def bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, out: torch.Tensor) -> torch.Tensor:
    """out[:] = gelu(x + bias); x [rows, N] with unit stride along N, out [rows, N] contiguous."""
    rows, n = x.shape
    if rows == 0 or n == 0:
        return out
    block_r, block_n, warps = _elementwise_tile(n)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))
    with _on_device(x):
        _bias_gelu_fwd_kernel[grid](
            x, bias if bias is not None else x, out, rows, n, x.stride(0),
            HAS_BIAS=bias is not None, TANH=approximate == "tanh",
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return out


def bias_gelu_bwd(grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                  grad_x: torch.Tensor) -> torch.Tensor:
    """grad_x[:] = gelu'(x + bias) * grad_out; all [rows, N], unit stride along N, grad_x contiguous."""
    rows, n = x.shape
    if rows == 0 or n == 0:
        return grad_x
    block_r, block_n, warps = _elementwise_tile(n)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))
    with _on_device(x):
        _bias_gelu_bwd_kernel[grid](
            grad_out, x, bias if bias is not None else x, grad_x, rows, n, grad_out.stride(0), x.stride(0),
            HAS_BIAS=bias is not None, TANH=approximate == "tanh",
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return grad_x
