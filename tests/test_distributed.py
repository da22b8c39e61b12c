"""Memory-parallel value pools (knowedit.distributed) on CPU processes with gloo.

Every multi-process test spawns its ranks with torch.multiprocessing (start method
``spawn``); a rank that fails raises in the parent with its traceback.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knowedit.config import MemoryConfig
from knowedit.distributed import ShardedBatches, ShardSpec, sharded_values
from knowedit.memory import ProductKeyMemory, ValuePool

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _spawn(fn, world: int, *args) -> None:  # noqa: ANN001
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=True, start_method="spawn")


# --------------------------------------------------------------------------- the layer


def _layer(seed: int, d: int = 32, spec: ShardSpec | None = None) -> ProductKeyMemory:
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, key_dim=16)
    torch.manual_seed(seed)
    with sharded_values(spec):
        pool = ValuePool(64, d, name="pool")
        return ProductKeyMemory(d, cfg, pool, layer=0)


def _layer_worker(rank: int, world: int, port: int) -> None:
    _init(rank, world, port)
    ref = _layer(0)
    layer = _layer(0, spec=ShardSpec(rank, world))
    lo, hi = layer.pool.shard.columns(32)
    assert layer.pool.values.shape == (64, 32 // world)
    assert torch.equal(layer.pool.values.detach(), ref.pool.values.detach()[:, lo:hi])  # same init, no whole table
    assert torch.equal(layer.query.weight, ref.query.weight)  # the generator continued as in one process
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 32, generator=g)  # 5 sequences: ranks hold different numbers of them
    gy = torch.randn(5, 3, 32, generator=g)
    y_ref = ref(x)
    (y_ref * gy).sum().backward()
    mine = slice(rank, None, world)
    y = layer(x[mine])
    (y * gy[mine]).sum().backward()
    torch.testing.assert_close(y, y_ref[mine], atol=1e-5, rtol=1e-5)
    grad = layer.pool.values.grad
    assert grad.is_sparse  # the value gradient stays sparse per shard
    torch.testing.assert_close(grad.to_dense(), ref.pool.values.grad.to_dense()[:, lo:hi], atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        if name == "pool.values":
            continue
        total = p.grad.clone()
        dist.all_reduce(total)  # each rank's loss is its tokens' share: the gradients sum
        torch.testing.assert_close(total, q.grad, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # the eval path: no autograd graph, same rows
        torch.testing.assert_close(layer(x[mine]), y_ref[mine].detach(), atol=1e-5, rtol=1e-5)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layer_matches_one_process(world: int) -> None:
    _spawn(_layer_worker, world)


def test_shard_needs_divisible_width() -> None:
    from knowedit.distributed import DistributedError

    with pytest.raises(DistributedError, match="not divisible by the 3 ranks"):
        _layer(0, d=32, spec=ShardSpec(0, 3))


def test_sharded_batches_union_is_the_global_batch() -> None:
    from knowedit.recipes.train import EpochShuffle

    sampler = EpochShuffle(23, seed=3)
    order = list(sampler)
    parts = [list(ShardedBatches(sampler, 8, r, 4)) for r in range(4)]
    assert all(len(p) == len(ShardedBatches(sampler, 8, r, 4)) == 3 for r, p in enumerate(parts))
    for step in range(3):
        got = sorted(i for p in parts for i in p[step])
        assert got == sorted(order[8 * step : 8 * step + 8])
    # a last global batch smaller than the ranks is dropped everywhere
    assert len(ShardedBatches(EpochShuffle(18, seed=0), 8, 0, 4)) == 2
