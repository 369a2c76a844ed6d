#!/usr/bin/env bash
# Everything this project checks on a GPU, as one command on a bare GPU machine without network
# (about 5 minutes on an H100; every stage has a time limit so that the whole stays under 8: wheels
# 60 s, build 240 s (a build that reaches it fails the check), GPU tests what is left of a 470 s budget
# less 200 s kept for the benchmark, benchmark the rest; tests and benchmark get at least 60 s each):
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
# OUTDIR and ILF_WHEELS are taken relative to the caller's directory (the default .whl to the repo root)
if ! mkdir -p "$OUT" || ! OUT=$(cd "$OUT" && pwd); then echo "gpu_check: cannot create OUTDIR $OUT" >&2; exit 2; fi
case ${ILF_WHEELS:-} in
  "" | /*) WHEELS=${ILF_WHEELS:-} ;;
  *) WHEELS=$PWD/$ILF_WHEELS ;;
esac
cd "$(dirname "$0")/.." || exit 2
WHEELS=${WHEELS:-$PWD/.whl}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s)
status=0
log() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((470 - ($(date +%s) - T0))); }  # seconds left of the 8-minute budget, with a margin
atleast() { echo $(($1 > $2 ? $1 : $2)); }

if ! v=$("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1); then
  log "$PY cannot import torch: $(echo "$v" | tail -1)"
  exit 2
fi
log "python: $v"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.log"

# 1. wheels
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    log "no diffusers here and no wheels in $WHEELS: run benchmarks/fetch_wheels.sh and carry $WHEELS"
    exit 2
  fi
  timeout -k 10 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ilf_site "$WHEELS"/*.whl || { log "installing the wheels failed"; exit 2; }
  export PYTHONPATH=/tmp/ilf_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! v=$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>&1); then
  log "diffusers does not import (a dependency missing here? carry its wheel too): $(echo "$v" | tail -1)"
  exit 2
fi
log "diffusers $v"

# 2. build against this machine's torch
export ILF_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  # torch guesses CUDA_HOME as `which nvcc`/../.., wrong for a symlinked or wrapper nvcc: ask nvcc
  top=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
  [ -n "$top" ] && [ -f "$top/include/cuda_runtime.h" ] && CUDA_HOME=$(cd "$top" && pwd -P) && export CUDA_HOME
fi
log "building the extension (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-setup.py default}, CUDA_HOME=${CUDA_HOME:-guessed by torch}, MAX_JOBS=$MAX_JOBS; limit 240 s)"
tb=$(date +%s)
if ! timeout -k 10 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . >"$OUT/build.log" 2>&1; then
  log "build failed or ran past 240 s (after $(($(date +%s) - tb)) s); the end of build.log:"
  tail -40 "$OUT/build.log" | tee -a "$OUT/gpu_check.log"
  exit 1
fi
log "built in $(($(date +%s) - tb)) s"
grep -o "gencode=arch=compute_[0-9]*,code=sm_[0-9]*" "$OUT/build.log" | sort | uniq -c | tee -a "$OUT/gpu_check.log"
if ! "$PY" -c "import ilf_runtime, sys; st = ilf_runtime.ext_status(); print(st); sys.exit(0 if st['cuda_ops'] else 1)" \
  2>&1 | tee -a "$OUT/gpu_check.log"; then
  log "the extension did not load with its CUDA ops"
  exit 1
fi

# 3. GPU tests
files=$(grep -l "pytest.mark.gpu" tests/test_*.py)
tl=$(atleast $(($(left) - 200)) 60)  # keeps 200 s for the benchmark
log "GPU tests: ${files//$'\n'/ } (limit $tl s)"
# shellcheck disable=SC2086  # $files: one word per file
timeout -k 10 "$tl" "$PY" -m pytest -q -m gpu -p no:cacheprovider $files 2>&1 |
  tee "$OUT/gpu_tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; log "GPU tests FAILED or ran out of time (see gpu_tests.log)"; }
log "GPU tests: $(grep -E '(passed|failed|skipped|error|deselected)' "$OUT/gpu_tests.log" | tail -1)"

# 4. timings
log "benchmark ($(left) s left)"
timeout -k 10 "$(atleast "$(left)" 60)" "$PY" benchmarks/gpu_bench.py --out "$OUT" --reps "${ILF_BENCH_REPS:-5}" 2>&1 | tee -a "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; log "benchmark FAILED or ran out of time"; }
log "done, status $status"
exit $status
