"""ILF inside the stock diffusers pipeline call.

    pipe = DiTPipeline.from_pretrained(...)          # or PixArtAlphaPipeline / PixArtSigmaPipeline
    ilf_runtime.enable(pipe, "feedback.safetensors")  # or "shipped" for a model that ships weights
    images = pipe(class_labels=[207, 360], num_inference_steps=10).images

`enable` applies the feedback weights to ``pipe.transformer`` (`ilf.apply_ilf`), sets
``pipe.scheduler`` to the weights' solver (built from the pipeline's own scheduler config, as
diffusers' ``from_config`` swaps do) and installs a `StepSchedule`: a forward pre-hook on the
transformer that switches the loop on at exactly the steps it was trained for (``loop_steps``),
keyed on the timestep the pipeline passes. No pipeline code is changed or wrapped. A call whose
grid differs from the weights' (another step count, solver or spacing) raises a ValueError naming
both, instead of sampling with a schedule the weights never saw. `disable` takes it all off.

`pixel_pipeline` builds the stock pipeline around a pixel-space model (the bundled ones): the
pipelines always decode through ``pipe.vae``, so a `PixelDecoder` (the identity, no parameters)
stands in for it.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from os import PathLike
from typing import Any

import torch

from ilf_runtime.ilf import FeedbackLoop, apply_ilf, get_ilf, remove_ilf
from ilf_runtime.models import resolve
from ilf_runtime.solvers import SOLVERS, make_solver
from ilf_runtime.weights import load_ilf_weights

logger = logging.getLogger(__name__)

__all__ = ["StepSchedule", "disable", "enable", "pixel_pipeline"]


def _short(ts: list[int]) -> str:
    return str(ts) if len(ts) <= 6 else f"[{ts[0]}, {ts[1]}, ..., {ts[-1]}]"


class StepSchedule:
    """Turns the loop on and off per denoising step of a stock pipeline call, from the timestep the
    transformer receives. ``grid``: the trained solver's timesteps; ``mask[i]``: loop at step i."""

    def __init__(self, loop: FeedbackLoop, pipe: Any, grid: list[int], mask: tuple[bool, ...], what: str):
        self.loop = loop
        self.grid = grid
        self.mask = mask
        self.index = {t: i for i, t in enumerate(grid)}
        self.what = what  # "10 ddim steps (DDIMScheduler, trailing)" for messages
        self.scheduler_class = type(pipe.scheduler).__name__
        self._pipe = weakref.ref(pipe)
        self._sig = inspect.signature(type(loop.transformer).forward)
        self.handle = loop.transformer.register_forward_pre_hook(self._on_model_start, with_kwargs=True)

    def _mismatch(self, got: str) -> ValueError:
        return ValueError(
            f"these ILF weights were trained for {self.what}, timesteps {_short(self.grid)}; {got}. "
            f"Call pipe(..., num_inference_steps={len(self.grid)}) with the scheduler enable() set, "
            "or ilf_runtime.disable(pipe) to sample without the loop"
        )

    def _on_model_start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.loop.stepping:  # this project's own sampler sets `active` per step itself
            return
        t = self._sig.bind(module, *args, **kwargs).arguments.get("timestep")
        if t is None:
            raise ValueError("ILF's step schedule needs the timestep: the transformer was called without one")
        t0 = int(torch.as_tensor(t).reshape(-1)[0])
        pipe = self._pipe()
        if t0 == self.grid[0] and pipe is not None:  # the first step of a call: check the call's grid once
            sched = pipe.scheduler
            call = [int(x) for x in getattr(sched, "timesteps", [])]
            if type(sched).__name__ != self.scheduler_class or call != self.grid:
                raise self._mismatch(
                    f"this call runs {len(call)} steps with {type(sched).__name__}, timesteps {_short(call)}"
                )
        i = self.index.get(t0)
        if i is None:
            raise self._mismatch(f"the transformer was called at timestep {t0}, which is not on that grid")
        self.loop.active = self.mask[i]


def enable(pipe: Any, weights: str | PathLike = "shipped") -> FeedbackLoop:
    """Applies ILF weights to a stock diffusers DiT or PixArt pipeline so that ``pipe(...)`` runs the
    trained schedule. ``weights``: a feedback weights file, or ``shipped`` / ``shipped:NAME`` (the
    files beside the transformer's folder, `registry.shipped_weights`). Sets ``pipe.scheduler`` to the
    weights' solver; returns the attached `FeedbackLoop`. Call with
    ``num_inference_steps=loop.config``'s trained step count (printed in the log, and in any mismatch error)."""
    from ilf_runtime.registry import weights_beside

    transformer, _ = resolve(pipe)
    if transformer is pipe or not hasattr(pipe, "scheduler"):
        raise TypeError(
            f"enable() takes a diffusers pipeline, got {type(pipe).__name__}; use apply_ilf for a transformer"
        )
    if get_ilf(transformer) is not None:
        raise RuntimeError(
            "ILF is already applied to this pipeline's transformer; call ilf_runtime.disable(pipe) first"
        )
    w = load_ilf_weights(weights_beside(str(weights), transformer))
    s = w.sampler
    if s.get("grid"):
        raise ValueError(
            f"{weights}: these weights sample on a non-uniform grid (steps {s['grid']} of "
            f"{s.get('teacher_steps')}), which pipe(...) cannot take; use ilf_runtime.sample or `ilf sample`"
        )
    n = int(s.get("num_steps", 10))
    solver = s.get("solver")
    if solver is not None:
        cls_name = SOLVERS[solver][0]
        if type(pipe.scheduler).__name__ != cls_name:
            import diffusers

            logger.info("enable: pipe.scheduler %s -> %s", type(pipe.scheduler).__name__, cls_name)
            pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config)
    grid = [int(t) for t in make_solver(pipe.scheduler, n).timesteps]
    loop = apply_ilf(transformer, w)
    mask = tuple(loop.config.step_mask(n, s.get("loop_steps")))
    spacing = pipe.scheduler.config.get("timestep_spacing", "?")
    what = f"{n} steps of {type(pipe.scheduler).__name__} ({spacing} spacing)"
    schedule = StepSchedule(loop, pipe, grid, mask, what)
    loop.adopt_hook(schedule.handle)
    g = s.get("guidance_scale")
    logger.info(
        "ILF enabled: call pipe(..., num_inference_steps=%d%s); the loop runs at %d of the steps",
        n,
        "" if g is None else f", guidance_scale={g}",
        sum(mask),
    )
    return loop


def disable(pipe: Any) -> None:
    """Takes `enable`'s loop and step schedule off the pipeline's transformer (the scheduler stays)."""
    remove_ilf(pipe)


def pixel_pipeline(model: Any) -> Any:
    """The stock diffusers pipeline (`DiTPipeline` or the model's PixArt pipeline) around a `Model`, a
    built-in name or a model directory, with a `PixelDecoder` as its VAE when it has none."""
    from ilf_runtime.pixel_decoder import PixelDecoder
    from ilf_runtime.registry import to_model

    m = to_model(model)
    if m.pipeline is not None:
        return m.pipeline
    return m.adapter.stock_pipeline(m.transformer, PixelDecoder(), m.scheduler)
