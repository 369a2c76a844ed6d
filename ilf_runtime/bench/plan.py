"""What an `ilf bench` run does: its arguments (`BenchArgs`), its rows (`Row`, `default_rows`) and the
weights files its ILF rows take. Nothing here samples."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ilf_runtime import cache_families, solvers
from ilf_runtime.registry import DTYPES

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHIPPED",
    "DEFAULT_SWEEPS",
    "FAMILIES",
    "SOLVERS",
    "BenchArgs",
    "Row",
    "cache_setting",
    "default_rows",
    "row_grid",
    "row_label",
    "weights_files",
]

# the entries of `registry.SHIPPED_WEIGHTS` a run takes without --weights: the DDIM weights, so that
# the documented table is reproduced (``--weights shipped:dpmpp`` adds the DPM-Solver++ ones)
DEFAULT_SHIPPED = ("default", "aggressive")
# plain, ILF, each cache family of `cache_families.FAMILIES`, ILF with a cache on its unlooped steps
FAMILIES = ("plain", "ilf", *cache_families.FAMILIES, "ilf+cache")
# settings swept per family (`cache_families.FAMILIES[name].spec_syntax`); ilf+cache takes FAMILY:SETTING
# for this project's caches, the ones that can leave the ILF loop's steps alone
DEFAULT_SWEEPS = {name: f.default_sweep for name, f in cache_families.FAMILIES.items()}
DEFAULT_SWEEPS["ilf+cache"] = "fora:2,inner-reuse:1-10:2"
SOLVERS = tuple(solvers.SOLVERS)
FUSED = "fused"  # the setting text that marks a row run with the fused block forward


@dataclass
class BenchArgs:
    """One comparison run.

    Args:
        model: built-in model name or local DiT / PixArt directory.
        weights: ILF weights files, one row each, or ``shipped`` / ``shipped:NAME`` for a built-in
            model's own (default: its shipped DDIM files that exist).
        methods: comma-separated families to run.
        solvers: comma-separated solvers of the plain rows (ddim, dpmpp_2m); the first is the main one
            (cache rows), unless ILF weights record another.
        plain_steps: step counts of the plain rows (``ref_steps`` is always added).
        ref_steps: steps of the plain reference row: paired PSNR and speed-up are against it.
        cache_steps: steps of the cache rows.
        sweep: per-family overrides of the default settings, ``FAMILY=V1,V2``.
        plain_grid: extra plain rows of the main solver (the first ILF file's, else the first of
            ``solvers``) on non-uniform grids, each the teacher step every step starts at on the
            ``ref_steps``-step grid (``0,3,6,9,13,16,19``; what ``ilf tune --grid-search`` finds), so
            that a training-free searched grid is a row.
        per_class: images per class (DiT) or per prompt (PixArt) for the quality columns.
        prompt: PixArt prompts (through the pipeline's text encoder).
        prompt_embeds: PixArt prompt embeddings file (safetensors: prompt_embeds [, masks, negative_*]).
        prompts_file: a text file of prompts, one per line (after any ``prompt``); for the text-to-image
            demo, prompts its metric reads add class, colour and full-prompt accuracy columns.
        guidance: classifier-free guidance scale (default: the model's).
        seed: seed of image 0; image i uses seed + i.
        subsets: disjoint subsets for the FID spread.
        batch_size: images per batch for the quality columns.
        time_batch: images per timed run.
        repeats: timed passes after the warm-up pass.
        time_threads: torch threads for the timing phase (0: OMP_NUM_THREADS if set, else the physical cores).
        device: torch device (cpu, cuda, cuda:1, ...).
        dtype: model dtype.
        fused: run the fused block forward (`ilf_runtime.fused.apply_fused_blocks`) on the loaded model;
            plain and ILF rows only (FORA and TaylorSeer hook the attention modules it bypasses).
        fused_rows: time every plain and ILF row twice, eager and fused, interleaved in the same
            passes (the fused row's setting says "fused").
        out: output path stem: STEM.csv, STEM.json, STEM.md, STEM_pareto.png, STEM_grid.png.
        grid_per_class: images per class in the side-by-side grid (0: no grid).
        grid_only: only the side-by-side grid and its timings (the main job), no table.
        report_only: rebuild STEM.md, STEM.csv, STEM.json and STEM_pareto.png of a finished run from
            STEM.json and STEM_per_image.safetensors, sampling nothing.
        progress: progress bars with an ETA (on a terminal) and a log line per row.
    """

    model: str = "fashion-dit"
    weights: list[str] = field(default_factory=list)
    methods: str = ",".join(FAMILIES)
    solvers: str = ",".join(SOLVERS)
    plain_steps: str = "8,9,10,11,12,13,14,15,16,20"
    ref_steps: int = 20
    cache_steps: int = 20
    sweep: list[str] = field(default_factory=list)
    plain_grid: list[str] = field(default_factory=list)
    per_class: int = 200
    prompt: list[str] = field(default_factory=list)
    prompt_embeds: str | None = None
    prompts_file: str | None = None
    guidance: float | None = None
    seed: int = 0
    subsets: int = 5
    batch_size: int = 250
    time_batch: int = 100
    repeats: int = 3
    time_threads: int = 0
    device: str = "cpu"
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})
    fused: bool = False
    fused_rows: bool = False
    out: str = "benchmarks/results/compare"
    grid_per_class: int = 4
    grid_only: bool = False
    report_only: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.method_list) - set(FAMILIES))
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(FAMILIES)}")
        bad = sorted(set(self.solver_list) - set(SOLVERS))
        if bad or not self.solver_list:
            raise ValueError(f"solvers {self.solvers!r}: expected comma-separated {', '.join(SOLVERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        for v, name in ((self.per_class, "per_class"), (self.batch_size, "batch_size")):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.time_batch < 1 or self.repeats < 1 or self.subsets < 1 or self.ref_steps < 1:
            raise ValueError("time_batch, repeats, subsets and ref_steps must be >= 1")
        if self.fused and self.fused_rows:
            raise ValueError("fused (every row fused) and fused_rows (eager and fused twins) are exclusive")
        try:
            self.plain_grid = [
                ",".join(map(str, solvers.check_grid(g.split(","), self.ref_steps))) for g in self.plain_grid
            ]
        except ValueError as e:
            raise ValueError(f"plain_grid: {e}") from None

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    @property
    def solver_list(self) -> list[str]:
        return [s.strip() for s in self.solvers.split(",") if s.strip()]

    def sweeps(self) -> dict[str, list[str]]:
        """Settings per family: the defaults with ``sweep``'s overrides."""
        out = dict(DEFAULT_SWEEPS)
        for s in self.sweep:
            fam, sep, vals = s.partition("=")
            if not sep or fam not in DEFAULT_SWEEPS:
                raise ValueError(
                    f"--sweep {s!r}: expected FAMILY=V1,V2 with FAMILY in {sorted(DEFAULT_SWEEPS)}"
                )
            out[fam] = vals
        return {k: [p for p in v.split(",") if p] for k, v in out.items()}


def row_label(method: str, setting: str, solver: str | None, steps: int) -> str:
    """A row's name in logs and in the summary, e.g. ``fora N=2 ddim 20 steps``."""
    return " ".join(str(x) for x in (method, setting, solver, f"{steps} steps") if x)


@dataclass
class Row:
    """One method at one setting.

    Args:
        method: ``plain``, ``ilf``, a cache family, or ``ilf+FAMILY``.
        setting: the table's setting text.
        solver: solver name (None: the model's scheduler).
        steps: sampler steps.
        weights: ILF weights file.
        loop_steps: the ILF loop's steps (None: the weights' own).
        cache: (family, setting string), built by `cache_families.cache_config` when run.
        fused: run with the fused block forward (`ilf_runtime.fused`), applied for this row only.
        grid: a non-uniform grid (comma-separated teacher step indices, one per step) on the
            ``grid_steps``-step grid; None: the scheduler's spacing.
        grid_steps: the steps of the grid ``grid`` indexes.
    """

    method: str
    setting: str
    solver: str | None
    steps: int
    weights: str | None = None
    loop_steps: str | None = None
    cache: tuple[str, str] | None = None
    fused: bool = False
    grid: str | None = None
    grid_steps: int = 20

    @property
    def grid_starts(self) -> list[int] | None:
        return None if self.grid is None else [int(v) for v in self.grid.split(",")]

    @property
    def label(self) -> str:
        return row_label(self.method, self.setting, self.solver, self.steps)

    @property
    def is_ref(self) -> bool:
        """A plain row of the eager model: the reference of its solver at ``ref_steps``."""
        plain = self.method == "plain" and self.weights is None and self.cache is None
        return plain and not self.fused and self.grid is None

    def spec(self) -> dict[str, Any]:
        """The fields as the JSON's ``row_specs`` keep them (``fused`` only where set, so that the
        record of a run without fused rows reads as before it existed); ``Row(**spec)`` rebuilds it."""
        d = asdict(self)
        if not self.fused:
            del d["fused"]
        if self.grid is None:
            del d["grid"], d["grid_steps"]
        return d


def row_grid(sampler: dict[str, Any]) -> dict[str, Any]:
    """`Row` fields for a weights file's non-uniform grid ({} for the scheduler's spacing)."""
    if not sampler.get("grid"):
        return {}
    from ilf_runtime.weights import sampler_grid

    return {"grid": sampler["grid"], "grid_steps": sampler_grid(sampler)["grid_steps"]}


def cache_setting(family: str, spec: str) -> str:
    """The table's setting text of a cache family's setting string; checks it before anything runs.
    A MagCache row runs with calibrated ratios: a stand-in ratio gives the same text."""
    return cache_families.describe(
        cache_families.cache_config(family, spec, dtype=torch.float32, mag_ratios=[1.0])
    )[1]


def weights_files(a: BenchArgs) -> tuple[list[str], list[str]]:
    """(weights files to run, notes on shipped files that are absent)."""
    from ilf_runtime.registry import MODEL_NAMES, SHIPPED_WEIGHTS, resolve_weights

    if a.weights:
        return [resolve_weights(w, a.model) for w in a.weights], []
    where = MODEL_NAMES.get(a.model, (None,))[0]
    if not isinstance(where, Path):
        return [], []
    paths = [
        where / SHIPPED_WEIGHTS[a.model][k] for k in DEFAULT_SHIPPED if k in SHIPPED_WEIGHTS.get(a.model, {})
    ]
    missing = [f"no ILF row for {p}: the file is absent" for p in paths if not p.is_file()]
    for note in missing:
        logger.warning("%s (pass --weights)", note)
    return [str(p) for p in paths if p.is_file()], missing


def default_rows(a: BenchArgs, weights: Sequence[str]) -> list[Row]:
    """The rows of a run: plain per solver and step count (and on each ILF file's grid and each
    ``plain_grid``), ILF per weights file, each cache setting,
    ILF with a cache. The main solver's reference row (plain at ``ref_steps``) comes first, the other
    solvers' next. With ``fused_rows``, each plain and ILF row is followed by its fused twin."""
    from ilf_runtime.weights import read_metadata

    fams, sweeps = a.method_list, a.sweeps()
    if a.fused and set(fams) - {"plain", "ilf"}:
        raise ValueError(
            "fused runs plain and ILF rows only (FORA and TaylorSeer hook attention modules that the fused "
            f"forward bypasses): pass --methods plain,ilf, not {a.methods!r}"
        )
    solvers = a.solver_list
    ilf_rows = []
    for w in weights if "ilf" in fams or "ilf+cache" in fams else []:
        s = read_metadata(w).get("sampler") or {}
        steps, solver, ls = int(s.get("num_steps", 10)), s.get("solver", solvers[0]), s.get("loop_steps")
        setting = f"{Path(w).stem} loop {ls or 'default'}" + (f" grid {s['grid']}" if s.get("grid") else "")
        ilf_rows.append(Row("ilf", setting, solver, steps, w, ls, **row_grid(s)))
    main_solver = ilf_rows[0].solver if ilf_rows else solvers[0]
    # the main solver's reference row comes first: the report's plot and tables take it as the main one
    solvers = [main_solver] + [s for s in solvers if s != main_solver]
    steps = sorted({int(s) for s in a.plain_steps.split(",") if s} - {a.ref_steps}, reverse=True)
    rows = [Row("plain", "", s, a.ref_steps) for s in solvers]
    if "plain" in fams:
        rows += [Row("plain", "", s, n) for s in solvers for n in steps]
    if "plain" in fams:  # plain sampling on each non-uniform grid an ILF file uses: its share of the gain
        grids = {(r.solver, r.steps, r.grid, r.grid_steps) for r in ilf_rows if r.grid}
        grids |= {(main_solver, len(g.split(",")), g, a.ref_steps) for g in a.plain_grid}
        rows += [Row("plain", f"grid {g}", s, n, grid=g, grid_steps=gs) for s, n, g, gs in sorted(grids)]
    if "ilf" in fams:
        rows += ilf_rows
    for fam in cache_families.FAMILIES:
        if fam in fams:
            for v in sweeps[fam]:
                rows.append(Row(fam, cache_setting(fam, v), main_solver, a.cache_steps, cache=(fam, v)))
    if "ilf+cache" in fams and ilf_rows:
        base = ilf_rows[0]
        for v in sweeps["ilf+cache"]:
            fam, _, spec = v.partition(":")
            setting = f"{cache_setting(fam, spec)}; {base.setting}"
            rows.append(replace(base, method=f"ilf+{fam}", setting=setting, cache=(fam, spec)))
    if a.fused_rows:
        rows = [x for r in rows for x in (r, *_fused_twin(r))]
    return rows


def _fused_twin(row: Row) -> list[Row]:
    if row.method not in ("plain", "ilf"):
        return []
    return [replace(row, setting="; ".join(s for s in (row.setting, FUSED) if s), fused=True)]
