"""The op-level runs: each fastbert op against its PyTorch composition (fastbert/bench/opbench.py), at
one model's shapes, on a grid of dtype x op x sequence length x batch (x varlen for attention), in
every op mode (fwd, bwd, fwd+bwd). One row per provider and case."""
from __future__ import annotations

import itertools
import math

import torch

from fastbert.bench import rows as RW


def _varlens(args, op):
    return [False, True] if (op == "attention" and not args.no_varlen) else [False]


def _modes(args, op):
    """The GEMM rows time inference only (fwd), the other ops every mode asked for."""
    from fastbert.bench import opbench as O

    return [m for m in args.op_modes if m == "fwd"] if op in O.GEMMS else list(args.op_modes)


def op_jobs(args) -> int:
    """How many rows run_ops writes (for the progress bar)."""
    from fastbert.bench import opbench as O

    shapes = len(args.op_batch) * len(args.op_seq)
    return sum(len(O.op_provider_names(op)) * shapes * len(_varlens(args, op)) * len(_modes(args, op))
               * len(args.dtypes) for op in args.ops)


def _cases(args):
    """(dtype name, op, seq, batch, varlen), in the order the rows are written."""
    for dname, op, s, b in itertools.product(args.dtypes, args.ops, args.op_seq, args.op_batch):
        for varlen in _varlens(args, op):
            yield dname, op, s, b, varlen


def run_ops(args, device, env, rows, bar) -> None:
    from fastbert.bench import models as M
    from fastbert.bench import opbench as O

    if not M.is_known(args.op_model):
        raise SystemExit(f"--op-model: unknown config {args.op_model!r} ({', '.join(M.CONFIGS)})")
    hidden, _, heads, inter = M.CONFIGS[M.canonical(args.op_model)]
    dims = (hidden, heads, inter)
    torch.manual_seed(args.seed)
    for dname, op, s, b, varlen in _cases(args):
        lengths = M.varlen_lengths(b, s) if varlen else [s] * b
        case = None
        provs = O.op_provider_names(op)
        for mode in _modes(args, op):
            bar.set_postfix_str(f"{op} {dname} {mode} B{b} S{s}", refresh=False)
            common = dict(kind="op", name=op, mode=mode, dtype=dname, batch=b, seq=s, varlen=varlen)
            try:
                if case is None:
                    case = O.make_case(op, dims, b, s, lengths, getattr(torch, dname), device)
            except Exception as e:
                for prov in provs:
                    rows.append(_row(common, prov, failure=e))
                bar.update(len(provs))
                RW.free(device)
                continue
            results = O.run_providers(case, provs, mode, varlen, device, heads, args.quick)
            for prov in provs:
                rows.append(_row(common, prov, result=results[prov], case=case, mode=mode, lengths=lengths,
                                 dname=dname, env=env))
            del results
            RW.free(device)
            bar.update(len(provs))
        del case
        RW.free(device)


def _row(common, prov, *, failure=None, result=None, case=None, mode=None, lengths=None, dname=None, env=None):
    from fastbert.bench import report as R

    if failure is None and isinstance(result, BaseException):
        failure = result
    if failure is not None:
        return R.make_row(**common, provider=prov, **RW.failure(failure))
    err = result["max_abs_err"]
    if not math.isfinite(err):
        return R.make_row(**common, provider=prov, status="error", reason=f"output has NaN/inf (max abs err {err})")
    fig = R.figures(result["timing"], tokens=sum(lengths), flops=case.flops(mode), nbytes=case.nbytes(mode),
                    dtype=dname, env=env)
    return R.make_row(**common, provider=prov, **fig, max_abs_err=err, peak_mem_mb=result["peak_mem_mb"],
                      status="ok")
