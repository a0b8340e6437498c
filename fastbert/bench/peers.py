"""Peer providers: what a CPU user runs a BERT encoder with instead of PyTorch (CPU, fp32, inference).

Both start from one ONNX export per model, shared (`onnx_export`):
  torch.onnx.export(dynamo=False), the TorchScript exporter: opset 17, inputs input_ids and
  attention_mask with dynamic batch and sequence axes, output last_hidden_state, HF's eager attention.
  Why this exporter: with torch 2.13 and onnxscript 0.7 the dynamo exporter (dynamo=True) gives a
  correct graph, but ONNX Runtime's optimizer fuses no Attention and no EmbedLayerNormalization in it
  (only SkipLayerNormalization and BiasGelu), and it takes ~10 s for a 2-layer BERT against < 1 s.
  The TorchScript exporter's graph of HF's eager attention fuses completely; of HF's sdpa attention,
  its Attention does not fuse either. (The TorchScript exporter is deprecated in torch 2.13 but works;
  it needs the onnx package, not onnxscript.)

  onnxruntime  onnxruntime.transformers.optimizer.optimize_model(model_type="bert", num_heads,
               hidden_size; its default opt_level), which fuses EmbedLayerNormalization, Attention,
               BiasGelu and SkipLayerNormalization; run in fp32 on CPUExecutionProvider with
               ORT_ENABLE_ALL graph optimizations, intra-op threads = torch.get_num_threads(), inter-op
               threads 1 (sequential execution), "session.force_spinning_stop" = 1 (its worker threads
               stop spinning when a call returns, so they take no core from the provider timed next in
               an interleaved round). The fused graph reads attention_mask as one length per row
               (EmbedLayerNormalization's mask_index): right only for right padding, which is what the
               benchmark's inputs have (left padding, or a hole in the mask, put bert-tiny's error at ~0.06).
  openvino     ov.Core().read_model of the same ONNX file, compiled for "CPU" with
               INFERENCE_PRECISION_HINT f32 (OpenVINO defaults to bf16 on CPUs with AMX or avx512_bf16),
               INFERENCE_NUM_THREADS = torch.get_num_threads(), NUM_STREAMS 1, PERFORMANCE_HINT LATENCY
               (one request at a time, as every provider here). Not openvino.convert_model: its model
               conversion tool (ovc) sends telemetry events by default, and without network it spent ~7 s
               per conversion on them here; read_model's graph fuses each layer's attention into one node
               just the same.

Both get the benchmark's own fp32 weights (a deep copy of the model every provider starts from), the
same padded input sets (input_ids + attention_mask; the varlen workload in its padded form, as HF
gets it) and return last_hidden_state as a torch tensor. Export, optimization and compilation happen
once per model, when the provider is built, and are not timed. What each build produced (the fused
operators of ONNX Runtime's optimizer, the attention nodes of OpenVINO's compiled graph, the settings
read back, the build time) is its `info`, recorded in env.peer_builds and printed in results.md, so
that a graph that failed to fuse is visible next to its timings.
"""
from __future__ import annotations

import collections
import copy
import importlib
import os
import tempfile
import time
import warnings
import weakref
from typing import Dict, Optional

import torch

PEERS = ("onnxruntime", "openvino")
# both need onnx: the TorchScript exporter writes the model with it
PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
EXPORTER = (f"torch.onnx.export(dynamo=False) (the TorchScript exporter), opset {OPSET}, HF eager attention, "
            "dynamic batch and sequence")


def _import(pkg: str):
    return importlib.import_module(pkg)  # the one place peers' packages are checked (tests replace it)


def import_problem(name: str) -> Optional[str]:
    """Why peer `name` cannot be built here (a package missing), or None."""
    missing = []
    for pkg in PACKAGES[name]:
        try:
            _import(pkg)
        except ImportError:
            missing.append(pkg)
        except Exception as e:  # a broken install failing inside its import
            missing.append(f"{pkg} ({type(e).__name__}: {e})")
    if not missing:
        return None
    return (f"{', '.join(missing)} not importable: install the peers extra "
            "(pip install onnxruntime onnx openvino, or fastbert[peers])")


