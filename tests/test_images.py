"""Image grids (images.py): exact layout, enlargement, the PNG written, row labels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ilf_runtime.images import make_grid, save_grid


def _cells(b: int, c: int = 1, h: int = 3, w: int = 2) -> torch.Tensor:
    """Image i filled with the value i / 10 (distinct, in [0, 1])."""
    return torch.arange(b, dtype=torch.float32).div(10).view(b, 1, 1, 1).expand(b, c, h, w).clone()


def test_grid_layout_is_exact():
    imgs = _cells(5, c=3)  # 5 images of 3x2, 2 per row: 3 rows, the last one half empty
    grid = make_grid(imgs, nrow=2, pad=1, min_cell=1)
    assert grid.shape == (3, 3 * (3 + 1) + 1, 2 * (2 + 1) + 1)
    want = torch.ones(3, 13, 7)  # background (padding and the empty cell) is white
    for i in range(5):
        r, q = divmod(i, 2)
        want[:, 1 + r * 4 : 1 + r * 4 + 3, 1 + q * 3 : 1 + q * 3 + 2] = i / 10
    assert torch.equal(grid, want)
    assert torch.equal(make_grid(imgs[:1], nrow=0, pad=0, min_cell=1), imgs[0])  # nrow < 1: one per row


def test_small_images_are_enlarged_by_an_integer_factor():
    img = torch.rand(1, 1, 5, 4, generator=torch.Generator().manual_seed(0))
    grid = make_grid(img, nrow=1, pad=0, min_cell=12)  # ceil(12 / 5) = 3
    assert grid.shape == (1, 15, 12)
    assert torch.equal(grid, img[0].repeat_interleave(3, 1).repeat_interleave(3, 2))  # nearest neighbour
    assert make_grid(img, nrow=1, pad=0, min_cell=5).shape == (1, 5, 4)  # large enough: as is


def test_grid_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\), got \(3, 4, 4\)"):
        make_grid(torch.zeros(3, 4, 4), nrow=1)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB"), (4, "RGB")])
def test_png_holds_the_grid_in_8_bits(tmp_path, channels, mode):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(3, channels, 4, 4, generator=g) * 1.4 - 0.2  # some values outside [0, 1]
    path = save_grid(imgs, tmp_path / "sub" / "dir" / "g.png", nrow=3, pad=2, min_cell=1)
    assert path == tmp_path / "sub" / "dir" / "g.png"  # parent folders created
    with Image.open(path) as im:
        assert im.mode == mode and im.size == (3 * 6 + 2, 6 + 2)
        got = np.asarray(im)
    grid = make_grid(imgs.clamp(0, 1), nrow=3, pad=2, min_cell=1)[:3]  # clamped; alpha dropped
    want = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want[:, :, 0] if channels == 1 else want)


def test_row_labels_are_drawn_left_of_an_unchanged_grid(tmp_path):
    imgs = torch.zeros(4, 1, 8, 8)  # black cells
    plain = save_grid(imgs, tmp_path / "plain.png", nrow=2, min_cell=8)
    labelled = save_grid(imgs, tmp_path / "lab.png", nrow=2, min_cell=8, row_labels=["shirt", "a long label"])
    with Image.open(plain) as a, Image.open(labelled) as b:
        pa, pb = np.asarray(a), np.asarray(b)
    margin = 6 * len("a long label") + 8
    assert pb.shape == (pa.shape[0], pa.shape[1] + margin)
    np.testing.assert_array_equal(pb[:, margin:], pa)  # the grid itself is untouched
    left = pb[:, :margin]
    half = pa.shape[0] // 2
    assert (left[:half] < 128).any() and (left[half:] < 128).any()  # text in each row's band
    with pytest.raises(ValueError, match="row_labels: 3 labels for 2 rows"):
        save_grid(imgs, tmp_path / "x.png", nrow=2, row_labels=["a", "b", "c"])
