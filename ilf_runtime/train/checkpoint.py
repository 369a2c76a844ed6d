"""A run's files: the resumable checkpoint, the CSV logs, and the stop flag that ends a run with one."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.train.args import TrainArgs, flat_args
from ilf_runtime.weights import content_hash, save_file_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "CKPT",
    "LOG_FIELDS",
    "RESUMABLE",
    "VAL_FIELDS",
    "WEIGHTS",
    "StopFlag",
    "append_row",
    "checkpoint_hash",
    "load_checkpoint",
    "save_checkpoint",
    "trim_log",
]

CKPT = "checkpoint.safetensors"
WEIGHTS = "feedback.safetensors"
# Columns of the run's log.csv (one row per step) and val.csv (one row per validation pass).
LOG_FIELDS = ["step", "loss", "trajectory", "fast", "feature", "final", "lr", "samples_per_s", "seconds"]
VAL_FIELDS = ["step", "psnr", "psnr_se", "gain_db", "gain_se", "equal_cost_steps", "equal_cost_psnr"]


def save_checkpoint(
    path: Path, loop: nn.Module, ema: list[torch.Tensor], opt, a: TrainArgs, step: int, seconds: float
) -> None:
    """Feedback weights, EMA, optimiser state, RNG state, step and arguments; written atomically."""
    names = [n for n, _ in loop.named_parameters()]
    tensors = {f"model.{n}": p.detach().cpu().contiguous() for n, p in loop.named_parameters()}
    tensors |= {f"ema.{n}": e.cpu().contiguous() for n, e in zip(names, ema)}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for key, v in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(v).cpu().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": "ilf-train-checkpoint",
        "args": json.dumps(asdict(a)),
        "step": str(step),
        "seconds": repr(seconds),
        "param_groups": json.dumps(sd["param_groups"]),
    }
    meta["sha256"] = checkpoint_hash(tensors, meta)
    save_file_atomic(tensors, path, meta)


def checkpoint_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over every tensor (`weights.content_hash`) and every metadata field but itself."""
    blob = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256((content_hash(tensors) + blob).encode()).hexdigest()


# Arguments that may change between an interrupted run and its resumption (flat names).
RESUMABLE = {
    "resume",
    "overwrite",
    "max_minutes",
    "progress",
    "val_every",
    "ckpt_every",
    "device",
    "out",
    "bank_cache",
    "val_samples",
    "val_seed",
}


def load_checkpoint(
    path: Path, loop: nn.Module, ema: list[torch.Tensor], opt, a: TrainArgs
) -> tuple[int, float]:
    """Restores what `save_checkpoint` wrote into `loop`, `ema`, `opt` and the torch RNG; returns
    (step, training seconds). Refuses a checkpoint written with other arguments than `a` (other
    than the `RESUMABLE` ones), naming them."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: unreadable or corrupted ({e})") from None
    if meta.get("format") != "ilf-train-checkpoint":
        raise ValueError(f"checkpoint {path}: not an ilf training checkpoint")
    if "sha256" not in meta:  # written before checkpoints carried a checksum
        logger.warning("checkpoint %s has no checksum (an older version wrote it); not verified", path)
    elif meta["sha256"] != checkpoint_hash(tensors, meta):
        raise ValueError(
            f"checkpoint {path}: checksum mismatch: the file is corrupted; delete it to start afresh"
        )
    step, seconds, groups = _check_checkpoint(path, meta, tensors, loop, a)
    with torch.no_grad():
        for n, p in loop.named_parameters():
            p.copy_(tensors[f"model.{n}"])
        for n, e in zip([n for n, _ in loop.named_parameters()], ema):
            e.copy_(tensors[f"ema.{n}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return step, seconds


def _check_checkpoint(
    path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], loop: nn.Module, a: TrainArgs
) -> tuple[int, float, list[Any]]:
    """(step, seconds, param_groups) of a checkpoint whose fields, arguments and tensors check out."""
    where = f"checkpoint {path}"
    missing = [k for k in ("args", "step", "seconds", "param_groups") if k not in meta]
    names = [n for n, _ in loop.named_parameters()]
    missing += [
        k
        for k in [f"model.{n}" for n in names] + [f"ema.{n}" for n in names] + ["rng.torch"]
        if k not in tensors
    ]
    if missing:
        raise ValueError(f"{where}: incomplete, lacks {', '.join(missing[:6])}")
    try:
        saved, groups = json.loads(meta["args"]), json.loads(meta["param_groups"])
        step, seconds = int(meta["step"]), float(meta["seconds"])
    except ValueError as e:
        raise ValueError(f"{where}: unreadable metadata ({e})") from None
    if not isinstance(saved, dict) or not isinstance(groups, list):
        raise ValueError(  # noqa: TRY004 (a ValueError: the CLI's one-line errors)
            f"{where}: metadata 'args' must be a JSON object and 'param_groups' a list"
        )
    saved, now = flat_args(saved), flat_args(a)
    diff = sorted(k for k, v in now.items() if k not in RESUMABLE and saved.get(k) != v)
    if diff:
        raise ValueError(
            f"checkpoint {path} was written with different arguments: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in diff)
        )
    if not 0 <= step <= a.train_steps:
        raise ValueError(f"{where}: step {step} is outside 0..{a.train_steps} (--train-steps)")
    if not (seconds >= 0 and seconds != float("inf")):
        raise ValueError(f"{where}: training time {seconds!r} is not a finite number >= 0")
    for n, p in loop.named_parameters():
        for k in (f"model.{n}", f"ema.{n}"):
            if tensors[k].shape != p.shape or not bool(torch.isfinite(tensors[k]).all()):
                raise ValueError(
                    f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)} or non-finite values; "
                    f"expected finite values of shape {tuple(p.shape)}"
                )
    return step, seconds, groups


class StopFlag:
    """SIGINT / SIGTERM ask the loop to stop after the current step (and checkpoint); a second
    SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:  # noqa: PYI034
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step and writing a checkpoint")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def trim_log(path: Path, step: int) -> list[str] | None:
    """After a resume, drop the rows an interrupted run wrote after its last checkpoint. Returns the
    log's header (None without a log): the resumed run appends in those columns, so that a log an
    older version began stays aligned."""
    if not path.is_file():
        return None
    with path.open() as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(keep)
    return rows[0]


def append_row(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    """Appends one row to a CSV log, writing the header first if the file is new."""
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
