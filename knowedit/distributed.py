"""Memory-parallel value pools: each rank of a process group holds one slice of every
value table along the embedding dimension, as in Berges et al. 2024 ("Memory Layers at
Scale").

A sharded lookup for the M_r tokens of rank r (``values`` is this rank's (N, d/W) slice):

1. all-gather every rank's slot ids and weights (M = sum M_r tokens, H*k reads each);
2. this rank computes its d/W columns of the output for all M tokens with the ordinary
   lookup (:func:`knowedit.kernels.lookup`: the embedding-bag path on CPU, Triton on GPU);
3. all-to-all: rank r receives the d/W columns of its own M_r tokens from every rank and
   concatenates them into full (M_r, d) rows.

The backward runs the other way: an all-to-all sends each rank the column slice of every
token's output gradient; the ordinary lookup backward gives this rank's value gradient
(sparse, only the rows the global batch read, over the local columns) and its partial
weight gradients, which a second all-to-all returns to the tokens' ranks and sums. The
gradients are those of the *sum* of every rank's loss; the recipe trains each rank on its
share of the global mean loss and sums the dense gradients in DDP (:func:`allreduce_sum_hook`),
so every parameter gets the gradient of one process on the global batch.

Dense parameters are replicated by Lightning's ``DDPStrategy``; the value tables are kept out
of DDP (:func:`ddp_ignore_names`). Only torch.distributed collectives are used (gloo on CPU,
NCCL on GPUs). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from knowedit.errors import KnoweditError

__all__ = [
    "COMM_BYTES",
    "DistributedError",
    "ShardSpec",
    "ShardedBatches",
    "allreduce_sum_hook",
    "consolidated_state_dict",
    "current_shard",
    "ddp_ignore_names",
    "rank_share",
    "sharded_lookup",
    "share_of_global_loss",
    "sharded_values",
]


class DistributedError(KnoweditError, ValueError):
    """A memory-parallel setting that cannot work (e.g. a value width not divisible by the ranks)."""


COMM_BYTES: dict[str, int] = {"sent": 0, "calls": 0, "allreduce_payload": 0}
"""Bytes this process has sent to other ranks in sharded lookups (forward and backward), the
number of those collectives, and the bytes of dense gradients it all-reduced in DDP
(:func:`allreduce_sum_hook`; what the all-reduce itself sends depends on the backend's
algorithm); :func:`reset_comm_bytes` zeroes them. Read by bench/distributed.py."""


def reset_comm_bytes() -> None:
    COMM_BYTES.update(sent=0, calls=0, allreduce_payload=0)


@dataclass(frozen=True)
class ShardSpec:
    """This process's part of the value tables: columns ``[lo, hi)`` of each row.

    Attributes:
        rank: rank in ``group``.
        world: ranks in ``group``.
        group: the process group the shards live on (None: the default group).
    """

    rank: int
    world: int
    group: Any = field(default=None, compare=False)  # noqa: ANN401 - a ProcessGroup

    def columns(self, value_dim: int) -> tuple[int, int]:
        """The ``[lo, hi)`` columns of a ``value_dim``-wide row that this rank holds."""
        if value_dim % self.world:
            raise DistributedError(
                f"the memory's value width {value_dim} is not divisible by the {self.world} ranks it is "
                "sharded over; choose trainer.devices x trainer.num_nodes dividing it (or set model.memory.value_dim)"
            )
        w = value_dim // self.world
        return self.rank * w, (self.rank + 1) * w

    def init_values(self, n_slots: int, value_dim: int, std: float) -> torch.Tensor:
        """This rank's columns of ``torch.empty(n_slots, value_dim).normal_(0, std)``,
        drawn from the same generator stream, without ever holding the whole table.

        CPU ``normal_`` fills a contiguous tensor in blocks of 16 values, so drawing the
        rows in chunks of a multiple of 16 values gives the very numbers of one call (and
        leaves the generator where one call would): a sharded model starts from the
        weights of the single-process model with the same seed.
        """
        lo, hi = self.columns(value_dim)
        out = torch.empty(n_slots, hi - lo)
        rows = max(16, ((1 << 20) // max(1, value_dim)) // 16 * 16)  # 16 rows x any width: a multiple of 16
        for a in range(0, n_slots, rows):
            block = torch.empty(min(rows, n_slots - a), value_dim).normal_(0.0, std)
            out[a : a + block.shape[0]] = block[:, lo:hi]
        return out

    def lookup(self, values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str) -> torch.Tensor:
        return sharded_lookup(values, ids, weights, self, backend)


_SHARD: contextvars.ContextVar[ShardSpec | None] = contextvars.ContextVar("knowedit_value_shard", default=None)


def current_shard() -> ShardSpec | None:
    """The shard that :class:`knowedit.memory.ValuePool` objects built now take (None: whole tables)."""
    return _SHARD.get()


@contextlib.contextmanager
def sharded_values(spec: ShardSpec | None) -> Iterator[None]:
    """Value pools built inside this block hold only ``spec``'s columns (None: whole tables)."""
    token = _SHARD.set(spec)
    try:
        yield
    finally:
        _SHARD.reset(token)


