"""Loading DiT / PixArt models and the public `sample` entry point.

A model is a diffusers `DiTPipeline`, `PixArtAlphaPipeline` or `PixArtSigmaPipeline`, a bare
`DiTTransformer2DModel` / `PixArtTransformer2DModel`, a local directory holding either (loaded
with `from_pretrained`, offline), or a short name of a built-in model (`MODEL_NAMES`).
A bare transformer directory may hold a ``scheduler_config.json`` beside its ``config.json``;
without one the default scheduler below is used. Models without a VAE sample in pixel space.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.config import ILFConfig
from ilf_runtime.ilf import apply_ilf, get_ilf, model_kind, remove_ilf, unwrap_transformer
from ilf_runtime.sampling import denoise, dit_conditioning, make_noise, pixart_conditioning

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEDULER",
    "MODEL_NAMES",
    "Model",
    "SampleOutput",
    "load_model",
    "resolve_weights",
    "sample",
    "shipped_weights",
    "to_model",
]

# Bare transformers without a scheduler config get DDIM on DiT's linear beta schedule, with
# trailing spacing so that coarse step grids are subsets of finer ones, and a final step to
# alpha = 1 (the clean image). The bundled model ships this config.
DEFAULT_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}

DEFAULT_GUIDANCE = {"dit": 4.0, "pixart": 4.5}  # the diffusers pipelines' own defaults


# Feedback weights shipped with a built-in model: ``--weights shipped`` picks "default",
# ``--weights shipped:NAME`` another entry. Files live beside the model's own files.
SHIPPED_WEIGHTS = {
    "fashion-dit": {
        "default": "feedback.safetensors",
        "aggressive": "feedback-aggressive.safetensors",
        "dpmpp": "feedback-dpmpp.safetensors",
    },
}


def shipped_weights(model_name: str) -> dict[str, Path]:
    """The feedback weights files shipped for built-in model `model_name` that are present."""
    files = SHIPPED_WEIGHTS.get(model_name, {})
    where = MODEL_NAMES.get(model_name, (None, None))[0]
    if not files or where is None or callable(where):
        return {}
    return {k: Path(where) / f for k, f in files.items() if (Path(where) / f).is_file()}


def resolve_weights(spec: str | PathLike | None, model_name: str) -> str | None:
    """A weights argument as given by a user: a path, or ``shipped`` / ``shipped:NAME``."""
    if spec is None or not str(spec).startswith("shipped"):
        return None if spec is None else str(spec)
    name = str(spec).partition(":")[2] or "default"
    have = shipped_weights(model_name)
    if name not in have:
        raise FileNotFoundError(
            f"weights {spec!r}: model {model_name!r} ships "
            + (", ".join(f"shipped:{k}" for k in have) if have else "no feedback weights")
        )
    return str(have[name])


def _tiny_random_dit() -> nn.Module:
    """A randomly initialised 12-block pixel-space DiT, built at run time (no bundled model yet)."""
    from diffusers import DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiTTransformer2DModel(
            num_attention_heads=4,
            attention_head_dim=16,
            in_channels=1,
            out_channels=1,
            num_layers=12,
            sample_size=16,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_type="ada_norm_zero",
        )
    return model.eval()


ASSETS = Path(__file__).parent / "assets"

# short name -> (directory or builder, description)
MODEL_NAMES = {
    "fashion-dit": (
        ASSETS / "fashion-dit",
        "the bundled 12-block DiT trained on Fashion-MNIST (16x16, pixel space, 10 classes)",
    ),
    "tiny-random": (
        _tiny_random_dit,
        "randomly initialised 12-block DiT (16x16x1, 10 classes), built at run time; random weights",
    ),
}


@dataclass
class Model:
    """A transformer with what sampling from it needs."""

    transformer: nn.Module
    scheduler: Any
    vae: nn.Module | None = None
    pipeline: Any = None
    name: str = ""
    note: str = ""
    default_guidance: float | None = None
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = model_kind(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def guidance(self) -> float:
        """The guidance scale used when a call gives none: the model's recorded default, else the
        diffusers pipeline's own default."""
        return self.default_guidance if self.default_guidance is not None else DEFAULT_GUIDANCE[self.kind]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def image_size(self) -> int:
        s = self.transformer.config.sample_size
        return s * (2 ** (len(self.vae.config.block_out_channels) - 1)) if self.vae is not None else s

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Model:
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            self.transformer.to(**kw)
        if self.vae is not None and device is not None:
            self.vae.to(device=device)
        return self


