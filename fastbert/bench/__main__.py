"""python -m fastbert.bench [--quick] [--out DIR] [...]   (also the `fastbert-bench` console script)

Runs, in one process on one device, the model-level comparison (providers x models x workloads x
modes x dtypes) and the op-level one (fastbert ops against PyTorch), then writes DIR/results.json,
DIR/results.md and PNG plots. Defaults depend on the device:

  GPU  models bert-base, bert-large, minilm-l6; B in {1, 8, 32, 128} x S in {128, 256, 512} plus
       a varlen workload per shape; modes infer, train; dtypes float16, bfloat16, float32;
       ops at BERT-base shapes on the same grid, modes fwd, bwd and fwd+bwd.
  CPU  models bert-base, minilm-l6; B in {1, 8}, S = 128 (+ varlen); infer; float32;
       ops at BERT-base shapes, B in {1, 8}, S = 128, modes fwd, bwd and fwd+bwd.
  --quick  GPU: bert-base and minilm-l6, B = 8, S in {128, 512}, bfloat16, infer + train, no compile.
           CPU: minilm-l6 and bert-base, B = 1, S = 128, infer, float32, no torch.compile; ops fwd.
Every option overrides the default it names.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import List, Optional

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
                        "fastbert-padded, fastbert-<triton|cuda|cpu>[-padded], fastbert-<triton|cuda>-cudagraph")
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


def _defaults(args, dev: str) -> None:
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
        from fastbert.bench.opbench import OPS

        args.ops = list(OPS)
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


CUDAGRAPH_MAX_BATCH = 8


def _record_dispatch(env: dict, key: str) -> None:
    """Which backend fastbert's own choice gave each op (the last decision per op), once per key."""
    table = env.setdefault("fastbert_auto_backends", {})
    if key not in table:
        from fastbert import backends

        table[key] = {op: d.backend for op, d in backends.last_decisions().items() if not d.forced}


def _row_key(r: dict) -> tuple:
    return (r["kind"], r["name"], r["provider"], r["mode"], r["dtype"], r["batch"], r["seq"], r["varlen"])


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + ("; ".join(lines[:4])[:500] if lines else "")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# model level
# ----------------------------------------------------------------------------------------------
def run_models(args, device, env, rows, bar) -> None:
    from fastbert.bench import models as M
    from fastbert.bench import providers as P
    from fastbert.bench import report as R
    from fastbert.bench import timing

    provs = args.providers or P.model_provider_names(device.type)
    specs = [P.parse(p) for p in provs]
    wls = M.workloads(args.batch, args.seq, not args.no_varlen)
    per_provider = len(wls) * len(args.modes)

    for mname in args.models:
        n_jobs = len(args.dtypes) * len(specs) * per_provider
        try:
            label, base = M.build_model(mname, seed=args.seed)
        except Exception as e:
            rows.append(R.make_row(kind="model", name=mname, status="error", reason=_first_line(e)))
            bar.update(n_jobs)
            continue
        cfg = base.config
        vocab = int(getattr(cfg, "vocab_size", 30522))
        n_sets = 3  # weights (>= 40 MB) already overflow the caches; rotate token ids anyway
        inputs = {w: M.make_inputs(w, vocab, n_sets, device, seed=args.seed) for w in wls}
        # the yardstick: HF eager in fp32 (IEEE: TF32 is off for the whole run) on the same inputs
        ref_model = P.ModelRunner(P.parse("hf-eager"), base, torch.float32, device)
        refs = {}
        for w in wls:
            try:
                refs[w] = ref_model.forward(inputs[w][0]).float().cpu()
            except Exception as e:
                refs[w] = None
                if not _is_oom(e):
                    raise
        del ref_model
        _free(device)

        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            if timing.interleave(device):
                # every provider's model at once, timed against each other workload by workload
                runners = {}
                for spec in specs:
                    runner = _make_runner(args, device, rows, bar, spec, base, dtype, label, dname, per_provider)
                    if runner is not None:
                        runners[spec] = runner
                for w in wls:
                    bar.set_postfix_str(f"{label} {dname} {w.label()} (all providers)", refresh=False)
                    _run_workload_interleaved(args, device, env, rows, bar, runners, label, cfg, dname, w,
                                              inputs[w], refs.get(w))
                del runners
                _free(device)
                continue
            for spec in specs:
                runner = _make_runner(args, device, rows, bar, spec, base, dtype, label, dname, per_provider)
                if runner is None:
                    continue
                for w in wls:
                    bar.set_postfix_str(f"{label} {dname} {spec.name} {w.label()}", refresh=False)
                    _run_workload(args, device, env, rows, bar, runner, spec, label, cfg, dname, w, inputs[w],
                                  refs.get(w))
                del runner
                _free(device)
        del base
        _free(device)


