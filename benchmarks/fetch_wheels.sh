#!/usr/bin/env bash
# Collects the pure-Python wheels that benchmarks/gpu_check.sh installs on the GPU machine, which has
# no network and no diffusers. Its image has torch, numpy, safetensors, huggingface-hub, regex,
# requests, filelock, Pillow, pytest and transformers already. diffusers declares importlib_metadata
# but imports it only on Python < 3.8; it is NOT carried: importlib_metadata 10.x installed without
# its own dependencies (zipp, lazy-importer) fails to import and, first on PYTHONPATH, would shadow a
# working copy. diffusers 0.42.1 needs huggingface-hub >= 1.32: if the image's is older, gpu_check.sh
# says diffusers does not import; carry that wheel too. Run here (a machine with the package
# registry), then carry the folder:
#
#   bash benchmarks/fetch_wheels.sh            # -> .whl/ in the repo root (ignored by git; the device tool's carry=[".whl"])
#   bash benchmarks/fetch_wheels.sh DIR        # elsewhere (relative to the current directory); then ILF_WHEELS=DIR
set -euo pipefail
DIR=${1:-$(cd "$(dirname "$0")/.." && pwd)/.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
rm -f "$DIR"/importlib_metadata-*.whl  # carried by earlier versions of this script (see above)
# Pure-Python wheels; the tags below only make pip accept them for the GPU machine's Python 3.12.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  diffusers==0.42.1
ls -l "$DIR"
