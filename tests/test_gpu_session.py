"""The GPU window's script, rehearsed on CPU: `tools/gpu_session.sh --dry-run window` runs the same
stages (changes, info, build, smoke, gpu-tests, sanitizer, headline) with CPU tensors at tiny sizes, so
the script's first run on a lent GPU is not its first run. The GPU-only parts (nvidia-smi, the
compute-sanitizer runs, CUDA graphs) are what it cannot rehearse: their tests skip, their rows are
recorded as skipped with the reason."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile

import pytest

from fastbert import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not backends.extension_status()[0], reason="fastbert._C is not built: the build stage would "
                    "compile it (minutes), which the rehearsal does not do")
def test_window_rehearsal_on_cpu(tmp_path):
    out = tmp_path / "out"
    # the stage limits fit a GPU; on a loaded 2-core CPU the headline stage alone took 300+ s (2026-12-02)
    env = dict(os.environ, OUT=str(out), PY=os.environ.get("PY", __import__("sys").executable), XDIST="0",
               HEADLINE_COMPILE="0", TAIL="5", WINDOW_S="1000", STAGE_TIMEOUT_headline="800")
    env.pop("TRITON_INTERPRET", None)  # the bench refuses the interpreter; the dry run uses the C++ backend
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_session.sh"), "--dry-run", "window"],
                       capture_output=True, text=True, env=env, timeout=1300, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    for stage in ("changes", "info", "build", "smoke", "gpu-tests", "sanitizer", "headline"):
        assert f"=== {stage} rc=0" in r.stdout, log[-6000:]
    # everything it wrote is in the one archive the device tool brings back
    (tgz,) = [p for p in out.iterdir() if p.name.startswith("logs-")]
    with tarfile.open(tgz) as t:
        names = t.getnames()
        rows = json.load(t.extractfile("./bench/results.json"))["rows"]
    assert "./headline.log" in names and "./changes.log" in names
    measured = {(r["provider"], r["name"]) for r in rows if r["status"] == "ok" and r.get("kind") == "model"}
    assert any(p == "fastbert" for p, _ in measured) and any(p == "hf-sdpa" for p, _ in measured), rows
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert any("CUDA graphs need a CUDA device" in (r.get("reason") or "") for r in skipped), skipped
    ops = {r["name"] for r in rows if r.get("kind") == "op" and r["status"] == "ok"}
    assert {"attention", "add_layer_norm", "bias_gelu"} <= ops, ops
