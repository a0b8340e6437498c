"""fastbert.nn drop-in modules built with .from_hf: same Parameters, same function as the HF module
(checked against the HF module run in float64, rule k = 3), padded and packed inputs, bad input."""
import copy

import pytest
import torch

import fastbert
from fastbert.nn import FastBertLayer, FastBertSelfAttention, invalidate_caches
from fastbert.testing import assert_no_worse
from tests.helpers import DEVICES, require_backend

transformers = pytest.importorskip("transformers")
import fastbert.hf  # noqa: E402,F401  (registers the HF layouts and activation names with fastbert.nn)


def _bert(hidden=32, heads=2, act="gelu", arch="bert"):
    torch.manual_seed(0)
    if arch == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=50, dim=hidden, n_layers=1, n_heads=heads, hidden_dim=2 * hidden,
                                            activation=act, max_position_embeddings=32)
        cfg._attn_implementation = "eager"
        return transformers.DistilBertModel(cfg).eval().transformer.layer[0]
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                  intermediate_size=2 * hidden, hidden_act=act, max_position_embeddings=32)
    cfg._attn_implementation = "eager"
    return transformers.BertModel(cfg).eval().encoder.layer[0]


def _additive(mask, dtype):
    """HF eager's 4D additive key mask from a [B, S] padding mask."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]


def _hf_layer(layer, x, mask):
    return layer(x, _additive(mask, x.dtype))


def _data(B=3, S=7, H=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g, dtype=dtype)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    return x, mask


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,act,hidden,heads", [("bert", "gelu", 32, 2), ("bert", "gelu_new", 64, 4),
                                                   ("distilbert", "gelu", 32, 2), ("bert", "relu", 48, 3)])
def test_layer_matches_hf(arch, act, hidden, heads):
    hf = _bert(hidden, heads, act, arch)
    hf64 = copy.deepcopy(hf).double()
    fast = FastBertLayer.from_hf(copy.deepcopy(hf))
    x, mask = _data(H=hidden)
    w = torch.randn(x.shape, dtype=torch.float64)
    v = mask[..., None]
    outs, grads = [], []
    for m, fn, dt in ((fast, lambda m, x: m(x, mask), torch.float32), (hf, _hf_layer, torch.float32),
                      (hf64, _hf_layer, torch.float64)):
        xi = x.detach().to(dt).clone().requires_grad_()
        o = fn(m, xi, mask) if fn is _hf_layer else fn(m, xi)
        (o * w.to(dt))[mask].sum().backward()
        outs.append(o.detach())
        grads.append(_grads(m) | {"input": xi.grad})
    assert_no_worse("layer out", *outs, k=3, valid=v)
    assert set(grads[0]) == set(grads[2])
    for n in grads[2]:
        assert_no_worse(f"grad {n}", grads[0][n], grads[1][n], grads[2][n], k=3,
                        valid=v.expand_as(grads[2][n]) if n == "input" else None)


def test_packed_equals_padded():
    fast = FastBertLayer.from_hf(_bert())
    x, mask = _data()
    padded = fast(x, mask)
    lens = mask.sum(1, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    packed = fast(x[mask], cu_seqlens=cu, max_seqlen=int(lens.max()))
    torch.testing.assert_close(packed, padded[mask], rtol=1e-5, atol=1e-6)


def test_same_parameters_and_state_dict():
    hf = _bert()
    fast = FastBertLayer.from_hf(hf)
    assert list(fast.state_dict()) == list(hf.state_dict())
    assert all(a is b for a, b in zip(fast.parameters(), hf.parameters()))
    assert fast.attention.self.query.weight is hf.attention.self.query.weight
    att = FastBertSelfAttention.from_hf(hf.attention.self)
    assert list(att.state_dict()) == ["query.weight", "query.bias", "key.weight", "key.bias", "value.weight",
                                      "value.bias"]
    assert att.query is hf.attention.self.query


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_self_attention_matches_hf(arch):
    layer = _bert(arch=arch)
    hf_att = layer.attention.self if arch == "bert" else layer.attention
    fast = FastBertSelfAttention.from_hf(hf_att)
    hf64 = copy.deepcopy(hf_att).double()
    x, mask = _data()
    got = fast(x, mask)
    if arch == "bert":
        ref32 = hf_att(x, _additive(mask, x.dtype))[0]
        ref64 = hf64(x.double(), _additive(mask, torch.float64))[0]
    else:  # DistilBERT's attention module applies out_lin itself: compare through it
        got = hf_att.out_lin(got)
        ref32 = hf_att(x, _additive(mask, x.dtype))[0]
        ref64 = hf64(x.double(), _additive(mask, torch.float64))[0]
    assert_no_worse("self-attention", got, ref32, ref64, k=3, valid=mask[..., None])


def test_fused_qkv_cache_follows_in_place_updates():
    hf = _bert()
    fast = FastBertLayer.from_hf(hf)
    x, mask = _data()
    with torch.no_grad():
        a = fast(x, mask)
        hf.attention.self.key.weight.mul_(0.5)  # bumps Parameter._version
        b = fast(x, mask)
        ref = _hf_layer(hf, x, mask)
    assert not torch.equal(a, b)
    torch.testing.assert_close(b[mask], ref[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a write through .data bypasses the version counter: invalidate explicitly
        hf.attention.self.value.weight.data.mul_(2.0)
        invalidate_caches(fast)
        c = fast(x, mask)
        ref = _hf_layer(hf, x, mask)
    torch.testing.assert_close(c[mask], ref[mask], rtol=1e-5, atol=1e-5)


def test_no_weight_cache_for_fsdp_managed_modules():
    """FSDP re-gathers its parameters into the same tensors with the version counter preserved (as here):
    the cache keys cannot see that, so layers of an FSDP-managed module (FSDP's own mark) cache nothing."""
    def regather(hf):  # what FSDP's copy-out does: same Parameter, same storage, version preserved
        with torch.no_grad():
            for lin in (hf.attention.self.query, hf.attention.self.value, hf.attention.output.dense,
                        hf.intermediate.dense, hf.output.dense):
                with torch.autograd._unsafe_preserve_version_counter(lin.weight):
                    lin.weight.mul_(0.75)

    x, mask = _data()
    for managed in (False, True):
        hf = _bert()
        if managed:
            for m in hf.modules():
                m._is_fsdp_managed_module = True
        fast = FastBertLayer.from_hf(hf)
        with torch.no_grad():
            a = fast(x, mask)
            regather(hf)
            b = fast(x, mask)
            ref = _hf_layer(hf, x, mask)
        if managed:
            torch.testing.assert_close(b[mask], ref[mask], rtol=1e-5, atol=1e-5)
        else:  # the hazard the rule is for: an unmarked module's cache misses the update
            assert torch.equal(a, b)


def test_training_dropout_and_eval():
    hf = _bert()
    fast = FastBertLayer.from_hf(hf)
    x, mask = _data()
    fast.train()
    assert hf.attention.self.training  # shared children follow
    torch.manual_seed(1)
    a = fast(x, mask)
    torch.manual_seed(1)
    b = fast(x, mask)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, mask)[mask], _hf_layer(hf, x, mask)[mask], rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, fast(x, mask))


