"""Triton kernels of add_layer_norm: LayerNorm(dropout(x + x_bias) + residual) over the last dim.

The forward can also store the pre-norm sum h (STORE_PRE: return_residual=True, a pre-norm block's
residual stream), rounded once from fp32 to x's dtype; the backward then takes h's own incoming gradient
(HAS_DPRE_IN), added in fp32 to the LayerNorm's gradient of h before anything is rounded. A missing
weight (LayerNorm without a scale) reaches the kernels as a vector of ones, exact since w * 1 = w.

Layout and conventions are those of the C++ schemas in csrc/ops.cpp: x/residual [rows, N] with unit
stride along N, weight/bias/x_bias [N] (weight may be fp32 while x is fp16/bf16), mean/rstd fp32
[rows]. Dropout is the Philox stream of fastbert/reference.py: element (row, col) has counter
row * N + col and is kept iff (philox(seed, counter) >> 1) >= floor(p * 2^31), which is exactly
`tl.randint(seed, counter) >> 1` for an int64 counter (Triton splits it into lo/hi 32-bit words the
same way the reference does).

Everything between the loads and the final store is fp32: the pre-norm sum, the statistics and the
normalisation, so fp16/bf16 inputs are rounded once, on output.

Backward math (one row; N elements; w = weight, g = grad_out, mu = mean, r = rstd):

    h      = dropout(x + x_bias) + residual                  (the pre-norm sum, recomputed)
    xhat_j = (h_j - mu) * r,   y_j = xhat_j * w_j + b_j
    mu     = (1/N) sum_j h_j,  r = (var + eps)^(-1/2),  var = (1/N) sum_j (h_j - mu)^2

  With gy_j = g_j * w_j (the gradient reaching xhat):
    d mu / d h_i   = 1/N
    d var / d h_i  = (2/N)(h_i - mu)            (the d mu terms sum to zero)
    d r  / d h_i   = -1/2 (var + eps)^(-3/2) * d var / d h_i = -r^3 (h_i - mu) / N = -r^2 xhat_i / N
    d xhat_j / d h_i = r * (delta_ij - 1/N) + (h_j - mu) * d r / d h_i
                     = r * (delta_ij - 1/N - xhat_j * xhat_i / N)
  so
    dh_i = sum_j gy_j * d xhat_j / d h_i
         = r * (gy_i - mean_j(gy_j) - xhat_i * mean_j(gy_j * xhat_j))

  grad_pre = dh (+ h's own incoming gradient when the forward returned h; it is also grad_residual);
  grad_x = grad_pre * keep * 1/(1-p) (= grad_pre without dropout);
  grad_x_bias = sum over rows of grad_x; grad_weight = sum over rows of g * xhat; grad_bias = sum
  over rows of g. The three column sums are reduced deterministically: each backward program owns a
  contiguous block of rows and writes its fp32 partial sums to one row of a [programs, N] buffer,
  which one torch reduction sums over programs on the device (run-to-run identical, no atomics).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastbert import _runtime
from fastbert._runtime import new_empty

MAX_N = 8192


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _add_layer_norm_fwd_kernel(
    X,  # [rows, N] input (the sublayer output), x.dtype
    RES,  # [rows, N] residual, x.dtype (dummy when not HAS_RES)
    W,  # [N] LayerNorm weight, x.dtype or fp32
    B,  # [N] LayerNorm bias, weight's dtype (dummy when not HAS_B)
    XB,  # [N] bias added to x before dropout (dummy when not HAS_XB)
    SEED,  # [1] int64 dropout seed, read on device (dummy when not HAS_DROPOUT)
    OUT,  # [rows, N] output, x.dtype
    PRE,  # [rows, N] out: the pre-norm sum h, x.dtype (dummy when not STORE_PRE)
    MEAN,  # [rows] fp32 mean of the pre-norm sum, saved for backward
    RSTD,  # [rows] fp32 1/sqrt(var + eps), saved for backward
    N,  # hidden size (row length)
    eps,  # LayerNorm epsilon
    drop_threshold,  # floor(p * 2^31): a 31-bit random value below it drops the element
    drop_scale,  # 1 / (1 - p), applied to kept elements
    HAS_RES: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_XB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_PRE: tl.constexpr,  # write h to PRE
    BLOCK_N: tl.constexpr,  # next power of two >= N; lanes >= N are masked
):
    # one program per row; int64 row offset so rows * N may exceed 2^31
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    base = row * N

    h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_XB:
        h += tl.load(XB + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        r31 = (tl.randint(seed, base + cols) >> 1).to(tl.int32)
        h = tl.where(r31 >= drop_threshold, h * drop_scale, 0.0)
    if HAS_RES:
        h += tl.load(RES + base + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_PRE:
        tl.store(PRE + base + cols, h.to(PRE.dtype.element_ty), mask=mask)

    # two-pass statistics over the row held in registers (masked lanes are 0 in h and in diff)
    mean = tl.math.div_rn(tl.sum(h, axis=0), N * 1.0)
    diff = tl.where(mask, h - mean, 0.0)
    var = tl.math.div_rn(tl.sum(diff * diff, axis=0), N * 1.0)
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)

    y = diff * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + base + cols, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _add_layer_norm_bwd_kernel(
    DY,  # [rows, N] gradient of the output, x.dtype
    X,  # [rows, N] forward input x
    RES,  # [rows, N] forward residual (dummy when not HAS_RES)
    W,  # [N] LayerNorm weight
    XB,  # [N] x_bias (dummy when not HAS_XB)
    SEED,  # [1] int64 dropout seed of the forward pass (dummy when not HAS_DROPOUT)
    MEAN,  # [rows] fp32 saved mean
    RSTD,  # [rows] fp32 saved rstd
    DPRE_IN,  # [rows, N] incoming gradient of the forward's PRE output, x.dtype (dummy when not HAS_DPRE_IN)
    DPRE,  # [rows, N] out: gradient of the pre-norm sum (= grad of residual), x.dtype
    DX,  # [rows, N] out: gradient of x under dropout (dummy when not HAS_DROPOUT)
    DW_PART,  # [programs, N] fp32 out: this program's partial sum of dy * xhat
    DB_PART,  # [programs, N] fp32 out: partial sum of dy (dummy when not HAS_B)
    DXB_PART,  # [programs, N] fp32 out: partial sum of grad_x (dummy when not HAS_XB)
    rows,  # number of rows
    N,  # hidden size
    rows_per_prog,  # rows handled by each program (the last one may get fewer)
    drop_threshold,  # as in the forward kernel
    drop_scale,  # as in the forward kernel
    HAS_RES: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_XB: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_DPRE_IN: tl.constexpr,  # add DPRE_IN to the gradient of h
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_XB:
        xb = tl.load(XB + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # column sums of this program's rows, kept in fp32 registers
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dxb_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, rows)
    for row in range(row_start, row_end):
        base = row * N
        # recompute the pre-norm sum exactly as the forward pass did (same fp32 ops, same mask)
        h = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_XB:
            h += xb
        if HAS_DROPOUT:
            keep = (tl.randint(seed, base + cols) >> 1).to(tl.int32) >= drop_threshold
            h = tl.where(keep, h * drop_scale, 0.0)
        if HAS_RES:
            h += tl.load(RES + base + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)

        dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        gy = dy * w  # 0 in masked lanes, since dy and w are
        c1 = tl.math.div_rn(tl.sum(gy, axis=0), N * 1.0)
        c2 = tl.math.div_rn(tl.sum(gy * xhat, axis=0), N * 1.0)
        dh = (gy - c1 - xhat * c2) * rstd
        if HAS_DPRE_IN:
            dh += tl.load(DPRE_IN + base + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DPRE + base + cols, dh.to(DPRE.dtype.element_ty), mask=mask)

        dw_acc += dy * xhat
        if HAS_B:
            db_acc += dy
        if HAS_DROPOUT:
            dx = tl.where(keep, dh * drop_scale, 0.0)
            tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            dx = dh
        if HAS_XB:
            dxb_acc += tl.where(mask, dx, 0.0)

    part = pid.to(tl.int64) * N
    tl.store(DW_PART + part + cols, dw_acc, mask=mask)
    if HAS_B:
        tl.store(DB_PART + part + cols, db_acc, mask=mask)
    if HAS_XB:
        tl.store(DXB_PART + part + cols, dxb_acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
# _FP_NOTE. On a GPU, Triton's `/` and tl.sqrt are approximate (div.full / sqrt.approx) and it contracts
# a * b - c into one FMA; both kernels use correctly rounded division and square root and launch with
# enable_fp_fusion=False, so each step rounds as PyTorch's separate ops do. Seen on an H100: with N = 1
# (x - mean = 0, rstd = 1/sqrt(eps) = 1e6) the contracted gy - c1 left gy's rounding error, times 1e6,
# in grad x (0.035 where the answer is exactly 0). These kernels are memory-bound: the cost is nil.
_interpreting = _runtime.triton_interpreter


def _num_warps(block_n: int, backward: bool = False) -> int:
    """Forward: about 8 elements per thread (16-byte vector loads at fp16/bf16), up to 16 warps.
    Backward: it keeps ~10 row-length vectors live (three accumulators, w, x_bias, h, dy, xhat, the
    Philox state), so it gets twice the threads, at least 8 warps; with fewer, ptxas (sm_90, checked
    offline with cuobjdump) needs 136-184 registers a thread at N = 1024 and spills from N = 4096.
    Heuristics, not yet tuned on a GPU. The interpreter ignores warps: one config there too."""
    if backward:
        return max(8, min(32, block_n // 128))
    return max(1, min(16, block_n // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _bwd_programs(rows: int, device: torch.device) -> int:
    """How many programs share the backward rows. Enough to fill the GPU a few times over; under the
    interpreter a handful, so the partial-sum reduction is still exercised across programs."""
    if device.type == "cuda" and not _interpreting():
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    return max(1, min(rows, target))


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor], device: torch.device):
    if dropout_p <= 0.0:
        return False, 0, 1.0
    if seed is None:
        raise ValueError("add_layer_norm: seed must be an int64 tensor of shape [1] when dropout_p > 0")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"add_layer_norm: seed must be an int64 tensor of shape [1], got {seed.dtype} "
                         f"{tuple(seed.shape)}")
    if seed.device != device:
        raise ValueError(f"add_layer_norm: seed is on {seed.device} but x is on {device}")
    return True, _runtime.dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _check_2d(name: str, t: Optional[torch.Tensor], shape) -> None:
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"add_layer_norm: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"add_layer_norm: {name} must be contiguous")


def _check_inputs(x, weight, bias, residual, x_bias):
    if x.dim() != 2:
        raise ValueError(f"add_layer_norm: x must be [rows, N], got shape {tuple(x.shape)}")
    rows, n = x.shape
    if n > MAX_N:
        raise ValueError(f"add_layer_norm: hidden size {n} > {MAX_N}")
    _check_2d("x", x, (rows, n))
    _check_2d("residual", residual, (rows, n))
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        _check_2d(name, t, (n,))
    return rows, n


def _device_guard(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it x's
    if x.is_cuda:
        return torch.cuda.device(x.device)
    import contextlib

    return contextlib.nullcontext()


def _weight_or_ones(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """weight None (LayerNorm without a scale): ones, in bias's dtype when there is a bias (the kernels
    read w * 1 = w exactly). Allocated only on that path."""
    if weight is not None:
        return weight
    return torch.ones(x.shape[-1], dtype=bias.dtype if bias is not None else x.dtype, device=x.device)


def add_layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       residual: Optional[torch.Tensor], x_bias: Optional[torch.Tensor], eps: float,
                       dropout_p: float, seed: Optional[torch.Tensor], pre: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [rows, N] x.dtype, mean fp32 [rows], rstd fp32 [rows]); see csrc/ops.cpp. pre: a [rows, N]
    tensor of x's dtype to receive the pre-norm sum (add_layer_norm_fwd_pre), or None."""
    rows, n = _check_inputs(x, weight, bias, residual, x_bias)
    _check_2d("pre", pre, (rows, n))
    weight = _weight_or_ones(weight, bias, x)
    out = new_empty((rows, n), dtype=x.dtype, device=x.device)
    mean = new_empty((rows,), dtype=torch.float32, device=x.device)
    rstd = new_empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0 or n == 0:
        return out, mean, rstd
    has_drop, threshold, scale = _dropout_args(dropout_p, seed, x.device)
    block = triton.next_power_of_2(n)
    with _device_guard(x):
        _add_layer_norm_fwd_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            x_bias if x_bias is not None else weight, seed if has_drop else mean, out,
            pre if pre is not None else out, mean, rstd, n, float(eps), threshold, scale,
            HAS_RES=residual is not None, HAS_B=bias is not None, HAS_XB=x_bias is not None,
            HAS_DROPOUT=has_drop, STORE_PRE=pre is not None, BLOCK_N=block, num_warps=_num_warps(block),
            enable_fp_fusion=False,  # see _FP_NOTE
        )
    return out, mean, rstd


