"""The backbone trainer: a stopped and resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_backbone.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_backbone", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class _Clock:
    """A clock that advances one second per reading, so that a time budget stops at a fixed step."""

    def __init__(self):
        self._t = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self._t))


@pytest.fixture
def tb_module():
    """The script as a module, for tests that need no training data."""
    return _module()


@pytest.fixture
def tb(tb_module):
    """The script, for tests that train (on Fashion-MNIST): skipped, with the reason, without the data."""
    from ilf_runtime.fashion.data import load_fashion_mnist

    try:
        load_fashion_mnist("train")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return tb_module


def _args(tb, out, **kw):
    base = {
        "out": str(out),
        "steps": 6,
        "batch_size": 8,
        "warmup": 2,
        "size": 8,
        "width": 16,
        "heads": 2,
        "layers": 2,
        "ckpt_every": 2,
        "threads": 1,
    }
    return tb.TrainArgs(**(base | kw))


def test_stop_and_resume_matches_uninterrupted_run(tb, tmp_path, monkeypatch):
    assert tb.main(_args(tb, tmp_path / "full")) == 0
    monkeypatch.setattr(tb, "time", _Clock())
    assert tb.main(_args(tb, tmp_path / "split", max_minutes=5 / 60)) == 130  # stops after a few steps
    stopped = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < stopped < 6
    monkeypatch.undo()
    assert tb.main(_args(tb, tmp_path / "split", resume=True)) == 0
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert full["step"] == split["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], split[key][k]) for k in full[key]), key
    rows = (tmp_path / "split" / "loss.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step across both pieces
    model_dir = tmp_path / "full" / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "scheduler_config.json").is_file()


def test_resume_refuses_other_arguments(tb, tmp_path):
    tb.main(_args(tb, tmp_path / "run", steps=2))
    with pytest.raises(SystemExit, match="other arguments"):
        tb.main(_args(tb, tmp_path / "run", steps=3, resume=True))


def test_block_label_dropout_is_off(tb_module):
    tb = tb_module  # random inputs: no data needed
    model = tb.build_model(tb.TrainArgs(layers=2, width=16, heads=2, size=8)).train()
    x, t = torch.randn(64, 1, 8, 8), torch.full((64,), 500)
    y = torch.zeros(64, dtype=torch.long)
    with torch.no_grad():
        a = model(x, timestep=t, class_labels=y).sample
        b = model(x, timestep=t, class_labels=y).sample
    assert torch.equal(a, b)  # in train mode, diffusers' embedders would drop labels at random


def test_export_only_writes_the_checkpoint_ema(tb, tmp_path):
    from diffusers import DiTTransformer2DModel

    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="needs --resume"):
        tb.main(_args(tb, run, export_only=True))
    tb.main(_args(tb, run, steps=2))
    assert tb.main(_args(tb, run, steps=2, resume=True, export_only=True)) == 0
    ema = torch.load(run / "checkpoint.pt", weights_only=True)["ema"]
    got = DiTTransformer2DModel.from_pretrained(run / "model-step2").state_dict()
    assert all(torch.equal(ema[k], got[k]) for k in ema)
