#!/usr/bin/env bash
# GPU validation in stages, for a lent GPU machine with a short time budget (README, "On a GPU").
#
#   tools/gpu_session.sh window               the whole 10-minute window, in order (below)
#   tools/gpu_session.sh STAGE...             stages: changes info build smoke tests gpu-tests sanitizer
#                                             headline bench
#   tools/gpu_session.sh --dry-run window     the same steps on CPU tensors at tiny sizes: the rehearsal
#                                             (tests/test_gpu_session.py runs it)
#
# window = changes info build smoke gpu-tests sanitizer headline, each under its own limit
# (STAGE_TIMEOUT_<stage>, seconds) and all of them under WINDOW_S (default 540 s): a stage gets what is
# left when it starts, so a slow stage cannot push the window past the device's 10-minute command limit.
# Logs and results go to $OUT (default ./gpu-out) as they are written: a stage stopped by its limit
# still leaves its log, its failures (tools/failure_log.py) and its benchmark rows (checkpointed).
# `build` compiles fastbert._C for FASTBERT_CUDA_ARCHS (default 90a) with MAX_JOBS=$JOBS and copies the
# library to $OUT; an existing fastbert/_C*.so for this Python is reused unless FORCE_BUILD=1.
# The exit status is the number of failed stages.
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export FAILURE_LOG=${FAILURE_LOG:-$OUT/failures.log}
JOBS=${JOBS:-$(nproc)}
WINDOW_S=${WINDOW_S:-540}
failed=0
t_start=$SECONDS

# the headline benchmark's sizes; --dry-run shrinks them to CPU scale (same providers, same steps)
if [ $DRY_RUN = 1 ]; then
  BENCH_DEVICE=cpu MODEL=${MODEL:-minilm-l6} DTYPE=float32 BATCH=2 SEQ=16 SMALL_BATCH=1 VARLEN_BATCH=2
  VARLEN_SEQ=32 ATTN_BATCH_SHORT=2 ATTN_BATCH_LONG=1 ROW_BATCH=2 ROW_SEQ=32
else
  # B * S = 16384 tokens for the attention rows (128 x 128, 32 x 512) and the row-wise ops (32 x 512)
  BENCH_DEVICE=cuda MODEL=${MODEL:-bert-base} DTYPE=bfloat16 BATCH=32 SEQ=128 SMALL_BATCH=1 VARLEN_BATCH=16
  VARLEN_SEQ=512 ATTN_BATCH_SHORT=128 ATTN_BATCH_LONG=32 ROW_BATCH=32 ROW_SEQ=512
fi
HEADLINE_COMPILE=${HEADLINE_COMPILE:-1}

run_stage() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  if [ -n "${WINDOW:-}" ]; then  # inside the window: never past its end
    local left=$((WINDOW_S - (SECONDS - t_start)))
    if [ $left -lt 5 ]; then
      echo "=== $name skipped: the window's ${WINDOW_S}s are spent ==="; failed=$((failed + 1)); return 1
    fi
    [ $left -lt $limit ] && limit=$left
  fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s ==="
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}

# what changed, per kernel file, since it last ran on a GPU (the table in docs/gpu-validation.md)
stage_changes() {
  if ! git rev-parse --git-dir >/dev/null 2>&1; then
    echo "no git history here: see docs/gpu-validation.md for when each kernel last ran on a GPU"; return 0
  fi
  echo "HEAD $(git log -1 --format='%h %cs %s')"
  sed -n '/^<!-- kernels -->/,/^<!-- \/kernels -->/p' docs/gpu-validation.md | grep '^| `' |
  while IFS='|' read -r _ file when commit _; do
    file=$(echo "$file" | tr -d ' `'); commit=$(echo "$commit" | tr -d ' ')
    if [ "$commit" = "-" ]; then
      echo "$file: never ran on a GPU"
    else
      n=$(git log --oneline --follow "$commit"..HEAD -- "$file" | wc -l)
      echo "$file: last on a GPU at $commit ($(echo "$when" | xargs)); $n commit(s) since"
      git log --follow --format='    %h %<(72,trunc)%s' "$commit"..HEAD -- "$file" | head -3
    fi
  done
}

