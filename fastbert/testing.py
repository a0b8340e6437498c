"""The numerical-equivalence rule of docs/design.md as assertions, shared by tests and benchmarks.

For dtype d: err(fastbert_d) <= k * err(torch_d) + atol_d, where err(x) = max |x - ref64| over valid
positions, torch_d is the PyTorch/HF composition run at dtype d, and ref64 the same in float64.
"""
from __future__ import annotations

from typing import Optional

import torch

# floor added to k * err(torch_d) (docs/design.md: fp32 1e-6, fp16 1e-3, bf16 1e-2 for ops)
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
K_OP = 2.0
K_MODEL = 3.0


def max_err(x: torch.Tensor, ref: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """max |x - ref| in float64 over `valid` positions (a bool mask broadcastable to x); NaN counts as inf."""
    d = (x.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    if valid is not None:
        d = d[valid.expand_as(d)] if valid.shape != d.shape else d[valid]
    return float(d.max()) if d.numel() else 0.0


def _where(x: torch.Tensor, ref: torch.Tensor, valid: Optional[torch.Tensor]) -> str:
    d = (x.detach().double() - ref.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    if valid is not None:
        d = torch.where(valid.expand_as(d), d, torch.zeros_like(d))
    if d.numel() == 0:
        return "(empty)"
    idx = int(d.reshape(-1).argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), d.shape))
    n_bad_nan = int(torch.isnan(x.detach().double()).sum())
    return (f"worst at index {pos}: got {x.detach().reshape(-1)[idx].item():.8g}, "
            f"ref64 {ref.detach().reshape(-1)[idx].item():.8g}; NaNs in output: {n_bad_nan}")


def assert_no_worse(name: str, out: torch.Tensor, out_torch: torch.Tensor, ref64: torch.Tensor, *,
                    k: float = K_OP, atol: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                    valid: Optional[torch.Tensor] = None) -> None:
    """Assert err(out) <= k * err(out_torch) + atol against ref64 (see module doc)."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}")
    dtype = dtype or out.dtype
    atol = ATOL[dtype] if atol is None else atol
    e_out = max_err(out, ref64, valid)
    e_torch = max_err(out_torch, ref64, valid)
    bound = k * e_torch + atol
    if not (e_out <= bound):
        raise AssertionError(
            f"{name} ({dtype}): err {e_out:.3e} > {k} * torch err {e_torch:.3e} + atol {atol:.1e} = {bound:.3e}; "
            + _where(out, ref64, valid))


def flash_grad_atol(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                    scale: Optional[float] = None, dtype: Optional[torch.dtype] = None):
    """(atol for dq, atol for dk) of a flash-style attention backward: ATOL[dtype] plus the rounding
    floor of its softmax gradient.

    PyTorch's softmax backward forms dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik); a flash backward uses
    delta_i = rowsum(dO_i * O_i) for the sum, a second fp32 dot product of length D that equals it only
    in exact arithmetic. dP_ij - delta_i then carries a few fp32 ulps of |dP| where PyTorch's cancels
    exactly (one key: dq is exactly 0 in PyTorch and ~1e-6 in fp32 on an H100, for FA-2 as for ours).
    That floor, 4 ulp of the largest possible |dP| (|dP_ij| <= |dO_i| |V_j|), times scale and the
    largest |K| (for dq) or |Q| (for dk), is added to the atol; it is independent of the input dtype
    because dP and delta are fp32 in every backend.
    """
    dtype = dtype or q.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dp_max = float(grad_out.detach().double().norm(dim=-1).max()) * float(v.detach().double().norm(dim=-1).max())
    floor = 4 * 2.0 ** -24 * abs(scale) * dp_max
    return (ATOL[dtype] + floor * float(k.detach().double().abs().max()),
            ATOL[dtype] + floor * float(q.detach().double().abs().max()))
