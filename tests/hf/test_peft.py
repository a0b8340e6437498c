"""PEFT LoRA inside patched models: the fused layers add the adapters' updates (fastbert/hf/peft.py).

Outputs and adapter gradients hold the model rule (k = 3) against a float64 copy of the UNPATCHED
PEFT model, on every LoRA state fastbert serves (several adapters, merged, disabled, added after
patching); what it does not serve (DoRA) runs PEFT's code with one warning and gives its numbers.
"""
import copy
import warnings

import pytest
import torch

import fastbert
from fastbert.hf.patching import _STATE
from fastbert.testing import assert_no_worse
from tests.hf import models as M

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ALL = ["query", "key", "value", "dense"]  # every Linear of a BERT layer (and the pooler's)


def _lora(targets=ALL, **kw):
    # init_lora_weights=False: B is random too, so the updates are not zero
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **kw})


def _classifier(arch="bert"):
    torch.manual_seed(0)
    cls = {"bert": transformers.BertForSequenceClassification,
           "roberta": transformers.RobertaForSequenceClassification}[arch]
    return cls(M.config(arch, **NO_DROPOUT)).eval()


def _state(model):
    bases = [m for m in model.modules() if _STATE in m.__dict__]
    assert len(bases) == 1
    return bases[0].__dict__[_STATE]


def _fused_warning_free(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    mine = [str(x.message) for x in w if "fastbert" in str(x.message)]
    assert not mine, mine
    return out


def _compare(fast, hf32, ref64, arch="bert", train=False, k=3):
    """Logits, and in training every adapter gradient, against float64 PEFT (rule k)."""
    ids, mask = M.inputs(arch, pad_rows=((1, 4), (2, 2)))
    labels = torch.tensor([0, 1, 0])
    outs, grads = [], []
    for m in (fast, hf32, ref64):
        m.train(train)
        m.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(train):
            o = m(input_ids=ids, attention_mask=mask, labels=labels)
        if train:
            o.loss.backward()
        outs.append(o.logits.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert_no_worse("logits", *outs, k=k)
    if train:
        assert set(grads[0]) == set(grads[2]) and grads[0], set(grads[0]) ^ set(grads[2])
        assert all("lora_" in n or "classifier" in n for n in grads[0]), sorted(grads[0])
        for n in grads[2]:
            assert_no_worse(f"grad {n}", grads[0][n], grads[1][n], grads[2][n], k=k)
    return outs[0]


def _triplet(peft_model):
    return fastbert.patch(copy.deepcopy(peft_model)), copy.deepcopy(peft_model), copy.deepcopy(peft_model).double()


@pytest.mark.parametrize("targets", [["query", "value"], ALL], ids=["qv", "all"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_lora_inference_and_training(arch, targets):
    pm = peft.get_peft_model(_classifier(arch), _lora(targets))
    fast, hf32, ref64 = _triplet(pm)
    out = _fused_warning_free(lambda: _compare(fast, hf32, ref64, arch))
    plain = _classifier(arch)(*M.inputs(arch, pad_rows=((1, 4), (2, 2)))).logits
    assert (out - plain).abs().max() > 1e-3, "the adapters must change the logits (or the test proves nothing)"
    _fused_warning_free(lambda: _compare(fast, hf32, ref64, arch, train=True))
    st = _state(fast)
    assert st.fallback_calls == 0 and st.fast_calls == 2


def test_lora_added_after_patching():
    """Patch first, then wrap with PEFT: the fused layers see the LoRA layers PEFT swapped in."""
    model = _classifier()
    fastbert.patch(model)
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # builds the guard's plan before PEFT changes the model
    pm = peft.get_peft_model(model, _lora())
    ref = peft.get_peft_model(_classifier(), _lora())
    ref.load_state_dict(pm.state_dict())
    ref64 = copy.deepcopy(ref).double()
    _fused_warning_free(lambda: _compare(pm, ref, ref64, train=True))
    assert _state(pm).fallback_calls == 0


def test_several_adapters_merged_and_disabled():
    pm = peft.get_peft_model(_classifier(), _lora(["query", "value", "dense"]))
    pm.add_adapter("second", _lora(["query", "key", "dense"], lora_alpha=4))
    fast, hf32, ref64 = _triplet(pm)
    models = (fast, hf32, ref64)
    for m in models:  # both adapters active at once
        m.base_model.set_adapter(["default", "second"])
    _fused_warning_free(lambda: _compare(*models))
    for m in models:
        m.merge_adapter()
    _fused_warning_free(lambda: _compare(*models))
    for m in models:
        m.unmerge_adapter()
        m.base_model.set_adapter("second")
    _fused_warning_free(lambda: _compare(*models, train=True))
    ctx = [m.disable_adapter() for m in models]
    for c in ctx:
        c.__enter__()
    try:
        out = _fused_warning_free(lambda: _compare(*models))
    finally:
        for c in ctx:
            c.__exit__(None, None, None)
    plain = copy.deepcopy(hf32)
    with plain.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(out, plain(*M.inputs("bert", pad_rows=((1, 4), (2, 2)))).logits,
                                   rtol=1e-5, atol=1e-6)
    assert _state(fast).fallback_calls == 0


def test_lora_dropout_in_training():
    pm = peft.get_peft_model(_classifier(), _lora(lora_dropout=0.5))
    fast, hf32, ref64 = _triplet(pm)
    _fused_warning_free(lambda: _compare(fast, hf32, ref64))  # eval: dropout off, same numbers
    ids, mask = M.inputs("bert")
    fast.train()
    torch.manual_seed(3)
    a = fast(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(3)
    b = fast(input_ids=ids, attention_mask=mask).logits
    c = fast(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.equal(a, c), "LoRA dropout must be applied in training, seeded"


def test_dora_runs_peft_code_with_one_warning():
    pm = peft.get_peft_model(_classifier(), _lora(["query", "value"], use_dora=True))
    fast, hf32, _ = _triplet(pm)
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            a = fast(input_ids=ids, attention_mask=mask).logits
            fast(input_ids=ids, attention_mask=mask)
    mine = [str(x.message) for x in w if "fastbert" in str(x.message)]
    assert len(mine) == 1 and "LoRA variant" in mine[0], mine
    with torch.no_grad():
        torch.testing.assert_close(a, hf32(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    assert _state(fast).fast_calls == 0
