"""Quality metrics on generated samples, for any model: FID and paired fidelity.

- FID is the Fréchet distance between Gaussians fitted to features of two image sets. The
  feature network is any callable from images in [0, 1], (N, C, H, W), to features (N, F). For
  the bundled Fashion-MNIST model it is `ilf_runtime.fashion.classifier.FashionClassifier`; for
  real DiT / PixArt models pass an Inception network you hold locally (see `TorchFeatures`):
  nothing is downloaded.
- Paired fidelity: PSNR (and mean absolute error) of a fast sampler's images against reference
  images from the same initial noise and labels, per image, with the standard error of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Gaussian",
    "TorchFeatures",
    "extract",
    "fid",
    "fid_from_features",
    "fid_with_spread",
    "paired_psnr",
]


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
