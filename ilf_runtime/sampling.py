"""The denoising loop this project owns.

`denoise` runs a fixed number of solver steps over a DiT or PixArt transformer with classifier-
free guidance and the ILF step schedule. Everything that varies per step is either a Python value
fixed before the loop (the step index, the loop on/off flag) or a device tensor precomputed by the
solver (timesteps, coefficients); nothing inside the loop reads a tensor back to the host, so the
whole loop can be captured as one CUDA graph.

Guidance and the learned-sigma split follow diffusers' pipelines exactly: DiT stacks
(conditional, null class) and guides only the first ``in_channels`` output channels; PixArt
stacks (negative, positive) prompt embeddings and splits learned sigma after guidance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ilf_runtime.ilf import get_ilf, model_kind

logger = logging.getLogger(__name__)

__all__ = ["Conditioning", "denoise", "dit_conditioning", "make_noise", "pixart_conditioning", "predict"]


@dataclass
class Conditioning:
    """Model inputs other than the latents and the timestep, for one batch.

    For guidance the inputs are stacked in the order the diffusers pipelines use, once, before the
    loop: ``model_kwargs`` holds the batch-doubled tensors, ``uncond_first`` says which half is the
    unconditional one.
    """

    kind: str
    model_kwargs: dict[str, Any]
    model_kwargs_unguided: dict[str, Any]
    uncond_first: bool

    def kwargs(self, guided: bool) -> dict[str, Any]:
        return self.model_kwargs if guided else self.model_kwargs_unguided


def dit_conditioning(transformer: nn.Module, class_labels: torch.Tensor) -> Conditioning:
    """DiT: class labels plus the null class (index ``num_embeds_ada_norm``) for guidance."""
    num_classes = transformer.config.num_embeds_ada_norm
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
    device = next(transformer.parameters()).device
    labels = labels.to(device)
    null = torch.full_like(labels, num_classes)
    return Conditioning(
        kind="dit",
        model_kwargs={"class_labels": torch.cat([labels, null])},
        model_kwargs_unguided={"class_labels": labels},
        uncond_first=False,
    )


def pixart_conditioning(
    transformer: nn.Module,
    prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    negative_prompt_attention_mask: torch.Tensor | None,
    *,
    height: int,
    width: int,
) -> Conditioning:
    """PixArt: prompt embeddings and masks, (negative, positive) for guidance, plus the resolution
    and aspect-ratio conditions when the transformer uses them (PixArt-alpha 1024)."""
    p = next(transformer.parameters())
    c = transformer.config
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be (batch, tokens, channels), got {tuple(prompt_embeds.shape)}")
    want = c.caption_channels if c.caption_channels is not None else c.cross_attention_dim
    if prompt_embeds.shape[-1] != want:
        raise ValueError(
            f"prompt_embeds have {prompt_embeds.shape[-1]} channels, this transformer expects {want}"
        )
    if prompt_attention_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(
            f"prompt_attention_mask must be {tuple(prompt_embeds.shape[:2])}, got {tuple(prompt_attention_mask.shape)}"
        )
    b = prompt_embeds.shape[0]
    emb, mask = prompt_embeds.to(p.device, p.dtype), prompt_attention_mask.to(p.device)

    def added(n: int) -> dict[str, Any]:
        if not transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        res = torch.tensor([height, width], dtype=p.dtype, device=p.device).repeat(n, 1)
        ar = torch.tensor([float(height / width)], dtype=p.dtype, device=p.device).repeat(n, 1)
        return {"resolution": res, "aspect_ratio": ar}

    unguided = {"encoder_hidden_states": emb, "encoder_attention_mask": mask, "added_cond_kwargs": added(b)}
    guided = None
    if negative_prompt_embeds is not None:
        if negative_prompt_embeds.shape != prompt_embeds.shape or negative_prompt_attention_mask is None:
            raise ValueError(
                "negative_prompt_embeds must match prompt_embeds "
                f"{tuple(prompt_embeds.shape)} and come with a mask, got {tuple(negative_prompt_embeds.shape)}"
            )
        guided = {
            "encoder_hidden_states": torch.cat([negative_prompt_embeds.to(p.device, p.dtype), emb]),
            "encoder_attention_mask": torch.cat([negative_prompt_attention_mask.to(p.device), mask]),
            "added_cond_kwargs": added(2 * b),
        }
    return Conditioning(kind="pixart", model_kwargs=guided, model_kwargs_unguided=unguided, uncond_first=True)


def make_noise(
    seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """One standard-normal sample per seed, drawn on the CPU so every device gets the same noise."""
    xs = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(xs).to(device=device, dtype=dtype)  # (B, C, H, W)


def _guide(eps: torch.Tensor, scale: float, uncond_first: bool) -> torch.Tensor:
    first, second = eps.chunk(2)
    cond, uncond = (second, first) if uncond_first else (first, second)
    return uncond + scale * (cond - uncond)


def predict(
    transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0
) -> torch.Tensor:
    """One model evaluation as the sampler sees it: the (guided) model output for the latent
    channels at timestep `t` (a 0-dim or (B,) tensor). Differentiable; the trainer calls it too."""
    guided = guidance_scale > 1.0
    c_lat = transformer.config.in_channels
    spec = _LoopSpec(cond.kind, guided, float(guidance_scale), cond.uncond_first, (), c_lat)
    return _model_eps(transformer, x, t, cond.kwargs(guided), spec)


def _model_eps(
    transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any], spec: _LoopSpec
) -> torch.Tensor:
    x_in = torch.cat([x, x]) if spec.guided else x  # (2B or B, C, H, W)
    out = transformer(x_in, timestep=t.expand(x_in.shape[0]), return_dict=False, **kwargs)[0]
    if spec.kind == "dit":  # DiTPipeline guides the epsilon channels, then drops learned sigma
        eps = out[:, : spec.c_lat]
        return _guide(eps, spec.guidance_scale, spec.uncond_first) if spec.guided else eps
    # PixArt pipelines guide all channels, then drop learned sigma
    eps = _guide(out, spec.guidance_scale, spec.uncond_first) if spec.guided else out
    return eps[:, : spec.c_lat]


@torch.no_grad()
def denoise(
    transformer: nn.Module,
    noise: torch.Tensor,
    solver: Any,
    cond: Conditioning,
    *,
    guidance_scale: float = 1.0,
    loop_mask: Sequence[bool] | None = None,
    on_step: Callable[[int], None] | None = None,
    cuda_graph: bool = False,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Runs `solver` from `noise` to the final latents.

    Args:
        transformer: a DiT or PixArt transformer, with or without an ILF loop applied.
        noise: (B, C, H, W) initial latents, in the transformer's dtype and device.
        solver: a `ilf_runtime.solvers.Solver` (timesteps and coefficients precomputed).
        cond: model inputs from `dit_conditioning` / `pixart_conditioning`.
        guidance_scale: classifier-free guidance; applied when > 1, as the diffusers pipelines do.
        loop_mask: one flag per step, whether the ILF loop runs; None runs it on every step.
        on_step: called with the step index after each step (progress bars); must not sync. With
            ``cuda_graph`` it is called for every step after the replay.
        cuda_graph: run the whole loop as one CUDA graph (`ilf_runtime.graphs`), captured on the
            first call with a new shape key and replayed after; the result equals the eager loop's
            bit for bit. Needs the transformer and the latents on a CUDA device (else ValueError).
        before_step: called with the step index and timestep tensor before each model call (cache
            hooks set their per-step state here; see `ilf_runtime.caches`); must not sync to stay
            graph-capturable.
    """
    model_kind(transformer)
    n = solver.num_steps
    c_lat = transformer.config.in_channels
    c_out = transformer.out_channels
    if c_out not in (c_lat, 2 * c_lat):
        raise ValueError(f"transformer has {c_out} output channels; expected {c_lat} or {2 * c_lat}")
    if guidance_scale > 1.0 and cond.model_kwargs is None:
        raise ValueError("guidance_scale > 1 needs negative prompt embeddings")
    guided = guidance_scale > 1.0
    mask = [True] * n if loop_mask is None else [bool(m) for m in loop_mask]
    if len(mask) != n:
        raise ValueError(f"loop_mask has {len(mask)} entries for {n} steps")
    spec = _LoopSpec(cond.kind, guided, float(guidance_scale), cond.uncond_first, tuple(mask), c_lat)

    if not cuda_graph:
        return _run_steps(transformer, noise, solver, cond.kwargs(guided), spec, on_step, before_step)
    if before_step is not None:
        raise ValueError(
            "before_step (cache hooks) cannot run inside a captured CUDA graph; use cuda_graph=False"
        )
    device = next(transformer.parameters()).device
    if device.type != "cuda" or noise.device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs the transformer and the latents on a CUDA device; got the "
            f"transformer on {device} and the latents on {noise.device} (use cuda_graph=False)"
        )
    from ilf_runtime import graphs

    def fn(x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        return _run_steps(transformer, x, solver, kwargs, spec)

    x = graphs.run_loop(transformer, fn, noise, cond.kwargs(guided), solver, spec)
    for i in range(n if on_step is not None else 0):
        on_step(i)
    return x


@dataclass(frozen=True)
class _LoopSpec:
    """The Python values the step loop branches on (fixed per loop; part of a graph's key)."""

    kind: str
    guided: bool
    guidance_scale: float
    uncond_first: bool
    mask: tuple[bool, ...]
    c_lat: int


def _run_steps(
    transformer: nn.Module,
    x: torch.Tensor,
    solver: Any,
    kwargs: dict[str, Any],
    spec: _LoopSpec,
    on_step: Callable[[int], None] | None = None,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The step loop: no host sync, no branch on a tensor value (so it can be captured whole)."""
    n = solver.num_steps
    loop = get_ilf(transformer)
    state = solver.init_state()
    try:
        for i in range(n):
            if loop is not None:
                loop.active = spec.mask[i]
            if before_step is not None:
                before_step(i, solver.timesteps[i])
            eps = _model_eps(transformer, x, solver.timesteps[i], kwargs, spec)
            if spec.kind == "pixart" and n == 1:  # PixArt's one-step (DMD) path returns the x0 prediction
                x = solver.predict_x0(i, x, eps)
            else:
                x = solver.step(i, x, eps, state)
            if on_step is not None:
                on_step(i)
    finally:
        if loop is not None:
            loop.active = True
    return x
