"""The ``final`` training target: the student's whole remaining schedule scored on its final image.

Its loss is the sampler's own final-image error (checked against `sampling.denoise`), its recomputed
(checkpointed) backward gives the gradients of a plain backward, training on it lowers it on held-out
batches, and it refuses the states it cannot start from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import test_train
import torch

from ilf_runtime import apply_ilf, remove_ilf
from ilf_runtime.distributed import DistInfo
from ilf_runtime.ilf import get_ilf
from ilf_runtime.registry import load_model
from ilf_runtime.sampling import denoise
from ilf_runtime.train import Distiller, TrainArgs, main

dit_dir = test_train.dit_dir  # the tiny 4-block DiT, saved per test


def _args(model: str, out: Path, **kw) -> TrainArgs:
    base = {
        "model": model, "out": str(out), "loop_start": 1, "loop_end": 2, "loop_steps": "all", "steps": 3,
        "teacher_steps": 6, "states": "teacher", "target": "final", "bank_size": 16, "batch_size": 8,
        "train_steps": 6, "warmup": 1, "lr": 3e-3, "ema": 0.0, "val_samples": 4, "ckpt_every": 100,
        "progress": False, "device": "cpu",
    }  # fmt: skip
    return TrainArgs.from_flat(base | kw)


def _distiller(dit_dir: str, tmp_path: Path, **kw) -> tuple[Distiller, object]:
    a = _args(dit_dir, tmp_path / "run", **kw)
    model = load_model(dit_dir)
    loop = apply_ilf(model.transformer, a.loop)
    with torch.no_grad():  # a loop that does something: nonzero scales on a perturbed copy
        loop.scales.fill_(0.3)
        for name, p in loop.named_parameters():
            if name != "scales":
                p.add_(0.05 * torch.randn_like(p))
    d = Distiller(model, loop, a, DistInfo())
    d.build_bank(0)
    return d, model


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_final_loss_is_the_samplers_final_image_error(dit_dir, tmp_path, solver):
    d, model = _distiller(dit_dir, tmp_path, solver=solver)
    traj, idx = d.bank["x"][:4], d.bank["idx"][:4]
    cond = d.conds.cond(idx)
    with torch.no_grad():
        loss = d.final_loss(traj, cond)
        x = denoise(model.transformer, traj[:, 0], d.S, cond, guidance_scale=d.guidance, loop_mask=d.mask)
        plain = denoise(
            model.transformer, traj[:, 0], d.S, cond, guidance_scale=d.guidance, loop_mask=[0] * 3
        )
    expected = (x - traj[:, -1]).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-9)
    assert float((plain - x).abs().max()) > 1e-4  # the loop changed the image the loss scores


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_final_loss_from_noise_is_the_whole_samplers_error(dit_dir, tmp_path, solver):
    # on-policy: the unlooped steps before the first looped one are the student's own, from the noise
    d, model = _distiller(dit_dir, tmp_path, solver=solver, loop_steps="2", final_start="noise")
    traj, cond = d.bank["x"][:4], d.conds.cond(d.bank["idx"][:4])
    with torch.no_grad():
        loss = d.final_loss(traj, cond)
        x = denoise(model.transformer, traj[:, 0], d.S, cond, guidance_scale=d.guidance, loop_mask=d.mask)
        teacher_start = replace(d.a, final_start="teacher")
        d.a = teacher_start
        other = d.final_loss(traj, cond)
    torch.testing.assert_close(loss, (x - traj[:, -1]).square().mean(), rtol=1e-5, atol=1e-9)
    assert abs(float(loss - other)) > 1e-9  # from the teacher's state at step 2 it is another loss


def test_checkpointed_backward_equals_the_plain_backward(dit_dir, tmp_path, monkeypatch):
    # loop from step 1: the first looped step starts from the teacher's state (and history) there
    d, _ = _distiller(dit_dir, tmp_path, loop_steps="1,2", solver="dpmpp_2m")
    loop = get_ilf(d.tf)
    traj, cond = d.bank["x"][:4], d.conds.cond(d.bank["idx"][:4])

    def grads() -> list[torch.Tensor]:
        loop.zero_grad()
        d.final_loss(traj, cond).backward()
        return [p.grad.clone() for p in loop.parameters()]

    recomputed = grads()
    import torch.utils.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *args, **kw: fn(*args))  # distill calls it by module
    plain = grads()
    assert any(float(g.abs().max()) > 0 for g in plain)
    for r, p in zip(recomputed, plain):
        torch.testing.assert_close(r, p, rtol=1e-4, atol=1e-10)


def test_training_on_the_final_target_lowers_it_on_held_out_batches(dit_dir, tmp_path):
    a = _args(dit_dir, tmp_path / "run", train_steps=25)
    model = load_model(dit_dir)

    def held_out() -> float:
        d = Distiller(model, get_ilf(model.transformer), a, DistInfo())
        with torch.no_grad():
            return sum(float(d.loss(10_000 + s)[0]) for s in range(4)) / 4

    apply_ilf(model.transformer, a.loop)
    initial = held_out()  # scales at zero: the plain 3-step sampler's final-image error
    remove_ilf(model.transformer)
    result = main(a, model=model)
    assert result["finished"]
    trained = held_out()
    assert trained < 0.8 * initial, (initial, trained)


def test_final_target_needs_teacher_states_without_rollout(dit_dir, tmp_path):
    with pytest.raises(ValueError, match="target final needs --states teacher and --rollout 0"):
        main(_args(dit_dir, tmp_path / "r", rollout=1, loop_steps="last:1"))


def test_a_log_from_before_the_final_column_stays_aligned(tmp_path):
    import csv

    from ilf_runtime.train.checkpoint import LOG_FIELDS, append_row, trim_log

    log = tmp_path / "log.csv"
    old = [f for f in LOG_FIELDS if f != "final"]  # the header an older version wrote
    log.write_text(",".join(old) + "\n" + ",".join(["9"] * len(old)) + "\n")  # a row after the checkpoint
    assert trim_log(log, 7) == old and trim_log(tmp_path / "none.csv", 7) is None
    append_row(log, old, {"step": 7, "loss": 0.5, "final": 0.25, "lr": 0.1})  # the resumed run's columns
    append_row(tmp_path / "new.csv", LOG_FIELDS, {"step": 7, "final": 0.25})
    (row,) = list(csv.DictReader(log.open()))
    assert row["step"] == "7" and row["loss"] == "0.5" and row["lr"] == "0.1" and "final" not in row
    (row,) = list(csv.DictReader((tmp_path / "new.csv").open()))
    assert row["final"] == "0.25"
