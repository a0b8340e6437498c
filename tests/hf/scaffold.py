"""Scaffolding for the patching tests.

While fastbert.ops.attention is still being written by its owner, the patched models would have no
attention op to call: this conftest then installs, FOR THESE TESTS ONLY, a stand-in that runs
fastbert.reference.attention (the op's defined semantics, on the torch backend), and marks it so that
the tests forcing the triton backend skip with a reason. Once the real op lands, nothing is installed.
"""
import pytest

from fastbert import ops, reference

REAL_ATTENTION = hasattr(ops, "attention")
REAL_LINEAR_GELU = hasattr(ops, "linear_gelu")

if not REAL_ATTENTION:
    def _reference_attention(q, k, v, **kw):
        if kw.get("dropout_p", 0.0) > 0.0:
            kw["seed"] = reference.make_seed(q.device)
        return reference.attention(q, k, v, **kw)

    ops.attention = _reference_attention

if not REAL_LINEAR_GELU:
    def _reference_linear_gelu(x, weight, bias=None, *, approximate="none"):
        return reference.linear_gelu(x, weight, bias, approximate=approximate)

    ops.linear_gelu = _reference_linear_gelu


def require_real_ops():
    """Skip a test that forces a kernel backend while an op is still a stand-in."""
    missing = [n for n, ok in (("attention", REAL_ATTENTION), ("linear_gelu", REAL_LINEAR_GELU)) if not ok]
    if missing:
        pytest.skip(f"fastbert.ops.{', '.join(missing)} not available yet (stand-in from fastbert.reference "
                    "cannot run on a forced kernel backend)")
