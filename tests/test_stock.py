"""ILF in the stock diffusers pipeline call (`ilf_runtime.enable`): ``pipe(...)`` runs the trained
schedule and gives the images of `ilf_runtime.sample` for the same noise; a call on another grid
raises, naming both."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny import ddim_scheduler, tiny_dit, tiny_pixart, tiny_text_encoder, tiny_vae

from ilf_runtime import ILFConfig, apply_ilf, disable, enable, get_ilf, remove_ilf, sample, save_ilf_weights
from ilf_runtime.registry import MODEL_NAMES

STEPS, LOOP = 4, "last:2"


def _weights(transformer, path, solver="ddim"):
    """Feedback weights with non-zero scales (a zero-scale loop is the identity) for `transformer`."""
    loop = apply_ilf(
        transformer, ILFConfig(loop_start=1, loop_end=2, loop_steps=LOOP, feedback_init="copy:2")
    )
    with torch.no_grad():
        loop.scales.fill_(0.5)
    save_ilf_weights(path, transformer, sampler={"num_steps": STEPS, "loop_steps": LOOP, "solver": solver})
    remove_ilf(transformer)
    return path


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _recording_decoder():
    """The identity decoder, keeping what it decoded: the tiny random models' images saturate at 0
    and 1, so the tests compare the final latents."""
    from ilf_runtime.pixel_decoder import PixelDecoder

    class Recorder(PixelDecoder):
        def decode(self, z, return_dict=True):
            self.last = z.clone()
            return super().decode(z, return_dict)

    return Recorder()


def _dit_call(pipe, labels, seeds, steps=STEPS):
    pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=1.0, generator=_gens(seeds),
         output_type="pt")  # fmt: skip
    return pipe.vae.last


@pytest.fixture
def dit_pipe(tmp_path):
    from diffusers import DiTPipeline

    t = tiny_dit(in_channels=1, learned_sigma=False)
    pipe = DiTPipeline(
        transformer=t, vae=_recording_decoder(), scheduler=ddim_scheduler(timestep_spacing="trailing")
    )
    return pipe, _weights(t, tmp_path / "fb.safetensors")


def test_stock_dit_call_equals_sample_and_follows_the_schedule(dit_pipe):
    pipe, w = dit_pipe
    seeds, labels = [3, 4, 5], [1, 2, 7]
    plain = _dit_call(pipe, labels, seeds)
    enable(pipe, w)
    stock = _dit_call(pipe, labels, seeds)
    loop = get_ilf(pipe)
    assert loop.active and not loop.stepping  # left as apply_ilf leaves it
    disable(pipe)
    kw = {"class_labels": labels, "num_steps": STEPS, "seeds": seeds, "guidance_scale": 1.0, "ilf": w,
          "return_latents_only": True}  # fmt: skip
    ours = sample(pipe, **kw).latents
    every = sample(pipe, **kw, loop_steps="all").latents
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)
    assert (stock - plain).abs().max() > 1e-3  # the loop ran
    assert (ours - every).abs().max() > 1e-3  # ...on its trained steps only, not on every step
    assert get_ilf(pipe) is None


def test_a_call_on_another_grid_raises_naming_both(dit_pipe):
    from diffusers import DPMSolverMultistepScheduler

    pipe, w = dit_pipe
    enable(pipe, w)
    with pytest.raises(ValueError, match=r"trained for 4 steps of DDIMScheduler.*this call runs 8 steps"):
        pipe(class_labels=[1], num_inference_steps=8, guidance_scale=1.0, output_type="pt")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"DDIMScheduler.*with DPMSolverMultistepScheduler"):
        pipe(class_labels=[1], num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    with pytest.raises(RuntimeError, match="already applied"):
        enable(pipe, w)
    disable(pipe)
    pipe(class_labels=[1], num_inference_steps=8, guidance_scale=1.0, output_type="pt")  # plain again


def test_enable_sets_the_weights_solver(tmp_path):
    from diffusers import DiTPipeline

    t = tiny_dit(in_channels=1, learned_sigma=False)
    w = _weights(t, tmp_path / "fb.safetensors", solver="dpmpp_2m")
    pipe = DiTPipeline(
        transformer=t, vae=_recording_decoder(), scheduler=ddim_scheduler(timestep_spacing="trailing")
    )
    enable(pipe, w)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    stock = _dit_call(pipe, [4, 6], [0, 1])
    disable(pipe)
    ours = sample(pipe, class_labels=[4, 6], num_steps=STEPS, seeds=[0, 1], guidance_scale=1.0, ilf=w,
                  return_latents_only=True).latents  # fmt: skip
    torch.testing.assert_close(stock, ours, rtol=0, atol=1e-5)


def test_enable_refuses_a_transformer():
    with pytest.raises(TypeError, match="takes a diffusers pipeline"):
        enable(tiny_dit(), "x.safetensors")


def test_stock_pixart_call_equals_sample(tmp_path):
    from diffusers import PixArtAlphaPipeline

    tokenizer, encoder = tiny_text_encoder()
    t = tiny_pixart()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(), transformer=t,
                               scheduler=ddim_scheduler(timestep_spacing="trailing"))  # fmt: skip
    w = _weights(t, tmp_path / "fb.safetensors")
    prompts, seeds = ["a red cat", "a blue dog on the grass"], [11, 12]
    kw = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "use_resolution_binning": False,
          "output_type": "pt", "clean_caption": False, "max_sequence_length": 8}  # fmt: skip
    enable(pipe, w)
    stock = pipe(prompts, generator=_gens(seeds), **kw).images
    stock_latents = pipe(prompts, generator=_gens(seeds), **(kw | {"output_type": "latent"})).images
    disable(pipe)
    plain_latents = pipe(prompts, generator=_gens(seeds), **(kw | {"output_type": "latent"})).images
    from ilf_runtime.registry import to_model

    m = to_model(pipe)
    m.encode_kwargs = {"max_sequence_length": 8, "clean_caption": False}
    ours = sample(m, prompts=prompts, num_steps=STEPS, seeds=seeds, guidance_scale=3.0, ilf=w)
    torch.testing.assert_close(stock, ours.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(stock_latents, ours.latents, rtol=0, atol=1e-5)
    assert (stock_latents - plain_latents).abs().max() > 1e-3  # the loop ran


@pytest.mark.skipif(
    not (MODEL_NAMES["fashion-dit"][0] / "feedback.safetensors").is_file(), reason="bundled weights absent"
)
@pytest.mark.parametrize("weights", ["shipped", "shipped:uniform-132"])
def test_fashion_dit_stock_call_with_shipped_weights(weights):
    from diffusers import DiTPipeline

    from ilf_runtime import load_model
    from ilf_runtime.stock import pixel_pipeline

    m = load_model("fashion-dit")
    pipe = pixel_pipeline(m)
    assert isinstance(pipe, DiTPipeline)
    enable(pipe, weights)  # found beside the transformer's folder
    seeds, labels = [100, 101], [0, 9]
    stock = pipe(class_labels=labels, num_inference_steps=10, guidance_scale=1.0, generator=_gens(seeds),
                 output_type="pt").images  # fmt: skip
    disable(pipe)
    ours = sample(m, class_labels=labels, num_steps=10, seeds=seeds, ilf=weights).images
    torch.testing.assert_close(torch.as_tensor(stock), ours, rtol=0, atol=1e-6)


def test_shipped_needs_a_model_loaded_from_a_folder():
    from diffusers import DiTPipeline

    from ilf_runtime.pixel_decoder import PixelDecoder

    pipe = DiTPipeline(transformer=tiny_dit(), vae=PixelDecoder(), scheduler=ddim_scheduler())
    with pytest.raises(FileNotFoundError, match="not loaded from a folder; pass a weights file"):
        enable(pipe, "shipped")
