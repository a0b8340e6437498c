"""Compile fastbert's Triton kernels for real GPUs without one, and report what each variant costs.

    python tools/triton_aot.py                      # the default set, sm_80 and sm_90a, a table on stdout
    python tools/triton_aot.py --set autotune       # the FASTBERT_AUTOTUNE=1 candidates instead
    python tools/triton_aot.py --set all --flags all --markdown docs/triton-resources.md
    python tools/triton_aot.py --bert-base          # only what a patched bert-base launches on sm_90a, timed

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs Triton's whole pipeline and
its bundled ptxas on a machine without a GPU. The interpreter (TRITON_INTERPRET=1, what the tests use
on CPU) never does: it misses what only the compiler rejects (layouts, bf16 dots, shared memory).

What is compiled: for each kernel, every launch config its launcher can pick (the tables of
fastbert/triton/configs.py over every shape class, or with --set autotune the candidate lists), each
dtype (fp32, fp16, bf16), head dims covering every BLOCK_D and both the even and the masked-D paths,
and the constexpr flags either as a cover (--flags cover: none, each flag alone and the fullest legal
combinations) or as their whole legal product (--flags all). Each family's table is compiled for its
own arch (sm80 -> sm_80, sm90 -> sm_90a) and the other arch as well, since a table entry that fails
the other arch would be a trap for whoever moves it.

Per variant: registers per thread, spill stores + loads (bytes), shared memory (bytes), compile time.
It fails (exit 1) on a compile error, shared memory above the arch's per-block limit, or spills above
--max-spill (default 0 for the table configs at 16 bits: a spilling launch config is a tuning bug;
MAX_SPILL_FP32 at fp32; the autotune candidates may spill, the autotuner times them and a spilling one
loses). Integer arguments are left
specialised as the JIT does at model shapes (multiples of 16, unit strides equal to 1: see NOT_DIV16 and
UNITS); pointers are 16-byte aligned.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import itertools
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# the real compiler, never the interpreter; a private cache: every variant really compiles (a cache hit
# would skip ptxas and its resource log)
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastbert.triton import add_layer_norm as _ln  # noqa: E402
from fastbert.triton import attention as _attn  # noqa: E402
from fastbert.triton import bias_gelu as _bg  # noqa: E402
from fastbert.triton import configs  # noqa: E402
from fastbert.triton import linear_gelu as _lg  # noqa: E402
from fastbert.triton import rotary as _ro  # noqa: E402

# per-block shared memory limits (opt-in maximum), bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# sm_86 / sm_89 blocks get 99 KiB: the sm80 table must fit it too (configs.py's promise)
SHARED_LIMIT_SM86 = 99 * 1024
ARCH_NAME = {80: "sm_80", 90: "sm_90a"}
DTYPES = ("fp32", "fp16", "bf16")


# integer arguments the JIT sees as multiples of 16 at model shapes (hidden 768, intermediate 3072,
# head dim 64, sequences of 128/512: sizes and strides), except these; it matters: a K loop whose bound is
# not known to be a multiple of 16 gets scalar masked loads, which cannot be pipelined (cp.async needs
# 4-byte vectors), and its shared memory and registers are not what a launch gets
NOT_DIV16 = {"H", "rows", "M", "rows_per_prog", "drop_threshold", "total", "T", "S", "n_seqs"}
# the unit strides of a typical launch: a contiguous bool mask, a bias broadcast over rows or contiguous,
# the GEMM's row-major x, nn.Linear weight and output (the fp32 backward GEMMs use transposed views:
# their variants compile with no unit stride)
UNITS = {
    "_attention_fwd_kernel": ("stride_mn", "stride_bn"),
    "_attention_bwd_dkdv_kernel": ("stride_mn", "stride_bn"),
    "_attention_bwd_dq_kernel": ("stride_mn", "stride_bn"),
    "_linear_gelu_fwd_kernel": ("stride_xk", "stride_wk", "stride_on"),
}


@dataclass(frozen=True)
class Variant:
    kernel: str  # the jit function's name
    arch: int
    dtype: str  # the activations' dtype
    consts: Tuple[Tuple[str, object], ...]  # constexpr arguments
    warps: int
    stages: int
    origin: str  # where the config comes from: "sm90 table", "autotune", "fixed" ...
    wdtype: str = ""  # add_layer_norm: the weights' dtype when it differs
    fp_fusion: bool = True
    # integer arguments equal to 1 in the launch (the JIT makes them constants): unit strides, which
    # decide vector widths and whether loads can be pipelined (cp.async / TMA need contiguous rows)
    units: Optional[Tuple[str, ...]] = None  # None: UNITS' entry for the kernel

    def __post_init__(self):
        if self.units is None:
            c = dict(self.consts)
            backward_gemm = self.kernel == "_linear_gelu_fwd_kernel" and c.get("ACTIVATION") == 0
            object.__setattr__(self, "units", () if backward_gemm else UNITS.get(self.kernel, ()))

    def label(self) -> str:
        c = " ".join(f"{k}={_short(v)}" for k, v in self.consts)
        w = f" w:{self.wdtype}" if self.wdtype else ""
        return f"{self.kernel} {ARCH_NAME[self.arch]} {self.dtype}{w} {c} warps={self.warps} stages={self.stages}"


def _short(v):
    return int(v) if isinstance(v, bool) else v


@dataclass
class Result:
    variant: Variant
    ok: bool
    seconds: float
    regs: Optional[int] = None
    spill: Optional[int] = None  # spill stores + spill loads, bytes
    shared: Optional[int] = None
    error: str = ""
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # reported, not failed


# ----------------------------------------------------------------------------------------------
# signatures: each pointer argument's dtype, by role ("x" the activations, "w" the weights)
# ----------------------------------------------------------------------------------------------
_ROLES: Dict[str, Dict[str, str]] = {
    "_attention_fwd_kernel": dict(Q="x", K="x", V="x", Out="x", Bias="x", Lse="fp32", Mask="u8", CuSeqlens="i32",
                                  Seed="i64"),
    "_attention_bwd_preprocess_kernel": dict(Out="x", DO="x", Delta="fp32"),
    "_attention_bwd_dkdv_kernel": dict(Q="x", K="x", V="x", DO="x", Lse="fp32", Delta="fp32", DK="x", DV="x",
                                       Mask="u8", Bias="x", CuSeqlens="i32", Seed="i64"),
    "_attention_bwd_dq_kernel": dict(Q="x", K="x", V="x", DO="x", Lse="fp32", Delta="fp32", DQ="x", Mask="u8",
                                     Bias="x", CuSeqlens="i32", Seed="i64"),
    "_add_layer_norm_fwd_kernel": dict(X="x", RES="x", W="w", B="w", XB="w", SEED="i64", OUT="x", PRE="x",
                                       MEAN="fp32", RSTD="fp32"),
    "_add_layer_norm_bwd_kernel": dict(DY="x", X="x", RES="x", W="w", XB="w", SEED="i64", MEAN="fp32", RSTD="fp32",
                                       DPRE_IN="x", DPRE="x", DX="x", DW_PART="fp32", DB_PART="fp32",
                                       DXB_PART="fp32"),
    "_bias_gelu_fwd_kernel": dict(X="x", B="x", OUT="x"),
    "_bias_gelu_bwd_kernel": dict(DY="x", X="x", B="x", DX="x"),
    "_linear_gelu_fwd_kernel": dict(X="x", W="x", B="x", OUT="x", PRE="x"),
    "_rotary_kernel": dict(X="x", COS="w", SIN="w", POS="i64", CU="i32", OUT="x"),
}
_FLOAT_ARGS = {"sm_scale", "drop_scale", "eps"}
_FNS = {
    "_attention_fwd_kernel": _attn._attention_fwd_kernel,
    "_attention_bwd_preprocess_kernel": _attn._attention_bwd_preprocess_kernel,
    "_attention_bwd_dkdv_kernel": _attn._attention_bwd_dkdv_kernel,
    "_attention_bwd_dq_kernel": _attn._attention_bwd_dq_kernel,
    "_add_layer_norm_fwd_kernel": _ln._add_layer_norm_fwd_kernel,
    "_add_layer_norm_bwd_kernel": _ln._add_layer_norm_bwd_kernel,
    "_bias_gelu_fwd_kernel": _bg._bias_gelu_fwd_kernel,
    "_bias_gelu_bwd_kernel": _bg._bias_gelu_bwd_kernel,
    "_linear_gelu_fwd_kernel": _lg._linear_gelu_fwd_kernel,
    "_rotary_kernel": _ro._rotary_kernel,
}


def _source(v: Variant):
    fn = _FNS[v.kernel]
    roles = _ROLES[v.kernel]
    sig, attrs = {}, {}
    consts = dict(v.consts)
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in v.units:
            sig[p.name] = "constexpr"
            consts[p.name] = 1
        elif p.name in roles:
            role = roles[p.name]
            sig[p.name] = "*" + {"x": v.dtype, "w": v.wdtype or v.dtype}.get(role, role)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in _FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if p.name not in NOT_DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = {p.name for p in fn.params if p.is_constexpr} - {k for k, _ in v.consts}
    if missing:
        raise ValueError(f"{v.kernel}: no value for constexpr {sorted(missing)}")
    return ASTSource(fn, sig, constexprs=consts, attrs=attrs)


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(v: Variant) -> Result:
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (TRITON_DUMP_PTXAS_LOG)
            k = triton.compile(_source(v), target=GPUTarget("cuda", v.arch, 32),
                               options=dict(num_warps=v.warps, num_stages=v.stages, enable_fp_fusion=v.fp_fusion))
    except Exception as e:  # noqa: BLE001 - a compile error is this tool's finding, reported per variant
        msg = f"{type(e).__name__}: {e}"
        return Result(v, False, time.perf_counter() - t0, error=msg.strip().splitlines()[0][:300])
    text = log.getvalue()
    regs = [int(m) for m in _REGS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    r = Result(v, True, time.perf_counter() - t0, regs=max(regs) if regs else None,
               spill=max(spills) if spills else None, shared=int(k.metadata.shared))
    ptx = k.asm["ptx"]
    # tensor cores: the 16-bit GEMMs must use them (wgmma on sm_90), the fp32 ones never (IEEE, no TF32)
    if v.kernel == "_linear_gelu_fwd_kernel":
        if v.dtype == "fp32" and re.search(r"\bmma\.|wgmma", ptx):
            r.problems.append("fp32 GEMM uses tensor cores (TF32) despite IEEE")
        # wgmma needs 64 rows per warpgroup: a 32-row tile (a GEMM of <= 32 rows) uses mma.sync
        if v.dtype != "fp32" and v.arch == 90 and dict(v.consts)["BLOCK_M"] >= 64 and "wgmma" not in ptx:
            r.problems.append("16-bit GEMM on sm_90 does not use wgmma")
    return r


# ----------------------------------------------------------------------------------------------
# the variants
# ----------------------------------------------------------------------------------------------
def _flag_sets(names: List[str], legal, mode: str, extra: List[Dict[str, bool]] = ()) -> List[Dict[str, bool]]:
    """--flags all: every legal combination. cover: none, each flag alone (where legal), the fullest
    legal combinations, and `extra` (the combinations models launch)."""
    every = [dict(zip(names, bits)) for bits in itertools.product((False, True), repeat=len(names))]
    every = [f for f in every if legal(f)]
    if mode == "all":
        return every
    out = [dict.fromkeys(names, False)]
    for n in names:
        f = dict.fromkeys(names, False)
        f[n] = True
        if legal(f):
            out.append(f)
    maximal = [f for f in every if not any(g != f and all(g[n] >= f[n] for n in names) for g in every)]
    for f in maximal + list(extra):
        if f not in out:
            out.append(f)
    return out


def _attention_legal(f):
    return not (f["PACKED"] and (f["HAS_MASK"] or f["HAS_BIAS"]))


HEAD_DIMS = {"ci": (16, 32, 64, 128), "wide": (16, 32, 64, 80, 128), "all": (8, 16, 24, 32, 40, 48, 64, 80, 96, 128)}
LN_BLOCKS = {"ci": (1, 256, 1024, 8192), "wide": (1, 32, 256, 1024, 2048, 4096, 8192),
             "all": tuple(2 ** i for i in range(14))}
GELU_N = {"ci": (16, 256, 1024), "wide": (16, 256, 1024, 4096), "all": tuple(2 ** i for i in range(13))}


def _own_arch(fam: str, archs) -> List[int]:
    """A family's table is compiled for the arch it serves."""
    return [a for a in archs if a == configs.FAMILY_ARCH[fam]]


