"""fastbert: fused, numerically exact kernels for BERT-family encoders.

    import fastbert
    model = fastbert.patch(hf_model)                      # swap fused modules into a HF model, in place
    out = fastbert.ops.attention(q, k, v, attention_mask=mask)
    print(fastbert.explain())                             # what is installed, which backend ran and why

Importing fastbert imports neither triton nor transformers; they load when first used.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

from fastbert import backends, ops, reference
from fastbert.backends import BACKENDS, BackendUnavailableError, use_backend

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "ops", "nn", "use_backend", "explain", "reference", "backends",
           "BACKENDS", "BackendUnavailableError", "__version__"]


def patch(model, **kwargs):
    """Replace, in place, each supported submodule of a Hugging Face model with its fastbert twin
    (holding the same Parameter objects) and return the model. See fastbert.hf.patch."""
    from fastbert.hf import patch as _patch

    return _patch(model, **kwargs)


def unpatch(model):
    """Restore the original Hugging Face modules of a model patched by fastbert.patch."""
    from fastbert.hf import unpatch as _unpatch

    return _unpatch(model)


def __getattr__(name):
    if name == "nn":  # drop-in modules, loaded on first use
        return importlib.import_module("fastbert.nn")
    raise AttributeError(f"module 'fastbert' has no attribute {name!r}")


def _environment_lines():
    lines = [f"fastbert {__version__}, torch {torch.__version__}, python {sys.version.split()[0]}"]
    ok, why = backends.triton_status()
    lines.append(f"triton:  {'available' if ok else 'unavailable'}: {why}"
                 + ("; TRITON_INTERPRET=1 (interpreter)" if backends.triton_interpreter() else ""))
    ok, why = backends.extension_status()
    lines.append(f"_C:      {'available' if ok else 'unavailable'}: {why}")
    cuda = torch.cuda.is_available()
    lines.append("cuda:    " + (f"{torch.cuda.get_device_name()} (torch CUDA {torch.version.cuda})" if cuda
                                else f"no CUDA device (torch CUDA build: {torch.version.cuda is not None})"))
    forced = os.environ.get("FASTBERT_BACKEND")
    lines.append(f"forced:  {backends.forced_backend() or 'none'}"
                 + (f" (FASTBERT_BACKEND={forced})" if forced else ""))
    lines.append("backends per device (default order, each with why it cannot serve, if it cannot):")
    for dev_type, order in backends.DEFAULT_ORDER.items():
        if dev_type == "cuda" and not cuda:
            continue
        dev = torch.device(dev_type)
        parts = []
        for b in order:
            why = backends.device_reasons(b, dev)
            parts.append(f"{b}" + (f" [no: {'; '.join(why)}]" if why else " [yes]"))
        lines.append(f"  {dev_type}: " + " -> ".join(parts))
    from fastbert.ops import cpu_gemm

    lines.extend(cpu_gemm.describe())
    return lines


def explain(model=None, *, file=None) -> str:
    """Say what fastbert can use here and, per op (or per module of a patched `model`), which
    backend ran last and why the ones before it were skipped. Prints to `file` if given; returns the text."""
    lines = _environment_lines()
    if model is not None:
        from fastbert.hf import explain_model

        lines.append("modules:")
        lines.extend("  " + line for line in explain_model(model))
    decisions = backends.last_decisions()
    if decisions:
        lines.append("last decision per op:")
        for d in decisions.values():
            lines.extend("  " + line for line in d.describe().splitlines())
    else:
        lines.append("no fastbert op has run yet in this process")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text
