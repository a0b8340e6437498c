"""What patched models do when their modules are hooked, wrapped or replaced (fastbert/hf/guard.py).

A module the fused path bypasses that carries a hook or is not what the fused path reads makes the
call run HF's code, with one warning naming it, and give HF's numbers; removing the cause brings the
fused path back. Hooks on the fused layers themselves run on the fused path and see HF's layout.
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


def _pair(arch="bert"):
    model = M.base_model(arch)
    return fastbert.patch(copy.deepcopy(model)), model


def _call(model, ids, mask):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return out, [str(x.message) for x in w if "fastbert" in str(x.message)]


def _counts(model):
    st = model.__dict__[_STATE]
    return st.fast_calls, st.fallback_calls


def _scale_output(module, args, output):
    return output * 1.5


@pytest.mark.parametrize("when", ["before", "after"])
def test_forward_hook_inside_a_layer_runs_hf_code(when):
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    v = mask.bool()
    if when == "before":
        fastbert.unpatch(fast)
    fast.encoder.layer[0].output.dense.register_forward_hook(_scale_output)
    if when == "before":
        fastbert.patch(fast)
    hf.encoder.layer[0].output.dense.register_forward_hook(_scale_output)
    got, said = _call(fast, ids, mask)
    ref, _ = _call(hf, ids, mask)
    assert len(said) == 1 and "encoder.layer.0.output.dense has a forward hook" in said[0], said
    torch.testing.assert_close(got[v], ref[v], rtol=0, atol=0)
    _, said = _call(fast, ids, mask)
    assert not said, "said once per model and reason"
    assert _counts(fast) == (0, 2)


def test_pre_hook_on_self_attention_fires_and_removal_restores_the_fused_path():
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    fired = []
    handle = fast.encoder.layer[1].attention.self.register_forward_pre_hook(lambda m, a: fired.append(1))
    _, said = _call(fast, ids, mask)
    assert fired and len(said) == 1 and "attention.self has a forward pre-hook" in said[0]
    handle.remove()
    got, said = _call(fast, ids, mask)
    ref, _ = _call(hf, ids, mask)
    assert not said and _counts(fast) == (1, 1)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


def test_hook_on_a_fused_layer_runs_fused_and_sees_hf_layout():
    """A hook on model.encoder.layer[i] after patching sits on the fused layer: it runs (padded, so it
    sees [batch, seq, hidden]), and what it returns is used, as on an HF layer."""
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    seen = []

    def hook(module, args, output):
        seen.append(tuple(args[0].shape))
        return output * 1.5

    fast.encoder.layer[0].register_forward_hook(hook)
    hf.encoder.layer[0].register_forward_hook(_scale_output)
    got, said = _call(fast, ids, mask)
    ref, _ = _call(hf, ids, mask)
    assert not said and _counts(fast) == (1, 0)
    assert seen == [(3, 7, 32)]
    v = mask.bool()[..., None]
    with torch.no_grad():
        ref64 = copy.deepcopy(hf).double()(ids, attention_mask=mask).last_hidden_state
    assert_no_worse("hooked layer", got, ref, ref64, k=3, valid=v)


def test_global_hook_and_replaced_forward_run_hf_code():
    fast, _ = _pair()
    ids, mask = M.inputs("bert")
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        _, said = _call(fast, ids, mask)
    finally:
        handle.remove()
    assert len(said) == 1 and "global module hook" in said[0]
    ln = fast.encoder.layer[1].attention.output.LayerNorm
    original = ln.forward
    ln.forward = lambda x: original(x) * 2  # what accelerate's add_hook_to_module does
    _, said = _call(fast, ids, mask)
    assert len(said) == 1 and "LayerNorm has its forward replaced" in said[0]
    del ln.forward
    _, said = _call(fast, ids, mask)
    assert not said and _counts(fast) == (1, 2)


class _ScaledLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


class _Int8Linear(torch.nn.Linear):
    """Stands for a quantized Linear: an nn.Linear subclass whose forward is not F.linear."""

    def forward(self, x):
        return super().forward(x).round()


@pytest.mark.parametrize("which", ["layernorm", "linear"])
def test_replaced_modules_run_hf_code(which):
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    for m in (fast, hf):
        out = m.encoder.layer[1].output
        if which == "layernorm":
            new = _ScaledLayerNorm(32, eps=out.LayerNorm.eps)
            new.load_state_dict(out.LayerNorm.state_dict())
            out.LayerNorm = new
        else:
            new = _Int8Linear(out.dense.in_features, out.dense.out_features)
            new.load_state_dict(out.dense.state_dict())
            out.dense = new
    got, said = _call(fast, ids, mask)
    ref, _ = _call(hf, ids, mask)
    name = "LayerNorm: it is a" if which == "layernorm" else "dense: it is a"
    assert len(said) == 1 and f"encoder.layer.1.output.{name}" in said[0], said
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=0, atol=0)


def test_child_replaced_on_a_fused_layer_is_used_by_both_paths():
    """model.encoder.layer[0].intermediate = <a new BertIntermediate> after patching: the fused path
    reads the new module, and so does HF's code when a call falls back."""
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    torch.manual_seed(7)
    new = type(hf.encoder.layer[0].intermediate)(hf.config)
    for m in (fast, hf):
        m.encoder.layer[0].intermediate = copy.deepcopy(new)
    got, said = _call(fast, ids, mask)
    ref, _ = _call(hf, ids, mask)
    v = mask.bool()
    assert not said and _counts(fast) == (1, 0)
    torch.testing.assert_close(got[v], ref[v], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a fallback call (output_attentions) runs the replaced module too
        cfg_eager = fast.config._attn_implementation
        fast.set_attn_implementation("eager")
        hf.set_attn_implementation("eager")
        a = fast(ids, attention_mask=mask, output_attentions=True).last_hidden_state
        b = hf(ids, attention_mask=mask, output_attentions=True).last_hidden_state
        fast.set_attn_implementation(cfg_eager)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hf_output_capturing_hooks_keep_the_fused_path():
    """transformers installs inert output-capturing hooks on the layers the first time outputs are
    requested through them; later ordinary calls stay fused."""
    fast, hf = _pair()
    fast.set_attn_implementation("eager")
    ids, mask = M.inputs("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            fast(ids, attention_mask=mask, output_attentions=True)  # HF's code: installs its hooks
    _, said = _call(fast, ids, mask)
    assert not said and _counts(fast) == (1, 1)
    with torch.no_grad():
        out = fast(ids, attention_mask=mask, output_hidden_states=True)
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
    assert _counts(fast) == (2, 1) and len(out.hidden_states) == len(ref.hidden_states) == 3


def test_layer_list_entry_replaced_runs_hf_code():
    fast, _ = _pair()
    ids, mask = M.inputs("bert")
    state = fast.__dict__[_STATE]
    fast.encoder.layer[1] = state.originals[1]
    _, said = _call(fast, ids, mask)
    assert len(said) == 1 and "encoder.layer.1 was replaced after patching" in said[0]


def test_a_base_model_whose_forward_is_replaced_is_not_patched():
    """accelerate's hooks replace forward on the instance; patching would drop them."""
    model = M.base_model("bert")
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k)
    with pytest.warns(UserWarning, match="forward is already replaced"):
        fastbert.patch(model)
    assert not fastbert.hf.is_patched(model)


def test_patched_model_copies_rebuild_their_checks():
    fast, hf = _pair()
    ids, mask = M.inputs("bert")
    _call(fast, ids, mask)
    dup = copy.deepcopy(fast)
    dup.encoder.layer[0].output.dense.register_forward_hook(_scale_output)
    hf.encoder.layer[0].output.dense.register_forward_hook(_scale_output)
    got, said = _call(dup, ids, mask)
    ref, _ = _call(hf, ids, mask)
    assert len(said) == 1 and "output.dense has a forward hook" in said[0]
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=0, atol=0)
    _, said = _call(fast, ids, mask)
    assert not said, "the original has no hook"
