"""This machine's own limits, measured at start, so every figure also reads as a fraction of them.

- FLOP/s peak: a large square matmul, timed like everything else (timing.bench). On a GPU we measure
  bf16 (the headline peak, as the issue asks), fp16 and fp32; fp32 is IEEE (TF32 off for the whole
  run), so fp32 rows are compared with the fp32 peak, not the tensor-core one. On CPU: fp32 only.
  FLOPs of an n x n x n matmul = 2 n^3.
- Bandwidth: a large device-to-device copy (dst.copy_(src)); bytes moved = 2 x size (read + write).
  On CPU the same with a memcpy-sized tensor.
Measured peaks are what this machine reaches with cuBLAS/MKL, usually below the datasheet figure:
a kernel at 100% of them is as fast as the vendor's own GEMM/copy.
"""
from __future__ import annotations

import torch

from fastbert.bench import timing


def _matmul_tflops(n: int, dtype: torch.dtype, device: torch.device, quick: bool) -> float:
    a = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = timing.bench(lambda i: torch.mm(a[i], b, out=out), 2, device, quick=quick)
    return 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12


def _copy_gbps(nbytes: int, device: torch.device, quick: bool) -> float:
    n = nbytes // 4
    src = [torch.randn(n, device=device) for _ in range(2)]
    dst = torch.empty(n, device=device)
    t = timing.bench(lambda i: dst.copy_(src[i]), 2, device, quick=quick)
    return 2.0 * n * 4 / (t.median_ms * 1e-3) / 1e9


def measure(device: torch.device, quick: bool = False) -> dict:
    """{"peak_tflops": {dtype name: TFLOP/s}, "bw_gbps": GB/s, "limits_method": text}."""
    device = torch.device(device)
    peaks = {}
    if device.type == "cuda":
        n = 4096 if quick else 8192
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            peaks[str(dt).replace("torch.", "")] = _matmul_tflops(n, dt, device, quick)
        nbytes = (256 if quick else 1024) * 2**20
        method = (f"{n}^3 matmul per dtype (fp32 IEEE, TF32 off); device-to-device copy of "
                  f"{nbytes >> 20} MiB, bytes = 2 x size")
    else:
        n = 1024 if quick else 2048
        peaks["float32"] = _matmul_tflops(n, torch.float32, device, quick)
        nbytes = (64 if quick else 256) * 2**20
        method = f"{n}^3 fp32 matmul; memcpy of {nbytes >> 20} MiB, bytes = 2 x size"
    bw = _copy_gbps(nbytes, device, quick)
    return {"peak_tflops": peaks, "bw_gbps": bw, "limits_method": method}
