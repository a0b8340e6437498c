"""Who runs a model in the benchmark, and why one cannot run here.

Model-level providers (every one gets a deep copy of the same fp32 weights, cast to the row's dtype):
  hf-eager                  transformers, attn_implementation="eager"
  hf-sdpa                   transformers, attn_implementation="sdpa" (the baseline of every speedup)
  hf-sdpa-compile           torch.compile of hf-sdpa (default mode, one compile per shape, not timed)
  fastbert                  fastbert.patch(model) with fastbert's own per-op backend choice, padding-free
  fastbert-padded           the same, padding_free=False
  fastbert-<b>              fastbert.patch(model, backend=b), every op forced onto backend b
                            (b in triton, cuda, cpu) with `fastbert.use_backend(b)`, padding-free
  fastbert-<b>-padded       the same, padding_free=False
  fastbert-<b>-cudagraph    GPU only, inference only: fastbert-<b>-padded captured in one CUDA graph
                            per input set and replayed (small-batch latency; padding-free mode packs
                            tokens with data-dependent shapes, which a graph cannot hold)
  onnxruntime               CPU only, fp32 inference: the model exported to ONNX (torch.onnx's TorchScript
                            exporter), fused by onnxruntime.transformers.optimizer (model_type "bert": Attention,
                            EmbedLayerNormalization, SkipLayerNormalization, BiasGelu), run on
                            CPUExecutionProvider, ORT_ENABLE_ALL, intra-op threads = torch.get_num_threads()
  openvino                  CPU only, fp32 inference: the same ONNX export read by OpenVINO, compiled for
                            "CPU" with INFERENCE_PRECISION_HINT f32 and torch.get_num_threads() threads
The last two are peers (fastbert/bench/peers.py: their settings, and why this exporter): listed on CPU
runs, "skipped" with the reason where their packages (the `peers` extra: onnxruntime, onnx, openvino)
are not importable, for dtypes other than float32, for training and on a GPU. Their export and
compilation happen once per model, untimed; what each build fused is recorded in env.peer_builds.
A forced backend that cannot serve some op raises fastbert.BackendUnavailableError: the row is
"skipped" with that message, never silently served by another backend.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import List, Optional

import torch

from fastbert import backends
from fastbert.bench import peers as PEER

FASTBERT_BACKENDS = ("triton", "cuda", "cpu")
BASELINE = "hf-sdpa"


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    family: str                     # "hf", "fastbert" or "peer"
    attn: str = "sdpa"              # HF attention implementation
    compile: bool = False
    backend: Optional[str] = None   # forced fastbert backend; None = fastbert's own choice
    padding_free: bool = True
    cudagraph: bool = False


def model_provider_names(device_type: str) -> List[str]:
    names = ["hf-eager", "hf-sdpa", "hf-sdpa-compile", "fastbert", "fastbert-padded"]
    for b in FASTBERT_BACKENDS:
        names += [f"fastbert-{b}", f"fastbert-{b}-padded"]
        if device_type == "cuda" and b != "cpu":
            names.append(f"fastbert-{b}-cudagraph")
    if device_type == "cpu":
        names += list(PEER.PEERS)
    return names


def parse(name: str) -> Spec:
    if name == "hf-eager":
        return Spec(name, "hf", attn="eager")
    if name == "hf-sdpa":
        return Spec(name, "hf")
    if name == "hf-sdpa-compile":
        return Spec(name, "hf", compile=True)
    if name in PEER.PEERS:
        return Spec(name, "peer")
    parts = name.split("-")
    if parts[0] != "fastbert":
        raise ValueError(f"--providers: unknown provider {name!r}")
    rest = parts[1:]
    backend = None
    if rest and rest[0] in FASTBERT_BACKENDS:
        backend = rest.pop(0)
    if rest == []:
        return Spec(name, "fastbert", backend=backend)
    if rest == ["padded"]:
        return Spec(name, "fastbert", backend=backend, padding_free=False)
    if rest == ["cudagraph"] and backend is not None:
        return Spec(name, "fastbert", backend=backend, padding_free=False, cudagraph=True)
    raise ValueError(f"--providers: unknown provider {name!r}")


def backend_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why fastbert's `backend` cannot be benchmarked on `device` (None: it can be tried)."""
    if backend == "triton" and device.type == "cpu":
        return ("the Triton interpreter is not a benchmark: Triton kernels need a CUDA device "
                "(on CPU they run only under TRITON_INTERPRET=1, for tests)")
    if backend == "triton" and backends.triton_interpreter():
        return "TRITON_INTERPRET=1 is set: Triton would run in its interpreter, which is not a benchmark"
    if backend == "cuda" and device.type != "cuda":
        return "the cuda backend needs a CUDA device (csrc/cuda kernels)"
    why = backends.device_reasons(backend, device, forced=True)
    return "; ".join(why) if why else None


