"""Prompt accuracy of the text-to-image demo, in the spirit of GenEval: does each image show the
garment class and the colour its prompt names?

- class: the shipped Fashion-MNIST classifier on the image's intensity (its largest channel);
- colour: the garment's mean chromaticity (pixels brighter than `GARMENT_LEVEL`, each divided by its
  intensity, weighted by it) matched to the nearest of `captions.COLOURS`;
- full prompt: both right.

Each is a share with its standard error. Prompts `captions.parse` cannot read (an unknown garment or
colour) are counted as unscored, not as errors. `ceiling` scores rendered ground-truth images (what
a perfect generator would get); `shuffled` scores images against prompts shuffled among them (a
control that must sit near chance: 10% class, 17% colour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ilf_runtime.fashion.captions import parse
from ilf_runtime.fashion.classifier import load_fashion_classifier
from ilf_runtime.fashion.scenes import colour_table

__all__ = ["GARMENT_LEVEL", "predict", "prompt_accuracy", "shuffled"]

GARMENT_LEVEL = 0.25  # intensity above which a pixel counts as garment


@torch.no_grad()
def predict(images: torch.Tensor, classifier: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, colour index) seen in each RGB image in [0, 1], (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    clf = classifier or load_fashion_classifier()
    x = images.float().clamp(0, 1)
    v = x.amax(1, keepdim=True)  # (N, 1, H, W) intensity
    classes = torch.cat([clf(v[i : i + 1000]).argmax(1) for i in range(0, len(v), 1000)])
    w = v * (v > GARMENT_LEVEL)  # (N, 1, H, W)
    chroma = (x / v.clamp_min(1e-6) * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-6)  # (N, 3)
    colours = torch.cdist(chroma, colour_table()).argmin(1)
    return classes, colours


def _share(hits: torch.Tensor) -> dict[str, float]:
    n = hits.numel()
    p = float(hits.float().mean()) if n else float("nan")
    return {"acc": p, "se": math.sqrt(p * (1 - p) / n) if n else float("nan")}


def prompt_accuracy(images: torch.Tensor, prompts: Sequence[str], classifier: Any = None) -> dict[str, Any]:
    """Class, colour and full-prompt accuracy of images in [0, 1] against their prompts."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    truth = [parse(p) for p in prompts]
    keep = [i for i, t in enumerate(truth) if t is not None]
    out: dict[str, Any] = {"n": len(keep), "unscored": len(prompts) - len(keep)}
    if not keep:
        return out | {k: {"acc": float("nan"), "se": float("nan")} for k in ("class", "colour", "full")}
    cls, col = predict(images[keep], classifier)
    want_cls = torch.tensor([truth[i][0] for i in keep])
    want_col = torch.tensor([truth[i][1] for i in keep])
    ok_cls, ok_col = cls == want_cls, col == want_col
    return out | {"class": _share(ok_cls), "colour": _share(ok_col), "full": _share(ok_cls & ok_col)}


def shuffled(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """The prompts in a random order (the chance-level control)."""
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    return [prompts[i] for i in perm.tolist()]
