"""The training-free caching methods by name: their configs, setting syntax and table text.

`FAMILIES` names the six methods (``fora``, ``delta-dit``, ...), says what each does and how a setting
string such as ``"6:0.5:2"`` becomes its config (`cache_config`); `ilf bench`, its ``--help`` and the
README's table read it. The configs of this project's own caches live here too; `ilf_runtime.caches`
attaches any of them to a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

__all__ = [
    "FAMILIES",
    "CacheFamily",
    "DeltaDiTConfig",
    "ForaConfig",
    "InnerReuseConfig",
    "cache_config",
    "describe",
    "markdown_table",
]


@dataclass
class ForaConfig:
    """FORA (Selvaraju et al. 2024): static reuse of attention and MLP outputs.

    Args:
        interval: all blocks compute on steps 0, N, 2N, ...; the others reuse (1: never reuse).
    """

    interval: int = 2

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")


@dataclass
class DeltaDiTConfig:
    """Delta-DiT (Chen et al. 2024): reuse of a block range's output-minus-input.

    Args:
        num_blocks: size of the cached range: the last ``num_blocks`` blocks in the early phase,
            the first ``num_blocks`` in the late phase.
        boundary: fraction of the steps (rounded) that make up the early phase.
        interval: within each phase the range computes on its first step and every ``interval``-th
            after it; the others add the cached delta (1: never reuse).
    """

    num_blocks: int = 6
    boundary: float = 0.5
    interval: int = 2

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.interval < 1 or not 0.0 <= self.boundary <= 1.0:
            raise ValueError(
                f"need num_blocks >= 1, interval >= 1, 0 <= boundary <= 1; got {self.num_blocks}, "
                f"{self.interval}, {self.boundary}"
            )


@dataclass
class InnerReuseConfig:
    """The ILF paper's caching baseline: reuse of an inner block range's output.

    Args:
        start: first block of the range.
        end: last block of the range (inclusive).
        interval: the range computes on steps 0, N, 2N, ...; in between its output from the last
            full step replaces it (1: never reuse).
    """

    start: int = 1
    end: int = 10
    interval: int = 2

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start or self.interval < 1:
            raise ValueError(
                f"need 0 <= start <= end and interval >= 1, got {self.start}..{self.end}, {self.interval}"
            )


# -- the families: one entry per method ------------------------------------------------------------


@dataclass(frozen=True)
class CacheFamily:
    """One caching method by name: its config, the syntax of its settings and their table text.

    Args:
        name: the method's name in tables and in ``ilf bench --methods``.
        config_class: the config `apply_cache` takes for it.
        spec_syntax: the syntax of a setting string, e.g. ``K:BOUNDARY:N``.
        default_sweep: the settings ``ilf bench`` runs by default, comma-separated.
        parse: ``(spec, dtype, mag_ratios) -> config`` (see `cache_config`).
        setting: ``config -> str``, the setting as tables show it.
        description: one line on what it does (README table, ``--help``).
    """

    name: str
    config_class: type
    spec_syntax: str
    default_sweep: str
    parse: Callable[[str, torch.dtype, list[float] | None], Any]
    setting: Callable[[Any], str]
    description: str


def _delta_dit(spec: str, dtype: torch.dtype, ratios: list[float] | None) -> DeltaDiTConfig:
    k, b, n = spec.split(":")
    return DeltaDiTConfig(int(k), float(b), int(n))


def _inner_reuse(spec: str, dtype: torch.dtype, ratios: list[float] | None) -> InnerReuseConfig:
    blocks, n = spec.split(":")
    a, b = blocks.split("-")
    return InnerReuseConfig(int(a), int(b), int(n))


TAYLORSEER_WARMUP = TaylorSeerCacheConfig.disable_cache_before_step  # diffusers' default warm-up (3 steps)


def _taylorseer(spec: str, dtype: torch.dtype, ratios: list[float] | None) -> TaylorSeerCacheConfig:
    n, order, warmup, *rest = spec.split(":") + ["", ""]
    if rest != [""] * len(rest):
        raise ValueError("too many fields")
    return TaylorSeerCacheConfig(
        cache_interval=int(n),
        max_order=int(order or 1),
        disable_cache_before_step=int(warmup or TAYLORSEER_WARMUP),
        taylor_factors_dtype=dtype,
    )


def _taylorseer_name(c: TaylorSeerCacheConfig) -> str:
    warmup = (
        "" if c.disable_cache_before_step == TAYLORSEER_WARMUP else f",warmup={c.disable_cache_before_step}"
    )
    return f"N={c.cache_interval},order={c.max_order}{warmup}"


def _magcache(spec: str, dtype: torch.dtype, ratios: list[float] | None) -> MagCacheConfig:
    if ratios is None:  # a calibration run
        return MagCacheConfig(calibrate=True, threshold=float(spec))
    return MagCacheConfig(threshold=float(spec), mag_ratios=ratios, num_inference_steps=len(ratios))


# fmt: off
FAMILIES: dict[str, CacheFamily] = {f.name: f for f in (
    CacheFamily("fora", ForaConfig, "N", "2,3", lambda s, d, r: ForaConfig(int(s)),
                lambda c: f"N={c.interval}",
                "FORA: all blocks compute every N steps; in between, attention and MLP outputs are reused"),
    CacheFamily("delta-dit", DeltaDiTConfig, "K:BOUNDARY:N", "6:0.5:2,8:0.5:2,8:0.5:3", _delta_dit,
                lambda c: f"k={c.num_blocks},b={c.boundary:g},N={c.interval}",
                "Delta-DiT: K blocks add their cached output-minus-input, refreshed every N steps (the last "
                "K before the BOUNDARY fraction of the steps, the first K after)"),
    CacheFamily("inner-reuse", InnerReuseConfig, "A-B:N", "1-10:2,2-9:2,3-8:2", _inner_reuse,
                lambda c: f"blocks {c.start}-{c.end},N={c.interval}",
                "the ILF paper's baseline: blocks A..B compute every N steps, their output reused between"),
    CacheFamily("first-block-cache", FirstBlockCacheConfig, "THRESHOLD", "0.05,0.1,0.2",
                lambda s, d, r: FirstBlockCacheConfig(threshold=float(s)), lambda c: f"thr={c.threshold:g}",
                "diffusers' First-Block-Cache: later blocks skip while block 0's output moves < THRESHOLD"),
    CacheFamily("taylorseer", TaylorSeerCacheConfig, "N[:ORDER[:WARMUP]]", "2,3,4", _taylorseer,
                _taylorseer_name,
                "diffusers' TaylorSeer: outputs computed every N steps (after WARMUP full steps, default 3), "
                "Taylor-extrapolated in between"),
    CacheFamily("magcache", MagCacheConfig, "THRESHOLD", "0.03,0.06,0.12,0.24", _magcache,
                lambda c: "calibrate" if c.calibrate else f"thr={c.threshold:g}",
                "diffusers' MagCache: blocks skip while the calibrated magnitude-ratio error is < THRESHOLD"),
)}
# fmt: on


def cache_config(family: str, spec: str, *, dtype: torch.dtype, mag_ratios: list[float] | None = None) -> Any:
    """The config of family `family` (a key of `FAMILIES`) at setting string `spec`, e.g. ``"8:0.5:2"``
    for delta-dit; `dtype` is the model's (TaylorSeer keeps its factors in it), `mag_ratios` MagCache's
    calibrated ratios (None: a calibration config). A malformed `spec` raises ValueError."""
    if family not in FAMILIES:
        raise ValueError(f"unknown cache family {family!r}; expected one of {', '.join(FAMILIES)}")
    try:
        return FAMILIES[family].parse(spec, dtype, mag_ratios)
    except ValueError as e:
        raise ValueError(
            f"{family} setting {spec!r}: expected {FAMILIES[family].spec_syntax} ({e})"
        ) from None


def describe(config: Any) -> tuple[str, str]:
    """(method name, setting) of a cache config, for tables."""
    for f in FAMILIES.values():
        if isinstance(config, f.config_class):
            return f.name, f.setting(config)
    raise TypeError(f"unknown cache config {type(config).__name__}")


def markdown_table() -> str:
    """The table of `FAMILIES` that README.md shows (a test keeps the two equal)."""
    lines = ["| method | what it does | setting | `ilf bench` default sweep |", "|---|---|---|---|"]
    for f in FAMILIES.values():
        lines.append(f"| `{f.name}` | {f.description} | `{f.spec_syntax}` | `{f.default_sweep}` |")
    return "\n".join(lines)
