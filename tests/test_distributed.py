"""Memory-parallel value pools (knowedit.distributed) on CPU processes with gloo.

Every multi-process test spawns its ranks with torch.multiprocessing (start method
``spawn``); a rank that fails raises in the parent with its traceback.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knowedit.config import MemoryConfig
from knowedit.distributed import ShardedBatches, ShardSpec, consolidated_state_dict, sharded_values
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
    whole = consolidated_state_dict(layer, rows_per_chunk=24)  # 64 rows: three gathers, the last short
    if rank == 0:
        assert whole.keys() == ref.state_dict().keys()
        assert torch.equal(whole["pool.values"], ref.pool.values.detach())
    else:
        assert whole is None
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layer_matches_one_process(world: int) -> None:
    _spawn(_layer_worker, world)


def test_shard_needs_divisible_width() -> None:
    from knowedit.distributed import DistributedError

    with pytest.raises(DistributedError, match="not divisible by the 3 ranks"):
        _layer(0, d=32, spec=ShardSpec(0, 3))


def test_sharded_batches_are_the_global_batches() -> None:
    from knowedit.distributed import rank_share
    from knowedit.recipes.train import EpochShuffle

    sampler = EpochShuffle(23, seed=3)
    order = list(sampler)
    batches = list(ShardedBatches(sampler, 8, 4))
    assert len(batches) == len(ShardedBatches(sampler, 8, 4)) == 3
    assert batches == [order[0:8], order[8:16], order[16:23]]
    rows = torch.arange(7)
    assert sorted(torch.cat([rank_share(rows, r, 4) for r in range(4)]).tolist()) == rows.tolist()
    # a last global batch smaller than the ranks is dropped everywhere
    assert len(ShardedBatches(EpochShuffle(18, seed=0), 8, 4)) == len(list(ShardedBatches(EpochShuffle(18, 0), 8, 4))) == 2


# --------------------------------------------------------------------------- the recipe

#: 20 training steps (batches) of the debug recipe (120 examples, global batch 32: 4 steps an epoch).
TRAIN_OVERRIDES = [
    "max_steps=40",  # two optimizer steps (dense, values) a batch: 20 batches
    "max_epochs=100",
    "accelerator=cpu",
    "logger=csv",
    "checkpoint_every_n_epochs=0",
    "trainer.log_every_n_steps=1",
    "optim.warmup_steps=5",
]
PROBE_PROMPTS = 12


def _debug_cfg(out: Path, extra: list[str]):  # noqa: ANN202
    from knowedit.config import load_train_config

    cfg = load_train_config(str(CONFIG_DIR / "debug.yaml"), TRAIN_OVERRIDES + extra)
    cfg.out = str(out)
    return cfg


def _train_worker(rank: int, world: int, port: int, out: str, extra: list[str]) -> None:
    """One rank of ``knowedit train debug trainer.devices=world``, launched as torchrun would
    (LOCAL_RANK set: Lightning starts no processes of its own). Before the shards are
    consolidated, the sharded model's answers and logits are written to ``out/sharded.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import knowedit.recipes.train as recipe
    from knowedit.inference import greedy

    consolidate = recipe._consolidate

    def probe_then_consolidate(cfg, sharded):  # noqa: ANN001, ANN202
        sharded.eval()
        prompts, ids, codec = _probe(cfg)
        with torch.no_grad():
            answers = greedy(sharded, codec, prompts)  # every rank runs the same prompts together
            logits = sharded(ids)
        if rank == 0:
            shards = [p.values.shape for p in sharded.pools.values()]
            Path(cfg.out, "sharded.json").write_text(json.dumps({
                "answers": answers, "logits": logits.tolist(), "shard_shapes": [list(s) for s in shards],
            }))  # fmt: skip
        return consolidate(cfg, sharded)

    recipe._consolidate = probe_then_consolidate
    recipe.train(_debug_cfg(Path(out), [f"trainer.devices={world}", *extra]), progress=False)


