"""Running the rows of an `ilf bench` run: `Runner` attaches a row's ILF weights, cache and fused
forward, samples and counts block evaluations; `run_bench` measures every row's quality (sharded under
torchrun) and then times the rows (`time_rows`); `side_by_side` makes the main job's grid."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import torch

from ilf_runtime import caches
from ilf_runtime.bench import report
from ilf_runtime.bench.machine import CpuWatch, progress_bar, timing_threads
from ilf_runtime.bench.plan import BenchArgs, Row, default_rows, row_grid, weights_files
from ilf_runtime.registry import DTYPES

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_SEED",
    "PeakMemory",
    "Runner",
    "conditioning",
    "fashion_metrics_unavailable",
    "load_bench_model",
    "quality",
    "run_bench",
    "side_by_side",
    "time_rows",
]

CALIBRATION_SEED = 10_000_000  # MagCache calibrates on images outside the evaluated seed range


def load_bench_model(a: BenchArgs, device: torch.device | str | None = None) -> Any:
    """The run's model (`registry.Model`) on `device` (default ``a.device``), fused with ``a.fused``."""
    from ilf_runtime.registry import load_model

    device = a.device if device is None else device
    model = load_model(a.model, device=device, dtype=getattr(torch, DTYPES[a.dtype]))
    if a.fused:
        from ilf_runtime.fused import apply_fused_blocks

        apply_fused_blocks(model)
    return model


class Runner:
    """Samples rows on one model: weights loaded once, MagCache calibrated once per (solver, steps)."""

    def __init__(self, model: Any, items: dict[str, torch.Tensor], seeds: list[int], guidance: float | None):
        self.model, self.items, self.seeds = model, items, seeds
        self.guidance = guidance if guidance is not None else model.guidance
        self._weights: dict[str, Any] = {}
        self._ratios: dict[tuple[str | None, int], list[float]] = {}

    def weights(self, path: str, loaded: Any = None) -> Any:
        """The ILF weights of `path`, loaded on first use (or given as `loaded`)."""
        from ilf_runtime.weights import load_ilf_weights

        if loaded is not None:
            self._weights[path] = loaded
        if path not in self._weights:
            self._weights[path] = load_ilf_weights(path)
        return self._weights[path]

    def cache_config(self, row: Row) -> Any:
        """The row's cache config; MagCache's ratios are calibrated first (once per solver and steps)."""
        fam, spec = row.cache
        ratios = None
        if fam == "magcache":
            key = (row.solver, row.steps)
            if key not in self._ratios:
                self._ratios[key] = self._calibrate(row)
            ratios = self._ratios[key]
        return caches.cache_config(fam, spec, dtype=self.model.dtype, mag_ratios=ratios)

    def _calibrate(self, row: Row) -> list[float]:
        t = self.model.transformer
        n = min(len(self.seeds), 64)
        cal = caches.apply_cache(
            t, caches.cache_config("magcache", "0", dtype=self.model.dtype), num_steps=row.steps
        )
        try:
            cal_seeds = [CALIBRATION_SEED + s for s in self.seeds[:n]]
            self.sample(Row("plain", "", row.solver, row.steps), range(n), cal.before_step, seeds=cal_seeds)
            ratios = cal.mag_ratios()
        finally:
            caches.remove_cache(t)
        logger.info(
            "MagCache ratios (%s, %d steps): %s", row.solver, row.steps, [round(r, 4) for r in ratios]
        )
        return ratios

    @contextmanager
    def attached(self, row: Row) -> Iterator[Callable | None]:
        """Applies the row's ILF weights, fused forward and cache; yields the per-step callback;
        removes all three (in reverse order)."""
        from ilf_runtime.fused import apply_fused_blocks, remove_fused_blocks
        from ilf_runtime.ilf import apply_ilf, remove_ilf

        t = self.model.transformer
        cfg = self.cache_config(row) if row.cache is not None else None  # calibrates before attaching
        loop = apply_ilf(t, self.weights(row.weights)) if row.weights else None
        cache = None
        try:
            if row.fused:  # after the loop, so that its feedback block is fused too
                apply_fused_blocks(t)
            if cfg is not None:
                mask = loop.config.step_mask(row.steps, row.loop_steps) if loop is not None else None
                cache = caches.apply_cache(t, cfg, num_steps=row.steps, compute_steps=mask)
            yield cache.before_step if cache is not None else None
        finally:
            if cache is not None:
                caches.remove_cache(t)
            if row.fused:
                remove_fused_blocks(t)
            if loop is not None:
                remove_ilf(t)

    def sample(self, row: Row, idx: Sequence[int], before_step=None, seeds: list[int] | None = None):
        """`pipelines.sample` of images `idx` with the row's solver and steps (attach the row first)."""
        from ilf_runtime.pipelines import sample

        sel = torch.as_tensor(list(idx), dtype=torch.long)
        seeds = seeds if seeds is not None else [self.seeds[i] for i in idx]
        kw = {k: v[sel] for k, v in self.items.items()}
        return sample(
            self.model,
            num_steps=row.steps,
            grid=row.grid_starts,
            grid_steps=row.grid_steps,
            solver=row.solver,
            seeds=seeds,
            guidance_scale=self.guidance,
            loop_steps=row.loop_steps,
            before_step=before_step,
            **kw,
        )

    def quality_images(self, row: Row, batches: Sequence[range]) -> tuple[torch.Tensor, float]:
        """Images of the given batches and the sum over images of the counted block evaluations."""
        images, evals = [], 0.0
        with self.attached(row) as cb:
            for b in batches:
                with caches.BlockEvalCounter(self.model.transformer) as ctr:
                    out = self.sample(row, b, cb)
                images.append(out.images)
                evals += ctr.count * len(b)
        return torch.cat(images) if images else torch.empty(0), evals

    def time_once(self, row: Row, idx: Sequence[int]) -> float:
        """Seconds to sample images `idx` with the row attached (attaching not counted)."""
        with self.attached(row) as cb:
            return self.sample(row, idx, cb).seconds


