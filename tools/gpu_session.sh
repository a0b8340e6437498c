#!/usr/bin/env bash
# GPU validation in stages, for a lent GPU machine with a short command limit (see README, "On a GPU").
#
#   tools/gpu_session.sh STAGE...      stages: info build smoke tests gpu-tests sanitizer bench
#
# Logs go to $OUT (default ./gpu-out). `build` compiles fastbert._C for the local GPU's arch
# (FASTBERT_CUDA_ARCHS, default 90a) and copies the built library to $OUT so a later call can bring it
# back instead of rebuilding; when fastbert/_C*.so for this Python already exists, `build` is skipped
# unless FORCE_BUILD=1. Every stage runs under its own time limit (STAGE_TIMEOUT_<stage>, seconds)
# so a stuck stage still leaves its log behind; the script's exit status is the number of failed stages.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export FAILURE_LOG=${FAILURE_LOG:-$OUT/failures.log}
JOBS=${JOBS:-$(nproc)}
failed=0

run_stage() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s ==="
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}

stage_info() {
  nvidia-smi
  nvcc --version | tail -2
  "$PY" -c "import torch, triton, transformers, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, 'SMs', p.total_memory >> 20, 'MiB')"
  which compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
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
print(backends.extension_status())
for op in ("add_layer_norm", "bias_gelu", "linear_gelu", "attention"):
    print(op, "CUDA kernels:", all(backends.has_kernel(f"{op}_{d}", "CUDA") for d in ("fwd", "bwd")))
EOF
}

# the whole suite, gpu tests included; xdist spreads it over the CPU cores (one GPU, shared)
stage_tests() { "$PY" -m pytest -q -ra -n "${XDIST:-8}" --timeout 300 -p no:cacheprovider -p failure_log ${PYTEST_ARGS:-tests}; }
stage_gpu-tests() { "$PY" -m pytest -q -ra -n "${XDIST:-8}" --timeout 300 -p no:cacheprovider -p failure_log -m gpu ${PYTEST_ARGS:-tests}; }
stage_sanitizer() { "$PY" -m pytest -v -ra -p no:cacheprovider -p failure_log tests/ops/test_cuda_backend.py -k compute_sanitizer; }
stage_gpu_tests() { stage_gpu-tests; }
stage_bench() { "$PY" -m fastbert.bench ${BENCH_ARGS:---quick} --out "$OUT/bench"; }

export OUT PY JOBS
export -f stage_info stage_build stage_smoke stage_tests stage_gpu-tests stage_gpu_tests stage_sanitizer stage_bench
for s in "$@"; do
  var="STAGE_TIMEOUT_${s//-/_}"
  run_stage "$s" "${!var:-540}" "stage_$s"
done
echo "failed stages: $failed"
# the device tool brings back at most 8 files: pack everything but the built library into one archive
# (one archive per invocation, named by the stages it ran)
tgz="logs-$(IFS=-; echo "$*").tgz"
(cd "$OUT" && find . -type f ! -name '*.so' ! -name 'logs-*.tgz' | tar czf "$tgz" -T - &&
  find . -mindepth 1 ! -name '*.so' ! -name 'logs-*.tgz' -delete) 2>/dev/null
exit $failed