def _probe(cfg):  # noqa: ANN001, ANN202
    """The first prompts of the world, a (B, T) batch of their token ids, and the tokenizer."""
    from knowedit.data import make_world
    from knowedit.recipes.train import FactDataModule

    dm = FactDataModule(cfg)
    prompts = [e.prompt for e in make_world(cfg.data.world).train_examples()[:PROBE_PROMPTS]]
    rows = [dm.codec.encode_prompt(p) for p in prompts]
    width = min(len(r) for r in rows)
    return prompts, torch.tensor([r[:width] for r in rows]), dm.codec


def _losses(out: Path) -> list[float]:
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        return [float(r["train_loss_step"]) for r in csv.DictReader(f) if r.get("train_loss_step")]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knowedit.recipes.train import train

    out = tmp_path_factory.mktemp("one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(_debug_cfg(out, []), progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_training_matches_one_process(world: int, one_process_run: Path, tmp_path: Path) -> None:
    from knowedit.checkpoint import load_checkpoint
    from knowedit.editor import Editor

    _spawn(_train_worker, world, str(tmp_path), [])
    ref, got = _losses(one_process_run), _losses(tmp_path)
    assert len(ref) == len(got) == 20
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)
    assert ref[-1] < ref[0] - 0.5  # it did learn something
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    d = load_checkpoint(tmp_path).cfg.d_model
    assert sharded["shard_shapes"] == [[16**2, d // world]] * 2  # each rank held 1/world of every table
    # The consolidated checkpoint is an ordinary one: one process loads it and answers as the sharded model did.
    whole = load_checkpoint(tmp_path).model
    cfg = _debug_cfg(tmp_path, [])
    prompts, ids, _ = _probe(cfg)
    with torch.no_grad():
        torch.testing.assert_close(whole(ids), torch.tensor(sharded["logits"]), atol=1e-5, rtol=1e-5)
    editor = Editor.open(tmp_path, read_only=True)
    assert [editor.ask(p) for p in prompts] == sharded["answers"]
    # and it is the single-process run's model
    ref_model = load_checkpoint(one_process_run).model
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), whole.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    report = json.loads((tmp_path / "train_report.json").read_text())
    assert report["world_size"] == world and report["steps"] == 40


# --------------------------------------------------------------------------- memory


def _bench():  # noqa: ANN202
    import importlib
    import sys

    if str(REPO) not in sys.path:
        # spawned ranks import bench.distributed by name; appended, not prepended, so that the
        # checkout's top-level `kernels/` never shadows an installed package of that name
        sys.path.append(str(REPO))
    return importlib.import_module("bench.distributed")


@pytest.mark.slow
def test_table_too_big_for_one_capped_process_trains_on_four() -> None:
    """2^18 slots x 64 fp32 (64 MiB) + SparseAdam state (128 MiB) under a 150 MiB address-space
    cap per process: one process runs out of memory, four train, each holding a quarter."""
    import argparse

    bench = _bench()
    args = argparse.Namespace(
        n_keys=512, d=64, heads=2, topk=8, batch=8, seq=16, vocab=128, steps=1, warmup=0, mem_cap_mb=150
    )
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    (one,) = bench.run_world(1, args)
    assert "out of memory" in one.get("error", ""), one
    four = bench.run_world(4, args)
    assert [r.get("error") for r in four] == [None] * 4, four
    whole = 2**18 * 64 * 4 * 3 / 2**20  # values + exp_avg + exp_avg_sq, MiB
    assert all(r["table_mib"] == whole / 4 for r in four)  # 1/N of the table and its optimizer state
    assert all(r["lookup_bytes_measured"] == r["lookup_bytes_formula"] for r in four)


def test_resume_is_refused_for_memory_parallel_runs(tmp_path: Path) -> None:
    from cli_helpers import clean_failure
    from typer.testing import CliRunner

    from knowedit.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "debug", "trainer.devices=2", "--out", str(out), "-q", "--resume"])
    clean_failure(result, "--resume is not supported for memory-parallel runs")
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
