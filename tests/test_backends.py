import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import backends


def test_import_is_light():
    code = ("import sys, fastbert; "
            "assert 'triton' not in sys.modules, 'triton imported by import fastbert'; "
            "fastbert.explain(); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    env = {k: v for k, v in os.environ.items() if k != "FASTBERT_BACKEND"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_use_backend_nests_and_validates():
    assert backends.forced_backend() is None
    with fastbert.use_backend("torch"):
        assert backends.forced_backend() == "torch"
        with fastbert.use_backend("cpu"):
            assert backends.forced_backend() == "cpu"
        with fastbert.use_backend(None):
            assert backends.forced_backend() is None
        assert backends.forced_backend() == "torch"
    assert backends.forced_backend() is None
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with fastbert.use_backend("nope"):
            pass


def test_env_var_forces(monkeypatch):
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    assert backends.forced_backend() == "torch"
    monkeypatch.setenv("FASTBERT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTBERT_BACKEND"):
        backends.forced_backend()
    monkeypatch.setenv("FASTBERT_BACKEND", "auto")
    assert backends.forced_backend() is None


def test_forced_backend_that_cannot_serve_lists_every_reason():
    d = backends.Dispatcher("toy", checks={"cpu": lambda **kw: ["toy inputs are not supported"]})
    with fastbert.use_backend("cuda"):
        with pytest.raises(backends.BackendUnavailableError) as ei:
            d.choose(torch.device("cpu"))
    msg = str(ei.value)
    for b in backends.BACKENDS:
        assert f"  {b}:" in msg
    assert "cuda tensors, got cpu tensors" in msg


def test_unforced_falls_back_and_records_why():
    d = backends.Dispatcher("toy2", checks={"cpu": lambda **kw: ["toy reason"]})
    dec = d.choose(torch.device("cpu"))
    assert dec.backend == "torch" and not dec.forced
    rejected = dict(dec.rejected)
    assert "cpu" in rejected
    assert "toy2: torch" in fastbert.explain()


def test_triton_on_cpu_only_when_forced():
    dev = torch.device("cpu")
    if not backends.triton_status()[0]:
        pytest.skip("triton not installed")
    unforced = backends.device_reasons("triton", dev)
    assert unforced, "triton must not serve CPU tensors unless forced"
    forced = backends.device_reasons("triton", dev, forced=True)
    assert (forced == []) == backends.triton_interpreter()


def test_explain_reports_environment():
    text = fastbert.explain()
    assert "triton:" in text and "_C:" in text and "cpu:" in text


def test_dispatch_traces_under_torch_compile_fullgraph():
    # The dispatcher runs inside compiled code: it must not break the graph.
    def f(x, w, b, r):
        with fastbert.use_backend("torch"):
            return fastbert.ops.add_layer_norm(x, w, b, residual=r) * 2

    x, r = torch.randn(4, 16), torch.randn(4, 16)
    w, b = torch.randn(16), torch.randn(16)
    g = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(g(x, w, b, r), f(x, w, b, r))


def test_decisions_are_cached_per_key_forcing_and_checks(monkeypatch):
    if not backends.extension_status()[0]:
        pytest.skip("fastbert._C is not built: the cpu backend cannot serve")
    calls = []

    def check(x, **_):
        calls.append(x.dtype)
        return [] if x.dtype == torch.float32 else ["toy: float32 only"]

    d = backends.Dispatcher("toy3", checks={"cpu": check}, key=lambda x, **_: x.dtype)
    dev, a = torch.device("cpu"), torch.zeros(2)
    assert d.choose(dev, x=a).backend == "cpu"
    assert d.choose(dev, x=a).backend == "cpu"
    assert calls == [torch.float32], "the second call must be answered from the cache"
    assert d.choose(dev, x=a.double()).backend == "torch"  # another key: the checks run again
    assert calls == [torch.float32, torch.float64]
    with fastbert.use_backend("torch"):
        dec = d.choose(dev, x=a)
        assert dec.backend == "torch" and dec.forced
    monkeypatch.setenv("FASTBERT_BACKEND", "torch")
    assert d.choose(dev, x=a).forced
    monkeypatch.delenv("FASTBERT_BACKEND")
    assert backends.last_decisions()["toy3"].backend == "torch"
    assert d.choose(dev, x=a).backend == "cpu" and backends.last_decisions()["toy3"].backend == "cpu"
    d.set_check("cpu", lambda **_: ["changed"])
    assert d.choose(dev, x=a).backend == "torch", "set_check must drop the cached decisions"