class PeakMemory:
    """Peak memory of one run: CUDA max allocated, or on the CPU the process RSS polled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def time_rows(
    runner: Runner, rows: Sequence[Row], idx: Sequence[int], repeats: int, show: bool = False
) -> list[dict[str, Any]]:
    """Warm-up pass (with peak memory), then `repeats` interleaved passes; per row the median and
    the range."""
    device = runner.model.device
    mem = []
    bar = progress_bar(len(rows) * (1 + repeats), "timing (warm-up, then interleaved passes)", show)
    for row in rows:
        with PeakMemory(device) as pm:
            runner.time_once(row, idx)
        mem.append(pm.peak / 2**20)
        bar.update()
    times: list[list[float]] = [[] for _ in rows]
    for r in range(repeats):
        for k in range(len(rows)):
            j = (k + r) % len(rows)  # rotate the order so no row always runs first or last
            times[j].append(runner.time_once(rows[j], idx) / len(idx))
            bar.update()
        logger.info("timing pass %d/%d done", r + 1, repeats)
    bar.close()
    return [
        {
            "time_per_image_s": statistics.median(t),
            "time_min_s": min(t),
            "time_max_s": max(t),
            "peak_mem_mb": m,
        }
        for t, m in zip(times, mem)
    ]


# -- conditioning, quality ---------------------------------------------------------------------------


def prompt_list(a: BenchArgs) -> list[str]:
    """The run's prompts: ``--prompt`` flags, then the lines of ``--prompts-file``."""
    from ilf_runtime.models import read_prompts

    return list(a.prompt) + (read_prompts(a.prompts_file) if a.prompts_file else [])


def conditioning(model: Any, a: BenchArgs, per: int) -> dict[str, torch.Tensor]:
    """Per-image conditioning, `per` images per condition (class or prompt), conditions interleaved
    so that every disjoint FID subset holds every class."""
    guided = (a.guidance if a.guidance is not None else model.guidance) > 1
    prompts = prompt_list(a)
    items = model.adapter.condition_set(
        model, prompts=prompts or None, prompt_embeds=a.prompt_embeds, guided=guided
    )
    return {k: v.cpu().repeat(per, *([1] * (v.ndim - 1))) for k, v in items.items()}


def prompt_metrics_unavailable(model: Any, prompts: list[str]) -> str | None:
    """None when the text-to-image demo's prompt accuracy can be measured on these prompts."""
    from ilf_runtime.fashion.captions import parse
    from ilf_runtime.fashion.evaluate_prompts import unsupported_reason

    reason = unsupported_reason(model) if prompts else "no text prompts"
    if reason is None and any(parse(p) is None for p in prompts):
        reason = "some prompts name no single garment class and colour of the demo"
    return reason


