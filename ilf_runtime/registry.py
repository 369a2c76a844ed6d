"""Models to sample from: the built-in ones, their shipped feedback weights, and loading.

A model is a diffusers pipeline (`DiTPipeline`, `PixArtAlphaPipeline`, `PixArtSigmaPipeline`), a
bare supported transformer, a local directory holding either (loaded with `from_pretrained`,
offline), or a short name of a built-in model (`MODEL_NAMES`). `load_model` / `to_model` resolve it
once into a `Model`, which carries the transformer, its adapter (`ilf_runtime.models`), the noise
schedule and the VAE. A bare transformer directory may hold a ``scheduler_config.json`` beside its
``config.json``; without one `DEFAULT_SCHEDULER` is used. Models without a VAE sample in pixel space.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.choices import DTYPES
from ilf_runtime.models import ModelAdapter, adapter_for_class, resolve

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SCHEDULER",
    "DTYPES",
    "MODEL_NAMES",
    "SHIPPED_WEIGHTS",
    "Model",
    "load_model",
    "resolve_weights",
    "scheduler_from_config",
    "shipped_weights",
    "to_model",
    "weights_beside",
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

# Feedback weights shipped with a built-in model: ``--weights shipped`` picks "default",
# ``--weights shipped:NAME`` another entry. Files live beside the model's own files.
SHIPPED_WEIGHTS = {
    "fashion-dit": {
        "default": "feedback.safetensors",
        "aggressive": "feedback-aggressive.safetensors",
        "dpmpp": "feedback-dpmpp.safetensors",
        "132": "feedback-132.safetensors",
        "dpmpp-132": "feedback-dpmpp-132.safetensors",
        "dpmpp-84": "feedback-dpmpp-84.safetensors",
        "uniform-132": "feedback-uniform-132.safetensors",
    },
    "fashion-t2i": {
        "default": "feedback.safetensors",
        "hand": "feedback-hand.safetensors",
        "132": "feedback-132.safetensors",
    },
}


def shipped_weights(model: str | PathLike) -> dict[str, Path]:
    """The feedback weights files shipped beside a model: a built-in name, or a model directory
    (a built-in's folder under any name, or one's own with ``feedback.safetensors`` /
    ``feedback-NAME.safetensors`` beside its config). Only files that are present."""
    entry = MODEL_NAMES.get(str(model))
    where = entry[0] if entry is not None else Path(model)
    if callable(where) or not Path(where).is_dir():
        return {}
    where = Path(where).resolve()
    for name, (d, _) in MODEL_NAMES.items():  # a built-in's folder, given by its path
        if not callable(d) and Path(d).resolve() == where and name in SHIPPED_WEIGHTS:
            files = SHIPPED_WEIGHTS[name]
            break
    else:
        files = {"default": "feedback.safetensors"} | {
            f.stem.removeprefix("feedback-"): f.name for f in sorted(where.glob("feedback-*.safetensors"))
        }
    return {k: where / f for k, f in files.items() if (where / f).is_file()}


def resolve_weights(spec: str | PathLike | None, model: str | PathLike) -> str | None:
    """A weights argument as given by a user: a path, or ``shipped`` / ``shipped:NAME`` (the files
    `shipped_weights(model)` finds beside the model)."""
    if spec is None or not str(spec).startswith("shipped"):
        return None if spec is None else str(spec)
    name = str(spec).partition(":")[2] or "default"
    have = shipped_weights(model)
    if name not in have:
        raise FileNotFoundError(
            f"weights {spec!r}: model {str(model)!r} ships "
            + (", ".join(f"shipped:{k}" for k in have) if have else "no feedback weights")
        )
    return str(have[name])


def weights_beside(spec: Any, transformer: nn.Module, name: str = "") -> Any:
    """`spec` with ``shipped`` / ``shipped:NAME`` resolved to the file beside a loaded model (a
    built-in's by `name`, else the transformer's own folder); any other spec unchanged."""
    if not (isinstance(spec, str) and spec.startswith("shipped")):
        return spec
    where = name if name in MODEL_NAMES else getattr(transformer.config, "_name_or_path", "")
    if not where:
        raise FileNotFoundError(
            f"weights {spec!r}: this model was not loaded from a folder; pass a weights file"
        )
    return resolve_weights(spec, where)


def _tiny_random_dit() -> nn.Module:
    """A randomly initialised 12-block pixel-space DiT, built at run time (for smoke tests)."""
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
    "fashion-t2i": (
        ASSETS / "fashion-t2i",
        (
            "the bundled 12-block PixArt text-to-image model: a Fashion-MNIST garment in the colour the "
            "prompt names (16x16 RGB, pixel space; text encoder all-MiniLM-L6-v2)"
        ),
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
    encode_kwargs: dict[str, Any] = field(default_factory=dict)  # for the pipeline's encode_prompt
    example_prompts: list[str] = field(default_factory=list)  # a text model's demo grid
    adapter: ModelAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.transformer, self.adapter = resolve(self.transformer)

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
        return self.default_guidance if self.default_guidance is not None else self.adapter.default_guidance

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


def scheduler_from_config(cfg: dict[str, Any]) -> Any:
    """A diffusers scheduler from its config dict (``_class_name`` picks the class, DDIM by default)."""
    import diffusers

    cls = getattr(diffusers, cfg.get("_class_name", "DDIMScheduler"), None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)


def load_model(
    source: str | PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Model:
    """Loads a built-in model by name or a local diffusers pipeline / transformer directory.

    A folder that is not a loadable DiT / PixArt model (JSON that does not parse or is not an object,
    a non-transformer pipeline, missing or truncated weights, weights that do not match its
    ``config.json``, e.g. an edited ``num_layers``) raises a one-line `ValueError` naming it."""
    name = str(source)
    where = MODEL_NAMES[name][0] if name in MODEL_NAMES else Path(source)  # a folder, or a builder
    try:
        model = _load(source, device=device, dtype=dtype)
    except FileNotFoundError:
        raise
    except (OSError, TypeError, AttributeError, KeyError, ValueError) as e:
        detail = _bad_json(Path(where)) if not callable(where) else None
        if detail is None and isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError):
            raise ValueError(f"model {name!r}: {e}") from None  # this runtime's (an unsupported checkpoint)
        detail = detail or f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        raise ValueError(f"model {name!r}: not a loadable DiT / PixArt model folder ({detail})") from None
    if not callable(where) and Path(where).is_dir():
        _check_backbone_keys(name, Path(where), model.transformer)
    return model


def _bad_json(folder: Path) -> str | None:
    """The first JSON file of a model folder (or its subfolders) that does not parse into an object."""
    if not folder.is_dir():
        return None
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        try:
            if not isinstance(json.loads(f.read_text()), dict):
                return f"{f}: expected a JSON object"
        except (ValueError, OSError) as e:
            return f"{f}: invalid JSON ({e})"
    return None


def _check_backbone_keys(name: str, folder: Path, transformer: nn.Module) -> None:
    """Refuses a backbone whose weights files lack tensors the model needs or hold ones it does not
    (diffusers would initialise the missing ones at random with only a warning)."""
    from safetensors import safe_open

    sub = folder / "transformer" if (folder / "model_index.json").is_file() else folder
    have: set[str] = set()
    for f in sorted(sub.glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            have |= set(h.keys())
    if not have:
        return
    want = set(transformer.state_dict())
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"model {name!r}: the weights in {sub} do not match its config.json: {len(missing)} tensors "
            f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "was the config edited?"
        )


def _load(source: str | PathLike, *, device: str | torch.device, dtype: torch.dtype | None) -> Model:
    import diffusers

    name = str(source)
    if name in MODEL_NAMES:
        where, desc = MODEL_NAMES[name]
        if callable(where):
            model = Model(where(), scheduler_from_config(DEFAULT_SCHEDULER), name=name, note=desc)
            return model.to(device, dtype)
        if not (Path(where) / "config.json").is_file():
            raise FileNotFoundError(f"built-in model {name!r}: its files are missing from {where}")
        model = _load(where, device=device, dtype=dtype)
        model.name, model.note = name, desc
        return model
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name!r}: not a directory and not a built-in name (built-in: {', '.join(MODEL_NAMES)})"
        )
    if (path / "model_index.json").is_file():
        pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, dtype=dtype)
        model = to_model(pipe)
        model.name = name
        return model.to(device)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model {name!r}: no model_index.json or config.json in {path}")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name")
    cls = getattr(diffusers, adapter_for_class(cls_name).transformer_class)
    transformer = cls.from_pretrained(
        path, local_files_only=True, dtype=dtype, low_cpu_mem_usage=False
    ).eval()
    sched_file = path / "scheduler_config.json"
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.is_file() else DEFAULT_SCHEDULER
    scheduler = scheduler_from_config(sched_cfg)
    # e.g. the guidance scale a sweep chose for this model, the text encoder it was trained with
    defaults_file = path / "ilf_defaults.json"
    defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
    if defaults.get("text_encoder"):
        from ilf_runtime.text_encoders import text_pipeline

        model = to_model(text_pipeline(defaults["text_encoder"], transformer, scheduler))
        model.name = name
    else:
        model = Model(transformer, scheduler, name=name)
    model.default_guidance = defaults.get("guidance_scale")
    model.example_prompts = [str(p) for p in defaults.get("example_prompts", [])]
    if "max_sequence_length" in defaults:
        model.encode_kwargs = {
            "max_sequence_length": int(defaults["max_sequence_length"]),
            "clean_caption": False,
        }
    return model.to(device)


def to_model(obj: Any) -> Model:
    """Wraps a pipeline or a bare transformer into a `Model`."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, (str, PathLike)):
        return load_model(obj)
    transformer, _ = resolve(obj)
    is_pipe = transformer is not obj
    sched = obj.scheduler if is_pipe else scheduler_from_config(DEFAULT_SCHEDULER)
    vae = getattr(obj, "vae", None) if is_pipe else None
    if getattr(vae, "is_identity", False):  # stock.PixelDecoder of a pixel-space pipeline
        vae = None
    return Model(transformer, sched, vae=vae, pipeline=obj if is_pipe else None)
