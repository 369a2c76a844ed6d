"""Bad input and faults of the trainer (issue 16, section 3): corrupted, incomplete or foreign
checkpoints, a rerun over an earlier run, temporary files left by a kill, and the message after a
non-finite loss before any checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_dit
from fixtures.files import edited_copy
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ilf_runtime.train import Distiller, TrainArgs, load_checkpoint, main
from ilf_runtime.train.checkpoint import checkpoint_hash


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dit") / "dit"
    tiny_dit(num_layers=4).save_pretrained(path)
    return str(path)


def _args(model: str, out: Path, **kw) -> TrainArgs:
    base = {"model": model, "out": str(out), "loop_start": 1, "loop_end": 2, "loop_steps": "all", "steps": 2,
            "teacher_steps": 4, "states": "teacher", "bank_size": 4, "batch_size": 2, "train_steps": 2,
            "warmup": 1, "val_samples": 2, "ckpt_every": 1, "progress": False, "device": "cpu"}  # fmt: skip
    return TrainArgs.from_flat(base | kw)


@pytest.fixture(scope="module")
def run(dit_dir, tmp_path_factory) -> tuple[TrainArgs, Path]:
    a = _args(dit_dir, tmp_path_factory.mktemp("runs") / "run")
    main(a)
    return a, Path(a.out) / "checkpoint.safetensors"


def _load(a: TrainArgs, path: Path):
    from ilf_runtime.ilf import apply_ilf
    from ilf_runtime.registry import load_model

    loop = apply_ilf(load_model(a.model).transformer, a.loop)
    params = list(loop.parameters())
    return load_checkpoint(path, loop, [p.clone() for p in params], torch.optim.AdamW(params), a)


def _variant(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    """A checkpoint edited and re-checksummed, so that the check under test is the one that fires."""

    def rehash(tensors, meta):
        meta["sha256"] = checkpoint_hash(tensors, meta)

    return edited_copy(src, dst, edit_meta, edit_tensors, rehash)


def test_flipped_byte_in_a_checkpoint_is_refused(run, tmp_path):
    a, ckpt = run
    assert _load(a, ckpt)[0] == 2
    data = bytearray(ckpt.read_bytes())
    data[-9] ^= 0x10
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint .*: checksum mismatch: the file is corrupted"):
        _load(a, bad)
    edited = tmp_path / "edited.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata()) | {"step": "1"}  # an edit without a new checksum
    save_file(load_file(str(ckpt)), str(edited), metadata=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        _load(a, edited)


@pytest.mark.parametrize(
    ("meta", "tensors", "words"),
    [
        ({"step": "100000"}, None, "step 100000 is outside 0..2 (--train-steps)"),
        ({"step": "two"}, None, "unreadable metadata"),
        ({"seconds": "nan"}, None, "training time nan is not a finite number"),
        ({"args": None}, None, "incomplete, lacks args"),
        ({"args": "[1]"}, None, "metadata 'args' must be a JSON object"),
        (None, "rng.torch", "incomplete, lacks rng.torch"),
        (None, "model.scales", "incomplete, lacks model.scales"),
        (None, "nan", "tensor 'model.scales' has shape (2,) or non-finite values"),
    ],
)
def test_incomplete_or_inconsistent_checkpoints_are_named(run, tmp_path, meta, tensors, words):
    a, ckpt = run

    def edit_meta(m):
        for k, v in (meta or {}).items():
            if v is None:
                m.pop(k)
            else:
                m[k] = v

    def edit_tensors(t):
        if tensors == "nan":
            t["model.scales"][0] = float("nan")
        elif tensors:
            t.pop(tensors)

    bad = _variant(ckpt, tmp_path / "checkpoint.safetensors", edit_meta, edit_tensors)
    with pytest.raises(ValueError) as e:
        _load(a, bad)
    assert words in str(e.value) and str(bad) in str(e.value)


def test_checkpoint_without_checksum_still_resumes_with_a_warning(run, tmp_path, caplog):
    a, ckpt = run
    old = tmp_path / "old.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    save_file(load_file(str(ckpt)), str(old), metadata=meta)
    assert _load(a, old)[0] == 2
    assert "has no checksum" in caplog.text


def test_rerun_over_an_earlier_run_is_refused_and_tmp_files_are_cleaned(run):
    a, ckpt = run
    out = Path(a.out)
    log = (out / "log.csv").read_text()
    with pytest.raises(
        ValueError, match=r"holds an earlier run \(checkpoint.safetensors, feedback.safetensors"
    ):
        main(a)
    assert (out / "log.csv").read_text() == log and ckpt.is_file()
    leftover = out / "checkpoint.safetensorsk1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main(replace(a, resume=True))["step"] == 2
    assert not leftover.exists()
    result = main(replace(a, overwrite=True))
    assert result["step"] == 2 and (out / "log.csv").read_text().count("\n") == 3


def test_non_finite_loss_before_any_checkpoint_says_so(dit_dir, tmp_path, monkeypatch):
    real = Distiller.loss

    def nan_loss(self, step):
        loss, parts = real(self, step)
        return loss * float("nan"), parts

    monkeypatch.setattr(Distiller, "loss", nan_loss)
    with pytest.raises(FloatingPointError, match=r"step 0 \(nan\); no checkpoint was written yet;") as e:
        main(_args(dit_dir, tmp_path / "run"))
    assert "step 0) is kept" not in str(e.value)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_stale_bank_cache_tmp_files_are_cleaned_fresh_ones_kept(dit_dir, tmp_path):
    """A kill during a bank write leaves bank-*.tmp in the shared cache: the next run removes the stale
    ones, and leaves alone a fresh one that another run may still be writing."""
    import os
    import time

    cache = tmp_path / "banks"
    cache.mkdir()
    stale, fresh = cache / "bank-0123.safetensorsab12.tmp", cache / "bank-4567.safetensorscd34.tmp"
    for f in (stale, fresh):
        f.write_bytes(b"half a bank")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    main(_args(dit_dir, tmp_path / "run", bank_cache=str(cache)))
    assert not stale.exists() and fresh.exists()
    assert len(list(cache.glob("bank-*.safetensors"))) == 1  # this run's bank, written whole