def prompt_quality(images: torch.Tensor, prompts: list[str], a: BenchArgs) -> dict[str, Any]:
    """A text-to-image demo row: class, colour and full-prompt accuracy, and the FID of the garments'
    intensity with its spread and floor."""
    from ilf_runtime.fashion.classifier import load_fashion_classifier
    from ilf_runtime.fashion.evaluate import reference_sets
    from ilf_runtime.fashion.prompt_metric import prompt_accuracy
    from ilf_runtime.metrics import extract, fid_with_spread

    clf = load_fashion_classifier()
    acc = prompt_accuracy(images, prompts, clf)
    sets = reference_sets(len(images), a.subsets, a.seed)
    f = fid_with_spread(extract(clf.features, images.amax(1, keepdim=True)), sets["ref"], a.subsets)
    return {
        "fid": f["fid"],
        "fid_subset_mean": f["subset_mean"],
        "fid_subset_std": f["subset_std"],
        "fid_floor": sets["floor"]["fid"],
        "class_accuracy": acc["class"]["acc"],
        "colour_accuracy": acc["colour"]["acc"],
        "prompt_accuracy": acc["full"]["acc"],
        "prompt_accuracy_se": acc["full"]["se"],
    }


def fashion_metrics_unavailable(model: Any) -> str | None:
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


