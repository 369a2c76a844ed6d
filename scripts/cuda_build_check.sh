#!/usr/bin/env bash
# shellcheck disable=SC2015,SC2016  # `a && b || skip` is meant; the bash -c script takes $0..$2
# Compile check of the WHOLE extension, CUDA units included (csrc/cuda/ilf_cuda.cpp with torch headers
# and the .cu kernels), against a CUDA build of torch, on a machine without a GPU. Nothing runs on a
# GPU: it builds ilf_runtime._C with ILF_CUDA_BUILD=1 and checks that `import ilf_runtime` loads it
# with its CUDA ops compiled in (ext_status()["cuda_ops"]).
#
#   bash scripts/cuda_build_check.sh
#
# It works outside the repository: the tree (tracked and untracked-but-not-ignored files) is copied
# into a temporary folder, built there with pip (--no-build-isolation, into a --target folder, so the
# venv itself stays clean), and the copy is removed at exit. No _C*.so or build/ is left in the repo.
#
# Environment:
#   ILF_CUDA_VENV=DIR        venv to use: reused when its torch is a CUDA build (fast reruns); when DIR
#                            does not exist (or is empty) it is created there and KEPT. Any other
#                            existing DIR is refused. Unset: a throwaway venv, removed at exit (~5.6 GB).
#   ILF_CUDA_TORCH           torch requirement to install (default torch==2.14.1, a cu13 build)
#   TORCH_CUDA_ARCH_LIST     default 9.0 (no GPU here to detect one from)
#   CUDA_HOME                toolkit root; default: asked from nvcc (which may be a wrapper script), else
#                            /usr/local/cuda
#   MAX_JOBS                 parallel compile jobs, default 1
#   ILF_CUDA_INSTALL_TIMEOUT seconds for creating the venv and installing torch (default 1200)
#   ILF_CUDA_BUILD_TIMEOUT   seconds for the build (default 1200)
#   ILF_CUDA_LOAD_TIMEOUT    seconds for the import check (default 300)
#   ILF_CUDA_MIN_FREE_GB     free disk needed to install a new venv (default 12)
#   ILF_CUDA_LOG             where the full install/build log is kept (default ${TMPDIR:-/tmp}/ilf_cuda_build_check.log)
#
# Exit status: 0 when the build and the load check passed, and also (with one line starting
# "cuda_build_check: SKIP") when the check cannot run here: no CUDA toolkit, no suitable python, not
# enough disk, or the CUDA torch cannot be installed (no network, registry refusal, time limit).
# 1 when the compile or the load check fails, with the end of the build log; 2 when ILF_CUDA_VENV
# names an existing folder that is neither a CUDA-torch venv nor one this script created.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_REQ=${ILF_CUDA_TORCH:-torch==2.14.1}
T_INSTALL=${ILF_CUDA_INSTALL_TIMEOUT:-1200}
T_BUILD=${ILF_CUDA_BUILD_TIMEOUT:-1200}
T_LOAD=${ILF_CUDA_LOAD_TIMEOUT:-300}
MIN_FREE_GB=${ILF_CUDA_MIN_FREE_GB:-12}
LOG=${ILF_CUDA_LOG:-${TMPDIR:-/tmp}/ilf_cuda_build_check.log}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-1}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1