def _cover_filter(cover: str, fsets, full, everything, is_main):
    """--cover ci keeps, per launchable tile, the fullest flag sets `full` (the worst case for registers
    and shared memory: every code path at once) and, at the main tile only, the other sets of
    `everything`."""
    if cover != "ci":
        return fsets
    full = full if isinstance(full, list) else [full]
    return [f for f in fsets if f in full or (is_main and f in everything)]


def _maximal(fsets):
    """The flag sets no other set of `fsets` contains."""
    return [f for f in fsets if not any(g != f and all(g[n] >= f[n] for n in f) for g in fsets)]


def _heads(cover: str, d: int):
    """The head dims compiled for head dim class d: wide/all add the masked-D path at 64 and 128."""
    if cover != "ci" and d in (64, 128):
        return [d, d - 16 if d == 64 else 80]
    return [d]


def attention_variants(which: str, cover: str, archs) -> List[Variant]:
    names = ["PACKED", "HAS_MASK", "HAS_BIAS", "CAUSAL", "DROPOUT", "WINDOW"]
    model = [dict(PACKED=False, HAS_MASK=True, HAS_BIAS=False, CAUSAL=False, DROPOUT=d, WINDOW=False)
             for d in (False, True)]
    packed = dict(PACKED=True, HAS_MASK=False, HAS_BIAS=False, CAUSAL=True, DROPOUT=True, WINDOW=False)
    none = dict.fromkeys(names, False)
    fsets = _flag_sets(names, _attention_legal, "all" if cover == "all" else "cover", model)
    kname = {"fwd": "_attention_fwd_kernel", "dkdv": "_attention_bwd_dkdv_kernel", "dq": "_attention_bwd_dq_kernel"}
    out = []
    for fam, kernel, dtype, d in itertools.product(configs.FAMILIES, configs.ATTENTION_KERNELS, DTYPES,
                                                   HEAD_DIMS[cover]):
        block_d = max(16, triton.next_power_of_2(d))
        main = configs.attention(kernel, fam, dtype, block_d, 8192)
        main = (main.kwargs["BLOCK_M"], main.kwargs["BLOCK_N"], main.num_warps, main.num_stages)
        for heavy in (False, True):
            if which == "default":
                tiles = {configs.attention(kernel, fam, dtype, block_d, sb, heavy) for sb in configs.SEQ_BUCKETS}
                tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tiles}
            elif heavy:
                continue
            else:
                tiles = set(configs.attention_candidates(kernel, fam, configs.dtype_class(dtype), block_d))
            for tile, arch, hd in itertools.product(sorted(tiles), _own_arch(fam, archs), _heads(cover, d)):
                bm, bn, w, s = tile
                # the flag sets this tile serves: the launcher picks the lighter tile for bias + dropout
                mine = [f for f in fsets if which != "default" or heavy == (f["HAS_BIAS"] and f["DROPOUT"])]
                everything = [f for f in (none, packed, model[0]) if f in mine] if hd == d else []
                for f in _cover_filter(cover, mine, _maximal(mine), everything, tile == main):
                    consts = dict(HEAD_D=hd, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, **f)
                    out.append(Variant(kname[kernel], arch, dtype, tuple(consts.items()), w, s, f"{fam} {which}"))
    # the backward's preprocess: one fixed tile
    for dtype, d, arch in itertools.product(DTYPES, HEAD_DIMS[cover] + ((80,) if cover == "ci" else ()), archs):
        consts = dict(HEAD_D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=64)
        out.append(Variant("_attention_bwd_preprocess_kernel", arch, dtype, tuple(consts.items()), 4, 3, "fixed"))
    return out


