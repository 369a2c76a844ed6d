"""The bundled demo's Fashion-MNIST specifics: the data set (`data`), the shipped classifier whose
features give FID and whose predictions give class accuracy (`classifier`), and `ilf eval`
(`evaluate`). Nothing in the runtime proper imports this package; the trainer and `ilf bench` use
it only for models it fits (`unsupported_reason`)."""

from __future__ import annotations

from typing import Any

__all__ = ["unsupported_reason"]


def unsupported_reason(model: Any) -> str | None:
    """Why the Fashion-MNIST data, classifier and FID do not fit `model` (a `registry.Model`), or
    None when they do: they need a 10-class, 1-channel, pixel-space class-conditional model."""
    adapter, c = model.adapter, model.transformer.config
    classes = adapter.num_classes(model.transformer) if adapter.class_conditional else None
    if classes != 10 or c.in_channels != 1 or model.vae is not None:
        return (
            "the Fashion-MNIST data and classifier need a 10-class, 1-channel, pixel-space class-conditional "
            f"model; this is a {adapter.name} model with {classes or 'no'} classes, {c.in_channels} channels"
            + (" and a VAE" if model.vae is not None else "")
        )
    return None