def add_layer_norm_fwd_pre(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                           residual: Optional[torch.Tensor], x_bias: Optional[torch.Tensor], eps: float,
                           dropout_p: float, seed: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd, pre): add_layer_norm_fwd that also returns the pre-norm sum h = dropout(x + x_bias)
    + residual in x's dtype; see csrc/ops.cpp."""
    pre = new_empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    return add_layer_norm_fwd(x, weight, bias, residual, x_bias, eps, dropout_p, seed, pre) + (pre,)


def add_layer_norm_bwd(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                       x_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                       dropout_p: float, seed: Optional[torch.Tensor], grad_pre_out: Optional[torch.Tensor] = None):
    """(grad_pre, grad_x ([0] without dropout), grad_weight ([0] without weight), grad_bias ([0] without
    bias), grad_x_bias ([0] without x_bias)); grad_pre_out: the gradient of add_layer_norm_fwd_pre's pre
    output, added to the gradient of the pre-norm sum, or None; see csrc/ops.cpp."""
    rows, n = _check_inputs(x, weight, bias, residual, x_bias)
    _check_2d("grad_out", grad_out, (rows, n))
    _check_2d("grad_pre_out", grad_pre_out, (rows, n))
    _check_2d("mean", mean, (rows,))
    _check_2d("rstd", rstd, (rows,))
    has_drop, threshold, scale = _dropout_args(dropout_p, seed, x.device)
    dev = x.device
    has_w = weight is not None
    weight = _weight_or_ones(weight, bias, x)
    grad_pre = new_empty((rows, n), dtype=x.dtype, device=dev)
    grad_x = new_empty((rows, n) if has_drop else (0,), dtype=x.dtype, device=dev)
    grad_w = new_empty(tuple(weight.shape) if has_w else (0,), dtype=weight.dtype, device=dev)
    grad_b = new_empty(tuple(bias.shape) if bias is not None else (0,), dtype=weight.dtype, device=dev)
    grad_xb = new_empty(tuple(x_bias.shape) if x_bias is not None else (0,),
                        dtype=x_bias.dtype if x_bias is not None else x.dtype, device=dev)
    if rows == 0 or n == 0:
        # no rows: the column sums are empty sums
        grad_w.zero_()
        grad_b.zero_()
        grad_xb.zero_()
        return grad_pre, grad_x, grad_w, grad_b, grad_xb

    block = triton.next_power_of_2(n)
    programs = _bwd_programs(rows, dev)
    rows_per_prog = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_prog)  # no program without rows
    dw_part = new_empty((programs, n), dtype=torch.float32, device=dev)
    db_part = new_empty((programs, n), dtype=torch.float32, device=dev) if bias is not None else dw_part
    dxb_part = new_empty((programs, n), dtype=torch.float32, device=dev) if x_bias is not None else dw_part
    with _device_guard(x):
        _add_layer_norm_bwd_kernel[(programs,)](
            grad_out, x, residual if residual is not None else x, weight,
            x_bias if x_bias is not None else weight, seed if has_drop else mean, mean, rstd,
            grad_pre_out if grad_pre_out is not None else grad_out,
            grad_pre, grad_x if has_drop else grad_pre, dw_part, db_part, dxb_part,
            rows, n, rows_per_prog, threshold, scale,
            HAS_RES=residual is not None, HAS_B=bias is not None, HAS_XB=x_bias is not None,
            HAS_DROPOUT=has_drop, HAS_DPRE_IN=grad_pre_out is not None, BLOCK_N=block,
            num_warps=_num_warps(block, backward=True),
            enable_fp_fusion=False,  # see _FP_NOTE
        )
    # second stage of the column sums: fixed-order fp32 sum over programs, rounded once
    if has_w:
        grad_w.copy_(dw_part.sum(0))
    if bias is not None:
        grad_b.copy_(db_part.sum(0))
    if x_bias is not None:
        grad_xb.copy_(dxb_part.sum(0))
    return grad_pre, grad_x, grad_w, grad_b, grad_xb
