"""The search space of `ilf tune`: its arguments (`TuneArgs`), a candidate schedule (`Candidate`), every
schedule that uses up a budget (`search_space`), the hand-set rule (`baseline_candidate`) and the rungs of
successive halving (`rungs`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from ilf_runtime.config import ILFConfig

__all__ = [
    "Candidate",
    "TuneArgs",
    "baseline_candidate",
    "default_step_counts",
    "pick_candidates",
    "rungs",
    "search_space",
]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _strs(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class TuneArgs:
    """Search the ILF schedule that fits a budget of block evaluations per image (one candidate per rank).

    Args:
        model: built-in model name or local diffusers DiT / PixArt directory.
        out: search directory (tune.json, candidates.csv, frontier.png, one run folder per candidate,
            the winner's feedback.safetensors).
        from_weights: instead of a search: drop looped steps of this trained weights file, greedily by
            held-out PSNR, until it fits the budget, then train it on for final_steps from those weights
            (0: write it as it is); see `tune.prune`.
        budget: block evaluations per image (per guidance branch) a candidate may spend.
        speedup: instead of budget: the target speed-up over plain teacher_steps sampling
            (budget = teacher_steps x blocks / speedup, rounded down).
        teacher_steps: plain sampler steps of the teacher, the reference of every score.
        solver: ddim or dpmpp_2m (default: the model's scheduler).
        guidance: guidance scale (default: the model's).
        step_counts: student step counts to try, comma-separated (default: every divisor of
            teacher_steps from teacher_steps/4 up that leaves room for a loop).
        widths: loop widths (blocks in the loop) to try, comma-separated.
        iters: loop iterations to try, comma-separated.
        patterns: where the looped steps go: last (the last K steps) and/or spread (K steps spread
            evenly over the grid, ending on the last).
        inits: feedback block initialisations: copy (a copy of the loop's last block) and/or random.
        grid_search: before the search, move each step count's steps on the teacher's grid to where
            the plain sampler scores best on grid_samples held-out seeds (training-free, `tune.grid`), and
            train every candidate but the hand-set baseline on that grid.
        grid_samples: images the grid search scores each try on.
        grid_seed: first seed of those images (apart from the scoring seeds and the benchmarks').
        candidates: at most this many candidates (the baseline plus a seeded sample of the space).
        eta: successive halving keeps the best 1/eta of the candidates after each rung.
        min_steps: training steps of the first rung; rung r trains to min_steps x eta^r.
        final_steps: training steps of the winner (and the learning-rate horizon of every candidate).
        val_samples: held-out images each candidate is scored on.
        val_seed: first seed of the held-out images (image j has seed val_seed + j).
        prompts: text-to-image models: training prompts file.
        val_prompts: text-to-image models: scoring prompts file.
        states: data or teacher training states (as ilf train).
        bank_size: teacher trajectories in the bank.
        batch_size: samples per training step.
        lr: peak learning rate.
        warmup: learning-rate warm-up steps.
        ema: EMA decay of the feedback weights.
        seed: seed of the candidate sample and of every training run.
        max_minutes: stop (resumably) at the first candidate boundary after this much time (0: no limit).
        resume: continue the search in out.
        overwrite: start afresh in an out that holds an earlier search.
        progress: show a progress bar with the current best.
        device: cpu or cuda (default: CUDA when available).
    """

    model: str = "fashion-dit"
    out: str = "runs/ilf-tune"
    from_weights: str | None = None
    budget: int | None = None
    speedup: float | None = None
    teacher_steps: int = 20
    solver: str | None = field(default=None, metadata={"choices": ("ddim", "dpmpp_2m")})
    guidance: float | None = None
    step_counts: list[int] = field(default_factory=list, metadata={"type": _ints})
    widths: list[int] = field(default_factory=lambda: [1, 2, 3, 4], metadata={"type": _ints})
    iters: list[int] = field(default_factory=lambda: [1], metadata={"type": _ints})
    patterns: list[str] = field(default_factory=lambda: ["last", "spread"], metadata={"type": _strs})
    inits: list[str] = field(default_factory=lambda: ["copy"], metadata={"type": _strs})
    grid_search: bool = False
    grid_samples: int = 128
    grid_seed: int = 40_000_000
    candidates: int = 12
    eta: int = 2
    min_steps: int = 100
    final_steps: int = 1000
    val_samples: int = 128
    val_seed: int = 30_000_000
    prompts: str | None = None
    val_prompts: str | None = None
    states: str = field(default="teacher", metadata={"choices": ("data", "teacher")})
    bank_size: int = 1024
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.995
    seed: int = 0
    max_minutes: float = 0.0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    device: str | None = field(default=None, metadata={"choices": ("cpu", "cuda")})

    def __post_init__(self) -> None:
        if (self.budget is None) == (self.speedup is None):
            raise ValueError("give exactly one of --budget (block evaluations per image) or --speedup")
        bad = [
            f"{k} {v!r}"
            for k, v, ok in (
                ("--budget", self.budget, self.budget is None or self.budget >= 1),
                ("--speedup", self.speedup, self.speedup is None or 1 < self.speedup < 1e3),
                ("--eta", self.eta, self.eta >= 2),
                ("--candidates", self.candidates, self.candidates >= 1),
                ("--min-steps", self.min_steps, self.from_weights or 1 <= self.min_steps <= self.final_steps),
                ("--final-steps", self.final_steps, self.final_steps >= (0 if self.from_weights else 1)),
                ("--widths", self.widths, bool(self.widths) and min(self.widths) >= 1),
                ("--iters", self.iters, bool(self.iters) and 1 <= min(self.iters) and max(self.iters) <= 64),
                (
                    "--patterns",
                    self.patterns,
                    bool(self.patterns) and set(self.patterns) <= {"last", "spread"},
                ),
                ("--inits", self.inits, bool(self.inits) and set(self.inits) <= {"copy", "random"}),
                ("--step-counts", self.step_counts, all(s >= 1 for s in self.step_counts)),
                ("--val-samples", self.val_samples, self.val_samples >= 2),
                ("--grid-samples", self.grid_samples, self.grid_samples >= 2),
            )
            if not ok
        ]
        if bad:
            raise ValueError(
                f"invalid tune arguments: {', '.join(bad)} (expected: budget >= 1, 1 < speedup, eta >= 2, "
                "1 <= min_steps <= final_steps (final_steps 0 only with from_weights), widths >= 1, iters 1..64, patterns last|spread, "
                "inits copy|random, val_samples >= 2)"
            )

    def budget_for(self, layers: int) -> int:
        return self.budget if self.budget is not None else int(self.teacher_steps * layers / self.speedup)


@dataclass(frozen=True)
class Candidate:
    """One ILF schedule (``baseline``: the hand-set rule the search must beat)."""

    steps: int
    loop_start: int
    loop_end: int
    loop_steps: str
    loop_iters: int = 1
    feedback_init: str = "copy"
    baseline: bool = False
    grid: str = ""  # the student's steps on the teacher's grid (`TrainArgs.grid`; "": uniform)

    @property
    def name(self) -> str:
        spec = self.loop_steps.replace(":", "").replace(",", ".")
        grid = f"-g{self.grid.replace(',', '.')}" if self.grid else ""
        return (
            f"s{self.steps}-b{self.loop_start}-{self.loop_end}-{spec}-i{self.loop_iters}-{self.feedback_init}"
            + grid
        )

    def config(self) -> ILFConfig:
        init = f"copy:{self.loop_end}" if self.feedback_init == "copy" else "random"
        return ILFConfig(
            loop_start=self.loop_start,
            loop_end=self.loop_end,
            loop_iters=self.loop_iters,
            loop_steps=self.loop_steps,
            feedback_init=init,
        )

    def block_evals(self, layers: int) -> int:
        return self.config().block_evals(layers, self.steps)


def _looped(steps: int, k: int, pattern: str) -> str:
    """The step spec of `k` looped steps of `steps`: the last k, or k spread evenly (ending last)."""
    if k >= steps:
        return "all"
    if pattern == "last":
        return f"last:{k}"
    return ",".join(str(round((j + 1) * steps / k) - 1) for j in range(k))


def default_step_counts(teacher_steps: int, layers: int, budget: int) -> list[int]:
    return [
        d
        for d in range(max(1, math.ceil(teacher_steps / 4)), teacher_steps)
        if teacher_steps % d == 0 and d * layers < budget
    ]


def baseline_candidate(layers: int, budget: int, teacher_steps: int) -> Candidate | None:
    """The hand-set rule (how the shipped fashion-dit loops were chosen): the most steps up to half the
    teacher's that leave room for a loop, the middle pair of blocks with a copy of the second as the
    feedback block, and as many of the last steps looped as the budget allows. None when nothing fits."""
    a = max(0, layers // 2 - 1)
    b = min(layers - 1, a + 1)
    for steps in range(teacher_steps // 2, 0, -1):
        k = min(steps, (budget - steps * layers) // (b - a + 2))
        if teacher_steps % steps == 0 and k >= 1:
            return Candidate(steps, a, b, _looped(steps, k, "last"), baseline=True)
    return None


def search_space(a: TuneArgs, layers: int) -> list[Candidate]:
    """Every schedule of the flags' grid that fits the budget and uses it up, the baseline first."""
    budget = a.budget_for(layers)
    counts = a.step_counts or default_step_counts(a.teacher_steps, layers, budget)
    out: list[Candidate] = []
    for steps in counts:
        if a.teacher_steps % steps:
            raise ValueError(f"--step-counts: {steps} does not divide --teacher-steps {a.teacher_steps}")
        extra = budget - steps * layers
        for w in a.widths:
            if w > layers:
                continue
            for n in a.iters:
                k = min(steps, extra // ((w + 1) * n)) if extra > 0 else 0
                if k < 1:
                    continue
                specs = dict.fromkeys(_looped(steps, k, p) for p in a.patterns)
                for start in range(layers - w + 1):
                    for spec in specs:
                        for init in a.inits:
                            out.append(Candidate(steps, start, start + w - 1, spec, n, init))
    base = baseline_candidate(layers, budget, a.teacher_steps)
    if base is not None:
        out = [base] + [c for c in out if c != replace(base, baseline=False)]
    return out


def pick_candidates(space: list[Candidate], n: int, seed: int) -> list[Candidate]:
    """The baseline (if any) plus a seeded sample of the rest, `n` in all."""
    head = [c for c in space if c.baseline]
    rest = [c for c in space if not c.baseline]
    random.Random(seed).shuffle(rest)
    return (head + rest)[:n]


def rungs(n: int, a: TuneArgs) -> list[tuple[int, int]]:
    """(candidates entering, training steps) of each rung, while more than one candidate is left
    (the last one trains on to ``final_steps`` data-parallel over every rank, outside the rungs)."""
    out, steps = [(n, min(a.min_steps, a.final_steps))], a.min_steps
    while n > 1 and steps < a.final_steps:
        n, steps = max(1, math.ceil(n / a.eta)), steps * a.eta
        if n > 1:
            out.append((n, min(steps, a.final_steps)))
    return out
