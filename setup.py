"""Build fastbert and its one C++ extension, fastbert._C.

The C++ sources (op schemas, the CPU backend) are always built. The CUDA sources (csrc/cuda/*.cu and
the CUDA bindings) are added only where torch is a CUDA build and nvcc is found, unless
FASTBERT_SKIP_CUDA_BUILD=1. Without a C++ compiler or with FASTBERT_SKIP_EXTENSION=1 the package
installs without _C and runs on the Triton and torch backends (`fastbert.explain()` says so).

Switches (environment variables):
  FASTBERT_SKIP_CUDA_BUILD=1   build the CPU part of _C only
  FASTBERT_SKIP_EXTENSION=1    build no extension at all
  FASTBERT_CUDA_ARCHS          semicolon-separated SM list, default "80;90a"
  FASTBERT_CPU_AVX2=0/1        compile csrc/cpu for AVX2+FMA (default: when the build machine has them)
  MAX_JOBS                     parallel compile jobs (read by torch's ninja builder)

Build with `pip install --no-build-isolation -e .` so that the installed torch is the one built against.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _cpu_simd_flags():
    """AVX2+FMA for csrc/cpu when this x86-64 machine has them (at::vec::Vectorized<float> is then 8 wide
    and its exp/erf/tanh are Sleef's, exported by libtorch_cpu). FASTBERT_CPU_AVX2=0/1 overrides the
    detection, e.g. to build for a different machine than the build host."""
    import platform

    want = os.environ.get("FASTBERT_CPU_AVX2", "").strip().lower()
    if want in ("0", "false", "no", "off"):
        return []
    if want not in ("1", "true", "yes", "on"):
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return []
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(f.read().split())
        except OSError:
            return []
        if not {"avx2", "fma", "f16c"} <= flags:
            return []
    # CPU_CAPABILITY=AVX2 selects ATen's vec256 specializations, in the same inline namespace torch uses
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def _extensions():
    if _env_flag("FASTBERT_SKIP_EXTENSION"):
        print("fastbert: FASTBERT_SKIP_EXTENSION=1, building no extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # pragma: no cover - depends on the machine
        print(f"fastbert: torch is not importable ({e}); building no extension. "
              "Install torch first, then `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpp_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                      + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_bindings = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda_bindings", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    want_cuda = not _env_flag("FASTBERT_SKIP_CUDA_BUILD")
    if want_cuda and torch.version.cuda is None:
        print("fastbert: torch is a CPU build; building the CPU part of fastbert._C only", file=sys.stderr)
        want_cuda = False
    if want_cuda and not (nvcc and os.path.exists(nvcc)):
        print("fastbert: nvcc not found; building the CPU part of fastbert._C only", file=sys.stderr)
        want_cuda = False
    # torch takes CUDA_HOME from the nvcc on the PATH (its parent's parent); a wrapper script such as
    # /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc then points it at a folder without the
    # toolkit's headers, and the host compile of csrc/cuda_bindings fails on <cuda_runtime.h>.
    if want_cuda and not (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))):
        print(f"fastbert: no CUDA toolkit headers under CUDA_HOME={CUDA_HOME!r} (include/cuda_runtime.h); set "
              "CUDA_HOME to the toolkit's folder for the CUDA kernels. Building the CPU part of fastbert._C only",
              file=sys.stderr)
        want_cuda = False

    # -fopenmp: at::parallel_for in csrc/cpu runs on OpenMP; the symbols resolve to the libgomp that
    # torch already loaded (its lib/ directory), so no second OpenMP runtime is linked in.
    # -fvisibility-inlines-hidden: as torch is built, so the at::vec inline code of this library never
    # interposes with (or is interposed by) torch's own copies.
    # No -std here: torch's BuildExtension adds the standard its own headers need (C++20 from torch 2.14;
    # docs/perf-notes.md). The .cu kernels include no torch headers and keep nvcc's C++17 below.
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility-inlines-hidden",
                 "-DFASTBERT_WITH_CUDA=%d" % int(want_cuda)] + _cpu_simd_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    # libstdc++ as a shared library, named explicitly so it is found before any static copy a compiler
    # driver may add (docs/perf-notes.md, "Build incidents"). Harmless where the default is already shared.
    libraries = ["stdc++"]
    if want_cuda:
        archs = os.environ.get("FASTBERT_CUDA_ARCHS", "80;90a")
        # no --use_fast_math: it swaps erf/exp/division for approximations, and fastbert is exact
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr",
                      "-DFASTBERT_WITH_CUDA=1"] + _cuda_arch_flags(archs)
        ext = CUDAExtension(
            "fastbert._C",
            sources=cpp_sources + cuda_bindings + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            libraries=libraries,
        )
    else:
        ext = CppExtension("fastbert._C", sources=cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, libraries=libraries)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
