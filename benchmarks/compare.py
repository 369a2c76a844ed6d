"""ILF against fewer steps and every caching method, side by side: table, Pareto plot, grid.

    python benchmarks/compare.py [--model fashion-dit] [--weights fb.safetensors ...] [--per-class 200]
    torchrun --nproc-per-node 2 benchmarks/compare.py ...   # quality sampling sharded, timing on rank 0

Same as `ilf bench`; the code lives in `ilf_runtime/bench/` (`--help` lists every flag). Writes
STEM.csv, STEM.json, STEM.md, STEM_pareto.png and STEM_grid.png for `--out STEM`
(default benchmarks/results/compare).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ilf_runtime.bench import main

if __name__ == "__main__":
    sys.exit(main())
