"""Fashion-MNIST, offline (the IDX files of Debian's `dataset-fashion-mnist`).

Images come back as uint8 tensors (N, 28, 28) with int64 labels (N,); `to_model_range` turns them
into the (N, 1, S, S) float tensors in [-1, 1] that the pixel-space models train on. Train and test
splits are read from separate files and never mixed.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["FASHION_CLASSES", "ImageSet", "load_fashion_mnist", "read_idx", "to_model_range"]

FASHION_DIR = Path(os.environ.get("ILF_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_INSTALL_HINT = (
    "install it with `apt-get update && apt-get install -y dataset-fashion-mnist` "
    "or point ILF_FASHION_MNIST_DIR at a folder holding the four IDX .gz files"
)
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels.numel()


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Reads an IDX file (optionally gzipped): magic 0x0000 TT DD, DD big-endian int32 sizes, data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = 1
    for d in dims:
        count *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(body) != count * itemsize:
        raise ValueError(
            f"{path}: expected {count * itemsize} data bytes for shape {dims}, found {len(body)}"
        )
    t = torch.frombuffer(bytearray(body), dtype=dtype)
    if itemsize > 1:  # IDX is big-endian
        t = t.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return t.reshape(dims).clone()


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageSet:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) split from the Debian package's IDX files."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_DIR
    stem = "train" if split == "train" else "t10k"
    img, lab = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
    for p in (img, lab):
        if not p.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {p} is missing: {_INSTALL_HINT}")
    images, labels = read_idx(img), read_idx(lab).long()
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Fashion-MNIST {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} disagree"
        )
    return ImageSet(images, labels, FASHION_CLASSES)


def to_model_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [-1, 1], area-resized when size differs."""
    x = images.float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, H, W)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x
