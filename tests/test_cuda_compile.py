"""Compile-check every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a. The .cu files include no torch
headers, so this needs only nvcc, not a CUDA build of torch or a GPU."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("path", CU_FILES or [pytest.param(None, marks=pytest.mark.skip(reason="no csrc/cuda/*.cu yet"))],
                         ids=lambda p: os.path.basename(p) if p else "none")
def test_nvcc_compiles(path, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           "-I", os.path.join(ROOT, "csrc"), "-c", path, "-o", str(tmp_path / "out.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {os.path.basename(path)}:\n{r.stderr[-4000:]}"
