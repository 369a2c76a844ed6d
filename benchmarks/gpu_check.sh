#!/usr/bin/env bash
# Everything this project checks on a GPU, as one command on a bare GPU machine without network
# (about 5 minutes on an H100; every stage has a time limit so that the whole stays under 8):
#
#   1. installs the carried pure-Python wheels (benchmarks/fetch_wheels.sh; diffusers is not there)
#      into /tmp/ilf_site when `import diffusers` fails;
#   2. builds the extension with its CUDA kernels against this machine's torch
#      (pip install --no-build-isolation -e ., ILF_CUDA_BUILD=1, TORCH_CUDA_ARCH_LIST as set, else
#      setup.py's "8.0;9.0") and checks that the CUDA ops loaded;
#   3. runs the GPU tests (pytest -m gpu over the test files that have any);
#   4. times the models and kernels (benchmarks/gpu_bench.py) at real sizes.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Writes into OUTDIR: gpu_check.log (this script's stages), build.log, gpu_tests.log, and
# gpu_bench_<card>.json / .md. Exit status: 0 only when the build, the tests and the benchmark passed.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${ILF_WHEELS:-.whl}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
status=0
log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((470 - ($(date +%s) - T0))); }  # seconds left of the 8-minute budget, with a margin
atleast() { echo $(($1 > $2 ? $1 : $2)); }

log "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.log"

# 1. wheels
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "no diffusers here and no wheels in $WHEELS: run benchmarks/fetch_wheels.sh and carry $WHEELS"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ilf_site \
    "$WHEELS"/*.whl || { log "installing the wheels failed"; exit 2; }
  export PYTHONPATH=/tmp/ilf_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! v=$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>&1); then
  log "diffusers does not import (a dependency missing here? carry its wheel too): $(echo "$v" | tail -1)"
  exit 2
fi
log "diffusers $v"

# 2. build against this machine's torch
export ILF_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building the extension (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default})"
if ! timeout 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$OUT/build.log" 2>&1; then
  log "build failed; the end of build.log:"
  tail -40 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"
  exit 1
fi
grep -o "gencode=arch=compute_[0-9]*,code=sm_[0-9]*" "$OUT/build.log" | sort | uniq -c | tee -a "$OUT/gpu_check.log"
if ! "$PY" -c "import ilf_runtime, sys; st = ilf_runtime.ext_status(); print(st); sys.exit(0 if st['cuda_ops'] else 1)" \
  2>&1 | tee -a "$OUT/gpu_check.log"; then
  log "the extension did not load with its CUDA ops"
  exit 1
fi

# 3. GPU tests
files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
log "GPU tests: $(echo $files)"
timeout "$(atleast $(($(left) - 200)) 60)" "$PY" -m pytest -q -m gpu -p no:cacheprovider $files 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; log "GPU tests FAILED (see gpu_tests.log)"; }

# 4. timings
log "benchmark ($(left) s left)"
timeout "$(atleast "$(left)" 60)" "$PY" benchmarks/gpu_bench.py --out "$OUT" --reps "${ILF_BENCH_REPS:-5}" 2>&1 | tee -a "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; log "benchmark FAILED or ran out of time"; }
log "done, status $status"
exit $status