# --------------------------------------------------------------------------- collectives


def _send_bytes(tensors: list[torch.Tensor], rank: int) -> None:
    COMM_BYTES["sent"] += sum(t.numel() * t.element_size() for i, t in enumerate(tensors) if i != rank)
    COMM_BYTES["calls"] += 1


def _all_gather_rows(x: torch.Tensor, sizes: list[int], spec: ShardSpec) -> torch.Tensor:
    """(M_r, ...) on every rank -> (sum M_r, ...) in rank order (padded to the largest M_r on the wire)."""
    top = max(sizes)
    pad = x if x.shape[0] == top else torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(pad) for _ in range(spec.world)]
    dist.all_gather(parts, pad.contiguous(), group=spec.group)
    COMM_BYTES["sent"] += pad.numel() * pad.element_size() * (spec.world - 1)
    COMM_BYTES["calls"] += 1
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], spec: ShardSpec) -> torch.Tensor:
    """Rows ``x[sum(send[:j]) : sum(send[:j+1])]`` go to rank j; returns the ``sum(recv)`` rows
    received, in rank order (``recv[i]`` from rank i)."""
    x = x.contiguous()
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=spec.group)
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    COMM_BYTES["sent"] += (sum(send) - send[spec.rank]) * row
    COMM_BYTES["calls"] += 1
    return out


def _gather_sizes(m: int, spec: ShardSpec, device: torch.device) -> list[int]:
    t = torch.tensor([m], dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(spec.world)]
    dist.all_gather(parts, t, group=spec.group)
    COMM_BYTES["sent"] += 8 * (spec.world - 1)
    COMM_BYTES["calls"] += 1
    return [int(p) for p in parts]


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, spec: ShardSpec, backend: str, track: bool
    ) -> torch.Tensor:
        from knowedit import kernels

        sizes = _gather_sizes(idx.shape[0], spec, idx.device)
        all_idx = _all_gather_rows(idx, sizes, spec)  # (M, K)
        all_w = _all_gather_rows(w, sizes, spec)
        with torch.set_grad_enabled(track):  # the local part's own autograd graph, replayed in backward
            v_leaf = values.detach().requires_grad_(track and ctx.needs_input_grad[0])
            w_leaf = all_w.detach().requires_grad_(track and ctx.needs_input_grad[2])
            part = kernels.lookup(v_leaf, all_idx, w_leaf, backend=backend)  # (M, d/W)
        ctx.spec, ctx.sizes, ctx.graph = spec, sizes, (part, v_leaf, w_leaf) if track else None
        m_r, world, width = idx.shape[0], spec.world, part.shape[1]
        got = _all_to_all(part.detach(), sizes, [m_r] * world, spec)  # (W * M_r, d/W): every rank's columns
        return got.view(world, m_r, width).permute(1, 0, 2).reshape(m_r, world * width)  # (M_r, d)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None, None]:
        spec, sizes = ctx.spec, ctx.sizes
        part, v_leaf, w_leaf = ctx.graph
        ctx.graph = None
        m_r, world, width = grad_out.shape[0], spec.world, part.shape[1]
        # Every rank's gradient for this rank's columns, in the all-gathered token order.
        mine = grad_out.reshape(m_r, world, width).transpose(0, 1)  # (W, M_r, d/W): column block j for rank j
        cols = _all_to_all(mine.reshape(world * m_r, width), [m_r] * world, sizes, spec)  # (M, d/W)
        wants = [t for t, need in ((v_leaf, ctx.needs_input_grad[0]), (w_leaf, ctx.needs_input_grad[2])) if need]
        grads = iter(torch.autograd.grad(part, wants, cols.to(part.dtype)))
        grad_values = next(grads) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            # Partial dot products over this rank's columns: back to the tokens' ranks, summed there.
            gw = next(grads)  # (M, K)
            back = _all_to_all(gw, sizes, [m_r] * world, spec)  # (W * M_r, K)
            grad_w = back.view(world, m_r, gw.shape[1]).sum(0)
        return grad_values, None, grad_w, None, None, None


def sharded_lookup(
    values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, spec: ShardSpec, backend: str = "torch"
) -> torch.Tensor:
    """``sum_k weights[..., k] * V[ids[..., k]]`` with ``V`` sharded by columns over ``spec``'s ranks.

    Every rank of the group must call it together (a collective), each with its own tokens.

    Args:
        values: (N, d/W) this rank's columns of the table.
        ids: (..., K) int64 slot ids of this rank's tokens.
        weights: (..., K) their weights.
        spec: the shard.
        backend: the lookup backend of the local part (``torch``, ``triton``, ``auto``).

    Returns:
        (..., d) full rows for this rank's tokens. The gradient for ``values`` is sparse
        (the rows any rank's tokens read, this rank's columns); the one for ``weights`` dense.
    """
    lead = ids.shape[:-1]
    k = ids.shape[-1]
    idx = ids.reshape(-1, k).to(torch.int64)
    w = weights.reshape(-1, k)
    track = torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad)
    out = _ShardedLookup.apply(values, idx, w, spec, backend, track)
    return out.reshape(*lead, out.shape[-1])


