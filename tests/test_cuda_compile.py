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
@pytest.mark.parametrize("path", CU_FILES or [pytest.param(None, marks=pytest.mark.skip(reason="no .cu files"))],
                         ids=lambda p: os.path.basename(p) if p else "none")
def test_nvcc_compiles(path, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
           "-I", os.path.join(ROOT, "csrc"), "-c", path, "-o", str(tmp_path / "out.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {os.path.basename(path)}:\n{r.stderr[-4000:]}"


BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda_bindings", "*.cpp")))
CXX = shutil.which(os.environ.get("CXX", "g++"))


def _cuda_include():
    """The CUDA toolkit's include dir (for cuda_runtime_api.h), from CUDA_HOME or nvcc's location."""
    for home in (os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(NVCC or "")))):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    found = sorted(glob.glob("/usr/local/cuda*/include/cuda_runtime_api.h"))
    return os.path.dirname(found[-1]) if found else None


@pytest.mark.skipif(CXX is None or NVCC is None, reason="needs a C++ compiler and the CUDA toolkit")
@pytest.mark.parametrize("path", BINDINGS, ids=os.path.basename)
def test_cuda_bindings_compile(path, tmp_path):
    """The host code of the CUDA backend (csrc/cuda_bindings) is built only with a CUDA torch, which CI
    does not have: syntax- and type-check it here against the installed torch's headers. A CPU build of
    torch ships c10/cuda's headers but not the one CMake generates; a one-line stand-in takes its place."""
    import sysconfig

    import torch.utils.cpp_extension as ext

    cuda_inc = _cuda_include()
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers found")
    includes = [os.path.join(ROOT, "csrc"), *ext.include_paths(), cuda_inc, sysconfig.get_paths()["include"]]
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for d in includes):
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.insert(1, str(tmp_path / "stub"))
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", *[f"-I{d}" for d in includes], path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{os.path.basename(path)} does not compile:\n{r.stderr[-4000:]}"
