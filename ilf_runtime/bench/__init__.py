"""`ilf bench` / benchmarks/compare.py: ILF against fewer steps and caching methods, in one run.

On one model, one sampler, one set of seeds and labels (or prompts), every row (a method at one
setting) is run twice:

1. Quality: all rows sample the same N images; per row the block evaluations actually run
   (`caches.BlockEvalCounter`), paired PSNR against the plain ``ref_steps`` row of the same solver
   with its standard error, and for 10-class 1-channel DiTs (the bundled model) FID with its spread
   over disjoint subsets and its floor, and class accuracy (`ilf_runtime.fashion`). Under torchrun
   the batches are split over the processes (gloo on CPU) and gathered on rank 0; batches are cut
   before sharding, so every image comes from the same batch as in a single process.
2. Timing, on rank 0 only (after the other ranks are done): a warm-up pass over all rows (which
   also records peak memory), then ``repeats`` passes in which every row samples the same timing
   batch once, rows interleaved and the order rotated each pass, so that machine drift does not
   favour a row. Wall time per image is the median over the passes.

Modules: `plan` (arguments, rows), `run` (sampling, timing), `report` (tables, summary, files),
`plots` (Pareto plot, side-by-side grid). This one is the command.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilf_runtime import caches, cliargs
from ilf_runtime.bench import report
from ilf_runtime.bench.machine import timing_threads
from ilf_runtime.bench.plan import (
    DEFAULT_SHIPPED,
    DEFAULT_SWEEPS,
    FAMILIES,
    BenchArgs,
    Row,
    default_rows,
    weights_files,
)
from ilf_runtime.bench.run import load_bench_model, prompt_list, run_bench, side_by_side

__all__ = [
    "DEFAULT_SHIPPED",
    "DEFAULT_SWEEPS",
    "FAMILIES",
    "BenchArgs",
    "Row",
    "add_arguments",
    "default_rows",
    "main",
    "main_from_args",
    "run_bench",
    "side_by_side",
    "weights_files",
]


def _sweep_help() -> str:
    syntax = "; ".join(f"{name} {f.spec_syntax}" for name, f in caches.FAMILIES.items())
    defaults = "; ".join(f"{k}={v}" for k, v in DEFAULT_SWEEPS.items())
    return (
        f"{cliargs.field_help(BenchArgs)['sweep']} (repeatable; settings: {syntax}; ilf+cache "
        f"FAMILY:SETTING; defaults: {defaults})"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `BenchArgs` field (``--per-class`` for ``per_class``)."""
    cliargs.add_dataclass_arguments(p, BenchArgs, exclude=("sweep",))
    p.add_argument(cliargs.flag_name("sweep"), action="append", default=None, help=_sweep_help())


def main_from_args(args: argparse.Namespace) -> int:
    """Runs `ilf bench` from parsed flags (`add_arguments`)."""
    a = cliargs.from_namespace(BenchArgs, args)
    if a.progress:
        logging.getLogger(__name__).setLevel(logging.INFO)
    if a.report_only:
        result = report.load_result(a.out)
        _print_report(result, report.write_all(result, a.out))
        return 0
    if a.grid_only:
        files, _ = weights_files(a)
        if not files:
            raise ValueError("the grid needs ILF weights: pass --weights (no shipped weights found)")
        _grid(a, files[0], a.grid_per_class or 4)
        return 0
    result = run_bench(a)
    if result is None:
        return 0
    paths = report.write_all(result, a.out)
    files = [r.weights for r in result["rows"] if r.method == "ilf"]
    if a.grid_per_class and files:
        paths.append(_grid(a, files[0], a.grid_per_class))
    _print_report(result, paths)
    return 0


def _grid(a: BenchArgs, weights: str, per_class: int) -> Path:
    import torch

    model = load_bench_model(a)
    threads, _ = timing_threads(a.time_threads)
    torch.set_num_threads(threads)
    r = side_by_side(
        model,
        weights,
        f"{a.out}_grid.png",
        prompts=prompt_list(a) or model.example_prompts,  # ignored by class-conditional models
        per_class=per_class,
        seed=a.seed,
        ref_steps=a.ref_steps,
        repeats=a.repeats,
        progress=a.progress,
    )
    report.print_side_by_side(r)
    return Path(r["out"])


def _print_report(result: dict[str, Any], paths: Sequence[Path]) -> None:
    print(report.markdown_table(result))
    for line in result["summary"]:
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    """benchmarks/compare.py: `ilf bench` as a script."""
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    return main_from_args(args)
