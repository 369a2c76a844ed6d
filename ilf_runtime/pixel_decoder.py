"""The VAE of a pixel-space model: `PixelDecoder`, the identity.

The stock diffusers pipelines always decode through ``pipe.vae``; the bundled models sample in
pixel space, so this stands in for it (no parameters; ``decode(x)`` returns x). The class is built
on first use, because importing diffusers is slow and ``import ilf_runtime`` must stay light.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["PixelDecoder"]  # noqa: F822 - built on first use, by the module __getattr__


def _build() -> type:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class PixelDecoder(ModelMixin, ConfigMixin):
        """Stands in for the VAE of a pixel-space model: ``decode(x)`` returns x. The config fields
        are those the pipelines read (a scale factor of 1 and one block: no up-sampling)."""

        is_identity = True  # registry.to_model: a pixel-space model

        @register_to_config
        def __init__(self, scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (1,)):
            super().__init__()
            # no parameters: an empty buffer tells diffusers the module's device (pipe.to moves it)
            self.register_buffer("anchor", torch.zeros(0), persistent=False)

        def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=z) if return_dict else (z,)

    return PixelDecoder


def __getattr__(name: str) -> Any:  # PixelDecoder is built on first use: importing diffusers is slow
    if name == "PixelDecoder":
        cls = globals()["PixelDecoder"] = _build()
        return cls
    raise AttributeError(name)
