"""Validation during training: paired PSNR of the student's samples against the teacher's."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ilf_runtime.distributed import DistInfo, all_gather_cat, shard
from ilf_runtime.train.args import TrainArgs
from ilf_runtime.train.distill import CondSource, Distiller

__all__ = ["Validator"]


class Validator:
    """Paired PSNR of the student's samples against the teacher's on a fixed seed set, sharded
    over the ranks; the teacher's images and the plain baselines are computed once."""

    def __init__(self, model, d: Distiller, a: TrainArgs, info: DistInfo, cache: dict | None = None):
        self.m, self.d, self.a, self.info = model, d, a, info
        self.cache = {} if cache is None else cache  # plain samples by their settings, shared by runs
        self.conds = CondSource(model, a, a.val_prompts) if a.val_prompts else d.conds
        n = a.val_samples
        self.idx = torch.arange(n) % self.conds.n
        self.seeds = [a.val_seed + j for j in range(n)]
        self.layers = len(model.transformer.transformer_blocks)
        self.cost = d.loop.config.block_evals(self.layers, a.steps)
        self.equal_steps = math.ceil(self.cost / self.layers)
        self.ref = self._images(a.teacher_steps, "none")
        self.plain = {s: self._psnr(self._images(s, "none")) for s in sorted({a.steps, self.equal_steps})}

    def _images(self, steps: int, loop_steps: str) -> torch.Tensor | None:
        # the student's own step count runs on its grid (non-uniform or not), any other uniformly
        grid = self.a.grid_starts if steps == self.a.steps else None
        if loop_steps != "none":
            return self._sample(steps, loop_steps, grid)
        # the world size too: sampling sharded over the ranks is a collective, so a rank must never skip
        # it on a hit left from sampling alone (`ilf tune`'s candidates) while another rank samples
        key = (steps, self.d.S.name, self.d.guidance, self.a.val_prompts, self.a.prompts, tuple(self.seeds),
               self.info.world_size) + ((tuple(grid),) if grid else ())  # fmt: skip
        if key not in self.cache:
            self.cache[key] = self._sample(steps, loop_steps, grid)
        return self.cache[key]

    def plain_psnr(self, steps: int) -> dict[str, Any] | None:
        """Paired PSNR of the plain sampler at `steps` on the validation set (rank 0; else None)."""
        return self._psnr(self._images(steps, "none"))

    def _sample(self, steps: int, loop_steps: str, grid: list[int] | None) -> torch.Tensor | None:
        from ilf_runtime.pipelines import sample

        mine = list(shard(len(self.seeds), self.info))
        out = sample(
            self.m,
            num_steps=steps,
            grid=grid,
            grid_steps=self.a.teacher_steps,
            seeds=[self.seeds[j] for j in mine],
            solver=self.d.S.name,
            guidance_scale=self.d.guidance,
            loop_steps=loop_steps,
            batch_size=256,
            **self.conds.sample_kwargs(self.idx[mine]),
        )
        images = all_gather_cat(out.images.to(self.info.device), self.info).cpu()
        return images if self.info.is_main else None

    def _psnr(self, images: torch.Tensor | None) -> dict[str, Any] | None:
        from ilf_runtime.metrics import paired_psnr

        return None if images is None else paired_psnr(images, self.ref)

    def run(self, loop_steps: str | None = None) -> dict[str, Any] | None:
        """The EMA weights' validation (rank 0; else None): paired PSNR and the gain over the plain
        sampler of equal (or the next higher) cost; `loop_steps` scores another choice of looped steps."""
        spec = self.a.loop.loop_steps if loop_steps is None else loop_steps
        r = self._psnr(self._images(self.a.steps, spec))
        cost = replace(self.d.loop.config, loop_steps=spec).block_evals(self.layers, self.a.steps)
        equal = math.ceil(cost / self.layers)
        if equal not in self.plain:  # sampling is a collective: every rank, before rank 0 alone goes on
            self.plain[equal] = self.plain_psnr(equal)
        if r is None:
            return None
        base = self.plain[equal]
        diff = r["per_image_psnr"] - base["per_image_psnr"]
        return {
            "psnr": r["psnr"],
            "psnr_se": r["psnr_se"],
            "block_evals": cost,
            "equal_cost_steps": equal,
            "equal_cost_psnr": base["psnr"],
            "gain_db": float(diff.mean()),
            "gain_se": float(diff.std() / math.sqrt(diff.numel())),
            "plain_same_steps_psnr": self.plain[self.a.steps]["psnr"],
        }
