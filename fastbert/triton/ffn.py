"""Triton kernels of the GELU feed-forward: gelu(x @ W^T + b) as ONE GEMM with bias + GELU in its
epilogue, and the fused elementwise gelu(x + b) with its backward.

Kernels first, then the launchers. The launchers take their outputs preallocated (the op front end
in fastbert/ops/ffn.py allocates them, NaN-poisoned under test), so this module imports nothing of
fastbert's and the data flow stays one-way (ops -> triton).

GELU math (every kernel computes it in fp32, whatever the storage dtype, and rounds once on store):

  exact ("none"):  gelu(h)  = h * Phi(h),  Phi(h) = 0.5 * (1 + erf(h / sqrt(2)))
                   gelu'(h) = Phi(h) + h * phi(h),  phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
     (d/dh [h Phi(h)] = Phi + h Phi', and Phi' is the normal density phi.)

  tanh ("tanh"):   gelu(h)  = 0.5 * h * (1 + tanh(u)),  u = c * (h + a h^3),  c = sqrt(2/pi), a = 0.044715
     0.5 * (1 + tanh(u)) = sigmoid(2u), so gelu(h) = h * s with s = sigmoid(2u): no tanh (libdevice)
     is needed, and no cancellation in 1 + tanh(u) near u = -inf.
                   gelu'(h) = s + h * ds/dh = s + h * 2 u' * s (1 - s),  u' = c * (1 + 3 a h^2)
     With t = exp(-2|u|) in (0, 1] (never overflows): s = 1/(1+t) for u >= 0 and t/(1+t) for u < 0,
     and s (1 - s) = t / (1+t)^2 in both cases, so very negative u gives 0 instead of 0 * inf.

The GEMM's backward (dx = g @ W, dW = g^T @ x with g = gelu'(pre) * dy) reuses the forward kernel
with ACTIVATION = identity on transposed strided views: `a @ b^T` only needs strides, so no
transposed copy is made. It is used for fp32, where it guarantees IEEE products (tl.dot
input_precision="ieee") whatever torch's TF32 switches say; 16-bit GEMMs go to torch.matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastbert import _runtime

_INTERPRET = _runtime.triton_interpreter()

# exp for the GELU math. On a GPU tl.exp is ex2.approx after a rounded multiply by log2(e) (a few ulp
# off for |x| of a few units); libdevice's exp is accurate to 1 ulp, as PyTorch's expf is. Its division
# is correctly rounded (tl.math.div_rn) for the same reason; the interpreter has no libdevice and its
# tl.exp is numpy's (accurate), so it keeps tl.exp.
_LIBDEVICE_EXP = tl.constexpr(not _INTERPRET)


@triton.jit
def _exp(x):
    if _LIBDEVICE_EXP:
        return libdevice.exp(x)
    else:
        return tl.exp(x)

_ACT_IDENTITY = 0
_ACT_GELU_ERF = 1
_ACT_GELU_TANH = 2
_ACTIVATION = {"none": _ACT_GELU_ERF, "tanh": _ACT_GELU_TANH}

# Globals read inside @triton.jit must be tl.constexpr (the interpreter does not enforce it; the
# compiler does).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_A = tl.constexpr(0.044715)


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    """gelu(h) for fp32 h (see the module doc)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (h + _TANH_A * h * h * h)
        t = _exp(-2.0 * tl.abs(u))
        s = tl.where(u >= 0, tl.math.div_rn(1.0, 1.0 + t), tl.math.div_rn(t, 1.0 + t))
        return h * s
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def _gelu_grad(h, TANH: tl.constexpr):
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


