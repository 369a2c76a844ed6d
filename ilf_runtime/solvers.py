"""Graph-ready solver steps for the runtime's own denoising loop.

A :class:`Solver` holds the model timesteps and every per-step coefficient as device tensors, computed once
at construction from a diffusers scheduler's grid (``timesteps``, ``alphas_cumprod``, ``sigmas``). ``step`` is
pure tensor math indexed by the Python int step index: no ``.item()``, no host sync, no branch on a tensor
value and no tensor built from a Python scalar, so a whole sampling loop can be captured as one CUDA graph.

The update rules are written here from the DDIM and DPM-Solver++ papers; diffusers' schedulers are used only
to lay out the grid and as test oracles. Coefficients are computed with the same float32 0-dim operations
the schedulers use, so a float32 trajectory matches ``scheduler.step`` to rounding.

Typical loop::

    solver = make_solver(pipe.scheduler, 20, device="cuda")
    state = solver.init_state()
    for i in range(solver.num_steps):
        x = solver.step(i, x, model(x, solver.timesteps[i]), state)
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "SOLVERS",
    "DDIMSolver",
    "DPMSolverPP2M",
    "Solver",
    "SolverState",
    "check_grid",
    "dynamic_threshold",
    "make_solver",
]

# Config keys that shape the noise schedule and grid; recorded by describe().
_COMMON_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
)


@dataclass
class SolverState:
    """Per-run mutable solver state; create one with :meth:`Solver.init_state` for every sampling run.

    Args:
        prev_x0: x0 prediction of the previous step (used by multistep solvers), ``None`` before step 0.
    """

    prev_x0: Tensor | None = None


class Solver:
    """Base class: a precomputed timestep grid and a pure-tensor ``step``.

    Attributes:
        name: solver name as accepted by :func:`make_solver` (``"ddim"``, ``"dpmpp_2m"``).
        num_steps: number of denoising steps (model evaluations).
        timesteps: ``(num_steps,)`` int64 model timesteps on the solver's device, equal to the diffusers
            scheduler's ``timesteps`` after ``set_timesteps(num_steps)``.
        init_noise_sigma: standard deviation of the initial noise the loop must start from.
        dtype: dtype of the coefficient tensors (and of the update arithmetic where diffusers upcasts).
    """

    name: str = ""
    _tensor_attrs: tuple[str, ...] = ("timesteps",)
    _config_keys: tuple[str, ...] = ()
    grid: tuple[int, ...] | None = None  # start indices into the parent grid (set by subset)
    grid_steps: int | None = None  # steps of that parent grid

    def __init__(self, scheduler: Any, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.config = dict(scheduler.config)
        self.scheduler_class = type(scheduler).__name__
        self._timestep_list = [int(t) for t in scheduler.timesteps]  # host copy for describe()
        self.timesteps = scheduler.timesteps.to(dtype=torch.int64)  # (N,)
        self.num_steps = int(self.timesteps.numel())
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self.dtype = dtype
        self._device = device

    def _finish(self) -> None:
        """Move all tensors to the requested device once subclasses have built them."""
        self.to(self._device if self._device is not None else "cpu")

    @property
    def device(self) -> torch.device:
        return self.timesteps.device

    def to(self, device: torch.device | str) -> Solver:
        """Move every precomputed tensor to ``device`` (in place); returns ``self``."""
        for name in self._tensor_attrs:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def subset(self, starts: Sequence[int]) -> Solver:
        """This solver on part of its own grid (a student's grid on its teacher's): step i starts at
        ``timesteps[starts[i]]`` and lands where step ``starts[i + 1] - 1`` lands (the end for the last).

        ``starts`` = ``range(0, N, k)`` is the uniform N/k-step grid of trailing spacing; any other
        increasing list from 0 spends the steps unevenly (e.g. shorter steps near the end)."""
        if self.grid is not None:
            raise ValueError("subset of a subset: take the grid from the full solver")
        starts = check_grid(starts, self.num_steps)
        ends = [*starts[1:], self.num_steps]
        new = copy.copy(self)
        new.grid, new.grid_steps = tuple(starts), self.num_steps
        new._timestep_list = [self._timestep_list[j] for j in starts]
        new.timesteps = self.timesteps[torch.tensor(starts, device=self.device)]  # (n,)
        new.num_steps = len(starts)
        new._restrict(starts, ends)
        return new

    def _restrict(self, starts: list[int], ends: list[int]) -> None:
        raise NotImplementedError

    def init_state(self) -> SolverState:
        """Fresh state for one sampling run."""
        return SolverState()

    def predict_x0(self, i: int, x: Tensor, model_output: Tensor) -> Tensor:
        """The clean-sample prediction at step ``i`` (after clipping/thresholding), in ``x``'s dtype."""
        self._check_index(i)
        return self._x0(i, x, model_output).to(x.dtype)

    def step(self, i: int, x: Tensor, model_output: Tensor, state: SolverState) -> Tensor:
        """Advance ``x`` from ``timesteps[i]`` to the next noise level; returns a tensor of ``x``'s dtype."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Strict-JSON description (name, steps, timesteps, schedule config) for weights-file metadata.

        ``make_solver(d["config"], d["num_steps"], solver=d["name"])`` rebuilds the solver. Non-finite floats
        (``lambda_min_clipped``'s default -inf) are left out; the scheduler default restores them.
        """
        keys = _COMMON_KEYS + self._config_keys
        config = {k: _jsonable(self.config[k]) for k in keys if k in self.config}
        config = {k: v for k, v in config.items() if not (isinstance(v, float) and not math.isfinite(v))}
        out = {
            "name": self.name,
            "num_steps": self.num_steps,
            "timesteps": list(self._timestep_list),
            "scheduler_class": self.scheduler_class,
            "config": config,
        }
        if self.grid is not None:
            out.update(grid=list(self.grid), grid_steps=self.grid_steps)
        return out

    def _x0(self, i: int, x: Tensor, model_output: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step index {i} out of range for a {self.num_steps}-step {self.name} solver")

    def _threshold(self, x0: Tensor) -> Tensor:
        return dynamic_threshold(
            x0, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, device={self.device}, dtype={self.dtype})"


class DDIMSolver(Solver):
    """Deterministic DDIM (eta = 0), matching ``diffusers.DDIMScheduler.step`` semantics.

    The step from ``t = timesteps[i]`` lands on ``t - num_train_timesteps // num_steps`` (DDIM's rule, which
    is not always the next grid point), or on ``final_alpha_cumprod`` once that is negative. Supports epsilon,
    v_prediction and sample outputs, ``clip_sample`` and dynamic ``thresholding`` of the x0 prediction.
    """

    name = "ddim"
    _tensor_attrs = (
        "timesteps",
        "sqrt_alpha",
        "sqrt_beta",
        "sqrt_alpha_prev",
        "sqrt_beta_prev",
    )
    _config_keys = ("set_alpha_to_one", "clip_sample", "clip_sample_range")

    def __init__(self, scheduler: Any, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(scheduler, dtype, device)
        cfg = self.config
        if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise NotImplementedError(f"ddim: prediction_type {cfg['prediction_type']!r} is not supported")
        self.prediction_type = cfg["prediction_type"]
        acp = scheduler.alphas_cumprod  # (T,) float32
        final = scheduler.final_alpha_cumprod
        stride = cfg["num_train_timesteps"] // scheduler.num_inference_steps
        sa, sb, sap, sbp = [], [], [], []
        for t in self.timesteps.tolist():
            a_t = acp[t]
            a_prev = acp[t - stride] if t - stride >= 0 else final
            sa.append(a_t**0.5)
            sb.append((1 - a_t) ** 0.5)
            sap.append(a_prev**0.5)
            sbp.append((1 - a_prev) ** 0.5)  # eta = 0: the whole remaining noise goes along eps
        self.sqrt_alpha, self.sqrt_beta, self.sqrt_alpha_prev, self.sqrt_beta_prev = (
            torch.stack(c).to(dtype) for c in (sa, sb, sap, sbp)
        )  # (N,) each
        self._finish()

    def _x0_eps(self, i: int, x: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor]:
        sa, sb = self.sqrt_alpha[i], self.sqrt_beta[i]  # 0-dim views, no sync
        if self.prediction_type == "epsilon":
            x0, eps = (x - sb * model_output) / sa, model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - sa * x0) / sb
        else:
            x0, eps = sa * x - sb * model_output, sa * model_output + sb * x
        if self.config["thresholding"]:
            x0 = self._threshold(x0)
        elif self.config["clip_sample"]:
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        # eps is not re-derived from the clipped x0 (diffusers' default use_clipped_model_output=False).
        return x0, eps

    def _x0(self, i: int, x: Tensor, model_output: Tensor) -> Tensor:
        return self._x0_eps(i, x, model_output)[0]

    def _restrict(self, starts: list[int], ends: list[int]) -> None:
        at = torch.tensor(starts, device=self.device)
        to = torch.tensor([e - 1 for e in ends], device=self.device)  # the parent step landing there
        self.sqrt_alpha, self.sqrt_beta = self.sqrt_alpha[at], self.sqrt_beta[at]
        self.sqrt_alpha_prev, self.sqrt_beta_prev = self.sqrt_alpha_prev[to], self.sqrt_beta_prev[to]

    def step(self, i: int, x: Tensor, model_output: Tensor, state: SolverState) -> Tensor:
        self._check_index(i)
        x0, eps = self._x0_eps(i, x, model_output)
        return (self.sqrt_alpha_prev[i] * x0 + self.sqrt_beta_prev[i] * eps).to(x.dtype)


class DPMSolverPP2M(Solver):
    """DPM-Solver++ multistep (data prediction), order 2 (or 1), matching ``DPMSolverMultistepScheduler``.

    Step 0 is first order; later steps use the previous x0 prediction (kept in :class:`SolverState`). The
    final step is first order when ``euler_at_final``, ``final_sigmas_type == "zero"``, or
    ``lower_order_final`` with fewer than 15 steps, as in diffusers. Sigma grids (Karras, exponential, beta,
    Lu lambdas, ``lambda_min_clipped``) are read from the scheduler. Update arithmetic runs in ``dtype``.
    """

    name = "dpmpp_2m"
    _tensor_attrs = ("timesteps", "alpha", "sigma", "c_x", "c_d0", "c_d1", "inv_r0")
    _config_keys = (
        "algorithm_type",
        "solver_order",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "final_sigmas_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "lambda_min_clipped",
    )

    def __init__(self, scheduler: Any, dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(scheduler, dtype, device)
        cfg = self.config
        unsupported = {
            "algorithm_type": (cfg["algorithm_type"], cfg["algorithm_type"] != "dpmsolver++"),
            "solver_order": (cfg["solver_order"], cfg["solver_order"] not in (1, 2)),
            "solver_type": (cfg["solver_type"], cfg["solver_type"] not in ("midpoint", "heun")),
            "prediction_type": (
                cfg["prediction_type"],
                cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"),
            ),
            "variance_type": (cfg.get("variance_type"), cfg.get("variance_type") is not None),
            "use_flow_sigmas": (cfg.get("use_flow_sigmas"), bool(cfg.get("use_flow_sigmas"))),
            "use_dynamic_shifting": (cfg.get("use_dynamic_shifting"), bool(cfg.get("use_dynamic_shifting"))),
        }
        bad = {k: v for k, (v, is_bad) in unsupported.items() if is_bad}
        if bad:
            raise NotImplementedError(
                "dpmpp_2m supports algorithm_type='dpmsolver++', solver_order 1 or 2, solver_type "
                "midpoint/heun, epsilon/v_prediction/sample outputs, variance_type=None (split learned-sigma "
                f"channels before the solver) and no flow sigmas; got {bad}"
            )
        self.prediction_type = cfg["prediction_type"]
        ve = scheduler.sigmas.to(torch.float32)  # (N + 1,) sqrt((1 - abar) / abar); ve[N] is the final target
        # 0-dim float32 ops one value at a time: the same rounding as the scheduler's own per-step arithmetic.
        self._points = [_vp_alpha_sigma(ve[k]) for k in range(self.num_steps + 1)]  # (alpha, sigma) per point
        self._build(self._points)
        self._finish()

    def _build(self, points: list[tuple[Tensor, Tensor]]) -> None:
        """Orders and coefficients of the steps between consecutive (alpha, sigma) points."""
        cfg, n, dtype = self.config, len(points) - 1, self.dtype
        final_low = (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero"
        )
        # Python ints: the order of each step is fixed by the step index, never by tensor values.
        self.orders = [
            1 if cfg["solver_order"] == 1 or i == 0 or (i == n - 1 and final_low) else 2 for i in range(n)
        ]
        alpha, sigma = zip(*points, strict=True)
        lam = [
            torch.log(a) - torch.log(s) for a, s in zip(alpha, sigma, strict=True)
        ]  # log-SNR / 2, +inf at sigma = 0
        zero = torch.zeros((), dtype=torch.float32)
        c_x, c_d0, c_d1, inv_r0 = [], [], [], []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            c_x.append(sigma[i + 1] / sigma[i])
            c_d0.append(alpha[i + 1] * (torch.exp(-h) - 1.0))
            if self.orders[i] == 2:
                r0 = (lam[i] - lam[i - 1]) / h
                inv_r0.append(1.0 / r0)
                if cfg["solver_type"] == "midpoint":
                    c_d1.append(0.5 * c_d0[-1])
                else:  # heun; stored negated so that step always subtracts
                    c_d1.append(-(alpha[i + 1] * ((torch.exp(-h) - 1.0) / h + 1.0)))
            else:
                inv_r0.append(zero)
                c_d1.append(zero)
        self.alpha = torch.stack(alpha[:n]).to(dtype)  # (N,) VP alpha at timesteps[i]
        self.sigma = torch.stack(sigma[:n]).to(dtype)  # (N,) VP sigma at timesteps[i]
        self.c_x, self.c_d0, self.c_d1, self.inv_r0 = (
            torch.stack(c).to(dtype) for c in (c_x, c_d0, c_d1, inv_r0)
        )

    def _restrict(self, starts: list[int], ends: list[int]) -> None:
        device = self.device
        self._points = [self._points[k] for k in [*starts, ends[-1]]]
        self._build(self._points)
        self.to(device)

    def _x0(self, i: int, x: Tensor, model_output: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            x0 = (x - self.sigma[i] * model_output) / self.alpha[i]
        elif self.prediction_type == "v_prediction":
            x0 = self.alpha[i] * x - self.sigma[i] * model_output
        else:
            x0 = model_output
        return self._threshold(x0) if self.config["thresholding"] else x0

    def step(self, i: int, x: Tensor, model_output: Tensor, state: SolverState) -> Tensor:
        self._check_index(i)
        x0 = self._x0(i, x, model_output)  # model_output's dtype, as in diffusers
        xs = x.to(self.dtype)
        out = self.c_x[i] * xs - self.c_d0[i] * x0
        if self.orders[i] == 2:
            if state.prev_x0 is None:
                raise ValueError(f"dpmpp_2m: step {i} needs the state of step {i - 1}; run steps in order")
            d1 = self.inv_r0[i] * (x0 - state.prev_x0)  # finite difference of x0 in log-SNR
            out = out - self.c_d1[i] * d1
        state.prev_x0 = x0
        return out.to(x.dtype)


# solver name -> (the diffusers scheduler class it reproduces, its class); the names flags accept
SOLVERS: dict[str, tuple[str, type[Solver]]] = {
    "ddim": ("DDIMScheduler", DDIMSolver),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", DPMSolverPP2M),
}


def make_solver(
    scheduler_or_config: Any,
    num_steps: int,
    *,
    solver: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    grid: Sequence[int] | None = None,
) -> Solver:
    """Build a graph-ready solver for ``num_steps`` steps from a diffusers scheduler or its config.

    Args:
        scheduler_or_config: a diffusers scheduler instance (not modified) or its config mapping
            (``_class_name`` is needed when ``solver`` is None).
        num_steps: number of denoising steps.
        solver: ``"ddim"`` or ``"dpmpp_2m"``; None infers it from the scheduler class. A solver that differs
            from the scheduler class is built like ``TargetScheduler.from_config(config)`` would be.
        device: device of the precomputed tensors (default CPU).
        dtype: dtype of the precomputed coefficients.
        grid: a non-uniform grid: start indices into the ``num_steps``-step grid (`Solver.subset`); the
            solver then takes ``len(grid)`` steps.
    """
    if isinstance(scheduler_or_config, Mapping):
        config, cls_name = dict(scheduler_or_config), scheduler_or_config.get("_class_name")
    elif hasattr(scheduler_or_config, "config"):
        config, cls_name = dict(scheduler_or_config.config), type(scheduler_or_config).__name__
    else:
        got = type(scheduler_or_config).__name__
        raise TypeError(f"expected a diffusers scheduler or its config dict, got {got}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    by_class = {c: name for name, (c, _) in SOLVERS.items()}
    if solver is None:
        if cls_name is None:
            raise ValueError("config has no '_class_name'; pass solver='ddim' or solver='dpmpp_2m'")
        if cls_name not in by_class:
            supported = ", ".join(f"{c} -> {n!r}" for c, n in by_class.items())
            raise ValueError(f"cannot infer a solver for scheduler class {cls_name!r}; supported {supported}")
        solver = by_class[cls_name]
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SOLVERS)}")
    target_cls_name, solver_cls = SOLVERS[solver]

    import diffusers  # deferred: importing the runtime should not pull in diffusers

    if cls_name != target_cls_name:
        logger.info("building %s solver from a %s config", solver, cls_name)
        if solver == "ddim" and "clip_sample" not in config:
            logger.warning(
                "config has no clip_sample; DDIMScheduler's default clip_sample=True applies (x0 clipped to "
                "+-clip_sample_range); pass {**config, 'clip_sample': False} to disable"
            )
    scheduler = getattr(diffusers, target_cls_name).from_config(config)
    scheduler.set_timesteps(num_steps)
    full = solver_cls(scheduler, dtype=dtype, device=device)
    return full if grid is None else full.subset(grid)


def check_grid(starts: Any, num_steps: int) -> list[int]:
    """``starts`` as a list of ints: 0 first, strictly increasing, each below ``num_steps``; else a
    one-line ValueError."""
    try:
        out = [int(v) for v in starts]
    except (TypeError, ValueError):
        raise ValueError(f"grid: expected step indices like 0,2,4, got {starts!r}") from None
    if not out or out[0] != 0 or any(b <= a for a, b in itertools.pairwise(out)) or out[-1] >= num_steps:
        raise ValueError(
            f"grid: expected increasing step indices from 0 below {num_steps} (the teacher's steps), got {out}"
        )
    return out


def _vp_alpha_sigma(ve_sigma: Tensor) -> tuple[Tensor, Tensor]:
    """VE sigma = sqrt((1 - abar) / abar) -> VP pair (sqrt(abar), sqrt(1 - abar))."""
    alpha = 1 / ((ve_sigma**2 + 1) ** 0.5)
    return alpha, ve_sigma * alpha


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen dynamic thresholding: per sample, s = quantile(|x0|, ratio) clamped to [1, max_value]; x0 is
    clamped to [-s, s] and divided by s.

    The quantile is taken by sort + linear interpolation at Python-int ranks (``torch.quantile``'s default
    rule), which is sync-free and has no input-size limit.
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)  # (B, D)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    n = flat.shape[1]
    rank = ratio * (n - 1)
    lo = int(rank)
    srt = flat.abs().sort(dim=1).values  # (B, D)
    s = torch.lerp(srt[:, lo], srt[:, min(lo + 1, n - 1)], rank - lo)  # (B,)
    s = s.clamp(min=1, max=max_value).unsqueeze(1)  # (B, 1); s = 1 is plain clipping to [-1, 1]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray | Tensor):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
