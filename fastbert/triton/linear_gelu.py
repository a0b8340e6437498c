"""Triton kernels of linear_gelu: gelu(x @ W^T + b) as ONE GEMM with bias + GELU in its epilogue.

Kernels first, then the launchers. The launchers take their outputs preallocated (the op front end
in fastbert/ops/linear_gelu.py allocates them, NaN-poisoned under test); of fastbert this module
imports only fastbert._runtime and the shared GELU math (_gelu.py), so the data flow stays one-way.

The GELU math is in _gelu.py (computed in fp32 on the accumulator, rounded once on store).
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

from fastbert import _runtime
from fastbert.triton import configs
from fastbert.triton._gelu import ACT_IDENTITY
from fastbert.triton._gelu import ACTIVATION as _ACTIVATIONS
from fastbert.triton._gelu import LINEAR_ACT as _LINEAR_ACT
from fastbert.triton._gelu import gelu as _gelu
from fastbert.triton._gelu import on_device as _on_device

_INTERPRET = _runtime.triton_interpreter()


# ----------------------------------------------------------------------------------------------
# GEMM + bias + activation
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_gelu_fwd_kernel(
    X,  # [M, K] input rows, any strides
    W,  # [N, K] weight (nn.Linear layout: out = X @ W^T), any strides
    B,  # [N] bias (read only when HAS_BIAS)
    OUT,  # [M, N] activation(X @ W^T + B), written in OUT's dtype
    PRE,  # [M, N] X @ W^T + B before the activation (written only when SAVE_PRE; same strides as OUT)
    M, N, K,  # problem size
    M_BUCKET,  # next power of two of M: the shape class (config table, autotuner key)
    stride_xm, stride_xk,  # X strides
    stride_wn, stride_wk,  # W strides
    stride_om, stride_on,  # OUT/PRE strides
    ACTIVATION: tl.constexpr,  # 0 identity, 1 exact erf GELU, 2 tanh GELU, 3 ReLU, 4 SiLU (linear_act)
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
    elif ACTIVATION == 3:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 4:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=mask)

# FASTBERT_AUTOTUNE=1: configs.py's candidates, timed per shape bucket, results kept on disk
_autotuned = triton.autotune(
    configs=configs.gemm_autotune_configs(),
    key=["M_BUCKET", "N", "K", "stride_xk", "stride_wk", "ACTIVATION", "HAS_BIAS", "SAVE_PRE", "IEEE"],
    prune_configs_by={"early_config_prune": configs.prune_gemm}, cache_results=True,
)(_linear_gelu_fwd_kernel)


# ----------------------------------------------------------------------------------------------
# launchers (inputs are checked by fastbert/ops/linear_gelu.py; outputs come preallocated)
# ----------------------------------------------------------------------------------------------
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
    args = (x, w, bias if bias is not None else x, out, pre if pre is not None else out,
            M, N, K, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1))
    flags = dict(ACTIVATION=activation, HAS_BIAS=bias is not None, SAVE_PRE=pre is not None,
                 IEEE=x.dtype == torch.float32)
    with _on_device(x):
        if _runtime.triton_autotune() and not _INTERPRET:
            _autotuned[grid](*args, **flags)
        else:
            cfg = configs.gemm(configs.family(x.device), x.dtype, triton.next_power_of_2(M),
                               tanh=activation == _ACTIVATIONS["tanh"])
            _linear_gelu_fwd_kernel[grid](*args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages)
    return out


def linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str,
                    out: torch.Tensor, pre: Optional[torch.Tensor]) -> torch.Tensor:
    """out[:] = gelu(x @ weight^T + bias) in one GEMM; pre (if given) gets x @ weight^T + bias."""
    return _gemm(x, weight, bias, out, pre, _ACTIVATIONS[approximate])


def linear_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                   weight_kn: bool, out: torch.Tensor, pre: Optional[torch.Tensor]) -> torch.Tensor:
    """linear_act's plain (ungated, no dropout) form: out[:] = act(x @ W^T + bias), W = weight ("nk") or
    weight^T as a strided view ("kn", weight [K, N]: no copy); act: "none", "tanh", "relu", "silu"."""
    return _gemm(x, weight.t() if weight_kn else weight, bias, out, pre, _LINEAR_ACT[activation])


def matmul_ieee(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:] = a @ b (2-D, any strides) with IEEE fp32 products: the backward GEMMs at fp32."""
    # a @ b == a @ (b^T)^T: hand the kernel b^T as its [N, K] "weight", a strided view, no copy.
    return _gemm(a, b.t(), None, out, None, ACT_IDENTITY)
