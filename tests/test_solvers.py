"""Solver parity with diffusers' schedulers, graph-readiness and the distillation helper (CPU, fp32)."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ilf_runtime.solvers import make_solver

SHAPE = (2, 4, 8, 8)
TOL = 1e-5


def _fixed(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _model(x: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in network: depends on x and t, so a real trajectory is followed."""
    return 0.5 * torch.tanh(x) + 0.1 * math.sin(t / 100) * noise


def _parity(scheduler_cls, config: dict, num_steps: int, solver: str | None = None) -> float:
    """Run diffusers' scheduler and our solver side by side; return the final max abs difference."""
    sched = scheduler_cls.from_config(config)
    sched.set_timesteps(num_steps)
    slv = make_solver(sched, num_steps, solver=solver)
    assert torch.equal(slv.timesteps, sched.timesteps) and slv.timesteps.dtype == torch.int64
    noise, x = _fixed(1), _fixed(0)
    x_ref = x.clone()
    state = slv.init_state()
    for i, t in enumerate(sched.timesteps.tolist()):
        x_ref = sched.step(_model(x_ref, t, noise), t, x_ref).prev_sample
        x = slv.step(i, x, _model(x, t, noise), state)
    assert x.dtype == x_ref.dtype and torch.isfinite(x).all()
    return (x - x_ref).abs().max().item()


DDIM_CONFIGS = {
    "leading-eps": {"timestep_spacing": "leading", "clip_sample": False},
    "leading-offset1-alpha1false": {
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": False,
    },
    "trailing-eps": {"timestep_spacing": "trailing", "clip_sample": False},
    "trailing-v-alpha1false": {
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "set_alpha_to_one": False,
    },
    "linspace-sample": {"timestep_spacing": "linspace", "prediction_type": "sample", "clip_sample": False},
    "linspace-v-clip": {
        "timestep_spacing": "linspace",
        "prediction_type": "v_prediction",
        "clip_sample": True,
    },
    "leading-eps-clip2": {"clip_sample": True, "clip_sample_range": 2.0, "beta_schedule": "scaled_linear"},
    "trailing-eps-threshold": {
        "timestep_spacing": "trailing",
        "thresholding": True,
        "dynamic_thresholding_ratio": 0.9,
        "sample_max_value": 1.5,
    },
    "trailing-v-zero-snr": {
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "clip_sample": False,
    },
}


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 12, 25])
@pytest.mark.parametrize("name", list(DDIM_CONFIGS))
def test_ddim_parity(name, num_steps):
    diff = _parity(DDIMScheduler, DDIM_CONFIGS[name], num_steps)
    assert diff <= TOL, f"ddim {name} steps={num_steps}: max abs diff {diff:.3e}"


DPM_CONFIGS = {
    "default-eps": {},
    "v": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "no-lower-order-final": {"lower_order_final": False},
    "sigma-min": {"final_sigmas_type": "sigma_min"},
    "sigma-min-no-lof": {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    "euler-at-final-sigma-min": {
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
        "euler_at_final": True,
    },
    "karras": {"use_karras_sigmas": True},
    "karras-v-sigma-min": {
        "use_karras_sigmas": True,
        "prediction_type": "v_prediction",
        "final_sigmas_type": "sigma_min",
    },
    "exponential": {"use_exponential_sigmas": True},
    "lu-lambdas": {"use_lu_lambdas": True},
    "heun": {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False},
    "order1": {"solver_order": 1},
    "trailing-scaled": {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear", "beta_end": 0.012},
    "leading-offset": {"timestep_spacing": "leading", "steps_offset": 1},
    "threshold": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
}


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10, 12, 20, 25])
@pytest.mark.parametrize("name", list(DPM_CONFIGS))
def test_dpmpp_2m_parity(name, num_steps):
    diff = _parity(DPMSolverMultistepScheduler, DPM_CONFIGS[name], num_steps)
    assert diff <= TOL, f"dpmpp_2m {name} steps={num_steps}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("num_steps", [3, 20])
def test_cross_class_parity(num_steps):
    """solver != scheduler class: same as swapping schedulers with `from_config` in diffusers."""
    ddim_cfg = DDIMScheduler(clip_sample=False, timestep_spacing="trailing").config
    dpm_cfg = DPMSolverMultistepScheduler(prediction_type="v_prediction").config
    diff = _parity(DPMSolverMultistepScheduler, ddim_cfg, num_steps, solver="dpmpp_2m")
    assert diff <= TOL, f"ddim config -> dpmpp_2m: max abs diff {diff:.3e}"
    diff = _parity(DDIMScheduler, dpm_cfg, num_steps, solver="ddim")
    assert diff <= TOL, f"dpm config -> ddim: max abs diff {diff:.3e}"
    assert make_solver(dict(dpm_cfg), num_steps, solver="ddim").config["clip_sample"] is True  # DDIM default