def layer_norm_variants(cover: str, archs) -> List[Variant]:
    out = []
    for kernel, backward in (("_add_layer_norm_fwd_kernel", False), ("_add_layer_norm_bwd_kernel", True)):
        # the pre-norm (return_residual) flag: the forward stores h, the backward takes h's own gradient
        names = ["HAS_RES", "HAS_B", "HAS_XB", "HAS_DROPOUT", _LN_PRE_FLAG[kernel]]
        model = dict.fromkeys(names, False)
        model.update(HAS_RES=True, HAS_B=True)
        full = dict.fromkeys(names, True)
        fsets = _flag_sets(names, lambda f: True, "all" if cover == "all" else "cover", [model])
        for dtype, block, arch in itertools.product(DTYPES, LN_BLOCKS[cover], archs):
            for f in _cover_filter(cover, fsets, full, [dict.fromkeys(names, False), model], block == 1024):
                consts = dict(f, BLOCK_N=block)
                for wdtype in ("", "fp32") if dtype != "fp32" else ("",):
                    out.append(Variant(kernel, arch, dtype, tuple(consts.items()), _ln._num_warps(block, backward),
                                       3, "fixed", wdtype=wdtype, fp_fusion=False))
    return out


_LN_PRE_FLAG = {"_add_layer_norm_fwd_kernel": "STORE_PRE", "_add_layer_norm_bwd_kernel": "HAS_DPRE_IN"}


