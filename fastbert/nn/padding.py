"""Padding-free batches: the real tokens of a padded batch packed into one [total, ...] tensor and back.

    plan = padding.plan(valid)      # valid: bool [B, S], True = real token
    x = padding.pack(h, plan)       # [B, S, ...] -> [total, ...], the real tokens in batch order
    h = padding.unpack(x, plan)     # [total, ...] -> [B, S, ...], 0 at padding positions

The packed layout is what the varlen attention reads: sequence b holds rows
cu_seqlens[b]:cu_seqlens[b+1]. Reading (total, max_seqlen) to the host in `plan` is the one host sync
of a padding-free forward (the packed sizes and the attention grid depend on them); pack and unpack
do not sync.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PackPlan:
    indices: torch.Tensor     # [total] int64: positions of the real tokens in the flattened [B * S]
    cu_seqlens: torch.Tensor  # [B + 1] int32: cumulative real-token counts, starting at 0
    max_seqlen: int           # the longest sequence's real-token count
    total: int                # real tokens in the batch
    batch: int                # B
    seq: int                  # S

    @property
    def has_padding(self) -> bool:
        return self.total != self.batch * self.seq


def plan(valid: torch.Tensor) -> PackPlan:
    """The packing of a boolean [B, S] mask (True = real token)."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"fastbert.nn.padding.plan: valid must be a bool [batch, seq] tensor, got "
                         f"{valid.dtype} of shape {tuple(valid.shape)}")
    B, S = valid.shape
    seqlens = valid.sum(1, dtype=torch.int32)
    if B == 0:
        total, max_len = 0, 0
    else:
        total, max_len = (int(t) for t in torch.stack([seqlens.sum(), seqlens.max()]).tolist())
    flat = valid.reshape(-1)
    if hasattr(torch, "nonzero_static"):
        idx = torch.nonzero_static(flat, size=total).reshape(-1)  # size known: no second sync
    else:  # pragma: no cover
        idx = flat.nonzero().reshape(-1)
    cu = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return PackPlan(idx, cu, max_len, total, B, S)


def pack(h: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """[B, S, ...] -> [total, ...]: the real tokens, in batch order."""
    return h.reshape(plan.batch * plan.seq, *h.shape[2:]).index_select(0, plan.indices)


def unpack(x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """[total, ...] -> [B, S, ...], 0 at padding positions (differentiable: index_copy)."""
    out = x.new_zeros(plan.batch * plan.seq, *x.shape[1:]).index_copy(0, plan.indices, x)
    return out.view(plan.batch, plan.seq, *x.shape[1:])
