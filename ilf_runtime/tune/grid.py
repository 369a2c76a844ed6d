"""Where a student's steps go on its teacher's grid: a training-free search with the plain sampler.

A student of ``steps`` steps takes its steps on the teacher's ``teacher_steps``-step grid, each one
starting at a teacher step (`ilf_runtime.solvers.Solver.subset`); the scheduler's own spacing is every
(teacher_steps / steps)th point. `search_grid` moves one start at a time by one or two teacher steps
(coordinate descent from the uniform grid), keeping a move when the plain sampler's paired PSNR against
the plain teacher on held-out seeds rises by more than ``min_gain`` dB, until a whole sweep keeps
none. No training: each try is one plain sampling run, so the search costs a few hundred sampler runs
of ``samples`` images at most. ILF then trains on the grid it found (``ilf tune --grid-search``,
``ilf train --grid``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["MOVES", "search_grid", "uniform_starts"]

MOVES = (-1, 1, -2, 2)  # teacher steps one start may move in one try


def uniform_starts(steps: int, teacher_steps: int) -> list[int]:
    """The evenly spread starts (the scheduler's trailing spacing where ``steps`` divides ``teacher_steps``)."""
    return [round(i * teacher_steps / steps) for i in range(steps)]


@torch.no_grad()
def search_grid(
    model: Any,
    *,
    steps: int,
    teacher_steps: int,
    seeds: list[int],
    sample_kwargs: dict[str, torch.Tensor],
    solver: str | None = None,
    guidance: float | None = None,
    max_sweeps: int = 4,
    min_gain: float = 0.01,
    on_move: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Coordinate descent over the starts of a ``steps``-step grid; returns ``grid`` (the starts),
    ``psnr`` and ``psnr_se`` on it, ``uniform_psnr``, ``tries`` and ``moves`` (each kept move).

    Args:
        model: a `registry.Model` (plain: any ILF loop attached is left off by the caller).
        seeds / sample_kwargs: the held-out images (one seed each) and their conditioning, as
            `pipelines.sample` takes it (``class_labels=...`` or prompt embeddings).
        max_sweeps: passes over every start at most.
        min_gain: dB a move must add to be kept (noise on the same seeds is zero, rounding is not).
    """
    from ilf_runtime.metrics import paired_psnr
    from ilf_runtime.pipelines import sample

    if not 1 <= steps <= teacher_steps:
        raise ValueError(
            f"grid search: expected 1 <= steps <= teacher_steps, got {steps} and {teacher_steps}"
        )
    common = {
        "seeds": seeds,
        "solver": solver,
        "guidance_scale": guidance,
        "batch_size": 256,
        **sample_kwargs,
    }
    ref = sample(model, num_steps=teacher_steps, **common).images

    def score(starts: list[int]) -> dict[str, Any]:
        out = sample(model, num_steps=steps, grid=starts, grid_steps=teacher_steps, **common)
        return paired_psnr(out.images, ref)

    cur = uniform_starts(steps, teacher_steps)
    best = score(cur)
    uniform, tries, moves = best["psnr"], 1, []
    for _ in range(max_sweeps):
        kept = False
        for pos in range(1, steps):
            for d in MOVES:
                cand = list(cur)
                cand[pos] += d
                hi = cand[pos + 1] if pos + 1 < steps else teacher_steps
                if not cand[pos - 1] < cand[pos] < hi:
                    continue
                r = score(cand)
                tries += 1
                if r["psnr"] > best["psnr"] + min_gain:
                    cur, best, kept = cand, r, True
                    moves.append({"grid": list(cur), "psnr": r["psnr"]})
                    if on_move is not None:
                        on_move(moves[-1])
        if not kept:
            break
    return {"grid": cur, "psnr": best["psnr"], "psnr_se": best["psnr_se"], "uniform_psnr": uniform,
            "tries": tries, "moves": moves, "samples": len(seeds)}  # fmt: skip
