"""Tiny DiT / PixArt models, VAEs and text encoders for tests and parity reports (internal).

Built from configs in milliseconds on the CPU; every weight gets a little seeded noise so that
diffusers' zero-initialised projections do not hide a broken code path.
"""

from __future__ import annotations

import functools

import torch


def _seeded(fn):
    """Builds under a private RNG state: the caller's global RNG is left as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return wrapper


NUM_CLASSES = 10
CAPTION_CHANNELS = 12


@_seeded
def tiny_dit(
    num_layers: int = 4,
    learned_sigma: bool = True,
    in_channels: int = 4,
    num_classes: int = NUM_CLASSES,
    seed=0,
):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
    )
    _perturb_zero_inits(m)
    return m.eval()


@_seeded
def tiny_pixart(num_layers: int = 4, learned_sigma: bool = True, sample_size: int = 8, seed=0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=CAPTION_CHANNELS,
        norm_type="ada_norm_single",
    )
    _perturb_zero_inits(m)
    return m.eval()


def _perturb_zero_inits(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some projections; give every weight a little signal so that a
    broken loop or a wrong split shows up in the outputs."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@_seeded
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


@_seeded
def tiny_text_encoder():
    """A tiny T5 encoder and a word-level tokenizer, made offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "cat", "dog", "on", "the", "grass", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(words), d_model=CAPTION_CHANNELS, d_kv=4, d_ff=16, num_layers=1, num_heads=2
    )
    return tokenizer, T5EncoderModel(cfg).eval()


def ddim_scheduler(**kw):
    from diffusers import DDIMScheduler

    cfg = {"beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False}
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def dpm_scheduler(**kw):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**kw)


def prompt_inputs(batch: int, tokens: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, tokens, CAPTION_CHANNELS, generator=g)
    neg = torch.randn(batch, tokens, CAPTION_CHANNELS, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, tokens - 2 :] = 0  # padded tokens must be masked out
    return emb, mask, neg, mask.clone()
