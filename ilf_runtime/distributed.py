"""torch.distributed plumbing shared by the trainer and the sharded evaluation.

Processes are started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``); nothing here spawns processes. Without
those variables everything runs as a single process and the collectives are no-ops.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "all_gather_cat",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "init_distributed",
    "shard",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, the device it should use, the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Joins the process group set up by torchrun (gloo on CPU, nccl on CUDA), or returns a
    single-process `DistInfo` when the launcher's environment variables are absent.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available, each rank on its local GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if world == 1:
        return DistInfo(device=dev)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        # a gloo group left alive at interpreter exit can abort the process ("terminate called
        # without an active exception") after the work is done; the group we made, we tear down
        atexit.register(_destroy_group)
    logger.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, info: DistInfo) -> range:
    """This rank's contiguous share of ``range(n)``; shares differ in size by at most one."""
    base, extra = divmod(n, info.world_size)
    lo = info.rank * base + min(info.rank, extra)
    return range(lo, lo + base + (1 if info.rank < extra else 0))


def all_reduce_mean(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Averages each tensor in place over the ranks (gradients, scalar losses)."""
    if not info.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenates every rank's `t` along dim 0, in rank order; shapes may differ in dim 0."""
    if not info.enabled:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    counts = [int(s) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def all_gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's picklable `obj`, in rank order (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
