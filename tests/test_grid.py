"""Non-uniform student grids: a solver on part of its teacher's grid (`Solver.subset`), sampled,
trained and recorded in the weights file.

The uniform subset is bit for bit the solver of fewer steps; a non-uniform DPM-Solver++ grid is bit for
bit diffusers' scheduler given the same custom timesteps; a non-uniform DDIM step is the DDIM jump between
its two noise levels. Training on a grid writes it into the weights, and sampling with those weights
uses it by default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import test_train
import torch

from ilf_runtime import sample
from ilf_runtime.bench.plan import BenchArgs, default_rows
from ilf_runtime.distributed import DistInfo
from ilf_runtime.ilf import apply_ilf
from ilf_runtime.registry import load_model
from ilf_runtime.sampling import denoise
from ilf_runtime.solvers import check_grid, make_solver
from ilf_runtime.train import Distiller, TrainArgs, main
from ilf_runtime.weights import WeightsError, load_ilf_weights, read_metadata, sampler_grid

dit_dir = test_train.dit_dir  # the tiny 4-block DiT, saved per test
SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": False, "set_alpha_to_one": True,
    "timestep_spacing": "trailing", "prediction_type": "epsilon",
}  # fmt: skip


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("n,k", [(10, 2), (5, 4), (20, 1)])
def test_uniform_subset_is_the_solver_of_fewer_steps(solver, n, k):
    full = make_solver(SCHEDULER, n, solver=solver)
    sub = make_solver(SCHEDULER, n * k, solver=solver, grid=range(0, n * k, k))
    assert sub.num_steps == n and sub.grid == tuple(range(0, n * k, k)) and sub.grid_steps == n * k
    for name in full._tensor_attrs:
        assert torch.equal(getattr(full, name), getattr(sub, name)), name
    assert getattr(full, "orders", None) == getattr(sub, "orders", None)


def test_nonuniform_dpmpp_matches_diffusers_custom_timesteps():
    import diffusers

    starts = [0, 2, 4, 6, 8, 10, 12, 14, 17, 19]
    sub = make_solver(SCHEDULER, 20, solver="dpmpp_2m", grid=starts)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(SCHEDULER)
    ref.set_timesteps(timesteps=[int(t) for t in sub.timesteps])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    y, state = x.clone(), sub.init_state()
    for i in range(sub.num_steps):
        eps = torch.randn(x.shape, generator=g)
        x = sub.step(i, x, eps, state)
        y = ref.step(eps, ref.timesteps[i], y).prev_sample
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_nonuniform_ddim_step_jumps_between_its_noise_levels():
    starts = [0, 3, 4, 9]
    full = make_solver(SCHEDULER, 10, solver="ddim")
    sub = full.subset(starts)
    acp = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    acp = torch.cumprod(1 - acp, 0)
    ts = [int(t) for t in full.timesteps] + [None]  # the last step lands on alpha = 1
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    for i, (a, b) in enumerate(zip(starts, [*starts[1:], 10], strict=True)):
        eps = torch.randn_like(x)
        a_t, a_n = acp[ts[a]], (acp[ts[b]] if ts[b] is not None else torch.tensor(1.0, dtype=torch.float64))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        want = a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps
        got = sub.step(i, x.float(), eps.float(), sub.init_state()).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        x = want
    assert sub.describe()["grid"] == starts and sub.describe()["grid_steps"] == 10


@pytest.mark.parametrize("bad", [[1, 2], [0, 0, 3], [0, 20], ["a"], []])
def test_bad_grid_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="grid") as e:
        check_grid(bad, 20)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="grid"):
        TrainArgs.from_flat({"steps": 3, "teacher_steps": 20, "grid": "0,2"})  # 2 starts for 3 steps


def test_sample_on_a_grid(dit_dir):
    m = load_model(dit_dir)
    kw = {"class_labels": [0, 1], "seeds": [0, 1], "return_latents_only": True, "solver": "ddim"}
    plain5 = sample(m, num_steps=5, **kw).latents
    torch.testing.assert_close(
        sample(m, num_steps=5, grid=[0, 2, 4, 6, 8], grid_steps=10, **kw).latents, plain5
    )
    out = sample(m, num_steps=5, grid=[0, 2, 4, 7, 9], grid_steps=10, **kw)
    assert out.info["grid"] == [0, 2, 4, 7, 9] and not torch.equal(out.latents, plain5)
    with pytest.raises(ValueError, match="grid"):
        sample(m, num_steps=4, grid=[0, 2, 4, 7, 9], grid_steps=10, **kw)


def _grid_args(model: str, out: Path, **kw) -> TrainArgs:
    base = {
        "model": model, "out": str(out), "loop_start": 1, "loop_end": 2, "loop_steps": "last:2", "steps": 3,
        "teacher_steps": 6, "grid": "0,1,4", "solver": "ddim", "states": "teacher", "bank_size": 16,
        "batch_size": 8, "train_steps": 4, "warmup": 1, "lr": 3e-3, "ema": 0.0, "val_samples": 4,
        "ckpt_every": 100, "progress": False, "device": "cpu",
    }  # fmt: skip
    return TrainArgs.from_flat(base | kw)


def test_bank_states_sit_on_the_grid(dit_dir, tmp_path):
    a = _grid_args(dit_dir, tmp_path / "run")
    model = load_model(dit_dir)
    loop = apply_ilf(model.transformer, a.loop)
    d = Distiller(model, loop, a, DistInfo())
    assert d.S.timesteps.tolist() == [d.T.timesteps[j].item() for j in (0, 1, 4)]
    d.build_bank(0)
    x = d.bank["x"]  # (bank, steps + 1, C, H, W)
    cond = d.conds.cond(d.bank["idx"][:4])
    loop.active = False
    with torch.no_grad():  # the teacher's own 6 steps from the same noise land on the bank's states
        st, y = d.T.init_state(), x[:4, 0]
        for j in range(6):
            y = d.T.step(j, y, d.teacher(y, d.T.timesteps[j], cond), st)
            if j + 1 in (1, 4, 6):  # the bank ran in larger batches: fp32 GEMM rounding differs by CPU
                torch.testing.assert_close(y, x[:4, {1: 1, 4: 2, 6: 3}[j + 1]], rtol=1e-3, atol=1e-3)
        full = denoise(
            model.transformer, x[:4, 0], d.T, cond, guidance_scale=d.guidance, loop_mask=[False] * 6
        )
    torch.testing.assert_close(full, x[:4, -1], rtol=1e-3, atol=1e-3)


def test_weights_trained_on_a_grid_sample_on_it(dit_dir, tmp_path, caplog):
    summary = main(_grid_args(dit_dir, tmp_path / "run"))
    path = summary["weights"]
    s = read_metadata(path)["sampler"]
    assert s["grid"] == "0,1,4" and s["teacher_steps"] == 6
    assert sampler_grid(s) == {"grid": [0, 1, 4], "grid_steps": 6}
    m = load_model(dit_dir)
    kw = {"class_labels": [0, 1], "seeds": [3, 4], "return_latents_only": True, "solver": "ddim"}
    out = sample(m, num_steps=3, ilf=path, **kw)
    assert out.info["grid"] == [0, 1, 4]
    explicit = sample(m, num_steps=3, ilf=path, grid=[0, 1, 4], grid_steps=6, **kw)
    torch.testing.assert_close(out.latents, explicit.latents, rtol=0, atol=0)
    with caplog.at_level(logging.WARNING):
        other = sample(m, num_steps=4, ilf=path, **kw)  # another step count: the uniform grid, said so
    assert other.info["grid"] is None and "distilled on the grid" in caplog.text
    # the benchmark runs it on its grid, and plain sampling on the same grid beside it
    rows = default_rows(BenchArgs(methods="plain,ilf", plain_steps="3", ref_steps=6), [path])
    grid_rows = [r for r in rows if r.grid == "0,1,4"]
    assert {r.method for r in grid_rows} == {"plain", "ilf"}
    assert all(r.grid_steps == 6 and not r.is_ref for r in grid_rows)


def test_bench_plain_grid_rows_and_bad_grids():
    # a searched grid without weights: `ilf bench --plain-grid G` (repeatable) adds a plain row on it
    import argparse

    from ilf_runtime.bench import add_arguments

    a = BenchArgs(
        solvers="dpmpp_2m", methods="plain", plain_steps="7", plain_grid=["0, 3,6,9,13,16,19", "0,4,8"]
    )
    rows = default_rows(a, [])
    grid_rows = {r.grid: r for r in rows if r.grid}
    assert set(grid_rows) == {"0,3,6,9,13,16,19", "0,4,8"}
    assert [grid_rows["0,4,8"].steps, grid_rows["0,4,8"].grid_steps] == [3, 20]
    assert all(r.method == "plain" and r.solver == "dpmpp_2m" and not r.is_ref for r in grid_rows.values())
    for bad in ("1,3,5", "0,5,5", "0,3,20", "0,x"):
        with pytest.raises(ValueError, match="plain_grid: grid: expected"):
            BenchArgs(plain_grid=[bad])
    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args(["--plain-grid", "0,3,6", "--plain-grid", "0,2"])
    assert ns.plain_grid == ["0,3,6", "0,2"]


def test_a_bad_grid_in_the_metadata_is_refused(dit_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = main(_grid_args(dit_dir, tmp_path / "run"))["weights"]
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    import json

    sampler = json.loads(meta["sampler"]) | {"grid": "0,5,4"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta | {"sampler": json.dumps(sampler)})
    with pytest.raises(WeightsError, match="grid"):
        load_ilf_weights(bad)


def test_stock_pipeline_refuses_grid_weights(dit_dir, tmp_path):
    from ilf_runtime import enable

    path = main(_grid_args(dit_dir, tmp_path / "run"))["weights"]
    m = load_model(dit_dir)
    pipe = m.adapter.stock_pipeline(m.transformer, None, m.scheduler) if m.pipeline is None else m.pipeline
    with pytest.raises(ValueError, match="non-uniform grid"):
        enable(pipe, path)