# --------------------------------------------------------------------------- training glue


def _allreduce_sum_hook(state, bucket):  # noqa: ANN001, ANN202
    buf = bucket.buffer()
    COMM_BYTES["allreduce_payload"] += buf.numel() * buf.element_size()
    fut = dist.all_reduce(buf, group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks a hook's annotations as objects, which ``from __future__ import annotations`` makes strings.
_allreduce_sum_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
allreduce_sum_hook = _allreduce_sum_hook
"""DDP communication hook: the dense gradients are *summed* over ranks (DDP's own hook
averages). Each rank backpropagates its share of the global mean loss, so the sum is the
single-process gradient on the global batch, as the value shards' gradients are."""


def share_of_global_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch's mean loss, and that mean (detached), from
    logits (..., V) and targets (...), where -100 is not scored.

    The shares sum to the mean over every rank's scored tokens, which is what one process
    on the global batch minimises; gradients are summed over ranks (dense ones in DDP's
    communication hook, the value shards' in the sharded lookup), so they are its gradients.
    """
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    stats = torch.stack([total.detach().double(), (targets != -100).sum().double()])
    dist.all_reduce(stats)
    return total / stats[1].clamp_min(1).to(total.dtype), (stats[0] / stats[1].clamp_min(1)).to(total.dtype)


def ddp_ignore_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the sharded value tables, which DDP must leave alone."""
    from knowedit.memory import ValuePool

    return [
        f"{name}.values" if name else "values"
        for name, sub in module.named_modules()
        if isinstance(sub, ValuePool) and sub.shard is not None
    ]


def consolidated_state_dict(model: nn.Module, rows_per_chunk: int = 1 << 16) -> dict[str, torch.Tensor] | None:
    """The model's state dict on the CPU with every sharded value table whole, on rank 0
    (None elsewhere).

    A collective: every rank of the shards' group calls it. The tables are gathered
    ``rows_per_chunk`` rows at a time on the shards' device (NCCL gathers GPU tensors,
    gloo CPU ones) and assembled in rank 0's host memory, which then holds each whole table:
    what an ordinary checkpoint needs.
    """
    from knowedit.memory import ValuePool

    whole: dict[int, torch.Tensor] = {}
    rank0 = True
    for pool in model.modules():
        if not isinstance(pool, ValuePool) or pool.shard is None or id(pool.values) in whole:
            continue
        spec = pool.shard
        rank0 = spec.rank == 0
        dst = dist.get_global_rank(spec.group, 0) if spec.group is not None else 0
        shard = pool.values.detach()
        n, width = shard.shape
        full = torch.empty(n, width * spec.world, dtype=shard.dtype) if rank0 else shard
        for a in range(0, n, rows_per_chunk):
            part = shard[a : a + rows_per_chunk].contiguous()
            parts = [torch.empty_like(part) for _ in range(spec.world)] if rank0 else None
            dist.gather(part, parts, dst=dst, group=spec.group)
            if rank0:
                full[a : a + part.shape[0]] = torch.cat(parts, dim=1).cpu()
        whole[id(pool.values)] = full
    if not rank0:
        return None
    # A pool's table appears under every module that holds the pool (pools.NAME and blocks.I.ffn.pool).
    return {k: whole.get(id(v), v).detach().cpu() for k, v in model.state_dict(keep_vars=True).items()}


class ShardedBatches(Sampler[list[int]]):
    """The single-process run's global batches, for a run over ``world`` ranks.

    ``sampler`` (e.g. the recipe's ``EpochShuffle``) gives the single-process order of one
    epoch; the global batches are its runs of ``batch_size``, yielded whole: every rank
    encodes the global batch (so it is padded to the same length as in one process; pad
    positions read value rows too, and a lazy optimizer such as SparseAdam updates every
    row a batch read) and keeps its rows with :func:`rank_share`. A last global batch
    smaller than ``world`` is dropped (no rank may have an empty step).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, world: int) -> None:
        self.sampler, self.batch_size, self.world = sampler, batch_size, world

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        full, rest = divmod(n, self.batch_size)
        return full + (rest >= self.world)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for a in range(0, len(order), self.batch_size):
            batch = order[a : a + self.batch_size]
            if len(batch) < self.world:
                return
            yield batch


def rank_share(rows: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a global batch: every ``world``-th, from row ``rank``."""
    return rows[rank::world]


def memory_parallel_strategy(accelerator: str, timeout_minutes: float = 30.0) -> Any:  # noqa: ANN401
    """Lightning's ``DDPStrategy`` for memory-parallel training: NCCL on GPUs, gloo on CPU;
    dense gradients summed over ranks (:func:`allreduce_sum_hook`) on every device type
    (Lightning registers a DDP communication hook only on CUDA)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    class MemoryParallelDDP(DDPStrategy):
        def _register_ddp_hooks(self) -> None:
            self.model.register_comm_hook(None, allreduce_sum_hook)

    backend = "gloo" if accelerator == "cpu" else None  # None: Lightning's default for the device (NCCL on CUDA)
    return MemoryParallelDDP(process_group_backend=backend, timeout=timedelta(minutes=timeout_minutes))
