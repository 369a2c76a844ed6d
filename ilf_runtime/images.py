"""Image grids as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch

__all__ = ["make_grid", "save_grid", "save_images"]


def make_grid(images: torch.Tensor, nrow: int, *, pad: int = 2, min_cell: int = 64) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> one (C, H', W') grid, `nrow` images per row, small images
    enlarged by an integer factor (nearest neighbour) to at least `min_cell` pixels."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    k = max(1, -(-min_cell // max(h, w)))
    if k > 1:
        images = images.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
        h, w = h * k, w * k
    ncol = max(1, nrow)
    rows = -(-b // ncol)
    grid = torch.ones(c, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = images[i]
    return grid


def save_grid(
    images: torch.Tensor, path: str | PathLike, nrow: int, *, row_labels: Sequence[str] | None = None, **kw
) -> Path:
    """Writes `make_grid(images, nrow)` as an 8-bit PNG (grey for one channel, RGB for three); with
    `row_labels` (one per row: a class name, a prompt), each row's label is written to its left."""
    from PIL import Image, ImageDraw

    grid = make_grid(images.float().cpu().clamp(0, 1), nrow, **kw)
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.shape[2] != 3:
        arr = arr[:, :, :3]
    img = Image.fromarray(arr)
    if row_labels:
        rows = -(-images.shape[0] // max(1, nrow))
        if len(row_labels) != rows:
            raise ValueError(f"row_labels: {len(row_labels)} labels for {rows} rows")
        margin = 6 * max(len(t) for t in row_labels) + 8
        canvas = Image.new(
            img.mode, (img.width + margin, img.height), color=255 if img.mode == "L" else (255,) * 3
        )
        canvas.paste(img, (margin, 0))
        draw, row_h = ImageDraw.Draw(canvas), img.height / rows
        for r, text in enumerate(row_labels):
            draw.text((4, int(r * row_h + row_h / 2) - 5), text, fill=0 if img.mode == "L" else (0, 0, 0))
        img = canvas
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_images(images: torch.Tensor, folder: str | PathLike, texts: Sequence[dict[str, str]]) -> list[Path]:
    """Writes each image of (B, C, H, W) in [0, 1] as ``folder/00000.png`` (8-bit grey or RGB, no
    enlargement), with ``texts[i]`` (seed, label or prompt, sampler settings) as PNG text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if images.ndim != 4 or len(texts) != images.shape[0]:
        raise ValueError(f"save_images: {len(texts)} text records for images of shape {tuple(images.shape)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = (images.float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, (a, t) in enumerate(zip(arr, texts)):
        info = PngInfo()
        for k, v in t.items():
            info.add_itxt(k, str(v))  # iTXt: UTF-8, so any prompt survives
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        paths.append(folder / f"{i:05d}.png")
        img.save(paths[-1], pnginfo=info)
    return paths
