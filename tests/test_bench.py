"""The benchmark runner (python -m fastbert.bench) end to end on a tiny grid, and its pure helpers.

The end-to-end run uses the `bert-tiny` config (hidden 128, 2 layers) at S = 16 so that it finishes
in seconds on 2 CPU cores; it checks the results.json schema, that results.md and the PNG plots are
written, that every provider that cannot run here is a row with status "skipped" and a reason, and
that measured rows carry sane figures (including the error against HF fp32).
"""
import json
import math
import os

import pytest
import torch

from fastbert.bench import models as M
from fastbert.bench import providers as P
from fastbert.bench import report as R
from fastbert.bench import timing
from fastbert.bench.__main__ import main

ISSUE_ENV_KEYS = {"device", "device_kind", "torch", "triton", "transformers", "fastbert", "commit"}
ISSUE_ROW_KEYS = {"kind", "name", "provider", "mode", "dtype", "batch", "seq", "varlen", "median_ms", "p20_ms",
                  "p80_ms", "tokens_per_s", "tflops", "pct_peak", "gbps", "pct_bw", "max_abs_err", "peak_mem_mb"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --threads 1: on a busy 2-core machine OpenMP barriers make a tiny model's timings (and this
    # test's run time) balloon; the figures are not what is tested here. main() sets the thread count
    # for the process, so put it back afterwards.
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--device", "cpu", "--threads", "1", "--models", "bert-tiny", "--batch", "2",
                   "--seq", "16",
                   "--providers", "hf-eager,hf-sdpa,hf-sdpa-compile,fastbert,fastbert-triton",
                   "--ops", "add_layer_norm,attention", "--op-model", "bert-tiny", "--op-batch", "1",
                   "--op-seq", "16", "--op-modes", "fwd,bwd,fwd+bwd", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out / "results.json") as f:
        data = json.load(f)
    return out, data


def test_results_json_schema(quick_run):
    _, data = quick_run
    assert set(data) == {"env", "rows"}
    env = data["env"]
    assert ISSUE_ENV_KEYS <= set(env)
    # a CPU run fixes glibc's malloc thresholds (fastbert.bench.environment.steady_cpu_allocator)
    assert env["device_kind"] == "cpu" and env["cpu_allocator"].startswith("glibc mallopt"), env["cpu_allocator"]
    assert env["interleaved"] is True
    assert env["device_kind"] == "cpu"
    assert env["torch"] == torch.__version__
    assert env["peak_tflops"]["float32"] > 0 and env["bw_gbps"] > 0
    assert env["command"].startswith("python -m fastbert.bench --quick")
    rows = data["rows"]
    assert rows
    for r in rows:
        # exactly the issue's keys, plus status and the reason a row was not measured
        assert set(r) == ISSUE_ROW_KEYS | {"status", "reason"}, r
        assert r["kind"] in ("model", "op")
        assert r["status"] in R.STATUSES
        assert r["mode"] in ("infer", "train", "fwd", "bwd", "fwd+bwd")
    kinds = {(r["kind"], r["name"]) for r in rows}
    assert kinds == {("model", "bert-tiny"), ("op", "add_layer_norm"), ("op", "attention")}


def test_measured_rows_are_sane(quick_run):
    _, data = quick_run
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    providers = {(r["kind"], r["provider"], r["varlen"]) for r in ok}
    # the HF baselines run everywhere, on the grid shape and on the varlen workload
    for p in ("hf-eager", "hf-sdpa"):
        assert ("model", p, False) in providers and ("model", p, True) in providers
    assert ("op", "torch-add+layer_norm", False) in providers
    assert ("op", "torch-sdpa-math", True) in providers
    assert {r["mode"] for r in ok if r["kind"] == "op"} == {"fwd", "bwd", "fwd+bwd"}
    for r in ok:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["reason"] is None
        assert math.isfinite(r["max_abs_err"])
        assert r["max_abs_err"] < 1e-4, r  # fp32 against an fp32/fp64 reference: rounding level
        assert r["peak_mem_mb"] is None  # CPU: no allocator statistics
        if r["kind"] == "model":
            assert r["tflops"] > 0 and r["pct_peak"] > 0 and r["gbps"] is None
            assert r["dtype"] == "float32" and r["mode"] == "infer" and r["batch"] == 2 and r["seq"] == 16
    # hf-eager is the yardstick itself
    assert all(r["max_abs_err"] == 0.0 for r in ok if r["provider"] == "hf-eager")
    # varlen rows count only valid tokens: fewer tokens/s-worth of work than the grid shape
    lengths = M.varlen_lengths(2, 16)
    assert sum(lengths) < 32
    # memory-bound op: GB/s, no TFLOP/s
    ln = [r for r in ok if r["name"] == "add_layer_norm"]
    assert ln and all(r["gbps"] > 0 and r["tflops"] is None for r in ln)


