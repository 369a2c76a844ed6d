"""What the command line and the API accept, checkable before anything heavy is imported (``ilf
--help`` stays fast): solver and dtype names, guidance scales. `solvers.SOLVERS` and
`registry.DTYPES` are keyed by these names (a test checks)."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["DTYPES", "SOLVER_NAMES", "guidance_ok"]

SOLVER_NAMES = ("ddim", "dpmpp_2m")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # command-line names of torch dtypes


def guidance_ok(g: Any) -> bool:
    """A guidance scale the samplers take: a finite number >= 0 (values <= 1 mean unguided)."""
    return not isinstance(g, bool) and isinstance(g, numbers.Real) and math.isfinite(g) and g >= 0
