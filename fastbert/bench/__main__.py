"""`python -m fastbert.bench` (also the `fastbert-bench` console script): the options are in
fastbert/bench/cli.py, the runs in model_runs.py and op_runs.py, what a run records about the machine in
environment.py and limits.py, the outputs in report.py."""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import torch

from fastbert.bench import cli
from fastbert.bench import rows as RW


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = cli.build_parser().parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev not in ("cuda", "cpu"):
        raise SystemExit(f"--device: expected cuda or cpu, got {dev!r}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(dev)
    cli.apply_defaults(args, dev)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    # fp32 means IEEE fp32 for every provider and for the reference: no TF32 anywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)

    from tqdm import tqdm

    from fastbert.bench import environment, limits, timing
    from fastbert.bench import providers as P
    from fastbert.bench import report as R
    from fastbert.bench.model_runs import run_models
    from fastbert.bench.op_runs import op_jobs, run_ops

    t0 = time.time()
    env = environment.environment(device, argv, args.quick)
    env["cpu_allocator"] = environment.steady_cpu_allocator() if device.type == "cpu" else None
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
    rows: List[dict] = RW.CheckpointedRows(lambda done: R.write_json(
        json_path, dict(env, partial=True, wall_s=round(time.time() - t0, 1)), old_rows + list(done)))
    with tqdm(total=n_models + op_jobs(args), desc="fastbert.bench", unit="case", dynamic_ncols=True) as bar:
        if not args.no_models:
            run_models(args, device, env, rows, bar)
        run_ops(args, device, env, rows, bar)
    env["wall_s"] = round(time.time() - t0 + (env.get("wall_s") or 0.0), 1)
    rows = RW.merge_appended(old_rows, rows)
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
