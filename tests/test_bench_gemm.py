"""The benchmark's GEMM library rows (gemm_qkv, gemm_o, gemm_ffn_in, gemm_ffn_out: fastbert/bench/opbench.py)
on a tiny config: every provider runs on CPU or says why not, errors are measured against float64,
and the rows time inference only."""
import torch

from fastbert.bench import opbench as O
from fastbert.ops import cpu_gemm


def test_gemm_shapes_follow_the_layer():
    assert O.gemm_shape("gemm_qkv", 128, 512) == (384, 128)
    assert O.gemm_shape("gemm_o", 128, 512) == (128, 128)
    assert O.gemm_shape("gemm_ffn_in", 128, 512) == (512, 128)
    assert O.gemm_shape("gemm_ffn_out", 128, 512) == (128, 512)
    assert O.op_provider_names("gemm_o") == list(O.GEMM_PROVIDERS)


def test_gemm_providers_run_and_are_exact():
    dev = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for op in O.GEMMS:
            case = O.make_case(op, (128, 2, 512), 2, 16, [16, 16], torch.float32, dev, n_sets=2)
            res = O.run_providers(case, O.GEMM_PROVIDERS, "fwd", False, dev, 2, quick=True)
            for prov, r in res.items():
                if isinstance(r, O.Skip):
                    assert prov != "torch-linear" and str(r), (op, prov)
                    continue
                assert not isinstance(r, BaseException), (op, prov, r)
                assert r["timing"].median_ms > 0
                # fp32 GEMMs over K <= 512 terms of O(1) values: rounding level, nowhere near a bug
                assert r["max_abs_err"] < 1e-4, (op, prov, r["max_abs_err"])
            if cpu_gemm.kernel_status()[0]:
                assert isinstance(res["fastbert-packed"], dict)
            bwd = O.run_providers(case, ["torch-linear"], "bwd", False, dev, 2, quick=True)
            assert isinstance(bwd["torch-linear"], O.Skip) and "fwd" in str(bwd["torch-linear"])
    finally:
        torch.set_num_threads(threads)



def test_run_records_and_reports_the_cpu_gemm_choices(tmp_path):
    from fastbert.bench import model_runs
    from fastbert.bench import report as R

    env = {}
    cpu_gemm._choices[(8, 40, 32, "none", "float32")] = ("aten", "fastbert kernel 2.00 ms, aten 1.00 ms")
    try:
        model_runs.record_dispatch(env, "tiny float32 fastbert")
    finally:
        cpu_gemm.reset_choices()
    lines = env["fastbert_cpu_gemm"]
    assert lines[0].startswith("cpu gemm: ") and "float32 rows<=8 N=40 K=32 epilogue=none: aten" in lines[1]
    R.write_md(str(tmp_path / "results.md"), env, [], [])
    text = (tmp_path / "results.md").read_text()
    assert "CPU GEMM per shape class" in text and "- float32 rows<=8 N=40 K=32 epilogue=none: aten" in text