def test_bad_inputs():
    fast = FastBertLayer.from_hf(_bert())
    x, mask = _data()
    with pytest.raises(TypeError, match="hidden_states"):
        fast(x.tolist())
    with pytest.raises(ValueError, match="hidden_states"):
        fast(x[0, 0])
    with pytest.raises(ValueError, match="attention_mask"):
        fast(x, mask[:, :3])
    with pytest.raises(ValueError, match="cu_seqlens"):
        fast(x, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3)
    with pytest.raises(TypeError, match="layouts"):
        FastBertLayer.from_hf(torch.nn.Linear(3, 3))
    lin = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match="num_heads"):
        FastBertSelfAttention(lin, torch.nn.Linear(32, 32), torch.nn.Linear(32, 32), 5)


def test_empty_batch():
    fast = FastBertLayer.from_hf(_bert())
    x = torch.randn(0, 4, 32)
    assert fast(x, torch.ones(0, 4, dtype=torch.bool)).shape == (0, 4, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_forced_triton(device):
    require_backend("triton", device)
    hf = _bert().to(device)
    hf64 = copy.deepcopy(hf).double()
    fast = FastBertLayer.from_hf(copy.deepcopy(hf))
    x, mask = _data(B=2, S=5)
    x, mask = x.to(device), mask.to(device)
    with torch.no_grad(), fastbert.use_backend("triton"):
        got = fast(x, mask)
    with torch.no_grad():
        ref32 = hf(x, _additive(mask.cpu(), x.dtype).to(device))
        ref64 = hf64(x.double(), _additive(mask.cpu(), torch.float64).to(device))
    assert_no_worse("triton layer", got, ref32, ref64, k=3, valid=mask[..., None])
    assert fastbert.backends.last_decisions()["attention"].backend == "triton"


def test_cpu_qkv_projection_as_three_gemms():
    from fastbert.nn import layers as L
    from fastbert.ops import cpu_gemm

    h, w, b = torch.randn(2, 5, 32), torch.randn(96, 32), torch.randn(96)
    with torch.no_grad():
        assert cpu_gemm.eligible(h, w, b)
        for bias in (b, None):
            got = L._qkv_three_gemms(h, w, bias, 32)
            assert got.shape == (2, 5, 96) and got.is_contiguous()
            torch.testing.assert_close(got, torch.nn.functional.linear(h, w, bias), rtol=1e-5, atol=1e-5)
    assert not cpu_gemm.eligible(h, w.requires_grad_(), b), "out= GEMMs are not differentiable: autograd needs F.linear"
    assert not cpu_gemm.eligible(h.double(), w.double(), b.double())
