"""`ilf train`: distil the feedback module of an ILF loop from the frozen backbone.

The backbone is frozen (``requires_grad_(False)``, eval mode) and only the feedback block and the
loop scales go to the optimiser. The teacher is the same transformer with the loop switched off,
which is bit for bit the plain backbone, run by the plain sampler at ``teacher_steps``; the
student is the looped model at ``steps``, whose grid must be a subset of the teacher's (trailing
spacing does that), so that one student step replaces ``k = teacher_steps / steps`` teacher steps.

Targets (``--target``, combinable with ``+``):

- ``trajectory``: the student's one solver step from ``x_{t_i}`` must land where the teacher's k
  steps land. The solver update is affine in the model output, so the squared error of the landing
  point divided by the step's output coefficient is the squared error of the model output against
  the output that would land exactly there (the solved target). With ``--unroll U`` the student
  runs U consecutive steps with gradients flowing through its own states, against the teacher's
  trajectory from the same start; with ``--rollout R`` the state of the trained step is reached by
  R steps of the student itself (no gradient) and the teacher takes over from there (on-policy).
- ``fast``: the paper's fast approximate distillation: the student's output at ``t`` regresses
  onto the frozen model's output on the same clean image and noise at ``t / 2``.
- ``--feature-weight``: the loop's output regresses onto the teacher's block-``b`` output at the
  state and timestep the step lands on.

Training states (``--states``): ``data`` noises real images (the bundled Fashion-MNIST model);
``teacher`` keeps a bank of teacher trajectories sampled from noise (data-free; for PixArt only
prompts or prompt embeddings are needed), regenerated every ``--bank-refresh`` steps.

Every random draw of step s on rank r comes from a generator seeded by (seed, rank, s), so a
resumed run repeats an uninterrupted one exactly. Under torchrun the ranks average gradients
(gloo on CPU, nccl on GPU); rank 0 writes checkpoints, logs and the weights file, and validation
sampling is sharded over the ranks.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_runtime.config import ILFConfig
from ilf_runtime.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_mean,
    barrier,
    init_distributed,
    shard,
)
from ilf_runtime.ilf import apply_ilf
from ilf_runtime.models import Conditioning
from ilf_runtime.sampling import make_noise, predict
from ilf_runtime.solvers import SolverState, make_solver
from ilf_runtime.weights import save_file_atomic

logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "TrainArgs", "main"]

TARGETS = ("trajectory", "fast")
CKPT = "checkpoint.safetensors"
WEIGHTS = "feedback.safetensors"


@dataclass
class TrainArgs:
    """One distillation run; command-line flags map one to one onto these fields.

    Args:
        model: built-in model name or local diffusers DiT / PixArt directory.
        out: run directory (checkpoint, logs, weights file).
        loop_start, loop_end, loop_iters, loop_steps, scale_shape, feedback_init, feedback_t_shift,
            init_seed: the `ILFConfig` of the loop (see there); ``loop_steps`` refers to the student grid.
        steps: student sampling steps.
        teacher_steps: plain sampler steps of the teacher; a multiple of ``steps``.
        solver: ``ddim`` or ``dpmpp_2m`` (default: the model's scheduler).
        guidance: guidance scale of teacher and student (default: the model's).
        target: ``trajectory``, ``fast`` or ``trajectory+fast``.
        fast_weight: weight of the ``fast`` term when combined.
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
        train_steps: optimiser steps.
        batch_size: samples per step and rank.
        lr, weight_decay, warmup, grad_clip: AdamW and its schedule (linear warm-up, cosine decay).
        ema: decay of the exponential moving average of the feedback parameters; the written weights
            are the EMA.
        seed: seed of every random draw (each rank and step derive their own generator from it).
        ckpt_every: steps between checkpoints.
        val_every: steps between validation passes (0: only at the end).
        val_samples: images of the fixed validation set (paired PSNR against the teacher's samples).
        max_minutes: stop with a checkpoint after this much training time (0: no limit).
        resume: continue from ``out/checkpoint.safetensors``.
        progress: show a progress bar.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
    """

    model: str = "fashion-dit"
    out: str = "runs/ilf-train"
    loop_start: int = 4
    loop_end: int = 6
    loop_iters: int = 1
    loop_steps: str = "last:5"
    scale_shape: str = "block"
    feedback_init: str = "random"
    feedback_t_shift: int = 0
    init_seed: int = 0
    steps: int = 10
    teacher_steps: int = 20
    solver: str | None = None
    guidance: float | None = None
    target: str = "trajectory"
    fast_weight: float = 1.0
    feature_weight: float = 0.0
    loss_space: str = "eps"
    unroll: int = 1
    rollout: int = 0
    states: str = "data"
    bank_size: int = 1024
    bank_refresh: int = 0
    bank_cache: str | None = None
    prompt_embeds: str | None = None
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
    max_minutes: float = 0.0
    resume: bool = False
    progress: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        parts = self.target.split("+")
        if not parts or any(p not in TARGETS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"target must be {' / '.join(TARGETS)} or a '+' combination, got {self.target!r}"
            )
        checks = {
            "steps": self.steps >= 1,
            "teacher_steps": self.teacher_steps >= self.steps and self.teacher_steps % self.steps == 0,
            "unroll": self.unroll >= 1,
            "rollout": self.rollout >= 0,
            "train_steps": self.train_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "bank_size": self.bank_size >= 1,
            "ema": 0.0 <= self.ema < 1.0,
            "loss_space": self.loss_space in ("eps", "x"),
            "states": self.states in ("data", "teacher"),
            "ckpt_every": self.ckpt_every >= 1,
            "val_samples": self.val_samples >= 2,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid training arguments: {', '.join(bad)} (teacher_steps must be a multiple of steps; "
                f"loss_space eps|x; states data|teacher; ema in [0, 1))"
            )

    def ilf_config(self) -> ILFConfig:
        names = {f.name for f in dataclasses.fields(ILFConfig)}
        return ILFConfig(**{k: v for k, v in asdict(self).items() if k in names})

    @property
    def targets(self) -> list[str]:
        return self.target.split("+")


# Named settings for the bundled model; `ilf train --preset NAME` starts from one (flags override).
# Chosen by benchmarks/ilf_settings.py (see benchmarks/results/ilf_settings.md); the shipped weights
# were trained with `torchrun --nproc-per-node 2 -m ilf_runtime train --preset NAME` (2 ranks).
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
    "fashion-dit-aggressive": _FASHION
    | {"steps": 5, "loop_steps": "all", "bank_size": 1024, "train_steps": 1200, "val_every": 400},
}


# -- small helpers -------------------------------------------------------------------------------
def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema: list[torch.Tensor], params: list[nn.Parameter], decay: float) -> None:
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def lr_at(step: int, a: TrainArgs) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    frac = (step - a.warmup) / max(1, a.train_steps - a.warmup)
    return a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one step's random draws: a pure function of (seed, rank, step, stream)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 10_000_019 + step) * 8 + stream)


def _output_coeff(solver, i: int) -> float:
    """d x_next / d model_output of step i (solver updates are affine in the output; scalar)."""
    x, st0, st1 = torch.zeros(1), SolverState(torch.zeros(1)), SolverState(torch.zeros(1))
    dev = solver.device
    one = solver.step(i, x.to(dev), torch.ones(1, device=dev), st1)
    zero = solver.step(i, x.to(dev), torch.zeros(1, device=dev), st0)
    return float((one - zero).double())


def _alphas(scheduler, device) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)  # (T,)


def _noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# -- conditioning sources ------------------------------------------------------------------------
class CondSource:
    """The model's distinct conditions (classes, or the prompt embeddings of ``--prompt-embeds``) to
    draw training and validation inputs from, by index."""

    def __init__(self, model, a: TrainArgs):
        self.model = model
        if not model.adapter.class_conditional and not a.prompt_embeds:
            raise ValueError(
                f"training a {model.adapter.transformer_class} needs --prompt-embeds FILE "
                "(safetensors with prompt_embeds)"
            )
        self.items = model.adapter.condition_set(model, prompt_embeds=a.prompt_embeds)
        self.n = len(next(iter(self.items.values())))

    def sample_kwargs(self, idx: torch.Tensor) -> dict[str, Any]:
        return {k: v[idx] for k, v in self.items.items()}

    def cond(self, idx: torch.Tensor) -> Conditioning:
        m = self.model
        return m.adapter.conditioning(m.transformer, height=m.image_size, width=m.image_size, **self.sample_kwargs(idx))


# -- the distiller --------------------------------------------------------------------------------
class Distiller:
    """Teacher and student solvers, training states, and the loss of one batch."""

    def __init__(self, model, loop, a: TrainArgs, info: DistInfo):
        self.m, self.loop, self.a, self.info = model, loop, a, info
        self.tf = model.transformer
        dev = model.device
        self.guidance = model.guidance if a.guidance is None else a.guidance
        self.S = make_solver(model.scheduler, a.steps, solver=a.solver, device=dev)
        self.T = make_solver(model.scheduler, a.teacher_steps, solver=a.solver, device=dev)
        self.k = a.teacher_steps // a.steps
        ts, tt = self.S.timesteps.tolist(), self.T.timesteps.tolist()
        if tt[:: self.k] != ts:
            raise ValueError(
                f"the student's {a.steps}-step grid {ts} is not every {self.k}th point of the teacher's "
                f"{a.teacher_steps}-step grid {tt}; use timestep_spacing='trailing'"
            )
        self.mask = loop.config.step_mask(a.steps)
        if not any(self.mask):
            raise ValueError(f"loop_steps={a.loop_steps!r} loops no step of {a.steps}: nothing to train")
        self.coeff = [_output_coeff(self.S, i) for i in range(a.steps)]
        for i, on in enumerate(self.mask):
            if on and abs(self.coeff[i]) < 1e-8:
                raise ValueError(
                    f"student step {i} ignores the model output (degenerate schedule); cannot train it"
                )
        self.multistep = self.S.name != "ddim"
        if self.multistep and (a.states == "data" or a.rollout or "fast" in a.targets):
            raise ValueError(
                f"{self.S.name} is multistep: train it with --states teacher, --rollout 0 and target trajectory"
            )
        self.starts = [i for i in range(a.steps - a.unroll + 1) if any(self.mask[i : i + a.unroll])]
        self.starts = [i for i in self.starts if i - a.rollout >= 0]
        if not self.starts:
            raise ValueError(
                "no student step fits unroll/rollout with a looped step; reduce --unroll or --rollout"
            )
        self.acp = _alphas(model.scheduler, dev)
        self.conds = CondSource(model, a)
        self.data = self._load_data() if a.states == "data" else None
        self.bank: dict[str, torch.Tensor] | None = None
        self.bank_id = -1

    # -- models --
    def teacher(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.loop.active = False
        try:
            with torch.no_grad():
                return predict(self.tf, x, t, cond, self.guidance)
        finally:
            self.loop.active = True

    def student(self, i: int, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.loop.active = bool(self.mask[i])
        try:
            return predict(self.tf, x, self.S.timesteps[i], cond, self.guidance)
        finally:
            self.loop.active = True

    def teacher_run(
        self, x: torch.Tensor, j0: int, n: int, cond: Conditioning, state: SolverState
    ) -> torch.Tensor:
        for j in range(j0, j0 + n):
            x = self.T.step(j, x, self.teacher(x, self.T.timesteps[j], cond), state)
        return x

    # -- states --
    def _load_data(self) -> torch.Tensor:
        from ilf_runtime.fashion import unsupported_reason
        from ilf_runtime.fashion.data import load_fashion_mnist, to_model_range

        c = self.tf.config
        reason = unsupported_reason(self.m)
        if reason:
            raise ValueError(f"--states data uses Fashion-MNIST, but {reason}; use --states teacher")
        ds = load_fashion_mnist("train")
        self.labels = ds.labels
        return to_model_range(ds.images, c.sample_size)  # (60000, 1, S, S) in [-1, 1]

    def _bank_file(self, bank_id: int) -> Path | None:
        """Where a bank is cached: its name hashes everything it depends on."""
        if not self.a.bank_cache:
            return None
        from ilf_runtime.weights import content_hash, backbone_fingerprint

        a = self.a
        backbone = {k: v for k, v in self.tf.state_dict().items() if not k.startswith("ilf_loop.")}
        key = json.dumps(
            [
                backbone_fingerprint(self.tf),
                content_hash(backbone),
                self.T.describe(),
                a.steps,
                a.teacher_steps,
                self.guidance,
                a.bank_size,
                a.seed,
                self.info.rank,
                bank_id,
                a.prompt_embeds,
            ],
            sort_keys=True,
            default=str,
        )
        return Path(a.bank_cache) / f"bank-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    @torch.no_grad()
    def build_bank(self, bank_id: int) -> None:
        """Teacher trajectories from noise: the state at every student grid point (and the end)."""
        from safetensors.torch import load_file

        cached = self._bank_file(bank_id)
        if cached is not None and cached.is_file():
            t = load_file(str(cached))
            self.bank = {"x": t["x"].to(self.m.device), "idx": t["idx"]}
            self.bank_id = bank_id
            return
        self._make_bank(bank_id)
        if cached is not None:
            save_file_atomic({"x": self.bank["x"].cpu().contiguous(), "idx": self.bank["idx"]}, cached)

    def _make_bank(self, bank_id: int) -> None:
        a, n = self.a, self.a.bank_size
        g = step_generator(a.seed, self.info.rank, bank_id, stream=7)
        idx = torch.randint(0, self.conds.n, (n,), generator=g)
        seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        xs = []
        bs = max(a.batch_size, 64)
        for lo in range(0, n, bs):
            hi = min(n, lo + bs)
            cond = self.conds.cond(idx[lo:hi])
            x = make_noise(seeds[lo:hi], self.m.latent_shape, device=self.m.device, dtype=self.m.dtype)
            st, traj = self.T.init_state(), [x]
            for i in range(a.steps):
                x = self.teacher_run(x, i * self.k, self.k, cond, st)
                traj.append(x)
            xs.append(torch.stack(traj, 1))  # (b, steps + 1, C, H, W)
        self.bank = {"x": torch.cat(xs), "idx": idx}
        self.bank_id = bank_id

    def start_state(self, i: int, step: int) -> dict[str, Any]:
        """One batch's state at student grid point i: ``x``, condition indices ``idx``, ``clean``
        (image, or (image, noise) for data states) and, for teacher states, the whole ``traj``."""
        a = self.a
        g = step_generator(a.seed, self.info.rank, step, stream=1)
        if a.states == "teacher":
            bank_id = 0 if a.bank_refresh == 0 else step // a.bank_refresh
            if bank_id != self.bank_id:
                self.build_bank(bank_id)
            rows = torch.randint(0, a.bank_size, (a.batch_size,), generator=g)
            traj = self.bank["x"][rows]  # (B, steps + 1, C, H, W)
            return {"x": traj[:, i], "idx": self.bank["idx"][rows], "clean": traj[:, -1], "traj": traj}
        rows = torch.randint(0, len(self.data), (a.batch_size,), generator=g)
        x0 = self.data[rows].to(self.m.device, self.m.dtype)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        x = _noised(x0, noise, self.S.timesteps[i].expand(x0.shape[0]), self.acp).to(x0.dtype)
        return {"x": x, "idx": self.labels[rows], "clean": (x0, noise), "traj": None}

    # -- loss --
    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of step `step` (its batch and student step drawn from the step's seed)."""
        a = self.a
        g = step_generator(a.seed, self.info.rank, step, stream=0)
        i0 = self.starts[int(torch.randint(0, len(self.starts), (1,), generator=g))]
        i = i0 - a.rollout
        st = self.start_state(i, step)
        x, cond = st["x"], self.conds.cond(st["idx"])
        with torch.no_grad():
            for r in range(a.rollout):  # on-policy: the student's own states up to the trained step
                x = self.S.step(i + r, x, self.student(i + r, x, cond), self.S.init_state())
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=x.device)
        if "trajectory" in a.targets:
            parts.update(self.trajectory_loss(i0, x, cond, st["traj"]))
            total = total + parts["trajectory"] + a.feature_weight * parts.get("feature", 0.0)
        if "fast" in a.targets:
            parts["fast"] = self.fast_loss(i0, x, st["clean"], cond)
            total = total + a.fast_weight * parts["fast"]
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def trajectory_loss(
        self, i0: int, x: torch.Tensor, cond: Conditioning, traj: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        a = self.a
        s_state, t_state = self.S.init_state(), self.T.init_state()
        with torch.no_grad():
            if self.multistep and i0 > 0:  # the student's history: its own x0 at the previous grid point
                x_prev = traj[:, i0 - 1]
                s_state.prev_x0 = self.S.predict_x0(i0 - 1, x_prev, self.student(i0 - 1, x_prev, cond))
            if traj is not None and a.rollout == 0:
                targets = [traj[:, i0 + u + 1] for u in range(a.unroll)]
            else:
                targets, xt = [], x
                for u in range(a.unroll):
                    xt = self.teacher_run(xt, (i0 + u) * self.k, self.k, cond, t_state)
                    targets.append(xt)
        cap: dict[str, torch.Tensor] = {}
        hook = None
        if a.feature_weight > 0:  # registered after ILF's own hook, so it sees the looped output last
            hook = self.tf.transformer_blocks[self.loop.config.loop_end].register_forward_hook(
                lambda mod, inp, out: cap.__setitem__("h", out)
            )
        losses = []
        try:
            for u in range(a.unroll):
                i = i0 + u
                out = self.student(i, x, cond)
                if hook is not None:
                    hook.remove()
                    hook = None
                x_next = self.S.step(i, x, out, s_state)
                scale = abs(self.coeff[i]) if a.loss_space == "eps" else 1.0
                losses.append(((x_next.float() - targets[u].float()) / scale).square().mean())
                x = x_next
        finally:
            if hook is not None:
                hook.remove()
        parts = {"trajectory": torch.stack(losses).mean()}
        if "h" in cap and i0 + 1 < a.steps:
            parts["feature"] = self.feature_loss(cap["h"], targets[0], i0 + 1, cond)
        return parts

    def feature_loss(
        self, h: torch.Tensor, x_next: torch.Tensor, i_next: int, cond: Conditioning
    ) -> torch.Tensor:
        """The loop's output against the teacher's block-b output where the step lands."""
        cap: dict[str, torch.Tensor] = {}
        block = self.tf.transformer_blocks[self.loop.config.loop_end]
        hook = block.register_forward_hook(lambda mod, inp, out: cap.__setitem__("h", out))
        try:
            self.teacher(x_next, self.S.timesteps[i_next], cond)
        finally:
            hook.remove()
        return (h.float() - cap["h"].float()).square().mean()

    def fast_loss(self, i: int, x: torch.Tensor, clean: Any, cond: Conditioning) -> torch.Tensor:
        """Teacher on the same clean image and noise at t/2 is the target of the student at t."""
        t = self.S.timesteps[i]
        if isinstance(clean, tuple):
            x0, noise = clean
        else:  # teacher states: the trajectory's end is the clean image; recover the noise at t
            x0 = clean
            a_t = self.acp[t]
            noise = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        t_half = torch.div(t, 2, rounding_mode="floor")
        x_half = _noised(x0, noise, t_half.expand(x0.shape[0]), self.acp).to(x.dtype)
        target = self.teacher(x_half, t_half, cond)
        return (self.student(i, x, cond).float() - target.float()).square().mean()


# -- validation -----------------------------------------------------------------------------------
class Validator:
    """Paired PSNR of the student's samples against the teacher's on a fixed seed set, sharded
    over the ranks; the teacher's images and the plain baselines are computed once."""

    def __init__(self, model, d: Distiller, a: TrainArgs, info: DistInfo):
        self.m, self.d, self.a, self.info = model, d, a, info
        n = a.val_samples
        self.idx = torch.arange(n) % d.conds.n
        self.seeds = [10_000_000 + j for j in range(n)]
        self.layers = len(model.transformer.transformer_blocks)
        self.cost = d.loop.config.block_evals(self.layers, a.steps)
        self.equal_steps = math.ceil(self.cost / self.layers)
        self.ref = self._images(a.teacher_steps, "none")
        self.plain = {s: self._psnr(self._images(s, "none")) for s in sorted({a.steps, self.equal_steps})}

    def _images(self, steps: int, loop_steps: str) -> torch.Tensor | None:
        from ilf_runtime.pipelines import sample

        mine = list(shard(len(self.seeds), self.info))
        out = sample(
            self.m,
            num_steps=steps,
            seeds=[self.seeds[j] for j in mine],
            solver=self.d.S.name,
            guidance_scale=self.d.guidance,
            loop_steps=loop_steps,
            batch_size=256,
            **self.d.conds.sample_kwargs(self.idx[mine]),
        )
        images = all_gather_cat(out.images.to(self.info.device), self.info).cpu()
        return images if self.info.is_main else None

    def _psnr(self, images: torch.Tensor | None) -> dict[str, Any] | None:
        from ilf_runtime.metrics import paired_psnr

        return None if images is None else paired_psnr(images, self.ref)

    def run(self) -> dict[str, Any] | None:
        r = self._psnr(self._images(self.a.steps, self.a.loop_steps))
        if r is None:
            return None
        base = self.plain[self.equal_steps]
        diff = r["per_image_psnr"] - base["per_image_psnr"]
        return {
            "psnr": r["psnr"],
            "psnr_se": r["psnr_se"],
            "block_evals": self.cost,
            "equal_cost_steps": self.equal_steps,
            "equal_cost_psnr": base["psnr"],
            "gain_db": float(diff.mean()),
            "gain_se": float(diff.std() / math.sqrt(diff.numel())),
            "plain_same_steps_psnr": self.plain[self.a.steps]["psnr"],
        }


# -- checkpoints ----------------------------------------------------------------------------------
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
    save_file_atomic(tensors, path, meta)


# Arguments that may change between an interrupted run and its resumption.
_RESUMABLE = {"resume", "max_minutes", "progress", "val_every", "ckpt_every", "device", "out", "bank_cache"}


def load_checkpoint(
    path: Path, loop: nn.Module, ema: list[torch.Tensor], opt, a: TrainArgs
) -> tuple[int, float]:
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
    saved = json.loads(meta["args"])
    diff = sorted(k for k, v in asdict(a).items() if k not in _RESUMABLE and saved.get(k) != v)
    if diff:
        raise ValueError(
            f"checkpoint {path} was written with different arguments: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(a, k)!r})" for k in diff)
        )
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
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), float(meta["seconds"])


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to stop after the current step (and checkpoint); a second
    SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:  # noqa: PYI034
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


def _trim_log(path: Path, step: int) -> None:
    """After a resume, drop the rows an interrupted run wrote after its last checkpoint."""
    if not path.is_file():
        return
    with path.open() as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(keep)


LOG_FIELDS = ["step", "loss", "trajectory", "fast", "feature", "lr", "samples_per_s", "seconds"]
VAL_FIELDS = ["step", "psnr", "psnr_se", "gain_db", "gain_se", "equal_cost_steps", "equal_cost_psnr"]


def _append(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


# -- main -----------------------------------------------------------------------------------------
def main(a: TrainArgs, model: Any = None) -> dict[str, Any]:
    """Trains the feedback module; returns the run summary (also written to ``out/summary.json``).

    Args:
        a: the run's arguments.
        model: an already loaded pipeline, transformer or `Model` to train on instead of ``a.model``
            (the loop is attached to it and stays attached, holding the trained EMA weights).
    """
    from ilf_runtime.registry import load_model, to_model
    from ilf_runtime.weights import content_hash, save_ilf_weights

    info = init_distributed(a.device)
    model = load_model(a.model, device=info.device) if model is None else to_model(model).to(info.device)
    tf = model.transformer.eval()
    requires_grad(tf, False)
    loop = apply_ilf(tf, a.ilf_config())
    requires_grad(loop, True)
    params = list(loop.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    ema = [p.detach().clone() for p in params]
    out = Path(a.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(info)
    ckpt = out / CKPT
    step, seconds = 0, 0.0
    if a.resume:
        step, seconds = load_checkpoint(ckpt, loop, ema, opt, a)
        if info.is_main:
            _trim_log(out / "log.csv", step)
            _trim_log(out / "val.csv", step)
        logger.info("resumed from %s at step %d", ckpt, step)
    elif info.is_main:
        for f in ("log.csv", "val.csv"):
            (out / f).unlink(missing_ok=True)

    d = Distiller(model, loop, a, info)
    val = Validator(model, d, a, info)

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint(ckpt, loop, ema, opt, a, step, seconds)
        barrier(info)

    def load_ema() -> None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)

    def validate(restore: bool = True) -> dict[str, Any] | None:
        live = [p.detach().clone() for p in params] if restore else []
        load_ema()
        try:
            r = val.run()
        finally:
            with torch.no_grad():
                for p, v in zip(params, live):
                    p.copy_(v)
        if r is not None:
            _append(out / "val.csv", VAL_FIELDS, {"step": step} | r)
            logger.info(
                "step %d: validation PSNR %.2f dB, %+.2f +- %.2f dB over plain %d steps",
                step,
                r["psnr"],
                r["gain_db"],
                r["gain_se"],
                r["equal_cost_steps"],
            )
        return r

    bar = None
    if a.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=a.train_steps, initial=step, desc="ilf train", unit="step")
    start_step, t_start = step, time.perf_counter() - seconds
    stopped = None
    with _StopFlag() as flag:
        while step < a.train_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, a)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss, parts = d.loss(step)
            loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            summary = torch.stack([loss.detach().float(), torch.tensor(float(flag.requested))])
            all_reduce_mean(grads + [summary], info)
            if not torch.isfinite(summary[0]):
                raise FloatingPointError(
                    f"non-finite training loss at step {step} ({float(summary[0])}); the last good checkpoint "
                    f"{ckpt} (step {step - step % a.ckpt_every if step >= a.ckpt_every else 0}) is kept; "
                    "lower --lr or check the inputs"
                )
            for p, g in zip(params, grads):
                p.grad = g
            if a.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
            opt.step()
            update_ema(ema, params, a.ema if step >= a.warmup else 0.0)
            step += 1
            seconds = time.perf_counter() - t_start
            if info.is_main:
                rate = a.batch_size * info.world_size / (time.perf_counter() - t0)
                row = {
                    "step": step,
                    "loss": float(summary[0]),
                    "lr": lr,
                    "samples_per_s": rate,
                    "seconds": seconds,
                }
                _append(out / "log.csv", LOG_FIELDS, row | parts)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(summary[0]):.4g}", samples_s=f"{rate:.0f}")
            out_of_time = a.max_minutes > 0 and seconds > a.max_minutes * 60
            if summary[1] > 0 or out_of_time:
                stopped = "signal" if summary[1] > 0 else "max_minutes"
                break
            if step % a.ckpt_every == 0:
                checkpoint()
            if a.val_every and step % a.val_every == 0 and step < a.train_steps:
                validate()
    if bar is not None:
        bar.close()
    checkpoint()
    result: dict[str, Any] = {"step": step, "seconds": round(seconds, 1), "finished": step >= a.train_steps}
    if stopped:
        logger.warning("stopped at step %d (%s); continue with --resume", step, stopped)
        return result | {"stopped": stopped}
    r = validate(restore=False)  # the loop keeps the EMA weights: they are what gets written
    # every rank must hold the same weights (same init, averaged gradients): check, don't assume
    digest = content_hash({n: p.detach().cpu() for n, p in loop.named_parameters()})
    digests = [digest]
    if info.enabled:
        digests = [None] * info.world_size
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different feedback weights: {digests}")
    if info.is_main:
        training = {
            "args": asdict(a),
            "steps": step,
            "seconds": round(seconds, 1),
            "steps_this_session": step - start_step,
            "world_size": info.world_size,
            "validation": {k: v for k, v in (r or {}).items()},
            "torch": torch.__version__,
        }
        sampler = {
            "num_steps": a.steps,
            "solver": d.S.name,
            "loop_steps": a.loop_steps,
            "guidance_scale": d.guidance,
            "teacher_steps": a.teacher_steps,
        }
        save_ilf_weights(out / WEIGHTS, tf, sampler=sampler, training=training)
        result |= {"weights": str(out / WEIGHTS), "validation": r, "rank_digests": digests}
        (out / "summary.json").write_text(json.dumps(result, indent=1))
    barrier(info)
    return result


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """One flag per `TrainArgs` field (``--loop-start``, ``--no-progress``, ...) plus ``--preset``."""
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named setting (flags override)")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
            else:
                p.add_argument(flag, action="store_true")
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=None, help=f"default: {f.default}")


def args_from_namespace(ns) -> TrainArgs:
    values = dict(PRESETS[ns.preset]) if getattr(ns, "preset", None) else {}
    for f in dataclasses.fields(TrainArgs):
        v = getattr(ns, f.name, None)
        if f.type in ("bool", bool):
            if v != f.default:
                values[f.name] = v
        elif v is not None:
            values[f.name] = v
    return TrainArgs(**values)
