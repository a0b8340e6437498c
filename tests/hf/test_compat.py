"""The transformers touchpoints (fastbert/hf/compat.py): renamed arguments are aliases, a touchpoint that
does not match leaves the model to HF's code with one warning that names it, and what HF passes
through the Trainer and heads stays on the fused path."""
import dataclasses
import inspect
import warnings

import pytest
import torch

import fastbert
from fastbert.hf import compat, is_patched
from fastbert.hf.patching import _STATE
from fastbert.testing import assert_no_worse
from tests.hf import models as M

transformers = pytest.importorskip("transformers")
modeling_bert = pytest.importorskip("transformers.models.bert.modeling_bert")


def _patch_warnings(model):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fastbert.patch(model)
    return [str(x.message) for x in w if "fastbert" in str(x.message)]


def test_call_passes_only_given_and_required_arguments():
    def fn(a, b=1, *, c=None, d=5):
        return a, b, c, d

    names = compat.Call("fn", {"a": ("a",), "b": ("bee", "b"), "c": ("c",), "d": ("d",)}).resolve(fn)
    assert names == {"a": ("a", True), "b": ("b", False), "c": ("c", False), "d": ("d", False)}
    assert compat.call(fn, names, a=None, b=None, c=3, d=None) == (None, 1, 3, 5)  # a: required, passed
    with pytest.raises(compat.CompatError, match="fn takes none of 'e'"):
        compat.Call("fn", {"e": ("e",)}).resolve(fn)


def test_renamed_embedding_argument_is_an_alias(monkeypatch):
    """DistilBERT's embeddings took `input_embeds` before transformers 5.2x; both names work."""
    cls = type(M.base_model("distilbert").embeddings)
    new = cls.forward
    params = list(inspect.signature(new).parameters)
    assert "inputs_embeds" in params or "input_embeds" in params

    def old_forward(self, input_ids, input_embeds=None, position_ids=None):
        return new(self, input_ids, input_embeds, position_ids)

    monkeypatch.setattr(cls, "forward", old_forward)
    model = M.base_model("distilbert")
    hf32, ref64, fast = M.triplet(model)
    assert not _patch_warnings(fast) and is_patched(fast)
    ids, mask = M.inputs("distilbert")
    with torch.no_grad():
        outs = [m(inputs_embeds=m.get_input_embeddings()(ids), attention_mask=mask).last_hidden_state
                for m in (fast, hf32, ref64)]
    assert_no_worse("inputs_embeds via input_embeds", *outs, k=3, valid=mask.bool()[..., None])
    assert fast.__dict__[_STATE].fallback_calls == 0


def test_mismatched_embeddings_leave_the_model_to_hf(monkeypatch):
    original = modeling_bert.BertEmbeddings.forward

    def renamed(self, ids=None, token_type_ids=None, position_ids=None, embeds=None):
        return original(self, input_ids=ids, token_type_ids=token_type_ids, position_ids=position_ids,
                        inputs_embeds=embeds)

    monkeypatch.setattr(modeling_bert.BertEmbeddings, "forward", renamed)
    model = M.base_model("bert")
    said = _patch_warnings(model)
    assert len(said) == 1 and "Embeddings.forward takes none of 'input_ids'" in said[0]
    assert f"transformers {transformers.__version__}" in said[0] and not is_patched(model)
    assert "forward" not in model.__dict__ and type(model.encoder.layer[0]) is modeling_bert.BertLayer
    assert "NOT patched" in fastbert.explain(model) and "input_ids" in fastbert.explain(model)


def test_output_class_without_a_field_leaves_the_model_to_hf(monkeypatch):
    import transformers.modeling_outputs as mo

    @dataclasses.dataclass
    class Narrow(transformers.utils.ModelOutput):
        last_hidden_state: torch.Tensor = None

    monkeypatch.setattr(mo, "BaseModelOutputWithPoolingAndCrossAttentions", Narrow)
    model = M.base_model("bert")
    said = _patch_warnings(model)
    assert len(said) == 1 and "has no field hidden_states, pooler_output" in said[0] and not is_patched(model)


