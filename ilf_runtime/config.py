"""`ILFConfig`: where the inner loop sits, when it runs and how the feedback block starts.

The forward pass these fields parameterise is section 2 of the method notes
(`shared/ILF_METHOD.md`): blocks ``loop_start..loop_end`` (inclusive) run once as usual, then
``loop_iters`` times the feedback block reads the last loop block's output, its output scaled by
learnable per-block (or per-block-and-channel) scales is added to the input of every loop block,
and the loop blocks run again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["LIMITS", "SCALE_SHAPES", "ILFConfig", "parse_step_spec"]

SCALE_SHAPES = ("block", "channel")
# Inclusive bounds of the integer fields: a config read from a file can ask for no more than this
# (``loop_iters`` = 10**9 would hang sampling).
LIMITS = {
    "loop_start": (0, 4095),
    "loop_end": (0, 4095),
    "loop_iters": (1, 64),
    "feedback_t_shift": (0, 100_000),
    "init_seed": (0, 2**63 - 1),
}


def parse_step_spec(spec: str, num_steps: int) -> list[bool]:
    """Turns a loop-step spec into one flag per sampling step.

    Specs: ``"all"``, ``"none"``, ``"first:K"``, ``"last:K"``, ``"every:K"`` (steps 0, K, 2K, ...)
    or a comma-separated list of step indices (``"5,7,9"``; negative indices count from the end).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    spec = spec.strip()
    if spec == "all":
        return [True] * num_steps
    if spec == "none":
        return [False] * num_steps
    for prefix in ("first:", "last:", "every:"):
        if spec.startswith(prefix):
            try:
                k = int(spec[len(prefix) :])
            except ValueError:
                raise ValueError(f"loop step spec {spec!r}: expected {prefix}<int>") from None
            if k < (1 if prefix == "every:" else 0):
                raise ValueError(f"loop step spec {spec!r}: the count must be positive")
            if prefix == "first:":
                return [i < k for i in range(num_steps)]
            if prefix == "last:":
                return [i >= num_steps - k for i in range(num_steps)]
            return [i % k == 0 for i in range(num_steps)]
    try:
        idx = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"loop step spec {spec!r}: expected 'all', 'none', 'first:K', 'last:K', 'every:K' "
            "or comma-separated step indices"
        ) from None
    mask = [False] * num_steps
    for i in idx:
        if not -num_steps <= i < num_steps:
            raise ValueError(f"loop step spec {spec!r}: step {i} is outside 0..{num_steps - 1}")
        mask[i] = True
    return mask


@dataclass
class ILFConfig:
    """Configuration of one inner feedback loop.

    Args:
        loop_start: index of the first backbone block inside the loop.
        loop_end: index of the last backbone block inside the loop (inclusive).
        loop_iters: how many times the loop runs again after the first pass, on looped steps.
        loop_steps: which sampling steps carry the loop: ``"all"``, ``"none"``, ``"first:K"``,
            ``"last:K"``, ``"every:K"`` or step indices ``"5,7,9"`` (see `parse_step_spec`).
        scale_shape: ``"block"`` for one learnable scale per loop block, ``"channel"`` for one per
            loop block and channel. Scales start at zero, so a fresh loop is the identity.
        feedback_init: ``"random"`` (the block class's own initialisation, seeded by `init_seed`)
            or ``"copy:K"`` (start from a copy of backbone block K's weights).
        feedback_t_shift: the feedback block is conditioned on timestep ``t - feedback_t_shift``
            (clamped at 0); 0 means the current step's timestep.
        init_seed: seed for the random initialisation of the feedback block.
    """

    loop_start: int
    loop_end: int
    loop_iters: int = 1
    loop_steps: str = "all"
    scale_shape: str = "block"
    feedback_init: str = "random"
    feedback_t_shift: int = 0
    init_seed: int = 0

    def __post_init__(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")
        for name in ("loop_steps", "scale_shape", "feedback_init"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"{name} must be a string, got {v!r} ({type(v).__name__})")
        if self.loop_end < self.loop_start:
            raise ValueError(
                f"loop range must satisfy 0 <= loop_start <= loop_end, got {self.loop_start}..{self.loop_end}"
            )
        if self.scale_shape not in SCALE_SHAPES:
            raise ValueError(f"scale_shape must be one of {SCALE_SHAPES}, got {self.scale_shape!r}")
        if self.feedback_init != "random" and self.copy_block is None:
            raise ValueError(f"feedback_init must be 'random' or 'copy:K', got {self.feedback_init!r}")
        parse_step_spec(self.loop_steps, 1000)  # syntax check; indices are checked per run

    @property
    def num_loop_blocks(self) -> int:
        return self.loop_end - self.loop_start + 1

    @property
    def copy_block(self) -> int | None:
        """Backbone block index for ``feedback_init="copy:K"``, else None."""
        if not self.feedback_init.startswith("copy:"):
            return None
        try:
            k = int(self.feedback_init[5:])
        except ValueError:
            return None
        return k if k >= 0 else None

    def check_backbone(self, num_layers: int) -> None:
        """Raises if the loop does not fit a backbone with `num_layers` blocks."""
        if self.loop_end >= num_layers:
            raise ValueError(
                f"loop {self.loop_start}..{self.loop_end} does not fit a backbone with {num_layers} blocks "
                f"(valid block indices 0..{num_layers - 1})"
            )
        k = self.copy_block
        if k is not None and k >= num_layers:
            raise ValueError(f"feedback_init={self.feedback_init!r}: backbone has blocks 0..{num_layers - 1}")

    def step_mask(self, num_steps: int, spec: str | None = None) -> list[bool]:
        """One flag per sampling step: does the loop run on that step."""
        return parse_step_spec(self.loop_steps if spec is None else spec, num_steps)

    def block_evals(self, num_layers: int, num_steps: int, spec: str | None = None) -> int:
        """Block evaluations per image over a sampling run (feedback block counted as one)."""
        looped = sum(self.step_mask(num_steps, spec))
        return num_layers * num_steps + looped * self.loop_iters * (self.num_loop_blocks + 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ILFConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ILFConfig fields {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)
