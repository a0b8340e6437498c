"""Tiny random-weight configs of every patched architecture, and the float64 comparison used by the
patching tests (docs/design.md's rule, k = 3 for whole models, over valid positions)."""
import copy

import torch

from fastbert.testing import K_MODEL, assert_no_worse

VOCAB = 100
# head dim 16: the smallest the C++/Triton attention kernels take (smaller runs on the torch backend)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def config(arch: str, **over):
    import transformers as T

    if arch == "bert":
        c = T.BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **SMALL)
    elif arch == "roberta":
        c = T.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, **SMALL)
    elif arch == "xlm-roberta":
        c = T.XLMRobertaConfig(vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, hidden_act="gelu_new",
                               **SMALL)
    elif arch == "camembert":
        c = T.CamembertConfig(vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, hidden_act="relu",
                              **SMALL)
    elif arch == "electra":
        # embedding_size != hidden_size exercises embeddings_project
        c = T.ElectraConfig(vocab_size=VOCAB, max_position_embeddings=32, embedding_size=16,
                            hidden_act="gelu_pytorch_tanh", **SMALL)
    elif arch == "distilbert":
        c = T.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=32, dim=32, n_layers=2, n_heads=2,
                               hidden_dim=64)
    elif arch == "flaubert":
        c = T.FlaubertConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32,
                             gelu_activation=True, pad_index=2)
    elif arch == "xlm":
        c = T.XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=32,
                        gelu_activation=False, pad_index=2, n_langs=2, use_lang_emb=True)
    else:
        raise KeyError(arch)
    for k, v in over.items():
        setattr(c, k, v)
    return c


BASE = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
        "camembert": "CamembertModel", "electra": "ElectraModel", "distilbert": "DistilBertModel",
        "flaubert": "FlaubertModel", "xlm": "XLMModel"}
ARCHS = list(BASE)


def base_model(arch: str, **over):
    import transformers as T

    torch.manual_seed(0)
    return getattr(T, BASE[arch])(config(arch, **over)).eval()


def inputs(arch: str, batch=3, seq=7, pad_rows=((1, 4),), empty_row=None, seed=1):
    """input_ids (tokens >= 3, so never a pad id) and a right-padded attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, start in pad_rows:
        mask[row, start:] = 0
    if empty_row is not None:
        mask[empty_row] = 0
    pad_id = {"roberta": 1, "xlm-roberta": 1, "camembert": 1, "flaubert": 2, "xlm": 2}.get(arch, 0)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask


def run(model, ids, mask, weight, valid, **kw):
    """Forward, then backward of a fixed random projection of the valid outputs; returns
    (last_hidden_state, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    h = out.last_hidden_state
    loss = (h * weight.to(h.dtype))[valid].sum()
    loss.backward()
    return h.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def triplet(model):
    """(hf fp32, ref64, a copy to patch) of one model."""
    return copy.deepcopy(model), copy.deepcopy(model).double(), copy.deepcopy(model)


def assert_model_no_worse(fast, hf32, ref64, ids, mask, *, k=K_MODEL, **kw):
    valid = mask.bool()
    torch.manual_seed(5)
    H = ref64.config.hidden_size if hasattr(ref64.config, "hidden_size") else ref64.config.dim
    weight = torch.randn(*ids.shape, H, dtype=torch.float64).to(ids.device)
    o_f, g_f = run(fast, ids, mask, weight, valid, **kw)
    o_h, g_h = run(hf32, ids, mask, weight, valid, **kw)
    o_r, g_r = run(ref64, ids, mask, weight, valid, **kw)
    assert torch.isfinite(o_f).all()
    assert_no_worse("last_hidden_state", o_f, o_h, o_r, k=k, valid=valid[..., None])
    assert set(g_f) == set(g_r), set(g_f) ^ set(g_r)
    for n in g_r:
        assert_no_worse(f"grad {n}", g_f[n], g_h[n], g_r[n], k=k)
    return o_f, g_f


def classification_rows(n=8, seq=7):
    """A tiny sequence-classification dataset (rows of token lists, lengths 2 .. seq), for the Trainer."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        length = 2 + i % (seq - 1)
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": i % 2})
    return rows


def collate(rows):
    """Right-pads classification_rows into a batch."""
    seq = max(len(r["input_ids"]) for r in rows)
    pad = lambda x: x + [0] * (seq - len(x))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"]) for r in rows]),
            "attention_mask": torch.tensor([pad(r["attention_mask"]) for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows])}