def _make_runner(args, device, rows, bar, spec, base, dtype, label, dname, per_provider):
    """spec's model at dtype on device, or None after writing its skipped rows (with the reason)."""
    from fastbert.bench import providers as P
    from fastbert.bench import report as R

    why = P.unavailable(spec, device, args.quick)
    if why is None:
        try:
            return P.ModelRunner(spec, base, dtype, device)
        except Exception as e:
            why = _first_line(e)
    for mode in args.modes:
        rows.append(R.make_row(kind="model", name=label, provider=spec.name, mode=mode, dtype=dname,
                               status="skipped", reason=why))
    bar.update(per_provider)
    return None


def _check_workload(env, runner, spec, label, dname, w, sets, ref):
    """Correctness first, on the untrained weights: (max |out - HF fp32| over valid tokens or None,
    the reason the output is unusable or None, the CUDA-graph replay or None). Raises if the provider
    fails to run."""
    replay, err, err_reason = None, None, None
    if spec.cudagraph and not sets:
        out = None
    elif spec.cudagraph:
        replay, outs = runner.graphed(sets)
        replay(0)
        out = outs[0]
    else:
        out = runner.forward(sets[0])
    if spec.family == "fastbert" and spec.backend is None:
        _record_dispatch(env, f"{label} {dname} {spec.name}")
    if ref is not None and out is not None:
        valid = sets[0]["attention_mask"].bool().cpu()
        err = float((out.float().cpu() - ref).abs()[valid].max()) if valid.any() else 0.0
        if not math.isfinite(err):
            err_reason = f"output has NaN/inf at valid tokens (max abs err {err})"
    return err, err_reason, replay


def _mode_skip(spec, w, mode) -> Optional[str]:
    if spec.cudagraph and w.batch > CUDAGRAPH_MAX_BATCH:
        return f"the CUDA graphs variant runs only for batch <= {CUDAGRAPH_MAX_BATCH} (it targets small-batch latency)"
    if mode == "train" and spec.cudagraph:
        return "the CUDA graphs variant is inference only"
    return None


def _mode_fn(runner, sets, mode, replay):
    if mode == "infer":
        return replay if replay is not None else (lambda i: runner.forward(sets[i]))
    return lambda i: runner.train_step(sets[i])


def _run_workload(args, device, env, rows, bar, runner, spec, label, cfg, dname, w, sets, ref) -> None:
    from fastbert.bench import models as M
    from fastbert.bench import report as R
    from fastbert.bench import timing

    common = dict(kind="model", name=label, provider=spec.name, dtype=dname, batch=w.batch, seq=w.seq, varlen=w.varlen)
    if spec.cudagraph and w.batch > CUDAGRAPH_MAX_BATCH:
        sets = sets[:0]  # nothing to capture: every mode is skipped below
    try:
        err, err_reason, replay = _check_workload(env, runner, spec, label, dname, w, sets, ref)
    except Exception as e:
        for mode in args.modes:
            rows.append(R.make_row(**common, mode=mode, **_failure(e)))
        bar.update(len(args.modes))
        _free(device)
        return

    for mode in args.modes:
        skip = _mode_skip(spec, w, mode)
        if err_reason is not None or skip is not None:
            rows.append(R.make_row(**common, mode=mode, status="error" if skip is None else "skipped",
                                   reason=err_reason if skip is None else skip))
            bar.update(1)
            continue
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if mode == "train":
                runner.start_training()
            try:
                t = timing.bench(_mode_fn(runner, sets, mode, replay), len(sets), device, quick=args.quick)
            finally:
                if mode == "train":
                    runner.stop_training()
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            fig = R.figures(t, tokens=w.tokens, flops=M.model_flops(cfg, w, mode), nbytes=None, dtype=dname, env=env)
            rows.append(R.make_row(**common, mode=mode, **fig, max_abs_err=err, peak_mem_mb=peak, status="ok"))
        except Exception as e:
            rows.append(R.make_row(**common, mode=mode, status="skipped" if _is_oom(e) else "error",
                                   reason="out of memory" if _is_oom(e) else _first_line(e)))
            _free(device)
        bar.update(1)


