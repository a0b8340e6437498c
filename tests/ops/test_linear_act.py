"""fastbert.ops.linear_act: the generalized feed-forward (activations, Conv1D "kn" weights, ModernBERT's
gated form, dropout) on every backend that serves it, forward and backward, against fastbert.reference in
float64 with the "no worse than PyTorch" rule. linear_gelu's own cases: test_linear_gelu.py.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backends, reference
from fastbert.ops import linear_act
from tests.helpers import DTYPES, require_backend
from tests.ops.gelu_checks import DTYPE_IDS, _check, _grads, _leaves, expect_error

KERNELS = ("linear_act_fwd", "linear_act_bwd")
ACTS = ["none", "tanh", "relu", "silu"]
# (M, K, N)
SHAPES = [(1, 64, 64), (7, 384, 200), (130, 64, 200)]


def _inputs(m, k, n, layout, gated, has_bias, dtype, lead=()):
    f = 2 * n if gated else n
    w = torch.randn(f, k) / k ** 0.5
    if layout == "kn":
        w = w.t().contiguous()
    return _leaves(dtype, "cpu", torch.randn(*lead, m, k), w, torch.randn(f) * 0.5 if has_bias else None)


def _run_and_check(backend, dtype, m, k, n, act, layout, gated, has_bias, dropout_p=0.0, lead=()):
    (x, w, b), (x64, w64, b64) = _inputs(m, k, n, layout, gated, has_bias, dtype, lead)
    kw = dict(activation=act, weight_layout=layout, gated=gated, dropout_p=dropout_p)
    torch.manual_seed(1234)
    with fastbert.use_backend(backend):
        out = linear_act(x, w, b, **kw)
    torch.manual_seed(1234)
    seed = reference.make_seed(torch.device("cpu")) if dropout_p > 0 else None
    assert out.shape == (*lead, m, n) and out.dtype == dtype
    out_torch = reference.linear_act(x, w, b, seed=seed, **kw)
    ref64 = reference.linear_act(x64, w64, b64, seed=seed, **kw)
    _check("out", out, out_torch, ref64)
    if dropout_p > 0:  # the reference's Philox mask: what it drops is dropped here
        assert (out.detach()[ref64.detach() == 0] == 0).all() and (ref64 == 0).any()
    dy = torch.randn(out.shape).to(dtype=dtype)
    with fastbert.use_backend(backend):
        grads = _grads(out, (x, w, b), dy)
    grads_torch = _grads(out_torch, (x, w, b), dy)
    grads64 = _grads(ref64, (x64, w64, b64), dy.double())
    for name, g, gt, g64 in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_torch, grads64):
        if g64 is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == g64.shape
        _check(name, g, gt, g64)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_act_activations_layouts_fp32(backend, act, layout, gated):
    require_backend(backend, "cpu", KERNELS if backend == "cpu" else ())
    _run_and_check(backend, torch.float32, 7, 64, 200, act, layout, gated, True)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case", [("silu", "nk", True, True), ("relu", "kn", False, False),
                                  ("tanh", "kn", True, False), ("none", "nk", True, True)],
                         ids=lambda c: f"{c[0]}-{c[1]}-{'gated' if c[2] else 'plain'}-{'bias' if c[3] else 'nobias'}")
def test_linear_act_cpu_dtypes_shapes(case, dtype, shape):
    require_backend("cpu", "cpu", KERNELS)
    act, layout, gated, has_bias = case
    _run_and_check("cpu", dtype, *shape, act, layout, gated, has_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_act_dropout(backend, gated, dtype):
    """Seeded from torch's generator: the reference with the same seed gives the same mask, and the
    backward (recomputed mask) matches the reference's gradient."""
    require_backend(backend, "cpu", KERNELS if backend == "cpu" else ())
    _run_and_check(backend, dtype, 130, 64, 64, "silu", "kn" if gated else "nk", gated, True, dropout_p=0.25,
                   lead=(2,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("act", ["relu", "silu", "none"])
def test_linear_act_triton_plain(act, layout, dtype):
    """Triton (interpreter, tiny shapes): linear_gelu's GEMM kernel with ReLU/SiLU in its epilogue, "kn" as a
    strided view; bf16 tl.dot is wrong in the interpreter (checked on a GPU)."""
    require_backend("triton", "cpu", ())
    _run_and_check("triton", dtype, 7, 64, 64, act, layout, False, True)


def test_linear_act_triton_opcheck():
    require_backend("triton", "cpu", ())
    x, w, b = torch.randn(7, 32), torch.randn(32, 64) / 6, torch.randn(64)
    torch.library.opcheck(torch.ops.fastbert.triton_linear_act_fwd, (x, w, b, "silu", True, True))
    pre = x @ w + b
    torch.library.opcheck(torch.ops.fastbert.triton_linear_act_bwd, (torch.randn(7, 64), x, w, b, pre, "relu", True))


def test_linear_act_dropout_mask_exact():
    require_backend("cpu", "cpu", KERNELS)
    x, w = torch.randn(7, 64), torch.randn(400, 64) / 8
    torch.manual_seed(7)
    with fastbert.use_backend("cpu"):
        out = linear_act(x, w, activation="relu", gated=True, dropout_p=0.5)
    torch.manual_seed(7)
    seed = reference.make_seed(torch.device("cpu"))
    offsets = torch.arange(7 * 200).reshape(7, 200)
    keep = reference.dropout_keep(seed, offsets, 0.5)
    nodrop = linear_act(x, w, activation="relu", gated=True)
    torch.testing.assert_close(out, torch.where(keep, nodrop * 2, torch.zeros(())))


def test_linear_act_matches_modernbert_mlp():
    """ModernBertMLP's own math (Wi chunked as input, gate; act(input) * gate) on its own tensors."""
    mm = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")
    cfg = mm.ModernBertConfig(hidden_size=64, intermediate_size=96, hidden_activation="gelu", mlp_bias=True,
                              mlp_dropout=0.0)
    mlp = mm.ModernBertMLP(cfg).double()
    x = torch.randn(5, 64, dtype=torch.float64)
    inp, gate = mlp.Wi(x).chunk(2, dim=-1)
    want = mlp.act(inp) * gate
    got = linear_act(x.float(), mlp.Wi.weight.float(), mlp.Wi.bias.float(), activation="none", gated=True)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(mlp.Wo(got.double()), mlp(x), atol=1e-5)


def test_linear_act_kn_view_not_copied(monkeypatch):
    """A "kn" weight given as a non-contiguous view (an nn.Linear weight transposed) reaches the kernel as
    that view: no transposed copy in the front end."""
    require_backend("cpu", "cpu", KERNELS)
    w_nk = torch.randn(96, 48) / 7
    w_kn = w_nk.t()
    seen = {}
    real = torch.ops.fastbert.linear_act_fwd

    def spy(x, weight, *args):
        seen["ptr"], seen["stride"] = weight.data_ptr(), weight.stride()
        return real(x, weight, *args)

    from fastbert.ops import _common
    monkeypatch.setitem(_common._kernels, ("cpu", "linear_act_fwd"), spy)
    x = torch.randn(7, 48)
    with fastbert.use_backend("cpu"):
        out = linear_act(x, w_kn, weight_layout="kn", activation="relu")
    assert seen == {"ptr": w_nk.data_ptr(), "stride": w_kn.stride()}
    torch.testing.assert_close(out, F.relu(x @ w_kn))


def test_linear_act_defaults_are_linear_gelu():
    """The linear_gelu cases go to linear_gelu itself (its dispatcher decides, nothing added)."""
    x, w, b = torch.randn(7, 48), torch.randn(96, 48) / 7, torch.randn(96)
    out = linear_act(x, w, b, activation="tanh")
    torch.testing.assert_close(out, fastbert.ops.linear_gelu(x, w, b, approximate="tanh"), rtol=0, atol=0)


def test_linear_act_triton_cuda_refuse_with_reason():
    """What has no kernel is refused with the reason, naming what is not served, so those inputs fall to
    the next backend (CUDA tensors: torch), never a silently different result. cuda: every linear_act-only
    case; triton: the gated form and dropout; cpu serves all."""
    mod = sys.modules["fastbert.ops.linear_act"]
    x = torch.randn(2, 2)
    kw = dict(x=x, activation="silu", weight_layout="kn", gated=True, dropout_p=0.1)
    why = mod.DISPATCH.checks["cuda"](**kw)
    assert len(why) == 1 and all(s in why[0] for s in ("activation='silu'", "weight_layout='kn'",
                                                       "gated=True", "dropout_p > 0", "no linear_act kernel"))
    why = mod.DISPATCH.checks["triton"](**kw)
    assert len(why) == 1 and "gated=True, dropout_p > 0: no Triton linear_act kernel" in why[0]
    assert mod.DISPATCH.checks["triton"](**dict(kw, gated=False, dropout_p=0.0)) == []
    assert mod.DISPATCH.checks["cpu"](**kw) == []
    if backends.triton_status()[0] and backends.triton_interpreter():
        with fastbert.use_backend("triton"), pytest.raises(backends.BackendUnavailableError,
                                                           match="no Triton linear_act kernel"):
            linear_act(x, torch.randn(4, 2), activation="relu", gated=True)


def test_linear_act_opcheck():
    require_backend("cpu", "cpu", KERNELS)
    x, w, b, seed = torch.randn(7, 48), torch.randn(192, 48) / 7, torch.randn(192), torch.tensor([5])
    g = torch.randn(7, 96)
    for args in [(x, w, b, "silu", False, True, 0.0, None), (x, w.t().contiguous(), None, "relu", True, False, 0.2,
                                                             seed)]:
        torch.library.opcheck(torch.ops.fastbert.linear_act_fwd, args)
    torch.library.opcheck(torch.ops.fastbert.linear_act_bwd, (g, x, w, b, "silu", False, True, 0.1, seed))
    torch.library.opcheck(torch.ops.fastbert.linear_act_bwd, (torch.randn(7, 192), x, w, None, "none", False, False,
                                                               0.0, None))


x0, w0 = torch.randn(3, 8), torch.randn(6, 8)
BAD = [
    ("activation", lambda: linear_act(x0, w0, activation="gelu"), ValueError, "activation"),
    ("layout", lambda: linear_act(x0, w0, weight_layout="t"), ValueError, "weight_layout"),
    ("gated-type", lambda: linear_act(x0, w0, gated=1), TypeError, "gated"),
    ("gated-odd", lambda: linear_act(x0, torch.randn(5, 8), gated=True), ValueError, "gated"),
    ("kn-shape", lambda: linear_act(x0, w0, weight_layout="kn"), ValueError, "weight"),
    ("bias", lambda: linear_act(x0, w0, torch.randn(3)), ValueError, "bias"),
    ("dropout", lambda: linear_act(x0, w0, dropout_p=1.0), ValueError, "dropout_p"),
    ("dtype", lambda: linear_act(x0, w0.half()), TypeError, "weight"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_linear_act_bad_inputs(case):
    expect_error(case)


def test_linear_act_poisoned_outputs(monkeypatch):
    """Under FASTBERT_POISON_OUTPUTS=1 every element of the outputs is written (no NaN survives)."""
    require_backend("cpu", "cpu", KERNELS)
    monkeypatch.setenv("FASTBERT_POISON_OUTPUTS", "1")
    x = torch.randn(130, 64, requires_grad=True)
    w = (torch.randn(400, 64) / 8).requires_grad_()
    b = torch.randn(400, requires_grad=True)
    with fastbert.use_backend("cpu"):
        out = linear_act(x, w, b, activation="silu", gated=True, dropout_p=0.1)
    assert torch.isfinite(out).all()
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.randn_like(out))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all() and torch.isfinite(gb).all()
    assert backends is not None