def test_inferred_solver_and_describe():
    ddim = make_solver(DDIMScheduler(), 4)
    cfg = dict(DPMSolverMultistepScheduler(lambda_min_clipped=-5.1).config)
    dpm = make_solver({**cfg, "_class_name": "DPMSolverMultistepScheduler"}, 4)  # as in scheduler_config.json
    assert (ddim.name, dpm.name) == ("ddim", "dpmpp_2m")
    d = json.loads(json.dumps(dpm.describe(), allow_nan=False))
    assert d["num_steps"] == 4 and d["timesteps"] == dpm.timesteps.tolist()
    assert d["config"]["solver_order"] == 2 and d["config"]["prediction_type"] == "epsilon"
    assert ddim.describe()["config"]["set_alpha_to_one"] is True
    assert d["scheduler_class"] == "DPMSolverMultistepScheduler"
    rebuilt = make_solver(d["config"], d["num_steps"], solver=d["name"])
    assert torch.equal(rebuilt.timesteps, dpm.timesteps) and torch.equal(rebuilt.c_d1, dpm.c_d1)
    assert make_solver(DDIMScheduler(), 3, device="meta").describe()["timesteps"] == [666, 333, 0]


def test_meta_device_loop_has_no_host_reads():
    """Reading a meta tensor's data (.item(), .cpu()) raises, so a full loop proves step never syncs."""
    configs = [
        (DDIMScheduler(thresholding=True), "ddim"),
        (DDIMScheduler(clip_sample=True, prediction_type="v_prediction"), "ddim"),
        (DPMSolverMultistepScheduler(final_sigmas_type="sigma_min", thresholding=True), "dpmpp_2m"),
    ]
    for sched, name in configs:
        slv = make_solver(sched, 5, device="meta")
        assert slv.timesteps.is_meta and slv.name == name
        x, state = torch.randn(SHAPE, device="meta"), slv.init_state()
        for i in range(slv.num_steps):
            x = slv.step(i, x, torch.tanh(x), state)
            slv.predict_x0(i, x, x)
        assert x.shape == SHAPE


@pytest.mark.parametrize("sched", [DDIMScheduler(thresholding=True), DPMSolverMultistepScheduler()], ids=type)
def test_step_compiles_without_graph_breaks(sched):
    torch._dynamo.reset()
    slv = make_solver(sched, 6)
    x, m = _fixed(0), _fixed(1)

    def two_steps(x, m):
        state = slv.init_state()
        x = slv.step(0, x, m, state)
        return slv.step(1, x, torch.tanh(x), state)

    compiled = torch.compile(two_steps, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, m), two_steps(x, m), rtol=0, atol=0)


def test_errors():
    with pytest.raises(ValueError, match="EulerDiscreteScheduler.*supported DDIMScheduler"):
        make_solver(EulerDiscreteScheduler(), 4)
    with pytest.raises(ValueError, match="no '_class_name'"):
        make_solver({"num_train_timesteps": 1000}, 4)
    with pytest.raises(ValueError, match="unknown solver 'euler'"):
        make_solver(DDIMScheduler(), 4, solver="euler")
    with pytest.raises(ValueError, match="num_steps"):
        make_solver(DDIMScheduler(), 0)
    for bad in (
        {"algorithm_type": "sde-dpmsolver++"},
        {"solver_order": 3},
        {"variance_type": "learned_range"},
    ):
        key = next(iter(bad))
        with pytest.raises(NotImplementedError, match=key):
            make_solver(DPMSolverMultistepScheduler(**bad), 4)
    slv = make_solver(DPMSolverMultistepScheduler(), 4)
    with pytest.raises(ValueError, match="run steps in order"):
        slv.step(1, _fixed(0), _fixed(1), slv.init_state())
    with pytest.raises(IndexError, match="out of range"):
        slv.step(4, _fixed(0), _fixed(1), slv.init_state())


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 5, 7), (1, 1, 1)])
def test_dynamic_threshold_matches_diffusers(shape):
    from ilf_runtime.solvers import dynamic_threshold

    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=4.0)
    x0 = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours = dynamic_threshold(x0, 0.95, 4.0)
    diff = (ours - sched._threshold_sample(x0)).abs().max().item()
    assert diff <= 1e-6, f"max abs diff {diff:.3e}"
