"""The C++/CUDA backend (csrc/cuda, csrc/cuda_bindings) called directly through torch.ops.fastbert.*.

The tests marked `gpu` need an NVIDIA GPU and a CUDA build of fastbert._C (skipped elsewhere with the
reason). What they check, beyond the shared per-op tests that run with backend="cuda":
  - each kernel against the float64 reference with the equivalence rule (fastbert.testing), forward
    and backward, on awkward shapes: odd hidden sizes (the scalar path), misaligned views, seq 1/7/129,
    head dims off the 32/64/128 grid (zero-padded in shared memory), fully padded sequences;
  - the saved statistics (LayerNorm mean/rstd, attention lse) against float64;
  - dropout masks identical to the reference's Philox stream (same seed -> same kept set);
  - cuda vs triton vs reference on random shapes;
  - bad inputs rejected by the bindings' TORCH_CHECKs, naming the argument;
  - determinism of the backward passes (no atomics: bit-identical reruns);
  - compute-sanitizer memcheck and racecheck over every kernel (skipped without compute-sanitizer).
One test needs no GPU: test_kernels_under_host_emulation (opt-in, FASTBERT_CUDA_EMULATION=1) compiles the
kernels' own source with g++ against csrc/cuda/host_emulation.cuh and checks them on CPU tensors.
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
from fastbert.testing import ATOL, assert_no_worse, flash_grad_atol

DEVICE = "cuda"
gpu = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = ("attention_fwd", "attention_bwd", "add_layer_norm_fwd", "add_layer_norm_bwd", "bias_gelu_fwd",
       "bias_gelu_bwd", "linear_gelu_fwd", "linear_gelu_bwd")


@pytest.fixture
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
@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n,p,weight", [(1, 768, 0.0, True), (7, 200, 0.0, False), (7, 384, 0.2, True),
                                             (7, 64, 0.3, False)])
def test_add_layer_norm_pre_and_grad_pre_out(dtype, rows, n, p, weight):
    """return_residual on the cuda kernels: fwd_pre's pre-norm sum, grad_pre_out joining grad_pre, weight None."""
    x, r, g, gin = (_rand((rows, n), dtype) for _ in range(4))
    w = 1 + 0.1 * _rand((n,), torch.float32) if weight else None
    b, xb = 0.1 * _rand((n,), torch.float32), _rand((n,), dtype)
    seed = _seed() if p else None
    out, mean, rstd, pre = F.add_layer_norm_fwd_pre(x, w, b, r, xb, 1e-5, p, seed)
    assert torch.equal(out, F.add_layer_norm_fwd(x, w, b, r, xb, 1e-5, p, seed)[0])
    g_pre, g_x, g_w, g_b, g_xb = F.add_layer_norm_bwd(g, x, w, b, r, xb, mean, rstd, p, seed, gin)
    assert g_w.shape == ((n,) if weight else (0,))

    def ref(d):
        cast = (lambda t: None if t is None else t.detach().to(d).requires_grad_())
        ts = [cast(t) for t in (x, w, b, r, xb)]
        o, h = reference.add_layer_norm(ts[0], ts[1], ts[2], residual=ts[3], x_bias=ts[4], eps=1e-5, dropout_p=p,
                                        seed=seed, return_residual=True)
        torch.autograd.backward([o, h], [g.to(d), gin.to(d)])
        return o.detach(), h.detach(), [None if t is None else t.grad for t in ts]

    (o_t, h_t, gt), (o64, h64, g64) = ref(dtype), ref(torch.float64)
    assert_no_worse("pre out", out, o_t, o64)
    assert_no_worse("pre pre", pre, h_t, h64)
    assert_no_worse("pre grad_x", g_x if p else g_pre, gt[0], g64[0])
    assert_no_worse("pre grad_residual", g_pre, gt[3], g64[3])
    if weight:
        assert_no_worse("pre grad_weight", g_w, gt[1], g64[1], atol=ATOL[torch.float32] * rows)
    assert_no_worse("pre grad_bias", g_b, gt[2], g64[2], atol=ATOL[torch.float32] * rows)
    assert_no_worse("pre grad_x_bias", g_xb, gt[4], g64[4], atol=ATOL[dtype] * rows, dtype=dtype)


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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
    atol_dq, atol_dk = flash_grad_atol(q, k, v, g, scale, dtype)
    assert_no_worse(f"attention[{mode}] grad_q", gq, gq_t, gq64, valid=valid, atol=atol_dq)
    assert_no_worse(f"attention[{mode}] grad_k", gk, gk_t, gk64, atol=atol_dk)
    assert_no_worse(f"attention[{mode}] grad_v", gv, gv_t, gv64)
    return out, lse, gq, gk, gv


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 128, 16, 80])
@pytest.mark.parametrize("mode", ["none", "padding", "causal", "bias", "varlen"])
def test_attention(dtype, D, mode):
    _check_attention(mode, B=3, H=2, S=129, D=D, dtype=dtype)


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S,Sk", [(1, 1), (7, 7), (7, 130), (200, 3)])
def test_attention_awkward_lengths(dtype, S, Sk):
    _check_attention("padding", B=3, H=3, S=S, D=64, dtype=dtype, Sk=Sk)


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["padding", "varlen", "causal"])
def test_attention_dropout(dtype, mode):
    _check_attention(mode, B=3, H=2, S=70, D=64, dtype=dtype, p=0.2)


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
def test_attention_rejects_head_dim_over_128():
    q = _rand((1, 4, 1, 160), torch.float16)
    with pytest.raises(RuntimeError, match="head dim"):
        F.attention_fwd(q, q, q, None, None, None, 4, False, 0.1, 0.0, None)


