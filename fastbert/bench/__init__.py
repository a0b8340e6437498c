"""The benchmark runner behind `python -m fastbert.bench` (and the `fastbert-bench` console script).

Modules:
  timing     how one callable is timed (CUDA events on a GPU, perf_counter on CPU), with inputs rotated
  limits     this machine's own limits, measured at start: matmul FLOP/s and copy bandwidth
  models     model configs (random weights), workloads (grid and variable-length), FLOP formulas
  providers  who runs a model: hf-eager, hf-sdpa, hf-sdpa-compile, fastbert-<backend>[-padded|-cudagraph],
             and on CPU the peers onnxruntime and openvino
  peers      the peers: ONNX export + ONNX Runtime's transformer optimizer, OpenVINO (optional packages)
  opbench    op-level cases: fastbert ops against their PyTorch compositions
  report     results.json (schema in benchmarks/results/README.md), results.md and the PNG plots
  __main__   the command line

Nothing here is imported by fastbert itself; it imports transformers, matplotlib, tqdm and the
peers' packages (onnxruntime, onnx, openvino) lazily.
"""
