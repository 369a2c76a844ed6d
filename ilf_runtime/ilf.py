"""Attach an inner feedback loop to a diffusers DiT or PixArt transformer, and take it off again.

Nothing is patched on a class. `apply_ilf` registers one submodule on the transformer instance
(`transformer.ilf_loop`, a `FeedbackLoop` holding the feedback block and the scales) and three
forward hooks on that instance and its blocks:

- a pre-hook on the transformer records the raw timestep (PixArt's blocks only see it embedded);
- a pre-hook on the first loop block records that block's input ``h_a`` and its keyword arguments;
- a hook on the last loop block replaces its output by the looped result (section 2 of the method
  notes), when `FeedbackLoop.active` is set.

`remove_ilf` removes the hooks and the submodule; the backbone's parameters are never touched,
so the model then computes bit for bit what it computed before.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from torch import nn

from ilf_runtime import fused, ops
from ilf_runtime.config import ILFConfig
from ilf_runtime.models import LOOP_ATTR, ModelAdapter, resolve, unwrap_transformer
from ilf_runtime.weights import ILFWeights, load_ilf_weights

logger = logging.getLogger(__name__)

__all__ = ["FeedbackLoop", "apply_ilf", "build_feedback_block", "get_ilf", "remove_ilf"]


def build_feedback_block(transformer: nn.Module, adapter: ModelAdapter, config: ILFConfig) -> nn.Module:
    """A new block of the backbone's own class and arguments, initialised per `config`."""
    blocks = transformer.transformer_blocks
    cls = type(blocks[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        block = cls(**adapter.block_kwargs(transformer))
    k = config.copy_block
    if k is not None:
        block.load_state_dict(blocks[k].state_dict())
    ref = next(blocks[0].parameters())
    return block.to(device=ref.device, dtype=ref.dtype)


@dataclass
class _StepState:
    """What the hooks carry from the first loop block to the last, within one forward."""

    h_a: torch.Tensor | None = None
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    timestep: torch.Tensor | None = None
    added_cond_kwargs: dict[str, Any] | None = None


class FeedbackLoop(nn.Module):
    """The feedback block and the loop scales, attached to one transformer by `apply_ilf`.

    ``active`` is a plain Python flag read at every forward: the sampler sets it per step from a
    fixed schedule, so switching the loop on and off rebuilds nothing and stays graph-capturable.
    """

    def __init__(self, config: ILFConfig, feedback: nn.Module, dim: int):
        super().__init__()
        self.config = config
        self.feedback = feedback
        n = config.num_loop_blocks
        shape = (n,) if config.scale_shape == "block" else (n, dim)
        ref = next(feedback.parameters())
        self.scales = nn.Parameter(torch.zeros(shape, device=ref.device, dtype=ref.dtype))
        self.active = True
        self.stepping = False  # True while this project's sampler or trainer sets `active` per step
        self._adapter: ModelAdapter | None = None
        self._owner: weakref.ref | None = None
        self._handles: list[Any] = []
        self._state = _StepState()
        self._running = False

    # -- wiring -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the loop's second pass runs (blocks called from inside it re-fire their hooks)."""
        return self._running

    def _attach(self, transformer: nn.Module, adapter: ModelAdapter) -> None:
        self._adapter = adapter
        self._owner = weakref.ref(transformer)
        blocks = transformer.transformer_blocks
        a, b = self.config.loop_start, self.config.loop_end
        self._sig_model = inspect.signature(type(transformer).forward)
        self._sig_block = inspect.signature(type(blocks[a]).forward)
        self._handles = [
            transformer.register_forward_pre_hook(self._on_model_start, with_kwargs=True),
            transformer.register_forward_hook(self._on_model_end, always_call=True),
            blocks[a].register_forward_pre_hook(self._on_loop_start, with_kwargs=True),
            blocks[b].register_forward_hook(self._on_loop_end, with_kwargs=True),
        ]

    def adopt_hook(self, handle: Any) -> None:
        """Removes `handle` (a hook that belongs with this loop, e.g. a stock pipeline's step
        schedule) together with the loop's own hooks."""
        self._handles.append(handle)

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._owner = None
        self._state = _StepState()

    @property
    def transformer(self) -> nn.Module:
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            raise RuntimeError("this FeedbackLoop is not attached to a transformer (see apply_ilf)")
        return owner

    def loop_blocks(self) -> list[nn.Module]:
        blocks = self.transformer.transformer_blocks
        return [blocks[j] for j in range(self.config.loop_start, self.config.loop_end + 1)]

    # -- hooks ------------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
            raise RuntimeError("ILF does not support gradient checkpointing of the backbone; disable it")
        bound = self._sig_model.bind(module, *args, **kwargs).arguments
        self._state = _StepState(
            timestep=bound.get("timestep"), added_cond_kwargs=bound.get("added_cond_kwargs")
        )

    def _on_model_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._state = _StepState()  # drop h_a and friends: no activation outlives the forward

    def _on_loop_start(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._running:
            return
        bound = dict(self._sig_block.bind(block, *args, **kwargs).arguments)
        bound.pop("self")
        self._state.h_a = bound.pop("hidden_states")
        self._state.block_kwargs = bound

    def _on_loop_end(
        self, block: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        if self._running or not self.active:
            return None
        if self._state.h_a is None:
            raise RuntimeError("ILF loop end reached without its start: was the transformer called normally?")
        self._running = True
        try:
            return self.run_loop(output)
        finally:
            self._running = False

    # -- the loop ---------------------------------------------------------------------------------
    def _feedback_kwargs(self) -> dict[str, Any]:
        st = self._state
        inputs = {"timestep": st.timestep, "added_cond_kwargs": st.added_cond_kwargs}
        return self._adapter.feedback_kwargs(
            self.transformer, st.block_kwargs, inputs, self.config.feedback_t_shift, st.h_a
        )

    def run_loop(self, h: torch.Tensor) -> torch.Tensor:
        """Runs the loop `loop_iters` times from the last loop block's first-pass output `h`."""
        st = self._state
        kw, kw_f = st.block_kwargs, self._feedback_kwargs()
        blocks = self.loop_blocks()
        for _ in range(self.config.loop_iters):
            f = self.feedback(h, **kw_f)  # (B, T, D)
            h = ops.feedback_inject(st.h_a, f, self.scales[0])
            for i, block in enumerate(blocks):
                # the next block's injection h + s[i + 1] * f, fused into this block's epilogue if it can
                nxt = (f, self.scales[i + 1]) if i + 1 < len(blocks) else None
                h = fused.run_block(block, h, kw, nxt)
        return h

    def extra_repr(self) -> str:
        c = self.config
        return f"loop={c.loop_start}..{c.loop_end}, iters={c.loop_iters}, steps={c.loop_steps!r}, scales={c.scale_shape}"


def get_ilf(model: Any) -> FeedbackLoop | None:
    """The `FeedbackLoop` attached to a transformer (or a pipeline's transformer), or None."""
    loop = getattr(unwrap_transformer(model), LOOP_ATTR, None)
    return loop if isinstance(loop, FeedbackLoop) else None


def apply_ilf(
    model: Any, config_or_weights: ILFConfig | str | PathLike, *, check_backbone: bool = True
) -> FeedbackLoop:
    """Attaches an inner feedback loop to a DiT or PixArt transformer (or a pipeline's transformer).

    Args:
        model: a supported transformer (`models.ADAPTERS`), a pipeline holding one, or a `registry.Model`.
        config_or_weights: an `ILFConfig` (fresh feedback block, scales at zero) or the path of a
            feedback weights file written by `save_ilf_weights`.
        check_backbone: refuse weights whose backbone fingerprint differs from this backbone's.

    Returns:
        The attached `FeedbackLoop`, also reachable as ``transformer.ilf_loop``.
    """
    transformer, adapter = resolve(model)
    if hasattr(transformer, LOOP_ATTR):
        raise RuntimeError("ILF is already applied to this transformer; call remove_ilf first")
    weights = None
    if isinstance(config_or_weights, ILFConfig):
        config = config_or_weights
    elif isinstance(config_or_weights, (str, PathLike, ILFWeights)):
        weights = (
            config_or_weights
            if isinstance(config_or_weights, ILFWeights)
            else load_ilf_weights(config_or_weights)
        )
        weights.check_backbone(transformer, strict=check_backbone)
        config = weights.config
    else:
        raise TypeError(
            f"expected an ILFConfig or a weights file path, got {type(config_or_weights).__name__}"
        )
    config.check_backbone(len(transformer.transformer_blocks))

    loop = FeedbackLoop(config, build_feedback_block(transformer, adapter, config), transformer.inner_dim)
    if weights is not None:
        weights.load_into(loop)
    loop.train(transformer.training)
    if fused.has_fused_blocks(transformer):  # the feedback block runs like the backbone's blocks
        fused.fuse_block(loop.feedback, adapter)
    transformer.add_module(LOOP_ATTR, loop)
    loop._attach(transformer, adapter)
    logger.info("ILF applied to %s (%s): %s", type(transformer).__name__, adapter.name, loop.extra_repr())
    return loop


def remove_ilf(model: Any) -> FeedbackLoop:
    """Detaches the loop from the transformer and returns it; the backbone is as before."""
    transformer = unwrap_transformer(model)
    loop = get_ilf(transformer)
    if loop is None:
        raise RuntimeError(f"no ILF loop is applied to this {type(transformer).__name__}")
    loop._detach()
    delattr(transformer, LOOP_ATTR)
    return loop
