"""`EvalArgs`, the settings of one `ilf eval` run (no heavy imports: ``ilf --help`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EvalArgs"]


@dataclass
class EvalArgs:
    """One evaluation run.

    Args:
        per_class: images per class.
        steps: solver steps of the evaluated sampler.
        solver: "ddim" or "dpmpp_2m" (default: the model's scheduler).
        guidance: classifier-free guidance scale (None: the model's default).
        seed: seed of image 0; image i uses seed + i.
        weights: feedback weights file to apply, or None for the plain sampler.
        loop_steps: override of the weights' looped steps.
        ref_steps: steps of the plain reference sampler for paired PSNR (0: skip PSNR).
        subsets: disjoint subsets for the FID spread.
        batch_size: images per forward batch.
    """

    per_class: int = 100
    steps: int = 20
    solver: str | None = None
    guidance: float | None = None
    seed: int = 0
    weights: str | None = None
    loop_steps: str | None = None
    ref_steps: int = 0
    subsets: int = 5
    batch_size: int = 250
