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
