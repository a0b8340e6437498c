"""Embed a text file on several processes (one per GPU, or CPU processes) with a patched model.

    torchrun --nproc_per_node 4 examples/embed_sharded.py MODEL texts.txt embeddings.pt [--batch-size 64]

MODEL is anything AutoModel / AutoTokenizer load (a hub name or a local directory). Each rank takes every
world-th line (rank, rank + world, ...), so the shares differ by at most one line; it embeds its share
(mean pooling over the real tokens, as sentence-transformers' MiniLM/MPNet models do), and rank 0
gathers the shares back into input order and saves a [lines, hidden] float32 tensor.
tests/distributed/test_scale_out.py runs this script on 2 CPU processes against one process.
"""
import argparse
import os

import torch
import torch.distributed as dist

import fastbert


def shard(items, rank: int, world: int):
    """This rank's share: every world-th item, starting at `rank`."""
    return items[rank::world]


@torch.inference_mode()
def embed(model, tokenizer, texts, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states, one row per text, on the model's device and dtype."""
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt").to(device)
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        rows.append((h * m).sum(1) / m.sum(1).clamp(min=1))
    if not rows:
        p = next(model.parameters())
        return torch.empty(0, model.config.hidden_size, dtype=p.dtype, device=device)
    return torch.cat(rows)


def gather(local: torch.Tensor, n: int, rank: int, world: int):
    """On rank 0: the [n, hidden] embeddings of all ranks in input order (None on the others)."""
    parts = [None] * world if rank == 0 else None
    dist.gather_object(local.cpu(), parts, dst=0)
    if rank != 0:
        return None
    out = torch.empty(n, local.shape[-1], dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("texts", help="a text file, one input per line")
    ap.add_argument("out", help="where rank 0 saves the [lines, hidden] embeddings (torch.save)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    from transformers import AutoModel, AutoTokenizer

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).to("cuda" if cuda else "cpu").eval()
    fastbert.patch(model)
    with open(args.texts, encoding="utf-8") as f:
        texts = f.read().splitlines()
    local = embed(model, tokenizer, shard(texts, rank, world), args.batch_size)
    full = gather(local.float(), len(texts), rank, world)
    if rank == 0:
        torch.save(full, args.out)
        print(f"embedded {len(texts)} lines on {world} process(es): {tuple(full.shape)} -> {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
