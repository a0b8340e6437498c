"""pytest plugin for the HF model-suite subprocess (see tests/hf/test_hf_suite.py).

FASTBERT_HF_SUITE_PATCH=1: every supported base model is fastbert-patched at the end of its own
__init__ (PreTrainedModel.post_init), so each model the HF tests build, load or copy runs patched.
FASTBERT_HF_SUITE_REPORT=<file>: at the end, a JSON summary of how many forwards took the fused path,
how many ran HF's code, and why (the fallback reasons fastbert warned about).
"""
import collections
import json
import os
import sys

import pytest

PATCH = os.environ.get("FASTBERT_HF_SUITE_PATCH") == "1"
_counts = collections.Counter()
_reasons = collections.Counter()


def pytest_configure(config):
    sys.path.insert(0, os.environ["FASTBERT_HF_SUITE_DIR"])
    if not PATCH:
        return
    import transformers

    import fastbert
    from fastbert.hf import patching, table

    original = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if table.find_architecture(self) is not None:
            fastbert.patch(self)

    transformers.PreTrainedModel.post_init = post_init

    fast, fallback, note = patching._fast_forward, patching._fallback, patching._note_fallback

    def counted_fast(*a, **k):
        _counts["fused"] += 1
        return fast(*a, **k)

    def counted_fallback(*a, **k):
        _counts["hf"] += 1
        return fallback(*a, **k)

    def noted(base, state, reasons):
        _reasons["; ".join(reasons)] += 1
        return note(base, state, reasons)

    patching._fast_forward, patching._fallback, patching._note_fallback = counted_fast, counted_fallback, noted


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTBERT_HF_SUITE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"patched": PATCH, "calls": dict(_counts), "fallback_reasons": dict(_reasons)}, f, indent=1)


@pytest.fixture(autouse=True)
def _same_inputs_in_both_runs():
    """HF's random inputs come from an unseeded module-level Random: seed it per test, so that the
    plain and the patched run see the same inputs and their outcomes can be compared."""
    import random

    import torch
    from hf_model_tests import test_modeling_common as common

    common.global_rng.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    yield
