"""Launch configurations of the Triton kernels: one fixed table per GPU family, autotuning on request.

By default every kernel launches with the config its table gives for the problem's shape class
(dtype, head dim, sequence or row bucket): no autotuning, so a new shape costs one compile, not one
per candidate (the first GPU session lost its window to ~60 s autotuning per new shape bucket).
FASTBERT_AUTOTUNE=1 (read per call) times the candidate lists below instead, and Triton keeps the
winners on disk (its cache directory), so a second process does not time them again.

Families: "sm90" (Hopper, capability 9.x) and "sm80" (everything else: Ampere and Ada, and the
fallback for other GPUs). Every sm80 entry fits the 99 KiB of shared memory an sm_86/sm_89 block
can have, so one table serves the whole family. The interpreter runs one small tile per kernel.

How the numbers were chosen: `python tools/triton_aot.py` compiles every config below for sm_80 and
sm_90a without a GPU and reports registers, spills and shared memory (docs/triton-resources.md); an
entry is the largest of the tiles published FlashAttention-2 / Triton-tutorial configs use that
compiles without spills (16-bit) at that head dim, on the flag sets models launch. None is timed on a
GPU yet: the GPU window's benchmark rows time them, and FASTBERT_AUTOTUNE=1 there compares them with
the candidates.

This module imports only triton, torch and fastbert._runtime, like the kernels that use it.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import torch
import triton

from fastbert import _runtime

FAMILIES = ("sm80", "sm90")
# the compile target of each family's table (what tools/triton_aot.py checks it against)
FAMILY_ARCH = {"sm80": 80, "sm90": 90}


@functools.lru_cache(maxsize=None)
def _capability_family(index: int) -> str:
    major, _ = torch.cuda.get_device_capability(index)
    return "sm90" if major == 9 else "sm80"


def family(device: torch.device) -> str:
    """The table a launch on `device` uses: "interp" under TRITON_INTERPRET=1, else its GPU family."""
    if _runtime.triton_interpreter() or device.type != "cuda":
        return "interp"
    return _capability_family(device.index if device.index is not None else torch.cuda.current_device())


def dtype_class(dtype) -> str:
    """"16" for fp16/bf16 (tensor-core tiles), "32" for fp32 (IEEE products on the FMA units)."""
    return "32" if dtype in (torch.float32, "fp32") else "16"


def _cfg(warps: int, stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# ----------------------------------------------------------------------------------------------
# attention: (dtype class, BLOCK_D) -> (BLOCK_M, BLOCK_N, warps, stages) for sequences of 128 and up
# ----------------------------------------------------------------------------------------------
# fwd:  BLOCK_M query rows per program, BLOCK_N keys per step
# dkdv: BLOCK_N keys per program, BLOCK_M queries per step
# dq:   BLOCK_M query rows per program, BLOCK_N keys per step
_ATTENTION: Dict[str, Dict[str, Dict[Tuple[str, int], Tuple[int, int, int, int]]]] = {
    "sm90": {
        "fwd": {("16", 16): (128, 64, 8, 3), ("16", 32): (128, 64, 8, 3), ("16", 64): (128, 64, 8, 3),
                ("16", 128): (128, 32, 8, 3),
                ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
                ("32", 128): (32, 16, 8, 2)},
        "dkdv": {("16", 16): (32, 128, 8, 3), ("16", 32): (32, 128, 8, 3), ("16", 64): (32, 128, 8, 3),
                 ("16", 128): (32, 64, 8, 3),
                 ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
                 ("32", 128): (16, 16, 8, 2)},
        "dq": {("16", 16): (128, 32, 8, 3), ("16", 32): (128, 32, 8, 3), ("16", 64): (128, 32, 8, 3),
               ("16", 128): (128, 32, 8, 3),
               ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
               ("32", 128): (16, 32, 8, 2)},
    },
    "sm80": {
        "fwd": {("16", 16): (64, 32, 4, 2), ("16", 32): (64, 32, 4, 2), ("16", 64): (64, 32, 4, 2),
                ("16", 128): (128, 32, 8, 2),
                ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
                ("32", 128): (32, 16, 8, 2)},
        "dkdv": {("16", 16): (32, 32, 8, 2), ("16", 32): (32, 32, 8, 2), ("16", 64): (32, 32, 8, 2),
                 ("16", 128): (32, 64, 8, 2),
                 ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
                 ("32", 128): (16, 16, 8, 2)},
        "dq": {("16", 16): (64, 32, 8, 2), ("16", 32): (64, 32, 8, 2), ("16", 64): (64, 32, 8, 2),
               ("16", 128): (64, 32, 8, 2),
               ("32", 16): (32, 32, 8, 2), ("32", 32): (32, 32, 8, 2), ("32", 64): (32, 32, 8, 2),
               ("32", 128): (16, 32, 8, 2)},
    },
}
ATTENTION_KERNELS = ("fwd", "dkdv", "dq")
ATTENTION_BLOCK_D = (16, 32, 64, 128)
# the interpreter: equal 32 x 32 tiles in every kernel, so forward and backward scores agree bit for
# bit there (see fastbert/triton/attention.py, "Precision")
_ATTENTION_INTERP = (32, 32, 4, 1)
# the sequence buckets below the table's (their tiles are clamped to the bucket)
SEQ_BUCKETS = (16, 32, 64, 128)


def _clamp(bm: int, bn: int, warps: int, stages: int, seq_bucket: int):
    """A short sequence gets tiles no larger than itself (at least 32): a 128-row tile for 16 queries
    wastes the SM. The warps stay: with dropout, 4 warps on a clamped 32 x 64 tile spill (76 B at
    sm_90a), 8 do not."""
    cap = max(32, seq_bucket)
    return min(bm, cap), min(bn, cap), warps, stages


def _lighten(kernel: str, bm: int, bn: int, warps: int, stages: int):
    """A bias tile and the dropout mask together (T5-style bias in training) add two live score-sized
    tiles: halve the tile each program holds (query rows in fwd/dq, keys in dkdv) so it does not spill."""
    if kernel == "dkdv":
        return bm, max(16, bn // 2), warps, stages
    return max(16, bm // 2), bn, warps, stages


@functools.lru_cache(maxsize=None)  # called per launch: one Config object per shape class
def attention(kernel: str, fam: str, dtype, block_d: int, seq_bucket: int, heavy: bool = False) -> triton.Config:
    """The launch config of attention kernel `kernel` ("fwd", "dkdv", "dq"); heavy: HAS_BIAS and DROPOUT."""
    if fam == "interp":
        bm, bn, warps, stages = _ATTENTION_INTERP
    else:
        entry = _ATTENTION[fam][kernel][(dtype_class(dtype), block_d)]
        if heavy:
            entry = _lighten(kernel, *entry)
        bm, bn, warps, stages = _clamp(*entry, seq_bucket)
    return _cfg(warps, stages, BLOCK_M=bm, BLOCK_N=bn)


# FASTBERT_AUTOTUNE=1: candidates per kernel, narrowed per call by prune_attention (the table's own
# entry is always among them)
_ATTENTION_CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (128, 32, 8, 2),
            (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2), (32, 32, 4, 2)],
    "dkdv": [(32, 128, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2), (64, 64, 4, 3),
             (16, 64, 4, 4), (16, 32, 4, 2)],
    "dq": [(128, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 4),
           (64, 32, 4, 2), (32, 32, 4, 2)],
}


def attention_candidates(kernel: str, fam: str, dclass: str, block_d: int) -> List[Tuple[int, int, int, int]]:
    """The autotuner's candidates for one (family, dtype class, head-dim block): the table's entry and
    every candidate whose tile area is at most twice the entry's (larger ones spill or do not fit)."""
    entry = _ATTENTION[fam][kernel][(dclass, block_d)]
    budget = 2 * entry[0] * entry[1]
    out = [c for c in _ATTENTION_CANDIDATES[kernel] if c[0] * c[1] <= budget]
    return out if entry in out else [entry] + out