# ----------------------------------------------------------------------------------------------
# GEMM + bias + activation
# ----------------------------------------------------------------------------------------------
def _gemm_configs():
    if _INTERPRET:
        # The interpreter cannot benchmark configs; one small tile keeps it quick.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})]
    cfg = []
    # Large tiles for the bf16/fp16 tensor-core path (Ampere/Hopper), smaller ones for small
    # problems and for fp32 IEEE (FMA, register-bound); the autotuner picks per shape bucket.
    for bm, bn, bk, stages, warps in (
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 8),
        (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4),
    ):
        cfg.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                 num_stages=stages, num_warps=warps))
    return cfg


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Benchmark only tiles that can win: none larger than the problem (a 256-row tile for 7 rows
    wastes the launch and the autotuning time), and at fp32 (IEEE products on FMA units, fp32
    operands in registers) none above 128 x 64 x 32, which spill."""
    if len(configs) == 1:
        return configs

    def cap(v):
        return max(32, triton.next_power_of_2(int(v)))

    m, n, k = cap(named_args["M_BUCKET"]), cap(named_args["N"]), cap(named_args["K"])
    ieee = kwargs.get("IEEE", named_args.get("IEEE", False))
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bm > m or bn > n or bk > k:
            continue
        if ieee and (bm * bn > 128 * 64 or bk > 32):
            continue
        keep.append(c)
    # the smallest tile always fits
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "stride_xk", "stride_wk", "ACTIVATION", "HAS_BIAS", "SAVE_PRE", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)
@triton.jit
def _linear_gelu_fwd_kernel(
    X,  # [M, K] input rows, any strides
    W,  # [N, K] weight (nn.Linear layout: out = X @ W^T), any strides
    B,  # [N] bias (read only when HAS_BIAS)
    OUT,  # [M, N] activation(X @ W^T + B), written in OUT's dtype
    PRE,  # [M, N] X @ W^T + B before the activation (written only when SAVE_PRE; same strides as OUT)
    M, N, K,  # problem size
    M_BUCKET,  # next power of two of M: the autotuner's key, so each batch size does not re-tune
    stride_xm, stride_xk,  # X strides
    stride_wn, stride_wk,  # W strides
    stride_om, stride_on,  # OUT/PRE strides
    ACTIVATION: tl.constexpr,  # 0 identity, 1 exact erf GELU, 2 tanh GELU
    HAS_BIAS: tl.constexpr,  # add B in the epilogue
    SAVE_PRE: tl.constexpr,  # also store the pre-activation (for the backward pass)
    IEEE: tl.constexpr,  # fp32 inputs: IEEE products, never TF32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # output tile and K step
    GROUP_M: tl.constexpr,  # tiles of GROUP_M row blocks are walked column-first, to reuse W in L2
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: consecutive programs share a band of GROUP_M row blocks, so the W columns
    # they read stay in L2 across the band instead of being streamed once per row block.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: M * stride can pass 2^31 for long token batches
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        # Out-of-range K is loaded as 0 so that it adds nothing; out-of-range rows/columns are
        # never stored.
        a = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            # blocked summation: each K step's partial dot starts from 0 and is added to the total, so
            # rounding grows with K / BLOCK_K + BLOCK_K terms instead of K. Seen on an H100 with one
            # running accumulator: K = 384 gave 4x cuBLAS's fp32 error (2.1e-6 vs 5e-7).
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SAVE_PRE:
        tl.store(PRE + out_off, acc.to(PRE.dtype.element_ty), mask=mask)
    # GELU of the fp32 accumulator: the output is rounded once, not after the GEMM and again after
    # the activation as F.linear + F.gelu do.
    if ACTIVATION == 1:
        acc = _gelu(acc, False)
    elif ACTIVATION == 2:
        acc = _gelu(acc, True)
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# elementwise bias + GELU
# ----------------------------------------------------------------------------------------------
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
# launchers (inputs are checked by fastbert/ops/ffn.py; outputs come preallocated)
# ----------------------------------------------------------------------------------------------
class _on_device:
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


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
          pre: Optional[torch.Tensor], activation: int) -> torch.Tensor:
    """out[:] = activation(x @ w^T + bias) for strided 2-D x [M, K], w [N, K]; pre gets the
    pre-activation when given (it must have out's strides)."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return out
    if pre is not None:
        assert pre.stride() == out.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    with _on_device(x):
        _linear_gelu_fwd_kernel[grid](
            x, w, bias if bias is not None else x, out, pre if pre is not None else out,
            M, N, K, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            ACTIVATION=activation, HAS_BIAS=bias is not None, SAVE_PRE=pre is not None,
            IEEE=x.dtype == torch.float32)
    return out


def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                    out: torch.Tensor, pre: Optional[torch.Tensor]) -> torch.Tensor:
    """out[:] = gelu(x @ weight^T + bias) in one GEMM; pre (if given) gets x @ weight^T + bias."""
    return _gemm(x, weight, bias, out, pre, _ACTIVATION[approximate])


def matmul_ieee(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:] = a @ b (2-D, any strides) with IEEE fp32 products: the backward GEMMs at fp32."""
    # a @ b == a @ (b^T)^T: hand the kernel b^T as its [N, K] "weight", a strided view, no copy.
    return _gemm(a, b.t(), None, out, None, _ACT_IDENTITY)