def test_skipped_providers_carry_reason(quick_run):
    _, data = quick_run
    not_ok = [r for r in data["rows"] if r["status"] != "ok"]
    assert not_ok
    for r in not_ok:
        assert isinstance(r["reason"], str) and r["reason"].strip(), r
        assert r["median_ms"] is None and r["max_abs_err"] is None
    by_provider = {(r["kind"], r["provider"]): r for r in not_ok}
    assert "interpreter is not a benchmark" in by_provider[("model", "fastbert-triton")]["reason"]
    assert by_provider[("model", "hf-sdpa-compile")]["status"] == "skipped"
    assert "--quick" in by_provider[("model", "hf-sdpa-compile")]["reason"]
    assert "interpreter is not a benchmark" in by_provider[("op", "fastbert-triton")]["reason"]
    assert "CUDA device" in by_provider[("op", "fastbert-cuda")]["reason"]


def test_markdown_and_plots_written(quick_run):
    out, data = quick_run
    md = (out / "results.md").read_text()
    assert "## model bert-tiny, float32, infer" in md
    assert "## Not run" in md and "fastbert-triton" in md
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert "speedup_bert-tiny_float32_infer.png" in pngs
    assert "latency_bert-tiny_float32_infer.png" in pngs
    assert "roofline_add_layer_norm_float32_fwd.png" in pngs
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p})" in md


