"""The model-level runs: providers x models x workloads x modes x dtypes, one row per case.

One loop for both devices. Each workload is first run once per provider for correctness (max |out -
HF fp32| over valid tokens, on the same inputs); then each mode is timed. CPU runs time every
provider's model in interleaved rounds (timing.bench_interleaved: a machine whose speed drifts slows
them alike), so all providers' models are built at once; GPU runs build one provider's model at a time
and time it alone with CUDA events (timing.bench), recording its peak memory.
Peer providers (onnxruntime, openvino: fastbert/bench/peers.py) are built with the other providers
(one ONNX export per model, shared, then optimized or compiled: untimed) and timed in the same
interleaved rounds; what each build fused goes to env.peer_builds.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from fastbert.bench import rows as RW

CUDAGRAPH_MAX_BATCH = 8


def record_dispatch(env: dict, key: str) -> None:
    """Which backend fastbert's own choice gave each op (the last decision per op), once per key; and
    the CPU GEMM choices made so far per shape class (fastbert/ops/cpu_gemm.py), updated each time."""
    table = env.setdefault("fastbert_auto_backends", {})
    if key not in table:
        from fastbert import backends

        table[key] = {op: d.backend for op, d in backends.last_decisions().items() if not d.forced}
    from fastbert.ops import cpu_gemm

    env["fastbert_cpu_gemm"] = cpu_gemm.describe()


def run_models(args, device, env, rows, bar) -> None:
    from fastbert.bench import models as M
    from fastbert.bench import providers as P
    from fastbert.bench import report as R
    from fastbert.bench import timing

    provs = args.providers or P.model_provider_names(device.type)
    specs = [P.parse(p) for p in provs]
    wls = M.workloads(args.batch, args.seq, not args.no_varlen)
    per_provider = len(wls) * len(args.modes)
    # the providers whose models exist at the same time: all of them when timed against each other
    groups = [specs] if timing.interleave(device) else [[s] for s in specs]

    for mname in args.models:
        n_jobs = len(args.dtypes) * len(specs) * per_provider
        try:
            label, base = M.build_model(mname, seed=args.seed)
        except Exception as e:
            rows.append(R.make_row(kind="model", name=mname, status="error", reason=RW.first_line(e)))
            bar.update(n_jobs)
            continue
        cfg = base.config
        vocab = int(getattr(cfg, "vocab_size", 30522))
        n_sets = 3  # weights (>= 40 MB) already overflow the caches; rotate token ids anyway
        inputs = {w: M.make_inputs(w, vocab, n_sets, device, seed=args.seed) for w in wls}
        refs = _references(base, wls, inputs, device)
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            for group in groups:
                runners = {}
                for spec in group:
                    runner = _make_runner(args, device, env, rows, bar, spec, base, dtype, label, dname,
                                          per_provider)
                    if runner is not None:
                        runners[spec] = runner
                P.PEER.release(base)  # the peers' shared ONNX export, once they are built
                for w in wls:
                    names = group[0].name if len(group) == 1 else "all providers"
                    bar.set_postfix_str(f"{label} {dname} {w.label()} ({names})", refresh=False)
                    _run_workload(args, device, env, rows, bar, runners, label, cfg, dname, w, inputs[w], refs.get(w))
                del runners
                RW.free(device)
        del base
        RW.free(device)


def _references(base, wls, inputs, device) -> Dict:
    """The yardstick: HF eager in fp32 (IEEE: TF32 is off for the whole run) on the same inputs."""
    from fastbert.bench import providers as P

    ref_model = P.ModelRunner(P.parse("hf-eager"), base, torch.float32, device)
    refs = {}
    for w in wls:
        try:
            refs[w] = ref_model.forward(inputs[w][0]).float().cpu()
        except Exception as e:
            refs[w] = None
            if not RW.is_oom(e):
                raise
    del ref_model
    RW.free(device)
    return refs


def _make_runner(args, device, env, rows, bar, spec, base, dtype, label, dname, per_provider):
    """spec's model at dtype on device, or None after writing its skipped rows (with the reason). A
    peer's build record goes to env["peer_builds"]["<model> <dtype> <provider>"]."""
    from fastbert.bench import providers as P
    from fastbert.bench import report as R

    why = P.unavailable(spec, device, args.quick, dtype)
    if why is None:
        try:
            runner = P.make_runner(spec, base, dtype, device)
            if spec.family == "peer":
                env.setdefault("peer_builds", {})[f"{label} {dname} {spec.name}"] = runner.info
            return runner
        except Exception as e:
            why = RW.first_line(e)
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
        record_dispatch(env, f"{label} {dname} {spec.name}")
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
    if mode == "train" and spec.family == "peer":
        return f"{spec.name} is benchmarked for inference only"
    return None


def _mode_fn(runner, sets, mode, replay):
    if mode == "infer":
        return replay if replay is not None else (lambda i: runner.forward(sets[i]))
    return lambda i: runner.train_step(sets[i])


def _time(fns: Dict, runners: Dict, mode: str, n_sets: int, device, quick: bool):
    """{spec: (timing or the exception it raised, peak MB or None)}: interleaved on CPU, one provider
    after another (with its peak memory) on a GPU."""
    from fastbert.bench import timing

    out = {}
    if timing.interleave(device):
        started: List = []
        try:
            if mode == "train":
                for spec in fns:
                    runners[spec].start_training()
                    started.append(spec)
            times = timing.bench_interleaved(fns, n_sets, device, quick=quick)
        except Exception as e:
            times = {spec: e for spec in fns}
        finally:
            for spec in started:
                runners[spec].stop_training()
        return {spec: (times[spec], None) for spec in fns}
    for spec, fn in fns.items():
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if mode == "train":
                runners[spec].start_training()
            try:
                t = timing.bench(fn, n_sets, device, quick=quick)
            finally:
                if mode == "train":
                    runners[spec].stop_training()
            out[spec] = (t, torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None)
        except Exception as e:
            out[spec] = (e, None)
            RW.free(device)
    return out


def _run_workload(args, device, env, rows, bar, runners, label, cfg, dname, w, sets, ref) -> None:
    """One workload on the given providers: each checked for correctness, then every mode timed."""
    from fastbert.bench import models as M
    from fastbert.bench import report as R

    def common(spec):
        return dict(kind="model", name=label, provider=spec.name, dtype=dname, batch=w.batch, seq=w.seq,
                    varlen=w.varlen)

    checked = {}
    for spec, runner in runners.items():
        spec_sets = sets[:0] if (spec.cudagraph and w.batch > CUDAGRAPH_MAX_BATCH) else sets  # nothing to capture
        try:
            checked[spec] = _check_workload(env, runner, spec, label, dname, w, spec_sets, ref)
        except Exception as e:
            for mode in args.modes:
                rows.append(R.make_row(**common(spec), mode=mode, **RW.failure(e)))
            bar.update(len(args.modes))
            RW.free(device)
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
        for spec, (t, peak) in _time(fns, runners, mode, len(sets), device, args.quick).items():
            if isinstance(t, BaseException):
                rows.append(R.make_row(**common(spec), mode=mode, **RW.failure(t)))
            else:
                fig = R.figures(t, tokens=w.tokens, flops=M.model_flops(cfg, w, mode), nbytes=None, dtype=dname,
                                env=env)
                rows.append(R.make_row(**common(spec), mode=mode, **fig, max_abs_err=checked[spec][0],
                                       peak_mem_mb=peak, status="ok"))
            bar.update(1)
