"""Test fixtures: tiny models built and saved by the tests themselves (see tests/fixtures/tiny.py)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tests.fixtures.tiny import (  # noqa: F401
    CAPTION_CHANNELS,
    NUM_CLASSES,
    ddim_scheduler,
    dpm_scheduler,
    prompt_inputs,
    tiny_dit,
    tiny_pixart,
    tiny_text_encoder,
    tiny_vae,
)


@pytest.fixture
def dit():
    return tiny_dit()


@pytest.fixture
def pixart():
    return tiny_pixart()
