"""The arguments of one training run: `TrainArgs`, its presets, and its command-line flags."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from ilf_runtime.cliargs import add_dataclass_arguments, from_namespace
from ilf_runtime.config import ILFConfig
from ilf_runtime.solvers import SOLVERS, check_grid

__all__ = ["PRESETS", "TARGETS", "TrainArgs", "add_arguments", "args_from_namespace", "flat_args"]

TARGETS = ("trajectory", "fast", "final")


@dataclass
class TrainArgs:
    """One distillation run; command-line flags map one to one onto these fields (the fields of
    ``loop`` are flat flags: ``--loop-start``, ``--loop-steps``, ...).

    Args:
        model: built-in model name or local diffusers DiT / PixArt directory.
        out: run directory (checkpoint, logs, weights file).
        loop: the `ILFConfig` of the loop; its ``loop_steps`` refers to the student grid.
        steps: student sampling steps.
        teacher_steps: plain sampler steps of the teacher; a multiple of ``steps`` unless ``grid`` is given.
        grid: the student's steps on the teacher's grid, as the teacher step each one starts at
            (comma-separated, from 0, ``steps`` of them; e.g. ``0,2,4,6,8,10,12,14,17,19``: shorter steps
            near the end); empty: every (teacher_steps / steps)th point, the scheduler's own spacing.
        solver: ``ddim`` or ``dpmpp_2m`` (default: the model's scheduler).
        guidance: guidance scale of teacher and student (default: the model's).
        target: ``trajectory``, ``fast``, ``final`` or a ``+`` combination. ``final``: from the
            teacher's state at the first looped step, the student runs the rest of its schedule (with
            gradients through every step, recomputed per step to save memory) and is scored on the
            final image against the teacher's (x space: the paired PSNR the benchmarks measure).
        fast_weight: weight of the ``fast`` term when combined.
        final_weight: weight of the ``final`` term when combined.
        final_start: where the ``final`` target's student run starts: ``teacher`` (the teacher's state at
            the first looped step) or ``noise`` (the bank trajectory's noise, the unlooped steps before
            the first looped one taken by the student itself without gradient: on-policy, the states
            sampling meets, whose errors a schedule's later steps may cancel).
        feature_weight: weight of the feature loss on the loop output (0: off).
        loss_space: ``eps`` (landing error over the output coefficient) or ``x`` (landing error).
        unroll: consecutive student steps per loss, with gradients through the student's states.
        rollout: student steps (no gradient) taken before the trained step, from a teacher or data
            state; the teacher's target starts from where the student got (on-policy). DDIM only.
        states: ``data`` (noised Fashion-MNIST; bundled-model-like DiTs) or ``teacher`` (trajectories).
        bank_size: teacher trajectories per rank in the bank.
        bank_refresh: regenerate the bank every this many steps (0: never).
        bank_cache: directory where banks are kept and reused across runs (keyed by a hash of the
            backbone's weights, the schedule, the bank's seed and size).
        prompt_embeds: PixArt: safetensors file with ``prompt_embeds`` [, masks, ``negative_*``].
        prompts: text-to-image models: a text file of training prompts, one per line, encoded by the
            model's own text encoder (the negative prompt empty); instead of ``prompt_embeds``.
        val_prompts: a text file of validation prompts (default: the training conditions), e.g.
            prompts held out of training.
        init_weights: start the feedback module from this weights file instead of ``feedback_init``
            (a warm start with a fresh schedule: longer training of shipped weights); its loop range,
            iterations and scale shape must be this run's.
        train_steps: optimiser steps.
        batch_size: samples per step and rank.
        lr: AdamW's peak learning rate (reached after the warm-up, then cosine decay to 0).
        weight_decay: AdamW's weight decay.
        warmup: steps of linear learning-rate warm-up.
        grad_clip: clip the gradient norm to this (0: no clipping).
        ema: decay of the exponential moving average of the feedback parameters; the written weights
            are the EMA.
        seed: seed of every random draw (each rank and step derive their own generator from it).
        ckpt_every: steps between checkpoints.
        val_every: steps between validation passes (0: only at the end).
        val_samples: images of the fixed validation set (paired PSNR against the teacher's samples).
        val_seed: the first seed of the validation set (image j has seed ``val_seed + j``).
        max_minutes: stop with a checkpoint after this much training time (0: no limit).
        resume: continue from ``out/checkpoint.safetensors``.
        overwrite: start afresh in an ``out`` that holds an earlier run, replacing its checkpoint, logs
            and weights (without it such a directory is refused).
        progress: show a progress bar.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
    """

    model: str = "fashion-dit"
    out: str = "runs/ilf-train"
    loop: ILFConfig = field(default_factory=lambda: ILFConfig(loop_start=4, loop_end=6, loop_steps="last:5"))
    steps: int = 10
    teacher_steps: int = 20
    grid: str = ""
    solver: str | None = field(default=None, metadata={"choices": tuple(SOLVERS)})
    guidance: float | None = None
    target: str = "trajectory"
    fast_weight: float = 1.0
    final_weight: float = 1.0
    final_start: str = field(default="teacher", metadata={"choices": ("teacher", "noise")})
    feature_weight: float = 0.0
    loss_space: str = field(default="eps", metadata={"choices": ("eps", "x")})
    unroll: int = 1
    rollout: int = 0
    states: str = field(default="data", metadata={"choices": ("data", "teacher")})
    bank_size: int = 1024
    bank_refresh: int = 0
    bank_cache: str | None = None
    prompt_embeds: str | None = None
    prompts: str | None = None
    val_prompts: str | None = None
    init_weights: str | None = None
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    grad_clip: float = 1.0
    ema: float = 0.99
    seed: int = 0
    ckpt_every: int = 100
    val_every: int = 0
    val_samples: int = 200
    val_seed: int = 10_000_000
    max_minutes: float = 0.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    device: str | None = field(default=None, metadata={"choices": ("cpu", "cuda")})

    def __post_init__(self) -> None:
        parts = self.target.split("+")
        if not parts or any(p not in TARGETS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"target must be {' / '.join(TARGETS)} or a '+' combination, got {self.target!r}"
            )
        if self.grid:
            starts = check_grid(self.grid.replace(" ", "").split(","), self.teacher_steps)
            if len(starts) != self.steps:
                raise ValueError(f"grid: {len(starts)} steps given ({self.grid}) but steps is {self.steps}")
        checks = {
            "steps": self.steps >= 1,
            "teacher_steps": self.teacher_steps >= self.steps
            and (bool(self.grid) or self.teacher_steps % self.steps == 0),
            "unroll": self.unroll >= 1,
            "rollout": self.rollout >= 0,
            "train_steps": self.train_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "bank_size": self.bank_size >= 1,
            "ema": 0.0 <= self.ema < 1.0,
            "loss_space": self.loss_space in ("eps", "x"),
            "states": self.states in ("data", "teacher"),
            "final_start": self.final_start in ("teacher", "noise"),
            "ckpt_every": self.ckpt_every >= 1,
            "val_samples": self.val_samples >= 2,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid training arguments: {', '.join(bad)} (teacher_steps must be a multiple of steps; "
                f"loss_space eps|x; states data|teacher; final_start teacher|noise; ema in [0, 1))"
            )

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainArgs:
        """The arguments from flat field names, as presets and flags name them (``loop_start`` sits
        beside ``steps``); fields not given take their defaults."""
        return from_namespace(cls, argparse.Namespace(), base=values)

    @property
    def targets(self) -> list[str]:
        return self.target.split("+")

    @property
    def grid_starts(self) -> list[int] | None:
        """The student's steps as teacher step indices (None: the uniform grid)."""
        return [int(v) for v in self.grid.split(",")] if self.grid else None


def flat_args(args: TrainArgs | dict[str, Any]) -> dict[str, Any]:
    """The arguments (or their `asdict` / JSON form) as one flat dict: the fields of ``loop`` in its
    place, under the names of their flags. Checkpoints compare runs in this form."""
    nested = asdict(args) if is_dataclass(args) else args
    flat: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            flat |= v
        else:
            flat[k] = v
    return flat


# Named settings for the bundled model; `ilf train --preset NAME` starts from one (flags override).
# Chosen by benchmarks/ilf_settings.py (see benchmarks/results/ilf_settings.md); the shipped weights
# were trained with `torchrun --nproc-per-node 2 -m ilf_runtime train --preset NAME` (2 ranks).
# Keys are flat (`TrainArgs.from_flat`).
_FASHION = {
    "model": "fashion-dit",
    "loop_start": 5,
    "loop_end": 6,
    "feedback_init": "copy:6",
    "states": "teacher",
    "bank_size": 2048,
    "batch_size": 32,
    "warmup": 100,
    "lr": 1e-3,
    "ema": 0.995,
    "val_samples": 256,
    "ckpt_every": 250,
}
PRESETS: dict[str, dict[str, Any]] = {
    "fashion-dit": _FASHION | {"steps": 10, "loop_steps": "last:8", "train_steps": 4000, "val_every": 1000},
    # <= 84 evaluations: 6 steps on a searched grid (tune.grid), the on-policy final-image loss; the
    # shipped file is this run continued with --init-weights --lr 3e-4 --train-steps 1200 (README)
    "fashion-dit-aggressive": _FASHION
    | {
        "steps": 6,
        "grid": "0,3,8,11,15,18",
        "loop_steps": "last:4",
        "target": "final",
        "final_start": "noise",
        "bank_size": 1024,
        "batch_size": 8,
        "warmup": 30,
        "lr": 5e-4,
        "seed": 4,
        "train_steps": 600,
        "val_every": 200,
        "val_seed": 30_000_000,
    },
}


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `TrainArgs` field (``--loop-start``, ``--no-progress``, ...) plus ``--preset``;
    every flag defaults to None so that what was given can be layered over a preset."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named setting (flags override)")
    add_dataclass_arguments(p, TrainArgs, unset_is_none=True)


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """`TrainArgs` from parsed flags: the preset's values (if any), overridden by the flags given."""
    preset = getattr(ns, "preset", None)
    return from_namespace(TrainArgs, ns, base=PRESETS[preset] if preset else None)
