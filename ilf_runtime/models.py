"""Model adapters: everything that differs between the backbone kinds this runtime supports.

A diffusion transformer is resolved once, at the public entry point that receives it (`apply_ilf`,
`sample`, `load_model`, `apply_fused_blocks`, `apply_cache`), into its `ModelAdapter`; the layers
below receive the adapter (directly, or inside a `Conditioning` or `registry.Model`) and never ask
for the kind again. An adapter is stateless and owns:

- which diffusers class it serves and what counts as a supported checkpoint (`check`);
- the conditioning: class labels (DiT) or prompt embeddings and masks (PixArt), stacked for
  classifier-free guidance the way the diffusers pipeline does (`conditioning`, `condition_set`);
- the guidance split and the learned-sigma drop (`guided_eps`: DiT guides the epsilon channels,
  PixArt all channels);
- the arguments its blocks are built with (`block_kwargs`, for the ILF feedback block);
- how the feedback block gets a shifted timestep (`feedback_kwargs`);
- the adaLN modulation of its blocks for the fused forward (`modulation`);
- its default guidance scale.

Adding a kind is one subclass registered in `ADAPTERS`, plus its tests (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "ADAPTERS",
    "CACHE_ATTR",
    "LOOP_ATTR",
    "Conditioning",
    "DiTAdapter",
    "ModelAdapter",
    "PixArtAdapter",
    "adapter_for",
    "adapter_for_class",
    "load_prompt_embeds",
    "read_prompts",
    "resolve",
    "unwrap_transformer",
]

# Attributes this runtime puts on a transformer instance (and nothing else)
LOOP_ATTR = "ilf_loop"  # the `ilf.FeedbackLoop` submodule registered by `apply_ilf`
CACHE_ATTR = "_ilf_cache"  # the `caches.Cache` of `apply_cache` (in __dict__, not a submodule)

PROMPT_KEYS = (
    "prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_embeds",
    "negative_prompt_attention_mask",
)


@dataclass
class Conditioning:
    """Model inputs other than the latents and the timestep, for one batch.

    For guidance the inputs are stacked in the order the diffusers pipelines use, once, before the
    loop: ``model_kwargs`` holds the batch-doubled tensors (None when the inputs cannot be guided),
    ``model_kwargs_unguided`` the plain ones.
    """

    adapter: ModelAdapter
    model_kwargs: dict[str, Any] | None
    model_kwargs_unguided: dict[str, Any]

    def kwargs(self, guided: bool) -> dict[str, Any]:
        return self.model_kwargs if guided else self.model_kwargs_unguided


def _guide(out: torch.Tensor, scale: float, uncond_first: bool) -> torch.Tensor:
    first, second = out.chunk(2)
    cond, uncond = (second, first) if uncond_first else (first, second)
    return uncond + scale * (cond - uncond)


def unwrap_transformer(model: Any) -> nn.Module:
    """A pipeline's transformer, or the model itself."""
    inner = getattr(model, "transformer", None)
    return inner if isinstance(inner, nn.Module) and not isinstance(model, nn.Module) else model


