"""attn_implementation="fastbert" (fastbert/hf/attention.py) never drops an argument: it serves T5's
position_bias and HF's packed-sequence arguments, hands anything else to HF's sdpa with one warning,
and gives 0 (not NaN) on rows that see no key, whatever the head dim."""
import copy
import warnings

import pytest
import torch

import fastbert.hf  # noqa: F401  (registers "fastbert")
from fastbert import reference
from fastbert.hf import attention as A
from fastbert.testing import assert_no_worse

transformers = pytest.importorskip("transformers")


def _with_impl(model, impl):
    m = copy.deepcopy(model)
    m.set_attn_implementation(impl)
    return m.eval()


def test_t5_position_bias_is_served():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=48,
                                relative_attention_num_buckets=8, dropout_rate=0.0)
    model = transformers.T5EncoderModel(cfg).eval()
    mine, sdpa, ref64 = _with_impl(model, "fastbert"), _with_impl(model, "sdpa"), _with_impl(model, "sdpa").double()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hand-off: position_bias is served
        with torch.no_grad():
            outs = [m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (mine, sdpa, ref64)]
    assert_no_worse("T5 encoder", *outs, k=3, valid=mask.bool()[..., None])
    plain = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert plain.abs().max() > 0, "the relative bias must matter (or the test proves nothing)"


def test_gpt2_left_padding_small_head_dim_is_finite():
    """Head dim 8 runs on the torch backend; left padding leaves the padding rows with no visible key
    (causal + padding): they give 0 there instead of NaN, and the real tokens match HF's sdpa."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(cfg).eval()
    mine, sdpa, ref64 = _with_impl(model, "fastbert"), _with_impl(model, "sdpa"), _with_impl(model, "sdpa").double()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        outs = [m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (mine, sdpa, ref64)]
    assert torch.isfinite(outs[0]).all()
    assert_no_worse("GPT-2 left padded", *outs, k=3, valid=mask.bool()[..., None])


def _qkv(B=1, H=2, S=10, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g) for _ in range(3)]


def test_unknown_argument_goes_to_hf_sdpa_with_one_warning():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = _qkv(B=2)
    A._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a, _ = A.fastbert_attention_forward(module, q, k, v, None, scaling=0.25, a_new_hf_argument=3)
        A.fastbert_attention_forward(module, q, k, v, None, scaling=0.25, a_new_hf_argument=4)
    said = [str(x.message) for x in w if "fastbert" in str(x.message)]
    assert len(said) == 1 and "'a_new_hf_argument'" in said[0] and "sdpa" in said[0]
    b, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, a_new_hf_argument=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences_attend_each_to_itself(causal):
    """HF's padding-free collator: q/k/v [1, H, total, D] with cu_seq_lens_q/k and no mask."""
    module = torch.nn.Module()
    module.is_causal = causal
    q, k, v = _qkv(S=10)
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = A.fastbert_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                              max_length_q=5, max_length_k=5, position_ids=torch.arange(10)[None])
    assert out.shape == (1, 10, 2, 16)
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = slice(s0, s1)
        args = [t[:, :, sl].transpose(1, 2) for t in (q, k, v)]
        ref64 = reference.attention(*[t.double() for t in args], causal=causal)
        ref32 = reference.attention(*args, causal=causal)
        assert_no_worse(f"sequence {s0}:{s1}", out[:, sl], ref32, ref64)


def test_sliding_window_and_neutral_arguments_need_no_hand_off():
    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = _qkv(B=2)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()  # the mask already carries any window
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, _ = A.fastbert_attention_forward(module, q, k, v, mask, sliding_window=4, output_attentions=False,
                                            num_items_in_batch=torch.tensor(3))
    b, _ = A.fastbert_attention_forward(module, q, k, v, mask)
    assert torch.equal(a, b)
