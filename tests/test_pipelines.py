"""`ilf_runtime.sample` (pipelines.py): seeds, batching, the loop applied for one call, decoding, the
reported cost, and its argument errors, on tiny models."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ddim_scheduler, dpm_scheduler, prompt_inputs, tiny_dit, tiny_pixart, tiny_vae

from ilf_runtime import ILFConfig, apply_ilf, get_ilf, remove_ilf, sample, save_ilf_weights
from ilf_runtime.pipelines import decode
from ilf_runtime.registry import Model
from ilf_runtime.sampling import denoise, make_noise
from ilf_runtime.solvers import make_solver
from tests.fixtures.tiny import dit_cond


def _pixel_dit(layers: int = 4) -> Model:
    """A pixel-space 10-class DiT (no VAE) with a trailing DDIM schedule."""
    return Model(tiny_dit(num_layers=layers, in_channels=1, learned_sigma=False), ddim_scheduler(
        timestep_spacing="trailing"))  # fmt: skip


def _weights(tmp_path, m: Model, scale: float = 0.3, **cfg) -> str:
    loop = apply_ilf(m.transformer, ILFConfig(loop_start=1, loop_end=2, **cfg))
    with torch.no_grad():
        loop.scales.fill_(scale)
    path = save_ilf_weights(
        tmp_path / "fb.safetensors", m.transformer, sampler={"solver": "ddim", "num_steps": 3}
    )
    remove_ilf(m.transformer)
    return str(path)


def test_latents_are_denoise_from_each_images_own_seed():
    """Image i starts from the noise of its own seed; `sample` is `denoise` on that noise with the
    model's solver and guidance, and pixel-space images are the latents mapped from [-1, 1] to [0, 1]."""
    m = _pixel_dit()
    out = sample(m, class_labels=[3, 1, 4], seeds=[11, 7, 2], num_steps=3, guidance_scale=2.5)
    noise = torch.stack(
        [torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (11, 7, 2)]
    )
    assert torch.equal(make_noise([11, 7, 2], (1, 8, 8)), noise)
    want = denoise(m.transformer, noise, make_solver(m.scheduler, 3), dit_cond(m.transformer, [3, 1, 4]),
                   guidance_scale=2.5)  # fmt: skip
    assert torch.equal(out.latents, want)
    assert torch.equal(out.images, (want / 2 + 0.5).clamp(0, 1))
    assert out.images.dtype == torch.float32 and out.images.device.type == "cpu"
    assert out.seeds == [11, 7, 2] and out.labels == [3, 1, 4]
    assert out.info["guidance_scale"] == 2.5 and out.info["solver"] == "ddim" and out.info["num_steps"] == 3


