"""The fused block forward (ilf_runtime.fused) against diffusers' own BasicTransformerBlock (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import IlfOpCalls, ddim_scheduler, prompt_inputs, require_cuda_kernels, tiny_dit, tiny_pixart

from ilf_runtime import ILFConfig, apply_ilf, ops, remove_ilf
from ilf_runtime.ext import has_ext
from ilf_runtime.fused import (
    apply_fused_blocks,
    has_fused_blocks,
    is_fused,
    remove_fused_blocks,
    run_block,
    unsupported_reason,
)
from ilf_runtime.models import adapter_for
from ilf_runtime.sampling import denoise, make_noise
from ilf_runtime.solvers import make_solver
from tests.fixtures.tiny import dit_cond, pixart_cond

# fp32: the fused path reorders a few roundings (one QKV matmul, fma epilogues), nothing more
TOL = {"rtol": 1e-5, "atol": 2e-5}


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([999, 500, 3][:batch])
    if c.norm_type == "ada_norm_zero":
        return x, t, {"class_labels": torch.tensor([1, 4, 7][:batch])}
    emb, mask, _, _ = prompt_inputs(batch)
    return (
        x,
        t,
        {
            "encoder_hidden_states": emb,
            "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        },
    )


def _run(model, x, t, kw):
    with torch.no_grad():
        return model(x, timestep=t, return_dict=False, **kw)[0]


def _ilf(model, init="random"):
    loop = apply_ilf(model, ILFConfig(loop_start=1, loop_end=2, feedback_init=init))
    with torch.no_grad():
        loop.scales.copy_(torch.tensor([0.3, -0.2]))  # nonzero: the loop changes the output
    return loop


@pytest.fixture(params=["dit", "pixart"])
def model(request):
    return tiny_dit() if request.param == "dit" else tiny_pixart()


@pytest.fixture(params=["ext", "ref"])
def kernels(request, monkeypatch):
    """Runs a test with the compiled CPU kernels preferred, and with the references only."""
    if request.param == "ext" and not has_ext():
        pytest.skip("ilf_runtime._C not loaded")
    for op in ("feedback_inject", "ada_layernorm", "gated_residual"):
        monkeypatch.setitem(ops._PREFER_EXT, (op, "cpu", torch.float32), request.param == "ext")
    return request.param


def test_fused_matches_diffusers_blocks(model, kernels, monkeypatch):
    x, t, kw = _inputs(model)
    want = _run(model, x, t, kw)
    assert apply_fused_blocks(model) == len(model.transformer_blocks)
    assert has_fused_blocks(model)
    calls = []
    real = ops.gated_residual
    monkeypatch.setattr(ops, "gated_residual", lambda *a: calls.append(1) or real(*a))
    with IlfOpCalls() as compiled:
        got = _run(model, x, t, kw)
    torch.testing.assert_close(got, want, **TOL)
    n = len(model.transformer_blocks)
    assert len(calls) == 2 * n  # the fused path ran in every block
    # ... through the compiled kernels when they are preferred, through the references otherwise
    want_kernels = {"ada_layernorm": 2 * n, "gated_residual": 2 * n} if kernels == "ext" else {}
    assert dict(compiled.counts) == want_kernels


def test_each_block_matches(model, kernels):
    """Block by block, so that one wrong chunk cannot hide behind the rest of the network."""
    x, t, kw = _inputs(model)
    seen = []
    handles = [
        b.register_forward_hook(lambda m, a, k, out: seen.append((a, k, out)), with_kwargs=True)
        for b in model.transformer_blocks
    ]
    _run(model, x, t, kw)
    for h in handles:
        h.remove()
    apply_fused_blocks(model)
    with torch.no_grad():
        for block, (args, kwargs, want) in zip(model.transformer_blocks, seen, strict=True):
            torch.testing.assert_close(block(*args, **kwargs), want, **TOL)


@pytest.mark.parametrize("init", ["random", "copy:1"])
def test_fused_with_ilf_loop(model, kernels, init):
    x, t, kw = _inputs(model)
    loop = _ilf(model, init)
    want = _run(model, x, t, kw)
    loop.active = False
    plain = _run(model, x, t, kw)
    loop.active = True
    assert (want - plain).abs().max() > 1e-3  # the loop matters at these scales
    apply_fused_blocks(model)
    assert is_fused(loop.feedback)  # the feedback block is fused with the backbone
    torch.testing.assert_close(_run(model, x, t, kw), want, **TOL)
    loop.active = False
    torch.testing.assert_close(_run(model, x, t, kw), plain, **TOL)


def test_ilf_applied_after_fusing_gets_fused_feedback(model):
    apply_fused_blocks(model)
    loop = _ilf(model)
    assert is_fused(loop.feedback)
    remove_fused_blocks(model)
    assert not is_fused(loop.feedback) and not has_fused_blocks(model)


def test_zero_scales_equal_plain_forward_fused(model):
    """Identity at s = 0 holds in the fused epilogue too (s * f adds exact zeros)."""
    x, t, kw = _inputs(model)
    apply_fused_blocks(model)
    plain = _run(model, x, t, kw)
    apply_ilf(model, ILFConfig(loop_start=1, loop_end=2))
    assert torch.equal(_run(model, x, t, kw), plain)


def test_remove_restores_bitwise(model):
    x, t, kw = _inputs(model)
    loop = _ilf(model)
    before = _run(model, x, t, kw)
    apply_fused_blocks(model)
    assert remove_fused_blocks(model) == len(model.transformer_blocks) + 1
    assert torch.equal(_run(model, x, t, kw), before)
    remove_ilf(model)
    assert not is_fused(loop.feedback)


def test_run_block_fuses_injection(model, kernels):
    x, t, kw = _inputs(model)
    captured = {}
    block = model.transformer_blocks[1]
    handle = block.register_forward_pre_hook(lambda m, a, k: captured.update(h=a[0], kw=k), with_kwargs=True)
    _run(model, x, t, kw)
    handle.remove()
    h, bkw = captured["h"], captured["kw"]
    f = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    s = torch.full((h.shape[-1],), 0.25)
    with torch.no_grad():
        want = ops.feedback_inject_ref(block(h, **bkw), f, s)
        assert torch.equal(run_block(block, h, bkw, (f, s)), want)  # unfused: block, then inject
        apply_fused_blocks(model)
        with IlfOpCalls() as compiled:
            got = run_block(block, h, bkw, (f, s))
        torch.testing.assert_close(got, want, **TOL)
        if kernels == "ext":  # the injection rides in the last gated residual: no separate inject
            assert dict(compiled.counts) == {"ada_layernorm": 2, "gated_residual": 2}
        else:
            assert compiled.total == 0
        torch.testing.assert_close(run_block(block, h, bkw), block(h, **bkw), rtol=0, atol=0)


def test_autograd_falls_back_to_diffusers_forward(model):
    """Training (the feedback block's) goes through diffusers' forward: gradients flow."""
    x, t, kw = _inputs(model)
    loop = _ilf(model)
    with torch.no_grad():
        want = model(x, timestep=t, return_dict=False, **kw)[0]
    apply_fused_blocks(model)
    out = model(x, timestep=t, return_dict=False, **kw)[0]
    assert torch.equal(out, want)  # fell back: bit for bit the unfused forward
    out.square().mean().backward()
    assert loop.scales.grad is not None and loop.scales.grad.abs().sum() > 0


def test_denoise_fused_matches(model):
    torch.manual_seed(0)
    solver = make_solver(ddim_scheduler(timestep_spacing="trailing"), 3)
    noise = make_noise([0, 1], (4, 8, 8))
    if model.config.norm_type == "ada_norm_zero":
        cond = dit_cond(model, torch.tensor([2, 3]))
    else:
        emb, mask, neg, nmask = prompt_inputs(2)
        cond = pixart_cond(model, emb, mask, neg, nmask, height=8, width=8)
    _ilf(model)
    want = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=[False, True, True])
    apply_fused_blocks(model)
    got = denoise(model, noise, solver, cond, guidance_scale=3.0, loop_mask=[False, True, True])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_blocks_named(model):
    from diffusers.models.attention_processor import AttnProcessor

    model.transformer_blocks[2].attn1.set_processor(AttnProcessor())
    assert "AttnProcessor" in unsupported_reason(model.transformer_blocks[2], adapter_for(model))
    with pytest.raises(ValueError, match=r"cannot fuse block 2 of \w+: attn1 uses AttnProcessor"):
        apply_fused_blocks(model)
    assert not has_fused_blocks(model)  # nothing half-applied
    with pytest.raises(ValueError, match="unsupported model"):
        apply_fused_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "device,dtype",
    [
        ("cpu", torch.bfloat16),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
        pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
    ],
)
def test_low_precision_fused_error_within_twice_eager(model, device, dtype):
    """In bf16 / fp16 the fused forward is no further from the fp32 model than diffusers' own forward
    in the same dtype is, times two (the flash-attention rule); on a GPU this runs the CUDA kernels
    and PyTorch's flash / memory-efficient SDPA."""
    if device == "cuda":
        require_cuda_kernels()  # else the "fused" run would be the references, checking no kernel
    x, t, kw = _inputs(model)
    model.to(device)
    x, t = x.to(device), t.to(device)
    kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = _run(model, x, t, kw).double()
    model.to(dtype)
    kw16 = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    eager = _run(model, x.to(dtype), t, kw16).double()
    apply_fused_blocks(model)
    with IlfOpCalls() as compiled:
        fused = _run(model, x.to(dtype), t, kw16).double()
    if device == "cuda":  # the compiled CUDA kernels ran, in every block
        n = len(model.transformer_blocks)
        assert compiled.counts["ada_layernorm"] == compiled.counts["gated_residual"] == 2 * n, compiled.counts
    err_eager, err_fused = (eager - ref).abs().max().item(), (fused - ref).abs().max().item()
    assert err_fused <= 2 * err_eager, (err_fused, err_eager)