T0=$(date +%s)
say() { echo "cuda_build_check [+$(($(date +%s) - T0))s] $*"; }
skip() { echo "cuda_build_check: SKIP ($*)"; exit 0; }
fail() {
  echo "cuda_build_check: FAILED ($1); full log: $LOG"
  # the compiler's own messages first: the end of pip's output is mostly its traceback
  if grep -qE '^ *FAILED: |: (fatal )?error' "$LOG"; then
    echo "compiler errors:"
    grep -E '^ *FAILED: |: (fatal )?error|^ *[0-9]+ errors? detected' "$LOG" |
      head -n 30 | cut -c1-400 | sed 's/^/  | /'
  fi
  echo "the end of the log:"
  tail -n "${2:-40}" "$LOG" | sed 's/^/  | /'
  exit 1
}
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}'; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ilf_cuda_check.XXXXXX") || skip "cannot create a temporary folder"
VENV_IS_TEMP=0
cleanup() {
  rm -rf "$WORK"
  [ "$VENV_IS_TEMP" = 1 ] && rm -rf "$VENV"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
: >"$LOG"

# --- 0. toolkit -------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
  # torch takes CUDA_HOME from `which nvcc`/../.. , wrong when nvcc is a wrapper script: ask nvcc itself.
  if command -v nvcc >/dev/null 2>&1; then
    top=$(nvcc -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$top" ] && CUDA_HOME=$(cd "$top" 2>/dev/null && pwd -P)
  fi
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
[ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] ||
  skip "no CUDA toolkit at CUDA_HOME=$CUDA_HOME; set CUDA_HOME to the toolkit root"
export CUDA_HOME
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || skip "$PY is not Python >= 3.11"

# --- 1. venv with a CUDA torch ----------------------------------------------------------------
cuda_torch() { "$1/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is None)' >/dev/null 2>&1; }
DEPS=(diffusers==0.42.1 safetensors numpy Pillow ninja setuptools wheel)
# what the build (setuptools) and `import ilf_runtime` (diffusers and its dependencies) need
missing_deps() {
  "$1/bin/python" -c '
import importlib.util as u
print(" ".join(m for m in ("diffusers", "safetensors", "numpy", "PIL", "setuptools") if u.find_spec(m) is None))' 2>&1
}
if [ -n "${ILF_CUDA_VENV:-}" ]; then
  VENV=$ILF_CUDA_VENV
else
  VENV=$WORK/venv
  VENV_IS_TEMP=1
fi
if [ -x "$VENV/bin/python" ] && cuda_torch "$VENV"; then
  say "reusing $VENV"
  miss=$(missing_deps "$VENV")
  if [ -n "$miss" ]; then
    if [ ! -f "$VENV/.ilf_cuda_build_check" ]; then
      echo "cuda_build_check: ILF_CUDA_VENV=$VENV lacks $miss; install ${DEPS[*]} into it, or point" \
        "ILF_CUDA_VENV to a new folder" >&2
      exit 2
    fi
    say "installing the missing $miss into $VENV"
    timeout -k 30 "$T_INSTALL" "$VENV/bin/python" -m pip install -q --no-cache-dir "${DEPS[@]}" >>"$LOG" 2>&1 ||
      skip "cannot install ${DEPS[*]} into $VENV: $(grep -E 'ERROR|Error|error' "$LOG" | tail -n 1 | cut -c1-200)"
  fi
else
  # Install only into a folder that is new, empty, or one this script created before (its marker
  # file): never into somebody's venv or a Python installation, which `python -m venv DIR` and
  # pip would rewrite (a pyvenv.cfg, activate scripts, 5.6 GB of packages, upgraded setuptools...).
  MARK=$VENV/.ilf_cuda_build_check
  if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ] && [ ! -f "$MARK" ]; then
    echo "cuda_build_check: ILF_CUDA_VENV=$VENV exists but has no CUDA torch and was not made by this" \
      "script; point ILF_CUDA_VENV to a new folder (it is created there and kept)" >&2
    exit 2
  fi
  mkdir -p "$VENV" && touch "$MARK" || skip "cannot create $VENV"
  for d in "$VENV" "$WORK"; do
    g=$(free_gb "$d")
    [ -n "$g" ] && [ "$g" -lt "$MIN_FREE_GB" ] &&
      skip "not enough disk: ${g} GB free at $d, ${MIN_FREE_GB} GB needed for the CUDA torch"
  done
  say "installing $TORCH_REQ into $VENV (about 5.6 GB; limit ${T_INSTALL}s)"
  t=$(date +%s)
  timeout -k 30 "$T_INSTALL" bash -c '
      py=$0 venv=$1; shift
      "$py" -m venv "$venv" && "$venv/bin/python" -m pip install -q --no-cache-dir "$@"' \
    "$PY" "$VENV" "$TORCH_REQ" "${DEPS[@]}" >>"$LOG" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    why=$(grep -E 'ERROR|Error|error' "$LOG" | tail -n 1 | cut -c1-200)
    g=$(free_gb "$VENV")
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why="time limit of ${T_INSTALL}s"
    [ -n "$g" ] && [ "$g" -lt 2 ] && why="disk full ($g GB free): $why"
    [ "$VENV_IS_TEMP" = 1 ] || echo "cuda_build_check: note: $VENV is incomplete; a rerun installs into it again" >&2
    skip "cannot install $TORCH_REQ: ${why:-pip exit $rc}"
  fi
  cuda_torch "$VENV" || skip "$TORCH_REQ installed, but its torch is not a CUDA build"
  say "installed in $(($(date +%s) - t))s, venv $(du -sh "$VENV" 2>/dev/null | cut -f1)"
fi
say "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1), CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

# --- 2. build from a copy of the tree -----------------------------------------------------------
SRC=$WORK/src
mkdir -p "$SRC" "$WORK/site"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # tracked and untracked-but-not-ignored files as they are now (uncommitted edits included)
  (cd "$ROOT" && git ls-files -z -c -o --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
    tar -xf - -C "$SRC" || fail "copying the tree failed" 5
else
  tar -C "$ROOT" --exclude=./build --exclude='*.so' --exclude=./.venv --exclude=./.whl -cf - . |
    tar -xf - -C "$SRC" || fail "copying the tree failed" 5
fi
say "building (ILF_CUDA_BUILD=1; limit ${T_BUILD}s)"
t=$(date +%s)
echo "=== build" >>"$LOG"
# the venv's bin first on PATH: torch's extension builder looks for `ninja` there
(cd "$SRC" && PATH="$VENV/bin:$PATH" ILF_CUDA_BUILD=1 timeout -k 30 "$T_BUILD" "$VENV/bin/python" -m pip install -v --no-build-isolation \
  --no-deps --no-index --no-cache-dir --target "$WORK/site" .) >>"$LOG" 2>&1
rc=$?
{ [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && fail "build ran past its limit of ${T_BUILD}s"
[ "$rc" -eq 0 ] || fail "build exited $rc" 15
n_cu=$(grep -cE '^ *\[[0-9]+/[0-9]+\] .*nvcc .*\.cu( |$)' "$LOG")
arch=$(grep -o 'gencode=arch=compute_[0-9a-z]*,code=sm_[0-9a-z]*' "$LOG" | sort -u | tr '\n' ' ')
say "built in $(($(date +%s) - t))s ($n_cu nvcc commands; ${arch:-no gencode flags found})"

# --- 3. load check ------------------------------------------------------------------------------
echo "=== load" >>"$LOG"
st=$(cd "$WORK" && PYTHONPATH="$WORK/site" timeout -k 10 "$T_LOAD" "$VENV/bin/python" -c '
import sys
import ilf_runtime
st = ilf_runtime.ext_status()
print(st)
ok = st["loaded"] and st["cuda_ops"] and (st["path"] or "").startswith(sys.argv[1])
sys.exit(0 if ok else 1)' "$WORK/site" 2>>"$LOG")
rc=$?
echo "$st" >>"$LOG"
[ "$rc" -eq 0 ] || fail "the extension did not load with its CUDA ops: ${st:-no status printed}" 20
say "ext_status: $st"
echo "cuda_build_check: OK (whole extension built with ILF_CUDA_BUILD=1 and loaded, cuda_ops True, in $(($(date +%s) - T0))s)"
