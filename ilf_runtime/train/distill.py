"""The distillation: teacher and student, their training states and the losses of one batch.

States are noised data or a bank of teacher trajectories (cached on disk with ``--bank-cache``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint as activation_checkpoint

from ilf_runtime.distributed import DistInfo
from ilf_runtime.models import Conditioning, read_prompts
from ilf_runtime.sampling import make_noise, predict
from ilf_runtime.solvers import SolverState, make_solver
from ilf_runtime.train.args import TrainArgs
from ilf_runtime.weights import save_file_atomic

__all__ = ["CondSource", "Distiller", "step_generator"]


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


class CondSource:
    """The model's distinct conditions (classes, the prompts of a prompts file, or the prompt
    embeddings of ``--prompt-embeds``) to draw training and validation inputs from, by index."""

    def __init__(self, model, a: TrainArgs, prompts: str | None = None):
        self.model = model
        prompts = prompts or a.prompts
        if not model.adapter.class_conditional and not (a.prompt_embeds or prompts):
            raise ValueError(
                f"training a {model.adapter.transformer_class} needs --prompts FILE (one prompt per line) "
                "or --prompt-embeds FILE (safetensors with prompt_embeds)"
            )
        guided = (model.guidance if a.guidance is None else a.guidance) > 1
        self.items = model.adapter.condition_set(
            model,
            prompts=read_prompts(prompts) if prompts else None,
            prompt_embeds=None if prompts else a.prompt_embeds,
            guided=guided,
        )
        self.n = len(next(iter(self.items.values())))

    def sample_kwargs(self, idx: torch.Tensor) -> dict[str, Any]:
        return {k: v[idx] for k, v in self.items.items()}

    def cond(self, idx: torch.Tensor) -> Conditioning:
        m = self.model
        return m.adapter.conditioning(
            m.transformer, height=m.image_size, width=m.image_size, **self.sample_kwargs(idx)
        )


class Distiller:
    """Teacher and student solvers, training states, and the loss of one batch."""

    def __init__(self, model, loop, a: TrainArgs, info: DistInfo):
        self.m, self.loop, self.a, self.info = model, loop, a, info
        self.tf = model.transformer
        dev = model.device
        self.guidance = model.guidance if a.guidance is None else a.guidance
        self.T = make_solver(model.scheduler, a.teacher_steps, solver=a.solver, device=dev)
        if a.grid_starts is not None:  # a non-uniform grid: the student's steps are spans of the teacher's
            self.S = self.T.subset(a.grid_starts)
            self.spans = list(zip(a.grid_starts, [*a.grid_starts[1:], a.teacher_steps], strict=True))
        else:
            self.S = make_solver(model.scheduler, a.steps, solver=a.solver, device=dev)
            k = a.teacher_steps // a.steps
            ts, tt = self.S.timesteps.tolist(), self.T.timesteps.tolist()
            if tt[::k] != ts:
                raise ValueError(
                    f"the student's {a.steps}-step grid {ts} is not every {k}th point of the teacher's "
                    f"{a.teacher_steps}-step grid {tt}; use timestep_spacing='trailing'"
                )
            self.spans = [(i * k, (i + 1) * k) for i in range(a.steps)]  # student step i: teacher steps
        self.mask = loop.config.step_mask(a.steps)
        if not any(self.mask):
            raise ValueError(f"loop_steps={a.loop.loop_steps!r} loops no step of {a.steps}: nothing to train")
        self.coeff = [_output_coeff(self.S, i) for i in range(a.steps)]
        for i, on in enumerate(self.mask):
            if on and abs(self.coeff[i]) < 1e-8:
                raise ValueError(
                    f"student step {i} ignores the model output (degenerate schedule); cannot train it"
                )
        self.multistep = self.S.name != "ddim"
        if "final" in a.targets and (a.states != "teacher" or a.rollout):
            raise ValueError(
                f"target final needs --states teacher and --rollout 0, got --states {a.states} "
                f"--rollout {a.rollout}"
            )
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

    def span(self, i: int) -> tuple[int, int]:
        """Student step i as (first teacher step, number of teacher steps)."""
        lo, hi = self.spans[i]
        return lo, hi - lo

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
        from ilf_runtime.weights import backbone_fingerprint, content_hash

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
                a.prompts,
            ]
            + ([a.grid] if a.grid else []),  # (uniform grids keep the keys of earlier banks)
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
                x = self.teacher_run(x, *self.span(i), cond, st)
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
        if "final" in a.targets:
            parts["final"] = self.final_loss(st["traj"], cond)
            total = total + a.final_weight * parts["final"]
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def student_history(self, i: int, traj: torch.Tensor, cond: Conditioning, state: SolverState) -> None:
        """A multistep solver's history before student step i started from the teacher's state: the
        student's own x0 at the previous grid point of the trajectory (nothing for DDIM or step 0)."""
        if self.multistep and i > 0:
            x_prev = traj[:, i - 1]
            state.prev_x0 = self.S.predict_x0(i - 1, x_prev, self.student(i - 1, x_prev, cond))

    def trajectory_loss(
        self, i0: int, x: torch.Tensor, cond: Conditioning, traj: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        a = self.a
        s_state, t_state = self.S.init_state(), self.T.init_state()
        with torch.no_grad():
            self.student_history(i0, traj, cond, s_state)
            if traj is not None and a.rollout == 0:
                targets = [traj[:, i0 + u + 1] for u in range(a.unroll)]
            else:
                targets, xt = [], x
                for u in range(a.unroll):
                    xt = self.teacher_run(xt, *self.span(i0 + u), cond, t_state)
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

    def final_loss(self, traj: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The student's final image against the teacher's, from the teacher's state at the first
        looped step (``final_start`` noise: from the student's own state there) through the rest of the
        schedule; each step's model call is recomputed in the backward pass (activation checkpointing),
        so memory holds one step's activations."""
        f = self.mask.index(True)
        state = self.S.init_state()
        with torch.no_grad():
            if self.a.final_start == "noise":  # on-policy: the student's own unlooped steps up to f
                x = traj[:, 0]
                for i in range(f):
                    x = self.S.step(i, x, self.student(i, x, cond), state)
            else:
                x = traj[:, f]
                self.student_history(f, traj, cond, state)
        for i in range(f, self.a.steps):
            out = activation_checkpoint.checkpoint(self.student, i, x, cond, use_reentrant=False)
            x = self.S.step(i, x, out, state)
        return (x.float() - traj[:, -1].float()).square().mean()

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