def bias_gelu_variants(cover: str, archs) -> List[Variant]:
    combos = list(itertools.product((False, True), (False, True)))
    if cover == "ci":  # bias with each GELU, and no bias
        combos = [(True, False), (True, True), (False, False)]
    out = []
    for kernel in ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"):
        for dtype, n, (has_bias, tanh), arch in itertools.product(DTYPES, GELU_N[cover], combos, archs):
            block_r, block_n, warps = _bg._elementwise_tile(n)
            consts = dict(HAS_BIAS=has_bias, TANH=tanh, BLOCK_R=block_r, BLOCK_N=block_n)
            out.append(Variant(kernel, arch, dtype, tuple(consts.items()), warps, 3, "fixed"))
    return out


# rotary's tables: (HAS_POS, PACKED) of the three layouts; the table dtype: fp32 ("fp32") or the activations'
ROTARY_LAYOUTS = ((False, False), (True, False), (False, True))


def _rotary_variant(arch: int, dtype: str, d: int, has_pos: bool, packed: bool, backward: bool, wdtype: str,
                    origin: str = "fixed") -> Variant:
    block_t, block_h2, warps = _ro._tile(d // 2)
    # SEARCH=8: binary search over up to 256 packed sequences
    consts = dict(HALF=d // 2, HAS_POS=has_pos, PACKED=packed, BACKWARD=backward, SEARCH=8 if packed else 0,
                  BLOCK_T=block_t, BLOCK_H2=block_h2)
    return Variant("_rotary_kernel", arch, dtype, tuple(consts.items()), warps, 3, origin, wdtype=wdtype)


def rotary_variants(cover: str, archs) -> List[Variant]:
    out = []
    for dtype, d, (has_pos, packed), backward, arch in itertools.product(
            DTYPES, HEAD_DIMS[cover], ROTARY_LAYOUTS, (False, True), archs):
        for wdtype in ("fp32", "") if dtype != "fp32" else ("",):
            out.append(_rotary_variant(arch, dtype, d, has_pos, packed, backward, wdtype))
    return out


def linear_gelu_variants(which: str, cover: str, archs) -> List[Variant]:
    names = ["HAS_BIAS", "SAVE_PRE"]
    out = []
    for fam, dtype in itertools.product(configs.FAMILIES, DTYPES):
        def tiles_for(tanh):
            if which != "default":
                return set(configs.gemm_candidates(configs.dtype_class(dtype)))
            cs = {configs.gemm(fam, dtype, mb, tanh) for mb in configs.ROW_BUCKETS}
            return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                    for c in cs}
        # activations: identity (the fp32 backward GEMMs, no bias), exact and tanh GELU, and linear_act's
        # ReLU (3) and SiLU (4)
        fsets = [dict(ACTIVATION=0, HAS_BIAS=False, SAVE_PRE=False)]
        if cover == "all":
            for act in (1, 2, 3, 4):
                fsets += [dict(f, ACTIVATION=act) for f in _flag_sets(names, lambda f: True, "all")]
        else:
            fsets += [dict(ACTIVATION=1, HAS_BIAS=True, SAVE_PRE=True),
                      dict(ACTIVATION=1, HAS_BIAS=True, SAVE_PRE=False),
                      dict(ACTIVATION=2, HAS_BIAS=False, SAVE_PRE=False),
                      dict(ACTIVATION=3, HAS_BIAS=True, SAVE_PRE=True),
                      dict(ACTIVATION=4, HAS_BIAS=True, SAVE_PRE=True)]
        for f, arch in itertools.product(fsets, _own_arch(fam, archs)):
            for bm, bn, bk, w, s in sorted(tiles_for(f["ACTIVATION"] == 2)):
                consts = dict(f, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=configs.GROUP_M)
                out.append(Variant("_linear_gelu_fwd_kernel", arch, dtype, tuple(consts.items()), w, s,
                                   f"{fam} {which}"))
    return out


