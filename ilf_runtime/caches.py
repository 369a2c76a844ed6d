"""Training-free caching baselines as reversible hooks on a supported transformer's blocks.

The methods by name, their configs and setting strings are in `ilf_runtime.cache_families`. FORA (`ForaConfig`), Delta-DiT (`DeltaDiTConfig`) and the ILF paper's caching
baseline (`InnerReuseConfig`, DeepCache moved onto blocks) are this project's own implementations,
each a set of diffusers `ModelHook`s on the instance's ``transformer_blocks`` (or their attention / MLP
sub-modules), never a class patch.

diffusers' own First-Block-Cache, TaylorSeer and MagCache run through their real code
(`diffusers.hooks.apply_*`), with the cache context set per step by hand (private API in diffusers
0.42.1; these transformers are no `CacheMixin`s). First-Block-Cache and MagCache read a value back
to the host each step, so they cannot be captured in a CUDA graph.

Usage: ``cache = apply_cache(transformer, ForaConfig(2), num_steps=20)``, then pass
``cache.before_step`` to `denoise` / `sample` (it restarts the cache at step 0 of every run), and
``remove_cache(transformer)`` to get the plain model back bit for bit. `BlockEvalCounter` counts
the attention / MLP computations that actually run, whichever method skips them.

Combined with an ILF loop (`compute_steps` = the loop's step mask), this project's caches skip only
on steps without the loop and pass the loop's second pass through untouched; diffusers' hooks know
nothing of the loop (blocks called inside it re-fire their hooks), so they are not combined with it.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import torch
from diffusers.hooks.hooks import CacheContext, HookRegistry, ModelHook, _set_cache_context
from torch import nn

from ilf_runtime.cache_families import (
    FAMILIES,
    CacheFamily,
    DeltaDiTConfig,
    ForaConfig,
    InnerReuseConfig,
    cache_config,
    describe,
    markdown_table,
)
from ilf_runtime.models import CACHE_ATTR, LOOP_ATTR, resolve

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "BlockEvalCounter",
    "Cache",
    "CacheFamily",
    "DeltaDiTConfig",
    "ForaConfig",
    "InnerReuseConfig",
    "apply_cache",
    "cache_config",
    "describe",
    "get_cache",
    "markdown_table",
    "remove_cache",
]

TAYLORSEER_IDENTIFIERS = [r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.attn2$"]
TAYLORSEER_IDENTIFIERS.append(r"^transformer_blocks\.\d+\.ff$")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _registry(module: nn.Module) -> HookRegistry:
    return HookRegistry.check_if_exists_or_initialize(module)


class Cache:
    """A cache attached to one transformer; `before_step` is the sampler's per-step callback."""

    hook_names: tuple[str, ...] = ()

    def __init__(self, transformer: nn.Module, config: Any, num_steps: int, compute_steps: Sequence[bool]):
        self.config = config
        self.num_steps = num_steps
        self.method, self.setting = describe(config)
        self._owner = weakref.ref(transformer)
        self._force = list(compute_steps)
        self.step = 0

    @property
    def transformer(self) -> nn.Module:
        t = self._owner()
        if t is None:
            raise RuntimeError("the transformer of this cache is gone")
        return t

    def before_step(self, i: int, t: torch.Tensor) -> None:
        if i == 0:
            self.reset()
        self.step = i

    def reset(self) -> None:
        """Forgets everything cached: the next forward is the first of a new run."""

    def _attach(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        t = self.transformer
        reg = _registry(t)
        for name in self.hook_names:
            reg.remove_hook(name, recurse=True)
        reg.invalidate_child_registries_cache()
        for m in t.modules():  # leave no empty registries and no instance `forward` behind
            r = m.__dict__.get("_diffusers_hook")
            if r is not None and not r.hooks:
                del m._diffusers_hook
                fwd = m.__dict__.get("forward")
                if getattr(fwd, "__self__", None) is m and getattr(fwd, "__func__", None) is type(m).forward:
                    del m.forward


# -- this project's caches ----------------------------------------------------------------------------


class _OwnCache(Cache):
    """Base of the caches implemented here: a fixed per-step skip plan, decided before the run."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.skipping = False
        self._loop: Any = None
        self.plan = [s and not f for s, f in zip(self._plan(), self._force)]

    def _plan(self) -> list[bool]:
        raise NotImplementedError

    def before_step(self, i: int, t: torch.Tensor) -> None:
        super().before_step(i, t)
        self.skipping = self.plan[i]
        if i == 0:
            self._loop = getattr(self.transformer, LOOP_ATTR, None)

    def in_ilf_loop(self) -> bool:
        """True inside the ILF loop's second pass: it is left to compute untouched."""
        return self._loop is not None and self._loop.running


class _KeepOutputHook(ModelHook):
    """On one attention or MLP module: compute and keep the output, or hand the kept one back."""

    def __init__(self, owner: _OwnCache):
        super().__init__()
        self.owner = owner
        self.out: torch.Tensor | None = None

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.owner.in_ilf_loop():
            return self.fn_ref.original_forward(*args, **kwargs)
        if not self.owner.skipping or self.out is None:
            self.out = self.fn_ref.original_forward(*args, **kwargs)  # (B, T, D)
        return self.out


class _Fora(_OwnCache):
    hook_names = ("ilf_fora",)

    def _plan(self) -> list[bool]:
        return [i % self.config.interval != 0 for i in range(self.num_steps)]

    def _attach(self) -> None:
        self._hooks = []
        for block in self.transformer.transformer_blocks:
            for sub in (block.attn1, block.attn2, block.ff):
                if sub is not None:
                    hook = _KeepOutputHook(self)
                    _registry(sub).register_hook(hook, self.hook_names[0])
                    self._hooks.append(hook)

    def reset(self) -> None:
        for h in self._hooks:
            h.out = None


class _RangeCache(_OwnCache):
    """A block range that either runs, or is replaced by what was kept from its last full run:
    the first block of the range returns the replacement, the others pass their input through."""

    def _ranges(self) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def _active(self, i: int) -> str:
        return next(iter(self._ranges()))

    def _replay(self, key: str, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _keep(self, key: str, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        raise NotImplementedError

    def before_step(self, i: int, t: torch.Tensor) -> None:
        super().before_step(i, t)
        self.active = self._active(i)

    def reset(self) -> None:
        self.kept: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    def _attach(self) -> None:
        blocks = self.transformer.transformer_blocks
        ranges = self._ranges()
        base, self.hook_names = self.hook_names[0], tuple(f"{self.hook_names[0]}_{k}" for k in ranges)
        self.reset()
        self.active = self._active(0)
        for key, (a, b) in ranges.items():
            if not 0 <= a <= b < len(blocks):
                raise ValueError(f"{self.method}: block range {a}..{b} does not fit {len(blocks)} blocks")
            for j in range(a, b + 1):
                _registry(blocks[j]).register_hook(_RangeHook(self, key, j == a, j == b), f"{base}_{key}")


class _RangeHook(ModelHook):
    """On each block of a `_RangeCache` range."""

    def __init__(self, owner: _RangeCache, key: str, first: bool, last: bool):
        super().__init__()
        self.owner, self.key, self.first, self.last = owner, key, first, last

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        c, key, run = self.owner, self.key, self.fn_ref.original_forward
        if c.active != key or c.in_ilf_loop():
            return run(*args, **kwargs)
        h = _hidden(args, kwargs)  # (B, T, D)
        if c.skipping and key in c.kept:
            return c._replay(key, h) if self.first else h
        if self.first:
            c.inputs[key] = h
        out = run(*args, **kwargs)
        if self.last:
            c._keep(key, c.inputs.pop(key), out)
        return out


class _DeltaDiT(_RangeCache):
    hook_names = ("ilf_delta",)

    def _ranges(self) -> dict[str, tuple[int, int]]:
        n, k = len(self.transformer.transformer_blocks), self.config.num_blocks
        if k > n:
            raise ValueError(f"delta-dit: num_blocks {k} exceeds the {n} blocks")
        return {"rear": (n - k, n - 1), "front": (0, k - 1)}

    def _boundary(self) -> int:
        return round(self.config.boundary * self.num_steps)

    def _active(self, i: int) -> str:
        return "rear" if i < self._boundary() else "front"

    def _plan(self) -> list[bool]:
        b, m = self._boundary(), self.config.interval
        return [(i if i < b else i - b) % m != 0 for i in range(self.num_steps)]

    def _replay(self, key: str, h: torch.Tensor) -> torch.Tensor:
        return h + self.kept[key]

    def _keep(self, key: str, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        self.kept[key] = h_out - h_in  # (B, T, D)


class _InnerReuse(_RangeCache):
    hook_names = ("ilf_inner_reuse",)

    def _ranges(self) -> dict[str, tuple[int, int]]:
        return {"inner": (self.config.start, self.config.end)}

    def _plan(self) -> list[bool]:
        return [i % self.config.interval != 0 for i in range(self.num_steps)]

    def _replay(self, key: str, h: torch.Tensor) -> torch.Tensor:
        return self.kept[key]

    def _keep(self, key: str, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        self.kept[key] = h_out


# -- diffusers' own caches ----------------------------------------------------------------------------


class _DiffusersCache(Cache):
    """First-Block-Cache, TaylorSeer or MagCache through `diffusers.hooks`, context set per step."""

    HOOKS: ClassVar[dict[str, tuple[str, ...]]] = {
        "first-block-cache": ("fbc_leader_block_hook", "fbc_block_hook"),
        "taylorseer": ("taylorseer_cache",),
        "magcache": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
    }

    def _attach(self) -> None:
        from diffusers.hooks import apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache

        cfg, t = self.config, self.transformer
        self.hook_names = self.HOOKS[self.method]
        if self.method == "first-block-cache":
            apply_first_block_cache(t, cfg)
        elif self.method == "taylorseer":
            if cfg.cache_identifiers is None and cfg.skip_predict_identifiers is None:
                # the default patterns do not match DiT / PixArt module names
                cfg = dataclasses.replace(cfg, cache_identifiers=list(TAYLORSEER_IDENTIFIERS))
            apply_taylorseer_cache(t, cfg)
        else:
            if cfg.calibrate:  # one step more, so that the hook's end-of-run reset never wipes the ratios
                cfg = dataclasses.replace(cfg, num_inference_steps=self.num_steps + 1)
            elif cfg.num_inference_steps != self.num_steps:
                raise ValueError(
                    f"MagCacheConfig.num_inference_steps is {cfg.num_inference_steps}, the run has {self.num_steps}"
                )
            apply_mag_cache(t, cfg)
        self.config = cfg
        self._reg = _registry(t)
        self._reg.invalidate_child_registries_cache()

    def before_step(self, i: int, t: torch.Tensor) -> None:
        if i == 0:
            self._reg.reset_stateful_hooks()
        self.step = i
        ctx = CacheContext("cond", step_index=i, num_inference_steps=self.num_steps, timestep=t)
        _set_cache_context(self.transformer, ctx)

    def mag_ratios(self) -> list[float]:
        """After a calibration run (``MagCacheConfig(calibrate=True)``): one ratio per step."""
        if self.method != "magcache" or not self.config.calibrate:
            raise RuntimeError("mag_ratios() needs a MagCache applied with calibrate=True")
        head = self.transformer.transformer_blocks[0]._diffusers_hook.get_hook(self.hook_names[0])
        ratios = list(head.state_manager.get_state().calibration_ratios)
        if len(ratios) != self.num_steps:
            raise RuntimeError(f"calibration recorded {len(ratios)} steps, expected {self.num_steps}")
        return ratios


# -- the public verbs ---------------------------------------------------------------------------------


def get_cache(transformer: nn.Module) -> Cache | None:
    return transformer.__dict__.get(CACHE_ATTR)


def apply_cache(
    transformer: nn.Module, config: Any, *, num_steps: int, compute_steps: Sequence[bool] | None = None
) -> Cache:
    """Attaches a cache to a DiT or PixArt transformer for runs of `num_steps` steps.

    Args:
        transformer: the model; its blocks get the hooks (one cache at a time).
        config: `ForaConfig`, `DeltaDiTConfig`, `InnerReuseConfig`, or diffusers'
            `FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, `MagCacheConfig`.
        num_steps: sampler steps of the runs the cache serves.
        compute_steps: steps on which nothing may be skipped (e.g. an ILF loop's step mask);
            this project's caches only.
    """
    transformer, _ = resolve(transformer)
    if get_cache(transformer) is not None:
        raise RuntimeError("a cache is already applied to this transformer; call remove_cache first")
    method, _ = describe(config)
    force = [False] * num_steps if compute_steps is None else [bool(f) for f in compute_steps]
    if len(force) != num_steps:
        raise ValueError(f"compute_steps has {len(force)} entries for {num_steps} steps")
    own = {ForaConfig: _Fora, DeltaDiTConfig: _DeltaDiT, InnerReuseConfig: _InnerReuse}
    cls = own.get(type(config), _DiffusersCache)
    if cls is _DiffusersCache and any(force):
        raise ValueError(f"{method}: compute_steps is supported by this project's caches only")
    cache = cls(transformer, config, num_steps, force)
    try:
        cache._attach()
    except Exception:
        cache.remove()
        raise
    transformer.__dict__[CACHE_ATTR] = cache
    logger.info("cache %s (%s) applied for %d steps", cache.method, cache.setting, num_steps)
    return cache


def remove_cache(transformer: nn.Module) -> Cache:
    """Removes the cache's hooks; the transformer then computes bit for bit what it did before."""
    cache = get_cache(transformer)
    if cache is None:
        raise RuntimeError("no cache is applied to this transformer")
    cache.remove()
    del transformer.__dict__[CACHE_ATTR]
    return cache


class BlockEvalCounter:
    """Counts block evaluations that actually run under `module` (backbone and feedback blocks).

    A block's attention and MLP sub-modules each count as an equal share of one evaluation; a share
    counts when the attention's output projection (not ``to_q``: the fused forward has one QKV matmul)
    or the MLP's first projection runs, so a reused or predicted output does not.
    """

    def __init__(self, module: nn.Module):
        from diffusers.models.attention import BasicTransformerBlock

        self._calls: dict[int, int] = {}  # sub-modules per block -> sub-module computations
        self._handles = []
        for block in module.modules():
            if not isinstance(block, BasicTransformerBlock):
                continue
            subs = [s for s in (block.attn1, block.attn2, block.ff) if s is not None]
            for sub in subs:
                out = getattr(sub, "to_out", None)
                first = next(m for m in sub.modules() if isinstance(m, nn.Linear))
                proj = out[0] if out is not None else first
                self._handles.append(proj.register_forward_pre_hook(self._adder(len(subs))))

    @property
    def count(self) -> float:
        return sum(calls / per_block for per_block, calls in self._calls.items())

    def _adder(self, per_block: int):
        self._calls.setdefault(per_block, 0)

        def hook(module: nn.Module, args: tuple) -> None:
            self._calls[per_block] += 1

        return hook

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
