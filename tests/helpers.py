"""Test helpers: devices and backends to parametrize over, and skipping a backend that cannot run here."""
import pytest
import torch

from fastbert import backends

HAS_CUDA = torch.cuda.is_available()

# CPU always; CUDA as a gpu-marked twin
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def require_backend(backend: str, device: str, kernels=()):
    """Skip (with the dispatcher's own reason) when `backend` cannot run on `device` in this build."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    why = backends.device_reasons(backend, torch.device(device), kernels, forced=True)
    if why:
        pytest.skip(f"{backend} on {device}: {'; '.join(why)}")
