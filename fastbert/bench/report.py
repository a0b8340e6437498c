"""results.json, results.md and the PNG plots (schema documented in benchmarks/results/README.md)."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

ENV_KEYS = ("device", "device_kind", "torch", "triton", "transformers", "fastbert", "commit")
ROW_KEYS = ("kind", "name", "provider", "mode", "dtype", "batch", "seq", "varlen", "median_ms", "p20_ms",
            "p80_ms", "tokens_per_s", "tflops", "pct_peak", "gbps", "pct_bw", "max_abs_err", "peak_mem_mb",
            "status", "reason")
STATUSES = ("ok", "skipped", "error")


def make_row(**kw) -> dict:
    unknown = set(kw) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row keys {sorted(unknown)}")
    row = {k: kw.get(k) for k in ROW_KEYS}
    row["status"] = row["status"] or "ok"
    return row


def figures(timing, *, tokens: Optional[int], flops: Optional[float], nbytes: Optional[float],
            dtype: str, env: dict) -> dict:
    """Derived figures of a timed row; None where one does not apply."""
    s = timing.median_ms * 1e-3
    out = {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
           "tokens_per_s": tokens / s if tokens else None, "tflops": None, "pct_peak": None,
           "gbps": None, "pct_bw": None}
    if flops:
        out["tflops"] = flops / s / 1e12
        peak = (env.get("peak_tflops") or {}).get(dtype)
        out["pct_peak"] = 100.0 * out["tflops"] / peak if peak else None
    if nbytes:
        out["gbps"] = nbytes / s / 1e9
        bw = env.get("bw_gbps")
        out["pct_bw"] = 100.0 * out["gbps"] / bw if bw else None
    return out


def write_json(path: str, env: dict, rows: List[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1, allow_nan=False,
                  default=lambda o: None)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _f(x, fmt="{:.3g}"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else str(x)
    return fmt.format(x)


def _shape(r) -> str:
    if r["batch"] is None:
        return "all"
    return f"B{r['batch']} S{r['seq']}" + (" varlen" if r["varlen"] else "")


def _key(r: dict, provider: str) -> tuple:
    return (r["kind"], r["name"], r["mode"], r["dtype"], r["batch"], r["seq"], r["varlen"], provider)


def model_baseline(kind: str, name: str) -> str:
    if kind == "model":
        return "hf-sdpa"
    return {"attention": "torch-sdpa-math", "add_layer_norm": "torch-add+layer_norm",
            "linear_gelu": "torch-linear+gelu", "bias_gelu": "torch-add+gelu"}.get(
                name, "torch-linear" if name.startswith("gemm_") else "")


def speedups(rows: List[dict]) -> Dict[int, float]:
    """id(row) -> baseline median / row median (model rows: over hf-sdpa; op rows: over the torch composition)."""
    index = {_key(r, r["provider"]): r["median_ms"] for r in rows if r["status"] == "ok"}
    out = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = index.get(_key(r, model_baseline(r["kind"], r["name"])))
        if base:
            out[id(r)] = base / r["median_ms"]
    return out


def summary_lines(rows: List[dict]) -> List[str]:
    """Compact tables (the README's): per (model, dtype, mode), one line per shape, one column per
    measured provider, each cell = speedup over hf-sdpa (its median ms in the hf-sdpa column)."""
    sp = speedups(rows)
    L: List[str] = []
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        if r["status"] == "ok" and r["kind"] == "model":
            groups.setdefault((r["name"], r["dtype"], r["mode"]), []).append(r)
    for (name, dtype, mode), rs in groups.items():
        provs = list(OrderedDict.fromkeys(r["provider"] for r in rs))
        L.append(f"**{name}, {dtype}, {mode}** (speedup over hf-sdpa; hf-sdpa column: its median ms)")
        L.append("")
        L.append("| shape | " + " | ".join(provs) + " |")
        L.append("| --- |" + " --- |" * len(provs))
        for shape in OrderedDict.fromkeys(_shape(r) for r in rs):
            cells = []
            for p in provs:
                m = [r for r in rs if r["provider"] == p and _shape(r) == shape]
                if not m:
                    cells.append("-")
                elif p == "hf-sdpa":
                    cells.append(_f(m[0]["median_ms"]) + " ms")
                else:
                    cells.append(_f(sp.get(id(m[0])), "{:.2f}x"))
            L.append(f"| {shape} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def write_md(path: str, env: dict, rows: List[dict], plots: List[str]) -> None:
    sp = speedups(rows)
    L = ["# fastbert benchmark", ""]
    L.append(f"Command: `{env.get('command')}`  ")
    for c in env.get("appended_commands") or []:
        L.append(f"then, appended: `{c}`  ")
    threads = f", {env['cpu_threads']} threads" if env.get("device_kind") == "cpu" else ""
    L.append(f"Device: **{env.get('device')}** ({env.get('device_kind')}{threads}); torch {env.get('torch')}, "
             f"triton {env.get('triton')}, transformers {env.get('transformers')}, fastbert {env.get('fastbert')}, "
             f"commit {env.get('commit')}; {env.get('date_utc')}"
             + (f"; load average at start {env['load_avg_1m']:.2f}" if env.get("load_avg_1m") is not None else ""))
    if env.get("cpu_allocator"):
        L.append("")
        L.append(f"CPU allocator: {env['cpu_allocator']} (every provider alike)"
                 + ("; the providers of one op case or model workload are timed in interleaved rounds."
                    if env.get("interleaved") else "."))
    if env.get("partial"):
        L.append("")
        L.append(f"**Partial run**: stopped after {env.get('wall_s')} s, before every case was measured; "
                 "the rows below are the cases it finished.")
    L.append("")
    peaks = env.get("peak_tflops") or {}
    L.append("Measured limits: " + ", ".join(f"{k} matmul {_f(v)} TFLOP/s" for k, v in peaks.items())
             + f"; copy {_f(env.get('bw_gbps'))} GB/s ({env.get('limits_method')}).")
    L.append("")
    auto = env.get("fastbert_auto_backends") or {}
    if auto:
        choices = "; ".join(f"{k}: " + ", ".join(f"{op} -> {b}" for op, b in v.items()) for k, v in auto.items())
        L.append(f"fastbert's own backend choice per op (providers `fastbert`, `fastbert-padded`): {choices}.")
        L.append("")
    gemm = env.get("fastbert_cpu_gemm") or []
    if len(gemm) > 1:  # the status line, then one line per shape class timed in this run
        L.append("The fused layers' CPU GEMM per shape class, timed on its first call (fastbert/ops/cpu_gemm.py): "
                 + gemm[0].split(": ", 1)[-1])
        L.append("")
        L.extend(f"- {line.strip()}" for line in gemm[1:])
        L.append("")
    builds = env.get("peer_builds") or {}
    if builds:
        from fastbert.bench.peers import summary

        L.append("Peer providers, built once per model (export, optimization and compilation untimed), "
                 "timed in the same rounds:")
        L.append("")
        L.extend(f"- {k}: {summary(v)}" for k, v in builds.items())
        L.append("")
    L.append("Latency: median (p20-p80) in ms. Speedup: over hf-sdpa (models) or the PyTorch composition "
             "(ops). Error: max |out - HF fp32| over valid tokens (models), max |out - float64 reference| "
             "(ops). Model FLOPs/tokens count valid tokens only.")
    L.append("")
    summary = summary_lines(rows)
    if summary:
        L.append("## Summary")
        L.append("")
        L.extend(summary)
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["kind"], r["name"], r["dtype"], r["mode"]), []).append(r)
    for (kind, name, dtype, mode), rs in groups.items():
        L.append(f"## {kind} {name}, {dtype}, {mode}")
        L.append("")
        if kind == "model":
            L.append("| shape | provider | ms (p20-p80) | speedup | tokens/s | TFLOP/s | % peak | max abs err "
                     "| peak MB |")
            L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in rs:
                L.append(f"| {_shape(r)} | {r['provider']} | {_f(r['median_ms'])} "
                         f"({_f(r['p20_ms'])}-{_f(r['p80_ms'])}) "
                         f"| {_f(sp.get(id(r)), '{:.2f}x')} | {_f(r['tokens_per_s'], '{:.0f}')} | {_f(r['tflops'])} "
                         f"| {_f(r['pct_peak'], '{:.1f}')} | {_f(r['max_abs_err'], '{:.2e}')} "
                         f"| {_f(r['peak_mem_mb'], '{:.0f}')} |")
        else:
            L.append("| shape | provider | ms (p20-p80) | speedup | TFLOP/s | % peak | GB/s | % bw | max abs err |")
            L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in rs:
                L.append(f"| {_shape(r)} | {r['provider']} | {_f(r['median_ms'])} "
                         f"({_f(r['p20_ms'])}-{_f(r['p80_ms'])}) "
                         f"| {_f(sp.get(id(r)), '{:.2f}x')} | {_f(r['tflops'])} | {_f(r['pct_peak'], '{:.1f}')} "
                         f"| {_f(r['gbps'])} | {_f(r['pct_bw'], '{:.1f}')} | {_f(r['max_abs_err'], '{:.2e}')} |")
        L.append("")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        L.append("## Not run")
        L.append("")
        L.append("| kind | name | provider | mode | dtype | shape | status | reason |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        seen = set()
        for r in bad:
            key = (r["kind"], r["name"], r["provider"], r["status"], r["reason"])
            if key in seen:  # the same reason for every shape/mode: say it once
                continue
            seen.add(key)
            reason = (r["reason"] or "").replace("|", "\\|").replace("\n", " ")
            L.append(f"| {r['kind']} | {r['name']} | {r['provider']} | {r['mode'] or 'all'} | {r['dtype'] or 'all'} "
                     f"| {_shape(r)} | {r['status']} | {reason} |")
        L.append("")
    if plots:
        L.append("## Plots")
        L.append("")
        L.extend(f"![{p}]({p})" for p in plots)
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def write_plots(out_dir: str, rows: List[dict]) -> List[str]:
    """speedup_<model>_<dtype>_<mode>.png, latency_<model>_<dtype>_<mode>.png, roofline_<op>_<dtype>_<mode>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = speedups(rows)
    files = []
    ok = [r for r in rows if r["status"] == "ok"]
    model_groups = OrderedDict()
    for r in ok:
        if r["kind"] == "model":
            model_groups.setdefault((r["name"], r["dtype"], r["mode"]), []).append(r)
    for (name, dtype, mode), rs in model_groups.items():
        shapes = list(OrderedDict.fromkeys(_shape(r) for r in rs))
        provs = list(OrderedDict.fromkeys(r["provider"] for r in rs))
        # 1) speedup over hf-sdpa per shape: grouped bars
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shapes) * max(1, len(provs)) / 3), 4))
        width = 0.8 / max(1, len(provs))
        for j, p in enumerate(provs):
            ys = []
            for s in shapes:
                match = [r for r in rs if r["provider"] == p and _shape(r) == s]
                ys.append(sp.get(id(match[0]), float("nan")) if match else float("nan"))
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right")
        ax.set_ylabel("speedup over hf-sdpa (x)")
        ax.set_title(f"{name} {dtype} {mode}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fn = _safe(f"speedup_{name}_{dtype}_{mode}.png")
        fig.savefig(os.path.join(out_dir, fn), dpi=100)
        plt.close(fig)
        files.append(fn)
        # 2) latency vs sequence length: one line per (provider, batch), grid shapes and varlen apart
        fig, ax = plt.subplots(figsize=(7, 4))
        for p in provs:
            for varlen in (False, True):
                for b in sorted({r["batch"] for r in rs}):
                    pts = sorted((r["seq"], r["median_ms"]) for r in rs
                                 if r["provider"] == p and r["batch"] == b and r["varlen"] == varlen)
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                                ls="--" if varlen else "-", label=f"{p} B{b}" + (" varlen" if varlen else ""))
        ax.set_xlabel("sequence length")
        ax.set_ylabel("median latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{name} {dtype} {mode}")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fn = _safe(f"latency_{name}_{dtype}_{mode}.png")
        fig.savefig(os.path.join(out_dir, fn), dpi=100)
        plt.close(fig)
        files.append(fn)
    # 3) each op's % of its roofline: % of the matmul peak (compute-bound ops) or of the copy bandwidth
    #    (memory-bound ops), per shape, one bar per provider
    op_groups = OrderedDict()
    for r in ok:
        if r["kind"] == "op" and (r["pct_peak"] is not None or r["pct_bw"] is not None):
            op_groups.setdefault((r["name"], r["dtype"], r["mode"]), []).append(r)
    for (name, dtype, mode), rs in op_groups.items():
        shapes = list(OrderedDict.fromkeys(_shape(r) for r in rs))
        provs = list(OrderedDict.fromkeys(r["provider"] for r in rs))
        compute = rs[0]["pct_peak"] is not None
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(shapes) * max(1, len(provs))), 4))
        width = 0.8 / max(1, len(provs))
        for j, p in enumerate(provs):
            ys = []
            for s in shapes:
                m = [r for r in rs if r["provider"] == p and _shape(r) == s]
                v = (m[0]["pct_peak"] if compute else m[0]["pct_bw"]) if m else None
                ys.append(float("nan") if v is None else v)
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=p)
        ax.set_xticks([i + width * (len(provs) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right")
        ax.set_ylabel("% of measured matmul peak" if compute else "% of measured copy bandwidth")
        ax.set_title(f"{name} {dtype} {mode}: % of roofline")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fn = _safe(f"roofline_{name}_{dtype}_{mode}.png")
        fig.savefig(os.path.join(out_dir, fn), dpi=100)
        plt.close(fig)
        files.append(fn)
    return files


def main(argv=None) -> int:
    """python -m fastbert.bench.report DIR: print DIR/results.json's summary tables (for the README),
    or with --rewrite, regenerate DIR/results.md and the plots from results.json."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastbert.bench.report", description=main.__doc__)
    p.add_argument("dir")
    p.add_argument("--rewrite", action="store_true")
    args = p.parse_args(argv)
    with open(os.path.join(args.dir, "results.json")) as f:
        data = json.load(f)
    if args.rewrite:
        plots = write_plots(args.dir, data["rows"])
        write_md(os.path.join(args.dir, "results.md"), data["env"], data["rows"], plots)
    env = data["env"]
    print(f"{env.get('device')}, torch {env.get('torch')}, commit {env.get('commit')}, {env.get('date_utc')}\n")
    print("\n".join(summary_lines(data["rows"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
