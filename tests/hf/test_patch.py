"""fastbert.patch / unpatch on tiny random-weight Hugging Face models (no hub access).

Every architecture: outputs and every parameter gradient hold docs/design.md's rule with k = 3 against a
float64 copy of the UNPATCHED model, over valid (non-padding) positions, with padding, padding-free and
padded, on the default backend (cpu/torch here) and forced triton (the interpreter here; cuda/triton and
fp16/bf16 as gpu-marked twins).
"""
import copy
import warnings

import pytest
import torch

import fastbert
from fastbert.hf import UnsupportedModelError, is_patched
from fastbert.hf.patching import _STATE
from fastbert.testing import assert_no_worse
from tests.helpers import require_backend
from tests.hf import models as M

transformers = pytest.importorskip("transformers")


def _state(model):
    return model.base_model.__dict__[_STATE]


# ----------------------------------------------------------------------------------------------
# equivalence, every architecture
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_matches_hf_default_backend(arch):
    model = M.base_model(arch)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs(arch, pad_rows=((1, 4), (2, 1)))
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)
    st = _state(fast)
    assert st.fast_calls == 1 and st.fallback_calls == 0


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_matches_hf_padded_mode(arch):
    model = M.base_model(arch)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, padding_free=False)
    ids, mask = M.inputs(arch)
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)


@pytest.mark.parametrize("arch", ["bert", "electra", "distilbert", "flaubert"])
def test_matches_hf_forced_triton(arch):
    model = M.base_model(arch)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, backend="triton")
    ids, mask = M.inputs(arch, batch=3, seq=5, pad_rows=((1, 2),), empty_row=2)  # row 2: no real token
    o, _ = M.assert_model_no_worse(fast, hf32, ref64, ids, mask)
    assert torch.isfinite(o).all()
    assert fastbert.backends.last_decisions()["attention"].backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [None, "triton", "cuda"])
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_matches_hf_gpu(arch, backend, dtype):
    if backend is not None:
        require_backend(backend, "cuda")
    model = M.base_model(arch).cuda()
    ref64 = copy.deepcopy(model).double()
    hf = copy.deepcopy(model).to(dtype)
    fast = fastbert.patch(copy.deepcopy(model).to(dtype), backend=backend)
    ids, mask = M.inputs(arch, batch=4, seq=16, pad_rows=((1, 9), (3, 1)))
    M.assert_model_no_worse(fast, hf, ref64, ids.cuda(), mask.cuda())


def test_no_padding_and_no_mask():
    model = M.base_model("bert")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs("bert", pad_rows=())
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)
    with torch.no_grad():
        assert_no_worse("no mask", fast(ids).last_hidden_state, hf32(ids).last_hidden_state,
                        ref64(ids).last_hidden_state, k=3)


