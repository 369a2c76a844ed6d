"""Quality metrics on generated samples: FID, class accuracy, paired fidelity.

- FID is the Fréchet distance between Gaussians fitted to features of two image sets. The
  feature network is any callable from images in [0, 1], (N, C, H, W), to features (N, F). For
  the bundled Fashion-MNIST model it is `FashionClassifier` (penultimate layer of a small CNN
  trained on the train split, shipped in the package); for real DiT / PixArt models pass an
  Inception network you hold locally (see `TorchFeatures`): nothing is downloaded.
- Class accuracy: the share of samples the classifier assigns to the class they were made for.
- Paired fidelity: PSNR (and mean absolute error) of a fast sampler's images against reference
  images from the same initial noise and labels, per image, with the standard error of the mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FashionClassifier",
    "Gaussian",
    "TorchFeatures",
    "class_accuracy",
    "fid",
    "fid_from_features",
    "fid_with_spread",
    "load_fashion_classifier",
    "paired_psnr",
]

ASSETS = Path(__file__).parent / "assets"
CLASSIFIER_DIR = ASSETS / "fashion-classifier"


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


class TorchFeatures:
    """Adapts a user-supplied feature network (for example an Inception-v3 built and loaded from
    local safetensors weights) to the metrics here: resizes to `size`, maps [0, 1] to the range
    the network expects, repeats grey images to 3 channels, and returns (N, F) features."""

    def __init__(self, net: nn.Module, size: int = 299, value_range: tuple[float, float] = (-1.0, 1.0)):
        self.net, self.size, self.lo, self.hi = net.eval(), size, *value_range

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.net(x * (self.hi - self.lo) + self.lo)
        return out.flatten(1)


@torch.no_grad()
def extract(
    feature_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 1000
) -> torch.Tensor:
    """Features of `images` in batches, as float64 on the CPU."""
    return torch.cat([feature_fn(images[i : i + batch]).double().cpu() for i in range(0, len(images), batch)])


@dataclass
class Gaussian:
    mean: torch.Tensor  # (F,)
    cov: torch.Tensor  # (F, F)

    @classmethod
    def fit(cls, feats: torch.Tensor) -> Gaussian:
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need (N >= 2, F) features, got {tuple(feats.shape)}")
        f = feats.double()
        return cls(f.mean(0), torch.cov(f.T))


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def fid_from_features(a: torch.Tensor | Gaussian, b: torch.Tensor | Gaussian) -> float:
    """Fréchet distance ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``."""
    ga = a if isinstance(a, Gaussian) else Gaussian.fit(a)
    gb = b if isinstance(b, Gaussian) else Gaussian.fit(b)
    root_a = _sqrtm_psd(ga.cov)
    cross = torch.linalg.eigvalsh(root_a @ gb.cov @ root_a).clamp_min(0).sqrt().sum()
    d = (ga.mean - gb.mean).square().sum() + torch.trace(ga.cov) + torch.trace(gb.cov) - 2 * cross
    return float(d.clamp_min(0))


def fid(feature_fn, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    return fid_from_features(extract(feature_fn, images_a), extract(feature_fn, images_b))


def fid_with_spread(feats: torch.Tensor, ref: torch.Tensor | Gaussian, subsets: int) -> dict[str, float]:
    """FID of all features against `ref`, and mean / std over `subsets` disjoint equal parts."""
    ref_g = ref if isinstance(ref, Gaussian) else Gaussian.fit(ref)
    n = feats.shape[0] // subsets
    parts = [fid_from_features(feats[i * n : (i + 1) * n], ref_g) for i in range(subsets)]
    mean = sum(parts) / len(parts)
    std = math.sqrt(sum((p - mean) ** 2 for p in parts) / max(1, len(parts) - 1))
    return {
        "fid": fid_from_features(feats, ref_g),
        "subset_n": n,
        "subset_mean": mean,
        "subset_std": std,
        "subsets": parts,
    }


@torch.no_grad()
def class_accuracy(
    classifier: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000
) -> float:
    preds = torch.cat([classifier(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return float((preds == labels.to(preds.device)).float().mean())


def paired_psnr(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-image PSNR (peak 1.0) and mean absolute error of `images` against `reference`, both in
    [0, 1] and paired by index; means with their standard errors. Identical pairs count as 100 dB."""
    if images.shape != reference.shape:
        raise ValueError(
            f"paired images must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}"
        )
    diff = images.double() - reference.double()
    mse = diff.square().flatten(1).mean(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, 100.0))
    mae = diff.abs().flatten(1).mean(1)
    n = psnr.numel()

    def se(x: torch.Tensor) -> float:
        return float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    return {
        "psnr": float(psnr.mean()),
        "psnr_se": se(psnr),
        "mae": float(mae.mean()),
        "mae_se": se(mae),
        "n": n,
        "per_image_psnr": psnr,
    }
