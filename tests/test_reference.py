
import pytest
import torch
import torch.nn.functional as F

from fastbert import reference


def test_philox_matches_known_answer():
    # Philox4x32-10 known-answer test (Random123 kat_vectors): counter 0, key 0 -> 6627e8d5 ...
    out = reference.philox_uint32(0, torch.tensor([0]))
    assert int(out[0]) == 0x6627E8D5


def test_philox_matches_triton_randint():
    triton = pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import triton.language as tl

    @triton.jit
    def _k(out_ptr, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r = tl.randint(seed, offs)
        tl.store(out_ptr + offs, r.to(tl.uint32).to(tl.int64), mask=offs < n)

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    n = 300
    out = torch.empty(n, dtype=torch.int64, device=dev)
    seed = 0x123456789ABC
    _k[(triton.cdiv(n, 128),)](out, seed, n, BLOCK=128)
    ref = reference.philox_uint32(seed, torch.arange(n, device=dev))
    assert torch.equal(out & 0xFFFFFFFF, ref)


def test_dropout_keep_rate():
    offs = torch.arange(200_000)
    for p in (0.1, 0.5):
        keep = reference.dropout_keep(1234, offs, p)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert reference.dropout_keep(1, offs[:10], 0.0).all()


def test_add_layer_norm_reference_matches_torch():
    x = torch.randn(4, 7, 384, dtype=torch.float64)
    r = torch.randn_like(x)
    xb, w, b = (torch.randn(384, dtype=torch.float64) for _ in range(3))
    out = reference.add_layer_norm(x, w, b, residual=r, x_bias=xb, eps=1e-5)
    assert torch.allclose(out, F.layer_norm(x + xb + r, (384,), w, b, 1e-5))


def test_attention_reference_matches_sdpa():
    B, S, H, D = 2, 9, 3, 16
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 5:] = False
    out = reference.attention(q, k, v, attention_mask=mask)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask[:, None, None, :]).transpose(1, 2)
    assert torch.allclose(out, sdpa)
    causal = reference.attention(q, k, v, causal=True)
    sdpa_c = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=True).transpose(1, 2)
    assert torch.allclose(causal, sdpa_c)


def test_attention_reference_varlen_and_empty_rows():
    H, D = 2, 8
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, H, D, dtype=torch.float64) for _ in range(3))
    out = reference.attention(q, k, v, cu_seqlens=cu, max_seqlen=5)
    for i, (s0, s1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = reference.attention(q[None, s0:s1], k[None, s0:s1], v[None, s0:s1])[0]
        assert torch.allclose(out[s0:s1], one)
    mask = torch.zeros(1, 4, dtype=torch.bool)
    qq, kk, vv = (torch.randn(1, 4, H, D) for _ in range(3))
    o = reference.attention(qq, kk, vv, attention_mask=mask)
    assert torch.equal(o, torch.zeros_like(o))
