"""fastbert.ops.linear_gelu: every backend x device x dtype x shape, forward and backward, against
fastbert.reference in float64 with the "no worse than PyTorch" rule (interpreter gaps: gelu_checks.py).
Elsewhere: the cpu/cuda kernels' own cases in test_cpu_backend.py / test_cuda_backend.py; its epilogue
kernel, bias_gelu, in test_bias_gelu.py; the sm_80/sm_90a compile of its Triton kernel (tensor cores at
16 bits, none at fp32) in tests/test_triton_aot.py.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backends, reference
from fastbert.ops import linear_gelu
from fastbert.testing import assert_no_worse
from tests.helpers import DEVICES, DTYPES, require_backend
from tests.ops.gelu_checks import (BACKENDS, DTYPE_IDS, _bf16_interpreted, _check, _grads, _leaves, expect_error,
                                   run_opcheck)

KERNELS = ("linear_gelu_fwd", "linear_gelu_bwd")
NAMES = list(KERNELS)

# (x shape, N, bias?): rows 1, 7, 129; K/N powers of two and not (48/96, 384, 13 < one K step / 70);
# leading dims; no bias
LG_SHAPES = [
    ((1, 32), 64, True),
    ((5, 3, 13), 70, True),
    ((7, 48), 96, True),
    ((129, 32), 64, True),
    ((2, 7, 48), 96, False),
    ((7, 384), 96, True),
]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", LG_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}{'' if s[2] else '-nobias'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_matches_reference(backend, device, dtype, shape, approximate):
    require_backend(backend, device, KERNELS)
    if _bf16_interpreted(backend, device, dtype):
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter; bf16 linear_gelu is checked on a GPU")
    x_shape, n, has_bias = shape
    k = x_shape[-1]
    # weights at nn.Linear's scale keep the pre-activation O(1), where GELU is curved
    (x, w, b), (x64, w64, b64) = _leaves(
        dtype, device, torch.randn(x_shape), torch.randn(n, k) / k ** 0.5,
        torch.randn(n) * 0.5 if has_bias else None)

    with fastbert.use_backend(backend):
        out = linear_gelu(x, w, b, approximate=approximate)
    assert out.shape == (*x_shape[:-1], n) and out.dtype == dtype
    out_torch = reference.linear_gelu(x, w, b, approximate=approximate)
    ref64 = reference.linear_gelu(x64, w64, b64, approximate=approximate)
    _check("out", out, out_torch, ref64)

    dy = torch.randn(out.shape).to(device=device, dtype=dtype)
    with fastbert.use_backend(backend):
        grads = _grads(out, (x, w, b), dy)
    grads_torch = _grads(out_torch, (x, w, b), dy)
    grads64 = _grads(ref64, (x64, w64, b64), dy.double())
    for name, g, gt, g64 in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_torch, grads64):
        if g64 is None:
            assert g is None
            continue
        assert g.dtype == dtype
        _check(name, g, gt, g64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gelu_strided_input_and_partial_grads(backend, device):
    """x as a strided view (a column slice), only weight requiring grad: dx is not asked for."""
    require_backend(backend, device, KERNELS)
    dtype = torch.float32
    big = torch.randn(7, 80, device=device)
    x = big[:, 8:56]  # [7, 48], row stride 80
    w = (torch.randn(96, 48, device=device) / 7).requires_grad_()
    b = torch.randn(96, device=device)
    with fastbert.use_backend(backend):
        out = linear_gelu(x, w, b)
    w64 = w.detach().double().requires_grad_()
    ref64 = reference.linear_gelu(x.double(), w64, b.double())
    out_torch = reference.linear_gelu(x, w, b)
    assert_no_worse("out", out, out_torch, ref64)
    dy = torch.randn(out.shape, device=device, dtype=dtype)
    (gw,) = torch.autograd.grad(out, (w,), dy)
    (gw_torch,) = torch.autograd.grad(out_torch, (w,), dy)
    (gw64,) = torch.autograd.grad(ref64, (w64,), dy.double())
    assert_no_worse("grad_weight", gw, gw_torch, gw64)


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck on the kernel-level ops, torch.compile through the front end
# ----------------------------------------------------------------------------------------------
def _opcheck_cases(device, dtype=torch.float32):
    def r(*s):
        return torch.randn(*s, device=device, dtype=dtype)

    x, w, b = r(7, 48), r(96, 48) / 7, r(96)
    pre = F.linear(x, w, b)
    return {
        "linear_gelu_fwd": [(x, w, b, "none", True), (x, w, None, "tanh", False)],
        "linear_gelu_bwd": [(r(7, 96), x, w, b, pre, "none"), (r(7, 96), x, w, None, pre, "tanh")],
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, device, name):
    run_opcheck(backend, device, name, _opcheck_cases(device))


def test_linear_gelu_fwd_saves_pre_only_when_asked():
    require_backend("triton", "cpu")
    x, w, b = torch.randn(7, 32), torch.randn(64, 32) / 6, torch.randn(64)
    out, pre = torch.ops.fastbert.triton_linear_gelu_fwd(x, w, b, "none", False)
    assert pre.shape == (0,)
    out2, pre2 = torch.ops.fastbert.triton_linear_gelu_fwd(x, w, b, "none", True)
    torch.testing.assert_close(pre2, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_aot_eager(device):
    require_backend("triton", device)

    def ffn(x, w, b):
        return linear_gelu(x, w, b).square().sum()

    x = torch.randn(2, 7, 32, device=device, requires_grad=True)
    w = (torch.randn(64, 32, device=device) / 6).requires_grad_()
    b = torch.randn(64, device=device, requires_grad=True)
    with fastbert.use_backend("triton"):
        eager = ffn(x, w, b)
        g_eager = torch.autograd.grad(eager, (x, w, b))
        compiled = torch.compile(ffn, backend="aot_eager")(x, w, b)
        g_compiled = torch.autograd.grad(compiled, (x, w, b))
    assert backends.last_decisions()["linear_gelu"].backend == "triton"
    torch.testing.assert_close(compiled, eager)
    for a, c in zip(g_eager, g_compiled):
        torch.testing.assert_close(c, a)


# ----------------------------------------------------------------------------------------------
# bad input, empty input, fallback
# ----------------------------------------------------------------------------------------------
def BAD_CASES():
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    return [
        ("not a tensor", lambda: linear_gelu([[1.0]], w, b), TypeError, "x must be a torch.Tensor"),
        ("integer x", lambda: linear_gelu(x.long(), w, b), TypeError, "x has dtype"),
        ("scalar x", lambda: linear_gelu(torch.tensor(1.0), w, b), ValueError, "x must have at least 1 dim"),
        ("1-D weight", lambda: linear_gelu(x, w[0], b), ValueError, "weight must have 2 dims"),
        ("K mismatch", lambda: linear_gelu(x, torch.randn(4, 9), b), ValueError, "weight has shape"),
        ("bias length", lambda: linear_gelu(x, w, torch.randn(5)), ValueError, "bias has shape"),
        ("2-D bias", lambda: linear_gelu(x, w, b[None]), ValueError, "bias must have 1 dims"),
        ("weight dtype", lambda: linear_gelu(x, w.half(), b), TypeError, "weight has dtype"),
        ("bias dtype", lambda: linear_gelu(x, w, b.double()), TypeError, "bias has dtype"),
        ("integer weight", lambda: linear_gelu(x, w.int(), b), TypeError, "weight has dtype"),
        ("weight device", lambda: linear_gelu(x, w.to("meta"), b), ValueError, "weight is on meta"),
        ("bias device", lambda: linear_gelu(x, w, b.to("meta")), ValueError, "bias is on meta"),
        ("approximate", lambda: linear_gelu(x, w, b, approximate="erf"), ValueError, "approximate"),
    ]


@pytest.mark.parametrize("case", BAD_CASES(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input_names_the_argument(case):
    expect_error(case)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_empty_input_returns_empty(backend):
    require_backend(backend, "cpu", KERNELS)
    w = torch.randn(16, 8, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    with fastbert.use_backend(backend):
        for x_shape in ((0, 8), (2, 0, 8)):
            x = torch.randn(x_shape, requires_grad=True)
            out = linear_gelu(x, w, b)
            assert out.shape == (*x_shape[:-1], 16)
            gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
            assert gx.shape == x.shape and not gw.any() and not gb.any()
        # K = 0: an empty sum, so gelu(bias) on every row, as F.linear + F.gelu give
        out = linear_gelu(torch.randn(3, 0), torch.randn(16, 0), b.detach())
        torch.testing.assert_close(out, F.gelu(b.detach()).expand(3, 16))


def test_float64_runs_on_torch_and_forcing_a_kernel_says_why():
    x, w, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None
    out = linear_gelu(x, w, b)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w)))
    assert backends.last_decisions()["linear_gelu"].backend == "torch"
    if not backends.device_reasons("triton", torch.device("cpu"), forced=True):
        with fastbert.use_backend("triton"):
            with pytest.raises(backends.BackendUnavailableError, match="dtype torch.float64"):
                linear_gelu(x, w, b)
