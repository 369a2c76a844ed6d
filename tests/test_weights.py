"""Feedback weights files: round trip, metadata, and every way a file can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_dit, tiny_pixart
from safetensors.torch import load_file, save_file

from ilf_runtime import ILFConfig, apply_ilf, load_ilf_weights, remove_ilf, save_ilf_weights
from ilf_runtime.weights import WeightsError, content_hash, read_metadata

CFG = ILFConfig(loop_start=1, loop_end=2, scale_shape="channel", loop_steps="last:3", feedback_init="copy:1")


def _trained_file(tmp_path, model=None, name="fb.safetensors"):
    model = model if model is not None else tiny_dit()
    loop = apply_ilf(model, CFG)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        loop.scales.copy_(torch.randn(loop.scales.shape, generator=g))
        for p in loop.feedback.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = save_ilf_weights(
        tmp_path / name,
        model,
        sampler={"solver": "ddim", "num_steps": 10, "loop_steps": "last:3"},
        training={"steps": 5, "target": "trajectory"},
    )
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, y = torch.tensor([999, 100]), torch.tensor([0, 3])
    with torch.no_grad():
        out = model(x, timestep=t, class_labels=y).sample
    remove_ilf(model)
    return path, (x, t, y), out


def test_round_trip_reproduces_outputs(tmp_path):
    path, (x, t, y), out = _trained_file(tmp_path)
    fresh = tiny_dit()  # same seed, same backbone weights
    loop = apply_ilf(fresh, path)
    assert loop.config == CFG
    with torch.no_grad():
        again = fresh(x, timestep=t, class_labels=y).sample
    assert torch.equal(out, again)
    meta = load_ilf_weights(path).metadata
    assert meta["sampler"] == {"solver": "ddim", "num_steps": 10, "loop_steps": "last:3"}
    assert meta["training"]["target"] == "trajectory"
    assert meta["backbone_class"] == "DiTTransformer2DModel"
    assert meta["backbone_config"]["num_layers"] == 4
    assert not list(tmp_path.glob("*.tmp")), "atomic write must leave no temp file"


def test_wrong_backbone_config_names_the_difference(tmp_path):
    path, _, _ = _trained_file(tmp_path)
    other = tiny_dit(num_layers=5)
    with pytest.raises(WeightsError, match=r"another backbone.*num_layers: expected 4, found 5"):
        apply_ilf(other, path)
    assert not hasattr(other, "ilf_loop")


def test_wrong_backbone_class(tmp_path):
    path, _, _ = _trained_file(tmp_path)
    with pytest.raises(
        WeightsError, match="made for a DiTTransformer2DModel backbone, got a PixArtTransformer2DModel"
    ):
        apply_ilf(tiny_pixart(), path)


def test_truncated_file(tmp_path):
    path, _, _ = _trained_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightsError, match="truncated or corrupted|not a readable safetensors"):
        load_ilf_weights(cut)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_ilf_weights(stub)


def test_corrupted_payload_is_caught_by_checksum(tmp_path):
    path, _, _ = _trained_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside the tensor data; the header stays valid
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch.*corrupted"):
        load_ilf_weights(bad)


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    """Writes a variant of a valid file with a consistent checksum, to reach the later checks."""
    tensors = load_file(str(src))
    meta = read_metadata(src)
    raw = {
        k: (json.dumps(v) if k in ("ilf_config", "backbone_config", "sampler", "training") else v)
        for k, v in meta.items()
    }
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(raw)
    raw["content_sha256"] = content_hash(tensors)
    save_file(tensors, str(dst), metadata=raw)
    return dst


def test_missing_tensor_and_wrong_shape(tmp_path):
    path, _, _ = _trained_file(tmp_path)
    missing = _rewrite(
        path, tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop("feedback.attn1.to_q.weight")
    )
    with pytest.raises(WeightsError, match=r"missing tensors \['feedback.attn1.to_q.weight'\]"):
        apply_ilf(tiny_dit(), missing)

    def reshape(t):
        t["scales"] = torch.zeros(2, 3)

    wrong = _rewrite(path, tmp_path / "shape.safetensors", edit_tensors=reshape)
    with pytest.raises(WeightsError, match=r"'scales' has shape \(2, 3\), expected \(2, 16\)"):
        apply_ilf(tiny_dit(), wrong)


def test_not_an_ilf_file_and_bad_config(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(WeightsError, match="metadata 'format' is None, expected 'ilf-feedback'"):
        load_ilf_weights(plain)
    with pytest.raises(WeightsError, match="no such file"):
        load_ilf_weights(tmp_path / "nope.safetensors")
    path, _, _ = _trained_file(tmp_path)

    def bad_cfg(meta):
        meta["ilf_config"] = json.dumps({"loop_start": 2, "loop_end": 1})

    bad = _rewrite(path, tmp_path / "cfg.safetensors", edit_meta=bad_cfg)
    with pytest.raises(WeightsError, match="invalid ilf_config"):
        load_ilf_weights(bad)


def test_pixart_round_trip(tmp_path):
    model = tiny_pixart()
    loop = apply_ilf(model, ILFConfig(loop_start=0, loop_end=1))
    with torch.no_grad():
        loop.scales.fill_(0.25)
    path = save_ilf_weights(tmp_path / "px.safetensors", model)
    remove_ilf(model)
    loop2 = apply_ilf(tiny_pixart(), path)
    assert torch.equal(loop2.scales, torch.full((2,), 0.25))


def test_written_file_has_the_usual_mode(tmp_path):
    import os
    import stat

    from ilf_runtime.weights import save_file_atomic

    path = save_file_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob("*.tmp"))
