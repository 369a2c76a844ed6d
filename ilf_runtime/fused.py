"""Fused forward of diffusers' `BasicTransformerBlock` for DiT (adaLN-Zero) and PixArt (adaLN-single).

`apply_fused_blocks(transformer)` registers a diffusers `ModelHook` on each block instance (and on
the ILF feedback block, if one is attached) whose ``new_forward`` computes what
`BasicTransformerBlock.forward` computes, through the `ilf_runtime.ops` kernels:

- norm1 + adaLN modulation as one `ops.ada_layernorm` (PixArt's ``scale_shift_table`` rows are
  passed as tables and added inside the kernel);
- self-attention as one matmul over the concatenated Q, K, V weights feeding
  `F.scaled_dot_product_attention` (PyTorch's flash / memory-efficient kernels on a GPU);
- each gated residual ``x + gate * y`` as one `ops.gated_residual`; inside an ILF loop the last one
  also adds the next loop block's feedback ``s * f`` in the same pass (`run_block`).

Cross-attention (PixArt) and the feed-forward stay diffusers' own modules. Nothing is patched on a
class; `remove_fused_blocks` removes the hooks, after which the model computes bit for bit what it
did before. The fused path serves inference: when autograd would record the block (grad enabled and
a parameter requires grad), or for arguments it does not cover, the block's own forward runs.
The concatenated QKV weights are a copy (3 D^2 values per block; 223 MB for DiT-XL/2 in bf16),
rebuilt when a projection's storage or version counter changes (``.to()``, in-place updates).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ilf_runtime import ops
from ilf_runtime.models import ModelAdapter, resolve, unwrap_transformer

logger = logging.getLogger(__name__)

__all__ = [
    "apply_fused_blocks",
    "cached_tensors",
    "fuse_block",
    "has_fused_blocks",
    "is_fused",
    "remove_fused_blocks",
    "run_block",
    "unsupported_reason",
]

HOOK = "ilf_fused_block"


def unsupported_reason(block: nn.Module, adapter: ModelAdapter) -> str | None:
    """Why `block` (of a model served by `adapter`) cannot take the fused forward, or None when it can."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import AttnProcessor2_0

    if not isinstance(block, BasicTransformerBlock):
        return f"expected a BasicTransformerBlock, got {type(block).__name__}"
    if block.norm_type != adapter.norm_type:
        return (
            f"norm_type {block.norm_type!r} (a {adapter.transformer_class} block has {adapter.norm_type!r})"
        )
    if block.pos_embed is not None or block.only_cross_attention or block.double_self_attention:
        return "positional embeddings, only_cross_attention and double_self_attention are not covered"
    if hasattr(block, "fuser"):
        return "gated (GLIGEN) attention is not covered"
    norms = [block.norm1.norm if block.norm_type == "ada_norm_zero" else block.norm1]
    norms.append(block.norm3 if block.norm_type == "ada_norm_zero" else block.norm2)
    if any(n.weight is not None or n.bias is not None for n in norms):
        return "layer norms with affine parameters are not covered"
    a = block.attn1
    if not isinstance(a.processor, AttnProcessor2_0):
        return f"attn1 uses {type(a.processor).__name__}; the fused path reproduces AttnProcessor2_0"
    if a.is_cross_attention or a.norm_q is not None or a.norm_k is not None or a.spatial_norm is not None:
        return "attn1 with cross-attention, q/k norms or a spatial norm is not covered"
    if a.group_norm is not None or a.residual_connection or a.rescale_output_factor != 1.0:
        return "attn1 with a group norm, residual connection or output rescaling is not covered"
    if not math.isclose(a.scale, (a.inner_dim // a.heads) ** -0.5):
        return f"attn1 scale {a.scale} is not 1/sqrt(head_dim), which SDPA uses"
    return None


@functools.cache
def _hook_class() -> type:
    """The diffusers `ModelHook` subclass behind a fused block (diffusers is imported lazily)."""
    from diffusers.hooks import ModelHook

    class FusedBlockHook(ModelHook):
        def __init__(self, adapter: ModelAdapter) -> None:
            super().__init__()
            self.adapter = adapter  # owns the block's adaLN modulation
            self.inject: tuple[torch.Tensor, torch.Tensor] | None = None  # set by run_block, one call
            self._qkv_key: tuple | None = None
            self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None

        def qkv(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            lins = (attn.to_q, attn.to_k, attn.to_v)
            params = [p for lin in lins for p in (lin.weight, lin.bias) if p is not None]
            key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
            if key != self._qkv_key:
                w = torch.cat([lin.weight for lin in lins]).detach()  # (3 * H * Dh, D)
                has_bias = all(lin.bias is not None for lin in lins)
                b = torch.cat([lin.bias for lin in lins]).detach() if has_bias else None  # (3 * H * Dh,)
                self._qkv, self._qkv_key = (w, b), key
            return self._qkv

        def new_forward(
            self,
            block: nn.Module,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            timestep: torch.Tensor | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            class_labels: torch.Tensor | None = None,
            added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        ) -> torch.Tensor:
            inject, self.inject = self.inject, None
            records = torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())
            if records or cross_attention_kwargs or block._chunk_size is not None:
                out = self.fn_ref.original_forward(
                    hidden_states,
                    attention_mask=attention_mask,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                    class_labels=class_labels,
                    added_cond_kwargs=added_cond_kwargs,
                )
                return out if inject is None else ops.feedback_inject(out, *inject)
            return _fused_forward(
                self, block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                timestep, class_labels, inject,
            )  # fmt: skip

    return FusedBlockHook


def _self_attention(hook: Any, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """AttnProcessor2_0's self-attention with one QKV matmul; with a mask, diffusers' own path."""
    if mask is not None:
        return attn(x, attention_mask=mask)
    b, t, _ = x.shape
    w, bias = hook.qkv(attn)
    qkv = F.linear(x, w, bias)  # (B, T, 3 * H * Dh)
    q, k, v = qkv.view(b, t, 3, attn.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, H, T, Dh)
    o = o.transpose(1, 2).reshape(b, t, -1)  # (B, T, H * Dh)
    return attn.to_out[1](attn.to_out[0](o))  # (B, T, D)


def _fused_forward(
    hook: Any,
    block: nn.Module,
    h: torch.Tensor,
    attention_mask: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor | None,
    encoder_attention_mask: torch.Tensor | None,
    timestep: torch.Tensor | None,
    class_labels: torch.Tensor | None,
    inject: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """`BasicTransformerBlock.forward` for ada_norm_zero / ada_norm_single, fused; h: (B, T, D)."""
    mod, table, eps1, eps2 = hook.adapter.modulation(block, h, timestep, class_labels)  # 6 x (B, D), 6 x (D,)
    # chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    n = ops.ada_layernorm(h, mod[0], mod[1], eps1, table[0], table[1])  # (B, T, D)
    a = _self_attention(hook, block.attn1, n, attention_mask)  # (B, T, D)
    h = ops.gated_residual(h, mod[2], a, table[2])  # (B, T, D)
    if block.attn2 is not None:  # PixArt's cross-attention: no norm before it, no gate
        a = block.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
        h = a + h
    n = ops.ada_layernorm(h, mod[3], mod[4], eps2, table[3], table[4])  # (B, T, D)
    y = block.ff(n)  # (B, T, D)
    f, s = inject if inject is not None else (None, None)
    return ops.gated_residual(h, mod[5], y, table[5], f, s)  # (B, T, D)


def _hook(block: nn.Module) -> Any:
    reg = getattr(block, "_diffusers_hook", None)
    return None if reg is None else reg.get_hook(HOOK)


def _fusable_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The backbone's blocks, then any other block under the transformer (an ILF feedback block)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = list(transformer.transformer_blocks)
    seen = {id(b) for b in blocks}
    return blocks + [
        m for m in transformer.modules() if isinstance(m, BasicTransformerBlock) and id(m) not in seen
    ]


def fuse_block(block: nn.Module, adapter: ModelAdapter) -> None:
    """Registers the fused forward on one block; raises ValueError when the block is not covered."""
    from diffusers.hooks import HookRegistry

    reason = unsupported_reason(block, adapter)
    if reason is not None:
        raise ValueError(f"cannot fuse this block: {reason}")
    if _hook(block) is None:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_hook_class()(adapter), HOOK)


def apply_fused_blocks(model: Any) -> int:
    """Runs every block of a supported transformer (and its ILF feedback block) fused.

    Args:
        model: a supported transformer (`models.ADAPTERS`), a pipeline holding one, or a `registry.Model`.

    Returns:
        The number of blocks fused. An ILF loop applied later gets its feedback block fused too.
    """
    transformer, adapter = resolve(model)
    blocks = _fusable_blocks(transformer)
    for i, block in enumerate(blocks):
        reason = unsupported_reason(block, adapter)
        if reason is not None:
            raise ValueError(f"cannot fuse block {i} of {type(transformer).__name__}: {reason}")
    for block in blocks:
        fuse_block(block, adapter)
    logger.info("fused %d blocks of %s", len(blocks), type(transformer).__name__)
    return len(blocks)


def remove_fused_blocks(model: Any) -> int:
    """Removes the fused forward from every block; returns how many blocks had it."""
    n = 0
    for block in _fusable_blocks(unwrap_transformer(model)):
        if _hook(block) is not None:
            block._diffusers_hook.remove_hook(HOOK, recurse=False)
            n += 1
    return n


def is_fused(block: nn.Module) -> bool:
    """Whether this block runs the fused forward."""
    return _hook(block) is not None


def has_fused_blocks(model: Any) -> bool:
    """Whether the transformer's blocks run the fused forward."""
    blocks = unwrap_transformer(model).transformer_blocks
    return len(blocks) > 0 and is_fused(blocks[0])


def cached_tensors(model: Any) -> list[torch.Tensor]:
    """The concatenated QKV weights the fused blocks hold (what a captured graph reads besides the
    parameters)."""
    hooks = [_hook(b) for b in _fusable_blocks(unwrap_transformer(model))]
    return [t for h in hooks if h is not None and h._qkv is not None for t in h._qkv if t is not None]


def run_block(
    block: nn.Module,
    h: torch.Tensor,
    kwargs: dict[str, Any],
    inject: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``block(h, **kwargs)``, then ``+ s * f`` for ``inject = (f, s)``: fused into the block's last
    epilogue when the block is fused, else one `ops.feedback_inject` after it."""
    hook = _hook(block)
    if hook is None:
        out = block(h, **kwargs)
        return out if inject is None else ops.feedback_inject(out, *inject)
    hook.inject = inject
    try:
        return block(h, **kwargs)
    finally:
        hook.inject = None
