"""The training loop: `main` sets up one run, trains the feedback module and writes its weights."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.distributed import DistInfo, all_gather_objects, all_reduce_mean, barrier, init_distributed
from ilf_runtime.ilf import apply_ilf
from ilf_runtime.train.args import TrainArgs, flat_args
from ilf_runtime.train.checkpoint import (
    CKPT,
    LOG_FIELDS,
    VAL_FIELDS,
    WEIGHTS,
    StopFlag,
    append_row,
    load_checkpoint,
    save_checkpoint,
    trim_log,
)
from ilf_runtime.train.distill import Distiller
from ilf_runtime.train.validate import Validator
from ilf_runtime.weights import content_hash, load_ilf_weights, read_metadata, save_ilf_weights

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "lr_at", "main", "requires_grad", "update_ema", "warm_start"]


def requires_grad(module: nn.Module, flag: bool) -> None:
    """Sets ``requires_grad`` on every parameter of `module`."""
    for p in module.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params: list[nn.Parameter], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * params``, in place."""
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def lr_at(step: int, a: TrainArgs) -> float:
    """The learning rate of `step`: linear warm-up over ``a.warmup`` steps, then cosine decay to 0."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = (step - a.warmup) / max(1, a.train_steps - a.warmup)
    return a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# the loop's structure: a warm start must match these (the looped steps and the init may differ)
WARM_START_FIELDS = ("loop_start", "loop_end", "loop_iters", "scale_shape", "feedback_t_shift")


def warm_start(loop: nn.Module, transformer: nn.Module, a: TrainArgs) -> None:
    """Loads ``a.init_weights`` into a fresh loop, refusing a file of another backbone or loop."""
    w = load_ilf_weights(a.init_weights)
    w.check_backbone(transformer)
    diff = [
        f"{k} {getattr(w.config, k)!r} (run: {getattr(a.loop, k)!r})"
        for k in WARM_START_FIELDS
        if getattr(w.config, k) != getattr(a.loop, k)
    ]
    if diff:
        raise ValueError(f"--init-weights {a.init_weights} has another loop: {', '.join(diff)}")
    w.load_into(loop)


STALE_TMP_SECONDS = 600  # a bank cache's *.tmp untouched this long was left by an interrupted write


class Trainer:
    """One run: the looped model with its optimiser and EMA, the distiller and the validator, the
    step counter and the run directory (resumed from its checkpoint with ``a.resume``)."""

    def __init__(self, a: TrainArgs, model: Any, info: DistInfo, val_cache: dict | None = None):
        from ilf_runtime.registry import load_model, to_model

        self.a, self.info = a, info
        self.model = (
            load_model(a.model, device=info.device) if model is None else to_model(model).to(info.device)
        )
        self.tf = self.model.transformer.eval()
        requires_grad(self.tf, False)
        self.loop = apply_ilf(self.tf, a.loop)
        if a.init_weights:
            warm_start(self.loop, self.tf, a)
        requires_grad(self.loop, True)
        self.params = list(self.loop.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=a.weight_decay)
        self.ema = [p.detach().clone() for p in self.params]
        self.out = Path(a.out)
        self.ckpt = self.out / CKPT
        self.step, self.seconds = 0, 0.0
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed from
        self.log_fields = LOG_FIELDS  # log.csv's columns (a resumed log keeps its own)
        self.open_run_dir()
        self.start_step = self.step
        self.d = Distiller(self.model, self.loop, a, info)
        self.val = Validator(self.model, self.d, a, info, cache=val_cache)

    def open_run_dir(self) -> None:
        """Creates the run directory, then resumes from its checkpoint (dropping the log rows written
        after it) or starts the logs afresh."""
        a, info, out = self.a, self.info, self.out
        earlier = [f for f in (CKPT, WEIGHTS, "log.csv") if (out / f).exists()]  # every rank checks
        if earlier and not (a.resume or a.overwrite):
            raise ValueError(
                f"--out {out} holds an earlier run ({', '.join(earlier)}): pass --resume to continue it "
                "or --overwrite to start afresh"
            )
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in out.glob("*.safetensors*.tmp"):  # left by a write that a kill interrupted
                tmp.unlink(missing_ok=True)
            if a.bank_cache:  # a shared cache: only what no write can still be busy with
                stale = time.time() - STALE_TMP_SECONDS
                for tmp in Path(a.bank_cache).glob("bank-*.safetensors*.tmp"):
                    try:
                        if tmp.stat().st_mtime < stale:
                            tmp.unlink()
                    except FileNotFoundError:  # renamed into place (or removed) meanwhile
                        pass
        barrier(info)
        if a.resume:
            self.step, self.seconds = load_checkpoint(self.ckpt, self.loop, self.ema, self.opt, a)
            self.saved_step = self.step
            if info.is_main:
                self.log_fields = trim_log(out / "log.csv", self.step) or LOG_FIELDS
                trim_log(out / "val.csv", self.step)
            logger.info("resumed from %s at step %d", self.ckpt, self.step)
        elif info.is_main:
            for f in ("log.csv", "val.csv", CKPT, WEIGHTS):
                (out / f).unlink(missing_ok=True)

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint of the current step; every rank waits for it."""
        if self.info.is_main:
            save_checkpoint(self.ckpt, self.loop, self.ema, self.opt, self.a, self.step, self.seconds)
        self.saved_step = self.step
        barrier(self.info)

    def validate(self, restore: bool = True) -> dict[str, Any] | None:
        """Validates the EMA weights (rank 0 gets the result and logs it); with `restore` the live
        weights are put back afterwards, else the loop keeps the EMA weights."""
        live = [p.detach().clone() for p in self.params] if restore else []
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        try:
            r = self.val.run()
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)
        if r is not None:
            append_row(self.out / "val.csv", VAL_FIELDS, {"step": self.step} | r)
            logger.info(
                "step %d: validation PSNR %.2f dB, %+.2f +- %.2f dB over plain %d steps",
                self.step,
                r["psnr"],
                r["gain_db"],
                r["gain_se"],
                r["equal_cost_steps"],
            )
        return r

    def optimizer_step(self, flag: StopFlag) -> tuple[float, dict[str, float], float, bool]:
        """One step on every rank: the loss, gradients averaged over the ranks, AdamW, the EMA.
        Returns the loss averaged over the ranks, this rank's loss parts, the learning rate, and
        whether any rank was asked to stop (`flag` is read after the loss: a stop requested during
        this step ends the run after it)."""
        a, params = self.a, self.params
        lr = lr_at(self.step, a)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss, parts = self.d.loss(self.step)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        summary = torch.stack(
            [loss.detach().float(), torch.tensor(float(flag.requested), device=loss.device)]
        )
        all_reduce_mean(grads + [summary], self.info)
        if not torch.isfinite(summary[0]):
            kept = (
                "no checkpoint was written yet"
                if self.saved_step is None
                else f"the last good checkpoint {self.ckpt} (step {self.saved_step}) is kept"
            )
            raise FloatingPointError(
                f"non-finite training loss at step {self.step} ({float(summary[0])}); {kept}; "
                "lower --lr or check the inputs"
            )
        for p, g in zip(params, grads):
            p.grad = g
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        self.opt.step()
        update_ema(self.ema, params, a.ema if self.step >= a.warmup else 0.0)
        self.step += 1
        return float(summary[0]), parts, lr, bool(summary[1] > 0)

    def log_step(self, loss: float, parts: dict[str, float], lr: float, t0: float, bar: Any) -> None:
        """Rank 0: the step's row of log.csv and the progress bar (`t0`: when the step began)."""
        rate = self.a.batch_size * self.info.world_size / (time.perf_counter() - t0)
        row = {"step": self.step, "loss": loss, "lr": lr, "samples_per_s": rate, "seconds": self.seconds}
        append_row(self.out / "log.csv", self.log_fields, row | parts)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{rate:.0f}")

    def train(self, until: int | None = None) -> str | None:
        """Steps up to ``train_steps`` (or `until`, if that comes first: ``ilf tune`` trains its
        candidates in slices of one schedule), checkpointing and validating on schedule. Returns why
        it stopped early (``"signal"``, ``"max_minutes"``), or None."""
        a = self.a
        end = a.train_steps if until is None else min(until, a.train_steps)
        bar = None
        if a.progress and self.info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=a.train_steps, initial=self.step, desc="ilf train", unit="step")
        t_start = time.perf_counter() - self.seconds
        try:
            with StopFlag() as flag:
                while self.step < end:
                    t0 = time.perf_counter()
                    loss, parts, lr, stop = self.optimizer_step(flag)
                    self.seconds = time.perf_counter() - t_start
                    if self.info.is_main:
                        self.log_step(loss, parts, lr, t0, bar)
                    if stop or (a.max_minutes > 0 and self.seconds > a.max_minutes * 60):
                        return "signal" if stop else "max_minutes"
                    if self.step % a.ckpt_every == 0:
                        self.checkpoint()
                    if a.val_every and self.step % a.val_every == 0 and self.step < a.train_steps:
                        self.validate()
        finally:
            if bar is not None:
                bar.close()
        return None

    def rank_digests(self) -> list[str]:
        """The feedback weights' content hash on every rank. Same initialisation and averaged
        gradients must give every rank the same weights: checked here, not assumed."""
        digest = content_hash({n: p.detach().cpu() for n, p in self.loop.named_parameters()})
        digests = all_gather_objects(digest, self.info)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different feedback weights: {digests}")
        return digests

    def finish(self, result: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """After the last step: validates the EMA weights, which the loop keeps (they are what gets
        written), and (rank 0) writes the weights file and ``summary.json``; `extra` goes into the
        file's ``training`` metadata (``ilf tune`` puts its search log there)."""
        a = self.a
        r = self.validate(restore=False)
        digests = self.rank_digests()
        if self.info.is_main:
            training = {
                "args": flat_args(a),
                "steps": self.step,
                "seconds": round(self.seconds, 1),
                "steps_this_session": self.step - self.start_step,
                "world_size": self.info.world_size,
                "validation": dict(r or {}),
                "torch": torch.__version__,
            } | dict(extra or {})
            if a.init_weights:  # what the warm start began from: the file's checksum and its training
                meta = read_metadata(a.init_weights)
                earlier = meta.get("training") or {}
                training["init_weights"] = {
                    "content_sha256": meta["content_sha256"],
                    "steps": earlier.get("steps"),
                    "args": earlier.get("args"),
                }
            sampler = {
                "num_steps": a.steps,
                "solver": self.d.S.name,
                "loop_steps": a.loop.loop_steps,
                "guidance_scale": self.d.guidance,
                "teacher_steps": a.teacher_steps,
            } | ({"grid": a.grid} if a.grid else {})
            save_ilf_weights(self.out / WEIGHTS, self.tf, sampler=sampler, training=training)
            result |= {"weights": str(self.out / WEIGHTS), "validation": r, "rank_digests": digests}
            (self.out / "summary.json").write_text(json.dumps(result, indent=1))
        barrier(self.info)
        return result


def main(a: TrainArgs, model: Any = None) -> dict[str, Any]:
    """Trains the feedback module; returns the run summary (also written to ``out/summary.json``).

    Args:
        a: the run's arguments.
        model: an already loaded pipeline, transformer or `Model` to train on instead of ``a.model``
            (the loop is attached to it and stays attached, holding the trained EMA weights).
    """
    run = Trainer(a, model, init_distributed(a.device))
    stopped = run.train()
    run.checkpoint()
    result: dict[str, Any] = {
        "step": run.step,
        "seconds": round(run.seconds, 1),
        "finished": run.step >= a.train_steps,
    }
    if stopped:
        logger.warning("stopped at step %d (%s); continue with --resume", run.step, stopped)
        return result | {"stopped": stopped}
    return run.finish(result)
