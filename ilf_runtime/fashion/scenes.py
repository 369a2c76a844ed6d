"""Rendered images of the text-to-image demo: Fashion-MNIST garments tinted with a named colour.

`tint` turns uint8 garments (N, 28, 28) and colour indices into RGB images (N, 3, S, S) in [-1, 1] on
a black background: the garment's intensity times its colour's RGB (whose largest channel is 1, so the
intensity is the largest channel). `CaptionedSet` draws (image, colour, caption) triples from one
split: seeded, pure torch, the train split avoiding `captions.HELD_OUT`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ilf_runtime.fashion.captions import COLOURS, HELD_OUT, caption, training_pairs
from ilf_runtime.fashion.data import load_fashion_mnist

__all__ = ["CaptionedSet", "colour_table", "tint"]


def colour_table() -> torch.Tensor:
    """(K, 3) RGB of `captions.COLOURS`."""
    return torch.tensor([c.rgb for c in COLOURS])


def tint(images_u8: torch.Tensor, colours: torch.Tensor, size: int = 16) -> torch.Tensor:
    """uint8 (N, H, W) garments and colour indices (N,) -> RGB (N, 3, size, size) in [-1, 1]."""
    v = images_u8.float().div(255).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
    if v.shape[-1] != size:
        v = F.interpolate(v, size=(size, size), mode="area")
    rgb = v * colour_table()[colours].view(-1, 3, 1, 1)  # (N, 3, S, S)
    return rgb * 2 - 1


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    classes: torch.Tensor  # (B,)
    colours: torch.Tensor  # (B,)
    captions: list[str]


class CaptionedSet:
    """Tinted garments of one Fashion-MNIST split with captions.

    Args:
        split: ``train`` (pairs in `captions.HELD_OUT` never drawn) or ``test`` (every pair).
        size: image side.
    """

    def __init__(self, split: str = "train", size: int = 16):
        ds = load_fashion_mnist(split)
        self.images, self.labels, self.size, self.split = ds.images, ds.labels, size, split
        pairs = training_pairs() if split == "train" else None
        # per class, the colours allowed with it
        k = len(COLOURS)
        self.allowed = [
            torch.tensor([j for j in range(k) if pairs is None or (c, j) not in HELD_OUT]) for c in range(10)
        ]

    def draw(self, n: int, g: torch.Generator, *, plain: bool = False) -> Batch:
        """n random images, each with a colour allowed for its class and a caption (random template
        and words, or the plain "a red sneaker" form)."""
        rows = torch.randint(0, len(self.labels), (n,), generator=g)
        classes = self.labels[rows]
        picks = torch.randint(0, 10**6, (n,), generator=g)
        colours = torch.stack(
            [self.allowed[int(c)][int(p) % len(self.allowed[int(c)])] for c, p in zip(classes, picks)]
        )
        caps = [caption(int(c), int(k), g, plain=plain) for c, k in zip(classes, colours)]
        return Batch(tint(self.images[rows], colours, self.size), classes, colours, caps)

    def render(self, classes: torch.Tensor, colours: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Ground-truth images for given (class, colour) pairs: a random image of each class from this
        split, tinted; the metric's ceiling is measured on these."""
        out = []
        for c in classes.tolist():
            idx = (self.labels == c).nonzero().flatten()
            out.append(idx[int(torch.randint(len(idx), (1,), generator=g))])
        return tint(self.images[torch.stack(out)], colours, self.size)