stage_info() {
  if [ $DRY_RUN = 1 ]; then
    echo "dry run: CPU only"
  else
    nvidia-smi
    nvcc --version | tail -2
    which compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
  fi
  "$PY" -c "import torch, triton, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; print(p.name, p.multi_processor_count, 'SMs', p.total_memory >> 20, 'MiB') if p else print('no CUDA device')"
}

stage_build() {
  local so
  so=$(ls fastbert/_C.cpython-"$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.so 2>/dev/null | head -1)
  if [ -n "$so" ] && [ "${FORCE_BUILD:-0}" != 1 ]; then
    echo "reusing $so (FORCE_BUILD=1 rebuilds)"
  else
    FASTBERT_CUDA_ARCHS=${FASTBERT_CUDA_ARCHS:-90a} MAX_JOBS=$JOBS \
      "$PY" -m pip install --no-deps --no-build-isolation -v -e . || return 1
    so=$(ls -t fastbert/_C*.so | head -1)
    cp "$so" "$OUT/" && echo "copied $so to \$OUT"
  fi
  "$PY" -c "import fastbert; print(fastbert.explain())"
}

stage_smoke() {
  "$PY" - <<'EOF'
import torch, fastbert
from fastbert import backends
from fastbert.triton import configs
print(backends.extension_status())
dev = "CUDA" if torch.cuda.is_available() else "CPU"
for op in ("add_layer_norm", "bias_gelu", "linear_gelu", "attention"):
    print(op, dev, "kernels:", all(backends.has_kernel(f"{op}_{d}", dev) for d in ("fwd", "bwd")))
if torch.cuda.is_available():
    print("triton config family:", configs.family(torch.device("cuda")))
    # one call of each op through its Triton kernels: the first compiles, timed
    import time
    x = torch.randn(256, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 128, 12, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 128, device="cuda", dtype=torch.bool)
    with fastbert.use_backend("triton"):
        for name, f in (("attention", lambda: fastbert.ops.attention(q, q, q, attention_mask=mask)),
                        ("add_layer_norm", lambda: fastbert.ops.add_layer_norm(x, torch.ones(768, device="cuda", dtype=x.dtype), None, residual=x)),
                        ("linear_gelu", lambda: fastbert.ops.linear_gelu(x, w, None)),
                        ("bias_gelu", lambda: fastbert.ops.bias_gelu(x, None))):
            t0 = time.perf_counter(); f(); torch.cuda.synchronize()
            print(f"triton {name}: first call {time.perf_counter() - t0:.2f} s")
EOF
}

_pytest() {  # a per-test limit where pytest-timeout is installed
  local t=(); "$PY" -c "import pytest_timeout" 2>/dev/null && t=(--timeout 300)
  "$PY" -m pytest -q -ra -n "${XDIST:-8}" "${t[@]}" -p no:cacheprovider -p failure_log "$@"
}
# the whole suite, gpu tests included; xdist spreads it over the CPU cores (one GPU, shared)
stage_tests() { _pytest ${PYTEST_ARGS:-tests}; }
# the window's share: gpu-marked tests without the slow ones (stage tests runs everything)
stage_gpu-tests() { _pytest -m "gpu and not slow" ${PYTEST_ARGS:-tests}; }
stage_sanitizer() {
  "$PY" -m pytest -v -ra -p no:cacheprovider -p failure_log tests/ops/test_cuda_backend.py \
    -k "compute_sanitizer and (${SANITIZER_TOOLS:-memcheck or racecheck})"
}

# the headline rows (the GPU issue's goals), each call appending to $OUT/bench (rows are checkpointed
# as they are measured), most important first: a window that runs out keeps what came before
stage_headline() {
  local b=("$PY" -m fastbert.bench --device "$BENCH_DEVICE" --out "$OUT/bench" --no-plots --dtypes "$DTYPE")
  set -x
  # the model at B x S, inference and a training step, padded and its variable-length batch
  "${b[@]}" --quick --models "$MODEL" --batch "$BATCH" --seq "$SEQ" --modes infer,train \
    --providers hf-eager,hf-sdpa,fastbert --ops none || return 1
  # the variable-length goal's shape (B16, max 512), inference
  "${b[@]}" --append --quick --models "$MODEL" --batch "$VARLEN_BATCH" --seq "$VARLEN_SEQ" --modes infer \
    --providers hf-sdpa,fastbert --ops none || return 1
  # attention at B * S = 16384 tokens, S = 128 and 512, forward and backward, against each SDPA backend
  "${b[@]}" --append --quick --no-models --op-model "$MODEL" --ops attention --op-batch "$ATTN_BATCH_SHORT" \
    --op-seq "$SEQ" --op-modes fwd,bwd || return 1
  "${b[@]}" --append --quick --no-models --op-model "$MODEL" --ops attention --op-batch "$ATTN_BATCH_LONG" \
    --op-seq "$VARLEN_SEQ" --op-modes fwd,bwd || return 1
  # batch 1: where launch overhead shows, so with CUDA graphs too
  "${b[@]}" --append --quick --models "$MODEL" --batch "$SMALL_BATCH" --seq "$SEQ" --no-varlen --modes infer \
    --providers hf-sdpa,fastbert,fastbert-cuda-cudagraph,fastbert-triton-cudagraph --ops none || return 1
  # the memory-bound ops at 16384 rows (hidden 768, intermediate 3072)
  "${b[@]}" --append --quick --no-models --op-model "$MODEL" --ops add_layer_norm,bias_gelu \
    --op-batch "$ROW_BATCH" --op-seq "$ROW_SEQ" --op-modes fwd,bwd || return 1
  # torch.compile of HF at the first shape (inference, padded: one compile), last: it is the slowest
  if [ "$HEADLINE_COMPILE" = 1 ]; then
    "${b[@]}" --append --models "$MODEL" --batch "$BATCH" --seq "$SEQ" --no-varlen --modes infer \
      --providers hf-sdpa-compile --ops none || return 1
  fi
  set +x
  head -80 "$OUT/bench/results.md" 2>/dev/null
}
stage_bench() { "$PY" -m fastbert.bench --device "$BENCH_DEVICE" ${BENCH_ARGS:---quick} --out "$OUT/bench"; }

export OUT PY JOBS DRY_RUN BENCH_DEVICE MODEL DTYPE BATCH SEQ SMALL_BATCH VARLEN_BATCH VARLEN_SEQ ATTN_BATCH_SHORT
export ATTN_BATCH_LONG ROW_BATCH ROW_SEQ
export HEADLINE_COMPILE
export -f _pytest stage_changes stage_info stage_build stage_smoke stage_tests stage_gpu-tests stage_sanitizer
export -f stage_headline stage_bench

# per-stage limits inside the window (seconds); they add up to more than WINDOW_S on purpose: a stage
# that finishes early leaves its time to the next ones
: "${STAGE_TIMEOUT_changes:=20}" "${STAGE_TIMEOUT_info:=30}" "${STAGE_TIMEOUT_build:=120}"
: "${STAGE_TIMEOUT_smoke:=60}" "${STAGE_TIMEOUT_gpu_tests:=120}" "${STAGE_TIMEOUT_sanitizer:=120}"
: "${STAGE_TIMEOUT_headline:=300}"

stages=("$@")
if [ "${stages[*]}" = "window" ]; then
  WINDOW=1
  stages=(changes info build smoke gpu-tests sanitizer headline)
fi
for s in "${stages[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then echo "unknown stage: $s"; failed=$((failed + 1)); continue; fi
  var="STAGE_TIMEOUT_${s//-/_}"
  run_stage "$s" "${!var:-540}" "stage_$s"
done
echo "failed stages: $failed; $((SECONDS - t_start)) s in all"
# the device tool brings back at most 8 files: pack everything but the built library into one archive
# (one archive per invocation, named by the stages it ran)
tgz="logs-$(IFS=-; echo "$*").tgz"
(cd "$OUT" && find . -type f ! -name '*.so' ! -name 'logs-*.tgz' | tar czf "$tgz" -T - &&
  find . -mindepth 1 ! -name '*.so' ! -name 'logs-*.tgz' -delete) 2>/dev/null
exit $failed
