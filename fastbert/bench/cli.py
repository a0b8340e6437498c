"""python -m fastbert.bench [--quick] [--out DIR] [...]   (also the `fastbert-bench` console script)

Runs, in one process on one device, the model-level comparison (providers x models x workloads x
modes x dtypes) and the op-level one (fastbert ops against PyTorch), then writes DIR/results.json,
DIR/results.md and PNG plots. Defaults depend on the device:

  GPU  models bert-base, bert-large, minilm-l6; B in {1, 8, 32, 128} x S in {128, 256, 512} plus
       a varlen workload per shape; modes infer, train; dtypes float16, bfloat16, float32;
       ops at BERT-base shapes on the same grid, modes fwd, bwd and fwd+bwd.
  CPU  models bert-base, minilm-l6; B in {1, 8}, S = 128 (+ varlen); infer; float32;
       ops at BERT-base shapes, B in {1, 8}, S = 128, modes fwd, bwd and fwd+bwd, and the layer's
       four GEMMs on each CPU GEMM library (fwd).
  --quick  GPU: bert-base and minilm-l6, B = 8, S in {128, 512}, bfloat16, infer + train, no compile.
           CPU: minilm-l6 and bert-base, B = 1, S = 128, infer, float32, no torch.compile; ops fwd.
Every option overrides the default it names.
"""
from __future__ import annotations

import argparse
from typing import List

import torch


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> List[int]:
    try:
        vals = [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return vals


DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbert.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="a short run (see above)")
    p.add_argument("--out", default="bench-out", help="output directory (created; default bench-out)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--models", type=_csv, default=None,
                   help="comma-separated: bert-base, bert-large, minilm-l6 (or a local checkpoint dir)")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="a local checkpoint directory, added to the models (repeatable)")
    p.add_argument("--providers", type=_csv, default=None,
                   help="model-level providers (default: all): hf-eager, hf-sdpa, hf-sdpa-compile, fastbert, "
                        "fastbert-padded, fastbert-<triton|cuda|cpu>[-padded], fastbert-<triton|cuda>-cudagraph; "
                        "CPU peers onnxruntime, openvino (the peers extra)")
    p.add_argument("--batch", type=_ints, default=None, help="batch sizes, e.g. 1,8")
    p.add_argument("--seq", type=_ints, default=None, help="sequence lengths, e.g. 128,512")
    p.add_argument("--no-varlen", action="store_true", help="skip the variable-length workload")
    p.add_argument("--modes", type=_csv, default=None, help="infer,train")
    p.add_argument("--dtypes", type=_csv, default=None, help="float16,bfloat16,float32")
    p.add_argument("--ops", type=_csv, default=None,
                   help="attention,add_layer_norm,linear_gelu,bias_gelu (default: all; 'none' for none)")
    p.add_argument("--op-model", default="bert-base", help="whose shapes the op-level cases use (default bert-base)")
    p.add_argument("--op-batch", type=_ints, default=None, help="op-level batch sizes (default: --batch)")
    p.add_argument("--op-seq", type=_ints, default=None, help="op-level sequence lengths (default: --seq)")
    p.add_argument("--op-modes", type=_csv, default=None,
                   help="fwd,bwd,fwd+bwd (bwd: the backward alone; fwd+bwd: forward with autograd, then backward)")
    p.add_argument("--no-models", action="store_true", help="op level only")
    p.add_argument("--append", action="store_true",
                   help="add this run's rows to DIR/results.json of an earlier run on the same device and "
                        "commit (its measured limits are reused), then rewrite results.md and the plots: "
                        "a long grid can be run in pieces")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads(N) for the whole run (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def apply_defaults(args, dev: str) -> None:
    """Fill every option left unset with the default of device type `dev` (see the module doc) and
    check the names given; SystemExit names a bad option."""
    gpu = dev == "cuda"
    q = args.quick
    if args.models is None:
        args.models = (["bert-base", "minilm-l6"] if q else ["bert-base", "bert-large", "minilm-l6"]) if gpu \
            else ["minilm-l6", "bert-base"]
    args.models = list(args.models) + list(args.model)
    if args.batch is None:
        args.batch = ([8] if q else [1, 8, 32, 128]) if gpu else ([1] if q else [1, 8])
    if args.seq is None:
        args.seq = ([128, 512] if q else [128, 256, 512]) if gpu else [128]
    if args.modes is None:
        args.modes = ["infer", "train"] if gpu else ["infer"]
    if args.dtypes is None:
        args.dtypes = (["bfloat16"] if q else ["float16", "bfloat16", "float32"]) if gpu else ["float32"]
    if args.ops is None:
        from fastbert.bench.opbench import GEMMS, OPS

        # the GEMM library rows compare CPU GEMM libraries; a GPU run has no use for them
        args.ops = [op for op in OPS if not (gpu and op in GEMMS)]
    elif args.ops == ["none"]:
        args.ops = []
    if args.op_batch is None:
        args.op_batch = args.batch
    if args.op_seq is None:
        args.op_seq = args.seq
    from fastbert.bench import opbench, providers

    if args.op_modes is None:
        args.op_modes = ["fwd"] if (q and not gpu) else list(opbench.MODES)

    for name in args.providers or []:
        try:
            providers.parse(name)
        except ValueError as e:
            raise SystemExit(str(e))
    for op in args.ops:
        if op not in opbench.OPS:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from {', '.join(opbench.OPS)} or none")
    for m in args.modes:
        if m not in ("infer", "train"):
            raise SystemExit(f"--modes: unknown mode {m!r} (infer, train)")
    for m in args.op_modes:
        if m not in opbench.MODES:
            raise SystemExit(f"--op-modes: unknown mode {m!r} ({', '.join(opbench.MODES)})")
    for d in args.dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r} (float16, bfloat16, float32)")
    args.dtypes = list(dict.fromkeys(str(DTYPES[d]).replace("torch.", "") for d in args.dtypes))
