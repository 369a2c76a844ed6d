"""The Fashion-MNIST classifier shipped with the bundled model: its features feed FID, its
predictions class accuracy (`ilf_runtime.fashion.evaluate`, `ilf bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLASSIFIER_DIR", "FashionClassifier", "class_accuracy", "load_fashion_classifier"]

CLASSIFIER_DIR = Path(__file__).parents[1] / "assets" / "fashion-classifier"


class FashionClassifier(nn.Module):
    """A small CNN for 1-channel images; `features` is its 256-d penultimate activation.

    Input: images in [0, 1], (N, 1, S, S); resized to `size` by area averaging when they differ.
    """

    def __init__(self, size: int = 16, width: int = 32, feat_dim: int = 256, num_classes: int = 10):
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (size // 4) ** 2, feat_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected (N, 1, H, W) images in [0, 1], got {tuple(images.shape)}")
        x = images.float() * 2 - 1
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self._prep(images))  # (N, feat_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, classes) logits


def load_fashion_classifier(path: str | Path | None = None) -> FashionClassifier:
    """The shipped classifier (or one saved by scripts/train_classifier.py at `path`)."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else CLASSIFIER_DIR
    cfg_file, w_file = d / "config.json", d / "model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(
            f"classifier files missing in {d} (expected config.json and model.safetensors); "
            "train one with scripts/train_classifier.py"
        )
    cfg = json.loads(cfg_file.read_text())
    model = FashionClassifier(**cfg["arch"])
    model.load_state_dict(load_file(str(w_file)))
    return model.eval()


@torch.no_grad()
def class_accuracy(
    classifier: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
) -> float:
    preds = torch.cat([classifier(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((preds == labels.to(preds.device)).float().mean())