# ----------------------------------------------------------------------------------------------
# the shared ONNX export
# ----------------------------------------------------------------------------------------------
class _LastHidden(torch.nn.Module):
    """The HF model as a function of (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _example_inputs(vocab: int):
    """The trace inputs: B = 2, S = 8, the second row half padding (a data-dependent branch of the
    mask code, if one is traced, then takes the masked path)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 4:] = 0
    ids = torch.randint(1, max(2, min(1000, vocab)), (2, 8), generator=g) * mask
    return ids, mask


class _Export:
    """One model's ONNX file in a temporary directory (removed by `release` or when collected)."""

    def __init__(self, base_model: torch.nn.Module):
        t0 = time.perf_counter()
        m = copy.deepcopy(base_model).float().eval()
        m.set_attn_implementation("eager")  # the attention pattern ONNX Runtime's optimizer fuses
        # eval() on the wrapper too: the TorchScript exporter restores the wrapper's training flag after
        # exporting, recursively, so a wrapper left in training mode would switch dropout on in the model
        wrapped = _LastHidden(m).eval()
        example = _example_inputs(int(getattr(base_model.config, "vocab_size", 30522)))
        self._dir = tempfile.TemporaryDirectory(prefix="fastbert-bench-onnx-")
        self.path = os.path.join(self._dir.name, "model.onnx")
        axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES + (OUTPUT_NAME,)}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice, tracer warnings
            torch.onnx.export(wrapped, example, self.path, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        self.seconds = time.perf_counter() - t0

    def cleanup(self) -> None:
        self._dir.cleanup()


_EXPORTS: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def onnx_export(base_model: torch.nn.Module) -> _Export:
    """base_model's ONNX export, made on the first call (a failure is remembered and raised again)."""
    e = _EXPORTS.get(base_model)
    if e is None:
        try:
            e = _Export(base_model)
        except Exception as exc:
            e = exc
        _EXPORTS[base_model] = e
    if isinstance(e, Exception):
        raise e
    return e


def release(base_model: torch.nn.Module) -> None:
    """Drop base_model's export (once its peers are built)."""
    e = _EXPORTS.pop(base_model, None)
    if isinstance(e, _Export):
        e.cleanup()


# ----------------------------------------------------------------------------------------------
# the runners
# ----------------------------------------------------------------------------------------------
class OrtRunner:
    """ONNX Runtime on CPUExecutionProvider, fp32 (see the module doc)."""

    def __init__(self, base_model: torch.nn.Module):
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = base_model.config
        layers, heads, hidden = int(cfg.num_hidden_layers), int(cfg.num_attention_heads), int(cfg.hidden_size)
        threads = torch.get_num_threads()
        export = onnx_export(base_model)
        t0 = time.perf_counter()
        optimized = optimize_model(export.path, model_type="bert", num_heads=heads, hidden_size=hidden)
        fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        complete = bool(optimized.is_fully_optimized(fused)) and fused.get("Attention", 0) == layers
        model_bytes = optimized.model.SerializeToString()
        del optimized
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        del model_bytes
        ran_on = self.session.get_providers()
        if ran_on[:1] != ["CPUExecutionProvider"]:
            raise RuntimeError(f"onnxruntime session runs on {ran_on}, not CPUExecutionProvider")
        self.info = {
            "onnxruntime": ort.__version__,
            "onnx": _version("onnx"),
            "export": EXPORTER,
            "optimizer": (f"onnxruntime.transformers.optimizer.optimize_model(model_type='bert', num_heads={heads}, "
                          f"hidden_size={hidden})"),
            "fused_ops": fused,
            "fully_fused": complete,
            "expected": (f"EmbedLayerNormalization 1, Attention {layers}, Gelu/BiasGelu {layers}, "
                         f"SkipLayerNormalization/LayerNormalization >= {2 * layers}"),
            "session": (f"CPUExecutionProvider, fp32, ORT_ENABLE_ALL, intra-op threads {threads} "
                        "(torch.get_num_threads()), inter-op threads 1, sequential, force_spinning_stop"),
            "build_s": {"export": round(export.seconds, 1), "optimize+session": round(time.perf_counter() - t0, 1)},
        }

    def forward(self, inp: dict) -> torch.Tensor:
        feed = {n: inp[n].numpy() for n in INPUT_NAMES}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feed)[0])