class ModelAdapter:
    """What one backbone kind does its own way; subclasses are stateless singletons."""

    name: ClassVar[str]  # short kind name, as recorded in results files
    transformer_class: ClassVar[str]  # the diffusers class it serves
    norm_type: ClassVar[str]  # the `BasicTransformerBlock.norm_type` of its blocks
    default_guidance: ClassVar[float]  # the diffusers pipeline's own default guidance scale
    class_conditional: ClassVar[bool]  # class labels (True) or prompt embeddings (False)
    uncond_first: ClassVar[bool]  # order of the guidance halves in the batch
    last_step_predicts_x0: ClassVar[bool] = False  # a one-step run returns the x0 prediction

    # -- identity ------------------------------------------------------------------------------
    def matches(self, transformer: nn.Module) -> bool:
        return any(c.__name__ == self.transformer_class for c in type(transformer).__mro__)

    def check(self, transformer: nn.Module) -> None:
        """Raises ValueError unless the checkpoint's blocks are the kind this runtime drives."""
        blocks = getattr(transformer, "transformer_blocks", None)
        if not blocks:
            raise ValueError(f"{self.transformer_class}: expected non-empty transformer_blocks")
        got = getattr(blocks[0], "norm_type", None)
        if got != self.norm_type:
            raise ValueError(
                f"{self.transformer_class}: expected blocks with norm_type {self.norm_type!r}, got {got!r}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def stock_pipeline(self, transformer: nn.Module, vae: Any, scheduler: Any) -> Any:
        """The stock diffusers pipeline of this kind around these parts (those it can take alone)."""
        raise NotImplementedError

    # -- conditioning --------------------------------------------------------------------------
    def num_classes(self, transformer: nn.Module) -> int | None:
        """Class count of a class-conditional model, else None."""
        return None

    def conditioning(
        self, transformer: nn.Module, *, height: int | None = None, width: int | None = None, **items: Any
    ) -> Conditioning:
        """One batch's `Conditioning` from per-image items (the keys of `condition_set`); `height` and
        `width` are the image size, for models conditioned on it."""
        raise NotImplementedError

    def condition_set(
        self,
        model: Any,
        *,
        prompts: Sequence[str] | None = None,
        prompt_embeds: str | PathLike | None = None,
        guided: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Every distinct condition of a `registry.Model` as per-item tensors (first dimension: the
        condition), for the trainer and the benchmark to draw from."""
        raise NotImplementedError

    def sample_items(self, model: Any, guided: bool, **inputs: Any) -> dict[str, torch.Tensor]:
        """The user's `sample(...)` conditioning arguments as per-image tensors, checked."""
        raise NotImplementedError

    # -- the model call ------------------------------------------------------------------------
    def guided_eps(self, out: torch.Tensor, guided: bool, scale: float, c_lat: int) -> torch.Tensor:
        """The transformer's output to the (guided) model output on the latent channels."""
        raise NotImplementedError

    def block_kwargs(self, transformer: nn.Module) -> dict[str, Any]:
        """The arguments the backbone builds each of its `BasicTransformerBlock`s with."""
        c = transformer.config
        return {
            "dim": transformer.inner_dim,
            "num_attention_heads": c.num_attention_heads,
            "attention_head_dim": c.attention_head_dim,
            "dropout": c.dropout,
            "activation_fn": c.activation_fn,
            "num_embeds_ada_norm": c.num_embeds_ada_norm,
            "attention_bias": c.attention_bias,
            "upcast_attention": c.upcast_attention,
            "norm_type": c.norm_type,
            "norm_elementwise_affine": c.norm_elementwise_affine,
            "norm_eps": c.norm_eps,
        }

    def feedback_kwargs(
        self, transformer: nn.Module, block_kwargs: dict[str, Any], model_inputs: dict[str, Any], shift: int,
        h: torch.Tensor,
    ) -> dict[str, Any]:  # fmt: skip
        """The keyword arguments of the feedback block: the loop blocks' own, with the timestep
        moved back by `shift` (clamped at 0). `model_inputs` holds the transformer call's
        ``timestep`` and ``added_cond_kwargs``; `h` is the loop input (B, T, D)."""
        raise NotImplementedError

    def modulation(
        self,
        block: nn.Module,
        h: torch.Tensor,
        timestep: torch.Tensor | None,
        class_labels: torch.Tensor | None,
    ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor | None], float, float]:
        """For the fused block forward: the six adaLN chunks (shift_msa, scale_msa, gate_msa,
        shift_mlp, scale_mlp, gate_mlp), each (B, D); the per-block table rows added to them in the
        kernel (or None); and the epsilons of the two layer norms."""
        raise NotImplementedError


class DiTAdapter(ModelAdapter):
    """`DiTTransformer2DModel`: class labels, adaLN-Zero blocks that embed (timestep, class) themselves."""

    name = "dit"
    transformer_class = "DiTTransformer2DModel"
    norm_type = "ada_norm_zero"
    default_guidance = 4.0
    class_conditional = True
    uncond_first = False  # DiTPipeline stacks (conditional, null class)

    def num_classes(self, transformer: nn.Module) -> int:
        return transformer.config.num_embeds_ada_norm

    def conditioning(
        self, transformer: nn.Module, *, height: int | None = None, width: int | None = None, **items: Any
    ) -> Conditioning:
        """Class labels plus the null class (index ``num_embeds_ada_norm``) for guidance."""
        if set(items) != {"class_labels"}:
            raise ValueError(f"DiT models take class_labels only, got {sorted(items)}")
        num_classes = self.num_classes(transformer)
        labels = torch.as_tensor(items["class_labels"], dtype=torch.long).reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"class labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
        labels = labels.to(next(transformer.parameters()).device)
        null = torch.full_like(labels, num_classes)
        return Conditioning(self, {"class_labels": torch.cat([labels, null])}, {"class_labels": labels})

    def stock_pipeline(self, transformer: nn.Module, vae: Any, scheduler: Any) -> Any:
        from diffusers import DiTPipeline

        return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)

    def condition_set(self, model: Any, *, prompts=None, prompt_embeds=None, guided: bool = False):
        if prompts or prompt_embeds:
            raise ValueError("this is a class-conditional DiT model: it takes class labels, not prompts")
        return {"class_labels": torch.arange(self.num_classes(model.transformer))}

    def sample_items(self, model: Any, guided: bool, **inputs: Any) -> dict[str, torch.Tensor]:
        labels = inputs.pop("class_labels", None)
        given = sorted(k for k, v in inputs.items() if v is not None and k != "negative_prompt")
        if labels is None or given:
            raise ValueError("DiT models take class_labels (and no prompts)")
        return {"class_labels": torch.as_tensor(labels, dtype=torch.long).reshape(-1)}

    def guided_eps(self, out: torch.Tensor, guided: bool, scale: float, c_lat: int) -> torch.Tensor:
        eps = out[:, :c_lat]  # DiTPipeline guides the epsilon channels, then drops learned sigma
        return _guide(eps, scale, self.uncond_first) if guided else eps

    def feedback_kwargs(self, transformer, block_kwargs, model_inputs, shift, h):
        if shift == 0:
            return block_kwargs
        return block_kwargs | {"timestep": (block_kwargs["timestep"] - shift).clamp_min(0)}

    def modulation(self, block, h, timestep, class_labels):
        n1 = block.norm1  # adaLN-Zero: the block embeds (timestep, class) itself
        emb = n1.linear(n1.silu(n1.emb(timestep, class_labels, hidden_dtype=h.dtype)))  # (B, 6 * D)
        return emb.chunk(6, dim=1), (None,) * 6, n1.norm.eps, block.norm3.eps  # chunks: row stride 6 * D


