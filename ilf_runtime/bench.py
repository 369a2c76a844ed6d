"""`ilf bench` / benchmarks/compare.py: ILF against fewer steps and caching methods, in one run.

On one model, one sampler, one set of seeds and labels (or prompts), every row (a method at one
setting) is run twice:

1. Quality: all rows sample the same N images; per row the block evaluations actually run
   (`caches.BlockEvalCounter`), paired PSNR against the plain ``ref_steps`` row of the same solver
   with its standard error, and for 10-class 1-channel DiTs (the bundled model) FID with its spread
   over disjoint subsets and its floor, and class accuracy (`ilf_runtime.metrics`). Under torchrun
   the batches are split over the processes (gloo on CPU) and gathered on rank 0; batches are cut
   before sharding, so every image comes from the same batch as in a single process.
2. Timing, on rank 0 only (after the other ranks are done): a warm-up pass over all rows (which
   also records peak memory), then ``repeats`` passes in which every row samples the same timing
   batch once, rows interleaved and the order rotated each pass, so that machine drift does not
   favour a row. Wall time per image is the median over the passes.

Rows, results, the summary and the plot are written by `ilf_runtime._bench_report`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ilf_runtime._bench_run import Row, Runner, cache_config, time_rows
from ilf_runtime.models import ADAPTERS

logger = logging.getLogger(__name__)

__all__ = ["BenchArgs", "Row", "add_arguments", "default_rows", "main", "run_bench", "side_by_side"]

# the entries of `pipelines.SHIPPED_WEIGHTS` a run takes without --weights: the DDIM weights, so that
# the documented table is reproduced (``--weights shipped:dpmpp`` adds the DPM-Solver++ ones)
DEFAULT_SHIPPED = ("default", "aggressive")
FAMILIES = (
    "plain",
    "ilf",
    "fora",
    "delta-dit",
    "inner-reuse",
    "first-block-cache",
    "taylorseer",
    "magcache",
    "ilf+cache",
)
# settings swept per family (see `cache_config` for the syntax of each)
DEFAULT_SWEEPS = {
    "fora": "2,3",
    "delta-dit": "6:0.5:2,8:0.5:2,8:0.5:3",
    "inner-reuse": "1-10:2,2-9:2,3-8:2",
    "first-block-cache": "0.05,0.1,0.2",
    "taylorseer": "2,3,4",
    "magcache": "0.03,0.06,0.12,0.24",
    "ilf+cache": "fora:2,inner-reuse:1-10:2",
}


@dataclass
class BenchArgs:
    """One comparison run.

    Args:
        model: built-in model name or local DiT / PixArt directory.
        weights: ILF weights files, one row each, or ``shipped`` / ``shipped:NAME`` for a built-in
            model's own (default: its shipped DDIM files that exist).
        methods: comma-separated families to run: plain, ilf, fora, delta-dit, inner-reuse,
            first-block-cache, taylorseer, magcache, ilf+cache (default: all).
        solvers: solvers of the plain rows; the first is the main one (cache rows), unless ILF
            weights record another.
        plain_steps: step counts of the plain rows (``ref_steps`` is always added).
        ref_steps: steps of the plain reference row: paired PSNR and speed-up are against it.
        cache_steps: steps of the cache rows.
        sweep: per-family overrides of `DEFAULT_SWEEPS`, ``FAMILY=V1,V2``.
        per_class: images per class (DiT) or per prompt (PixArt) for the quality columns.
        prompt: PixArt prompts (through the pipeline's text encoder).
        prompt_embeds: PixArt prompt embeddings file (safetensors: prompt_embeds [, masks, negative_*]).
        guidance: classifier-free guidance scale (default: the model's).
        seed: seed of image 0; image i uses seed + i.
        subsets: disjoint subsets for the FID spread.
        batch_size: images per batch for the quality columns.
        time_batch: images per timed run.
        repeats: timed passes after the warm-up pass.
        time_threads: torch threads for the timing phase (0: leave as is).
        device: torch device.
        dtype: fp32, bf16 or fp16.
        out: output path stem: STEM.csv, STEM.json, STEM.md, STEM_pareto.png, STEM_grid.png.
        grid_per_class: images per class in the side-by-side grid (0: no grid).
        grid_only: only the side-by-side grid and its timings (the main job), no table.
        report_only: rebuild STEM.md, STEM.csv, STEM.json and STEM_pareto.png of a finished run from
            STEM.json and STEM_per_image.safetensors, sampling nothing.
        progress: log each row as it finishes.
    """

    model: str = "fashion-dit"
    weights: list[str] = field(default_factory=list)
    methods: str = ",".join(FAMILIES)
    solvers: str = "ddim,dpmpp_2m"
    plain_steps: str = "8,9,10,11,12,13,14,15,16,20"
    ref_steps: int = 20
    cache_steps: int = 20
    sweep: list[str] = field(default_factory=list)
    per_class: int = 200
    prompt: list[str] = field(default_factory=list)
    prompt_embeds: str | None = None
    guidance: float | None = None
    seed: int = 0
    subsets: int = 5
    batch_size: int = 250
    time_batch: int = 100
    repeats: int = 3
    time_threads: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    out: str = "benchmarks/results/compare"
    grid_per_class: int = 4
    grid_only: bool = False
    report_only: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.method_list) - set(FAMILIES))
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(FAMILIES)}")
        for v, name in ((self.per_class, "per_class"), (self.batch_size, "batch_size")):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.time_batch < 1 or self.repeats < 1 or self.subsets < 1 or self.ref_steps < 1:
            raise ValueError("time_batch, repeats, subsets and ref_steps must be >= 1")

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def sweeps(self) -> dict[str, list[str]]:
        out = dict(DEFAULT_SWEEPS)
        for s in self.sweep:
            fam, sep, vals = s.partition("=")
            if not sep or fam not in DEFAULT_SWEEPS:
                raise ValueError(
                    f"--sweep {s!r}: expected FAMILY=V1,V2 with FAMILY in {sorted(DEFAULT_SWEEPS)}"
                )
            out[fam] = vals
        return {k: [p for p in v.split(",") if p] for k, v in out.items()}


def _setting(family: str, spec: str) -> str:
    """The table's setting text; also checks the spec before anything runs."""
    from ilf_runtime import caches

    if family == "magcache":
        return f"thr={float(spec):g}"
    return caches.describe(cache_config(family, spec, dtype=torch.float32))[1]


def _weights_files(a: BenchArgs) -> tuple[list[str], list[str]]:
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
    """The rows of a run: plain per solver and step count, ILF per weights file, each cache setting,
    ILF with a cache. Reference rows (plain at ``ref_steps``) come first."""
    from ilf_runtime.weights import read_metadata

    fams, sweeps = a.method_list, a.sweeps()
    solvers = [s for s in a.solvers.split(",") if s]
    ilf_rows = []
    for w in weights if "ilf" in fams or "ilf+cache" in fams else []:
        s = read_metadata(w).get("sampler") or {}
        steps, solver, ls = int(s.get("num_steps", 10)), s.get("solver", solvers[0]), s.get("loop_steps")
        ilf_rows.append(Row("ilf", f"{Path(w).stem} loop {ls or 'default'}", solver, steps, w, ls))
    main_solver = ilf_rows[0].solver if ilf_rows else solvers[0]
    # the main solver's reference row comes first: the report's plot and tables take it as the main one
    solvers = [main_solver] + [s for s in solvers if s != main_solver]
    steps = sorted({int(s) for s in a.plain_steps.split(",") if s} - {a.ref_steps}, reverse=True)
    rows = [Row("plain", "", s, a.ref_steps) for s in solvers]
    if "plain" in fams:
        rows += [Row("plain", "", s, n) for s in solvers for n in steps]
    if "ilf" in fams:
        rows += ilf_rows
    for fam in FAMILIES[2:-1]:
        if fam in fams:
            rows += [
                Row(fam, _setting(fam, v), main_solver, a.cache_steps, cache=(fam, v)) for v in sweeps[fam]
            ]
    if "ilf+cache" in fams and ilf_rows:
        base = ilf_rows[0]
        for v in sweeps["ilf+cache"]:
            fam, _, spec = v.partition(":")
            rows.append(
                Row(
                    f"ilf+{fam}",
                    f"{_setting(fam, spec)}; {base.setting}",
                    base.solver,
                    base.steps,
                    base.weights,
                    base.loop_steps,
                    (fam, spec),
                )
            )
    return rows


# -- conditioning, quality ---------------------------------------------------------------------------


def conditioning(model: Any, a: BenchArgs, per: int) -> dict[str, torch.Tensor]:
    """Per-image conditioning, `per` images per condition (class or prompt), conditions interleaved
    so that every disjoint FID subset holds every class."""
    guided = (a.guidance if a.guidance is not None else model.guidance) > 1
    items = model.adapter.condition_set(model, prompts=a.prompt, prompt_embeds=a.prompt_embeds, guided=guided)
    return {k: v.cpu().repeat(per, *([1] * (v.ndim - 1))) for k, v in items.items()}


def _fashion_metrics_available(model: Any) -> str | None:
    """None when FID / class accuracy can be measured, else the reason why not."""
    from ilf_runtime.fashion import unsupported_reason

    reason = unsupported_reason(model)
    if reason:
        return f"FID and class accuracy use the Fashion-MNIST classifier: {reason}"
    try:
        from ilf_runtime.fashion.classifier import load_fashion_classifier
        from ilf_runtime.fashion.data import load_fashion_mnist

        load_fashion_classifier()
        load_fashion_mnist("test")
    except FileNotFoundError as e:
        return str(e)
    return None


def _quality(images: torch.Tensor, labels: torch.Tensor | None, a: BenchArgs, fid_ok: bool) -> dict[str, Any]:
    from ilf_runtime.fashion.classifier import class_accuracy, load_fashion_classifier
    from ilf_runtime.fashion.evaluate import reference_sets
    from ilf_runtime.metrics import extract, fid_with_spread

    if not fid_ok:
        return {}
    clf = load_fashion_classifier()
    sets = reference_sets(len(images), a.subsets, a.seed)
    f = fid_with_spread(extract(clf.features, images), sets["ref"], a.subsets)
    return {
        "fid": f["fid"],
        "fid_subset_mean": f["subset_mean"],
        "fid_subset_std": f["subset_std"],
        "fid_floor": sets["floor"]["fid"],
        "class_accuracy": class_accuracy(clf, images, labels),
    }


def run_bench(a: BenchArgs) -> dict[str, Any] | None:
    """Runs the comparison; on rank 0 returns ``{"context", "rows", "results"}`` (None elsewhere)."""
    from ilf_runtime import _bench_report as report
    from ilf_runtime.distributed import all_gather_cat, barrier, init_distributed, shard
    from ilf_runtime.metrics import paired_psnr
    from ilf_runtime.registry import load_model

    started = report.provenance()
    info = init_distributed(a.device)
    model = load_model(a.model, device=info.device, dtype=getattr(torch, report.DTYPES[a.dtype]))
    files, missing = _weights_files(a)
    rows = default_rows(a, files)
    items = conditioning(model, a, a.per_class)
    n = len(next(iter(items.values())))
    runner = Runner(model, items, list(range(a.seed, a.seed + n)), a.guidance)
    no_fid = _fashion_metrics_available(model)
    batches = [range(lo, min(lo + a.batch_size, n)) for lo in range(0, n, a.batch_size)]
    mine = [batches[i] for i in shard(len(batches), info)]
    if info.is_main:
        logger.info("%d rows, %d images each, %d processes", len(rows), n, info.world_size)

    refs: dict[str, torch.Tensor] = {}
    results: list[dict[str, Any]] = []
    for row in rows:
        t0 = time.perf_counter()
        imgs, evals = runner.quality_images(row, mine)
        imgs = all_gather_cat(imgs.to(info.device), info).cpu()
        evals = float(
            all_gather_cat(torch.tensor([evals], dtype=torch.float64, device=info.device), info).sum()
        )
        if not info.is_main:
            continue
        res: dict[str, Any] = {"block_evals_per_image": round(evals / n, 3), "n": n}
        res |= _quality(imgs, items.get("class_labels"), a, no_fid is None)
        if row.is_ref and row.steps == a.ref_steps and row.solver not in refs:
            refs[row.solver] = imgs
        ref_solver = row.solver if row.solver in refs else next(iter(refs))
        p = paired_psnr(imgs, refs[ref_solver])
        res |= {"psnr": p["psnr"], "psnr_se": p["psnr_se"], "ref": f"plain {ref_solver} {a.ref_steps}"}
        res["per_image_psnr"] = p["per_image_psnr"]
        results.append(res)
        if a.progress:
            logger.info(
                "[%d/%d] %s: quality in %.1f s", len(results), len(rows), row.label, time.perf_counter() - t0
            )
    barrier(info)
    if not info.is_main:
        return None
    if a.time_threads:
        torch.set_num_threads(a.time_threads)
    tidx = list(range(min(a.time_batch, n)))
    for res, t in zip(results, time_rows(runner, rows, tidx, a.repeats)):
        res |= t
    return {
        "context": report.context(model, a, info, n, len(tidx), no_fid, started) | {"notes": missing},
        "rows": rows,
        "results": results,
    }


# -- the main job's grid -----------------------------------------------------------------------------


def side_by_side(
    model: Any,
    weights: str,
    out: str | Path,
    *,
    classes: Sequence[int] | None = None,
    per_class: int = 4,
    seed: int = 0,
    ref_steps: int = 20,
    equal_steps: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """A grid of three panels from the same noise and labels: plain ``ref_steps`` | ILF (the
    weights' own sampler) | plain at ILF's cost in block evaluations (or ``equal_steps``).

    Each panel's time is that of sampling the whole grid after a small warm-up run; with
    ``repeats`` > 1, the median of that run and ``repeats - 1`` more passes over the three panels,
    interleaved. Returns the panels' steps, seconds, block evaluations and speed-up over the first."""
    from ilf_runtime import _bench_report as report
    from ilf_runtime import caches
    from ilf_runtime.registry import to_model
    from ilf_runtime.weights import load_ilf_weights

    m = to_model(model)
    if not m.adapter.class_conditional:
        raise ValueError(f"side_by_side takes a class-conditional model, not a {m.adapter.transformer_class}")
    w = load_ilf_weights(weights)
    s = w.sampler
    steps, solver, ls = int(s.get("num_steps", 10)), s.get("solver"), s.get("loop_steps")
    num_layers = len(m.transformer.transformer_blocks)
    if equal_steps is None:
        equal_steps = max(1, round(w.config.block_evals(num_layers, steps, ls) / num_layers))
    k = m.adapter.num_classes(m.transformer)
    classes = list(range(min(k, 10))) if classes is None else list(classes)
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    runner = Runner(m, {"class_labels": labels}, list(range(seed, seed + len(labels))), m.guidance)
    runner._weights[str(weights)] = w
    panels = [
        (f"plain {ref_steps} steps", Row("plain", "", solver or "ddim", ref_steps)),
        (f"ILF {steps} steps", Row("ilf", "", solver or "ddim", steps, str(weights), ls)),
        (f"plain {equal_steps} steps (equal cost)", Row("plain", "", solver or "ddim", equal_steps)),
    ]
    if solver is None:  # the weights record no solver: use the model's scheduler for all three
        for _, r in panels:
            r.solver = None
    idx = range(len(labels))
    shown = []
    for title, row in panels:
        with runner.attached(row) as cb:
            runner.sample(row, idx[: min(len(idx), 8)], cb)  # warm-up
            with caches.BlockEvalCounter(m.transformer) as ctr:
                o = runner.sample(row, idx, cb)
        shown.append({"title": title, "steps": row.steps, "images": o.images, "times": [o.seconds]})
        shown[-1]["block_evals_per_image"] = ctr.count
    for _ in range(repeats - 1):
        for p, (_, row) in zip(shown, panels):
            p["times"].append(runner.time_once(row, idx))
    for p in shown:
        p["seconds"] = statistics.median(p.pop("times"))
        p["speedup"] = shown[0]["seconds"] / p["seconds"]
    report.save_side_by_side(shown, out, per_class)
    return {"out": str(out), "panels": [{k: v for k, v in p.items() if k != "images"} for p in shown]}


# -- command line ------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `BenchArgs` field (``--per-class`` for ``per_class``)."""
    from typing import get_type_hints

    hints = get_type_hints(BenchArgs)
    helps, name = {}, None
    for ln in (BenchArgs.__doc__ or "").split("Args:")[1].splitlines():
        head, sep, rest = ln.strip().partition(":")
        if sep and ln.startswith(" " * 8) and not ln.startswith(" " * 9) and head.isidentifier():
            name, helps[head] = head, rest.strip()
        elif name and ln.strip():
            helps[name] += " " + ln.strip()
    for f in fields(BenchArgs):
        flag = "--" + f.name.replace("_", "-")
        help_ = helps.get(f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        t = hints[f.name]
        if t is bool:
            if f.name == "progress":
                p.add_argument("--no-progress", dest="progress", action="store_false", help="quiet")
            else:
                p.add_argument(flag, action="store_true", help=help_)
        elif f.name == "sweep":
            dflt = "; ".join(f"{k}={v}" for k, v in DEFAULT_SWEEPS.items())
            p.add_argument(flag, action="append", default=[], help=f"{help_} (repeatable; defaults: {dflt})")
        elif f.name in ("weights", "prompt"):
            p.add_argument(flag, action="append", default=[], help=f"{help_} (repeatable)")
        else:
            conv = {int: int, float: float}.get(t) or (float if "float" in str(t) else str)
            p.add_argument(flag, type=conv, default=default, help=help_)


def main_from_args(args: argparse.Namespace) -> int:
    from ilf_runtime import _bench_report as report

    a = BenchArgs(**{f.name: getattr(args, f.name) for f in fields(BenchArgs)})
    if a.progress:
        logger.setLevel(logging.INFO)
    if a.report_only:
        result = report.load_result(a.out)
        _print_report(result, report.write_all(result, a.out))
        return 0
    if a.grid_only:
        from ilf_runtime.registry import load_model

        model = load_model(a.model, device=a.device, dtype=getattr(torch, report.DTYPES[a.dtype]))
        files, _ = _weights_files(a)
        if not files:
            raise ValueError("the grid needs ILF weights: pass --weights (no shipped weights found)")
        r = side_by_side(
            model,
            files[0],
            f"{a.out}_grid.png",
            per_class=a.grid_per_class or 4,
            seed=a.seed,
            ref_steps=a.ref_steps,
            repeats=a.repeats,
        )
        report.print_side_by_side(r)
        return 0
    result = run_bench(a)
    if result is None:
        return 0
    paths = report.write_all(result, a.out)
    files = [r.weights for r in result["rows"] if r.method == "ilf"]
    if a.grid_per_class and files and ADAPTERS[result["context"]["model_kind"]].class_conditional:
        from ilf_runtime.registry import load_model

        model = load_model(a.model, device=a.device, dtype=getattr(torch, report.DTYPES[a.dtype]))
        r = side_by_side(
            model,
            files[0],
            f"{a.out}_grid.png",
            per_class=a.grid_per_class,
            seed=a.seed,
            ref_steps=a.ref_steps,
            repeats=a.repeats,
        )
        report.print_side_by_side(r)
        paths.append(Path(r["out"]))
    _print_report(result, paths)
    return 0


def _print_report(result: dict[str, Any], paths: Sequence[Path]) -> None:
    from ilf_runtime import _bench_report as report

    print(report.markdown_table(result))
    for line in result["summary"]:
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    return main_from_args(args)
