"""The whole denoising loop as one CUDA graph, captured once per shape key (internal).

`sampling.denoise(..., cuda_graph=True)` hands its step loop to `run_loop`, which keeps one
`LoopGraph` per key in a small per-transformer cache (`graph_cache`):

- static input buffers (the initial noise and every conditioning tensor) are allocated once per key;
  each call copies its inputs into them;
- on a new key the loop runs once eagerly on a side stream (warm-up: cuBLAS / SDPA workspaces, the
  fused blocks' QKV weights), then is captured with `torch.cuda.graph`; every call replays it and
  returns a clone of the static output, so a later replay cannot overwrite what a caller holds;
- the key holds everything the captured kernels depend on: the latents' shape (batch, resolution),
  dtype and device, the solver's schedule (name, timesteps, config, coefficient dtype), the loop mask,
  guidance, the conditioning tensors' shapes and dtypes, and the address and version counter of every
  parameter and buffer of the transformer (its ILF loop included). A `.to()`, an in-place weight
  update or a new ILF loop therefore re-captures instead of replaying stale addresses.

The same `LoopGraph` runs without capture (``capture=False``): then it is the eager loop on the static
buffers, which is how the code path up to the capture is tested on the CPU.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from ilf_runtime import fused

logger = logging.getLogger(__name__)

__all__ = ["LoopGraph", "LoopGraphCache", "clear_graphs", "graph_cache", "loop_key", "run_loop"]

# kwargs -> latents; the step loop of sampling.denoise with everything else bound
LoopFn = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]


def _tree_sig(obj: Any) -> Hashable:
    """Shapes, dtypes and devices of the tensors in a nested dict / list; other leaves by value."""
    if torch.is_tensor(obj):
        return ("T", tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return ("D", tuple((k, _tree_sig(v)) for k, v in sorted(obj.items())))
    if isinstance(obj, (list, tuple)):
        return ("L", tuple(_tree_sig(v) for v in obj))
    return ("V", obj)


def _tree_clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _tree_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_clone(v) for v in obj)
    return obj


def _tree_copy_(dst: Any, src: Any) -> None:
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k, v in dst.items():
            _tree_copy_(v, src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src, strict=True):
            _tree_copy_(d, s)


def _weights_sig(transformer: nn.Module) -> Hashable:
    """Address and version counter of every parameter and buffer (the ILF loop's included)."""
    ts = [*transformer.parameters(), *transformer.buffers()]
    return tuple((t.data_ptr(), t._version) for t in ts)


def loop_key(
    transformer: nn.Module,
    noise: torch.Tensor,
    kwargs: dict[str, Any],
    solver: Any,
    static: Hashable,
) -> Hashable:
    """The shape key of one loop; `static` holds the Python values the loop branches on (loop mask,
    guidance, model kind)."""
    schedule = json.dumps(solver.describe(), sort_keys=True)
    return (
        tuple(noise.shape),
        noise.dtype,
        noise.device,
        schedule,
        solver.dtype,
        static,
        _tree_sig(kwargs),
        _weights_sig(transformer),
    )


class LoopGraph:
    """One denoising loop with static input buffers, captured as a CUDA graph or run eagerly.

    Args:
        fn: the loop, ``fn(noise, kwargs) -> latents``, reading nothing else that changes per call.
        noise, kwargs: example inputs; their shapes and dtypes become the static buffers'.
        capture: capture a CUDA graph (the inputs must be on a CUDA device); else run eagerly.
    """

    def __init__(self, fn: LoopFn, noise: torch.Tensor, kwargs: dict[str, Any], *, capture: bool):
        if capture and noise.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs CUDA tensors; the latents are on {noise.device}")
        self.fn = fn
        self.keep: list[Any] = []  # what the captured kernels read, kept alive (see run_loop)
        self.noise = noise.clone()  # static input buffers
        self.kwargs = _tree_clone(kwargs)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.replays = 0
        if capture:
            self._capture()

    def _capture(self) -> None:
        dev = self.noise.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy inits, workspaces
            self.fn(self.noise, self.kwargs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.fn(self.noise, self.kwargs)  # (B, C, H, W), static output buffer
        self.graph = graph

    def __call__(self, noise: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Runs the loop on copies of the inputs; returns a tensor the caller owns."""
        if noise.shape != self.noise.shape or _tree_sig(kwargs) != _tree_sig(self.kwargs):
            raise ValueError("inputs differ in shape or dtype from the ones this loop was built for")
        self.noise.copy_(noise)
        _tree_copy_(self.kwargs, kwargs)
        if self.graph is None:
            return self.fn(self.noise, self.kwargs).clone()
        self.graph.replay()
        self.replays += 1
        return self.out.clone()


class LoopGraphCache:
    """The `LoopGraph`s of one transformer, by key, least recently used dropped beyond `max_entries`
    (each captured graph keeps a private memory pool of the loop's activations)."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, LoopGraph] = OrderedDict()
        self.builds = 0  # graphs built (captured, or static runners without capture)

    def get(self, key: Hashable, build: Callable[[], LoopGraph]) -> LoopGraph:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        entry = build()
        self.builds += 1
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self.entries.clear()


_CACHES: weakref.WeakKeyDictionary[nn.Module, LoopGraphCache] = weakref.WeakKeyDictionary()


def graph_cache(transformer: nn.Module) -> LoopGraphCache:
    """The loop-graph cache of this transformer (created on first use, dropped with the model)."""
    cache = _CACHES.get(transformer)
    if cache is None:
        cache = _CACHES[transformer] = LoopGraphCache()
    return cache


def clear_graphs(transformer: nn.Module) -> None:
    """Drops the captured graphs of this transformer (and their memory pools)."""
    _CACHES.pop(transformer, None)


@torch.no_grad()
def run_loop(
    transformer: nn.Module,
    fn: LoopFn,
    noise: torch.Tensor,
    kwargs: dict[str, Any],
    solver: Any,
    static: Hashable,
    *,
    capture: bool = True,
) -> torch.Tensor:
    """Runs ``fn(noise, kwargs)`` through the cached `LoopGraph` of its key, building it if new."""
    key = loop_key(transformer, noise, kwargs, solver, (static, capture))
    cache = graph_cache(transformer)

    def build() -> LoopGraph:
        logger.info("building the loop graph for %s (%d cached)", tuple(noise.shape), len(cache.entries))
        entry = LoopGraph(fn, noise, kwargs, capture=capture)
        # Keep every tensor the captured kernels read alive with the graph, so that an address in a
        # key can only ever name the tensor the graph was captured with.
        entry.keep = [
            solver,
            *transformer.parameters(),
            *transformer.buffers(),
            *fused.cached_tensors(transformer),
        ]
        return entry

    return cache.get(key, build)(noise, kwargs)