class PixArtAdapter(ModelAdapter):
    """`PixArtTransformer2DModel` (alpha and sigma): prompt embeddings with masks, adaLN-single."""

    name = "pixart"
    transformer_class = "PixArtTransformer2DModel"
    norm_type = "ada_norm_single"
    default_guidance = 4.5
    class_conditional = False
    uncond_first = True  # the PixArt pipelines stack (negative, positive)
    last_step_predicts_x0 = True  # PixArt's one-step (DMD) path returns the x0 prediction

    def stock_pipeline(self, transformer: nn.Module, vae: Any, scheduler: Any) -> Any:
        raise ValueError(
            "a PixArt pipeline needs its text encoder and tokenizer: load the model with load_model "
            "(a directory naming its encoder in ilf_defaults.json) or diffusers' from_pretrained"
        )

    def caption_channels(self, transformer: nn.Module) -> int:
        c = transformer.config
        return c.caption_channels if c.caption_channels is not None else c.cross_attention_dim

    def conditioning(
        self, transformer: nn.Module, *, height: int | None = None, width: int | None = None, **items: Any
    ) -> Conditioning:
        """Prompt embeddings and masks, (negative, positive) for guidance, plus the resolution and
        aspect-ratio conditions when the transformer uses them (PixArt-alpha 1024)."""
        unknown = sorted(set(items) - set(PROMPT_KEYS))
        if unknown or "prompt_embeds" not in items:
            raise ValueError(f"PixArt models take {', '.join(PROMPT_KEYS)}; got {sorted(items)}")
        prompt_embeds = items["prompt_embeds"]
        prompt_attention_mask = items.get("prompt_attention_mask")
        negative_prompt_embeds = items.get("negative_prompt_embeds")
        negative_prompt_attention_mask = items.get("negative_prompt_attention_mask")
        p = next(transformer.parameters())
        if prompt_embeds.ndim != 3:
            raise ValueError(
                f"prompt_embeds must be (batch, tokens, channels), got {tuple(prompt_embeds.shape)}"
            )
        want = self.caption_channels(transformer)
        if prompt_embeds.shape[-1] != want:
            raise ValueError(
                f"prompt_embeds have {prompt_embeds.shape[-1]} channels, this transformer expects {want}"
            )
        if prompt_attention_mask is None or prompt_attention_mask.shape != prompt_embeds.shape[:2]:
            got = None if prompt_attention_mask is None else tuple(prompt_attention_mask.shape)
            raise ValueError(f"prompt_attention_mask must be {tuple(prompt_embeds.shape[:2])}, got {got}")
        b = prompt_embeds.shape[0]
        emb, mask = prompt_embeds.to(p.device, p.dtype), prompt_attention_mask.to(p.device)

        if transformer.use_additional_conditions and (height is None or width is None):
            raise ValueError(
                f"this {self.transformer_class} is conditioned on the image size: pass height and width"
            )

        def added(n: int) -> dict[str, Any]:
            if not transformer.use_additional_conditions:
                return {"resolution": None, "aspect_ratio": None}
            res = torch.tensor([height, width], dtype=p.dtype, device=p.device).repeat(n, 1)
            ar = torch.tensor([float(height / width)], dtype=p.dtype, device=p.device).repeat(n, 1)
            return {"resolution": res, "aspect_ratio": ar}

        unguided = {
            "encoder_hidden_states": emb,
            "encoder_attention_mask": mask,
            "added_cond_kwargs": added(b),
        }
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
        return Conditioning(self, guided, unguided)

    def condition_set(self, model: Any, *, prompts=None, prompt_embeds=None, guided: bool = False):
        if prompt_embeds:
            d = load_prompt_embeds(prompt_embeds)
        elif prompts:
            d = dict(zip(PROMPT_KEYS, encode_prompts(model, list(prompts), "", guided)))
        else:
            raise ValueError("PixArt models need prompts or a prompt embeddings file")
        emb = d["prompt_embeds"]
        out = {"prompt_embeds": emb}
        out["prompt_attention_mask"] = d.get(
            "prompt_attention_mask", torch.ones(emb.shape[:2], dtype=torch.long)
        )
        neg, neg_mask = d.get("negative_prompt_embeds"), d.get("negative_prompt_attention_mask")
        if neg is not None:
            if neg_mask is None:
                neg_mask = torch.ones(neg.shape[:2], dtype=torch.long)
            if neg.shape[0] == 1:  # one negative prompt for all
                neg, neg_mask = neg.expand_as(emb), neg_mask.expand(emb.shape[0], -1)
            out |= {"negative_prompt_embeds": neg, "negative_prompt_attention_mask": neg_mask}
        return {k: v.cpu() for k, v in out.items()}

    def sample_items(self, model: Any, guided: bool, **inputs: Any) -> dict[str, torch.Tensor]:
        if inputs.pop("class_labels", None) is not None:
            raise ValueError("PixArt models take prompts or prompt_embeds, not class_labels")
        prompts, negative_prompt = inputs.pop("prompts", None), inputs.pop("negative_prompt", "")
        if inputs.get("prompt_embeds") is None:
            if not prompts:
                raise ValueError("PixArt models need prompts or prompt_embeds")
            encoded = encode_prompts(model, list(prompts), negative_prompt, guided)
            return {k: v for k, v in zip(PROMPT_KEYS, encoded) if v is not None}
        d = {k: v for k, v in inputs.items() if v is not None}
        if "prompt_attention_mask" not in d:
            d["prompt_attention_mask"] = torch.ones(d["prompt_embeds"].shape[:2], dtype=torch.long)
        if guided and "negative_prompt_embeds" not in d:
            raise ValueError("guidance needs negative_prompt_embeds when prompt_embeds are given")
        if "negative_prompt_embeds" in d and "negative_prompt_attention_mask" not in d:
            d["negative_prompt_attention_mask"] = torch.ones(
                d["negative_prompt_embeds"].shape[:2], dtype=torch.long
            )
        return d

    def guided_eps(self, out: torch.Tensor, guided: bool, scale: float, c_lat: int) -> torch.Tensor:
        eps = _guide(out, scale, self.uncond_first) if guided else out  # all channels, then drop sigma
        return eps[:, :c_lat]

    def block_kwargs(self, transformer: nn.Module) -> dict[str, Any]:
        c = transformer.config
        return super().block_kwargs(transformer) | {
            "cross_attention_dim": c.cross_attention_dim,
            "attention_type": c.attention_type,
        }

    def feedback_kwargs(self, transformer, block_kwargs, model_inputs, shift, h):
        if shift == 0:
            return block_kwargs
        # the blocks take the adaLN-single embedding of the timestep: embed the shifted one
        t = torch.as_tensor(model_inputs["timestep"], device=h.device)
        t = (t - shift).clamp_min(0).expand(h.shape[0])
        emb = transformer.adaln_single(
            t, model_inputs.get("added_cond_kwargs"), batch_size=h.shape[0], hidden_dtype=h.dtype
        )[0]
        return block_kwargs | {"timestep": emb}

    def modulation(self, block, h, timestep, class_labels):
        mod = timestep.reshape(h.shape[0], 6, -1).unbind(1)  # the transformer's t-embedding: 6 x (B, D)
        return mod, block.scale_shift_table.unbind(0), block.norm1.eps, block.norm2.eps  # table: 6 x (D,)


