"""One rank of the scale-out tests (tests/distributed/test_scale_out.py runs it under torchrun, 2 processes).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/worker.py OUT SCENARIO...

Each scenario runs on every rank and writes OUT/<scenario>.rank<r>.pt: {"error": traceback or None,
"fused": [(fused calls, calls on HF's code) per patched model], "compare": [(name, fast, hf32, ref64)],
"equal": [(name, a, b)]}; the test asserts on them (model rule, k = 3). A failing scenario records its
error and the next one runs; a collective that hangs ends at the process group's timeout.
The same code runs on NCCL (one GPU per rank) where CUDA is available.
"""
import copy
import datetime
import os
import re
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import fastbert  # noqa: E402
from tests.hf import models as M  # noqa: E402

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
STEPS = 3
LR = 0.5
BATCH = 8  # global batch: BATCH // world rows per rank


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _data():
    ids, mask = M.inputs("bert", batch=BATCH, seq=7, pad_rows=((1, 4), (2, 6), (5, 2), (6, 5)))
    labels = torch.arange(BATCH) % 2
    return ids, mask, labels


def _shard(t):
    r, w = dist.get_rank(), dist.get_world_size()
    n = t.shape[0] // w
    return t[r * n:(r + 1) * n]


def _classifier():
    import transformers as T

    torch.manual_seed(0)
    return T.BertForSequenceClassification(M.config("bert", **NO_DROPOUT))


def _fused_calls(model):
    return [tuple(int(x) for x in m.groups())
            for m in re.finditer(r"(\d+) fused call\(s\), (\d+) call\(s\) on HF's code", fastbert.explain(model))]


def _train(model, ids, mask, labels, steps=STEPS):
    """SGD on a mean loss: on each rank's shard under DDP/FSDP (their gradient averaging makes it the
    mean over the global batch), or on the whole batch in one process."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _one_process_refs(model, ids, mask, labels):
    """HF fp32 and float64 trained on the whole batch in one process (no process group)."""
    hf32, ref64 = copy.deepcopy(model), copy.deepcopy(model).double()
    _train(hf32, ids, mask, labels)
    _train(ref64, ids, mask, labels)
    return dict(hf32.named_parameters()), dict(ref64.named_parameters())


def _param_rows(params, p32, p64):
    return [(f"param {n}", p.detach().cpu(), p32[n].detach().cpu(), p64[n].detach().cpu()) for n, p in params]


@torch.no_grad()
def _logits(model, ids, mask):
    model.eval()
    return model(input_ids=ids, attention_mask=mask).logits.detach().cpu()


# ----------------------------------------------------------------------------------------------
# scenarios: each returns its result dict (compare / equal / fused)
# ----------------------------------------------------------------------------------------------
def ddp(patch_after: bool):
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = _device()
    ids, mask, labels = _data()
    model = _classifier()
    p32, p64 = _one_process_refs(model, ids, mask, labels)
    res = {"compare": [], "equal": []}
    fast = model.to(dev)
    if not patch_after:
        fastbert.patch(fast)
        if dist.get_rank() == 1:
            # a rank whose weights differ before wrapping, with the fused weight caches filled from them:
            # DDP's broadcast of rank 0's weights must reach the fused path (no stale cached copy)
            with torch.no_grad():
                for p in fast.parameters():
                    p.mul_(1.5)
        _logits(fast, ids.to(dev), mask.to(dev))
    wrapped = DDP(fast, device_ids=[dev.index] if dev.type == "cuda" else None)
    if patch_after:
        fastbert.patch(wrapped)
    # after DDP's broadcast every rank runs rank 0's weights: the same eval logits on every rank
    before = _logits(wrapped, ids.to(dev), mask.to(dev))
    gathered = [torch.empty_like(before.to(dev)) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, before.to(dev))
    res["equal"] += [(f"eval logits of rank {r} and rank 0 after wrapping", gathered[r].cpu(), gathered[0].cpu())
                     for r in range(1, len(gathered))]
    _train(wrapped, _shard(ids).to(dev), _shard(mask).to(dev), _shard(labels).to(dev))
    res["compare"] += _param_rows(fast.named_parameters(), p32, p64)
    res["fused"] = _fused_calls(fast)
    return res


def fsdp():
    from torch.distributed.fsdp import fully_shard

    dev = _device()
    ids, mask, labels = _data()
    model = _classifier()
    p32, p64 = _one_process_refs(model, ids, mask, labels)
    fresh = copy.deepcopy(model)
    res = {"compare": [], "equal": []}
    rows = [t.to(dev) for t in (_shard(ids), _shard(mask), _shard(labels))]

    def shard(m):
        fastbert.patch(m)
        for layer in m.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(m)
        return m

    def evaluate(m):
        out = _logits(m, ids.to(dev), mask.to(dev))
        m.reshard()  # FSDP2 keeps the root's parameters gathered after a no_grad forward: free them
        return out

    fast = shard(model.to(dev))
    packs = _count_packs()
    _train(fast, *rows, steps=1)
    evaluate(fast)  # between optimizer steps: any weight cache would fill here
    _train(fast, *rows, steps=STEPS - 1)
    full = {n: p.full_tensor() for n, p in fast.named_parameters()}  # collective: every rank
    res["compare"] += _param_rows(full.items(), p32, p64)
    # eval after training runs the trained weights, re-gathered from the shards, never a stale copy
    hf_after = model_cpu_state(full, fresh)
    after = evaluate(fast)
    res["compare"].append(("eval logits after training", after, _logits(hf_after, ids, mask),
                           _logits(hf_after.double(), ids, mask)))

    # sharded checkpoint round trip (torch.distributed.checkpoint): a second sharded model, its caches
    # filled from other weights, loads the shards and then runs what the first one runs
    import torch.distributed.checkpoint as dcp

    path = os.environ["FASTBERT_DIST_TMP"] + "/dcp"
    dcp.save({"model": fast.state_dict()}, checkpoint_id=path)
    other = shard(fresh.to(dev))
    evaluate(other)
    state = {"model": other.state_dict()}
    dcp.load(state, checkpoint_id=path)
    other.load_state_dict(state["model"])
    res["equal"].append(("eval logits after a sharded save / load", evaluate(other), after))
    try:  # a call that needs HF's code cannot run it: HF's layers are not what fully_shard wrapped
        other(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_attentions=True)
        res["fallback"] = None
    except RuntimeError as e:
        res["fallback"] = str(e)
    try:
        fastbert.unpatch(other)
        res["unpatch"] = None
    except RuntimeError as e:
        res["unpatch"] = str(e)
    res["fused"] = _fused_calls(fast) + _fused_calls(other)
    res["packed_calls"] = packs[0]  # fully_shard's hooks on the twins keep the padding-free layout
    return res


def _count_packs():
    """A counter of padding-free packings (fastbert.nn.padding.pack calls) from now on."""
    from fastbert.nn import padding

    count, pack = [0], padding.pack

    def counting(*a, **kw):
        count[0] += 1
        return pack(*a, **kw)

    padding.pack = counting
    return count


def model_cpu_state(full, template):
    """An unpatched HF copy of `template` holding the (gathered) parameters `full`."""
    m = copy.deepcopy(template).cpu()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(full[n].detach().cpu())
    return m


def fsdp_patch_after():
    from torch.distributed.fsdp import fully_shard

    model = _classifier().to(_device())
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    try:
        fastbert.patch(model)
    except Exception as e:  # the test checks the type and the message
        return {"raised": f"{type(e).__name__}: {e}"}
    return {"raised": None}


def _triplet():
    """(to patch, HF fp32, HF float64) copies of one classifier."""
    model = _classifier()
    return fastbert.patch(copy.deepcopy(model)), copy.deepcopy(model), copy.deepcopy(model).double()


def trainer():
    """The HF Trainer on 2 processes (DDP through accelerate, as under torchrun): the patched model trains
    like HF on the same data shards, and every rank's steps run the fused path."""
    import transformers as T

    models = _triplet()
    res = {"wrapped": []}
    for i, m in enumerate(models):
        args = T.TrainingArguments(
            output_dir=os.path.join(os.environ["FASTBERT_DIST_TMP"], f"trainer{i}"), max_steps=2,
            per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=not torch.cuda.is_available(),
            save_strategy="no", logging_strategy="no", seed=0, data_seed=0, dataloader_num_workers=0,
            disable_tqdm=True, ddp_backend="nccl" if torch.cuda.is_available() else "gloo")
        t = T.Trainer(model=m, args=args, train_dataset=M.classification_rows(), data_collator=M.collate)
        t.train()
        res["wrapped"].append(type(t.model_wrapped).__name__)
    res["compare"] = _param_rows(models[0].named_parameters(), dict(models[1].named_parameters()),
                                 dict(models[2].named_parameters()))
    res["fused"] = _fused_calls(models[0])
    return res


