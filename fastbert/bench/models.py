"""Models (transformers configs with random weights, or a local checkpoint), workloads, FLOP counts.

Workloads
- grid: every sequence of the batch is `seq` tokens long (no padding).
- varlen: lengths L_i = clamp(round(seq * u_i), 1, seq) with u_i ~ Beta(3, 2), drawn from a numpy
  generator seeded by (batch, seq); Beta(3, 2) has mean 0.6 and sd 0.2, so lengths average 0.6 x seq,
  with a long tail of short sequences, roughly what tokenized sentence-pair / passage data looks like.
  The batch is right-padded to `seq` (HF's default), so padded providers pay for 40% padding that
  padding-free ones skip.

FLOPs (useful work: valid tokens only; a provider that computes padding gets no credit for it)
  per layer, hidden h, intermediate i: matmul weights 4 h^2 (Q, K, V, attention output) + 2 h i (FFN)
  forward  = 2 * L * (4 h^2 + 2 h i) * sum_b L_b            (every weight: one multiply-add per token)
           + 4 * L * h * sum_b L_b^2                         (q k^T and p v: 2 * L_b^2 * d per head each)
  train    = 3 x forward (backward = 2 x forward: grads w.r.t. activations and w.r.t. weights)
  Embeddings, LayerNorm, softmax, GELU and the optimizer step are not counted (no matmul FLOPs).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

import numpy as np
import torch

# name -> (hidden, layers, heads, intermediate); vocab/positions are BERT's (30522, 512)
CONFIGS: Dict[str, tuple] = {
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
    "minilm-l6": (384, 6, 12, 1536),   # all-MiniLM-L6-v2's shape
    "bert-tiny": (128, 2, 2, 512),     # smoke tests of the runner only; not in any default grid
}
ALIASES = {"minilm": "minilm-l6", "minilm-l6-v2": "minilm-l6", "bert-base-uncased": "bert-base",
           "bert-large-uncased": "bert-large"}

VARLEN_BETA = (3.0, 2.0)  # mean a / (a + b) = 0.6


def canonical(name: str) -> str:
    key = name.lower()
    return ALIASES.get(key, key)


def is_known(name: str) -> bool:
    return canonical(name) in CONFIGS


def make_config(name: str):
    from transformers import BertConfig

    h, layers, heads, inter = CONFIGS[canonical(name)]
    return BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, hidden_act="gelu")


def build_model(name_or_path: str, seed: int = 0):
    """(label, fp32 model in eval mode on CPU). A known name gets random weights from `seed` (no model
    hub); anything else is a local checkpoint directory loaded with AutoModel (local files only)."""
    if is_known(name_or_path):
        from transformers import BertModel

        torch.manual_seed(seed)
        model = BertModel(make_config(name_or_path), add_pooling_layer=False)
        label = canonical(name_or_path)
    else:
        from transformers import AutoModel

        if not os.path.isdir(name_or_path):
            raise ValueError(f"--model: {name_or_path!r} is neither a known config "
                             f"({', '.join(CONFIGS)}) nor a local checkpoint directory")
        model = AutoModel.from_pretrained(name_or_path, local_files_only=True, dtype=torch.float32)
        label = os.path.basename(os.path.normpath(name_or_path))
    return label, model.float().eval()


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int
    seq: int
    varlen: bool
    lengths: tuple

    @property
    def tokens(self) -> int:
        return int(sum(self.lengths))

    def label(self) -> str:
        return f"B{self.batch} S{self.seq}" + (" varlen" if self.varlen else "")


def varlen_lengths(batch: int, seq: int) -> List[int]:
    rng = np.random.default_rng([batch, seq])
    u = rng.beta(*VARLEN_BETA, size=batch)
    return [int(min(seq, max(1, round(seq * x)))) for x in u]


def workloads(batches, seqs, varlen: bool) -> List[Workload]:
    out = []
    for s in seqs:
        for b in batches:
            out.append(Workload(b, s, False, tuple([s] * b)))
            if varlen:
                out.append(Workload(b, s, True, tuple(varlen_lengths(b, s))))
    return out


def make_inputs(w: Workload, vocab: int, n_sets: int, device, seed: int = 0) -> List[dict]:
    """`n_sets` input dicts (input_ids, attention_mask) of the same lengths and different token ids."""
    g = torch.Generator().manual_seed(seed * 1000003 + w.batch * 1009 + w.seq)
    mask = torch.zeros(w.batch, w.seq, dtype=torch.long)
    for b, n in enumerate(w.lengths):
        mask[b, :n] = 1
    sets = []
    for _ in range(n_sets):
        ids = torch.randint(min(1000, vocab // 2), vocab, (w.batch, w.seq), generator=g) * mask  # pad id 0
        sets.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return sets


def dims(config) -> Optional[tuple]:
    """(hidden, layers, intermediate) of a BERT-like config, or None if it names them differently."""
    h = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    inter = getattr(config, "intermediate_size", None)
    if None in (h, layers, inter):
        return None
    return int(h), int(layers), int(inter)


def model_flops(config, w: Workload, mode: str) -> Optional[float]:
    d = dims(config)
    if d is None:
        return None
    h, layers, inter = d
    fwd = 2.0 * layers * (4 * h * h + 2 * h * inter) * w.tokens + 4.0 * layers * h * sum(n * n for n in w.lengths)
    return 3.0 * fwd if mode == "train" else fwd