def _scheduler_from_config(cfg: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)


def load_model(
    source: str | PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Model:
    """Loads a built-in model by name or a local diffusers pipeline / transformer directory."""
    import diffusers

    name = str(source)
    if name in MODEL_NAMES:
        where, desc = MODEL_NAMES[name]
        if callable(where):
            model = Model(where(), _scheduler_from_config(DEFAULT_SCHEDULER), name=name, note=desc)
            return model.to(device, dtype)
        if not (Path(where) / "config.json").is_file():
            raise FileNotFoundError(f"built-in model {name!r}: its files are missing from {where}")
        model = load_model(where, device=device, dtype=dtype)
        model.name, model.note = name, desc
        return model
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name!r}: not a directory and not a built-in name (built-in: {', '.join(MODEL_NAMES)})"
        )
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        model = to_model(pipe)
        model.name = name
        return model.to(device)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model {name!r}: no model_index.json or config.json in {path}")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    cls = getattr(diffusers, str(cls_name), None)
    if cls is None or cls_name not in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        raise ValueError(
            f"unsupported model: {cls_name}; supported: DiTTransformer2DModel, PixArtTransformer2DModel"
        )
    transformer = cls.from_pretrained(
        path, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
    ).eval()
    sched_file = path / "scheduler_config.json"
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.is_file() else DEFAULT_SCHEDULER
    model = Model(transformer, _scheduler_from_config(sched_cfg), name=name)
    defaults = path / "ilf_defaults.json"  # e.g. the guidance scale a sweep chose for this model
    if defaults.is_file():
        model.default_guidance = json.loads(defaults.read_text()).get("guidance_scale")
    return model.to(device)


