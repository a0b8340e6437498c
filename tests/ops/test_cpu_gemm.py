"""fastbert's CPU GEMM (csrc/cpu/gemm.cpp) and its front end fastbert/ops/cpu_gemm.py: the kernel against
float64 at awkward shapes with every epilogue, bad input, thread-count independence; the choice between
it and ATen (forced both ways, measured), and the packed-weight cache of a patched model. The model
tests elsewhere run the kernel too: tests/conftest.py sets FASTBERT_CPU_GEMM=fastbert where it exists."""
import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import backends
from fastbert.ops import cpu_gemm
from fastbert.testing import assert_no_worse

ok, why = cpu_gemm.kernel_status()
needs_kernel = pytest.mark.skipif(not ok, reason=f"fastbert CPU GEMM kernel unavailable: {why}")

EPI = {"none": lambda y: y, "gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}

# rows: < one 6-row micro-tile, exactly one, one more, a tile of 72 and over; N: < / = / > one 16-column
# panel, several; K: < / = / > one 192 block and several blocks with a tail
SHAPES = [(1, 1, 1), (5, 15, 7), (6, 16, 192), (7, 17, 193), (73, 40, 400), (150, 800, 96), (13, 64, 768),
          # BERT-family rows (tokens of seq 1, 7, 129) at hidden 384 / 768 and their FFN widths
          (1, 384, 768), (7, 1152, 384), (129, 768, 3072), (129, 1536, 384)]


def _run(x, w, b, epilogue):
    packed = torch.ops.fastbert.cpu_pack_weight(w)
    return torch.ops.fastbert.cpu_packed_linear(x, packed, w.shape[0], b, epilogue)


@needs_kernel
@pytest.mark.parametrize("epilogue", list(EPI))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_kernel_matches_float64(dtype, shape, bias, epilogue):
    m, n, k = shape
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    b = (torch.randn(n) * 0.5).to(dtype) if bias else None
    out = _run(x, w, b, epilogue)
    assert out.shape == (m, n) and out.dtype == dtype
    torch_out = EPI[epilogue](F.linear(x, w, b))  # PyTorch in the same dtype: the yardstick
    ref64 = EPI[epilogue](F.linear(x.double(), w.double(), b.double() if bias else None))
    assert_no_worse("out", out, torch_out, ref64, k=2)


@needs_kernel
def test_kernel_takes_an_fp32_bias_with_16bit_inputs():
    x, w, b = torch.randn(9, 40).bfloat16(), torch.randn(24, 40).bfloat16(), torch.randn(24)
    ref64 = F.linear(x.double(), w.double(), b.double())
    out = _run(x, w, b, "none")
    assert out.dtype == torch.bfloat16
    assert_no_worse("out", out, F.linear(x, w, b.bfloat16()), ref64, k=2)


@needs_kernel
def test_kernel_rounds_like_mkl_at_bert_shapes():
    # the K blocking keeps the error of the GEMM HF runs (one chain over K, as oneDNN's, had 2-3x it)
    x = torch.randn(256, 3072)
    w = torch.randn(768, 3072) * 0.02
    ref = x.double() @ w.double().t()
    err = (_run(x, w, None, "none").double() - ref).pow(2).mean().sqrt()
    err_aten = ((x @ w.t()).double() - ref).pow(2).mean().sqrt()
    assert err <= 1.25 * err_aten, (float(err), float(err_aten))


@needs_kernel
def test_kernel_is_independent_of_thread_count():
    x = torch.randn(200, 300)
    w = torch.randn(500, 300)
    b = torch.randn(500)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(x, w, b, "gelu")
        torch.set_num_threads(max(2, threads))
        many = _run(x, w, b, "gelu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_kernel
def test_kernel_bad_input():
    w = torch.randn(32, 16)
    packed = torch.ops.fastbert.cpu_pack_weight(w)
    x = torch.randn(4, 16)
    lin = torch.ops.fastbert.cpu_packed_linear
    with pytest.raises(RuntimeError, match="x must have dtype float32, float16 or bfloat16"):
        lin(x.double(), packed, 32, None, "none")
    with pytest.raises(RuntimeError, match="bias must have dtype"):
        lin(x, packed, 32, torch.randn(32).double(), "none")
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        lin(torch.randn(16, 4).t(), packed, 32, None, "none")
    with pytest.raises(RuntimeError, match="packed must be cpu_pack_weight"):
        lin(x, packed, 48, None, "none")
    with pytest.raises(RuntimeError, match="packed must be cpu_pack_weight"):
        lin(torch.randn(4, 8), packed, 32, None, "none")
    with pytest.raises(RuntimeError, match="bias must have shape"):
        lin(x, packed, 32, torch.randn(31), "none")
    with pytest.raises(RuntimeError, match="epilogue must be"):
        lin(x, packed, 32, None, "relu")
    with pytest.raises(RuntimeError, match="weight must have dtype float32, float16 or bfloat16"):
        torch.ops.fastbert.cpu_pack_weight(w.double())
    with pytest.raises(RuntimeError, match="weight must have rank 2"):
        torch.ops.fastbert.cpu_pack_weight(torch.randn(3))


def _front(x, w, b, epilogue="none"):
    cache = cpu_gemm.PackedWeight()
    return cpu_gemm.linear(x, w, b, epilogue, cache=cache, key=cpu_gemm.param_key(w, b),
                           aten=lambda: EPI[epilogue](F.linear(x, w, b)))


def test_front_end_forcing(monkeypatch):
    x, w, b = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    ref = F.gelu(F.linear(x, w, b))
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "aten")
    assert torch.equal(_front(x, w, b, "gelu"), ref)
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="FASTBERT_CPU_GEMM must be one of"):
        _front(x, w, b)
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "fastbert")
    if ok:
        out = _front(x, w, b, "gelu")
        assert out.shape == (3, 5, 24)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_gemm, "kernel_status", lambda: (False, "no kernel in this test"))
    with pytest.raises(backends.BackendUnavailableError, match="no kernel in this test"):
        _front(x, w, b)
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "auto")  # not forced: ATen's GEMM, no error
    assert torch.equal(_front(x, w, b, "gelu"), ref)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        _front(x, w, b, "relu")


