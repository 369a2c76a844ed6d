"""The distillation trainer on tiny models: it learns, touches nothing but the feedback module,
resumes exactly, runs data-parallel under torchrun, stops on a non-finite loss, and writes a
weights file that `apply_ilf` loads."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_dit, tiny_pixart
from safetensors.torch import load_file

from ilf_runtime import apply_ilf, load_ilf_weights, remove_ilf
from ilf_runtime.ilf import get_ilf
from ilf_runtime.registry import load_model
from ilf_runtime.train import Distiller, TrainArgs, main


@pytest.fixture
def dit_dir(tmp_path: Path) -> str:
    path = tmp_path / "dit"
    tiny_dit(num_layers=4).save_pretrained(path)
    return str(path)


def _args(model: str, out: Path, **kw) -> TrainArgs:
    base = {
        "model": model,
        "out": str(out),
        "loop_start": 1,
        "loop_end": 2,
        "loop_steps": "all",
        "steps": 2,
        "teacher_steps": 4,
        "states": "teacher",
        "bank_size": 16,
        "batch_size": 8,
        "train_steps": 6,
        "warmup": 1,
        "lr": 3e-3,
        "ema": 0.5,
        "val_samples": 4,
        "ckpt_every": 2,
        "progress": False,
        "device": "cpu",
    }
    return TrainArgs.from_flat(base | kw)


def _held_out_loss(model, a: TrainArgs) -> float:
    from ilf_runtime.distributed import DistInfo

    d = Distiller(model, get_ilf(model.transformer), a, DistInfo())
    with torch.no_grad():
        return sum(float(d.loss(10_000 + s)[0]) for s in range(4)) / 4


def test_training_reduces_loss_and_touches_only_feedback(dit_dir, tmp_path):
    a = _args(dit_dir, tmp_path / "run", train_steps=25, ema=0.0)
    model = load_model(dit_dir)
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    loop = apply_ilf(model.transformer, a.loop)
    initial = _held_out_loss(model, a)  # scales at zero: the plain model's error
    remove_ilf(model.transformer)

    result = main(a, model=model)
    assert result["finished"] and result["step"] == 25
    loop = get_ilf(model.transformer)
    trained = _held_out_loss(model, a)
    assert trained < 0.7 * initial, (initial, trained)
    assert loop.scales.abs().max() > 0
    for name, p in model.transformer.named_parameters():
        if name.startswith("ilf_loop."):
            assert p.grad is not None
        else:
            assert p.grad is None and not p.requires_grad, name
    remove_ilf(model.transformer)
    after = model.transformer.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_file_loads_with_apply_ilf(dit_dir, tmp_path):
    from ilf_runtime import sample

    result = main(_args(dit_dir, tmp_path / "run"))
    w = load_ilf_weights(result["weights"])
    assert w.metadata["sampler"] == {
        "guidance_scale": 4.0,
        "loop_steps": "all",
        "num_steps": 2,
        "solver": "ddim",
        "teacher_steps": 4,
    }
    assert w.metadata["training"]["steps"] == 6
    model = load_model(dit_dir)
    plain = sample(model, class_labels=[0, 1], num_steps=2, seed=3)
    looped = sample(model, class_labels=[0, 1], num_steps=2, seed=3, ilf=result["weights"])
    assert (plain.latents - looped.latents).abs().max() > 1e-6
    csv_rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(csv_rows) == 7 and csv_rows[0].startswith("step,loss")
    val = (tmp_path / "run" / "val.csv").read_text().splitlines()
    assert len(val) == 2 and val[1].startswith("6,")


@pytest.mark.parametrize("how", ["max_minutes", "SIGINT", "SIGTERM"])
def test_interrupt_and_resume_matches_uninterrupted(dit_dir, tmp_path, monkeypatch, how):
    full = main(_args(dit_dir, tmp_path / "full", target="trajectory+fast", feature_weight=0.1))
    a = _args(dit_dir, tmp_path / "cut", target="trajectory+fast", feature_weight=0.1)
    if how == "max_minutes":
        first = main(replace(a, max_minutes=1e-9))  # stops after the first step
        assert first["stopped"] == "max_minutes" and first["step"] == 1
    else:
        real = Distiller.loss

        def loss_then_ctrl_c(self, step):
            if step == 3:  # as Ctrl-C or a scheduler's SIGTERM would; the step still completes
                os.kill(os.getpid(), getattr(signal, how))
            return real(self, step)

        monkeypatch.setattr(Distiller, "loss", loss_then_ctrl_c)
        first = main(a)
        assert first["stopped"] == "signal" and first["step"] == 4
        monkeypatch.setattr(Distiller, "loss", real)
    assert not (tmp_path / "cut" / "feedback.safetensors").exists()
    resumed = main(replace(a, resume=True))
    assert resumed["finished"] and resumed["step"] == 6
    wa, wb = load_file(full["weights"]), load_file(resumed["weights"])
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    log = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == [str(s) for s in range(1, 7)]


def test_resume_refuses_other_arguments(dit_dir, tmp_path):
    a = _args(dit_dir, tmp_path / "run", train_steps=2)
    main(a)
    with pytest.raises(ValueError, match="different arguments: lr"):
        main(replace(a, lr=1.0, resume=True))
    moved = replace(a.loop, loop_start=2, loop_end=3)  # other parameter shapes, refused before loading
    with pytest.raises(ValueError, match=r"arguments: loop_end=2 \(now 3\), loop_start=1 \(now 2\)"):
        main(replace(a, loop=moved, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(replace(a, out=str(tmp_path / "nothing"), resume=True))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_cli_train_signal_exits_130_with_a_resumable_checkpoint(dit_dir, tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM to `ilf train`: the step in flight completes, a checkpoint is
    written, the process says how to continue and exits 130; --resume then finishes the run."""
    import time

    out = tmp_path / "run"
    flags = ["-m", "ilf_runtime", "train", "--model", dit_dir, "--out", str(out), "--loop-start", "1",
             "--loop-end", "2", "--loop-steps", "all", "--steps", "2", "--teacher-steps", "4", "--states",
             "teacher", "--bank-size", "4", "--batch-size", "2", "--train-steps", "100000", "--ckpt-every",
             "100000", "--val-samples", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            log = out / "log.csv"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "continue with --resume" in stdout
    step = int(stdout.split("stopped at step ")[1].split()[0])
    log_steps = [int(r.split(",")[0]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert step >= 2 and log_steps == list(range(1, step + 1))
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == step  # the checkpoint holds every logged step
    assert not (out / "feedback.safetensors").exists()


def _checkpointed_run(dit_dir, tmp_path) -> tuple[TrainArgs, Path]:
    a = _args(dit_dir, tmp_path / "run", train_steps=2)
    main(replace(a, max_minutes=1e-9))  # stops after step 1 with a checkpoint
    return a, tmp_path / "run" / "checkpoint.safetensors"


def test_resume_refuses_a_foreign_or_unreadable_checkpoint(dit_dir, tmp_path):
    from safetensors.torch import save_file

    a, ckpt = _checkpointed_run(dit_dir, tmp_path)
    good = ckpt.read_bytes()
    resume = replace(a, resume=True)
    # a feedback weights file (a safetensors file of this project, but not a checkpoint)
    other = main(_args(dit_dir, tmp_path / "other", train_steps=1))
    ckpt.write_bytes(Path(other["weights"]).read_bytes())
    with pytest.raises(ValueError, match="not an ilf training checkpoint"):
        main(resume)
    save_file({"x": torch.zeros(2)}, str(ckpt), {"format": "something-else"})  # someone else's file
    with pytest.raises(ValueError, match="not an ilf training checkpoint"):
        main(resume)
    for bad in (b"", b"not a safetensors file", good[: len(good) // 2]):  # empty, garbage, truncated
        ckpt.write_bytes(bad)
        with pytest.raises(ValueError, match="unreadable or corrupted"):
            main(resume)
    ckpt.write_bytes(good)
    assert main(resume)["finished"]  # the intact file still resumes


def test_resume_refuses_a_checkpoint_with_a_flipped_byte(dit_dir, tmp_path):
    """A flipped byte in the tensor data of a checkpoint must not resume silently into other weights."""
    a, ckpt = _checkpointed_run(dit_dir, tmp_path)
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's bytes, past the header
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"(?i)checksum|corrupt"):
        main(replace(a, resume=True))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(dit_dir, tmp_path, monkeypatch):
    from ilf_runtime.train import load_checkpoint

    real = Distiller.loss

    def nan_at_3(self, step):
        loss, parts = real(self, step)
        return (loss * float("nan") if step == 3 else loss), parts

    monkeypatch.setattr(Distiller, "loss", nan_at_3)
    a = _args(dit_dir, tmp_path / "run")
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 3"):
        main(a)
    model = load_model(dit_dir)
    loop = apply_ilf(model.transformer, a.loop)
    params = list(loop.parameters())
    opt = torch.optim.AdamW(params)
    step, _ = load_checkpoint(
        tmp_path / "run" / "checkpoint.safetensors", loop, [p.clone() for p in params], opt, a
    )
    assert step == 2 and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "kw",
    [
        {"solver": "dpmpp_2m"},
        {"unroll": 2, "loss_space": "x"},
        {"rollout": 1, "loop_steps": "last:1", "teacher_steps": 4},
        {"target": "fast", "scale_shape": "channel", "feedback_init": "copy:1"},
        {"states": "teacher", "bank_refresh": 2, "feature_weight": 1.0},
    ],
)
def test_training_variants_run(dit_dir, tmp_path, kw):
    result = main(_args(dit_dir, tmp_path / "run", train_steps=3, **kw))
    assert result["finished"]
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for r in rows:  # every logged number finite (neither NaN nor inf), the loss present and positive
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0, r
        assert all(math.isfinite(float(v)) for v in r.values() if v != ""), r


def _needs_fashion_mnist() -> None:
    from ilf_runtime.fashion.data import load_fashion_mnist

    try:
        load_fashion_mnist("train")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_data_states_on_a_fashion_shaped_dit(tmp_path):
    _needs_fashion_mnist()  # states="data" draws noised Fashion-MNIST images
    path = tmp_path / "fdit"
    tiny_dit(num_layers=3, in_channels=1, num_classes=10, learned_sigma=False).save_pretrained(path)
    result = main(_args(str(path), tmp_path / "run", states="data", guidance=1.0, loop_start=0, loop_end=1))
    assert result["finished"]


def test_pixart_trains_from_prompt_embeddings(tmp_path):
    from safetensors.torch import save_file

    from tests.fixtures.tiny import CAPTION_CHANNELS

    path = tmp_path / "pixart"
    tiny_pixart(num_layers=3).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "embeds.safetensors"
    save_file(
        {
            "prompt_embeds": torch.randn(3, 5, CAPTION_CHANNELS, generator=g),
            "negative_prompt_embeds": torch.zeros(1, 5, CAPTION_CHANNELS),
        },
        str(emb),
    )
    result = main(_args(str(path), tmp_path / "run", prompt_embeds=str(emb), train_steps=3))
    assert result["finished"]
    with pytest.raises(ValueError, match="--prompt-embeds"):
        main(_args(str(path), tmp_path / "run2"))


def test_bad_arguments_are_named(dit_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher_steps"):
        _args(dit_dir, tmp_path, teacher_steps=5, steps=2)
    with pytest.raises(ValueError, match="target"):
        _args(dit_dir, tmp_path, target="trajectory+magic")
    with pytest.raises(ValueError, match="multistep"):
        main(_args(dit_dir, tmp_path / "r", solver="dpmpp_2m", states="data"))
    with pytest.raises(ValueError, match="loops no step"):
        main(_args(dit_dir, tmp_path / "r", loop_steps="none"))
    with pytest.raises(ValueError, match="Fashion-MNIST"):
        main(_args(dit_dir, tmp_path / "r", states="data"))


def test_cli_train(dit_dir, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    rc = cli(
        ["train", "--model", dit_dir, "--out", str(tmp_path / "run"), "--loop-start", "1", "--loop-end", "2",
         "--steps", "2", "--teacher-steps", "4", "--states", "teacher", "--bank-size", "8", "--batch-size", "4",
         "--train-steps", "2", "--val-samples", "4", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "validation:" in out
    with pytest.raises(SystemExit) as e:
        cli(
            [
                "train",
                "--model",
                dit_dir,
                "--out",
                str(tmp_path / "r2"),
                "--steps",
                "3",
                "--teacher-steps",
                "4",
            ]
        )
    assert e.value.code == 2
    assert "teacher_steps" in capsys.readouterr().err


def test_cli_train_with_guidance(dit_dir, tmp_path):
    """``--guidance`` reaches teacher and student as a float (it used to arrive as a string)."""
    from ilf_runtime.cli import main as cli

    out = tmp_path / "run"
    rc = cli(
        ["train", "--model", dit_dir, "--out", str(out), "--loop-start", "1", "--loop-end", "2",
         "--steps", "2", "--teacher-steps", "4", "--states", "teacher", "--bank-size", "4", "--batch-size", "2",
         "--train-steps", "2", "--val-samples", "2", "--guidance", "3", "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    w = load_ilf_weights(out / "feedback.safetensors")
    assert w.metadata["sampler"]["guidance_scale"] == 3.0  # not the tiny DiT's default of 4
    assert w.metadata["training"]["args"]["guidance"] == 3.0
    summary = json.loads((out / "summary.json").read_text())
    assert all(math.isfinite(summary["validation"][k]) for k in ("psnr", "gain_db"))
    assert all(torch.isfinite(t).all() for t in w.tensors.values())


def test_cli_resume_needs_the_same_loop_flags(dit_dir, tmp_path, capsys):
    from ilf_runtime.cli import main as cli

    flags = ["train", "--model", dit_dir, "--out", str(tmp_path / "run"), "--loop-start", "1", "--loop-end", "2",
             "--loop-steps", "all", "--steps", "2", "--teacher-steps", "4", "--states", "teacher",
             "--bank-size", "4", "--batch-size", "2", "--train-steps", "2", "--val-samples", "2", "--no-progress",
             "--device", "cpu"]  # fmt: skip
    assert cli([*flags, "--max-minutes", "1e-9"]) == 0  # stops after one step, with a checkpoint
    assert "stopped at step 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli([*flags, "--resume", "--loop-steps", "last:1"])
    assert e.value.code == 2
    assert "different arguments: loop_steps='all' (now 'last:1')" in capsys.readouterr().err
    assert cli([*flags, "--resume"]) == 0
    assert "wrote" in capsys.readouterr().out
    w = load_ilf_weights(tmp_path / "run" / "feedback.safetensors")
    assert w.metadata["training"]["steps"] == 2 and w.metadata["training"]["steps_this_session"] == 1


needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed gloo missing",
)


def _torchrun_train(dit_dir: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "ilf_runtime", "train", "--model", dit_dir, "--out", str(out), "--loop-start", "1", "--loop-end", "2",
        "--steps", "2", "--teacher-steps", "4", "--states", "teacher", "--bank-size", "8", "--batch-size", "4",
        "--train-steps", "4", "--ckpt-every", "2", "--val-samples", "5", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.distributed
@needs_gloo
def test_torchrun_two_ranks_identical_weights_and_exact_resume(dit_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun_train(dit_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    w = load_ilf_weights(out / "feedback.safetensors")
    assert w.metadata["training"]["world_size"] == 2
    assert w.metadata["content_sha256"] == digests[0]

    # stopped after one step under torchrun, then resumed under torchrun: the same weights
    cut = tmp_path / "cut"
    proc = _torchrun_train(dit_dir, cut, "--max-minutes", "1e-9")
    assert proc.returncode == 0 and "stopped at step 1" in proc.stdout, proc.stderr[-3000:]
    assert (cut / "checkpoint.safetensors").is_file() and not (cut / "feedback.safetensors").exists()
    proc = _torchrun_train(dit_dir, cut, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = load_ilf_weights(cut / "feedback.safetensors")
    assert resumed.metadata["training"]["steps_this_session"] == 3
    assert resumed.metadata["training"]["world_size"] == 2
    for k, v in w.tensors.items():
        torch.testing.assert_close(resumed.tensors[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_bank_cache_is_reused_and_gives_the_same_run(dit_dir, tmp_path):
    cache = tmp_path / "banks"
    a = _args(dit_dir, tmp_path / "one", bank_cache=str(cache), train_steps=3)
    first = main(a)
    files = list(cache.glob("bank-*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = main(replace(a, out=str(tmp_path / "two")))
    assert files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    wa, wb = load_file(first["weights"]), load_file(second["weights"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    main(replace(a, out=str(tmp_path / "three"), bank_size=12))  # another bank, another file
    assert len(list(cache.glob("bank-*.safetensors"))) == 2


def test_warm_start_begins_from_the_weights_file(dit_dir, tmp_path):
    from ilf_runtime.distributed import DistInfo
    from ilf_runtime.train.loop import Trainer

    first = main(_args(dit_dir, tmp_path / "first", train_steps=25, ema=0.0))
    w = load_ilf_weights(first["weights"])
    a = _args(dit_dir, tmp_path / "warm", init_weights=first["weights"], seed=5)
    run = Trainer(a, None, DistInfo())
    got = {f"feedback.{k}": v for k, v in run.loop.feedback.state_dict().items()} | {
        "scales": run.loop.scales
    }
    assert set(got) == set(w.tensors)
    assert all(torch.equal(got[k], w.tensors[k]) for k in got)
    assert all(torch.equal(e, p) for e, p in zip(run.ema, run.params))  # the EMA starts there too
    warm = _held_out_loss(run.model, a)
    fresh_model = load_model(dit_dir)
    apply_ilf(fresh_model.transformer, a.loop)
    assert warm < 0.8 * _held_out_loss(fresh_model, a)  # it starts where the first run ended
    done = main(replace(a, train_steps=2), model=load_model(dit_dir))
    began = load_ilf_weights(done["weights"]).metadata["training"]["init_weights"]
    assert began["content_sha256"] == w.metadata["content_sha256"] and began["steps"] == 25


def test_warm_start_refuses_another_loop(dit_dir, tmp_path):
    first = main(_args(dit_dir, tmp_path / "first", train_steps=2))
    with pytest.raises(ValueError, match=r"has another loop: loop_end 2 \(run: 3\)"):
        main(_args(dit_dir, tmp_path / "warm", init_weights=first["weights"], loop_end=3))