def accelerate_loop():
    """A plain Accelerate training loop (Accelerator.prepare, accelerator.backward) on 2 processes."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    models = _triplet()
    for m in models:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(M.classification_rows(), batch_size=2, collate_fn=M.collate)
        opt = torch.optim.SGD(m.parameters(), lr=LR)
        pm, opt, loader = acc.prepare(m, opt, loader)
        pm.train()
        for batch in loader:
            acc.backward(pm(**batch).loss)
            opt.step()
            opt.zero_grad()
    res = {"wrapped": [type(pm).__name__, str(acc.distributed_type), acc.num_processes]}
    res["compare"] = _param_rows(models[0].named_parameters(), dict(models[1].named_parameters()),
                                 dict(models[2].named_parameters()))
    res["fused"] = _fused_calls(models[0])
    return res


SCENARIOS = {
    "ddp": lambda: ddp(patch_after=False),
    "ddp_patch_after": lambda: ddp(patch_after=True),
    "fsdp": fsdp,
    "fsdp_patch_after": fsdp_patch_after,
    "trainer": trainer,
    "accelerate": accelerate_loop,
}


def main(out: str, names):
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
    rank = dist.get_rank()
    with tempfile.TemporaryDirectory() as tmp:
        # one directory all ranks share (the sharded checkpoint): rank 0's
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        os.environ["FASTBERT_DIST_TMP"] = shared[0]
        for name in names:
            try:
                res = SCENARIOS[name]()
                res["error"] = None
            except Exception:
                res = {"error": traceback.format_exc()}
            torch.save(res, os.path.join(out, f"{name}.rank{rank}.pt"))
            dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(SCENARIOS))
