"""Row bookkeeping shared by the model and op runs: failure rows, out-of-memory detection, freeing
memory between cases, the checkpointed row list, and merging an appended run."""
from __future__ import annotations

import gc
import time
from typing import List

import torch


def row_key(r: dict) -> tuple:
    return (r["kind"], r["name"], r["provider"], r["mode"], r["dtype"], r["batch"], r["seq"], r["varlen"])


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + ("; ".join(lines[:4])[:500] if lines else "")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(e: BaseException) -> dict:
    """Row fields for a provider that could not be measured: skipped (cannot run here: Skip, OOM, an
    unavailable backend) or error (anything else), with the reason."""
    from fastbert.bench import opbench as O

    if isinstance(e, O.Skip):
        return dict(status="skipped", reason=str(e))
    oom = is_oom(e)
    skip = oom or "BackendUnavailableError" in type(e).__name__
    return dict(status="skipped" if skip else "error", reason="out of memory" if oom else first_line(e))


class CheckpointedRows(list):
    """The run's rows; every few seconds also written to results.json (env "partial": true), so a run
    stopped by a time limit keeps what it measured (`python -m fastbert.bench.report --rewrite DIR`
    then makes results.md and the plots from it)."""

    def __init__(self, save, every_s: float = 5.0):
        super().__init__()
        self._save, self._every, self._last = save, every_s, time.time()

    def append(self, row) -> None:
        super().append(row)
        if time.time() - self._last >= self._every:
            self._save(self)
            self._last = time.time()




def merge_appended(old_rows: List[dict], rows: List[dict]) -> List[dict]:
    """An --append run's rows after the earlier run's: a case measured again replaces its earlier row
    (and a provider's earlier "every shape" skip row)."""
    full = {row_key(r) for r in rows}
    groups = {row_key(r)[:5] for r in rows}
    kept = [r for r in old_rows if row_key(r) not in full and not (r["batch"] is None and row_key(r)[:5] in groups)]
    return kept + list(rows)