@pytest.mark.parametrize("seq", [1, 16])
def test_awkward_lengths(seq):
    model = M.base_model("roberta")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs("roberta", batch=2, seq=seq, pad_rows=((1, seq // 2 + 1),) if seq > 1 else ())
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_activations(act):
    model = M.base_model("bert", hidden_act=act)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    kind = fast.encoder.layer[0]._act_kind
    assert kind is not None and kind[0] in ("gelu", "relu", "silu")
    if act == "gelu":
        assert kind == ("gelu", "none")  # exact erf GELU, never the tanh approximation
    if act == "gelu_new":
        assert kind == ("gelu", "tanh")
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        v = mask.bool()[..., None]
        assert_no_worse(act, fast(ids, attention_mask=mask).last_hidden_state,
                        hf32(ids, attention_mask=mask).last_hidden_state,
                        ref64(ids, attention_mask=mask).last_hidden_state, k=3, valid=v)


def test_all_padding_row_is_finite_and_zero():
    model = M.base_model("bert")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs("bert", empty_row=2)
    out = fast(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    # padding positions hold 0 in padding-free mode (documented)
    assert (out.last_hidden_state[~mask.bool()] == 0).all()
    assert all((h[~mask.bool()] == 0).all() for h in out.hidden_states[1:])
    out.last_hidden_state.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
    # padded mode too
    fastbert.patch(fast, padding_free=False)
    out = fast(ids, attention_mask=mask)
    assert torch.isfinite(out.last_hidden_state).all()


def test_empty_batch():
    fast = fastbert.patch(M.base_model("bert"))
    ids = torch.zeros(0, 5, dtype=torch.long)
    out = fast(ids, attention_mask=torch.ones(0, 5, dtype=torch.long))
    assert out.last_hidden_state.shape == (0, 5, 32)


# ----------------------------------------------------------------------------------------------
# every BERT head, plus the decoder variant that is left to HF
# ----------------------------------------------------------------------------------------------
HEADS = ["BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction", "BertForSequenceClassification",
         "BertForMultipleChoice", "BertForTokenClassification", "BertForQuestionAnswering"]


@pytest.mark.parametrize("head", HEADS)
def test_bert_heads(head):
    torch.manual_seed(0)
    model = getattr(transformers, head)(M.config("bert")).eval()
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs("bert", pad_rows=((1, 4),))
    if head == "BertForMultipleChoice":
        ids, mask = ids[None].repeat(2, 1, 1), mask[None].repeat(2, 1, 1)
    outs = [m(input_ids=ids, attention_mask=mask) for m in (fast, hf32, ref64)]
    assert _state(fast).fast_calls == 1
    first = [o[0] for o in outs]  # logits / prediction scores; every row has a real first token
    v = None
    if first[0].dim() >= 2 and first[0].shape[:2] == ids.reshape(-1, ids.shape[-1]).shape:  # per token
        v = mask.bool().reshape(first[0].shape[:2])
        v = v[..., None] if first[0].dim() == 3 else v
    assert_no_worse(head, *first, k=3, valid=v)
    first[0].float().sum().backward()
    for (n, p), (_, p64) in zip(fast.named_parameters(), ref64.named_parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_decoder_config_runs_hf_code_with_one_warning():
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(M.config("bert", is_decoder=True)).eval()
    ref = copy.deepcopy(model)
    fastbert.patch(model)
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = model(ids, attention_mask=mask, use_cache=False).logits
        model(ids, attention_mask=mask, use_cache=False)
    mine = [x for x in w if "fastbert" in str(x.message)]
    assert len(mine) == 1 and "is_decoder" in str(mine[0].message)
    torch.testing.assert_close(a, ref(ids, attention_mask=mask, use_cache=False).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# outputs HF offers
# ----------------------------------------------------------------------------------------------
def test_output_attentions_warns_once_and_matches_hf():
    torch.manual_seed(0)
    cfg = M.config("bert")
    cfg._attn_implementation = "eager"  # HF returns attention probabilities only from eager
    model = transformers.BertModel(cfg).eval()
    ref = copy.deepcopy(model)
    fastbert.patch(model)
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o1 = model(ids, attention_mask=mask, output_attentions=True)
        model(ids, attention_mask=mask, output_attentions=True)
    mine = [x for x in w if "fastbert" in str(x.message)]
    assert len(mine) == 1 and "output_attentions" in str(mine[0].message)
    r = ref(ids, attention_mask=mask, output_attentions=True)
    assert len(o1.attentions) == 2
    for a, b in zip(o1.attentions, r.attentions):
        assert torch.equal(a, b)
    assert torch.equal(o1.last_hidden_state, r.last_hidden_state)
    # the fused twins are back after the call
    assert isinstance(model.encoder.layer[0], fastbert.nn.FastBertLayer)


@pytest.mark.parametrize("padding_free", [True, False])
def test_output_hidden_states(padding_free):
    model = M.base_model("bert")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, padding_free=padding_free)
    ids, mask = M.inputs("bert")
    v = mask.bool()[..., None]
    with torch.no_grad():
        outs = [m(ids, attention_mask=mask, output_hidden_states=True) for m in (fast, hf32, ref64)]
    assert len(outs[0].hidden_states) == len(outs[2].hidden_states) == 3
    for i, hs in enumerate(zip(*(o.hidden_states for o in outs))):
        assert_no_worse(f"hidden_states[{i}]", *hs, k=3, valid=v)
    assert outs[0].hidden_states[-1] is outs[0].last_hidden_state or torch.equal(outs[0].hidden_states[-1],
                                                                               outs[0].last_hidden_state)
    tup = fast(ids, attention_mask=mask, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], outs[0].last_hidden_state)


def test_token_type_and_position_ids():
    model = M.base_model("bert", type_vocab_size=2)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs("bert")
    g = torch.Generator().manual_seed(3)
    kw = dict(token_type_ids=torch.randint(0, 2, ids.shape, generator=g),
              position_ids=torch.randint(0, 32, ids.shape, generator=g))
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask, **kw)
    assert _state(fast).fallback_calls == 0


# ----------------------------------------------------------------------------------------------
# patch / unpatch mechanics
# ----------------------------------------------------------------------------------------------
def test_unpatch_restores_exact_outputs_and_modules():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(M.config("bert")).eval()
    ids, mask = M.inputs("bert")
    before = model(ids, attention_mask=mask).logits
    layers = list(model.bert.encoder.layer)
    fastbert.patch(model)
    assert is_patched(model) and isinstance(model.bert.encoder.layer[1], fastbert.nn.FastBertLayer)
    fastbert.unpatch(model)
    assert not is_patched(model) and "forward" not in model.bert.__dict__
    assert all(a is b for a, b in zip(model.bert.encoder.layer, layers))
    assert torch.equal(model(ids, attention_mask=mask).logits, before)


def test_state_dict_keys_and_storages_unchanged():
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(M.config("distilbert")).eval()
    sd0 = model.state_dict()
    params0 = list(model.parameters())
    fastbert.patch(model)
    sd1 = model.state_dict()
    assert list(sd0) == list(sd1)
    assert all(sd0[k].data_ptr() == sd1[k].data_ptr() for k in sd0)
    params1 = list(model.parameters())
    assert len(params0) == len(params1) and all(a is b for a, b in zip(params0, params1))


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(M.config("bert")).eval()
    ids, mask = M.inputs("bert")
    fastbert.patch(model)
    out = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "patched")
    fastbert.unpatch(model)
    model.save_pretrained(tmp_path / "plain")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "patched" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = fastbert.patch(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "patched").eval())
    assert torch.equal(loaded(ids, attention_mask=mask).logits, out)


def test_strict_and_bad_arguments():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="BertModel") as e:
        fastbert.patch(lin)
    assert isinstance(e.value, TypeError) and "DistilBertModel" in str(e.value)
    with pytest.warns(UserWarning, match="untouched"):
        assert fastbert.patch(lin, strict=False) is lin
    model = M.base_model("bert")
    with pytest.raises(ValueError, match="backend"):
        fastbert.patch(model, backend="nope")
    with pytest.raises(TypeError, match="padding_free"):
        fastbert.patch(model, padding_free="yes")
    with pytest.raises(TypeError, match="model"):
        fastbert.patch("bert")
    assert not is_patched(model)


