"""fastbert.ops.bias_gelu: every backend x device x dtype x shape, forward and backward, against
fastbert.reference in float64 with the "no worse than PyTorch" rule (interpreter gaps: gelu_checks.py).
Elsewhere: the cpu/cuda kernels' own cases in test_cpu_backend.py / test_cuda_backend.py; the sm_80/sm_90
compile check of its Triton kernels in test_linear_gelu.py.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backends, reference
from fastbert.ops import bias_gelu
from tests.helpers import DEVICES, DTYPES, require_backend
from tests.ops.gelu_checks import (BACKENDS, DTYPE_IDS, _bf16_interpreted, _check, _grads, _leaves, expect_error,
                                   run_opcheck)

KERNELS = ("bias_gelu_fwd", "bias_gelu_bwd")
NAMES = list(KERNELS)

BG_SHAPES = [((1, 32), True), ((7, 96), True), ((129, 48), True), ((2, 7, 384), True), ((3, 5, 768), False)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", BG_SHAPES, ids=lambda s: f"{s[0]}{'' if s[1] else '-nobias'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu_matches_reference(backend, device, dtype, shape, approximate):
    require_backend(backend, device, KERNELS)
    x_shape, has_bias = shape
    n = x_shape[-1]
    # spread over [-6, 6]: both GELU tails and the curved middle
    (x, b), (x64, b64) = _leaves(dtype, device, torch.randn(x_shape) * 2.5,
                                 torch.randn(n) * 0.5 if has_bias else None)
    truncating = _bf16_interpreted(backend, device, dtype)

    with fastbert.use_backend(backend):
        out = bias_gelu(x, b, approximate=approximate)
    assert out.shape == x.shape and out.dtype == dtype
    out_torch = reference.bias_gelu(x, b, approximate=approximate)
    ref64 = reference.bias_gelu(x64, b64, approximate=approximate)
    _check("out", out, out_torch, ref64, truncating=truncating)

    dy = torch.randn(out.shape).to(device=device, dtype=dtype)
    with fastbert.use_backend(backend):
        gx, gb = _grads(out, (x, b), dy)
    gx_torch, gb_torch = _grads(out_torch, (x, b), dy)
    gx64, gb64 = _grads(ref64, (x64, b64), dy.double())
    _check("grad_x", gx, gx_torch, gx64, truncating=truncating)
    if has_bias:
        # the bias gradient is a sum of rounded grad_x values, as in PyTorch: the rule applies
        # except where the interpreter's truncation biases every term the same way
        if truncating:
            # each term off by < 2^-7 of itself, then the fp32 sum rounded once to bf16 (2^-8)
            gx64_2d = gx64.detach().reshape(-1, n)
            tol = gx64_2d.abs().sum(0) * 2.0 ** -7 + gb64.detach().abs() * 2.0 ** -8 + 1e-2
            err = (gb.double() - gb64.detach()).abs()
            assert bool((err <= tol).all()), f"grad_bias: worst err {float(err.max()):.3e}"
        else:
            _check("grad_bias", gb, gb_torch, gb64)
    else:
        assert gb is None


def test_gelu_variants_are_not_interchanged():
    """"none" must be erf GELU and "tanh" the tanh one: they differ by 2e-5..4e-4 here, 20x the fp32 error."""
    require_backend("triton", "cpu")
    x = torch.tensor([[-3.0, -1.5, 0.5, 2.0]])
    with fastbert.use_backend("triton"):
        erf = bias_gelu(x, None)
        tanh = bias_gelu(x, None, approximate="tanh")
    torch.testing.assert_close(erf, F.gelu(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tanh, F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)
    assert ((erf - tanh).abs() > 1e-5).all()


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck on the kernel-level ops
# ----------------------------------------------------------------------------------------------
def _opcheck_cases(device, dtype=torch.float32):
    def r(*s):
        return torch.randn(*s, device=device, dtype=dtype)

    return {
        "bias_gelu_fwd": [(r(7, 96), r(96), "none"), (r(5, 32), None, "tanh")],
        "bias_gelu_bwd": [(r(7, 96), r(7, 96), r(96), "none"), (r(5, 32), r(5, 32), None, "tanh")],
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device, name):
    run_opcheck(backend, device, name, _opcheck_cases(device))


# ----------------------------------------------------------------------------------------------
# bad input, empty input, fallback
# ----------------------------------------------------------------------------------------------
def BAD_CASES():
    x, b = torch.randn(3, 8), torch.randn(8)
    return [
        ("not a tensor", lambda: bias_gelu(3.0, b), TypeError, "x must be a torch.Tensor"),
        ("integer x", lambda: bias_gelu(x.int(), b), TypeError, "x has dtype"),
        ("scalar x", lambda: bias_gelu(torch.tensor(1.0), b), ValueError, "x must have at least 1 dim"),
        ("bias length", lambda: bias_gelu(x, torch.randn(7)), ValueError, "bias has shape"),
        ("2-D bias", lambda: bias_gelu(x, b[None]), ValueError, "bias must have 1 dims"),
        ("bias dtype", lambda: bias_gelu(x, b.half()), TypeError, "bias has dtype"),
        ("bias device", lambda: bias_gelu(x, b.to("meta")), ValueError, "bias is on meta"),
        ("approximate", lambda: bias_gelu(x, b, approximate=None), ValueError, "approximate"),
    ]


@pytest.mark.parametrize("case", BAD_CASES(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input_names_the_argument(case):
    expect_error(case)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_empty_input_returns_empty(backend):
    require_backend(backend, "cpu", KERNELS)
    b = torch.randn(16)
    with fastbert.use_backend(backend):
        for shape in ((0, 16), (2, 0, 16)):
            y = bias_gelu(torch.randn(shape), b)
            assert y.shape == shape


def test_float64_runs_on_torch_and_forcing_a_kernel_says_why():
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(bias_gelu(x, None), F.gelu(x))
    assert backends.last_decisions()["bias_gelu"].backend == "torch"
    if not backends.device_reasons("triton", torch.device("cpu"), forced=True):
        with fastbert.use_backend("triton"):
            with pytest.raises(backends.BackendUnavailableError, match="dtype torch.float64"):
                bias_gelu(x, None)
