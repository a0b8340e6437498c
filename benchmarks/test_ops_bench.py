"""Op-level pytest-benchmark suites: each fastbert op against the PyTorch composition it replaces.

    pytest benchmarks/ --benchmark-only                      # on whatever device exists
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group,param:shape

Grouped per op (and mode); the cases, providers, FLOP/byte counts and float64 error checks are those
of `python -m fastbert.bench` (fastbert/bench/opbench.py), so both agree on what is measured. Each
call takes the next of several input sets (rotation, so caches do not flatter) and, on a GPU, ends
with a synchronize so that pytest-benchmark's wall clock sees the kernel time. A provider that cannot
run here (Triton on CPU, the cuda backend without CUDA, an SDPA backend that refuses the input) is
skipped with its reason. extra_info carries the error against float64 and TFLOP/s or GB/s.
"""
import os

import pytest
import torch

from fastbert.bench import models as M
from fastbert.bench import opbench as O

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
# BERT-base shapes: (batch, seq); a GPU gets a latency-sized and a throughput-sized one
SHAPES = [(8, 512), (32, 128)] if GPU else [(1, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if GPU else [torch.float32]
MODES = list(O.MODES)
HIDDEN, _, HEADS, INTER = M.CONFIGS["bert-base"]

if GPU:  # fp32 is IEEE fp32, as in the runner
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

_cases = {}


def _case(op, batch, seq, varlen, dtype):
    key = (op, batch, seq, varlen, dtype)
    if key not in _cases:
        _cases.clear()  # keep one case's tensors alive at a time
        lengths = M.varlen_lengths(batch, seq) if varlen else [seq] * batch
        torch.manual_seed(0)
        _cases[key] = O.make_case(op, (HIDDEN, HEADS, INTER), batch, seq, lengths, dtype, DEVICE)
    return _cases[key]


def _params():
    for op in O.OPS:
        for prov in O.op_provider_names(op):
            for mode in MODES:
                for dtype in DTYPES:
                    for batch, seq in SHAPES:
                        for varlen in ([False, True] if op == "attention" else [False]):
                            shape = f"B{batch}-S{seq}" + ("-varlen" if varlen else "")
                            yield pytest.param(op, prov, mode, dtype, batch, seq, varlen,
                                               id=f"{op}-{mode}-{str(dtype)[6:]}-{shape}-{prov}")


@pytest.mark.parametrize("op,provider,mode,dtype,batch,seq,varlen", list(_params()))
def test_op(benchmark, op, provider, mode, dtype, batch, seq, varlen):
    benchmark.group = f"{op} {mode} {str(dtype)[6:]} B{batch} S{seq}" + (" varlen" if varlen else "")
    case = _case(op, batch, seq, varlen, dtype)
    try:
        call, err = O.prepare(case, provider, mode, varlen, DEVICE, HEADS)
    except O.Skip as e:
        pytest.skip(f"{provider}: {e}")
    n = len(case.sets)
    state = {"i": 0}

    def run():
        call(state["i"] % n)
        state["i"] += 1
        if GPU:
            torch.cuda.synchronize()

    benchmark.extra_info["max_abs_err_vs_float64"] = err
    benchmark.pedantic(run, warmup_rounds=3, rounds=int(os.environ.get("FASTBERT_BENCH_ROUNDS", 20 if GPU else 5)),
                       iterations=1)
    median_s = benchmark.stats.stats.median
    flops, nbytes = case.flops(mode), case.nbytes(mode)
    if flops:
        benchmark.extra_info["tflops"] = flops / median_s / 1e12
    if nbytes:
        benchmark.extra_info["gbps"] = nbytes / median_s / 1e9
    assert err == err and err != float("inf"), f"{provider} output has NaN/inf"