def test_patch_twice_is_idempotent():
    model = M.base_model("bert")
    fastbert.patch(model)
    layer = model.encoder.layer[0]
    fastbert.patch(model, padding_free=False)
    assert model.encoder.layer[0] is layer and _state(model).padding_free is False
    fastbert.unpatch(model)
    assert type(model.encoder.layer[0]).__name__ == "BertLayer"


def test_explain_model():
    model = fastbert.patch(transformers.BertForMaskedLM(M.config("bert")).eval())
    text = fastbert.explain(model)
    assert "bert: BertModel patched as bert" in text and "FastBertLayer" in text
    ids, mask = M.inputs("bert")
    model(ids, attention_mask=mask)
    text = fastbert.explain(model)
    assert "1 fused call(s)" in text and "last run: attention on " in text and "linear_gelu on " in text
    assert "NOT patched" in fastbert.explain(fastbert.unpatch(model))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def test_train_mode_dropout_runs_and_is_seeded():
    model = fastbert.patch(M.base_model("bert"))
    model.train()
    ids, mask = M.inputs("bert")
    torch.manual_seed(11)
    a = model(ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(11)
    b = model(ids, attention_mask=mask).last_hidden_state
    c = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    d = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(d, model(ids, attention_mask=mask).last_hidden_state)


def test_gradient_checkpointing_matches():
    zero = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = M.inputs("bert")
    grads = []
    for ckpt in (False, True):
        model = fastbert.patch(M.base_model("bert", **zero))
        if ckpt:
            # transformers >= 5.2x renamed it (the old name warns and goes away in v6); older 5.x have only the old name
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert model.encoder.layer[0].gradient_checkpointing
        model.train()
        model(ids, attention_mask=mask).last_hidden_state[mask.bool()].sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_step_matches_hf_and_refreshes_fused_weights():
    model = M.base_model("bert")
    hf = copy.deepcopy(model)
    fast = fastbert.patch(copy.deepcopy(model))
    ids, mask = M.inputs("bert")
    v = mask.bool()
    w = torch.randn(*ids.shape, 32)
    with torch.no_grad():  # fills the fused-QKV cache
        stale = fast(ids, attention_mask=mask).last_hidden_state
    for m in (fast, hf):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        (m(ids, attention_mask=mask).last_hidden_state * w)[v].sum().backward()
        opt.step()
    with torch.no_grad():  # the cache must see the in-place update (Parameter._version changed)
        a = fast(ids, attention_mask=mask).last_hidden_state
        b = hf(ids, attention_mask=mask).last_hidden_state
    fresh = fast(ids, attention_mask=mask).last_hidden_state.detach()  # grad mode: fused by torch.cat
    assert not torch.equal(a, stale)
    assert torch.equal(a, fresh)
    torch.testing.assert_close(a[v], b[v], rtol=1e-4, atol=1e-5)


def test_torch_compile_aot_eager():
    model = M.base_model("bert", num_hidden_layers=1)  # one layer: tracing time is the cost here
    fast = fastbert.patch(copy.deepcopy(model))
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        eager = fast(ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(fast, backend="aot_eager")
        got = compiled(ids, attention_mask=mask).last_hidden_state
    v = mask.bool()
    torch.testing.assert_close(got[v], eager[v], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_sentence_embedding_wrapper():
    """A model that holds a BertModel (as sentence-transformers does) gets its BertModel patched."""

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.auto_model = M.base_model("bert")

        def forward(self, ids, mask):
            h = self.auto_model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            return (h * m).sum(1) / m.sum(1)

    emb = Embedder().eval()
    ref = copy.deepcopy(emb)
    fastbert.patch(emb)
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(emb(ids, mask), ref(ids, mask), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# attn_implementation="fastbert"
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_attn_implementation_fastbert(arch):
    import fastbert.hf  # noqa: F401  (registers "fastbert")

    model = M.base_model(arch)
    ref64 = copy.deepcopy(model).double()
    hf32 = copy.deepcopy(model)
    mine = copy.deepcopy(model)
    mine.set_attn_implementation("fastbert")
    assert mine.config._attn_implementation == "fastbert"
    ids, mask = M.inputs(arch)
    M.assert_model_no_worse(mine, hf32, ref64, ids, mask)


def test_from_pretrained_attn_implementation(tmp_path):
    import fastbert.hf  # noqa: F401

    model = M.base_model("bert")
    model.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="fastbert").eval()
    assert loaded.config._attn_implementation == "fastbert"
    ids, mask = M.inputs("bert")
    v = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).last_hidden_state[v],
                                   model(ids, attention_mask=mask).last_hidden_state[v], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# reduced precision: .half() / .to(bfloat16) and autocast (CPU here; CUDA in the gpu twins above)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    model = M.base_model("bert")
    ref64 = copy.deepcopy(model).double()
    hf = copy.deepcopy(model).to(dtype)
    fast = fastbert.patch(copy.deepcopy(model).to(dtype))
    ids, mask = M.inputs("bert")
    v = mask.bool()[..., None]
    with torch.no_grad():
        outs = [m(ids, attention_mask=mask).last_hidden_state for m in (fast, hf, ref64)]
    assert outs[0].dtype == dtype
    assert_no_worse(f"{dtype} model", *outs, k=3, valid=v)


def test_autocast_bf16():
    model = M.base_model("bert")
    ref64 = copy.deepcopy(model).double()
    hf = copy.deepcopy(model)
    fast = fastbert.patch(copy.deepcopy(model))
    ids, mask = M.inputs("bert")
    v = mask.bool()[..., None]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = fast(ids, attention_mask=mask).last_hidden_state
            b = hf(ids, attention_mask=mask).last_hidden_state
        r = ref64(ids, attention_mask=mask).last_hidden_state
    assert a.dtype == b.dtype
    assert_no_worse("autocast bf16", a, b, r, k=3, valid=v, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# FlauBERT (XLM layout: no layer modules, padding zeroed after every layer, mask derived from pads)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_free", [True, False])
def test_flaubert_all_positions_and_derived_mask(padding_free):
    model = M.base_model("flaubert")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, padding_free=padding_free)
    sd = list(fast.state_dict())
    assert sd == list(hf32.state_dict())
    ids, mask = M.inputs("flaubert")
    # no attention_mask: FlaubertModel derives it from the pad tokens, and so must the fast path
    with torch.no_grad():
        outs = [m(ids, output_hidden_states=True) for m in (fast, hf32, ref64)]
    for i, hs in enumerate(zip(*(o.hidden_states for o in outs))):
        # HF defines padding positions as 0 after every layer: compare every position
        assert_no_worse(f"hidden_states[{i}]", *hs, k=3)
    assert _state(fast).fallback_calls == 0
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask)


def test_flaubert_head_and_unpatch():
    torch.manual_seed(0)
    model = transformers.FlaubertForSequenceClassification(M.config("flaubert")).eval()
    ids, mask = M.inputs("flaubert")
    ref = model(ids, attention_mask=mask).logits
    fastbert.patch(model)
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert _state(model).fast_calls == 1
    fastbert.unpatch(model)
    assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_deepcopy_pickle_and_signature():
    import inspect
    import io

    model = fastbert.patch(M.base_model("bert"))
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
        dup = copy.deepcopy(model)
        assert torch.equal(dup(ids, attention_mask=mask).last_hidden_state, a) and _state(dup) is not _state(model)
        assert dup.forward.base is dup and dup.encoder.layer[0] is not model.encoder.layer[0]
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, a) and is_patched(loaded)
    fastbert.unpatch(loaded)
    assert type(loaded.encoder.layer[0]).__name__ == "BertLayer"


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_inputs_embeds(arch):
    model = M.base_model(arch)
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs(arch)
    v = mask.bool()[..., None]
    with torch.no_grad():
        outs = [m(inputs_embeds=m.get_input_embeddings()(ids), attention_mask=mask).last_hidden_state
                for m in (fast, hf32, ref64)]
    assert_no_worse("inputs_embeds", *outs, k=3, valid=v)
    assert _state(fast).fallback_calls == 0


