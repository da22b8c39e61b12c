"""Memory-parallel training on CPU processes (gloo): step time, memory and bytes per rank.

For W in ``--worlds`` (default 1 2 4) this spawns W processes (torch.multiprocessing,
gloo; W = 1 runs without any collective) that train the same MemoryLM at a fixed total
value-table size: each rank holds ``n_keys**2 x d/W`` of every table
(:mod:`knowedit.distributed`), the dense parameters are replicated by
``torch.nn.parallel.DistributedDataParallel`` with the dense gradients summed
(:func:`knowedit.distributed.allreduce_sum_hook`, as the recipe's Lightning strategy
does), the values train with ``torch.optim.SparseAdam`` and the rest with AdamW. Data:
random token ids, a global batch of ``--batch`` sequences of ``--seq`` tokens, split over
the ranks as the recipe splits it.

Per rank it reports:

* ``step ms``: median wall time of a training step (forward, backward, both optimizer
  steps) over ``--steps`` after ``--warmup`` (2) untimed steps;
* ``table MiB``: bytes of this rank's value tables plus SparseAdam's state for them
  (``exp_avg`` and ``exp_avg_sq``, allocated at the first step), counted from the tensors;
* ``peak RSS MiB``: ``ru_maxrss`` of the rank's process, and its growth from just before
  the model was built;
* ``lookup bytes/step``: bytes this rank sent in the sharded lookups' collectives
  (counted at each call, :data:`knowedit.distributed.COMM_BYTES`), beside the formula
  ``L * (W-1) * (M_r * (16 * H * k + 8 * d / W) + 8)`` (L memory layers, M_r tokens on
  the rank, H*k reads a token, int64 ids + fp32 weights all-gathered, fp32 output rows
  and their gradients all-to-all'ed, fp32 weight gradients returned; the +8 is the
  token-count all-gather), and the dense all-reduce's bytes by formula only
  (ring all-reduce: ``2 (W-1)/W x`` the dense gradient bytes; gloo's algorithm is not
  instrumented), beside the dense gradient bytes the DDP hook handed to the all-reduce
  (counted: ``payload``).

``--mem-cap-mb X`` caps every rank's address space (``resource.setrlimit(RLIMIT_AS)``) at
its size just after start-up (imports, process group) plus X MiB, before the model is
built; a rank that runs out of memory reports ``out of memory`` instead of numbers.

Usage::

    python bench/distributed.py                                   # 1, 2, 4 processes
    python bench/distributed.py --worlds 1 4 --mem-cap-mb 600     # the cap: 1 fails, 4 train
    python bench/distributed.py --n-keys 256 --steps 4 --json-out d.json
    python bench/distributed.py --parity --worlds 2 4 --set precision=64-true

``--parity`` instead trains the ``debug`` recipe for 20 steps on one process and on each of
``--worlds`` processes (through ``knowedit.recipes.train``, the ranks started as torchrun
would) and prints the largest difference of the logged losses from one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# spawned ranks import bench.distributed by name; appended so that the checkout's top-level
# `kernels/` (knowedit.kernels) does not shadow the Hugging Face `kernels` package transformers imports
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _formula(layers: int, world: int, m_r: int, reads: int, d: int) -> int:
    if world == 1:
        return 0
    return layers * (world - 1) * (m_r * (16 * reads + 8 * d // world) + 8)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    result: dict = {"rank": rank, "world": world}
    try:
        _run_rank(rank, world, port, args, result)
    except (MemoryError, RuntimeError) as err:  # the allocator's "can't allocate" under the cap
        if "alloc" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        result["error"] = "out of memory: " + str(err).strip().splitlines()[0][:200]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1 and "error" not in result:
        dist.destroy_process_group()


def _run_rank(rank: int, world: int, port: int, args: argparse.Namespace, result: dict) -> None:
    from knowedit.config import MemoryConfig, ModelConfig
    from knowedit.distributed import (
        COMM_BYTES,
        ShardSpec,
        allreduce_sum_hook,
        ddp_ignore_names,
        rank_share,
        reset_comm_bytes,
        sharded_values,
        share_of_global_loss,
    )
    from knowedit.model import build_model

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        dist.barrier()
    cfg = ModelConfig(
        vocab_size=args.vocab, d_model=args.d, n_layers=2, n_heads=2, max_seq_len=args.seq, memory_layers=[1],
        memory=MemoryConfig(n_keys=args.n_keys, heads=args.heads, topk=args.topk, key_dim=32),
    )  # fmt: skip
    if args.mem_cap_mb:
        cap = _vm_kib("VmSize") * 1024 + args.mem_cap_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        result["cap_mib"] = round(cap / 2**20)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with sharded_values(ShardSpec(rank, world) if world > 1 else None):
        model = build_model(cfg, seed=0)
    phases = {"build": _maxrss_mib() - rss0 / 1024}
    values = model.value_parameters()
    dense = model.other_parameters()
    net: torch.nn.Module = model
    if world > 1:
        model._ddp_params_and_buffers_to_ignore = ddp_ignore_names(model)
        net = torch.nn.parallel.DistributedDataParallel(model)
        net.register_comm_hook(None, allreduce_sum_hook)
    phases["ddp"] = _maxrss_mib() - rss0 / 1024
    opt_v = torch.optim.SparseAdam(values, lr=1e-2)
    opt_d = torch.optim.AdamW(dense, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times, sent, payload = [], [], []
    warmup = getattr(args, "warmup", 2)
    for step in range(args.steps + warmup):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        mine = rank_share(ids, rank, world)
        reset_comm_bytes()
        t0 = time.perf_counter()
        logits = net(mine[:, :-1])
        if world > 1:
            loss, _ = share_of_global_loss(logits, mine[:, 1:])
        else:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mine[:, 1:].flatten())
        opt_v.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            phases["forward+backward"] = _maxrss_mib() - rss0 / 1024
        opt_v.step()
        opt_d.step()
        if step == 0:
            phases["first step"] = _maxrss_mib() - rss0 / 1024
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            sent.append(COMM_BYTES["sent"])
            payload.append(COMM_BYTES["allreduce_payload"])
    state = sum(t.numel() * t.element_size() for p in values for t in opt_v.state[p].values() if torch.is_tensor(t))
    table = sum(p.numel() * p.element_size() for p in values)
    m_r = rank_share(torch.arange(args.batch), rank, world).numel() * args.seq
    dense_bytes = sum(p.numel() * p.element_size() for p in dense)
    result.update(
        step_ms=round(1000 * statistics.median(times), 1),
        table_mib=round((table + state) / 2**20, 2),
        values_mib=round(table / 2**20, 2),
        optimizer_state_mib=round(state / 2**20, 2),
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        rss_growth_mib=round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1),
        rss_growth_by_phase_mib={k: round(v, 1) for k, v in phases.items()},
        lookup_bytes_measured=int(statistics.median(sent)),
        lookup_bytes_formula=_formula(1, world, m_r, args.heads * args.topk, args.d),
        dense_allreduce_payload_measured=int(statistics.median(payload)),
        dense_allreduce_bytes_formula=int(2 * (world - 1) / world * dense_bytes),
    )


#: 20 batches of the debug recipe (two optimizer steps a batch), a loss logged at every one.
PARITY_OVERRIDES = [
    "max_steps=40", "max_epochs=100", "accelerator=cpu", "logger=csv", "checkpoint_every_n_epochs=0",
    "trainer.log_every_n_steps=1", "optim.warmup_steps=5", "threads=1",
]  # fmt: skip


def _parity_rank(rank: int, world: int, port: int, out: str, extra: list[str]) -> None:
    """One rank of the debug recipe over ``world`` processes, started as torchrun would."""
    import warnings

    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
        )
    warnings.simplefilter("ignore")
    from knowedit.config import load_train_config
    from knowedit.recipes.train import train

    repo = Path(__file__).resolve().parents[1]
    devices = [f"trainer.devices={world}"] if world > 1 else []
    cfg = load_train_config(str(repo / "recipes" / "configs" / "debug.yaml"), PARITY_OVERRIDES + devices + extra)
    cfg.out = out
    train(cfg, progress=False)


def _logged_losses(out: Path) -> list[float]:
    import csv

    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        return [float(r["train_loss_step"]) for r in csv.DictReader(f) if r.get("train_loss_step")]


def parity(worlds: list[int], extra: list[str]) -> None:
    """20 steps of the debug recipe on 1 process and on each of ``worlds``: the largest loss difference."""
    with tempfile.TemporaryDirectory() as tmp:
        losses = {}
        for world in [1, *worlds]:
            out = str(Path(tmp) / f"w{world}")
            mp.start_processes(
                _parity_rank, args=(world, _free_port(), out, extra), nprocs=world, join=True, start_method="spawn"
            )
            losses[world] = _logged_losses(Path(out))
        print(f"# debug recipe, 20 steps, global batch 32 {' '.join(extra)}")
        print("| processes | steps | first loss | last loss | max abs difference from 1 process |")
        print("|---|---|---|---|---|")
        for world, ls in losses.items():
            diff = max(abs(a - b) for a, b in zip(ls, losses[1]))
            print(f"| {world} | {len(ls)} | {ls[0]:.6f} | {ls[-1]:.6f} | {diff:.3g} |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(
                _rank, args=(world, _free_port(), args, tmp), nprocs=world, join=True, start_method="spawn"
            )
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:  # report, keep going
            done = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
            first = str(err).strip().splitlines()[-1][:160]
            return done + [{"world": world, "rank": -1, "error": f"a rank failed: {first}"}]
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n-keys", type=int, default=1024, help="half keys: n_keys**2 value rows (default 2^20)")
    ap.add_argument("--d", type=int, default=64, help="model and value width")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--mem-cap-mb", type=int, default=0, help="per-rank address-space cap above start-up (0: none)")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--parity", action="store_true", help="instead: 20 steps of the debug recipe on 1 and --worlds processes")
    ap.add_argument("--set", action="append", default=[], help="with --parity: a recipe override, e.g. precision=64-true")
    args = ap.parse_args()
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")  # fewer 64 MiB malloc arenas under an address-space cap
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.parity:
        parity([w for w in args.worlds if w > 1], args.set)
        return
    n = args.n_keys**2
    print(f"# {platform.node()} {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# table {n} slots x {args.d} fp32 = {n * args.d * 4 / 2**20:.0f} MiB (+ SparseAdam state 2x); "
          f"global batch {args.batch} x {args.seq} tokens; {args.heads} heads x top-{args.topk}"
          + (f"; cap {args.mem_cap_mb} MiB above start-up per rank" if args.mem_cap_mb else ""))  # fmt: skip
    print("| W | rank | step ms | values+state MiB | peak RSS MiB (growth) | lookup bytes/step measured | formula "
          "| dense all-reduce payload (counted) | ring all-reduce bytes sent (formula) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for world in args.worlds:
        for r in run_world(world, args):
            rows.append(r)
            if "error" in r:
                print(f"| {world} | {r['rank']} | {r['error']} | | | | | | |")
                continue
            print(
                f"| {world} | {r['rank']} | {r['step_ms']} | {r['table_mib']} | {r['peak_rss_mib']} ({r['rss_growth_mib']}) "
                f"| {r['lookup_bytes_measured']} | {r['lookup_bytes_formula']} | {r['dense_allreduce_payload_measured']} "
                f"| {r['dense_allreduce_bytes_formula']} |"
            )
        sys.stdout.flush()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
