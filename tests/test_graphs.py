"""The graph-captured denoising loop (ilf_runtime.graphs): what the CPU can check, and GPU tests."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    IlfOpCalls,
    ddim_scheduler,
    dpm_scheduler,
    prompt_inputs,
    require_cuda_kernels,
    tiny_dit,
    tiny_pixart,
)

from ilf_runtime import ILFConfig, apply_ilf, graphs, sample
from ilf_runtime.fused import apply_fused_blocks
from ilf_runtime.sampling import (
    LoopSpec,
    denoise,
    make_noise,
    run_steps,
)
from ilf_runtime.solvers import make_solver
from tests.fixtures.tiny import dit_cond, pixart_cond


def _setup(kind: str, device="cpu", dtype=torch.float32, batch=2, ilf=True, fused=False):
    model = tiny_dit() if kind == "dit" else tiny_pixart()
    if ilf:
        loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2))
        with torch.no_grad():
            loop.scales.copy_(torch.tensor([0.4, -0.3]))
    if fused:
        apply_fused_blocks(model)
    model.to(device=device, dtype=dtype)
    if kind == "dit":
        cond = dit_cond(model, torch.arange(batch) % 10)
    else:
        emb, mask, neg, nmask = prompt_inputs(batch)
        cond = pixart_cond(model, emb, mask, neg, nmask, height=8, width=8)
    return model, cond


def _static_run(model, noise, solver, cond, guidance=3.0, mask=(False, True, True)):
    """What denoise(cuda_graph=True) does, without the capture: the static-buffer runner."""
    spec = LoopSpec(cond.adapter, True, guidance, tuple(mask), model.config.in_channels)

    def fn(x, kwargs):
        return run_steps(model, x, solver, kwargs, spec)

    return graphs.run_loop(model, fn, noise, cond.kwargs(True), solver, spec, capture=False)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_cuda_graph_on_cpu_is_a_clear_error(kind):
    model, cond = _setup(kind)
    solver = make_solver(ddim_scheduler(), 2)
    with pytest.raises(
        ValueError, match=r"cuda_graph=True needs the transformer and the latents on a CUDA device"
    ):
        denoise(model, make_noise([0, 1], (4, 8, 8)), solver, cond, cuda_graph=True)
    kw = (
        {"class_labels": [1]}
        if kind == "dit"
        else {"prompt_embeds": prompt_inputs(1)[0], "guidance_scale": 1.0}
    )
    with pytest.raises(
        ValueError, match=r"cuda_graph=True needs a model on a CUDA device; this one is on cpu"
    ):
        sample(model, num_steps=2, cuda_graph=True, return_latents_only=True, **kw)
    with pytest.raises(ValueError, match="a CUDA graph needs CUDA tensors"):
        graphs.LoopGraph(lambda x, k: x, torch.zeros(2), {}, capture=True)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("sched", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("fused", [False, True])
def test_static_runner_equals_denoise_bitwise(kind, sched, fused):
    model, cond = _setup(kind, fused=fused)
    solver = make_solver(ddim_scheduler() if sched == "ddim" else dpm_scheduler(), 3)
    noise = make_noise([3, 4], (4, 8, 8))
    want = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=[False, True, True])
    got = _static_run(model, noise, solver, cond)
    assert torch.equal(got, want)


def test_cache_reuses_and_rebuilds_only_on_new_key():
    model, cond = _setup("dit")
    sched = ddim_scheduler()
    cache = graphs.graph_cache(model)
    noise = make_noise([0, 1], (4, 8, 8))
    first = _static_run(model, noise, make_solver(sched, 3), cond)
    assert cache.builds == 1
    # new noise values, labels and solver object with the same schedule: same key, inputs copied in
    noise2 = make_noise([7, 8], (4, 8, 8))
    cond2 = dit_cond(model, torch.tensor([5, 6]))
    got = _static_run(model, noise2, make_solver(sched, 3), cond2)
    assert cache.builds == 1
    want = denoise(
        model, noise2, make_solver(sched, 3), cond2, guidance_scale=3.0, loop_mask=[False, True, True]
    )
    assert torch.equal(got, want) and not torch.equal(got, first)
    # each of these is a new key
    _static_run(model, noise, make_solver(sched, 3), cond, mask=(True, True, True))  # loop mask
    assert cache.builds == 2
    _static_run(model, noise, make_solver(sched, 3), cond, guidance=4.0)  # guidance
    assert cache.builds == 3
    _static_run(model, noise, make_solver(sched, 4), cond, mask=(False,) * 4)  # steps
    assert cache.builds == 4
    _static_run(model, make_noise([0, 1, 2], (4, 8, 8)), make_solver(sched, 3), dit_cond(model, [1, 2, 3]))
    assert cache.builds == 5 and len(cache.entries) == cache.max_entries  # batch; oldest dropped
    _static_run(model, noise, make_solver(ddim_scheduler(timestep_spacing="trailing"), 3), cond)  # schedule
    assert cache.builds == 6


def test_weight_update_rebuilds():
    """A graph reads weights by address: an in-place update or a new ILF loop must not replay stale."""
    model, cond = _setup("dit")
    solver = make_solver(ddim_scheduler(), 3)
    noise = make_noise([0, 1], (4, 8, 8))
    cache = graphs.graph_cache(model)
    _static_run(model, noise, solver, cond)
    with torch.no_grad():
        model.ilf_loop.scales.mul_(2)
    got = _static_run(model, noise, solver, cond)
    assert cache.builds == 2
    assert torch.equal(
        got, denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=[False, True, True])
    )
    entry = next(reversed(cache.entries.values()))
    assert any(t is model.ilf_loop.scales for t in entry.keep)  # what the graph reads is kept alive
    graphs.clear_graphs(model)
    assert graphs.graph_cache(model).builds == 0


def test_outputs_are_owned_by_the_caller():
    model, cond = _setup("pixart")
    solver = make_solver(ddim_scheduler(), 2)
    noise = make_noise([0, 1], (4, 8, 8))
    a = _static_run(model, noise, solver, cond, mask=(True, True))
    keep = a.clone()
    b = _static_run(model, make_noise([5, 6], (4, 8, 8)), solver, cond, mask=(True, True))
    assert torch.equal(a, keep) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        next(iter(graphs.graph_cache(model).entries.values()))(make_noise([0], (4, 8, 8)), cond.kwargs(True))


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_loop_never_reads_a_tensor_back(kind):
    """The whole loop (guidance, solver, ILF loop, fused blocks) runs on the meta device, where any
    .item(), bool(tensor) or data-dependent shape raises: nothing in it syncs with the host, which is
    what capturing it as one CUDA graph needs. The probe runs `run_steps`, the part that is captured
    (`denoise` may check the result once after the loop, outside the graph)."""
    model, cond = _setup(kind, fused=True)
    model.to("meta")
    cond.model_kwargs = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in cond.model_kwargs.items()}
    solver = make_solver(dpm_scheduler(), 3, device="meta")
    spec = LoopSpec(cond.adapter, True, 3.0, (False, True, True), model.config.in_channels)
    x = run_steps(model, torch.empty(2, 4, 8, 8, device="meta"), solver, cond.kwargs(True), spec)
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="meta"):
        solver.timesteps[0].item()  # the probe does catch a sync


# ---------------------------------------------------------------------------------------------
# GPU (marked; skipped without CUDA)


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_replay_equals_eager(kind, dtype, fused):
    if fused:
        require_cuda_kernels()  # a fused model without CUDA kernels would graph the references
    else:
        _cuda_or_skip()
    model, cond = _setup(kind, device="cuda", dtype=dtype, fused=fused)
    solver = make_solver(dpm_scheduler(), 4, device="cuda")
    mask = [False, True, False, True]
    noise = make_noise([0, 1], (4, 8, 8), device="cuda", dtype=dtype)
    with IlfOpCalls() as compiled:
        eager = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=mask)
    # fused: every block's norms and residuals ran the compiled kernels (4 steps x 4 blocks x 2 each,
    # plus the loop's blocks); unfused: only the loop's feedback injections
    if fused:
        assert (
            compiled.counts["ada_layernorm"] >= 4 * 4 * 2 and compiled.counts["gated_residual"] >= 4 * 4 * 2
        )
    else:
        assert set(compiled.counts) <= {"feedback_inject"}
    cache = graphs.graph_cache(model)
    for seeds in ([0, 1], [2, 3], [0, 1]):
        noise = make_noise(seeds, (4, 8, 8), device="cuda", dtype=dtype)
        graphed = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=mask, cuda_graph=True)
        want = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=mask)
        torch.testing.assert_close(graphed, want, rtol=0, atol=0)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    entry = next(iter(cache.entries.values()))
    assert cache.builds == 1 and entry.graph is not None and entry.replays == 3


@pytest.mark.gpu
def test_cuda_graph_recaptures_only_on_new_key():
    require_cuda_kernels()  # the model is fused
    model, _ = _setup("dit", device="cuda")
    apply_fused_blocks(model)
    cache = graphs.graph_cache(model)
    kw = {"num_steps": 3, "guidance_scale": 2.0, "return_latents_only": True, "cuda_graph": True}
    a = sample(model, class_labels=[1, 2], **kw)
    sample(model, class_labels=[3, 4], seed=5, **kw)
    assert cache.builds == 1
    sample(model, class_labels=[1, 2, 3], **kw)  # batch
    sample(model, class_labels=[1, 2], **{**kw, "num_steps": 4})  # steps
    sample(model, class_labels=[1, 2], loop_steps="last:1", **kw)  # loop mask
    assert cache.builds == 4
    eager = sample(model, class_labels=[1, 2], **{**kw, "cuda_graph": False})
    torch.testing.assert_close(a.latents, eager.latents, rtol=0, atol=0)


def test_cli_cuda_graph_flag_needs_cuda(capsys):
    from ilf_runtime.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", "tiny-random", "--cuda-graph", "--out", "unused.png"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--cuda-graph needs a CUDA device, got --device cpu" in err