ADAPTERS: dict[str, ModelAdapter] = {a.name: a for a in (DiTAdapter(), PixArtAdapter())}


def _supported() -> str:
    return ", ".join(a.transformer_class for a in ADAPTERS.values())


def adapter_for(transformer: Any) -> ModelAdapter:
    """The adapter of a transformer; anything else raises a ValueError naming the supported models."""
    for adapter in ADAPTERS.values():
        if adapter.matches(transformer):
            return adapter
    raise ValueError(f"unsupported model: {type(transformer).__name__}; supported: {_supported()}")


def adapter_for_class(class_name: str | None) -> ModelAdapter:
    """The adapter serving a diffusers class name (a checkpoint's ``_class_name``)."""
    for adapter in ADAPTERS.values():
        if adapter.transformer_class == class_name:
            return adapter
    raise ValueError(f"unsupported model: {class_name}; supported: {_supported()}")


def resolve(model: Any) -> tuple[nn.Module, ModelAdapter]:
    """(transformer, adapter) of a pipeline, a transformer or a `registry.Model`, resolved once."""
    adapter = getattr(model, "adapter", None)
    transformer = unwrap_transformer(model)
    if isinstance(adapter, ModelAdapter):
        return transformer, adapter
    if not isinstance(transformer, nn.Module):
        raise TypeError(f"expected a pipeline or a transformer, got {type(model).__name__}")
    adapter = adapter_for(transformer)
    adapter.check(transformer)
    return transformer, adapter


