#!/usr/bin/env bash
# Collects the pure-Python wheels that benchmarks/gpu_check.sh installs on the GPU machine, which has
# no network and no diffusers. Its image has torch, numpy, safetensors, huggingface-hub, regex,
# requests, filelock, Pillow, pytest and transformers already; diffusers 0.42.1 also needs
# importlib_metadata. Run here (a machine with the package registry), then carry the folder:
#
#   bash benchmarks/fetch_wheels.sh            # -> .whl/ (ignored by git; the device tool's carry=[".whl"])
#   bash benchmarks/fetch_wheels.sh DIR        # elsewhere; then ILF_WHEELS=DIR for gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# Pure-Python wheels; the tags below only make pip accept them for the GPU machine's Python 3.12.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  diffusers==0.42.1 importlib_metadata==10.2.0
ls -l "$DIR"
