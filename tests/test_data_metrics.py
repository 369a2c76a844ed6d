"""Data readers on synthetic IDX files, and the metrics on controlled inputs."""

from __future__ import annotations

import gzip
import json
import struct

import pytest
import torch

from ilf_runtime.fashion.classifier import CLASSIFIER_DIR, class_accuracy, load_fashion_classifier
from ilf_runtime.fashion.data import load_fashion_mnist, read_idx, to_model_range
from ilf_runtime.metrics import Gaussian, fid_from_features, fid_with_spread, paired_psnr


def _write_idx(path, array: torch.Tensor, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    body = array.numpy().astype(array.numpy().dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_read_idx_round_trip_and_errors(tmp_path):
    imgs = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    _write_idx(tmp_path / "a.gz", imgs)
    assert torch.equal(read_idx(tmp_path / "a.gz"), imgs)
    ints = torch.tensor([[1, -2, 70000]], dtype=torch.int32)
    _write_idx(tmp_path / "b", ints, code=0x0C)
    assert torch.equal(read_idx(tmp_path / "b"), ints)  # big-endian int32
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / "a.gz").read_bytes()
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(gzip.decompress(raw)[:-10])
    with pytest.raises(ValueError, match="expected 3920 data bytes"):
        read_idx(tmp_path / "short.gz")


def test_fashion_reader_on_synthetic_files_and_missing_files(tmp_path):
    imgs = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (7,), dtype=torch.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    test = load_fashion_mnist("test", root=tmp_path)
    assert (
        torch.equal(test.images, imgs) and torch.equal(test.labels, labels.long()) and len(test.classes) == 10
    )
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)
    x = to_model_range(imgs, 16)
    assert x.shape == (7, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_fid_is_zero_on_itself_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert fid_from_features(a, a) < 1e-6
    b = a + 0.0
    fids = [fid_from_features(a, b + s * torch.randn(b.shape, generator=g)) for s in (0.1, 0.5, 1.0)]
    assert fids[0] < fids[1] < fids[2]
    shifted = fid_from_features(a, a + 1.0)  # mean shift by 1 in each of 8 dims
    assert abs(shifted - 8.0) < 1e-6
    spread = fid_with_spread(b, Gaussian.fit(a), subsets=4)
    assert spread["subset_n"] == 500 and len(spread["subsets"]) == 4 and spread["subset_std"] > 0


def test_paired_psnr():
    ref = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    same = paired_psnr(ref, ref)
    assert same["psnr"] == 100.0 and same["mae"] == 0.0
    noisy = (ref + 0.01).clamp(0, 1)
    p = paired_psnr(noisy, ref)
    assert 38 < p["psnr"] < 41 and p["n"] == 4 and p["psnr_se"] >= 0
    with pytest.raises(ValueError, match="same shape"):
        paired_psnr(ref[:2], ref)


@pytest.mark.skipif(not (CLASSIFIER_DIR / "model.safetensors").is_file(), reason="classifier not trained yet")
def test_shipped_classifier_accuracy_on_real_test_images():
    try:
        test = load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    clf = load_fashion_classifier()
    recorded = json.loads((CLASSIFIER_DIR / "config.json").read_text())["test_accuracy"]
    x = test.images.float().div(255).unsqueeze(1)  # the whole test split, as recorded
    acc = class_accuracy(clf, x, test.labels)
    assert abs(acc - recorded) < 1e-3, (acc, recorded)
    shuffled = class_accuracy(clf, x, test.labels.roll(1))
    assert shuffled < 0.3  # the accuracy measures the labels, not the images alone


def test_user_supplied_feature_network_plugs_into_fid():
    """Stands in for an Inception network loaded from local weights: any module works."""
    from ilf_runtime.metrics import TorchFeatures, fid

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(2))
    feats = TorchFeatures(net, size=32)
    grey = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert feats(grey).shape == (64, 16)  # grey repeated to 3 channels, resized, flattened
    assert fid(feats, grey, grey) < 1e-6
    assert fid(feats, grey, (grey * 0.5).clamp(0, 1)) > fid(feats, grey, (grey * 0.95).clamp(0, 1))
