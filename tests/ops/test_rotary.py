"""fastbert.ops.rotary: every backend x dtype x layout, forward and backward, against fastbert.reference in
float64 with the "no worse than PyTorch" rule, outputs NaN-poisoned (tests/conftest.py); HF's own
apply_rotary_pos_emb (ModernBERT) as a second oracle; opcheck; bad and empty input. The CUDA cases are
gpu-marked twins (the CUDA kernel is compile-checked by tests/test_cuda_compile.py everywhere).
Interpreter gap: fp32 -> bf16 casts truncate under TRITON_INTERPRET=1 (tests/ops/gelu_checks.py).
"""
import pytest
import torch

import fastbert
from fastbert import backends, reference
from fastbert.testing import assert_no_worse
from fastbert.ops import rotary
from tests.helpers import DEVICES, DTYPES, require_backend
from tests.ops.gelu_checks import BACKENDS, DTYPE_IDS, _bf16_interpreted, _check, expect_error

KERNELS = ("rotary_fwd", "rotary_bwd")


def _table(rows, d):
    """cos/sin of random angles, independent per (row, dim): the two halves differ, so the general formula
    (not only HF's cat(freqs, freqs) tables) is exercised."""
    theta = torch.rand(rows, d) * 6.3
    return theta.cos(), theta.sin()


# (id, B, S, H, Hk, D, table): table "2d" [S + 3, D], "3d" [B, S, D], "3d1" [1, S, D], "pos" position_ids into
# [S + 5, D], "packed" cu_seqlens (B sequences of the listed lengths) into [max + 2, D]. Padded q/k are
# strided views of one fused QKV tensor [B, S, 3, H, D] (k: of another when Hk != H).
CASES = [
    ("s1-d16-3d", 2, 1, 2, 2, 16, "3d"),
    ("s7-d32-2d", 2, 7, 3, 3, 32, "2d"),
    ("s7-d16-pos", 2, 7, 2, 2, 16, "pos"),
    ("s129-d64-3d1", 1, 129, 2, 1, 64, "3d1"),
    ("s200-d64-3d", 1, 200, 2, 2, 64, "3d"),
    ("s7-d64-h12-2d", 1, 7, 12, 12, 64, "2d"),
    ("packed-d32", (5, 0, 7, 1), None, 2, 1, 32, "packed"),
]


def _inputs(case, dtype, device, table_dtype=torch.float32):
    _, bsz, seq, heads, hk, d, kind = case
    kw = {}
    if kind == "packed":
        lens = bsz
        total = sum(lens)
        q = torch.randn(total, heads, d)
        k = torch.randn(total, hk, d)
        cos, sin = _table(max(lens) + 2, d)
        kw["cu_seqlens"] = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        q, k = q.to(device, dtype), k.to(device, dtype)
    else:
        qkv = torch.randn(bsz, seq, 3, heads, d).to(device, dtype)
        q = qkv[:, :, 0]
        k = qkv[:, :, 1] if hk == heads else torch.randn(bsz, seq, 2, hk, d).to(device, dtype)[:, :, 0]
        if kind == "2d":
            cos, sin = _table(seq + 3, d)
        elif kind == "pos":
            cos, sin = _table(seq + 5, d)
            kw["position_ids"] = torch.randint(0, seq + 5, (bsz, seq), device=device)
        else:
            nb = 1 if kind == "3d1" else bsz
            cos, sin = (t.reshape(nb, seq, d) for t in _table(nb * seq, d))
    cos, sin = cos.to(device, table_dtype), sin.to(device, table_dtype)
    return q, k, cos, sin, kw


