"""`sample`: the public sampling entry point, this project's own denoising loop on any model that
`registry.to_model` resolves (pipeline, transformer, `Model`, directory or built-in name)."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from typing import Any

import torch

from ilf_runtime.choices import guidance_ok
from ilf_runtime.config import ILFConfig
from ilf_runtime.ilf import apply_ilf, get_ilf, remove_ilf
from ilf_runtime.registry import Model, to_model, weights_beside
from ilf_runtime.sampling import denoise, make_noise

__all__ = ["SampleOutput", "decode", "sample"]

logger = logging.getLogger(__name__)


@dataclass
class SampleOutput:
    """Images in [0, 1] as (B, C, H, W) float32 on the CPU, plus what produced them."""

    images: torch.Tensor
    latents: torch.Tensor
    seeds: list[int]
    labels: list[Any]
    seconds: float
    info: dict[str, Any]


def decode(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1] through the VAE, or straight from pixel space."""
    if model.vae is not None:
        with torch.no_grad():
            x = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    else:
        x = latents
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_args(num_steps: Any, guidance_scale: Any, class_labels: Any, batch_size: Any) -> None:
    """One-line `ValueError`s for arguments of the wrong type or out of range."""
    if not _is_int(num_steps) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not guidance_ok(guidance_scale):
        raise ValueError(
            f"guidance_scale must be a finite number >= 0 (<= 1: unguided), got {guidance_scale!r}"
        )
    if isinstance(class_labels, torch.Tensor):
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integer class ids, got a {class_labels.dtype} tensor")
    elif class_labels is not None:
        bad = [c for c in class_labels if not _is_int(c)]
        if bad:
            raise ValueError(f"class_labels must be integer class ids, got {bad[0]!r}")


def _weights_grid(w: Any, num_steps: int, grid_steps: int) -> tuple[list[int] | None, int]:
    """The non-uniform grid a loaded weights file was distilled on, where it is sampled at its own step count."""
    from ilf_runtime.weights import sampler_grid

    s, g = w.sampler, sampler_grid(w.sampler)
    if not g:
        return None, grid_steps
    if num_steps != s.get("num_steps"):
        logger.warning(
            "%s was distilled on the grid %s of %s steps; %d steps sample on the scheduler's own spacing",
            w.path, s["grid"], g["grid_steps"], num_steps,
        )  # fmt: skip
        return None, grid_steps
    return g["grid"], g["grid_steps"]


