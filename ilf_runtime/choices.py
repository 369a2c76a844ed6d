"""The names the command line offers before anything heavy is imported (``ilf --help`` stays fast):
solvers and dtypes. `solvers.SOLVERS` and `registry.DTYPES` are keyed by these (a test checks)."""

from __future__ import annotations

__all__ = ["DTYPES", "SOLVER_NAMES"]

SOLVER_NAMES = ("ddim", "dpmpp_2m")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # command-line names of torch dtypes