def _ref64(q, k, cos, sin, kw):
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    return q64, k64, reference.rotary(q64, k64, cos.double(), sin.double(), **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_matches_reference(backend, device, dtype, case):
    require_backend(backend, device, KERNELS)
    q, k, cos, sin, kw = _inputs(case, dtype, device)
    q.requires_grad_()
    k.requires_grad_()
    truncating = _bf16_interpreted(backend, device, dtype)
    with fastbert.use_backend(backend):
        q_out, k_out = rotary(q, k, cos, sin, **kw)
    assert backends.last_decisions()["rotary"].backend == backend
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    assert q_out.is_contiguous() and k_out.is_contiguous()
    qt, kt = reference.rotary(q, k, cos, sin, **kw)
    q64, k64, (qr, kr) = _ref64(q, k, cos, sin, kw)
    _check("q_out", q_out, qt, qr, truncating=truncating)
    _check("k_out", k_out, kt, kr, truncating=truncating)

    gq, gk = torch.randn(q_out.shape).to(device, dtype), torch.randn(k_out.shape).to(device, dtype)
    with fastbert.use_backend(backend):
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    dqt, dkt = torch.autograd.grad((qt, kt), (q, k), (gq, gk))
    dq64, dk64 = torch.autograd.grad((qr, kr), (q64, k64), (gq.double(), gk.double()))
    _check("grad_q", dq, dqt, dq64, truncating=truncating)
    _check("grad_k", dk, dkt, dk64, truncating=truncating)


@pytest.mark.parametrize("table_dtype", ["same", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_matches_hf_apply_rotary_pos_emb(backend, dtype, table_dtype):
    """HF's ModernBERT apply_rotary_pos_emb (on [B, H, S, D], with tables built as its rotary module builds
    them: cat(freqs, freqs), base 10000) as a second oracle: fastbert on the [B, S, H, D] views of one QKV
    tensor is no worse than it."""
    mb = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")
    require_backend(backend, "cpu", KERNELS)
    bsz, seq, heads, d = 2, 9, 2, 32
    qkv = torch.randn(bsz, seq, 3, heads, d).to(dtype)
    q, k, _ = qkv.unbind(2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(seq, dtype=torch.float32)[None, :, None] * inv_freq  # [1, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1).expand(bsz, seq, d)
    tdt = torch.float32 if table_dtype == "fp32" else dtype
    cos, sin = emb.cos().to(tdt), emb.sin().to(tdt)
    hq, hk = mb.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q64, k64, (qr, kr) = _ref64(q, k, cos, sin, {})
    with fastbert.use_backend(backend):
        q_out, k_out = rotary(q, k, cos, sin)
    truncating = _bf16_interpreted(backend, "cpu", dtype)
    _check("q_out", q_out, hq.transpose(1, 2), qr, truncating=truncating)
    _check("k_out", k_out, hk.transpose(1, 2), kr, truncating=truncating)


def test_packed_positions_restart_per_sequence():
    """Packed tokens rotate by their position within their own sequence: the same as the padded layout."""
    lens = [3, 0, 5]
    d = 16
    cos, sin = _table(8, d)
    q = torch.randn(sum(lens), 2, d)
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    for backend in ("triton", "cpu", "torch"):
        if backends.device_reasons(backend, torch.device("cpu"), KERNELS, forced=True):
            continue
        with fastbert.use_backend(backend):
            q_out, _ = rotary(q, q, cos, sin, cu_seqlens=cu)
            seq2, _ = rotary(q[3:8][None], q[3:8][None], cos, sin)
        torch.testing.assert_close(q_out[3:8], seq2[0], rtol=0, atol=0)
        torch.testing.assert_close(q_out[:3], reference.rotary(q[None, :3], q[None, :3], cos, sin)[0][0])
    # 19 sequences (some empty): more binary-search steps than one unrolled block of 4
    lens = torch.randint(0, 4, (19,))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    q = torch.randn(int(lens.sum()), 1, d)
    want = reference.rotary(q, q, cos, sin, cu_seqlens=cu)[0]
    want64 = reference.rotary(q.double(), q.double(), cos.double(), sin.double(), cu_seqlens=cu)[0]
    for backend in ("triton", "cpu"):
        if not backends.device_reasons(backend, torch.device("cpu"), KERNELS, forced=True):
            with fastbert.use_backend(backend):
                assert_no_worse("q_out", rotary(q, q, cos, sin, cu_seqlens=cu)[0], want, want64)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_cos_sin_get_no_gradient(backend):
    require_backend(backend, "cpu", KERNELS)
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    cos, sin = (t.requires_grad_() for t in _table(4, 8))
    with fastbert.use_backend(backend):
        q_out, k_out = rotary(q, q, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad is not None and cos.grad is None and sin.grad is None


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck on the kernel-level ops (strided q, position_ids, packed)
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    qkv = torch.randn(2, 5, 3, 2, 16)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    cos, sin = _table(7, 16)
    pos = torch.randint(0, 7, (2, 5))
    qp, kp = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [(q, k, cos, sin, None, None), (q, k, cos, sin, pos, None), (qp, kp, cos, sin, None, cu),
            (q, k, cos[:5].reshape(1, 5, 16).contiguous(), sin[:5].reshape(1, 5, 16).contiguous(), None, None)]


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_opcheck(backend, name):
    require_backend(backend, "cpu", (name,))
    op = getattr(torch.ops.fastbert, ("triton_" if backend == "triton" else "") + name)
    cases = _opcheck_cases()
    for args in cases if backend == "cpu" else cases[1:3]:  # the interpreter is slow: position_ids, packed
        torch.library.opcheck(op, args)


def test_opcheck_cpp_autograd_op():
    require_backend("cpu", "cpu", KERNELS)
    for q, k, *rest in _opcheck_cases()[:3]:
        torch.library.opcheck(torch.ops.fastbert.rotary, (q.clone().requires_grad_(), k.clone().requires_grad_(),
                                                          *rest))


def test_cpp_autograd_op_is_its_kernels():
    """fastbert::rotary under autograd: the _fwd kernel's outputs and the _bwd kernel's gradients, exactly."""
    require_backend("cpu", "cpu", KERNELS)
    q, k, cos, sin, pos, _ = _opcheck_cases()[1]
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    qo, ko = torch.ops.fastbert.rotary_fwd(q, k, cos, sin, pos, None)
    dq, dk = torch.ops.fastbert.rotary_bwd(gq, gk, cos, sin, pos, None)
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qa, ka = torch.ops.fastbert.rotary(ql, kl, cos, sin, pos, None)
    assert torch.equal(qa, qo) and torch.equal(ka, ko)
    ga, gb = torch.autograd.grad((qa, ka), (ql, kl), (gq, gk))
    assert torch.equal(ga, dq) and torch.equal(gb, dk)


# ----------------------------------------------------------------------------------------------
# bad input, empty input, fallback
# ----------------------------------------------------------------------------------------------
def BAD_CASES():
    q = torch.randn(2, 5, 2, 8)
    cos, sin = _table(5, 8)
    qp = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    return [
        ("not a tensor", lambda: rotary(1.0, q, cos, sin), TypeError, "q must be a torch.Tensor"),
        ("integer q", lambda: rotary(q.int(), q, cos, sin), TypeError, "q has dtype"),
        ("k dtype", lambda: rotary(q, q.half(), cos, sin), TypeError, "k has dtype"),
        ("sin dtype", lambda: rotary(q, q, cos, sin.half()), TypeError, "sin has dtype"),
        ("odd head dim", lambda: rotary(q[..., :7], q[..., :7], cos[:, :7], sin[:, :7]), ValueError,
         "head dim must be even"),
        ("3-D q unpacked", lambda: rotary(qp, qp, cos, sin), ValueError, r"q must be \[B, S, H, D\]"),
        ("k shape", lambda: rotary(q, q[:, :4], cos, sin), ValueError, "k has shape"),
        ("non-unit D stride", lambda: rotary(q.transpose(2, 3), q.transpose(2, 3), cos[:, :2], sin[:, :2]),
         ValueError, "unit stride"),
        ("cos last dim", lambda: rotary(q, q, cos[:, :4], sin[:, :4]), ValueError, "cos must be"),
        ("sin shape", lambda: rotary(q, q, cos, sin[:4]), ValueError, "sin has shape"),
        ("cos rows", lambda: rotary(q, q, cos[:4], sin[:4]), ValueError, "cos has 4 rows"),
        ("3-D cos shape", lambda: rotary(q, q, cos[None, :4], sin[None, :4]), ValueError, "cos has shape"),
        ("cos device", lambda: rotary(q, q, cos.to("meta"), sin.to("meta")), ValueError, "cos is on meta"),
        ("position_ids dtype", lambda: rotary(q, q, cos, sin, position_ids=torch.zeros(2, 5)), TypeError,
         "position_ids must be torch.int64"),
        ("position_ids shape", lambda: rotary(q, q, cos, sin, position_ids=torch.zeros(2, 4, dtype=torch.long)),
         ValueError, "position_ids has shape"),
        ("position_ids range", lambda: rotary(q, q, cos, sin, position_ids=torch.full((2, 5), 5)), ValueError,
         r"position_ids must lie in \[0, 5\)"),
        ("cu_seqlens dtype", lambda: rotary(qp, qp, cos, sin, cu_seqlens=cu.long()), TypeError,
         "cu_seqlens must be torch.int32"),
        ("cu_seqlens end", lambda: rotary(qp[:5], qp[:5], cos, sin, cu_seqlens=cu), ValueError,
         "cu_seqlens must end at"),
        ("cu_seqlens order", lambda: rotary(qp, qp, cos, sin, cu_seqlens=torch.tensor([0, 4, 2, 6],
                                                                                      dtype=torch.int32)),
         ValueError, "non-decreasing"),
        ("packed too long", lambda: rotary(qp, qp, cos[:3], sin[:3], cu_seqlens=cu), ValueError,
         "cos has 3 rows but cu_seqlens holds a sequence of 4"),
        ("packed with position_ids", lambda: rotary(qp, qp, cos, sin, cu_seqlens=cu,
                                                    position_ids=torch.zeros(1, 6, dtype=torch.long)),
         ValueError, "position_ids cannot be given with cu_seqlens"),
    ]


@pytest.mark.parametrize("case", BAD_CASES(), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input_names_the_argument(case):
    expect_error(case)


def test_cpu_kernel_checks_name_the_argument():
    require_backend("cpu", "cpu", KERNELS)
    q = torch.randn(1, 3, 2, 8)
    cos, sin = _table(3, 8)
    f = torch.ops.fastbert.rotary_fwd
    with pytest.raises(RuntimeError, match="head dim must be even"):
        f(q[..., :7], q[..., :7], cos[:, :7].contiguous(), sin[:, :7].contiguous(), None, None)
    with pytest.raises(RuntimeError, match="position_ids must lie in"):
        f(q, q, cos, sin, torch.full((1, 3), 3), None)
    with pytest.raises(RuntimeError, match="cu_seqlens must have dtype int32"):
        f(q[0], q[0], cos, sin, None, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="cos must have dtype float32 or q's dtype"):
        f(q, q, cos.double(), sin.double(), None, None)


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_empty_input_returns_empty(backend):
    require_backend(backend, "cpu", KERNELS)
    cos, sin = _table(4, 8)
    with fastbert.use_backend(backend):
        for shape in ((0, 4, 2, 8), (2, 0, 2, 8), (2, 4, 0, 8)):
            q_out, k_out = rotary(torch.randn(shape), torch.randn(shape), cos, sin)
            assert q_out.shape == shape and k_out.shape == shape
        q_out, _ = rotary(torch.randn(0, 2, 8), torch.randn(0, 2, 8), cos, sin,
                          cu_seqlens=torch.zeros(1, dtype=torch.int32))
        assert q_out.shape == (0, 2, 8)


def test_float64_and_other_tables_run_on_torch_and_forcing_a_kernel_says_why():
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    cos, sin = _table(3, 8)
    q_out, _ = rotary(q, q, cos, sin)
    torch.testing.assert_close(q_out, reference.rotary(q, q, cos, sin)[0])
    assert backends.last_decisions()["rotary"].backend == "torch"
    rotary(q.float(), q.float(), cos.double(), sin.double())
    assert backends.last_decisions()["rotary"].backend == "torch"
    if not backends.device_reasons("triton", torch.device("cpu"), forced=True):
        with fastbert.use_backend("triton"):
            with pytest.raises(backends.BackendUnavailableError, match="dtype torch.float64"):
                rotary(q, q, cos, sin)
            with pytest.raises(backends.BackendUnavailableError, match="cos/sin dtype torch.float64"):
                rotary(q.float(), q.float(), cos.double(), sin.double())