# ----------------------------------------------------------------------------------------------
# cuda vs triton vs reference on random shapes
# ----------------------------------------------------------------------------------------------
@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
@pytest.mark.parametrize("trial", range(6))
def test_cross_check_random_shapes(trial):
    import fastbert
    from fastbert.ops.attention import attention
    from fastbert.ops.add_layer_norm import add_layer_norm

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
@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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
@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


@gpu
@pytest.mark.usefixtures("_need_cuda_kernels")
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


# ----------------------------------------------------------------------------------------------
# the CUDA kernels' source executed on the host (csrc/cuda/host_emulation.cuh): no GPU needed
# ----------------------------------------------------------------------------------------------
# Opt-in (FASTBERT_CUDA_EMULATION=1): building takes ~1 min and the emulation (one OS thread per CUDA
# thread) a few more, too slow for the CI budget; it is how the kernels were first checked, before any
# GPU ran them. It checks logic (indexing, masks, barriers, reductions, dropout, WMMA tiling), not speed.
_EMU_WRAP = textwrap.dedent("""
    #include "cuda/launchers.h"
    using namespace fastbert::cuda;
    extern "C" {
    int w_bias_gelu(int bwd, int dt, const void* g, const void* x, const float* b, void* y, long rows, long n, int t) {
      return bwd ? bias_gelu_bwd((DType)dt, g, x, b, y, rows, n, t, nullptr)
                 : bias_gelu_fwd((DType)dt, x, b, y, rows, n, t, nullptr);
    }
    int w_ln_fwd(int dt, const void* x, const void* res, const float* xb, const float* w, const float* b, void* out,
                 void* pre, float* mean, float* rstd, long rows, long n, float eps, double p, const int64_t* seed) {
      return add_layer_norm_fwd((DType)dt, x, res, xb, w, b, out, pre, mean, rstd, rows, n, eps, p, seed, nullptr);
    }
    long w_ln_ws(long rows, long n, int sms) { return add_layer_norm_bwd_workspace_bytes(rows, n, sms); }
    int w_ln_bwd(int dt, const void* g, const void* gin, const void* x, const void* res, const float* xb,
                 const float* w, const float* mean, const float* rstd, void* gpre, void* gx, float* gw, float* gb,
                 float* gxb, long rows, long n, double p, const int64_t* seed, float* ws, int sms) {
      return add_layer_norm_bwd((DType)dt, g, gin, x, res, xb, w, mean, rstd, gpre, gx, gw, gb, gxb, rows, n, p,
                                seed, ws, sms, nullptr);
    }
    // I: dtype, B, H, D, Sq, Sk, causal, window (-1: none). S: strides q(3) k(3) v(3) out(3) kpm(2) bias(4) lse(2)
    static AttentionParams mk(const int* I, const long* S, const int* cu, const bool* kpm, const void* bias,
                              float scale, double p, const int64_t* seed) {
      AttentionParams a{};
      a.dtype = (DType)I[0]; a.batch = I[1]; a.heads = I[2]; a.head_dim = I[3]; a.seqlen_q = I[4]; a.seqlen_k = I[5];
      a.causal = I[6]; a.bias_dtype = DType::kFloat32; a.cu_seqlens = cu; a.kpm = kpm;
      a.kpm_stride_b = S[12]; a.kpm_stride_j = S[13]; a.bias = bias; a.bias_stride_b = S[14];
      a.bias_stride_h = S[15]; a.bias_stride_i = S[16]; a.bias_stride_j = S[17]; a.scale = scale;
      a.dropout_p = p; a.seed = seed; a.lse_stride_b = S[18]; a.lse_stride_h = S[19];
      a.q_shift = cu ? 0 : I[5] - I[4]; a.windowed = I[7] >= 0; a.window = a.windowed ? I[7] : 0;
      a.window2 = 2u * a.window;
      return a;
    }
    int w_attn(int bwd, const int* I, const long* S, const int* cu, const bool* kpm, const void* bias, float scale,
               double p, const int64_t* seed, const void* g, const void* q, const void* k, const void* v, void* o,
               float* lse, float* delta, void* gq, void* gk, void* gv) {
      AttentionParams a = mk(I, S, cu, kpm, bias, scale, p, seed);
      AttnTensor tq{q, S[0], S[1], S[2]}, tk{k, S[3], S[4], S[5]}, tv{v, S[6], S[7], S[8]}, to{o, S[9], S[10], S[11]};
      if (!bwd) return attention_fwd(a, tq, tk, tv, {o, S[9], S[10], S[11]}, lse, nullptr);
      // grad_q has out's (contiguous q) layout; grad_k/grad_v are contiguous in k's shape: S[20..22]
      return attention_bwd(a, {g, S[9], S[10], S[11]}, tq, tk, tv, to, lse, delta, {gq, S[9], S[10], S[11]},
                           {gk, S[20], S[21], S[22]}, {gv, S[20], S[21], S[22]}, nullptr);
    }
    }
""")


