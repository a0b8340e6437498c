"""What a benchmark run records about where it ran (versions, commit, device, load), and the CPU
allocator setting every CPU run uses."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from typing import List, Optional

import torch


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device, argv: List[str], quick: bool) -> dict:
    import fastbert

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "device": name,
        "device_kind": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fastbert": fastbert.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m fastbert.bench " + " ".join(shlex.quote(a) for a in argv),
        "quick": quick,
        # a busy machine slows CPU timings (and multi-threaded ones a lot): say how busy it was
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timing_method": ("CUDA events around each call, inputs rotated, median/p20/p80" if device.type == "cuda"
                          else "time.perf_counter around each call, inputs rotated, median/p20/p80"),
        "fastbert_explain": fastbert.explain().splitlines(),
    }


def steady_cpu_allocator() -> str:
    """CPU runs: keep glibc malloc from handing every large tensor fresh pages. By default glibc serves
    blocks above a moving threshold with mmap and returns freed heap tops to the OS, so a provider's
    output of a few MB can cost a page fault per 4 KB (zero-filled) on every call; which calls pay
    depends on the allocation history of the whole process, not on the provider (measured on the
    2-core development VM: add_layer_norm at 1024 x 768 and its torch composition both went from
    ~0.45 ms to 1.0-1.4 ms partway through one process, then back). Fixing the mmap threshold at
    32 MiB (glibc's maximum) and never trimming makes every provider reuse heap memory, as a caching
    allocator (jemalloc, tcmalloc, PyTorch's CUDA allocator) would. Applies to every provider alike;
    recorded in env.cpu_allocator."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return ("glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB" if ok
            else "system default (glibc mallopt not available)")