class _MySelfAttention(modeling_bert.BertSelfAttention):
    """A user's subclass: its forward may compute anything, so fastbert must not read around it."""


def test_foreign_layer_module_is_refused_and_a_later_one_runs_hf_code():
    model = M.base_model("bert")
    old = model.encoder.layer[0].attention.self
    mine = _MySelfAttention(model.config)
    mine.load_state_dict(old.state_dict())
    model.encoder.layer[0].attention.self = mine
    said = _patch_warnings(model)
    assert len(said) == 1 and "encoder.layer.0.attention.self is a _MySelfAttention" in said[0]
    assert not is_patched(model)
    # the same replacement after patching: that call runs HF's code
    model = fastbert.patch(M.base_model("bert"))
    model.encoder.layer[1].attention.self = _MySelfAttention(model.config)
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids, attention_mask=mask)
    said = [str(x.message) for x in w if "fastbert" in str(x.message)]
    assert len(said) == 1 and "attention.self is a _MySelfAttention, not the BertSelfAttention" in said[0]


def test_activation_module_must_match_the_config():
    model = M.base_model("bert")
    model.encoder.layer[1].intermediate.intermediate_act_fn = torch.nn.Tanh()
    said = _patch_warnings(model)
    assert len(said) == 1 and "intermediate_act_fn is a Tanh" in said[0] and not is_patched(model)


def test_outside_the_supported_range_warns_once(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "6.1.0")
    monkeypatch.setattr(compat, "_range_warned", False)
    said = _patch_warnings(M.base_model("bert")) + _patch_warnings(M.base_model("bert"))
    assert len([s for s in said if "outside the supported range" in s]) == 1


def test_enclosing_output_capture_runs_hf_code():
    oc = pytest.importorskip("transformers.utils.output_capturing")
    model = fastbert.patch(M.base_model("bert"))
    ids, mask = M.inputs("bert")
    token = oc._active_collector.set({"hidden_states": []})
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(ids, attention_mask=mask)
    finally:
        oc._active_collector.reset(token)
    said = [str(x.message) for x in w if "fastbert" in str(x.message)]
    assert len(said) == 1 and "capturing outputs" in said[0]


@pytest.mark.parametrize("select", [[0, 2], -1, [1, -1, 7]])
def test_output_hidden_states_selects_layers_like_hf(select):
    if not compat.hidden_state_selection_supported():
        pytest.skip(f"transformers {transformers.__version__} treats output_hidden_states as a flag")
    model = M.base_model("bert")
    hf32, ref64, fast = M.triplet(model)
    fastbert.patch(fast, padding_free=False)  # padded: every position compares with HF's
    ids, mask = M.inputs("bert")
    with torch.no_grad():
        outs = [m(ids, attention_mask=mask, output_hidden_states=select).hidden_states for m in (fast, hf32, ref64)]
    assert fast.__dict__[_STATE].fallback_calls == 0
    assert len(outs[0]) == len(outs[1]) == 3
    for i, states in enumerate(zip(*outs)):
        if states[1] is None:
            assert states[0] is None and states[2] is None, i
        else:
            assert_no_worse(f"hidden_states[{i}]", *states, k=3)


def test_trainer_and_loss_arguments_stay_fused():
    model = fastbert.patch(transformers.BertForSequenceClassification(M.config("bert")).eval())
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0]), num_items_in_batch=torch.tensor(3),
              return_dict=True, output_hidden_states=False, use_cache=False)
    assert model.bert.__dict__[_STATE].fast_calls == 1
    with pytest.warns(UserWarning, match="argument 'not_an_hf_argument' is not served"):
        model(ids, attention_mask=mask, not_an_hf_argument=1)
