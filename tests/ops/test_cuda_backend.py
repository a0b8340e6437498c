"""The C++/CUDA backend (csrc/cuda, csrc/cuda_bindings) called directly through torch.ops.fastbert.*.

Every test here needs an NVIDIA GPU and a CUDA build of fastbert._C (`gpu` marker; skipped elsewhere
with the reason). What they check, beyond the shared per-op tests that run with backend="cuda":
  - each kernel against the float64 reference with the equivalence rule (fastbert.testing), forward
    and backward, on awkward shapes: odd hidden sizes (the scalar path), misaligned views, seq 1/7/129,
    head dims off the 32/64/128 grid (zero-padded in shared memory), fully padded sequences;
  - the saved statistics (LayerNorm mean/rstd, attention lse) against float64;
  - dropout masks identical to the reference's Philox stream (same seed -> same kept set);
  - cuda vs triton vs reference on random shapes;
  - bad inputs rejected by the bindings' TORCH_CHECKs, naming the argument;
  - determinism of the backward passes (no atomics: bit-identical reruns);
  - compute-sanitizer memcheck and racecheck over every kernel (skipped without compute-sanitizer).
Outputs are NaN-poisoned before the kernels run (FASTBERT_POISON_OUTPUTS=1 from conftest), so an
element a kernel forgets to write fails the comparison.
"""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastbert import backends, reference
from fastbert.testing import ATOL, assert_no_worse

DEVICE = "cuda"
pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("attention_fwd", "attention_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd", "bias_gelu_fwd",
       "bias_gelu_bwd", "linear_gelu_fwd", "linear_gelu_bwd")


@pytest.fixture(autouse=True)
def _need_cuda_kernels():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = [op for op in OPS if not backends.has_kernel(op, DEVICE.upper())]
    if missing:
        pytest.skip(f"fastbert._C has no {DEVICE.upper()} kernels for {', '.join(missing)} "
                    f"({backends.extension_status()[1]})")


def _rand(shape, dtype, scale=1.0):
    # drawn in float64 and rounded once: the float64 reference sees exactly the kernel's inputs
    return (torch.randn(shape, dtype=torch.float64, device=DEVICE) * scale).to(dtype)


def _seed():
    return reference.make_seed(DEVICE)


F = torch.ops.fastbert