def _cuda_include_dir():
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_fp16.h")):
            return os.path.join(c, "include")
    return None


def _build_emulation(tmp_path):
    import ctypes
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src_dir = os.path.join(root, "csrc", "cuda")
    inc = tmp_path / "inc" / "cuda"
    inc.mkdir(parents=True)
    for name in ("launchers.h", "host_emulation.cuh"):
        shutil.copy(os.path.join(src_dir, name), inc / name)
    common = open(os.path.join(src_dir, "common.cuh")).read()
    (inc / "common.cuh").write_text(common.replace("#include <cuda_runtime.h>", '#include "cuda/host_emulation.cuh"'))
    # a launch may be split by clang-format between the kernel's name and <<<
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^;<>]*(?:<[^;<>]*>[^;<>]*)*>)?)\s*<<<(.*?)>>>\(", re.S)
    units = []
    for name in ("bias_gelu", "add_layer_norm", "attention"):
        s = open(os.path.join(src_dir, name + ".cu")).read()
        s = s.replace("#include <mma.h>", "")
        s = s.replace("extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = emu_dyn_smem();")
        s = s.replace("extern __shared__ float acc[];", "float* acc = reinterpret_cast<float*>(emu_dyn_smem());")
        s, n = launch.subn(lambda m: f"emu_launch({m.group(1)}, {m.group(2)})(", s)
        assert n > 0, f"no kernel launch found in {name}.cu"
        (tmp_path / f"{name}.cpp").write_text('#include "cuda/host_emulation.cuh"\n' + s)
        units.append(tmp_path / f"{name}.cpp")
    (tmp_path / "wrap.cpp").write_text(_EMU_WRAP)
    units.append(tmp_path / "wrap.cpp")
    gxx = shutil.which("g++")
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-w", f"-I{tmp_path / 'inc'}", f"-I{_cuda_include_dir()}"]
    procs = [subprocess.Popen([gxx, *flags, "-c", str(u), "-o", str(u) + ".o"], stderr=subprocess.PIPE, text=True)
             for u in units]
    for u, pr in zip(units, procs):
        _, err = pr.communicate(timeout=900)
        assert pr.returncode == 0, f"g++ failed on {u.name}:\n{err[-3000:]}"
    lib = tmp_path / "libfastbert_emu.so"
    subprocess.run([gxx, "-shared", "-pthread", "-o", str(lib), *[str(u) + ".o" for u in units]], check=True)
    L = ctypes.CDLL(str(lib))
    c_int, c_long, c_float, c_double, V = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_double, ctypes.c_void_p
    L.w_bias_gelu.argtypes = [c_int, c_int, V, V, V, V, c_long, c_long, c_int]
    L.w_ln_fwd.argtypes = [c_int] + [V] * 9 + [c_long, c_long, c_float, c_double, V]
    L.w_ln_ws.argtypes = [c_long, c_long, c_int]
    L.w_ln_ws.restype = c_long
    L.w_ln_bwd.argtypes = [c_int] + [V] * 13 + [c_long, c_long, c_double, V, V, c_int]
    L.w_attn.argtypes = [c_int, V, V, V, V, V, c_float, c_double, V] + [V] * 10
    return L


def _emu_bias_gelu(L, dt, rows, n, offset, approximate):
    P = (lambda t: t.data_ptr() if t is not None else None)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dt]
    x = torch.randn(rows * n + offset, dtype=torch.float64).to(dt)[offset:].view(rows, n)
    b = torch.randn(n, dtype=torch.float64).float()
    g = torch.randn(rows, n, dtype=torch.float64).to(dt)
    out, gi = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    tanh = approximate == "tanh"
    assert L.w_bias_gelu(0, code, None, P(x), P(b), P(out), rows, n, tanh) == 0
    assert L.w_bias_gelu(1, code, P(g), P(x), P(b), P(gi), rows, n, tanh) == 0
    assert_no_worse("emu bias_gelu", out, reference.bias_gelu(x, b.to(dt), approximate=approximate),
                    reference.bias_gelu(x.double(), b.double(), approximate=approximate))
    x64, xt = x.double().requires_grad_(), x.clone().requires_grad_()
    reference.bias_gelu(x64, b.double(), approximate=approximate).backward(g.double())
    reference.bias_gelu(xt, b.to(dt), approximate=approximate).backward(g)
    assert_no_worse("emu bias_gelu grad", gi, xt.grad, x64.grad)