def _run_workload_interleaved(args, device, env, rows, bar, runners, label, cfg, dname, w, sets, ref) -> None:
    """CPU: one workload on every provider, each checked for correctness, then timed against the others
    in interleaved rounds (timing.bench_interleaved), so a machine whose speed drifts slows them alike."""
    from fastbert.bench import models as M
    from fastbert.bench import report as R
    from fastbert.bench import timing

    def common(spec):
        return dict(kind="model", name=label, provider=spec.name, dtype=dname, batch=w.batch, seq=w.seq,
                    varlen=w.varlen)

    checked = {}
    for spec, runner in runners.items():
        try:
            checked[spec] = _check_workload(env, runner, spec, label, dname, w, sets, ref)
        except Exception as e:
            for mode in args.modes:
                rows.append(R.make_row(**common(spec), mode=mode, **_failure(e)))
            bar.update(len(args.modes))
    for mode in args.modes:
        fns = {}
        for spec, (err, err_reason, replay) in checked.items():
            skip = _mode_skip(spec, w, mode)
            if err_reason is not None or skip is not None:
                rows.append(R.make_row(**common(spec), mode=mode, status="error" if skip is None else "skipped",
                                       reason=err_reason if skip is None else skip))
                bar.update(1)
                continue
            fns[spec] = _mode_fn(runners[spec], sets, mode, replay)
        started = []
        try:
            if mode == "train":
                for spec in fns:
                    runners[spec].start_training()
                    started.append(spec)
            times = timing.bench_interleaved(fns, len(sets), device, quick=args.quick)
        except Exception as e:
            times = {spec: e for spec in fns}
        finally:
            for spec in started:
                runners[spec].stop_training()
        for spec in fns:
            t = times[spec]
            if isinstance(t, BaseException):
                rows.append(R.make_row(**common(spec), mode=mode, **_failure(t)))
            else:
                fig = R.figures(t, tokens=w.tokens, flops=M.model_flops(cfg, w, mode), nbytes=None, dtype=dname,
                                env=env)
                rows.append(R.make_row(**common(spec), mode=mode, **fig, max_abs_err=checked[spec][0],
                                       peak_mem_mb=None, status="ok"))
            bar.update(1)


# ----------------------------------------------------------------------------------------------
# op level
# ----------------------------------------------------------------------------------------------
def op_jobs(args) -> int:
    from fastbert.bench import opbench as O

    shapes = len(args.op_batch) * len(args.op_seq)
    n = 0
    for op in args.ops:
        variants = 2 if (op == "attention" and not args.no_varlen) else 1
        n += len(O.op_provider_names(op)) * shapes * variants * len(args.op_modes) * len(args.dtypes)
    return n


def run_ops(args, device, env, rows, bar) -> None:
    from fastbert.bench import models as M
    from fastbert.bench import opbench as O
    from fastbert.bench import report as R

    if not M.is_known(args.op_model):
        raise SystemExit(f"--op-model: unknown config {args.op_model!r} ({', '.join(M.CONFIGS)})")
    hidden, _, heads, inter = M.CONFIGS[M.canonical(args.op_model)]
    dims = (hidden, heads, inter)
    torch.manual_seed(args.seed)
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for op in args.ops:
            for s in args.op_seq:
                for b in args.op_batch:
                    for varlen in ([False, True] if (op == "attention" and not args.no_varlen) else [False]):
                        lengths = M.varlen_lengths(b, s) if varlen else [s] * b
                        case = None
                        provs = O.op_provider_names(op)
                        for mode in args.op_modes:
                            bar.set_postfix_str(f"{op} {dname} {mode} B{b} S{s}", refresh=False)
                            common = dict(kind="op", name=op, mode=mode, dtype=dname, batch=b, seq=s, varlen=varlen)
                            try:
                                if case is None:
                                    case = O.make_case(op, dims, b, s, lengths, dtype, device)
                            except Exception as e:
                                for prov in provs:
                                    rows.append(R.make_row(**common, provider=prov, **_failure(e)))
                                bar.update(len(provs))
                                _free(device)
                                continue
                            results = O.run_providers(case, provs, mode, varlen, device, heads, args.quick)
                            for prov in provs:
                                res = results[prov]
                                if isinstance(res, BaseException):
                                    rows.append(R.make_row(**common, provider=prov, **_failure(res)))
                                    continue
                                err = res["max_abs_err"]
                                if not math.isfinite(err):
                                    rows.append(R.make_row(**common, provider=prov, status="error",
                                                           reason=f"output has NaN/inf (max abs err {err})"))
                                    continue
                                fig = R.figures(res["timing"], tokens=sum(lengths), flops=case.flops(mode),
                                                nbytes=case.nbytes(mode), dtype=dname, env=env)
                                rows.append(R.make_row(**common, provider=prov, **fig, max_abs_err=err,
                                                       peak_mem_mb=res["peak_mem_mb"], status="ok"))
                            del results
                            _free(device)
                            bar.update(len(provs))
                        del case
                        _free(device)