# ----------------------------------------------------------------------------------------------
# bias_gelu / linear_gelu
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,n,bias,offset", [
    (7, 768, True, 0),      # 128-bit path
    (5, 3072, False, 0),
    (3, 387, True, 0),      # n % 8 != 0: scalar path
    (4, 384, True, 1),      # misaligned view (storage offset 1): scalar path
    (1, 1, True, 0),
])
def test_bias_gelu(dtype, approximate, rows, n, bias, offset):
    x = _rand((rows * n + offset,), dtype)[offset:].view(rows, n)
    b = _rand((n,), dtype) if bias else None
    g = _rand((rows, n), dtype)
    out = F.bias_gelu_fwd(x, b, approximate)
    out_t = reference.bias_gelu(x, b, approximate=approximate)
    out64 = reference.bias_gelu(x.double(), b.double() if bias else None, approximate=approximate)
    assert out.dtype == dtype and out.shape == (rows, n)
    assert_no_worse("bias_gelu out", out, out_t, out64)

    gx = F.bias_gelu_bwd(g, x, b, approximate)
    x64 = x.double().requires_grad_()
    reference.bias_gelu(x64, b.double() if bias else None, approximate=approximate).backward(g.double())
    xt = x.clone().requires_grad_()
    reference.bias_gelu(xt, b, approximate=approximate).backward(g)
    assert_no_worse("bias_gelu grad_x", gx, xt.grad, x64.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("save_pre", [True, False])
@pytest.mark.parametrize("m,k,n,bias", [(9, 384, 1536, True), (1, 64, 33, False), (17, 96, 40, True)])
def test_linear_gelu(dtype, save_pre, m, k, n, bias):
    x = _rand((m, k), dtype)
    w = _rand((n, k), dtype, 1 / math.sqrt(k))
    b = _rand((n,), dtype) if bias else None
    g = _rand((m, n), dtype)
    out, pre = F.linear_gelu_fwd(x, w, b, "none", save_pre)
    assert out.shape == (m, n) and out.dtype == dtype
    assert pre.shape == ((m, n) if save_pre else (0,))

    def run(dt):
        xs, ws = x.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()
        bs = b.detach().to(dt).requires_grad_() if bias else None
        o = reference.linear_gelu(xs, ws, bs)
        o.backward(g.to(dt))
        return o.detach(), xs.grad, ws.grad, (bs.grad if bias else None)

    o_t, gx_t, gw_t, gb_t = run(dtype)
    o64, gx64, gw64, gb64 = run(torch.float64)
    assert_no_worse("linear_gelu out", out, o_t, o64)
    if save_pre:
        pre64 = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
        pre_t = torch.nn.functional.linear(x, w, b)
        assert_no_worse("linear_gelu pre", pre, pre_t, pre64)
    gx, gw, gb = F.linear_gelu_bwd(g, x, w, b, pre, "none")
    assert_no_worse("linear_gelu grad_x", gx, gx_t, gx64)
    assert_no_worse("linear_gelu grad_weight", gw, gw_t, gw64)
    if bias:
        assert_no_worse("linear_gelu grad_bias", gb, gb_t, gb64)
    else:
        assert gb.shape == (0,)


def test_linear_gelu_fp32_ignores_tf32_switch():
    """fp32 is IEEE even when the user allows TF32 globally: the binding turns it off around its GEMMs."""
    m, k, n = 64, 512, 256
    x, w = _rand((m, k), torch.float32), _rand((n, k), torch.float32, 1 / math.sqrt(k))
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out, _ = F.linear_gelu_fwd(x, w, None, "none", False)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out64 = reference.linear_gelu(x.double(), w.double())
    # TF32 (10-bit mantissa) would be off by ~1e-3 here; IEEE fp32 stays near 1e-6
    assert (out.double() - out64).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------
# add_layer_norm
# ----------------------------------------------------------------------------------------------
def _ln_reference(x, w, b, r, xb, eps, p, seed, g, dtype):
    """(out, mean, rstd, grad_pre_or_x, grad_x, gw, gb, gxb) of the reference at `dtype` (autograd)."""
    cast = (lambda t: None if t is None else t.detach().to(dtype).requires_grad_())
    xs, ws, bs, rs, xbs = cast(x), cast(w), cast(b), cast(r), cast(xb)
    out = reference.add_layer_norm(xs, ws, bs, residual=rs, x_bias=xbs, eps=eps, dropout_p=p, seed=seed)
    out.backward(g.to(dtype))
    return out.detach(), xs.grad, ws.grad, (bs.grad if bs is not None else None), \
        (rs.grad if rs is not None else None), (xbs.grad if xbs is not None else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", [(1, 768), (7, 384), (33, 1024), (5, 4096), (3, 8192), (6, 1001), (2, 312)])
@pytest.mark.parametrize("extras", ["none", "all", "residual"])
def test_add_layer_norm(dtype, rows, n, extras):
    x = _rand((rows, n), dtype)
    w = 1 + 0.1 * _rand((n,), torch.float32)
    b = 0.1 * _rand((n,), torch.float32) if extras == "all" else None
    r = _rand((rows, n), dtype) if extras in ("all", "residual") else None
    xb = _rand((n,), dtype) if extras == "all" else None
    g = _rand((rows, n), dtype)
    eps = 1e-12
    out, mean, rstd = F.add_layer_norm_fwd(x, w, b, r, xb, eps, 0.0, None)
    o_t, gx_t, gw_t, gb_t, gr_t, gxb_t = _ln_reference(x, w, b, r, xb, eps, 0.0, None, g, dtype)
    o64, gx64, gw64, gb64, gr64, gxb64 = _ln_reference(x, w, b, r, xb, eps, 0.0, None, g, torch.float64)
    assert_no_worse("add_layer_norm out", out, o_t, o64)

    h64 = x.double() + (xb.double() if xb is not None else 0) + (r.double() if r is not None else 0)
    mean64 = h64.mean(-1)
    rstd64 = 1 / torch.sqrt(h64.var(-1, unbiased=False) + eps)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    # fp32 statistics of the same (exactly representable) inputs: relative fp32 rounding level
    assert torch.allclose(mean.double(), mean64, rtol=1e-5, atol=1e-5 * h64.abs().max().item())
    assert torch.allclose(rstd.double(), rstd64, rtol=1e-4)

    g_pre, g_x, g_w, g_b, g_xb = F.add_layer_norm_bwd(g, x, w, b, r, xb, mean, rstd, 0.0, None)
    assert g_x.shape == (0,)
    assert_no_worse("add_layer_norm grad_pre", g_pre, gx_t, gx64)
    if r is not None:
        assert_no_worse("add_layer_norm grad_residual", g_pre, gr_t, gr64)
    # column sums over rows: fp32 accumulation in a different order than torch's; k * torch err + atol
    assert_no_worse("add_layer_norm grad_weight", g_w, gw_t, gw64, atol=ATOL[torch.float32] * rows)
    if b is not None:
        assert_no_worse("add_layer_norm grad_bias", g_b, gb_t, gb64, atol=ATOL[torch.float32] * rows)
    else:
        assert g_b.shape == (0,)
    if xb is not None:
        assert_no_worse("add_layer_norm grad_x_bias", g_xb, gxb_t, gxb64, dtype=dtype)
    else:
        assert g_xb.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [768, 1001])
def test_add_layer_norm_dropout(dtype, n):
    rows, p = 19, 0.25
    x, r = _rand((rows, n), dtype), _rand((rows, n), dtype)
    w, xb = 1 + 0.1 * _rand((n,), torch.float32), _rand((n,), dtype)
    g = _rand((rows, n), dtype)
    seed = _seed()
    out, mean, rstd = F.add_layer_norm_fwd(x, w, None, r, xb, 1e-5, p, seed)
    o_t, gx_t, gw_t, _, gr_t, gxb_t = _ln_reference(x, w, None, r, xb, 1e-5, p, seed, g, dtype)
    o64, gx64, gw64, _, gr64, gxb64 = _ln_reference(x, w, None, r, xb, 1e-5, p, seed, g, torch.float64)
    assert_no_worse("add_layer_norm+dropout out", out, o_t, o64)
    g_pre, g_x, g_w, _, g_xb = F.add_layer_norm_bwd(g, x, w, None, r, xb, mean, rstd, p, seed)
    assert_no_worse("add_layer_norm+dropout grad_x", g_x, gx_t, gx64)
    assert_no_worse("add_layer_norm+dropout grad_residual", g_pre, gr_t, gr64)
    # the kept set is the reference's: grad_x is exactly 0 where the reference dropped
    keep = reference.dropout_keep(seed, torch.arange(rows * n, device=DEVICE).reshape(rows, n), p)
    assert bool((g_x[~keep] == 0).all())
    assert_no_worse("add_layer_norm+dropout grad_x_bias", g_xb, gxb_t, gxb64, atol=ATOL[dtype] * rows)


def test_add_layer_norm_empty_rows():
    w = torch.ones(64, device=DEVICE)
    x = torch.empty(0, 64, device=DEVICE)
    out, mean, rstd = F.add_layer_norm_fwd(x, w, w, None, None, 1e-5, 0.0, None)
    assert out.shape == (0, 64) and mean.shape == (0,)
    g_pre, g_x, g_w, g_b, g_xb = F.add_layer_norm_bwd(x, x, w, w, None, None, mean, rstd, 0.0, None)
    assert g_pre.shape == (0, 64)
    assert bool((g_w == 0).all()) and bool((g_b == 0).all())


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _lse64(q, k, mask, bias, causal, scale, cu=None):
    """float64 logsumexp of the visible scores, +inf where a row sees no key; the kernels' lse layout."""
    if cu is not None:
        H = q.shape[1]
        lse = torch.full((H, q.shape[0]), float("inf"), dtype=torch.float64, device=q.device)
        bounds = cu.tolist()
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            if s1 > s0:
                part = _lse64(q[None, s0:s1], k[None, s0:s1], None, None, causal, scale)  # [1, H, L]
                lse[:, s0:s1] = part[0]
        return lse
    qh, kh = q.double().transpose(1, 2), k.double().transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    B, H, Sq, Sk = s.shape
    vis = torch.ones(B, 1, Sq, Sk, dtype=torch.bool, device=q.device)
    if mask is not None:
        vis = vis & mask[:, None, None, :]
    if causal:
        vis = vis & torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def _attn_case(mode, B, H, S, D, dtype, Sk=None):
    Sk = S if Sk is None else Sk
    if mode == "varlen":
        lens = [S, max(1, S // 2), 0, 1][:B]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)
        total = sum(lens)
        q, k, v = (_rand((total, H, D), dtype) for _ in range(3))
        return q, k, v, dict(cu=cu, max_seqlen=max(lens), mask=None, bias=None, causal=False)
    # q/k/v as strided views of one fused [B, S, 3, H, D] projection (read in place)
    qkv = _rand((B, S, 3, H, D), dtype)
    q, k, v = qkv.unbind(2)
    if Sk != S:
        k, v = _rand((B, Sk, H, D), dtype), _rand((B, Sk, H, D), dtype)
    kw = dict(cu=None, max_seqlen=max(S, Sk), mask=None, bias=None, causal=mode == "causal")
    if mode in ("padding", "bias"):
        mask = torch.ones(B, Sk, dtype=torch.bool, device=DEVICE)
        if B > 1:
            mask[1, (Sk + 1) // 2:] = False  # right padding
        if B > 2:
            mask[2] = False                  # a sequence of all padding: out 0, lse +inf
        kw["mask"] = mask
    if mode == "bias":
        kw["bias"] = _rand((1, H, S, Sk), torch.float32).expand(B, H, S, Sk)  # broadcast view, stride 0
    return q, k, v, kw


def _attn_reference(q, k, v, kw, scale, p, seed, g, dtype):
    qs, ks, vs = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference.attention(qs, ks, vs, attention_mask=kw["mask"], attn_bias=kw["bias"],
                              cu_seqlens=kw["cu"], max_seqlen=kw["max_seqlen"] if kw["cu"] is not None else None,
                              causal=kw["causal"], scale=scale, dropout_p=p, seed=seed)
    out.backward(g.to(dtype))
    return out.detach(), qs.grad, ks.grad, vs.grad


def _valid_rows(q, kw):
    """Rows that see at least one key (fully padded sequences are checked separately: exactly 0)."""
    if kw["mask"] is None:
        return None
    return kw["mask"].any(-1)[:, None, None, None].expand_as(q)


def _check_attention(mode, B, H, S, D, dtype, p=0.0, Sk=None):
    q, k, v, kw = _attn_case(mode, B, H, S, D, dtype, Sk)
    scale = 1.0 / math.sqrt(D)
    seed = _seed() if p > 0 else None
    out, lse = F.attention_fwd(q, k, v, kw["mask"], kw["bias"], kw["cu"], kw["max_seqlen"], kw["causal"], scale, p,
                               seed)
    g = _rand(out.shape, dtype)
    o_t, gq_t, gk_t, gv_t = _attn_reference(q, k, v, kw, scale, p, seed, g, dtype)
    o64, gq64, gk64, gv64 = _attn_reference(q, k, v, kw, scale, p, seed, g, torch.float64)
    valid = _valid_rows(q, kw)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == dtype
    assert_no_worse(f"attention[{mode}] out", out, o_t, o64, valid=valid)
    if valid is not None:
        assert bool((out[~valid] == 0).all()), "rows with no visible key must be exactly 0"
    lse64 = _lse64(q, k, kw["mask"], kw["bias"], kw["causal"], scale, kw["cu"])
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    fin = torch.isfinite(lse64)
    assert bool(torch.isinf(lse[~fin]).all() and (lse[~fin] > 0).all()), "lse of a row with no key is +inf"
    assert torch.allclose(lse[fin].double(), lse64[fin], rtol=1e-4, atol=1e-3 if dtype != torch.float32 else 1e-5)

    gq, gk, gv = F.attention_bwd(g, q, k, v, out, lse, kw["mask"], kw["bias"], kw["cu"], kw["max_seqlen"],
                                 kw["causal"], scale, p, seed)
    assert_no_worse(f"attention[{mode}] grad_q", gq, gq_t, gq64, valid=valid)
    assert_no_worse(f"attention[{mode}] grad_k", gk, gk_t, gk64)
    assert_no_worse(f"attention[{mode}] grad_v", gv, gv_t, gv64)
    return out, lse, gq, gk, gv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 128, 16, 80])
@pytest.mark.parametrize("mode", ["none", "padding", "causal", "bias", "varlen"])
def test_attention(dtype, D, mode):
    _check_attention(mode, B=3, H=2, S=129, D=D, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S,Sk", [(1, 1), (7, 7), (7, 130), (200, 3)])
def test_attention_awkward_lengths(dtype, S, Sk):
    _check_attention("padding", B=3, H=3, S=S, D=64, dtype=dtype, Sk=Sk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["padding", "varlen", "causal"])
def test_attention_dropout(dtype, mode):
    _check_attention(mode, B=3, H=2, S=70, D=64, dtype=dtype, p=0.2)


def test_attention_scalar_loads():
    """Head dim 20 (not a multiple of 8) and a view whose rows are not 16-byte aligned: the scalar loader."""
    _check_attention("padding", B=2, H=2, S=33, D=20, dtype=torch.float16)
    base = _rand((2, 33, 2, 64 + 1), torch.float16)
    q = base[..., 1:]  # storage offset 1: misaligned for 128-bit loads
    k, v = q.clone(), _rand((2, 33, 2, 64), torch.float16)
    out, lse = F.attention_fwd(q, k, v, None, None, None, 33, False, 0.125, 0.0, None)
    ref = reference.attention(q.double(), k.double(), v.double(), scale=0.125)
    ref_t = reference.attention(q, k, v, scale=0.125)
    assert_no_worse("attention misaligned out", out, ref_t, ref)


def test_attention_rejects_head_dim_over_128():
    q = _rand((1, 4, 1, 160), torch.float16)
    with pytest.raises(RuntimeError, match="head dim"):
        F.attention_fwd(q, q, q, None, None, None, 4, False, 0.1, 0.0, None)


# ----------------------------------------------------------------------------------------------
# cuda vs triton vs reference on random shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(6))
def test_cross_check_random_shapes(trial):
    import fastbert
    from fastbert.ops.attention import attention
    from fastbert.ops.layer_norm import add_layer_norm

    gen = torch.Generator().manual_seed(1234 + trial)
    pick = (lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))])
    dtype = pick(DTYPES)
    B, H, S, D = pick([1, 2, 3]), pick([1, 4, 12]), pick([1, 7, 64, 129, 300]), pick([32, 64, 128])
    q, k, v = (_rand((B, S, H, D), dtype).requires_grad_() for _ in range(3))
    mask = torch.rand(B, S, device=DEVICE, generator=None) > 0.3
    g = _rand((B, S, H, D), dtype)
    results = {}
    for backend in ("cuda", "triton", "torch"):
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with fastbert.use_backend(backend):
            out = attention(qs, ks, vs, attention_mask=mask)
        out.backward(g)
        results[backend] = (out.detach(), qs.grad, ks.grad, vs.grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = reference.attention(q64, k64, v64, attention_mask=mask)
    out64.backward(g.double())
    ref64 = (out64.detach(), q64.grad, k64.grad, v64.grad)
    valid = mask.any(-1)[:, None, None, None].expand(B, S, H, D)
    for name, i in (("out", 0), ("grad_q", 1), ("grad_k", 2), ("grad_v", 3)):
        vi = valid if i in (0, 1) else None
        assert_no_worse(f"cross-check {name} cuda", results["cuda"][i], results["torch"][i], ref64[i], valid=vi)
        assert_no_worse(f"cross-check {name} triton", results["triton"][i], results["torch"][i], ref64[i], valid=vi)

    n = pick([312, 384, 768, 1024, 4096])
    x, r = _rand((B * S, n), dtype), _rand((B * S, n), dtype)
    w, b = 1 + 0.1 * _rand((n,), dtype), 0.1 * _rand((n,), dtype)
    outs = {}
    for backend in ("cuda", "triton"):
        with fastbert.use_backend(backend):
            outs[backend] = add_layer_norm(x, w, b, residual=r, eps=1e-12)
    o_t = reference.add_layer_norm(x, w, b, residual=r, eps=1e-12)
    o64 = reference.add_layer_norm(x.double(), w.double(), b.double(), residual=r.double(), eps=1e-12)
    for backend, o in outs.items():
        assert_no_worse(f"cross-check add_layer_norm {backend}", o, o_t, o64)


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------
def test_backward_is_deterministic():
    q, k, v, kw = _attn_case("padding", 2, 4, 150, 64, torch.float16)
    out, lse = F.attention_fwd(q, k, v, kw["mask"], None, None, 150, False, 0.125, 0.0, None)
    g = _rand(out.shape, torch.float16)
    a = F.attention_bwd(g, q, k, v, out, lse, kw["mask"], None, None, 150, False, 0.125, 0.0, None)
    b = F.attention_bwd(g, q, k, v, out, lse, kw["mask"], None, None, 150, False, 0.125, 0.0, None)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    x, w = _rand((4097, 768), torch.bfloat16), torch.ones(768, device=DEVICE)
    o, mean, rstd = F.add_layer_norm_fwd(x, w, w, None, None, 1e-12, 0.0, None)
    g = _rand(x.shape, torch.bfloat16)
    r1 = F.add_layer_norm_bwd(g, x, w, w, None, None, mean, rstd, 0.0, None)
    r2 = F.add_layer_norm_bwd(g, x, w, w, None, None, mean, rstd, 0.0, None)
    for x1, x2 in zip(r1, r2):
        assert torch.equal(x1, x2)


# ----------------------------------------------------------------------------------------------
# bad inputs: the bindings' checks name the argument
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    h = _rand((4, 64), torch.float16)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        F.bias_gelu_fwd(h.double(), None, "none")
    with pytest.raises(RuntimeError, match="bias must have shape"):
        F.bias_gelu_fwd(h, torch.ones(63, device=DEVICE, dtype=torch.float16), "none")
    with pytest.raises(RuntimeError, match="approximate"):
        F.bias_gelu_fwd(h, None, "sigmoid")
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        F.bias_gelu_fwd(h.t(), None, "none")
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        F.bias_gelu_bwd(h[:2], h, None, "none")
    with pytest.raises(RuntimeError, match="weight must have shape"):
        F.linear_gelu_fwd(h, _rand((8, 32), torch.float16), None, "none", False)
    with pytest.raises(RuntimeError, match="weight must"):
        F.add_layer_norm_fwd(h, torch.ones(32, device=DEVICE), None, None, None, 1e-5, 0.0, None)
    with pytest.raises(RuntimeError, match="residual must have x's dtype"):
        F.add_layer_norm_fwd(h, w, None, h.float(), None, 1e-5, 0.0, None)
    with pytest.raises(RuntimeError, match="hidden size"):
        F.add_layer_norm_fwd(_rand((2, 8200), torch.float16), torch.ones(8200, device=DEVICE), None, None, None,
                             1e-5, 0.0, None)
    with pytest.raises(RuntimeError, match="seed must be given"):
        F.add_layer_norm_fwd(h, w, None, None, None, 1e-5, 0.1, None)
    with pytest.raises(RuntimeError, match="dropout_p"):
        F.add_layer_norm_fwd(h, w, None, None, None, 1e-5, 1.0, _seed())

    q = _rand((2, 8, 2, 64), torch.float16)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        F.attention_fwd(q, q.float(), q, None, None, None, 8, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="q must have unit stride"):
        F.attention_fwd(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, None, None, None, 8, False, 0.1,
                        0.0, None)
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        F.attention_fwd(q, q, q, torch.ones(2, 8, device=DEVICE), None, None, 8, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="key_padding_mask must be"):
        F.attention_fwd(q, q, q, torch.ones(2, 7, device=DEVICE, dtype=torch.bool), None, None, 8, False, 0.1, 0.0,
                        None)
    with pytest.raises(RuntimeError, match="attn_bias of shape"):
        F.attention_fwd(q, q, q, None, torch.zeros(2, 3, 8, 8, device=DEVICE), None, 8, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="cu_seqlens must be an int32"):
        F.attention_fwd(q[0], q[0], q[0], None, None, torch.tensor([0, 8], device=DEVICE), 8, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="attn_bias must be None with cu_seqlens"):
        F.attention_fwd(q[0], q[0], q[0], None, torch.zeros(8, 8, device=DEVICE),
                        torch.tensor([0, 8], device=DEVICE, dtype=torch.int32), 8, False, 0.1, 0.0, None)
    with pytest.raises(RuntimeError, match="lse must be"):
        out, lse = F.attention_fwd(q, q, q, None, None, None, 8, False, 0.1, 0.0, None)
        F.attention_bwd(out, q, q, q, out, lse[:, :, :4], None, None, None, 8, False, 0.1, 0.0, None)


def test_bad_device_mix_names_the_argument():
    q = _rand((2, 8, 2, 64), torch.float16)
    with pytest.raises(RuntimeError, match="k must be a CUDA tensor"):
        F.attention_fwd(q, q.cpu(), q, None, None, None, 8, False, 0.1, 0.0, None)
    x = _rand((4, 64), torch.float16)
    with pytest.raises(RuntimeError, match="weight must be a CUDA tensor"):
        F.add_layer_norm_fwd(x, torch.ones(64), None, None, None, 1e-5, 0.0, None)


# ----------------------------------------------------------------------------------------------
# the Philox stream of csrc/cuda/common.cuh, compiled for the host by nvcc, vs fastbert.reference
# ----------------------------------------------------------------------------------------------
_PHILOX_HOST = textwrap.dedent("""
    #include <cstdio>
    #include "cuda/common.cuh"
    int main() {
      const unsigned long long seeds[3] = {0ull, 123456789012345ull, 0xFEDCBA9876543210ull};
      const unsigned long long offs[6] = {0ull, 1ull, 7ull, 4294967295ull, 4294967296ull, 123456789012ull};
      for (auto s : seeds)
        for (auto o : offs) printf("%llu %llu %u\\n", s, o, fastbert::cuda::philox_uint32(s, o));
      return 0;
    }
""")


def test_philox_matches_reference(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src, exe = tmp_path / "philox.cu", tmp_path / "philox"
    src.write_text(_PHILOX_HOST)
    r = subprocess.run([nvcc, "-std=c++17", "-I", os.path.join(root, "csrc"), "-o", str(exe), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    rows = [tuple(int(x) for x in ln.split()) for ln in lines if ln.strip()]
    assert len(rows) == 18
    for seed, off, got in rows:
        signed = seed - 2**64 if seed >= 2**63 else seed
        want = int(reference.philox_uint32(signed, torch.tensor([off]))[0])
        assert got == want, f"philox(seed={seed}, offset={off}): csrc {got} != reference {want}"


# ----------------------------------------------------------------------------------------------
# compute-sanitizer: memcheck and racecheck over every kernel
# ----------------------------------------------------------------------------------------------
_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    import fastbert  # noqa: F401  (loads fastbert._C: registers the CUDA kernels)
    from fastbert import reference
    F = torch.ops.fastbert
    dev = "cuda"
    torch.manual_seed(0)
    seed = reference.make_seed(dev)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for n in (768, 1001, 8192):
            x = torch.randn(5, n, device=dev, dtype=dt)
            w = torch.randn(n, device=dev)
            out, mean, rstd = F.add_layer_norm_fwd(x, w, w, x, w, 1e-5, 0.1, seed)
            F.add_layer_norm_bwd(x, x, w, w, x, w, mean, rstd, 0.1, seed)
            F.bias_gelu_bwd(x, x, w, "tanh")
            F.bias_gelu_fwd(x, w, "none")
        F.linear_gelu_bwd(x[:, :64], x[:, :96], torch.randn(64, 96, device=dev, dtype=dt), None,
                          torch.empty(0, device=dev, dtype=dt), "none")
        for D in (20, 32, 64, 128):
            q, k, v = (torch.randn(2, 70, 3, D, device=dev, dtype=dt) for _ in range(3))
            mask = torch.ones(2, 70, device=dev, dtype=torch.bool)
            mask[1, 33:] = False
            bias = torch.randn(1, 3, 70, 70, device=dev).expand(2, 3, 70, 70)
            for causal in (False, True):
                out, lse = F.attention_fwd(q, k, v, mask, bias, None, 70, causal, 0.1, 0.1, seed)
                F.attention_bwd(out, q, k, v, out, lse, mask, bias, None, 70, causal, 0.1, 0.1, seed)
            cu = torch.tensor([0, 70, 100, 140], device=dev, dtype=torch.int32)
            qp, kp, vp = (t.reshape(140, 3, D) for t in (q, k, v))
            out, lse = F.attention_fwd(qp, kp, vp, None, None, cu, 70, False, 0.1, 0.0, None)
            F.attention_bwd(out, qp, kp, vp, out, lse, None, None, cu, 70, False, 0.1, 0.0, None)
    torch.cuda.synchronize()
    print("SANITIZER-SCRIPT-DONE")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        cand = os.path.join(cuda_home, "bin", "compute-sanitizer")
        exe = cand if os.path.exists(cand) else None
    if exe is None:
        pytest.skip("compute-sanitizer not found (CUDA toolkit bin/ not on PATH)")
    script = tmp_path / "exercise_kernels.py"
    script.write_text(_SANITIZER_SCRIPT)
    env = dict(os.environ, FASTBERT_POISON_OUTPUTS="0", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", sys.executable, str(script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compute-sanitizer --tool {tool} did not finish in 900 s")
    log = (r.stdout + r.stderr)[-6000:]
    assert "SANITIZER-SCRIPT-DONE" in r.stdout, f"script did not complete:\n{log}"
    assert r.returncode == 0, f"compute-sanitizer --tool {tool} reported errors:\n{log}"
