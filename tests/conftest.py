"""Test fixtures: tiny models built and saved by the tests themselves (see tests/fixtures/tiny.py)."""

from __future__ import annotations

import os
from typing import Self

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


class IlfOpCalls:
    """Counts the compiled ``torch.ops.ilf`` kernels that run inside a ``with`` block, by name
    (``"feedback_inject"``, ...), as the dispatcher sees them: a check that the compiled op ran,
    not just that a Python wrapper was called."""

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts: Counter[str] = Counter()
        counts = self.counts

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ns, _, name = func._schema.name.partition("::")
                if ns == "ilf":
                    counts[name] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    def __enter__(self) -> Self:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def require_cuda_kernels() -> None:
    """For GPU tests whose point is the compiled CUDA kernels: skip without CUDA, and skip with a
    reason naming the build when ``ilf_runtime._C`` was built without CUDA kernels (otherwise the
    test would pass on the PyTorch references and claim to have checked the kernels)."""
    from ilf_runtime.ext import ext_status

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    st = ext_status()
    if not st["loaded"]:
        pytest.skip(f"ilf_runtime._C not loaded ({st['reason']}): the CUDA kernels cannot be checked")
    if not st["cuda_ops"]:
        pytest.skip(
            "ilf_runtime._C was built without CUDA kernels (CPU-only torch or ILF_CUDA_BUILD=0 at build "
            "time): the fused path would run the PyTorch references; rebuild with a CUDA torch"
        )
