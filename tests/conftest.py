import os

# Decide how Triton runs BEFORE anything imports triton: on a machine without a CUDA device the
# kernels run in the interpreter on CPU tensors. Every kernel output starts as NaN, so an element a
# kernel forgot to write fails the comparison (the C++ backends read the same variable).
os.environ.setdefault("FASTBERT_POISON_OUTPUTS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build models locally; never reach for a hub
import torch  # noqa: E402  (importing torch does not import triton)

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the model tests run fastbert's CPU GEMM kernel wherever it exists ("auto" would choose it or ATen's
# GEMM by timing, so the path a test took would depend on the machine's load); tests/ops/test_cpu_gemm.py
# covers "aten" and "auto"
from fastbert.ops import cpu_gemm  # noqa: E402

if cpu_gemm.kernel_status()[0]:
    os.environ.setdefault("FASTBERT_CPU_GEMM", "fastbert")

# fp32 means IEEE fp32: no TF32 in the PyTorch references either
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    import fastbert

    return ["fastbert environment:"] + ["  " + line for line in fastbert.explain().splitlines()[:5]]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