def model_variants(archs) -> List[Variant]:
    """--set models: every kernel, both arches, the table configs of the paths models launch (padding
    mask or packed, dropout for training) at the head dims of BERT-family models (32, 64, 128), in bf16
    and fp32, fp16 once per kernel; the fullest flag set once per attention kernel."""
    inf = dict(PACKED=False, HAS_MASK=True, HAS_BIAS=False, CAUSAL=False, DROPOUT=False, WINDOW=False)
    train = dict(inf, DROPOUT=True)
    full = dict(PACKED=False, HAS_MASK=True, HAS_BIAS=True, CAUSAL=True, DROPOUT=True, WINDOW=True)
    packed = dict(PACKED=True, HAS_MASK=False, HAS_BIAS=False, CAUSAL=False, DROPOUT=False, WINDOW=False)
    local = dict(PACKED=True, HAS_MASK=False, HAS_BIAS=False, CAUSAL=False, DROPOUT=True, WINDOW=True)  # ModernBERT
    kname = {"fwd": "_attention_fwd_kernel", "dkdv": "_attention_bwd_dkdv_kernel", "dq": "_attention_bwd_dq_kernel"}
    picks = {  # (dtype, head dim, flags)
        "fwd": [("bf16", 64, inf), ("bf16", 64, train), ("bf16", 32, inf), ("bf16", 128, train), ("bf16", 64, packed),
                ("bf16", 64, full), ("fp16", 64, inf), ("fp32", 64, train), ("bf16", 64, local)],
        "dkdv": [("bf16", 64, train), ("bf16", 128, train), ("bf16", 64, full), ("fp16", 64, train),
                 ("fp32", 64, train), ("bf16", 64, local)],
        "dq": [("bf16", 64, train), ("bf16", 128, train), ("bf16", 64, full), ("fp16", 64, train),
               ("fp32", 64, train), ("bf16", 64, local)],
    }
    out = []
    for fam in configs.FAMILIES:
        for arch in _own_arch(fam, archs):
            for kernel, rows in picks.items():
                for dtype, d, f in rows:
                    c = configs.attention(kernel, fam, dtype, d, 8192, heavy=f["HAS_BIAS"] and f["DROPOUT"])
                    consts = dict(HEAD_D=d, BLOCK_D=d, BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"], **f)
                    out.append(Variant(kname[kernel], arch, dtype, tuple(consts.items()), c.num_warps, c.num_stages,
                                       f"{fam} ci"))
            for dtype, f in (("bf16", dict(ACTIVATION=1, HAS_BIAS=True, SAVE_PRE=True)),
                             ("fp16", dict(ACTIVATION=1, HAS_BIAS=True, SAVE_PRE=False)),
                             ("fp32", dict(ACTIVATION=0, HAS_BIAS=False, SAVE_PRE=False)),
                             ("fp32", dict(ACTIVATION=2, HAS_BIAS=True, SAVE_PRE=True)),
                             ("bf16", dict(ACTIVATION=4, HAS_BIAS=True, SAVE_PRE=True)),
                             ("fp32", dict(ACTIVATION=3, HAS_BIAS=False, SAVE_PRE=True))):
                c = configs.gemm(fam, dtype, 4096, tanh=f["ACTIVATION"] == 2)
                consts = dict(f, IEEE=dtype == "fp32", **c.kwargs)
                out.append(Variant("_linear_gelu_fwd_kernel", arch, dtype, tuple(consts.items()), c.num_warps,
                                   c.num_stages, f"{fam} ci"))
    ln_model = dict(HAS_RES=True, HAS_B=True, HAS_XB=True, HAS_DROPOUT=False)
    ln_full = dict(HAS_RES=True, HAS_B=True, HAS_XB=True, HAS_DROPOUT=True)
    for arch in archs:
        out.append(Variant("_attention_bwd_preprocess_kernel", arch, "bf16",
                           tuple(dict(HEAD_D=64, BLOCK_D=64, BLOCK_M=64).items()), 4, 3, "fixed"))
        for kernel, backward in (("_add_layer_norm_fwd_kernel", False), ("_add_layer_norm_bwd_kernel", True)):
            pre = _LN_PRE_FLAG[kernel]  # post-norm (BERT) models without it; pre-norm ones (return_residual) with
            for dtype, wdtype, block, f in (("bf16", "fp32", 1024, ln_model), ("fp16", "", 1024, ln_full),
                                            ("fp32", "", 1024, ln_full), ("bf16", "", 8192, ln_full),
                                            ("bf16", "", 1024, dict(ln_model, **{pre: True}))):
                f = dict(f)
                f.setdefault(pre, False)
                out.append(Variant(kernel, arch, dtype, tuple(dict(f, BLOCK_N=block).items()),
                                   _ln._num_warps(block, backward), 3, "fixed", wdtype=wdtype, fp_fusion=False))
        for kernel in ("_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"):
            for dtype, n, has_bias, tanh in (("bf16", 3072, True, False), ("fp32", 3072, True, True),
                                             ("fp16", 16, False, False)):
                block_r, block_n, warps = _bg._elementwise_tile(n)
                consts = dict(HAS_BIAS=has_bias, TANH=tanh, BLOCK_R=block_r, BLOCK_N=block_n)
                out.append(Variant(kernel, arch, dtype, tuple(consts.items()), warps, 3, "fixed"))
        # rotary: ModernBERT's padded [B, S, D] tables and its packed path, head dims 64 and 128
        for dtype, d, has_pos, packed, backward, wdtype in (("bf16", 64, False, False, False, ""),
                                                            ("bf16", 64, False, True, True, ""),
                                                            ("fp16", 128, True, False, False, "fp32"),
                                                            ("fp32", 64, False, True, False, "")):
            out.append(_rotary_variant(arch, dtype, d, has_pos, packed, backward, wdtype))
    return out


# --set ci: the subset CI compiles under each Triton version (about two minutes on 2 cores): each kernel
# once per arch on bert-base's training path in bf16, the fp32 and fp16 forms of attention's forward and
# of the GEMM (which must and must not use tensor cores), the elementwise kernels in bf16
_CI_PICKS = (
    ("_attention_fwd_kernel", "bf16", 64, "DROPOUT=1"), ("_attention_fwd_kernel", "fp16", 64, "DROPOUT=0"),
    ("_attention_fwd_kernel", "fp32", 64, "DROPOUT=1"), ("_attention_bwd_dkdv_kernel", "bf16", 64, "HAS_BIAS=0"),
    ("_attention_bwd_dq_kernel", "bf16", 64, "HAS_BIAS=0"), ("_attention_bwd_preprocess_kernel", "bf16", 64, ""),
    # ModernBERT's local layers: packed, sliding window (the band-bounded loops)
    ("_attention_fwd_kernel", "bf16", 64, "WINDOW=1"), ("_attention_bwd_dkdv_kernel", "bf16", 64, "WINDOW=1"),
    ("_linear_gelu_fwd_kernel", "bf16", 0, ""), ("_linear_gelu_fwd_kernel", "fp32", 0, "ACTIVATION=0"),
    ("_add_layer_norm_fwd_kernel", "bf16", 0, "BLOCK_N=1024"),
    ("_add_layer_norm_bwd_kernel", "bf16", 0, "BLOCK_N=1024"),
    ("_add_layer_norm_fwd_kernel", "bf16", 0, "STORE_PRE=1"),
    ("_add_layer_norm_bwd_kernel", "bf16", 0, "HAS_DPRE_IN=1"),
    ("_bias_gelu_fwd_kernel", "bf16", 0, ""), ("_bias_gelu_bwd_kernel", "bf16", 0, ""),
    ("_rotary_kernel", "bf16", 0, "HALF=32"),
)


def ci_variants(archs) -> List[Variant]:
    out = []
    for kernel, dtype, d, must in _CI_PICKS:
        for arch in archs:
            for v in model_variants([arch]):
                c = dict(v.consts)
                if (v.kernel == kernel and v.dtype == dtype and (not d or c.get("HEAD_D") == d)
                        and (not must or must in v.label()) and not c.get("CAUSAL")
                        and (not c.get("PACKED") or c.get("WINDOW"))):
                    out.append(v)
                    break
    return out


def all_variants(which: str, cover: str, archs) -> List[Variant]:
    vs = attention_variants(which, cover, archs) + linear_gelu_variants(which, cover, archs)
    if which == "default":  # the fixed-config kernels have no candidates: they belong to the default set
        vs += layer_norm_variants(cover, archs) + bias_gelu_variants(cover, archs) + rotary_variants(cover, archs)
    seen, out = set(), []
    for v in vs:  # one config can come from several tables: compile it once
        key = (v.kernel, v.arch, v.dtype, v.consts, v.warps, v.stages, v.wdtype)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def bert_base_variants(dtype: str = "bf16", arch: int = 90) -> List[Variant]:
    """What a patched bert-base (hidden 768, 12 heads of 64, intermediate 3072, sequences of 128) launches
    on the triton backend, inference and a training step, at one dtype: the first-call compile cost."""
    fam = "sm90" if arch == 90 else "sm80"
    out = []
    inf = dict(PACKED=False, HAS_MASK=True, HAS_BIAS=False, CAUSAL=False, WINDOW=False)
    for kernel, dropout in (("fwd", False), ("fwd", True), ("dkdv", True), ("dq", True)):
        c = configs.attention(kernel, fam, dtype, 64, 128)
        consts = dict(HEAD_D=64, BLOCK_D=64, BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"], **inf,
                      DROPOUT=dropout)
        name = {"fwd": "_attention_fwd_kernel", "dkdv": "_attention_bwd_dkdv_kernel",
                "dq": "_attention_bwd_dq_kernel"}[kernel]
        out.append(Variant(name, arch, dtype, tuple(consts.items()), c.num_warps, c.num_stages, "bert-base"))
    out.append(Variant("_attention_bwd_preprocess_kernel", arch, dtype,
                       tuple(dict(HEAD_D=64, BLOCK_D=64, BLOCK_M=64).items()), 4, 3, "bert-base"))
    # add_layer_norm after attention and after the FFN (x_bias: the output projection's bias), with and
    # without dropout; its backward
    for kernel, backward in (("_add_layer_norm_fwd_kernel", False), ("_add_layer_norm_bwd_kernel", True)):
        for dropout in ((False, True) if not backward else (True,)):
            consts = dict(HAS_RES=True, HAS_B=True, HAS_XB=True, HAS_DROPOUT=dropout, **{_LN_PRE_FLAG[kernel]: False},
                          BLOCK_N=1024)
            out.append(Variant(kernel, arch, dtype, tuple(consts.items()), _ln._num_warps(1024, backward), 3,
                               "bert-base", fp_fusion=False))
    c = configs.gemm(fam, dtype, 4096)
    for save_pre in (False, True):
        consts = dict(ACTIVATION=1, HAS_BIAS=True, SAVE_PRE=save_pre, IEEE=dtype == "fp32",
                      BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"], BLOCK_K=c.kwargs["BLOCK_K"],
                      GROUP_M=configs.GROUP_M)
        out.append(Variant("_linear_gelu_fwd_kernel", arch, dtype, tuple(consts.items()), c.num_warps, c.num_stages,
                           "bert-base"))
    block_r, block_n, warps = _bg._elementwise_tile(3072)
    out.append(Variant("_bias_gelu_bwd_kernel", arch, dtype,
                       tuple(dict(HAS_BIAS=True, TANH=False, BLOCK_R=block_r, BLOCK_N=block_n).items()), warps, 3,
                       "bert-base"))
    return out


# ----------------------------------------------------------------------------------------------
# checks and report
# ----------------------------------------------------------------------------------------------
# fp32 table configs may spill this much a thread: the fp32 kernels compute every dot with IEEE products
# on the FMA units (no tensor cores, 1/16 of their rate on sm_80/sm_90), so 16 registers' worth of L1
# round trips per tile is small next to the math, and ptxas's choices there swing by that much between
# flag variants of one config (dropout on or off); 16-bit kernels run at tensor-core speed: no spill
MAX_SPILL_FP32 = 64


def check(r: Result, max_spill: int, max_spill_autotune: Optional[int]) -> None:
    v = r.variant
    if not r.ok:
        r.problems.append("compile error: " + r.error)
        return
    if r.shared is not None and r.shared > SHARED_LIMIT[v.arch]:
        r.problems.append(f"shared memory {r.shared} B > {SHARED_LIMIT[v.arch]} B ({ARCH_NAME[v.arch]} per block)")
    if v.origin.startswith("sm80") and v.arch == 80 and r.shared is not None and r.shared > SHARED_LIMIT_SM86:
        r.problems.append(f"sm80 table entry needs {r.shared} B of shared memory > {SHARED_LIMIT_SM86} B (sm_86/89)")
    limit = max_spill_autotune if v.origin.endswith("autotune") else max_spill
    if limit is not None and v.dtype == "fp32" and not v.origin.endswith("autotune"):
        limit = max(limit, MAX_SPILL_FP32)
    if limit is not None and r.spill is not None and r.spill > limit:
        if v.warps == 32 and r.regs is not None and r.regs >= 64:
            # a 1024-thread block (the most a block can have) gets at most 64 registers a thread: no
            # launch config of a row-in-registers kernel avoids spilling there (add_layer_norm's backward
            # at 8192 columns); reported, not failed
            r.notes.append(f"spills {r.spill} B at the register cap of a 1024-thread block")
        else:
            r.problems.append(f"spills {r.spill} B > {limit} B")


PREFACE = """# Triton kernel resources

Written by `tools/triton_aot.py --markdown docs/triton-resources.md` (one section per Triton version;
rerunning replaces that version's section). Each row is one compiled variant: the kernel, the target
(sm_80, sm_90a), the activations' dtype, its constexpr arguments, the launch config, where that config
comes from (a family's table in fastbert/triton/configs.py, an autotune candidate, or a fixed launcher
rule), and what ptxas reported: registers per thread, spill stores + loads (bytes), shared memory per
block (bytes, from Triton's metadata), compile seconds on the machine named. Table configs must not
spill at 16 bits (at fp32, up to MAX_SPILL_FP32 bytes: see the tool); shared memory must fit the
arch's per-block limit (227 KiB sm_90, 163 KiB sm_80, and 99 KiB for the sm80 table, which also serves
sm_86/sm_89). Integer arguments are compiled as the JIT specialises them at model shapes (see
NOT_DIV16 and UNITS in the tool).
"""


def markdown(results: List[Result], command: str) -> str:
    lines = [f"<!-- triton {triton.__version__} -->", f"## Triton {triton.__version__}", "",
             f"`{command}`: {len(results)} variants, {sum(r.seconds for r in results):.0f} s of compile time "
             f"on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
             f"{sum(1 for r in results if r.problems)} with problems.", "", "```", summary(results), "```", "",
             "| kernel | arch | dtype | constexprs | warps | stages | from | regs | spill B | shared B | s "
             "| problems |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results, key=lambda r: (r.variant.kernel, r.variant.arch, r.variant.dtype, r.variant.consts)):
        v = r.variant
        c = " ".join(f"{k}={_short(x)}" for k, x in v.consts)
        dt = v.dtype + (f" (w {v.wdtype})" if v.wdtype else "")
        said = "; ".join(r.problems + r.notes)
        lines.append(f"| {v.kernel} | {ARCH_NAME[v.arch]} | {dt} | {c} | {v.warps} | {v.stages} | {v.origin} | "
                     f"{_na(r.regs)} | {_na(r.spill)} | {_na(r.shared)} | {r.seconds:.1f} | {said} |")
    lines.append(f"<!-- /triton {triton.__version__} -->")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, section: str) -> None:
    """Replace this Triton version's section of `path` (or add it), keeping the others, newest first."""
    sections = {}
    if os.path.exists(path):
        text = open(path).read()
        for m in re.finditer(r"<!-- triton (\S+) -->.*?<!-- /triton \1 -->\n", text, re.S):
            sections[m.group(1)] = m.group(0)
    sections[triton.__version__] = section
    order = sorted(sections, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.+]", v)],
                   reverse=True)
    with open(path, "w") as f:
        f.write(PREFACE + "\n" + "\n".join(sections[v] for v in order))


