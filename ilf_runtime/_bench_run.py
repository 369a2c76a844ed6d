"""Running the rows of `ilf_runtime.bench` (internal): a row is a method at one setting; `Runner`
applies its ILF weights and cache, samples, counts block evaluations and times it."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

import torch

logger = logging.getLogger(__name__)

CALIBRATION_SEED = 10_000_000  # MagCache calibrates on images outside the evaluated seed range


@dataclass
class Row:
    """One method at one setting."""

    method: str
    setting: str
    solver: str
    steps: int
    weights: str | None = None
    loop_steps: str | None = None
    cache: tuple[str, str] | None = None  # (family, spec), built by `cache_config` when run

    @property
    def label(self) -> str:
        return " ".join(str(x) for x in (self.method, self.setting, self.solver, f"{self.steps} steps") if x)

    @property
    def is_ref(self) -> bool:
        return self.method == "plain" and self.weights is None and self.cache is None


def cache_config(family: str, spec: str, *, dtype: torch.dtype, mag_ratios: list[float] | None = None):
    """A cache config from a sweep value.

    fora ``N``; delta-dit ``K:BOUNDARY:N``; inner-reuse ``A-B:N``; first-block-cache and magcache
    a threshold; taylorseer ``N`` or ``N:ORDER``.
    """
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    from ilf_runtime import caches

    try:
        if family == "fora":
            return caches.ForaConfig(int(spec))
        if family == "delta-dit":
            k, b, n = spec.split(":")
            return caches.DeltaDiTConfig(int(k), float(b), int(n))
        if family == "inner-reuse":
            rng, n = spec.split(":")
            a, b = rng.split("-")
            return caches.InnerReuseConfig(int(a), int(b), int(n))
        if family == "first-block-cache":
            return FirstBlockCacheConfig(threshold=float(spec))
        if family == "taylorseer":
            n, _, order = spec.partition(":")
            return TaylorSeerCacheConfig(
                cache_interval=int(n), max_order=int(order or 1), taylor_factors_dtype=dtype
            )
        if family == "magcache":
            if mag_ratios is None:
                return MagCacheConfig(calibrate=True, threshold=float(spec))
            return MagCacheConfig(
                threshold=float(spec), mag_ratios=mag_ratios, num_inference_steps=len(mag_ratios)
            )
    except ValueError as e:
        raise ValueError(f"{family} setting {spec!r}: {e}") from None
    raise ValueError(f"unknown cache family {family!r}")


class Runner:
    """Samples rows on one model: weights loaded once, MagCache calibrated once per (solver, steps)."""

    def __init__(self, model: Any, items: dict[str, torch.Tensor], seeds: list[int], guidance: float | None):
        self.model, self.items, self.seeds = model, items, seeds
        self.guidance = guidance if guidance is not None else model.guidance
        self._weights: dict[str, Any] = {}
        self._ratios: dict[tuple[str, int], list[float]] = {}

    def weights(self, path: str):
        from ilf_runtime.weights import load_ilf_weights

        if path not in self._weights:
            self._weights[path] = load_ilf_weights(path)
        return self._weights[path]

    def _cache(self, row: Row):
        fam, spec = row.cache
        ratios = None
        if fam == "magcache":
            key = (row.solver, row.steps)
            if key not in self._ratios:
                self._ratios[key] = self._calibrate(row)
            ratios = self._ratios[key]
        return cache_config(fam, spec, dtype=self.model.dtype, mag_ratios=ratios)

    def _calibrate(self, row: Row) -> list[float]:
        from ilf_runtime import caches

        t = self.model.transformer
        n = min(len(self.seeds), 64)
        cal = caches.apply_cache(
            t, cache_config("magcache", "0", dtype=self.model.dtype), num_steps=row.steps
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
        """Applies the row's ILF weights and cache; yields the per-step callback; removes both."""
        from ilf_runtime import caches
        from ilf_runtime.ilf import apply_ilf, remove_ilf

        t = self.model.transformer
        cfg = self._cache(row) if row.cache is not None else None  # calibrates before anything is attached
        loop = apply_ilf(t, self.weights(row.weights)) if row.weights else None
        cache = None
        try:
            if cfg is not None:
                mask = loop.config.step_mask(row.steps, row.loop_steps) if loop is not None else None
                cache = caches.apply_cache(t, cfg, num_steps=row.steps, compute_steps=mask)
            yield cache.before_step if cache is not None else None
        finally:
            if cache is not None:
                caches.remove_cache(t)
            if loop is not None:
                remove_ilf(t)

    def sample(self, row: Row, idx: Sequence[int], before_step=None, seeds: list[int] | None = None):
        from ilf_runtime.pipelines import sample

        sel = torch.as_tensor(list(idx), dtype=torch.long)
        seeds = seeds if seeds is not None else [self.seeds[i] for i in idx]
        kw = {k: v[sel] for k, v in self.items.items()}
        return sample(
            self.model,
            num_steps=row.steps,
            solver=row.solver,
            seeds=seeds,
            guidance_scale=self.guidance,
            loop_steps=row.loop_steps,
            before_step=before_step,
            **kw,
        )

    def quality_images(self, row: Row, batches: Sequence[range]) -> tuple[torch.Tensor, float]:
        """Images of the given batches and the sum over images of the counted block evaluations."""
        from ilf_runtime import caches

        images, evals = [], 0.0
        with self.attached(row) as cb:
            for b in batches:
                with caches.BlockEvalCounter(self.model.transformer) as ctr:
                    out = self.sample(row, b, cb)
                images.append(out.images)
                evals += ctr.count * len(b)
        return torch.cat(images) if images else torch.empty(0), evals

    def time_once(self, row: Row, idx: Sequence[int]) -> float:
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


def time_rows(runner: Runner, rows: Sequence[Row], idx: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Warm-up pass (with peak memory), then `repeats` interleaved passes; per row the median."""
    device = runner.model.device
    mem = []
    for row in rows:
        with PeakMemory(device) as pm:
            runner.time_once(row, idx)
        mem.append(pm.peak / 2**20)
    times: list[list[float]] = [[] for _ in rows]
    for r in range(repeats):
        for k in range(len(rows)):
            j = (k + r) % len(rows)  # rotate the order so no row always runs first or last
            times[j].append(runner.time_once(rows[j], idx) / len(idx))
        logger.info("timing pass %d/%d done", r + 1, repeats)
    return [
        {
            "time_per_image_s": statistics.median(t),
            "time_min_s": min(t),
            "time_max_s": max(t),
            "peak_mem_mb": m,
        }
        for t, m in zip(times, mem)
    ]