def quality(images: torch.Tensor, labels: torch.Tensor | None, a: BenchArgs, fid_ok: bool) -> dict[str, Any]:
    """A row's FID (with its subset spread and floor) and class accuracy; empty when not `fid_ok`."""
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
    from ilf_runtime.distributed import all_gather_cat, barrier, init_distributed, shard
    from ilf_runtime.metrics import paired_psnr

    started = report.provenance()
    info = init_distributed(a.device)
    model = load_bench_model(a, info.device)
    files, missing = weights_files(a)
    rows = default_rows(a, files)
    items = conditioning(model, a, a.per_class)
    n = len(next(iter(items.values())))
    runner = Runner(model, items, list(range(a.seed, a.seed + n)), a.guidance)
    texts = prompt_list(a) * a.per_class  # per image, in the order of `conditioning`
    no_prompt_metric = (
        prompt_metrics_unavailable(model, texts) if not model.adapter.class_conditional else "-"
    )
    no_fid = fashion_metrics_unavailable(model) if no_prompt_metric else None
    batches = [range(lo, min(lo + a.batch_size, n)) for lo in range(0, n, a.batch_size)]
    mine = [batches[i] for i in shard(len(batches), info)]
    if info.is_main:
        logger.info("%d rows, %d images each, %d processes", len(rows), n, info.world_size)

    refs: dict[str, torch.Tensor] = {}
    results: list[dict[str, Any]] = []
    bar = progress_bar(len(rows), "quality rows", a.progress and info.is_main)
    for row in rows:
        t0 = time.perf_counter()
        bar.set_postfix_str(row.label)
        imgs, evals = runner.quality_images(row, mine)
        imgs = all_gather_cat(imgs.to(info.device), info).cpu()
        evals = float(
            all_gather_cat(torch.tensor([evals], dtype=torch.float64, device=info.device), info).sum()
        )
        if not info.is_main:
            continue
        res: dict[str, Any] = {"block_evals_per_image": round(evals / n, 3), "n": n}
        if no_prompt_metric is None:
            res |= prompt_quality(imgs, texts, a)
        else:
            res |= quality(imgs, items.get("class_labels"), a, no_fid is None)
        if row.is_ref and row.steps == a.ref_steps and row.solver not in refs:
            refs[row.solver] = imgs
        ref_solver = row.solver if row.solver in refs else next(iter(refs))
        p = paired_psnr(imgs, refs[ref_solver])
        res |= {"psnr": p["psnr"], "psnr_se": p["psnr_se"], "ref": f"plain {ref_solver} {a.ref_steps}"}
        res["per_image_psnr"] = p["per_image_psnr"]
        results.append(res)
        bar.update()
        if a.progress:
            logger.info(
                "[%d/%d] %s: quality in %.1f s", len(results), len(rows), row.label, time.perf_counter() - t0
            )
    bar.close()
    barrier(info)
    if not info.is_main:
        return None
    threads, why = timing_threads(a.time_threads)
    torch.set_num_threads(threads)
    tidx = list(range(min(a.time_batch, n)))
    with CpuWatch() as watch:  # other processes' CPU use while timing
        timed = time_rows(runner, rows, tidx, a.repeats, a.progress)
    for res, t in zip(results, timed):
        res |= t
    busy = watch.note()
    if busy:
        logger.warning("%s", busy)
    fid = report.FID_PROMPTS if no_prompt_metric is None else no_fid or report.FID_CLASSES
    ctx = report.context(model, a, info, n, len(tidx), fid, started)
    return {
        "context": ctx
        | {
            "notes": missing + ([busy] if busy else []),
            "time_threads_from": why,
            "other_processes_cores": watch.other_cores,
        },
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
    prompts: Sequence[str] | None = None,
    per_class: int = 4,
    seed: int = 0,
    ref_steps: int = 20,
    equal_steps: int | None = None,
    repeats: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """A grid of three panels from the same noise and labels: plain ``ref_steps`` | ILF (the
    weights' own sampler) | plain at ILF's cost in block evaluations (or ``equal_steps``). One row
    per class (class-conditional models) or per prompt (text-conditioned models, which need
    ``prompts``), ``per_class`` images each.

    Each panel's time is that of sampling the whole grid after a small warm-up run; with
    ``repeats`` > 1, the median (and range) of that run and ``repeats - 1`` more passes over the
    three panels, interleaved with the order rotated. Returns the panels' steps, seconds, block
    evaluations and speed-up over the first, and the context (device, dtype, threads, and a note
    when other processes used the CPU while timing)."""
    from ilf_runtime.bench.plots import save_side_by_side
    from ilf_runtime.registry import to_model
    from ilf_runtime.weights import load_ilf_weights

    m = to_model(model)
    w = load_ilf_weights(weights)
    s = w.sampler
    steps, solver, ls = int(s.get("num_steps", 10)), s.get("solver"), s.get("loop_steps")
    num_layers = len(m.transformer.transformer_blocks)
    if equal_steps is None:
        equal_steps = max(1, round(w.config.block_evals(num_layers, steps, ls) / num_layers))
    if m.adapter.class_conditional:
        k = m.adapter.num_classes(m.transformer)
        classes = list(range(min(k, 10))) if classes is None else list(classes)
        items = {"class_labels": torch.tensor(classes)}
        rows = [f"class {c}" for c in classes]
    else:
        if not prompts:
            raise ValueError(
                "the grid of a text-conditioned model needs prompts (--prompt or --prompts-file), found none"
            )
        items = m.adapter.condition_set(m, prompts=list(prompts), guided=m.guidance > 1)
        rows = list(prompts)
    # [n_rows * per_class, ...]: each condition's images next to each other (one grid row)
    items = {k: v.cpu().repeat_interleave(per_class, dim=0) for k, v in items.items()}
    n = len(rows) * per_class
    runner = Runner(m, items, list(range(seed, seed + n)), m.guidance)
    runner.weights(str(weights), loaded=w)
    panels = [
        (f"plain {ref_steps} steps", Row("plain", "", solver, ref_steps)),
        (f"ILF {steps} steps", Row("ilf", "", solver, steps, str(weights), ls, **row_grid(s))),
        (f"plain {equal_steps} steps (equal cost)", Row("plain", "", solver, equal_steps)),
    ]  # a solver of None (the weights record none): the model's scheduler for all three
    idx = range(n)
    shown = []
    bar = progress_bar(len(panels) * max(1, repeats), "side-by-side grid (panels x passes)", progress)
    with CpuWatch() as watch:
        for title, row in panels:
            bar.set_postfix_str(title)
            with runner.attached(row) as cb:
                runner.sample(row, idx[: min(len(idx), 8)], cb)  # warm-up
                with caches.BlockEvalCounter(m.transformer) as ctr:
                    o = runner.sample(row, idx, cb)
            shown.append({"title": title, "steps": row.steps, "images": o.images, "times": [o.seconds]})
            shown[-1]["block_evals_per_image"] = ctr.count
            bar.update()
        for r in range(repeats - 1):
            for k in range(len(panels)):
                j = (k + r + 1) % len(panels)  # rotate the order so no panel always runs first or last
                shown[j]["times"].append(runner.time_once(panels[j][1], idx))
                bar.update()
    bar.close()
    for p in shown:
        t = p.pop("times")
        p |= {"seconds": statistics.median(t), "seconds_min": min(t), "seconds_max": max(t), "passes": len(t)}
        p["speedup"] = shown[0]["seconds"] / p["seconds"]
    save_side_by_side(shown, out, per_class, row_labels=rows)
    return {
        "out": str(out),
        "panels": [{k: v for k, v in p.items() if k != "images"} for p in shown],
        "context": {
            "device": str(m.device),
            "dtype": str(m.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "images": n,
            "busy": watch.note(),
            "other_processes_cores": watch.other_cores,
        },
    }
