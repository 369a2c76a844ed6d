"""Trains the bundled class-to-image DiT on Fashion-MNIST (pixel space, one channel) on the CPU.

One command, seeded, resumable:

    python scripts/train_backbone.py --out runs/fashion-dit            # trains, then exports
    python scripts/train_backbone.py --out runs/fashion-dit --resume   # continues from the checkpoint

Choices (measured on the 2-core CPU, batch 64, bf16 autocast; see benchmarks/results/backbone.md):
16x16 images (Fashion-MNIST area-downsampled from 28x28), patch 2 (64 tokens), width 128, 12 blocks,
4.2 M parameters, about 0.6 s per step. 12 blocks leave room for a loop of a few blocks that is cheap
relative to the whole network; at 28 px with patch 4 a 12-block model of width 192 cost 1.0 s per step
and did not fit the 90-minute budget with enough steps.

Training follows DiT: epsilon prediction on a linear beta schedule (1e-4..0.02, 1000 steps),
AdamW, EMA of the weights. Two additions for the short budget: min-SNR-5 loss weighting
(Hang et al., 2023) and a cosine learning-rate decay. Label dropout for classifier-free guidance
replaces the label by the null class (index 10) once per sample; the per-block label dropout of
diffusers' DiT embedders is switched off, because it drops labels independently in every block.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import tempfile
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ilf_runtime.cliargs import add_dataclass_arguments, from_namespace
from ilf_runtime.fashion.data import load_fashion_mnist, to_model_range
from ilf_runtime.registry import DEFAULT_SCHEDULER as SCHEDULER


@dataclass
class TrainArgs:
    """Backbone training run.

    Args:
        out: run directory (checkpoint, loss log, exported model).
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak learning rate (linear warm-up, cosine decay to lr_min).
        lr_min: final learning rate.
        warmup: warm-up steps.
        ema_decay: EMA decay of the weights.
        label_dropout: share of samples trained with the null class.
        size: image side in pixels.
        width: transformer width (heads x head dim).
        heads: attention heads.
        layers: transformer blocks.
        patch: patch size.
        seed: seed of everything.
        ckpt_every: steps between checkpoints.
        bf16: bf16 autocast on the CPU.
        threads: torch threads.
        resume: continue from out/checkpoint.pt.
        max_minutes: stop after this much training time in this process (0: no limit), writing a
            checkpoint; `--resume` continues where it stopped and ends where an uninterrupted run would.
        export_only: with `--resume`, write the checkpoint's EMA model to out/model-stepN and stop (to
            measure a run between its chunks).
    """

    out: str = "runs/fashion-dit"
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    lr_min: float = 5e-5
    warmup: int = 200
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    size: int = 16
    width: int = 128
    heads: int = 4
    layers: int = 12
    patch: int = 2
    seed: int = 0
    ckpt_every: int = 250
    bf16: bool = True
    threads: int = 2
    resume: bool = False
    max_minutes: float = 0.0
    export_only: bool = False


NUM_CLASSES = 10


class ClassTask:
    """What the loop trains: the class-conditional DiT (`scripts/train_t2i.py` has the text-to-image
    task). `build` makes the model, `draw` one batch of clean images and the model's conditioning
    keyword arguments, `export` writes the EMA model."""

    def __init__(self, a: TrainArgs):
        self.a = a
        self.data = to_model_range(load_fashion_mnist("train").images, a.size)  # (60000, 1, S, S)
        self.labels = load_fashion_mnist("train").labels

    def build(self):
        return build_model(self.a)

    def draw(self, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        a = self.a
        idx = torch.randint(0, self.data.shape[0], (a.batch_size,), generator=gen)
        x0, y = self.data[idx], self.labels[idx].clone()
        drop = torch.rand(a.batch_size, generator=gen) < a.label_dropout
        y[drop] = NUM_CLASSES  # null class, once per sample
        return x0, {"class_labels": y}

    def export(self, ema, dest: Path, summary: dict) -> None:
        export(ema, self.a, dest, summary)


def build_model(a: TrainArgs):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=a.heads,
        attention_head_dim=a.width // a.heads,
        in_channels=1,
        out_channels=1,
        num_layers=a.layers,
        sample_size=a.size,
        patch_size=a.patch,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )
    disable_block_label_dropout(model)
    return model


def disable_block_label_dropout(model) -> None:
    """The table keeps its null-class row; only the random per-block replacement goes."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0