def fastbert_import_problem() -> Optional[str]:
    """The ImportError/AttributeError text if fastbert's patching API is not there (yet)."""
    try:
        import fastbert
        from fastbert.hf import patch  # noqa: F401

        fastbert.patch  # noqa: B018
    except Exception as e:  # ImportError, AttributeError, or an error inside fastbert.hf
        return f"fastbert.patch is not available: {type(e).__name__}: {e}"
    return None


def peer_unavailable(name: str, device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why peer `name` cannot be benchmarked on `device` at `dtype` (None: it can be tried)."""
    if device.type != "cpu":
        return f"{name} is a CPU-only peer provider (the comparison it is here for is CPU inference)"
    if dtype is not None and dtype != torch.float32:
        return f"{name} is benchmarked in float32 only (fp32 CPU inference against fastbert's)"
    return PEER.import_problem(name)


def unavailable(spec: Spec, device: torch.device, quick: bool, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Why `spec` cannot run on `device` (at `dtype`, if given) at all in this run (None: try it)."""
    if spec.family == "peer":
        return peer_unavailable(spec.name, device, dtype)
    if spec.compile:
        if quick:
            return "--quick skips torch.compile (compiling takes 30 s or more per shape)"
        if device.type == "cpu":
            import shutil

            if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
                return "torch.compile on CPU needs a C/C++ compiler (none on PATH)"
    if spec.cudagraph and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if spec.family == "fastbert":
        problem = fastbert_import_problem()
        if problem:
            return problem
        if spec.backend is not None:
            return backend_unavailable(spec.backend, device)
    return None


def forcing(backend: Optional[str]):
    import fastbert

    return fastbert.use_backend(backend) if backend is not None else contextlib.nullcontext()


def make_runner(spec: Spec, base_model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """spec's model: a ModelRunner, or for a peer its runner (forward only; `info` says what was built)."""
    if spec.family == "peer":
        return PEER.build(spec.name, base_model)
    return ModelRunner(spec, base_model, dtype, device)


class ModelRunner:
    """One provider's copy of the model on the device, at one dtype."""

    def __init__(self, spec: Spec, base_model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.device = device
        m = copy.deepcopy(base_model).to(device=device, dtype=dtype).eval()
        if spec.family == "hf":
            m.set_attn_implementation(spec.attn)
        else:
            import fastbert

            kwargs = {"padding_free": spec.padding_free}
            if spec.backend is not None:
                kwargs["backend"] = spec.backend
            with forcing(spec.backend):
                m = fastbert.patch(m, **kwargs)
        self.model = m
        if spec.compile:
            import torch._dynamo

            # one graph per (shape, grad mode, train flag): allow plenty before dynamo gives up
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.fn = torch.compile(m)
        else:
            self.fn = m
        self._opt = None
        self._snapshot = None

    # ---- inference ----------------------------------------------------------------------------
    def forward(self, inp: dict) -> torch.Tensor:
        with torch.no_grad(), forcing(self.spec.backend):
            return self.fn(**inp).last_hidden_state

    def graphed(self, input_sets: List[dict]):
        """Capture one CUDA graph per input set (each set's tensors are the graph's static inputs);
        returns (replay(i), outputs) where outputs[i] is set i's static output."""
        self.model.eval()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
            for inp in input_sets[:1] * 3:
                self.forward(inp)
        torch.cuda.current_stream().wait_stream(side)
        graphs, outs = [], []
        for inp in input_sets:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                outs.append(self.forward(inp))
            graphs.append(g)
        return (lambda i: graphs[i].replay()), outs

    # ---- training -----------------------------------------------------------------------------
    def start_training(self) -> None:
        """Keep a copy of the weights (restored by stop_training) and make an AdamW optimizer."""
        self._snapshot = [t.detach().clone() for t in list(self.model.parameters()) + list(self.model.buffers())]
        self._opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.model.train()

    def train_step(self, inp: dict) -> None:
        """forward + backward + optimizer step; loss = mean of squares of the valid tokens' outputs."""
        self._opt.zero_grad(set_to_none=True)
        with forcing(self.spec.backend):
            out = self.fn(**inp).last_hidden_state
            mask = inp["attention_mask"].unsqueeze(-1).to(out.dtype)
            loss = (out.float() * mask).square().sum() / mask.sum().clamp(min=1)
            loss.backward()
        self._opt.step()

    def stop_training(self) -> None:
        with torch.no_grad():
            for t, s in zip(list(self.model.parameters()) + list(self.model.buffers()), self._snapshot):
                t.copy_(s)
        self._opt = None
        self._snapshot = None
        self.model.eval()
