"""Timing one callable, the same way for every provider so that figures compare.

- GPU: one pair of CUDA events around each call (recorded on the current stream, read after a single
  synchronize at the end), so host overhead between calls is not counted but launch overhead inside
  a call is. We do not use triton.testing.do_bench because it times a single input set over and over;
  here every call takes the next of several input sets ("rotation"), so an op never finds its inputs
  already in L2 from the previous repetition (H100 L2 = 50 MB; callers make the rotation big enough).
- CPU: time.perf_counter around each call (CPU ops are synchronous).
- Warm-up first (compilation, autotuning, allocator growth, cuDNN/cuBLAS heuristics), for at least
  `warmup_ms` and 2 calls; then as many repetitions as fit in `target_ms`, clamped to
  [min_reps, max_reps]. We report the median and the 20th/80th percentiles of the per-call times:
  the median resists the odd slow call (GC, clock ramp), p20-p80 shows the spread.
- Interleaved (`bench_interleaved`, used on CPU for the op and model grids): the providers of one case are timed in
  rounds, one call of each per round (the order rotating from round to round), so a machine whose
  speed drifts over seconds (another process, clock or memory-bandwidth contention: the 2-core
  development VM moved single providers by 30-40% between consecutive windows) slows every provider
  alike instead of whichever happened to be measured then. Ratios between providers are what the
  benchmark reports, so they are what must not drift.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch


@dataclasses.dataclass
class Settings:
    warmup_ms: float = 100.0
    target_ms: float = 1000.0
    min_reps: int = 10
    max_reps: int = 200


# Settings per device and run length. CPU calls of a BERT-base forward take ~0.1-2 s on 2 cores,
# so there the repetition count, not the time budget, is what binds: the full CPU grid takes at least
# 11 calls per provider (with 5, single model rows on the 2-core development VM moved by +-10% between
# runs, more than the differences they were to show).
SETTINGS = {
    # GPU: the default grid has thousands of cases, so each gets ~0.1 s of warm-up and ~0.4 s of
    # repetitions (>= 10 calls even when one call takes longer)
    ("cuda", False): Settings(warmup_ms=100.0, target_ms=400.0, min_reps=10, max_reps=500),
    ("cuda", True): Settings(warmup_ms=50.0, target_ms=200.0, min_reps=10, max_reps=200),
    ("cpu", False): Settings(warmup_ms=0.0, target_ms=4000.0, min_reps=11, max_reps=100),
    ("cpu", True): Settings(warmup_ms=0.0, target_ms=500.0, min_reps=3, max_reps=50),
}


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def summarize(times_ms: Sequence[float]) -> Timing:
    a = np.asarray(times_ms, dtype=np.float64)
    p20, med, p80 = np.percentile(a, [20, 50, 80])
    return Timing(float(med), float(p20), float(p80), int(a.size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_ms(fn: Callable[[int], object], i: int, device: torch.device) -> float:
    """Wall time of one synchronized call (used only to size the warm-up and the repetition count)."""
    _sync(device)
    t0 = time.perf_counter()
    fn(i)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench(fn: Callable[[int], object], n_inputs: int, device: torch.device,
          settings: Optional[Settings] = None, quick: bool = False) -> Timing:
    """Time `fn(i)`, where i picks input set i % n_inputs (the caller holds the input sets).

    fn must not return before its work is queued; on CUDA it must run on the current stream."""
    device = torch.device(device)
    s = settings or SETTINGS[("cuda" if device.type == "cuda" else "cpu", quick)]
    n_inputs = max(1, int(n_inputs))

    reps = _warm_up(fn, n_inputs, device, s)

    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(device)
        for r in range(reps):
            starts[r].record()
            fn(r % n_inputs)
            ends[r].record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    else:
        for r in range(reps):
            t0 = time.perf_counter()
            fn(r % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def _warm_up(fn: Callable[[int], object], n_inputs: int, device: torch.device, s: Settings) -> int:
    """At least 2 calls (the first may compile), then until warmup_ms has passed; returns how many
    repetitions fit in target_ms (clamped to [min_reps, max_reps])."""
    calls, spent, last = 0, 0.0, 0.0
    while calls < 2 or spent < s.warmup_ms:
        last = _one_call_ms(fn, calls % n_inputs, device)
        spent += last
        calls += 1
        if calls >= 1000:
            break
    est = max(last, 1e-3)
    return int(min(s.max_reps, max(s.min_reps, s.target_ms // est)))


# Whether CPU runs time the providers of a case in interleaved rounds (the default); GPU runs time them
# one after another. Tests turn it off to run the sequential path (the GPU one) on CPU.
INTERLEAVE_CPU = True


def interleave(device: torch.device) -> bool:
    return torch.device(device).type == "cpu" and INTERLEAVE_CPU


def bench_interleaved(fns: Dict[Any, Callable[[int], object]], n_inputs: int, device: torch.device,
                      settings: Optional[Settings] = None, quick: bool = False) -> Dict[str, Timing]:
    """Time several callables of one case against each other: each is warmed up and gets the
    repetition count `bench` would give it, but the repetitions run in rounds, one call of each
    callable per round, the order rotating every round. Every call is timed on its own
    (synchronized on a GPU), so per-call figures mean what they mean in `bench`.

    Each call takes the input set after the previous call's, whichever provider made it. The providers'
    sets share storage (views of the same tensors), so when a round gave every provider the same set,
    all but the round's first found their inputs in the cache the first had just filled: a provider's
    median mixed cold calls with calls warmed by its peers, by an amount that depended on the order.
    Now a set comes back only after n_inputs calls, which the rotation sizes to overflow the last-level
    cache, as in `bench`."""
    device = torch.device(device)
    s = settings or SETTINGS[("cuda" if device.type == "cuda" else "cpu", quick)]
    n_inputs = max(1, int(n_inputs))
    names = list(fns)
    reps = {name: _warm_up(fns[name], n_inputs, device, s) for name in names}
    times: Dict[Any, list] = {name: [] for name in names}
    call = 0  # every call takes the next input set, whichever provider makes it
    for r in range(max(reps.values(), default=0)):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if r < reps[name]:
                times[name].append(_one_call_ms(fns[name], call % n_inputs, device))
                call += 1
    return {name: summarize(times[name]) for name in names}


def rotation_count(bytes_per_set: int, device: torch.device, *, max_sets: int = 8) -> int:
    """How many input sets to rotate through so that together they overflow the last-level cache
    (assumed 64 MB, above H100's 50 MB L2; on CPU the same figure covers typical L3 slices), never
    fewer than 2 and never more than `max_sets` (memory)."""
    cache = 64 * 2**20
    need = -(-2 * cache // max(1, int(bytes_per_set)))
    return int(min(max_sets, max(2, need)))