def to_model(obj: Any) -> Model:
    """Wraps a pipeline or a bare transformer into a `Model`."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, (str, PathLike)):
        return load_model(obj)
    transformer = unwrap_transformer(obj)
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"expected a pipeline, a transformer or a model path, got {type(obj).__name__}")
    model_kind(transformer)
    is_pipe = transformer is not obj
    sched = obj.scheduler if is_pipe else _scheduler_from_config(DEFAULT_SCHEDULER)
    vae = getattr(obj, "vae", None) if is_pipe else None
    return Model(transformer, sched, vae=vae, pipeline=obj if is_pipe else None)


@dataclass
class SampleOutput:
    """Images in [0, 1] as (B, C, H, W) float32 on the CPU, plus what produced them."""

    images: torch.Tensor
    latents: torch.Tensor
    seeds: list[int]
    labels: list[Any]
    seconds: float
    info: dict[str, Any]


def load_prompt_embeds(path: str | PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file of PixArt prompt embeddings: ``prompt_embeds`` (N, tokens, channels) and
    optionally ``prompt_attention_mask`` and the ``negative_*`` pair."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        d = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--prompt-embeds {path}: cannot read ({e})") from None
    if "prompt_embeds" not in d:
        raise ValueError(f"--prompt-embeds {path}: no 'prompt_embeds' tensor (found {sorted(d)})")
    return d


def _encode_prompts(model: Model, prompts: list[str], negative_prompt: str, guided: bool):
    pipe = model.pipeline
    if (
        pipe is None
        or getattr(pipe, "text_encoder", None) is None
        or getattr(pipe, "tokenizer", None) is None
    ):
        raise ValueError("text prompts need a pipeline with a text encoder; pass prompt_embeds instead")
    with torch.no_grad():
        return pipe.encode_prompt(prompts, guided, negative_prompt=negative_prompt, device=model.device)


def decode(model: Model, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1] through the VAE, or straight from pixel space."""
    if model.vae is not None:
        with torch.no_grad():
            x = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    else:
        x = latents
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


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
    """Samples images from a DiT or PixArt model with this project's own loop.

    Args:
        model: a pipeline, a transformer, a `Model`, a model directory or a built-in model name.
        class_labels: DiT class ids, one image each.
        prompts / prompt_embeds (+ masks): PixArt conditioning, one image each; prompts go through
            the pipeline's own text encoder.
        num_steps: solver steps.
        guidance_scale: classifier-free guidance (> 1 to apply); default: the pipeline's default.
        seeds: one noise seed per image; default ``seed, seed + 1, ...``.
        solver: ``"ddim"`` or ``"dpmpp_2m"``; default: the scheduler's own kind.
        scheduler: a diffusers scheduler (or config) to take the noise schedule from.
        ilf: an `ILFConfig` or feedback weights file to apply for this call (removed afterwards);
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
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if cuda_graph and m.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {m.device}")

    # conditioning, one entry per image
    if m.kind == "dit":
        if class_labels is None or prompts is not None or prompt_embeds is not None:
            raise ValueError("DiT models take class_labels (and no prompts)")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        count = labels.numel()
    else:
        if class_labels is not None:
            raise ValueError("PixArt models take prompts or prompt_embeds, not class_labels")
        guided = guidance_scale > 1.0
        if prompt_embeds is None:
            if not prompts:
                raise ValueError("PixArt models need prompts or prompt_embeds")
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
                _encode_prompts(m, list(prompts), negative_prompt, guided)
            )
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long)
        if guided and negative_prompt_embeds is None:
            raise ValueError("guidance needs negative_prompt_embeds when prompt_embeds are given")
        if negative_prompt_embeds is not None and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long)
        count = prompt_embeds.shape[0]
    if count == 0:
        raise ValueError("nothing to sample: no class labels or prompts given")
    seeds = list(range(seed, seed + count)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images")
    bs = count if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {bs}")

    attached = None
    if ilf is not None:
        if get_ilf(m.transformer) is not None:
            raise RuntimeError("the model already carries an ILF loop; pass ilf=None or remove it first")
        attached = apply_ilf(m.transformer, ilf)
    loop = get_ilf(m.transformer)
    try:
        slv = make_solver(m.scheduler, num_steps, solver=solver, device=m.device)
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
            if m.kind == "dit":
                cond = dit_conditioning(m.transformer, labels[lo:hi])
            else:
                cond = pixart_conditioning(
                    m.transformer,
                    prompt_embeds[lo:hi],
                    prompt_attention_mask[lo:hi],
                    None if negative_prompt_embeds is None else negative_prompt_embeds[lo:hi],
                    None if negative_prompt_attention_mask is None else negative_prompt_attention_mask[lo:hi],
                    height=m.image_size,
                    width=m.image_size,
                )
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
        "kind": m.kind,
        "solver": slv.name,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "ilf": None if loop is None else loop.config.to_dict(),
        "loop_mask": mask,
        "block_evals_per_image": evals,
        "batch_size": bs,
        "device": str(m.device),
        "cuda_graph": cuda_graph,
        "dtype": str(m.dtype).replace("torch.", ""),
    }
    labels_out: list[Any] = (
        labels.tolist() if m.kind == "dit" else list(prompts or [f"embeds[{i}]" for i in range(count)])
    )
    return SampleOutput(
        images=torch.cat(images) if images else torch.empty(0),
        latents=torch.cat(latents),
        seeds=seeds,
        labels=labels_out,
        seconds=seconds,
        info=info,
    )