def requires_grad(model, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr_min + 0.5 * (a.lr - a.lr_min) * (1 + math.cos(math.pi * p))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(ema, a: TrainArgs, dest: Path, summary: dict) -> None:
    """The EMA model as a diffusers transformer directory with its scheduler config."""
    from diffusers import DDIMScheduler

    dest.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(dest, safe_serialization=True)
    DDIMScheduler.from_config(SCHEDULER).save_pretrained(dest)
    (dest / "training.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


def main(a: TrainArgs, task=None) -> int:
    """Trains `task` (default: the class-conditional DiT) with the arguments `a`."""
    from tqdm.auto import tqdm

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"

    torch.manual_seed(a.seed)
    task = task or ClassTask(a)
    model = task.build().train()
    ema = deepcopy(model).eval()
    requires_grad(ema, False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    betas = torch.linspace(SCHEDULER["beta_start"], SCHEDULER["beta_end"], 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction

    step, seconds = 0, 0.0
    gen = torch.Generator().manual_seed(a.seed)
    if a.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # tensors and plain data only
        session_keys = ("resume", "max_minutes", "export_only")  # may differ between the pieces of one run
        if {k: v for k, v in ck["args"].items() if k not in session_keys} != {
            k: v for k, v in asdict(a).items() if k not in session_keys
        }:
            raise SystemExit(f"--resume: {ckpt_path} was written with other arguments: {ck['args']}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, seconds = ck["step"], ck["seconds"]
        print(f"resumed from {ckpt_path} at step {step}")
    elif a.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting fresh")
    if a.export_only:
        if step == 0:
            raise SystemExit(f"--export-only needs --resume and a checkpoint at {ckpt_path}")
        dest = out / f"model-step{step}"
        task.export(ema, dest, {"args": asdict(a), "steps": step, "train_seconds": round(seconds, 1)})
        print(f"exported the EMA model at step {step} to {dest}")
        return 0

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "args": asdict(a),
                "step": step,
                "seconds": seconds,
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        )

    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    signal.signal(signal.SIGINT, on_sigint)
    log_path = out / "loss.csv"
    new_log = not log_path.is_file() or step == 0
    log = open(log_path, "w" if new_log else "a", newline="")  # noqa: SIM115 (lives for the whole run)
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["step", "loss", "lr", "seconds"])
    bar = tqdm(total=a.steps, initial=step, desc="train", unit="step")
    run_loss, t_last = None, time.perf_counter()
    deadline = time.perf_counter() + 60 * a.max_minutes if a.max_minutes > 0 else float("inf")
    while step < a.steps and not interrupted:
        if time.perf_counter() > deadline:
            interrupted = True
            break
        x0, cond = task.draw(gen)
        t = torch.randint(0, 1000, (a.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        ac = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        # PyTorch's CPU flash-attention backward in bf16 is slow at these sizes (64 tokens, head dim 32):
        # the math kernel makes a whole training step about 1.6x faster here
        with sdpa_kernel(SDPBackend.MATH):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                pred = model(xt, timestep=t, **cond).sample
            loss = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3)).mul(weights[t]).mean()
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step}; last checkpoint kept at {ckpt_path}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, a.ema_decay if step >= a.warmup else 0.0)
        step += 1
        now = time.perf_counter()
        seconds += now - t_last
        t_last = now
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        writer.writerow([step, f"{loss.item():.5f}", f"{lr_at(step - 1, a):.3e}", f"{seconds:.1f}"])
        bar.set_postfix(loss=f"{run_loss:.4f}", img_s=f"{a.batch_size * step / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if step % a.ckpt_every == 0 or step == a.steps:
            log.flush()
            checkpoint()
    bar.close()
    log.close()
    if interrupted:
        checkpoint()
        print(f"stopped at step {step}: checkpoint written to {ckpt_path}; rerun with --resume")
        return 130
    summary = {
        "args": asdict(a),
        "steps": step,
        "train_seconds": round(seconds, 1),
        "final_loss_ema": run_loss,
        "params": sum(p.numel() for p in ema.parameters()),
    }
    task.export(ema, out / "model", summary)
    print(f"done: {step} steps in {seconds / 60:.1f} min; EMA model exported to {out / 'model'}")
    return 0


def parse(argv: list[str] | None = None) -> TrainArgs:
    ap = argparse.ArgumentParser(description="Train the bundled Fashion-MNIST DiT on the CPU.")
    add_dataclass_arguments(ap, TrainArgs)
    return from_namespace(TrainArgs, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(parse()))
