"""tools/triton_aot.py: Triton kernels compiled for sm_80 and sm_90a without a GPU (CI runs the whole
`--set ci` through `make aot`, under two Triton versions), and the launch tables it checks
(fastbert/triton/configs.py)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "triton_aot.py")


def _tool():
    """The tool as a module (importing it drops TRITON_INTERPRET for its own process: restore it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    sys.path.insert(0, os.path.dirname(TOOL))
    try:
        return importlib.import_module("triton_aot")
    finally:
        sys.path.pop(0)
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a Triton build without the NVIDIA backend
        pytest.skip(f"Triton has no NVIDIA backend here: {e}")


def test_every_triton_kernel_is_compiled_by_the_ci_set():
    T = _tool()
    kernels = set()
    for mod in ("attention", "add_layer_norm", "bias_gelu", "linear_gelu", "rotary"):
        m = importlib.import_module(f"fastbert.triton.{mod}")
        # JITFunction, or InterpretedFunction when the module was imported under TRITON_INTERPRET=1
        kernels |= {n for n, f in vars(m).items()
                    if type(f).__name__ in ("JITFunction", "InterpretedFunction") and n.endswith("_kernel")}
    assert kernels == set(T._FNS), "a Triton kernel the tool does not know (add it to tools/triton_aot.py)"
    for arch in (80, 90):
        assert {v.kernel for v in T.ci_variants([arch])} == kernels
        assert {v.dtype for v in T.ci_variants([arch])} == {"fp32", "fp16", "bf16"}


def test_the_sets_hold_what_the_launchers_pick():
    from fastbert.triton import configs

    T = _tool()
    default = T.all_variants("default", "ci", [80, 90])
    picked = {(v.kernel, v.arch, v.dtype, dict(v.consts)["BLOCK_M"], dict(v.consts)["BLOCK_N"], v.warps, v.stages)
              for v in default if v.kernel == "_attention_fwd_kernel"}
    for fam, arch in configs.FAMILY_ARCH.items():
        for dtype in ("fp16", "bf16", "fp32"):
            for block_d in configs.ATTENTION_BLOCK_D:
                for sb in (16, 32, 64, 128, 512, 8192):
                    for heavy in (False, True):
                        c = configs.attention("fwd", fam, dtype, block_d, sb, heavy)
                        assert max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(32, sb)
                        key = ("_attention_fwd_kernel", arch, dtype, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                               c.num_warps, c.num_stages)
                        assert key in picked, key
    # a family's table entry is always among its autotune candidates
    for fam in configs.FAMILIES:
        for kernel in configs.ATTENTION_KERNELS:
            for block_d in configs.ATTENTION_BLOCK_D:
                entry = configs._ATTENTION[fam][kernel][("16", block_d)]
                assert entry in configs.attention_candidates(kernel, fam, "16", block_d)


def test_checks_fail_what_they_must():
    T = _tool()
    v = T.Variant("_attention_fwd_kernel", 80, "bf16", (("BLOCK_M", 64),), 4, 2, "sm80 default")
    over = T.Result(v, True, 1.0, regs=128, spill=0, shared=100 * 1024)
    T.check(over, 0, None)
    assert any("sm_86/89" in p for p in over.problems)  # the sm80 table must fit 99 KiB
    spill = T.Result(v, True, 1.0, regs=255, spill=8, shared=1024)
    T.check(spill, 0, None)
    assert any("spills 8 B" in p for p in spill.problems)
    v32 = T.Variant("_attention_fwd_kernel", 80, "fp32", (("BLOCK_M", 64),), 4, 2, "sm80 default")
    small, big = (T.Result(v32, True, 1.0, regs=255, spill=n, shared=1024) for n in (T.MAX_SPILL_FP32, 1024))
    T.check(small, 0, None)
    T.check(big, 0, None)
    assert not small.problems and big.problems
    broken = T.Result(v, False, 1.0, error="CompilationError: at 3:4")
    T.check(broken, 0, None)
    assert broken.problems == ["compile error: CompilationError: at 3:4"]
    v90 = T.Variant("_attention_fwd_kernel", 90, "bf16", (("BLOCK_M", 64),), 4, 2, "sm90 default")
    big = T.Result(v90, True, 1.0, regs=128, spill=0, shared=228 * 1024)
    T.check(big, 0, None)
    assert any("227" not in p and "> 232448 B" in p for p in big.problems)
    # autotune candidates may spill (the autotuner times them); a 1024-thread block at its register cap
    # is reported, not failed
    cand = T.Result(T.Variant("_attention_fwd_kernel", 90, "bf16", (), 4, 2, "sm90 autotune"), True, 1.0,
                    regs=255, spill=64, shared=1024)
    T.check(cand, 0, None)
    assert not cand.problems
    cap = T.Result(T.Variant("_add_layer_norm_bwd_kernel", 90, "bf16", (), 32, 3, "fixed"), True, 1.0,
                   regs=64, spill=100, shared=1024)
    T.check(cap, 0, None)
    assert not cap.problems and cap.notes


def test_gemm_and_gelu_kernels_compile_for_sm80_and_sm90a(tmp_path):
    """The ci set's GEMM and GELU variants, really compiled (a fresh cache): bf16 on sm_90a must use
    wgmma, fp32 must not use tensor cores (IEEE, no TF32); no spills, shared memory within limits."""
    _nvidia_backend()
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, TOOL, "--only", "linear_gelu|bias_gelu_fwd", "--jobs", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "6 variants" in r.stdout and "0 with problems" in r.stdout, r.stdout


def test_autotune_prunes_to_the_family_dtype_and_head_dim(monkeypatch):
    """FASTBERT_AUTOTUNE=1's autotuners hold every family's candidates; their prune keeps this device's
    (the family is faked here: without a GPU there is none), clamped to short sequences."""
    import torch

    from fastbert.triton import configs

    monkeypatch.setattr(configs, "family", lambda device: "sm90")
    q = torch.empty(1, dtype=torch.bfloat16)
    for kernel in configs.ATTENTION_KERNELS:
        every = configs.attention_autotune_configs(kernel)
        kept = configs.prune_attention(kernel)(every, dict(Q=q, seq_bucket=8192), BLOCK_D=64)
        want = {c for c in configs.attention_candidates(kernel, "sm90", "16", 64)}
        assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == want
        short = configs.prune_attention(kernel)(every, dict(Q=q, seq_bucket=16), BLOCK_D=64)
        assert short and all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 32 for c in short)
    x = torch.empty(1, dtype=torch.float32)
    kept = configs.prune_gemm(configs.gemm_autotune_configs(), dict(X=x, M_BUCKET=64))
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 for c in kept)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in kept} <= set(configs.gemm_candidates("32"))