def _na(x):
    return "-" if x is None else str(x)


def summary(results: List[Result]) -> str:
    """Per kernel and arch: variants, the largest register / spill / shared figures."""
    groups: Dict[Tuple[str, int], List[Result]] = {}
    for r in results:
        groups.setdefault((r.variant.kernel, r.variant.arch), []).append(r)
    lines = [f"{'kernel':34} {'arch':7} {'variants':>8} {'max regs':>8} {'max spill':>9} {'max shared':>10} "
             f"{'compile s':>9} {'problems':>8}"]
    for (k, a), rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok]
        lines.append(f"{k:34} {ARCH_NAME[a]:7} {len(rs):8} {max((r.regs or 0) for r in ok) if ok else '-':>8} "
                     f"{max((r.spill or 0) for r in ok) if ok else '-':>9} "
                     f"{max((r.shared or 0) for r in ok) if ok else '-':>10} {sum(r.seconds for r in rs):9.1f} "
                     f"{sum(1 for r in rs if r.problems):8}")
    return "\n".join(lines)


def _init_worker(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def run(variants: List[Variant], jobs: int, cache: Optional[str] = None) -> List[Result]:
    """Compile every variant; a private, empty Triton cache unless `cache` names one (a warm cache times
    what a second process pays: loading, no compiling; ptxas does not run, so no resource figures)."""
    with tempfile.TemporaryDirectory(prefix="fastbert-aot-") as tmp:
        cache = cache or tmp
        if jobs <= 1:
            _init_worker(cache)
            return [compile_one(v) for v in variants]
        with cf.ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(cache,)) as ex:
            return list(ex.map(compile_one, variants, chunksize=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--set", choices=("ci", "models", "default", "autotune", "all"), default="ci",
                    help="ci: what CI runs (each kernel once per arch); models: the table configs of the\n"
                         "model paths; default: every config the launchers can pick (hours on 2 cores);\n"
                         "autotune: FASTBERT_AUTOTUNE=1's candidates; all: default and autotune")
    ap.add_argument("--cover", choices=("ci", "wide", "all"), default="ci",
                    help="constexpr flags and head dims: ci (every launch config at its worst case, the rest at\n"
                         "the main tile), wide (each flag alone and the fullest sets everywhere), all (the product)")
    ap.add_argument("--arch", type=int, action="append", choices=(80, 90), help="default: both")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="a regex the variant's label must match")
    ap.add_argument("--max-spill", type=int, default=0, help="spill bytes allowed in a table config (default 0)")
    ap.add_argument("--max-spill-autotune", type=int, default=None,
                    help="spill bytes allowed in an autotune candidate (default: unchecked)")
    ap.add_argument("--bert-base", action="store_true", help="only what a patched bert-base launches, timed")
    ap.add_argument("--dtype", default="bf16", help="--bert-base's dtype")
    ap.add_argument("--markdown", help="write the per-variant table here")
    ap.add_argument("--cache", help="use this Triton cache directory (run twice: the second run's time is a\n"
                                    "warm cache's, what a second process pays)")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    args = ap.parse_args(argv)
    archs = args.arch or [80, 90]

    if args.bert_base:
        variants = [v for a in archs for v in bert_base_variants(args.dtype, a)]
    elif args.set == "ci":
        variants = ci_variants(archs)
    elif args.set == "models":
        variants = model_variants(archs)
    else:
        sets = ("default", "autotune") if args.set == "all" else (args.set,)
        variants = [v for s in sets for v in all_variants(s, args.cover, archs)]
    if args.only:
        variants = [v for v in variants if re.search(args.only, v.label())]
    if args.list:
        print("\n".join(v.label() + f"  [{v.origin}]" for v in variants))
        print(f"{len(variants)} variants")
        return 0
    print(f"triton {triton.__version__}: compiling {len(variants)} variants for "
          f"{', '.join(ARCH_NAME[a] for a in archs)} with {args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    results = run(variants, args.jobs, args.cache)
    wall = time.perf_counter() - t0
    for r in results:
        check(r, args.max_spill, args.max_spill_autotune)
    print(summary(results))
    bad = [r for r in results if r.problems]
    for r in bad:
        print(f"PROBLEM {r.variant.label()} [{r.variant.origin}]: {'; '.join(r.problems)}")
    for r in results:
        if r.notes:
            print(f"note {r.variant.label()} [{r.variant.origin}]: {'; '.join(r.notes)}")
    print(f"{len(results)} variants in {wall:.1f} s wall ({sum(r.seconds for r in results):.1f} s of compile time), "
          f"{len(bad)} with problems")
    if args.bert_base:
        for a in archs:
            rs = [r for r in results if r.variant.arch == a]
            print(f"bert-base {args.dtype} first-call compile on {ARCH_NAME[a]}: {len(rs)} kernels, "
                  f"{sum(r.seconds for r in rs):.1f} s of compile time (serial)")
    if args.markdown:
        given = list(argv if argv is not None else sys.argv[1:])
        if "--markdown" in given:  # the command that made the section, less where it was written
            k = given.index("--markdown")
            del given[k:k + 2]
        given = [a for a in given if not a.startswith("--markdown=")]
        write_markdown(args.markdown, markdown(results, " ".join(["python tools/triton_aot.py"] + given)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