def _steady_cpu_allocator() -> str:
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


def _failure(e: BaseException) -> dict:
    """Row fields for a provider that could not be measured: skipped (cannot run here: Skip, OOM, an
    unavailable backend) or error (anything else), with the reason."""
    from fastbert.bench import opbench as O

    if isinstance(e, O.Skip):
        return dict(status="skipped", reason=str(e))
    oom = _is_oom(e)
    skip = oom or "BackendUnavailableError" in type(e).__name__
    return dict(status="skipped" if skip else "error", reason="out of memory" if oom else _first_line(e))


# ----------------------------------------------------------------------------------------------
class _CheckpointedRows(list):
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


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cuda", "cpu"):
        raise SystemExit(f"--device: expected cuda or cpu, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(dev)
    _defaults(args, dev)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    # fp32 means IEEE fp32 for every provider and for the reference: no TF32 anywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)

    from tqdm import tqdm

    from fastbert.bench import limits
    from fastbert.bench import providers as P
    from fastbert.bench import report as R

    t0 = time.time()
    env = environment(device, argv, args.quick)
    env["cpu_allocator"] = _steady_cpu_allocator() if device.type == "cpu" else None
    from fastbert.bench import timing

    env["interleaved"] = timing.interleave(device)
    old_rows: List[dict] = []
    json_path = os.path.join(args.out, "results.json")
    if args.append and os.path.exists(json_path):
        import json

        with open(json_path) as f:
            old = json.load(f)
        for k in ("device", "device_kind", "commit", "torch", "triton", "transformers", "cpu_threads"):
            if old["env"].get(k) != env[k]:
                raise SystemExit(f"--append: {json_path} was measured with {k}={old['env'].get(k)!r}, "
                                 f"this run has {env[k]!r}; use another --out")
        command = env["command"]
        env, old_rows = old["env"], old["rows"]
        env.setdefault("appended_commands", []).append(command)
        print(f"fastbert.bench on {env['device']} ({dev}); appending to {json_path}", file=sys.stderr)
    else:
        print(f"fastbert.bench on {env['device']} ({dev}); measuring this machine's limits...", file=sys.stderr)
        env.update(limits.measure(device, quick=args.quick))
    print("limits: " + ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in env["peak_tflops"].items())
          + f", copy {env['bw_gbps']:.3g} GB/s", file=sys.stderr)

    provs = args.providers or P.model_provider_names(device.type)
    n_models = 0 if args.no_models else (len(args.models) * len(args.dtypes) * len(provs)
                                        * len(args.batch) * len(args.seq) * (1 if args.no_varlen else 2)
                                        * len(args.modes))
    rows: List[dict] = _CheckpointedRows(lambda done: R.write_json(
        json_path, dict(env, partial=True, wall_s=round(time.time() - t0, 1)), old_rows + list(done)))
    with tqdm(total=n_models + op_jobs(args), desc="fastbert.bench", unit="case", dynamic_ncols=True) as bar:
        if not args.no_models:
            run_models(args, device, env, rows, bar)
        run_ops(args, device, env, rows, bar)
    env["wall_s"] = round(time.time() - t0 + (env.get("wall_s") or 0.0), 1)
    if old_rows:
        # a case measured again replaces its earlier row (and a provider's earlier "every shape" skip row)
        full = {_row_key(r) for r in rows}
        groups = {_row_key(r)[:5] for r in rows}
        old_rows = [r for r in old_rows if _row_key(r) not in full
                    and not (r["batch"] is None and _row_key(r)[:5] in groups)]
    rows = old_rows + list(rows)
    env.pop("partial", None)

    plots = [] if args.no_plots else R.write_plots(args.out, rows)
    R.write_json(json_path, env, rows)
    R.write_md(os.path.join(args.out, "results.md"), env, rows, plots)
    n_ok = sum(r["status"] == "ok" for r in rows)
    print(f"{n_ok} rows measured, {len(rows) - n_ok} skipped/error, in {env['wall_s']} s; "
          f"wrote {args.out}/results.json, results.md and {len(plots)} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