def _emu_layer_norm(L, dt, rows, n, extras, p, with_pre=False):
    """with_pre: the forward also writes the pre-norm sum, the backward takes its gradient (return_residual)."""
    P = (lambda t: t.data_ptr() if t is not None else None)
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dt]
    r64 = (lambda shape: torch.randn(shape, dtype=torch.float64))
    x, g = r64((rows, n)).to(dt), r64((rows, n)).to(dt)
    gin = r64((rows, n)).to(dt) if with_pre else None
    w = (1 + 0.1 * r64(n)).float()
    b, r, xb = ((0.1 * r64(n)).float(), r64((rows, n)).to(dt), r64(n).float()) if extras else (None, None, None)
    seed = torch.tensor([123456789], dtype=torch.int64) if p > 0 else None
    out = torch.full_like(x, float("nan"))
    pre = torch.full_like(x, float("nan")) if with_pre else None
    mean, rstd = torch.full((rows,), float("nan")), torch.full((rows,), float("nan"))
    assert L.w_ln_fwd(code, P(x), P(r), P(xb), P(w), P(b), P(out), P(pre), P(mean), P(rstd), rows, n, 1e-5, p,
                      P(seed)) == 0
    sms = 2
    ws = torch.full((L.w_ln_ws(rows, n, sms) // 4 + 1,), float("nan"))
    gpre = torch.full_like(x, float("nan"))
    gx = torch.full_like(x, float("nan")) if p > 0 else None
    gw = torch.full((n,), float("nan"))
    gb, gxb = (torch.full((n,), float("nan")), torch.full((n,), float("nan"))) if extras else (None, None)
    assert L.w_ln_bwd(code, P(g), P(gin), P(x), P(r), P(xb), P(w), P(mean), P(rstd), P(gpre), P(gx), P(gw), P(gb),
                      P(gxb), rows, n, p, P(seed), P(ws), sms) == 0

    def ref(d):
        cast = (lambda t: None if t is None else t.detach().to(d).requires_grad_())
        xs, ws_, bs, rs, xbs = cast(x), cast(w), cast(b), cast(r), cast(xb)
        o, h = reference.add_layer_norm(xs, ws_, bs, residual=rs, x_bias=xbs, eps=1e-5, dropout_p=p, seed=seed,
                                        return_residual=True)
        torch.autograd.backward([o, h] if with_pre else [o], [g.to(d), gin.to(d)] if with_pre else [g.to(d)])
        return [o.detach(), xs.grad, ws_.grad] + ([bs.grad, rs.grad, xbs.grad] if extras else []) + [h.detach()]

    t, r64_ = ref(dt), ref(torch.float64)
    tag = f"emu add_layer_norm {dt} {rows}x{n} extras={extras} p={p} pre={with_pre}"
    assert_no_worse(tag + " out", out, t[0], r64_[0])
    if with_pre:
        assert_no_worse(tag + " pre", pre, t[-1], r64_[-1])
    assert_no_worse(tag + " grad_x", gx if p > 0 else gpre, t[1], r64_[1])
    assert_no_worse(tag + " grad_weight", gw, t[2], r64_[2], atol=1e-5 * rows)
    if extras:
        assert_no_worse(tag + " grad_bias", gb, t[3], r64_[3], atol=1e-5 * rows)
        assert_no_worse(tag + " grad_residual", gpre, t[4], r64_[4])
        assert_no_worse(tag + " grad_x_bias", gxb, t[5], r64_[5], atol=ATOL[dt] * rows, dtype=dt)


def _emu_attention(L, mode, B, H, S, D, dt, p=0.0, Sk=None, window=-1):
    import ctypes
    import itertools
    P = (lambda t: t.data_ptr() if t is not None else None)
    rnd = (lambda shape: torch.randn(shape, dtype=torch.float64).to(dt))
    Sk = S if Sk is None else Sk
    cu = mask = bias = None
    causal = mode in ("causal", "causal_padding")
    if mode == "varlen":
        lens = [S, max(1, S // 2), 0, 1][:B]
        cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
        q, k, v = (rnd((sum(lens), H, D)) for _ in range(3))
        maxs, nb, sq, sk = max(lens), len(lens), max(lens), max(lens)
        st = (lambda t: (0, t.stride(0), t.stride(1)))
        lse = torch.full((H, q.shape[0]), float("nan"))
        lse_st = (0, q.shape[0])
    else:
        q, k, v = rnd((B, S, 3, H, D)).unbind(2)  # strided views of one fused projection
        if Sk != S:
            k, v = rnd((B, Sk, H, D)), rnd((B, Sk, H, D))
        maxs, nb, sq, sk = max(S, Sk), B, S, Sk
        st = (lambda t: (t.stride(0), t.stride(1), t.stride(2)))
        lse = torch.full((B, H, S), float("nan"))
        lse_st = (H * S, S)
        if mode in ("padding", "bias", "causal_padding"):
            mask = torch.ones(B, Sk, dtype=torch.bool)
            if B > 1:
                mask[1, (Sk + 1) // 2:] = False
            if B > 2:
                mask[2] = False
        if mode == "bias":
            bias = torch.randn(1, H, S, Sk, dtype=torch.float64).float().expand(B, H, S, Sk)
    scale = 1 / math.sqrt(D)
    seed = torch.tensor([987654321012], dtype=torch.int64) if p > 0 else None
    out = torch.full(q.shape, float("nan"), dtype=dt)
    gq, gk, gv = (torch.full(t.shape, float("nan"), dtype=dt) for t in (q, k, v))
    code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dt]
    ints = (ctypes.c_int * 8)(code, nb, H, D, sq, sk, int(causal), window)
    kpm_st = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    bias_st = tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)
    strides = (ctypes.c_long * 23)(*(st(q) + st(k) + st(v) + st(out) + kpm_st + bias_st + lse_st + st(gk)))
    common = (ints, strides, P(cu), P(mask), P(bias), scale, p, P(seed))
    assert L.w_attn(0, *common, None, P(q), P(k), P(v), P(out), P(lse), None, None, None, None) == 0
    g = rnd(out.shape)
    delta = torch.zeros_like(lse)
    assert L.w_attn(1, *common, P(g), P(q), P(k), P(v), P(out), P(lse), P(delta), P(gq), P(gk), P(gv)) == 0

    def ref(d):
        qs, ks, vs = (t.detach().to(d).requires_grad_() for t in (q, k, v))
        o = reference.attention(qs, ks, vs, attention_mask=mask, attn_bias=bias, cu_seqlens=cu,
                                max_seqlen=maxs if cu is not None else None, causal=causal, scale=scale, dropout_p=p,
                                seed=seed, window=None if window < 0 else window)
        o.backward(g.to(d))
        return o.detach(), qs.grad, ks.grad, vs.grad

    t, r = ref(dt), ref(torch.float64)
    valid = mask.any(-1)[:, None, None, None].expand_as(q) if mask is not None else None
    if valid is not None and window >= 0:  # rows whose window holds only padding see no key either
        shift = sk - sq
        rows = torch.arange(sq)[:, None] + shift
        band = (torch.arange(sk)[None, :] - rows).abs() <= window
        if causal:
            band &= torch.arange(sk)[None, :] <= rows
        valid = (mask[:, None, :] & band[None]).any(-1)[:, :, None, None].expand_as(q)
    tag = f"emu attention[{mode}] B{B} H{H} S{S} Sk{Sk} D{D} {dt} p={p} window={window}"
    assert_no_worse(tag + " out", out, t[0], r[0], valid=valid)
    if valid is not None:
        assert bool((out[~valid] == 0).all()), tag + ": rows with no key must be 0"
    assert not bool(torch.isnan(lse).any()), tag + ": lse not fully written"
    assert_no_worse(tag + " grad_q", gq, t[1], r[1], valid=valid)
    assert_no_worse(tag + " grad_k", gk, t[2], r[2])
    assert_no_worse(tag + " grad_v", gv, t[3], r[3])


@pytest.mark.skipif(os.environ.get("FASTBERT_CUDA_EMULATION") != "1",
                    reason="opt-in (FASTBERT_CUDA_EMULATION=1): runs the CUDA kernels' source under a slow host "
                           "emulation")
def test_kernels_under_host_emulation(tmp_path):
    L = _emulation(tmp_path)
    for dt in DTYPES:
        for rows, n, off, approx in ((3, 24, 0, "none"), (2, 13, 0, "tanh"), (2, 16, 1, "none")):
            _emu_bias_gelu(L, dt, rows, n, off, approx)
        for rows, n, extras, p in ((5, 24, False, 0.0), (3, 13, True, 0.0), (9, 200, True, 0.0), (2, 1100, False, 0.0),
                                   (2, 8192, True, 0.0), (6, 40, True, 0.3), (3, 13, True, 0.3)):
            _emu_layer_norm(L, dt, rows, n, extras, p)
        for rows, n, extras, p in ((3, 13, True, 0.0), (9, 200, False, 0.0), (6, 40, True, 0.3), (2, 1024, True, 0.0)):
            _emu_layer_norm(L, dt, rows, n, extras, p, with_pre=True)
        for mode in ("none", "padding", "causal", "bias", "varlen"):
            _emu_attention(L, mode, 3, 2, 40, 32, dt)
        _emu_attention(L, "padding", 3, 1, 7, 20, dt, Sk=40)   # scalar loader (D % 8 != 0), Sq != Sk
        _emu_attention(L, "padding", 2, 1, 70, 128, dt)        # DP = 128 tiles, two query tiles
        _emu_attention(L, "padding", 3, 2, 24, 64, dt, p=0.2)  # dropout
        _emu_attention(L, "varlen", 3, 1, 24, 32, dt, p=0.2)
        _attention_window_cases(L, dt)


def _emulation(tmp_path):
    """The emulated kernels' library (skips where g++ or the CUDA headers are missing), RNG seeded."""
    if shutil.which("g++") is None or _cuda_include_dir() is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h)")
    L = _build_emulation(tmp_path)
    torch.manual_seed(0)
    return L


def _attention_window_cases(L, dt):
    """Sliding window and causal with a key prefix (Sq < Sk), with key/query tiles skipped outside the band."""
    _emu_attention(L, "padding", 2, 1, 150, 32, dt, window=8)      # several query and key tiles, band inside
    _emu_attention(L, "varlen", 3, 1, 90, 64, dt, window=20, p=0.2)
    _emu_attention(L, "causal", 2, 1, 100, 32, dt, window=1)  # (window 0: P = 1, dQ = 0 up to delta rounding)
    _emu_attention(L, "causal_padding", 3, 1, 5, 32, dt, Sk=70)      # decoding with a cache
    _emu_attention(L, "causal_padding", 3, 1, 1, 32, dt, Sk=70, window=9)
    _emu_attention(L, "padding", 3, 1, 7, 32, dt, Sk=70, window=30)  # non-causal, bottom-right aligned


@pytest.mark.skipif(os.environ.get("FASTBERT_CUDA_EMULATION") != "1",
                    reason="opt-in (FASTBERT_CUDA_EMULATION=1): runs the CUDA kernels' source under a slow host "
                           "emulation")
def test_attention_window_under_host_emulation(tmp_path):
    # the window cases alone (test_kernels_under_host_emulation runs them too, with everything else)
    L = _emulation(tmp_path)
    for dt in DTYPES:
        _attention_window_cases(L, dt)