def sample(
    model: Any,
    *,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    negative_prompt: str = "",
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    num_steps: int = 20,
    grid: Sequence[int] | None = None,
    grid_steps: int = 20,
    guidance_scale: float | None = None,
    seeds: Sequence[int] | None = None,
    seed: int = 0,
    solver: str | None = None,
    scheduler: Any = None,
    ilf: ILFConfig | str | PathLike | None = None,
    loop_steps: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    return_latents_only: bool = False,
    cuda_graph: bool = False,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
) -> SampleOutput:
    """Samples images from a supported model with this project's own loop.

    Args:
        model: a pipeline, a transformer, a `Model`, a model directory or a built-in model name.
        class_labels: DiT class ids, one image each.
        prompts / prompt_embeds (+ masks): PixArt conditioning, one image each; prompts go through
            the pipeline's own text encoder.
        num_steps: solver steps.
        grid: a non-uniform grid: the teacher step each of the ``num_steps`` steps starts at, on the
            ``grid_steps``-step grid (`ilf_runtime.solvers.Solver.subset`); default: the grid the ``ilf``
            weights were distilled on when sampled at their step count, else the scheduler's spacing.
        grid_steps: the steps of the grid ``grid`` indexes.
        guidance_scale: classifier-free guidance (> 1 to apply); default: the pipeline's default.
        seeds: one noise seed per image; default ``seed, seed + 1, ...``.
        solver: ``"ddim"`` or ``"dpmpp_2m"``; default: the scheduler's own kind.
        scheduler: a diffusers scheduler (or config) to take the noise schedule from.
        ilf: an `ILFConfig` or feedback weights file to apply for this call (removed afterwards),
            or ``shipped`` / ``shipped:NAME`` (`registry.shipped_weights` of the model);
            if the model already carries a loop, that loop is used.
        loop_steps: which steps run the loop (see `ILFConfig.loop_steps`); default: the config's.
        batch_size: images per forward batch; default all at once.
        progress: show a progress bar over all steps of all batches.
        return_latents_only: skip decoding (``images`` is then empty).
        cuda_graph: run each batch's whole denoising loop as one CUDA graph, captured on the first
            batch of a new shape and replayed after (`ilf_runtime.graphs`); the latents equal the eager
            loop's bit for bit. Needs a model on a CUDA device: a CPU model raises ValueError.
        before_step: passed on to `denoise` for every batch: called with (step index, timestep)
            before each model call; a cache from `ilf_runtime.caches` restarts at step 0.
    """
    from ilf_runtime.solvers import make_solver

    m = to_model(model)
    if scheduler is not None:  # overrides the model's own noise schedule for this call
        m = replace(m, scheduler=scheduler)
    if guidance_scale is None:
        guidance_scale = m.guidance
    _check_args(num_steps, guidance_scale, class_labels, batch_size)
    if grid is not None and len(grid) != num_steps:
        raise ValueError(
            f"grid: expected {num_steps} step starts (num_steps), found {len(grid)}: {list(grid)}"
        )
    if cuda_graph and m.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {m.device}")

    # conditioning, one entry per image
    inputs = {
        "class_labels": class_labels,
        "prompts": prompts,
        "prompt_embeds": prompt_embeds,
        "prompt_attention_mask": prompt_attention_mask,
        "negative_prompt": negative_prompt,
        "negative_prompt_embeds": negative_prompt_embeds,
        "negative_prompt_attention_mask": negative_prompt_attention_mask,
    }
    items = m.adapter.sample_items(m, guidance_scale > 1.0, **inputs)
    count = len(next(iter(items.values())))
    if count == 0:
        raise ValueError("nothing to sample: no class labels or prompts given")
    seeds = list(range(int(seed), int(seed) + count)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images")
    if not all(0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(
            f"seeds must be in 0..{MAX_SEED} (image i uses seed + i), got {min(seeds)}..{max(seeds)}"
        )
    bs = count if batch_size is None else batch_size

    attached = None
    if ilf is not None:
        if get_ilf(m.transformer) is not None:
            raise RuntimeError("the model already carries an ILF loop; pass ilf=None or remove it first")
        spec = weights_beside(ilf, m.transformer, m.name)
        if isinstance(spec, (str, PathLike)):  # read once: its loop and its grid
            from ilf_runtime.weights import load_ilf_weights

            spec = load_ilf_weights(spec)
        if grid is None and not isinstance(spec, ILFConfig):
            grid, grid_steps = _weights_grid(spec, num_steps, grid_steps)
        attached = apply_ilf(m.transformer, spec)
    loop = get_ilf(m.transformer)
    try:
        if grid is None:
            slv = make_solver(m.scheduler, num_steps, solver=solver, device=m.device)
        else:
            slv = make_solver(m.scheduler, grid_steps, solver=solver, device=m.device, grid=grid)
        mask = loop.config.step_mask(num_steps, loop_steps) if loop is not None else [False] * num_steps
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps * ((count + bs - 1) // bs), desc="sampling", unit="step")
        on_step = (lambda i: bar.update(1)) if bar is not None else None
        latents, images = [], []
        t0 = time.perf_counter()
        for lo in range(0, count, bs):
            hi = min(lo + bs, count)
            noise = make_noise(seeds[lo:hi], m.latent_shape, device=m.device, dtype=m.dtype)
            batch = {k: v[lo:hi] for k, v in items.items()}
            cond = m.adapter.conditioning(m.transformer, height=m.image_size, width=m.image_size, **batch)
            x = denoise(
                m.transformer,
                noise,
                slv,
                cond,
                guidance_scale=guidance_scale,
                loop_mask=mask,
                on_step=on_step,
                cuda_graph=cuda_graph,
                before_step=before_step,
            )
            latents.append(x)
            if not return_latents_only:
                images.append(decode(m, x))
        if m.device.type == "cuda":
            torch.cuda.synchronize(m.device)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    finally:
        if attached is not None:
            remove_ilf(m.transformer)

    num_layers = len(m.transformer.transformer_blocks)
    evals = (
        num_layers * num_steps if loop is None else loop.config.block_evals(num_layers, num_steps, loop_steps)
    )
    info = {
        "model": m.name or type(m.transformer).__name__,
        "kind": m.adapter.name,
        "solver": slv.name,
        "num_steps": num_steps,
        "grid": None if grid is None else [int(v) for v in grid],
        "guidance_scale": guidance_scale,
        "ilf": None if loop is None else loop.config.to_dict(),
        "loop_mask": mask,
        "block_evals_per_image": evals,
        "batch_size": bs,
        "device": str(m.device),
        "cuda_graph": cuda_graph,
        "dtype": str(m.dtype).replace("torch.", ""),
    }
    if "class_labels" in items:
        labels_out: list[Any] = items["class_labels"].tolist()
    else:
        labels_out = list(prompts or [f"embeds[{i}]" for i in range(count)])
    return SampleOutput(
        images=torch.cat(images) if images else torch.empty(0),
        latents=torch.cat(latents),
        seeds=seeds,
        labels=labels_out,
        seconds=seconds,
        info=info,
    )
