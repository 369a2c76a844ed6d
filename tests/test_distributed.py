"""torchrun helpers (distributed.py): single-process behaviour, sharding, and the collectives in two real
gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ilf_runtime.distributed import (
    DistInfo,
    all_gather_cat,
    all_reduce_mean,
    barrier,
    init_distributed,
    shard,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 13])
def test_shards_partition_the_range_in_rank_order(n, world):
    parts = [shard(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))  # every index once, contiguous, in rank order
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_single_process_without_launcher(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and not info.enabled and info.is_main and info.device == torch.device("cpu")
    assert not dist.is_initialized()
    t = torch.arange(3.0)
    assert all_gather_cat(t, info) is t  # no-ops in one process
    all_reduce_mean([t], info)
    assert torch.equal(t, torch.arange(3.0))
    barrier(info)
    assert DistInfo(rank=1, world_size=2).enabled and not DistInfo(rank=1, world_size=2).is_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_named_error(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(
        RuntimeError, match="device 'cuda' requested but torch.cuda.is_available\\(\\) is False"
    ):
        init_distributed("cuda")
    assert init_distributed(None).device == torch.device("cpu")  # None: CUDA only when available


WORKER = """
import json, sys, torch
from ilf_runtime.distributed import all_gather_cat, all_reduce_mean, barrier, init_distributed, shard
info = init_distributed("cpu")
r = info.rank
grads = [torch.tensor([1.0, 2.0]) * (r + 1), torch.tensor(10.0 * r)]
all_reduce_mean(grads, info)
mine = shard(5, info)
rows = torch.stack([torch.full((2,), float(i)) for i in mine]) if len(mine) else torch.empty(0, 2)
gathered = all_gather_cat(rows, info)
barrier(info)
json.dump({"rank": r, "world": info.world_size, "backend": info.backend, "enabled": info.enabled,
           "grads": [g.tolist() for g in grads], "shard": list(mine), "gathered": gathered.tolist()},
          open(sys.argv[1] + f"/rank{r}.json", "w"))
torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed gloo missing"
)
def test_collectives_in_two_gloo_processes(tmp_path):
    """Two processes started with the variables torchrun sets: gradients averaged, unequal shards
    gathered in rank order, on every rank."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(res):
        assert got["rank"] == r and got["world"] == 2 and got["backend"] == "gloo" and got["enabled"]
        assert got["grads"] == [[1.5, 3.0], 5.0]  # means of (1, 2) and (2, 4); of 0 and 10
        assert got["gathered"] == [[float(i)] * 2 for i in range(5)]  # 3 rows from rank 0, 2 from rank 1
    assert res[0]["shard"] == [0, 1, 2] and res[1]["shard"] == [3, 4]