@functools.lru_cache(maxsize=1)
def _safetensors():
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    return SafetensorError, load_file


def load_prompt_embeds(path: str | PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file of prompt embeddings: ``prompt_embeds`` (N, tokens, channels) and
    optionally ``prompt_attention_mask`` and the ``negative_*`` pair."""
    error, load_file = _safetensors()
    try:
        d = load_file(str(path))
    except (error, OSError) as e:
        raise ValueError(f"prompt embeddings {path}: cannot read ({e})") from None
    if "prompt_embeds" not in d:
        raise ValueError(f"prompt embeddings {path}: no 'prompt_embeds' tensor (found {sorted(d)})")
    unknown = sorted(set(d) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(
            f"prompt embeddings {path}: unexpected tensors {unknown}; expected {', '.join(PROMPT_KEYS)}"
        )
    return d


def read_prompts(path: str | PathLike) -> list[str]:
    """The non-empty lines of a prompts file."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    except OSError as e:
        raise ValueError(f"prompts file {path}: cannot read ({e.strerror})") from None
    if not any(lines):
        raise ValueError(f"prompts file {path}: no prompts (expected one per line)")
    return [ln for ln in lines if ln]


def encode_prompts(model: Any, prompts: list[str], negative_prompt: str, guided: bool) -> tuple:
    """(prompt_embeds, mask, negative_prompt_embeds, negative mask) through the pipeline's own text
    encoder (`encode_prompt` of the diffusers PixArt pipelines)."""
    pipe = model.pipeline
    if (
        pipe is None
        or getattr(pipe, "text_encoder", None) is None
        or getattr(pipe, "tokenizer", None) is None
    ):
        raise ValueError("text prompts need a pipeline with a text encoder; pass prompt_embeds instead")
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts,
            guided,
            negative_prompt=negative_prompt,
            device=model.device,
            **getattr(model, "encode_kwargs", {}),
        )