def test_append_adds_rows_and_keeps_limits(quick_run, tmp_path, monkeypatch):
    import shutil

    from fastbert.bench import environment

    src, data = quick_run
    # others may commit to the checkout while the suite runs: pin the commit the first run saw
    monkeypatch.setattr(environment, "_commit", lambda: data["env"]["commit"])
    out = tmp_path / "appended"
    shutil.copytree(src, out)
    threads = torch.get_num_threads()
    try:
        rc = main(["--append", "--device", "cpu", "--threads", "1", "--no-models", "--ops", "bias_gelu",
                   "--op-model", "bert-tiny", "--op-batch", "1", "--op-seq", "8", "--quick", "--no-plots",
                   "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out / "results.json") as f:
        new = json.load(f)
    assert new["rows"][:len(data["rows"])] == data["rows"]
    added = new["rows"][len(data["rows"]):]
    assert added and {r["name"] for r in added} == {"bias_gelu"}
    # the same case run again replaces its row instead of adding a duplicate
    rc = main(["--append", "--device", "cpu", "--threads", "1", "--no-models", "--ops", "bias_gelu",
               "--op-model", "bert-tiny", "--op-batch", "1", "--op-seq", "8", "--quick", "--no-plots",
               "--out", str(out)])
    torch.set_num_threads(threads)
    with open(out / "results.json") as f:
        again = json.load(f)
    assert len(again["rows"]) == len(new["rows"])
    assert len(again["env"]["appended_commands"]) == 2
    assert new["env"]["peak_tflops"] == data["env"]["peak_tflops"]  # limits measured once
    assert new["env"]["command"] == data["env"]["command"]
    assert new["env"]["appended_commands"][0].startswith("python -m fastbert.bench --append")
    assert "then, appended:" in (out / "results.md").read_text()
    # rows of another commit (or device, versions, threads) do not mix into one folder
    monkeypatch.setattr(environment, "_commit", lambda: "another-commit")
    with pytest.raises(SystemExit, match="commit"):
        main(["--append", "--device", "cpu", "--threads", str(data["env"]["cpu_threads"]), "--no-models",
              "--ops", "bias_gelu", "--out", str(out)])


@pytest.mark.gpu
def test_quick_run_on_gpu(tmp_path):
    """The CUDA paths: limits per dtype, CUDA-event timing, peak memory, training steps, the CUDA
    graph variant, Triton and SDPA op providers (not runnable on a CPU-only machine)."""
    rc = main(["--quick", "--device", "cuda", "--models", "bert-tiny", "--batch", "2", "--seq", "64",
               "--dtypes", "bfloat16", "--modes", "infer,train",
               "--providers", "hf-sdpa,hf-sdpa-compile,fastbert,fastbert-triton,fastbert-triton-padded,"
               "fastbert-triton-cudagraph",
               "--ops", "attention,add_layer_norm", "--op-model", "bert-tiny", "--op-batch", "2",
               "--op-seq", "64", "--op-modes", "fwd,bwd,fwd+bwd", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    env = data["env"]
    assert env["device_kind"] == "cuda"
    assert set(env["peak_tflops"]) == {"bfloat16", "float16", "float32"}
    rows = {(r["kind"], r["name"], r["provider"], r["mode"], r["varlen"]): r for r in data["rows"]}
    for prov in ("hf-sdpa", "fastbert", "fastbert-triton", "fastbert-triton-padded"):
        for mode in ("infer", "train"):
            for varlen in (False, True):
                r = rows[("model", "bert-tiny", prov, mode, varlen)]
                assert r["status"] == "ok", r
                assert r["peak_mem_mb"] > 0 and r["tflops"] > 0 and r["max_abs_err"] < 0.5
    assert rows[("model", "bert-tiny", "fastbert-triton-cudagraph", "infer", False)]["status"] == "ok"
    train_graph = rows[("model", "bert-tiny", "fastbert-triton-cudagraph", "train", False)]
    assert train_graph["status"] == "skipped" and "inference only" in train_graph["reason"]
    for prov in ("fastbert-triton", "fastbert-triton-packed", "torch-sdpa-math"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert rows[("op", "attention", prov, mode, True)]["status"] == "ok"
    assert rows[("op", "attention", "torch-sdpa-flash", "fwd", True)]["status"] == "skipped"  # no masks


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------
def test_varlen_distribution_mean_is_0_6_of_max():
    lengths = M.varlen_lengths(4000, 512)
    assert all(1 <= n <= 512 for n in lengths)
    assert abs(sum(lengths) / len(lengths) / 512 - 0.6) < 0.01
    assert M.varlen_lengths(8, 128) == M.varlen_lengths(8, 128)  # seeded: same workload every run


def test_model_flops_formula():
    cfg = M.make_config("bert-base")
    w = M.Workload(2, 128, False, (128, 128))
    per_layer_params = 4 * 768 * 768 + 2 * 768 * 3072
    fwd = 2 * 12 * per_layer_params * 256 + 4 * 12 * 768 * (2 * 128 * 128)
    assert M.model_flops(cfg, w, "infer") == fwd
    assert M.model_flops(cfg, w, "train") == 3 * fwd


def test_provider_names_parse():
    for dev in ("cpu", "cuda"):
        for name in P.model_provider_names(dev):
            assert P.parse(name).name == name
    assert P.parse("fastbert-triton-cudagraph").padding_free is False
    assert P.parse("fastbert").backend is None and P.parse("fastbert").padding_free
    with pytest.raises(ValueError, match="provider"):
        P.parse("fastbert-tpu")


def test_timing_summary_and_rotation():
    t = timing.summarize([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.p20_ms, t.median_ms, t.p80_ms, t.reps) == (1.8, 3.0, 4.2, 5)
    calls = []
    res = timing.bench(lambda i: calls.append(i), 3, torch.device("cpu"), quick=True)
    assert res.reps >= timing.SETTINGS[("cpu", True)].min_reps
    assert set(calls) == {0, 1, 2}  # every input set is used
    assert timing.rotation_count(10**9, torch.device("cpu")) == 2
    assert timing.rotation_count(1, torch.device("cpu")) == 8


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(SystemExit):
        main(["--batch", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--dtypes"):
        main(["--device", "cpu", "--dtypes", "float8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--providers"):
        main(["--device", "cpu", "--providers", "hf-sdpa,fastbert-tpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--ops"):
        main(["--device", "cpu", "--ops", "softmax", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--modes"):
        main(["--device", "cpu", "--modes", "serve", "--out", str(tmp_path)])


def test_rows_are_checkpointed_while_the_run_goes():
    # a run stopped by a time limit keeps what it measured: rows are saved as they come
    from fastbert.bench.rows import CheckpointedRows

    saved = []
    rows = CheckpointedRows(lambda done: saved.append(list(done)), every_s=0.0)
    rows.append({"a": 1})
    rows.append({"a": 2})
    assert saved == [[{"a": 1}], [{"a": 1}, {"a": 2}]]
    assert list(rows) == [{"a": 1}, {"a": 2}]


def test_sequential_timing_path(tmp_path, monkeypatch):
    """GPU runs time providers one after another (opbench.run_case, model_runs._time); CPU runs
    interleave them. Run the sequential path here, on CPU, so a GPU session never meets it first."""
    assert timing.interleave(torch.device("cpu")) and not timing.interleave(torch.device("meta"))
    monkeypatch.setattr(timing, "INTERLEAVE_CPU", False)
    out = tmp_path / "sequential"
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--device", "cpu", "--threads", "1", "--models", "bert-tiny", "--batch", "1",
                   "--seq", "8", "--no-varlen", "--providers", "hf-eager,fastbert", "--modes", "infer,train",
                   "--ops", "add_layer_norm", "--op-model", "bert-tiny", "--op-batch", "1", "--op-seq", "8",
                   "--op-modes", "fwd,bwd,fwd+bwd", "--no-plots", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out / "results.json") as f:
        data = json.load(f)
    assert data["env"]["interleaved"] is False
    rows = {(r["kind"], r["provider"], r["mode"]): r for r in data["rows"]}
    for prov in ("hf-eager", "fastbert"):
        for mode in ("infer", "train"):
            assert rows[("model", prov, mode)]["status"] == "ok", rows[("model", prov, mode)]
    for prov in ("fastbert-cpu", "torch-add+layer_norm"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            r = rows[("op", prov, mode)]
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["max_abs_err"] < 1e-4, r


# ----------------------------------------------------------------------------------------------
# peer providers (onnxruntime, openvino): the optional `peers` extra
# ----------------------------------------------------------------------------------------------
PEER_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino",)}
# the peer runs skip measuring the machine's limits (a second or two on a busy 2-core machine; quick_run
# tests them)
FIXED_LIMITS = {"peak_tflops": {"float32": 1.0}, "bw_gbps": 10.0, "limits_method": "fixed by the test"}


@pytest.fixture(scope="module", params=sorted(PEER_PACKAGES))
def peer_run(request, tmp_path_factory):
    """One CPU run of bert-tiny (B2 S8 and its varlen workload) with one peer next to hf-sdpa, in the
    same interleaved rounds; skipped where the peer's packages are not installed (the peers extra)."""
    from fastbert.bench import limits

    peer = request.param
    for pkg in PEER_PACKAGES[peer]:
        pytest.importorskip(pkg)
    out = tmp_path_factory.mktemp(f"bench-{peer}")
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(limits, "measure", lambda device, quick=False: dict(FIXED_LIMITS))
            rc = main(["--quick", "--device", "cpu", "--threads", "1", "--models", "bert-tiny", "--batch", "2",
                       "--seq", "8", "--providers", f"hf-sdpa,{peer}", "--ops", "none", "--no-plots",
                       "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(out / "results.json") as f:
        return peer, out, json.load(f)


def test_peer_rows_have_fp32_error(peer_run):
    peer, out, data = peer_run
    rows = [r for r in data["rows"] if r["provider"] == peer]
    assert {r["varlen"] for r in rows} == {False, True}  # the grid shape and the (padded) varlen workload
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["reason"] is None
        assert r["max_abs_err"] < 1e-5, r  # against HF fp32 on the same weights and inputs: rounding level
    info = data["env"]["peer_builds"][f"bert-tiny float32 {peer}"]
    assert info["fully_fused"], info  # bert-tiny has 2 layers
    if peer == "onnxruntime":
        assert info["fused_ops"]["Attention"] == 2 and info["fused_ops"]["EmbedLayerNormalization"] == 1, info
        assert info["fused_ops"]["SkipLayerNormalization"] == 4 and info["fused_ops"]["BiasGelu"] == 2, info
        assert "intra-op threads 1" in info["session"]  # --threads 1: torch.get_num_threads()
    else:
        assert "INFERENCE_PRECISION_HINT f32" in info["compile"] and "INFERENCE_NUM_THREADS 1" in info["compile"]
        assert info["matmul_nodes"] == 0 and sum(info["attention_nodes"].values()) == 2, info
    md = (out / "results.md").read_text()
    assert f"- bert-tiny float32 {peer}: " in md
    assert f"| B2 S8 varlen | {peer} |" in md and "| B2 S8 varlen | hf-sdpa |" in md  # one table


def test_peers_are_skipped_with_a_reason(tmp_path, monkeypatch):
    """A peer whose package is missing is a "skipped" row naming it; so is one asked for at another
    dtype or for training (inference only), and on a GPU."""
    from fastbert.bench import limits, peers
    from fastbert.bench.model_runs import _mode_skip

    real = peers._import

    def no_openvino(name):
        if name == "openvino":
            raise ImportError(f"No module named {name!r} (simulated)")
        return real(name)

    monkeypatch.setattr(peers, "_import", no_openvino)
    monkeypatch.setattr(limits, "measure", lambda device, quick=False: dict(FIXED_LIMITS))
    assert peers.import_problem("openvino").startswith("openvino")  # (", onnx" too where onnx is missing)
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--device", "cpu", "--threads", "1", "--models", "bert-tiny", "--batch", "1",
                   "--seq", "8", "--no-varlen", "--providers", "openvino", "--dtypes", "float32", "--ops", "none",
                   "--no-plots", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["provider"] == "openvino"]
    assert len(rows) == 1 and rows[0]["status"] == "skipped" and rows[0]["median_ms"] is None
    reason = rows[0]["reason"]
    assert reason.startswith("openvino") and "not importable" in reason and "peers extra" in reason
    assert reason in (tmp_path / "results.md").read_text()
    assert "peer_builds" not in data["env"]
    # the other reasons a peer is skipped; and peers are CPU providers, not listed on a GPU
    spec = P.parse("onnxruntime")
    assert "float32 only" in P.unavailable(spec, torch.device("cpu"), False, torch.bfloat16)
    assert "CPU-only" in P.unavailable(spec, torch.device("cuda"), False, torch.float32)
    assert "inference only" in _mode_skip(spec, M.Workload(1, 8, False, (8,)), "train")
    assert "onnxruntime" in P.model_provider_names("cpu") and "onnxruntime" not in P.model_provider_names("cuda")


def test_peer_summary_flags_an_unfused_graph(tmp_path):
    """A peer build whose graph did not fuse says so in results.md, next to its timings."""
    from fastbert.bench import peers

    ort = {"onnxruntime": "1", "onnx": "1", "export": "e", "optimizer": "o", "session": "s", "build_s": {"export": 1.0},
           "fused_ops": {"SkipLayerNormalization": 4, "BiasGelu": 2}, "fully_fused": False,
           "expected": "Attention 2"}
    assert "**not fully fused**: expected Attention 2" in peers.summary(ort)
    assert "**not fully fused**" not in peers.summary(dict(ort, fully_fused=True))
    ov = {"openvino": "1", "export": "e", "compile": "c", "attention_nodes": {"Softmax": 2}, "matmul_nodes": 4,
          "fully_fused": False, "expected": "no MatMul nodes"}
    assert "MatMul nodes 4 (**not fully fused**" in peers.summary(ov)
    env = {"command": "c", "peak_tflops": {}, "peer_builds": {"bert-tiny float32 onnxruntime": ort}}
    R.write_md(str(tmp_path / "results.md"), env, [], [])
    md = (tmp_path / "results.md").read_text()
    assert "- bert-tiny float32 onnxruntime: " in md and "**not fully fused**" in md