def test_xlm_langs_relu():
    """XLM (same layout as FlauBERT): language embeddings, ReLU feed-forward."""
    model = M.base_model("xlm")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    assert fast.__dict__[_STATE].fast[0]._act_kind == ("relu", None)
    ids, mask = M.inputs("xlm")
    langs = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(4))
    M.assert_model_no_worse(fast, hf32, ref64, ids, mask, langs=langs)
    assert _state(fast).fallback_calls == 0


def test_encoder_ignores_use_cache_and_false_flags():
    model = fastbert.patch(M.base_model("bert"))
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        model(ids, attention_mask=mask, use_cache=True, output_attentions=False, output_hidden_states=False)
    assert _state(model).fallback_calls == 0 and _state(model).fast_calls == 1


def test_attn_implementation_fastbert_decoder_with_cache():
    """The attention function alone also serves BERT's causal decoder configuration and a KV cache."""
    import fastbert.hf  # noqa: F401

    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(M.config("bert", is_decoder=True)).eval()
    mine = copy.deepcopy(model)
    mine.set_attn_implementation("fastbert")
    ids, mask = M.inputs("bert", pad_rows=((1, 5),))
    v = mask.bool()[..., None]
    with torch.no_grad():
        a = mine(ids, attention_mask=mask, use_cache=False).logits
        b = model(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(a[v.expand_as(a)], b[v.expand_as(b)], rtol=1e-5, atol=1e-5)
        # no mask: the causal flag path; then one cached decoding step (query 1 vs keys 8)
        full = torch.cat([ids, ids[:, :1]], 1)
        c = mine(ids, use_cache=True)
        step = mine(full[:, -1:], past_key_values=c.past_key_values, use_cache=True).logits
        ref = model(full, use_cache=False).logits[:, -1:]
        torch.testing.assert_close(c.logits, model(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)


OTHER_HEADS = [("roberta", "RobertaForMaskedLM"), ("xlm-roberta", "XLMRobertaForTokenClassification"),
               ("camembert", "CamembertForSequenceClassification"), ("electra", "ElectraForPreTraining"),
               ("distilbert", "DistilBertForQuestionAnswering"), ("flaubert", "FlaubertWithLMHeadModel")]


@pytest.mark.parametrize("arch,head", OTHER_HEADS)
def test_other_heads(arch, head):
    torch.manual_seed(0)
    model = getattr(transformers, head)(M.config(arch)).eval()
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast)
    ids, mask = M.inputs(arch, pad_rows=((1, 4),))
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask)[0] for m in (fast, hf32, ref64)]
    assert _state(fast).fast_calls == 1 and _state(fast).fallback_calls == 0
    v = None
    if outs[0].shape[:2] == ids.shape:  # per-token outputs: valid tokens only
        v = mask.bool() if outs[0].dim() == 2 else mask.bool()[..., None]
    assert_no_worse(head, *outs, k=3, valid=v)
