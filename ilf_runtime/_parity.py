"""Parity of this project's denoising loop against the diffusers pipelines' own loops (internal).

Each function runs a diffusers pipeline (`DiTPipeline`, `PixArtAlphaPipeline`) on a tiny model
and this project's `denoise` from the same initial noise, and returns the max abs difference of
the final latents with the latents' magnitude. Used by tests/test_sampling.py and by
benchmarks/parity.py, which records the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ilf_runtime._tiny import ddim_scheduler, dpm_scheduler, prompt_inputs, tiny_dit, tiny_pixart, tiny_vae
from ilf_runtime.sampling import denoise, dit_conditioning, pixart_conditioning
from ilf_runtime.solvers import make_solver

SCHEDULERS = {
    "ddim": lambda: ddim_scheduler(),
    "ddim-trailing": lambda: ddim_scheduler(timestep_spacing="trailing"),
    "dpmpp_2m": lambda: dpm_scheduler(),
}


@dataclass
class Parity:
    model: str
    scheduler: str
    guidance: float
    steps: int
    max_abs_diff: float
    magnitude: float  # max |latent| of the reference

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(1.0, self.magnitude)


def dit_parity(scheduler: str, guidance: float, steps: int) -> Parity:
    from diffusers import DiTPipeline

    transformer, vae, sched = tiny_dit(num_classes=1000), tiny_vae(), SCHEDULERS[scheduler]()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=sched)
    seen = {}
    decode = vae.decode

    def capture(z, *args, **kwargs):  # the pipeline hands its final latents / scaling_factor to the VAE
        seen["z"] = z.clone()
        return decode(z, *args, **kwargs)

    vae.decode = capture  # instance attribute on a throwaway VAE
    labels = [3, 999]
    with torch.no_grad():
        pipe(
            class_labels=labels,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = dit_conditioning(transformer, labels)
    ours = denoise(transformer, noise, make_solver(sched, steps), cond, guidance_scale=guidance)
    # compare where the pipeline hands over, 1 / scaling_factor * latents (computed the same way),
    # and express the difference back in latent units
    inv = 1 / vae.config.scaling_factor
    diff = (inv * ours - seen["z"]).abs().max().item() / inv
    return Parity("DiT", scheduler, guidance, steps, diff, seen["z"].abs().max().item() / inv)


def pixart_parity(scheduler: str, guidance: float, steps: int) -> Parity:
    from diffusers import PixArtAlphaPipeline

    transformer, sched = tiny_pixart(), SCHEDULERS[scheduler]()
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer, scheduler=sched
    )
    emb, mask, neg, nmask = prompt_inputs(2)
    with torch.no_grad():
        ref = pipe(
            prompt=None,
            negative_prompt=None,
            prompt_embeds=emb,
            prompt_attention_mask=mask,
            negative_prompt_embeds=neg,
            negative_prompt_attention_mask=nmask,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            use_resolution_binning=False,
        ).images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pixart_conditioning(transformer, emb, mask, neg, nmask, height=16, width=16)
    ours = denoise(transformer, noise, make_solver(sched, steps), cond, guidance_scale=guidance)
    return Parity(
        "PixArt", scheduler, guidance, steps, (ours - ref).abs().max().item(), ref.abs().max().item()
    )