def test_seeds_default_batches_and_order():
    m = _pixel_dit()
    full = sample(m, class_labels=[0, 1, 2, 3, 4], seed=20, num_steps=2)
    assert full.seeds == [20, 21, 22, 23, 24]
    # batches of 2 give the same latents as one batch of 5
    torch.testing.assert_close(
        sample(m, class_labels=[0, 1, 2, 3, 4], seed=20, num_steps=2, batch_size=2).latents,
        full.latents,
        rtol=1e-4,
        atol=1e-4,
    )  # fmt: skip (batch size changes matmul roundings, nothing more)
    assert sample(m, class_labels=[0], num_steps=2, batch_size=2).info["batch_size"] == 2
    # an image depends on its own seed and label only, not on its neighbours
    one = sample(m, class_labels=[3], seeds=[23], num_steps=2)
    torch.testing.assert_close(one.latents[0], full.latents[3], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(full.latents[0], full.latents[1])


def test_argument_errors():
    m = _pixel_dit()
    with pytest.raises(ValueError, match=r"num_steps must be .*>= 1, got 0"):
        sample(m, class_labels=[0], num_steps=0)
    with pytest.raises(ValueError, match="got 1 seeds for 2 images"):
        sample(m, class_labels=[0, 1], seeds=[5], num_steps=1)
    with pytest.raises(ValueError, match=r"batch_size must be .*>= 1, got 0"):
        sample(m, class_labels=[0], num_steps=1, batch_size=0)
    with pytest.raises(ValueError, match="nothing to sample"):
        sample(m, class_labels=[], num_steps=1)


def test_ilf_for_one_call_is_removed_after_and_cost_is_reported(tmp_path):
    m = _pixel_dit()
    weights = _weights(tmp_path, m, loop_steps="last:2")
    plain = sample(m, class_labels=[1, 2], num_steps=3)
    assert plain.info["ilf"] is None and plain.info["loop_mask"] == [False] * 3
    assert plain.info["block_evals_per_image"] == 3 * 4
    looped = sample(m, class_labels=[1, 2], num_steps=3, ilf=weights)
    assert get_ilf(m.transformer) is None  # the call's loop is gone
    assert looped.info["loop_mask"] == [False, True, True]
    assert looped.info["block_evals_per_image"] == 3 * 4 + 2 * (2 + 1)
    assert looped.info["ilf"]["loop_start"] == 1 and looped.info["ilf"]["loop_end"] == 2
    # the loop matters on the looped steps, and a mask that loops nowhere gives the plain latents
    assert (looped.latents - plain.latents).abs().max() > 1e-4
    none = sample(m, class_labels=[1, 2], num_steps=3, ilf=weights, loop_steps="none")
    assert torch.equal(none.latents, plain.latents) and none.info["block_evals_per_image"] == 12
    # an ILFConfig works too, and the weights equal applying the loop by hand
    loop = apply_ilf(m.transformer, weights)
    try:
        by_hand = sample(m, class_labels=[1, 2], num_steps=3)
        assert torch.equal(by_hand.latents, looped.latents)
        with pytest.raises(RuntimeError, match="already carries an ILF loop"):
            sample(m, class_labels=[1], num_steps=1, ilf=weights)
    finally:
        remove_ilf(m.transformer)
    assert loop is not None and get_ilf(m.transformer) is None


def test_loop_removed_even_when_sampling_fails(tmp_path):
    m = _pixel_dit()
    weights = _weights(tmp_path, m)
    with pytest.raises(ValueError):
        sample(m, class_labels=[0], num_steps=3, ilf=weights, loop_steps="bogus")
    assert get_ilf(m.transformer) is None


def test_vae_decode_and_latents_only():
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=tiny_dit(num_classes=1000), vae=tiny_vae(), scheduler=dpm_scheduler())
    out = sample(pipe, class_labels=[1, 999], num_steps=2)
    assert out.info["solver"] == "dpmpp_2m" and out.info["kind"] == "dit"
    vae = pipe.vae
    with torch.no_grad():
        want = vae.decode(out.latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(out.images, (want / 2 + 0.5).clamp(0, 1))
    assert out.images.shape == (2, 3, 16, 16) and out.latents.shape == (2, 4, 8, 8)
    only = sample(pipe, class_labels=[1, 999], num_steps=2, return_latents_only=True)
    assert only.images.numel() == 0 and torch.equal(only.latents, out.latents)
    assert torch.equal(decode(Model(pipe.transformer, pipe.scheduler, vae=vae), out.latents), out.images)


def test_scheduler_override_and_solver_choice():
    m = _pixel_dit()
    trailing = sample(m, class_labels=[0], num_steps=3)
    leading = sample(m, class_labels=[0], num_steps=3, scheduler=ddim_scheduler(timestep_spacing="leading"))
    assert not torch.equal(trailing.latents, leading.latents)
    assert m.scheduler.config.timestep_spacing == "trailing"  # the model's own is untouched
    dpm = sample(m, class_labels=[0], num_steps=3, solver="dpmpp_2m")
    assert dpm.info["solver"] == "dpmpp_2m" and not torch.equal(dpm.latents, trailing.latents)


def test_pixart_prompt_embeds_and_labels():
    model = tiny_pixart()
    emb, mask, neg, nmask = prompt_inputs(2)
    kw = {"prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
          "negative_prompt_attention_mask": nmask}  # fmt: skip
    out = sample(model, num_steps=2, guidance_scale=3.0, return_latents_only=True, **kw)
    assert out.labels == ["embeds[0]", "embeds[1]"] and out.info["kind"] == "pixart"
    # image 1 alone, from its own seed, equals image 1 of the pair
    one = sample(model, num_steps=2, guidance_scale=3.0, return_latents_only=True, seeds=[1],
                 **{k: v[1:] for k, v in kw.items()})  # fmt: skip
    torch.testing.assert_close(one.latents[0], out.latents[1], rtol=1e-4, atol=1e-4)


def test_progress_bar_counts_every_step(monkeypatch):
    import tqdm.auto

    updates = []

    class Bar:
        def __init__(self, total, **kw):
            updates.append(("total", total))

        def update(self, n):
            updates.append(("step", n))

        def close(self):
            updates.append(("close", None))

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    sample(_pixel_dit(), class_labels=[0, 1, 2], num_steps=2, batch_size=2, progress=True)
    assert updates == [("total", 4), *[("step", 1)] * 4, ("close", None)]  # 2 batches x 2 steps


def test_loading_a_model_with_a_dtype_raises_no_deprecation_warning(tmp_path):
    """Our calls into diffusers use its current API: loading a pipeline or transformer directory with
    a dtype gives no FutureWarning / DeprecationWarning (diffusers 0.42 deprecated ``torch_dtype``)."""
    from diffusers import DiTPipeline

    from ilf_runtime.registry import load_model

    DiTPipeline(
        transformer=tiny_dit(num_classes=1000), vae=tiny_vae(), scheduler=dpm_scheduler()
    ).save_pretrained(tmp_path / "pipe")
    tiny_dit(in_channels=1, learned_sigma=False).save_pretrained(tmp_path / "bare")
    for where in ("pipe", "bare"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            m = load_model(tmp_path / where, dtype=torch.float32)
        assert m.dtype == torch.float32
