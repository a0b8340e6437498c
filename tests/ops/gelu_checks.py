"""Checks shared by tests/ops/test_linear_gelu.py and test_bias_gelu.py (not a test file).

Interpreter gaps (Triton 3.9, TRITON_INTERPRET=1 only; the GPU runs the full checks):
- bf16 tl.dot is wrong there, so bf16 linear_gelu on the Triton backend runs only on a GPU;
- fp32 -> bf16 casts truncate there instead of rounding to nearest, so the elementwise bf16 results
  are checked against the bound truncation allows (relative error < 2^-7, i.e. one bf16 ulp) instead
  of the rule, which assumes round-to-nearest (half an ulp).
"""
import os

import pytest
import torch

from fastbert.testing import assert_no_worse
from tests.helpers import require_backend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["triton", "cpu", "cuda"]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _bf16_interpreted(backend, device, dtype):
    return backend == "triton" and device == "cpu" and INTERPRET and dtype == torch.bfloat16


def _assert_within_truncation(name, out, ref64):
    """|out - ref64| < 2^-7 |ref64| + slack: what an fp32 result truncated to bf16 meets. The slack (1e-5,
    far below the rule's bf16 floor of 1e-2) covers fp32's absolute error where 1 + erf(h / sqrt 2)
    cancels in the far negative tail, as it does in PyTorch's own fp32 GELU."""
    err = (out.detach().double() - ref64.detach()).abs()
    bound = ref64.detach().abs() * (2.0 ** -7) * (1 + 1e-5) + 1e-5
    bad = ~(err <= bound)
    assert not bool(bad.any()), (f"{name}: {int(bad.sum())} elements beyond one bf16 ulp, worst err "
                                 f"{float(err.max()):.3e}")


def _check(name, out, out_torch, ref64, *, truncating=False):
    if truncating:
        _assert_within_truncation(name, out, ref64)
    else:
        assert_no_worse(name, out, out_torch, ref64)


def _leaves(dtype, device, *tensors):
    """(tensors at dtype as leaves, the same values in float64 as leaves)."""
    low = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    f64 = [None if t is None else t.detach().to(torch.float64).requires_grad_() for t in low]
    return low, f64


def _grads(out, inputs, dy):
    live = [t for t in inputs if t is not None]
    g = iter(torch.autograd.grad(out, live, dy))
    return [None if t is None else next(g) for t in inputs]


def run_opcheck(backend, device, name, cases):
    """torch.library.opcheck on kernel `name` of `backend` with each argument tuple of cases[name]."""
    require_backend(backend, device, (name,))
    op = getattr(torch.ops.fastbert, ("triton_" if backend == "triton" else "") + name)
    for args in cases[name]:
        torch.library.opcheck(op, args)


def expect_error(case):
    """case = (id, call, exception type, message pattern): the call raises that, naming the argument."""
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()
