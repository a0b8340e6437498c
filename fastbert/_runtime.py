"""The leaf of fastbert: what every layer may import, the kernels included.

Environment switches, output allocation and the dropout RNG's constants. It imports only torch and
the standard library, so a kernel file that imports it pulls in nothing else of fastbert (data flows
one way: hf -> nn -> ops -> (triton | _C | reference), this module under all of them).
"""
from __future__ import annotations

import math
import os

import torch


# ----------------------------------------------------------------------------------------------
# environment switches
# ----------------------------------------------------------------------------------------------
def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in the interpreter on CPU tensors (read when kernels are
    defined, as Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_autotune() -> bool:
    """FASTBERT_AUTOTUNE=1 (read per call): Triton kernels time their candidate configs for each new shape
    class (results cached on disk) instead of using fastbert/triton/configs.py's table."""
    return os.environ.get("FASTBERT_AUTOTUNE", "0") == "1"


def poison_enabled() -> bool:
    """FASTBERT_POISON_OUTPUTS=1 makes every kernel output start as NaN (0x7f.. for integers), so a
    test catches an element a kernel forgot to write. The C++ backends read the same variable."""
    return os.environ.get("FASTBERT_POISON_OUTPUTS", "0") == "1"


# ----------------------------------------------------------------------------------------------
# output allocation
# ----------------------------------------------------------------------------------------------
def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or NaN-poisoned under FASTBERT_POISON_OUTPUTS=1. Use for every kernel output."""
    if poison_enabled():
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.full(shape, 0x7F, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# dropout: Philox4x32-10 (the stream of triton.language.randint), identical in every backend
# ----------------------------------------------------------------------------------------------
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57


def dropout_threshold(p: float) -> int:
    """An element whose 31-bit random value (r >> 1) is below this is dropped: floor(p * 2^31)."""
    return int(math.floor(float(p) * 2147483648.0))