def attention_autotune_configs(kernel: str) -> List[triton.Config]:
    """Every candidate of `kernel` in every family (the autotuner's list; prune_attention narrows it)."""
    seen = []
    for c in _ATTENTION_CANDIDATES[kernel]:
        if c not in seen:
            seen.append(c)
    for fam in FAMILIES:
        for entry in _ATTENTION[fam][kernel].values():
            if entry not in seen:
                seen.append(entry)
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in seen]


def prune_attention(kernel: str):
    """early_config_prune for the attention autotuners: this device's family, dtype and head dim."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        fam = family(q.device)
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        seq_bucket = named_args["seq_bucket"]
        # the candidates, clamped to short sequences as the table is (new Config objects: the autotuner
        # times whatever the prune returns)
        allowed = dict.fromkeys(_clamp(*c, seq_bucket)
                                for c in attention_candidates(kernel, fam, dtype_class(q.dtype), block_d))
        return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in allowed]
    return prune


# ----------------------------------------------------------------------------------------------
# linear_gelu's GEMM: dtype class -> (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for M >= 128 rows
# ----------------------------------------------------------------------------------------------
_GEMM = {
    # 16-bit: tensor cores (wgmma on sm_90); fp32: IEEE products on FMA units, fp32 operands in
    # registers, so a smaller tile. 128 x 256 spills with the exact-GELU epilogue (472 B at sm_90a, 784
    # at sm_80: docs/triton-resources.md), so 128 x 128.
    "sm90": {"16": (128, 128, 64, 8, 3), "32": (128, 64, 32, 8, 3)},
    "sm80": {"16": (128, 128, 32, 8, 3), "32": (64, 64, 32, 4, 3)},
}
_GEMM_INTERP = (32, 64, 32, 4, 1)
GROUP_M = 8
# row buckets below the table's (BLOCK_M is clamped to the bucket, at least 32)
ROW_BUCKETS = (16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def gemm(fam: str, dtype, m_bucket: int, tanh: bool = False) -> triton.Config:
    """The launch config of the linear_gelu GEMM for M rows (m_bucket: M rounded up to a power of two).
    The tanh GELU's epilogue (exp, a correctly rounded division) needs more registers than erf's: half
    the rows (128 x 128 spills 516 B a thread at sm_90a with it, 64 x 128 none)."""
    if fam == "interp":
        bm, bn, bk, warps, stages = _GEMM_INTERP
    else:
        bm, bn, bk, warps, stages = _GEMM[fam][dtype_class(dtype)]
        if tanh:
            bm = max(32, bm // 2)
        bm = min(bm, max(32, m_bucket))
    return _cfg(warps, stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)


_GEMM_CANDIDATES = {
    "16": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 3),
           (128, 64, 64, 4, 3), (128, 64, 32, 4, 4), (64, 128, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
    "32": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 16, 4, 4), (32, 64, 32, 4, 3)],
}


def gemm_autotune_configs() -> List[triton.Config]:
    seen = []
    for dclass in ("16", "32"):
        for c in _GEMM_CANDIDATES[dclass] + [_GEMM[f][dclass] for f in FAMILIES]:
            if c not in seen:
                seen.append(c)
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M) for bm, bn, bk, w, s in seen]


def gemm_candidates(dclass: str) -> List[Tuple[int, int, int, int, int]]:
    return list(_GEMM_CANDIDATES[dclass])


def prune_gemm(configs, named_args, **kwargs):
    """early_config_prune for the GEMM autotuner: the dtype class's candidates, none taller than M."""
    x = named_args["X"]
    dclass = dtype_class(x.dtype)
    m = max(32, int(named_args["M_BUCKET"]))
    allowed = set(_GEMM_CANDIDATES[dclass])
    keep = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in allowed
            and c.kwargs["BLOCK_M"] <= m]
    return keep or [gemm(family(x.device), x.dtype, m)]