class OpenVinoRunner:
    """OpenVINO on "CPU", fp32 (see the module doc)."""

    def __init__(self, base_model: torch.nn.Module):
        import openvino as ov

        layers = int(base_model.config.num_hidden_layers)
        threads = torch.get_num_threads()
        export = onnx_export(base_model)
        t0 = time.perf_counter()
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = core.compile_model(core.read_model(export.path), "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        if precision != "f32":
            raise RuntimeError(f"OpenVINO compiled with inference precision {precision}, not f32")
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        layer_types, attention = collections.Counter(), collections.Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
            if kind in ("Const", "Input", "Output", "Parameter", "Result"):
                continue
            layer_types[kind] += 1
            names = rt["originalLayersNames"].astype(str).lower() if "originalLayersNames" in rt else ""
            if "softmax" in names or "scaledattn" in kind.lower():
                attention[kind] += 1  # a node that runs (part of) an attention's softmax core
        # fused: one node per layer holds the softmax, and no attention matmul runs as a MatMul node of
        # its own (the linear layers are FullyConnected nodes)
        fused = sum(attention.values()) == layers and layer_types.get("MatMul", 0) == 0
        self.info = {
            "openvino": ov.__version__.split("-")[0],
            "export": EXPORTER,
            "compile": (f"ov.Core().read_model(the ONNX export), compile_model CPU, INFERENCE_PRECISION_HINT "
                        f"{precision}, INFERENCE_NUM_THREADS {self.compiled.get_property('INFERENCE_NUM_THREADS')} "
                        f"(torch.get_num_threads() = {threads}), NUM_STREAMS "
                        f"{self.compiled.get_property('NUM_STREAMS')}, PERFORMANCE_HINT LATENCY, ENABLE_CPU_PINNING "
                        f"{self.compiled.get_property('ENABLE_CPU_PINNING')}"),
            "attention_nodes": dict(attention),
            "matmul_nodes": layer_types.get("MatMul", 0),
            "layer_types": dict(layer_types.most_common()),
            "expected": f"the softmax of each of the {layers} layers in one node, no MatMul nodes",
            "fully_fused": fused,
            "build_s": {"export": round(export.seconds, 1), "read+compile": round(time.perf_counter() - t0, 1)},
        }

    def forward(self, inp: dict) -> torch.Tensor:
        res = self.request.infer({n: inp[n].numpy() for n in INPUT_NAMES})
        return torch.from_numpy(res[self.output])


RUNNERS = {"onnxruntime": OrtRunner, "openvino": OpenVinoRunner}


def build(name: str, base_model: torch.nn.Module):
    """Peer `name`'s runner for base_model: .forward(inputs) -> last_hidden_state, .info."""
    return RUNNERS[name](base_model)


def summary(info: Dict) -> str:
    """One line for results.md: what a peer build produced."""
    short = "" if info["fully_fused"] else f" (**not fully fused**: expected {info['expected']})"
    build = ", ".join(f"{k} {v} s" for k, v in (info.get("build_s") or {}).items())
    if "fused_ops" in info:
        fused = ", ".join(f"{k} {v}" for k, v in info["fused_ops"].items()) or "nothing"
        return (f"onnxruntime {info['onnxruntime']} (onnx {info['onnx']}): {info['export']}; {info['optimizer']} "
                f"fused {fused}{short}; {info['session']}; build {build}")
    att = ", ".join(f"{k} {v}" for k, v in info["attention_nodes"].items()) or "none found"
    return (f"openvino {info['openvino']}: {info['export']}; {info['compile']}; compiled graph: attention softmax in "
            f"{att}, MatMul nodes {info['matmul_nodes']}{short}; build {build}")


def _version(mod: str) -> Optional[str]:
    try:
        return importlib.import_module(mod).__version__
    except Exception:
        return None