@needs_kernel
def test_front_end_measures_once_per_shape_class(monkeypatch):
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "auto")
    cpu_gemm.reset_choices()
    calls = {"aten": 0}
    w, b = torch.randn(40, 32), torch.randn(40)

    def aten_of(x):
        def f():
            calls["aten"] += 1
            return F.linear(x, w, b)
        return f

    cache = cpu_gemm.PackedWeight()
    try:
        for m in (5, 7, 8, 9):  # rows 5..8 share a class; 9 starts the next
            x = torch.randn(m, 32)
            out = cpu_gemm.linear(x, w, b, "none", cache=cache, key=cpu_gemm.param_key(w), aten=aten_of(x))
            torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        classes = {c[0] for c in cpu_gemm._choices}
        assert classes == {8, 16}
        # each new class times both candidates (1 + _TIMED_CALLS calls each); a known one calls one
        timed = 1 + cpu_gemm._TIMED_CALLS
        known = 2 if cpu_gemm._choices[(8, 40, 32, "none", "float32")][0] == "aten" else 0  # rows 7 and 8
        assert calls["aten"] == 2 * timed + known
        text = fastbert.explain()
        assert "cpu gemm: fastbert kernel available" in text and "float32 rows<=8 N=40 K=32" in text
    finally:
        cpu_gemm.reset_choices()


def test_eligible_only_for_cpu_inference_on_the_cpu_backend():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert cpu_gemm.eligible(x, w, None)
    assert not cpu_gemm.eligible(x.double(), w.double(), None)
    assert cpu_gemm.eligible(x.bfloat16(), w.bfloat16(), None)
    assert not cpu_gemm.eligible(x.bfloat16(), w, None)
    assert not cpu_gemm.eligible(x, torch.nn.Parameter(w), None)
    with torch.no_grad():
        assert cpu_gemm.eligible(x, torch.nn.Parameter(w), None)
    with fastbert.use_backend("torch"):
        assert not cpu_gemm.eligible(x, w, None)
    with fastbert.use_backend("cpu"):
        assert cpu_gemm.eligible(x, w, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's inputs: fp32 or its dtype
        assert cpu_gemm.eligible(x, w, None) and cpu_gemm.eligible(x.bfloat16(), w, None)
        assert not cpu_gemm.eligible(x.half(), w, None)


@needs_kernel
@pytest.mark.parametrize("mode", ["fastbert", "aten", "auto"])
def test_patched_model_repacks_after_weight_updates(monkeypatch, mode):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("FASTBERT_CPU_GEMM", mode)
    cpu_gemm.reset_choices()
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=32)
    hf = transformers.BertModel(cfg).eval()
    import copy

    fast = fastbert.patch(copy.deepcopy(hf))
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    valid = mask.bool()

    def check():
        with torch.no_grad():
            a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
            b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(b[valid], a[valid], rtol=1e-4, atol=1e-4)

    try:
        check()
        with torch.no_grad():  # an optimizer-like in-place step on every weight (bumps _version)
            for p_h, p_f in zip(hf.parameters(), fast.parameters()):
                noise = torch.randn_like(p_h) * 0.05
                p_h.add_(noise)
                p_f.add_(noise)
        check()
        fast.load_state_dict(hf.state_dict())
        check()
        if mode == "fastbert":
            packed = [p for m in fast.modules() if hasattr(m, "packed") and isinstance(m.packed, dict)
                      for p in m.packed.values()]
            assert packed and all(p._packed is not None for p in packed)
            fastbert.nn.invalidate_caches(fast)
            assert all(p._packed is None for p in packed)
            check()
    finally:
        cpu_gemm.reset_choices()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_front_end_under_autocast_rounds_like_autocast(monkeypatch, dtype):
    # autocast rounds x, W and b to its dtype before F.linear; the kernel then multiplies those exactly
    monkeypatch.setenv("FASTBERT_CPU_GEMM", "fastbert")
    x, w, b = torch.randn(10, 48), torch.randn(40, 48) / 7, torch.randn(40)
    with torch.autocast("cpu", dtype=dtype):
        out = _front(x, w, b, "gelu")
        ref = F.gelu(F.linear(x, w, b))
    assert out.dtype == ref.dtype == dtype
    r64 = F.gelu(F.linear(*(t.to(dtype).double() for t in (x, w, b))))
    assert_no_worse("autocast out", out, ref, r64, k=2)
