"""The denoising loop this project owns.

`denoise` runs a fixed number of solver steps over a supported transformer with classifier-free
guidance and the ILF step schedule. Everything that varies per step is either a Python value
fixed before the loop (the step index, the loop on/off flag) or a device tensor precomputed by the
solver (timesteps, coefficients); nothing inside the loop reads a tensor back to the host, so the
whole loop can be captured as one CUDA graph.

Guidance and the learned-sigma split follow diffusers' pipelines exactly; the model's adapter
(`ilf_runtime.models`, carried by the `Conditioning`) says how.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ilf_runtime.ilf import get_ilf
from ilf_runtime.models import LOOP_ATTR, Conditioning, ModelAdapter

logger = logging.getLogger(__name__)

MAX_LATENT = 1e4  # final latents beyond this magnitude mean the sampling diverged

__all__ = ["LoopSpec", "check_finite", "denoise", "make_noise", "predict", "run_steps"]


def make_noise(
    seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """One standard-normal sample per seed, drawn on the CPU so every device gets the same noise."""
    xs = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(xs).to(device=device, dtype=dtype)  # (B, C, H, W)


def predict(
    transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float = 1.0
) -> torch.Tensor:
    """One model evaluation as the sampler sees it: the (guided) model output for the latent
    channels at timestep `t` (a 0-dim or (B,) tensor). Differentiable; the trainer calls it too."""
    guided = guidance_scale > 1.0
    c_lat = transformer.config.in_channels
    spec = LoopSpec(cond.adapter, guided, float(guidance_scale), (), c_lat)
    return _model_eps(transformer, x, t, cond.kwargs(guided), spec)


def _model_eps(
    transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any], spec: LoopSpec
) -> torch.Tensor:
    x_in = torch.cat([x, x]) if spec.guided else x  # (2B or B, C, H, W)
    out = transformer(x_in, timestep=t.expand(x_in.shape[0]), return_dict=False, **kwargs)[0]
    return spec.adapter.guided_eps(out, spec.guided, spec.guidance_scale, spec.c_lat)


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
        transformer: a supported transformer (the one `cond` was built for), with or without an ILF loop.
        noise: (B, C, H, W) initial latents, in the transformer's dtype and device.
        solver: a `ilf_runtime.solvers.Solver` (timesteps and coefficients precomputed).
        cond: model inputs from the model adapter's `conditioning` (`ilf_runtime.models`).
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
    if not cond.adapter.matches(transformer):
        raise ValueError(
            f"the conditioning was built for a {cond.adapter.transformer_class}, not a {type(transformer).__name__}"
        )
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
    spec = LoopSpec(cond.adapter, guided, float(guidance_scale), tuple(mask), c_lat)

    if not cuda_graph:
        x = run_steps(transformer, noise, solver, cond.kwargs(guided), spec, on_step, before_step)
        return check_finite(x, transformer, cond.kwargs(guided), guidance_scale)
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
        return run_steps(transformer, x, solver, kwargs, spec)

    x = graphs.run_loop(transformer, fn, noise, cond.kwargs(guided), solver, spec)
    for i in range(n if on_step is not None else 0):
        on_step(i)
    return check_finite(x, transformer, cond.kwargs(guided), guidance_scale)


def check_finite(
    x: torch.Tensor, transformer: nn.Module, kwargs: dict[str, Any], guidance_scale: float
) -> torch.Tensor:
    """Returns the final latents `x`, or raises `FloatingPointError` naming the likely cause when
    they hold NaN, Inf or values beyond `MAX_LATENT` (a diverged run: a black or white image). One
    host sync per batch, after the loop: graph capture is unaffected."""
    if bool((x.abs() <= MAX_LATENT).all()):  # False for NaN and Inf too
        return x

    def bad(ts) -> bool:
        return any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in ts)

    loop = get_ilf(transformer)
    inputs = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and bad([v])]
    if loop is not None and bad(loop.parameters()):
        cause = "the feedback weights (loop scales or feedback block) hold NaN or Inf"
    elif bad(
        p for n, p in transformer.named_parameters() if loop is None or not n.startswith(LOOP_ATTR + ".")
    ):
        cause = "the backbone's weights hold NaN or Inf"
    elif inputs:
        cause = f"the conditioning input {inputs[0]!r} (e.g. prompt embeddings) holds NaN or Inf"
    elif guidance_scale > 100:
        cause = f"the guidance scale {guidance_scale:g} is far too large"
    else:
        cause = "the model diverged (feedback scales too large, a dtype that overflows, or a bad schedule)"
    raise FloatingPointError(f"the sampled latents contain NaN, Inf or values beyond {MAX_LATENT:g}: {cause}")


@dataclass(frozen=True)
class LoopSpec:
    """The Python values the step loop branches on (fixed per loop; part of a graph's key)."""

    adapter: ModelAdapter
    guided: bool
    guidance_scale: float
    mask: tuple[bool, ...]
    c_lat: int


def run_steps(
    transformer: nn.Module,
    x: torch.Tensor,
    solver: Any,
    kwargs: dict[str, Any],
    spec: LoopSpec,
    on_step: Callable[[int], None] | None = None,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The step loop with everything fixed by `spec` (what `denoise` runs, eagerly or inside a CUDA
    graph): no host sync, no branch on a tensor value, so it can be captured whole."""
    n = solver.num_steps
    loop = get_ilf(transformer)
    state = solver.init_state()
    if loop is not None:
        loop.stepping = True
    try:
        for i in range(n):
            if loop is not None:
                loop.active = spec.mask[i]
            if before_step is not None:
                before_step(i, solver.timesteps[i])
            eps = _model_eps(transformer, x, solver.timesteps[i], kwargs, spec)
            if n == 1 and spec.adapter.last_step_predicts_x0:  # e.g. PixArt's one-step (DMD) path
                x = solver.predict_x0(i, x, eps)
            else:
                x = solver.step(i, x, eps, state)
            if on_step is not None:
                on_step(i)
    finally:
        if loop is not None:
            loop.active, loop.stepping = True, False
    return x
