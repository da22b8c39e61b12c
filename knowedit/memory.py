"""Product-key memory layer (Lample et al. 2019) with the Memory+ options of
Berges et al. 2024 ("Memory Layers at Scale").

For input x: q = W_q x, split per head into halves q1, q2. Each head has two
half-key tables K1, K2 of ``n`` rows; s1 = K1 q1, s2 = K2 q2; top-k of each;
the k*k candidate sums; top-k of those gives slot ids ``i * n + j``. The output
is ``sum_h sum_k softmax(score) V[id]`` over one value table ``V`` (N x d_v)
that every head (and, with a shared pool, every memory layer) reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knowedit.config import ConfigError, MemoryConfig


@dataclass
class MemoryTrace:
    """What one memory layer read for a batch.

    Attributes:
        layer: index of the transformer layer.
        pool: name of the value pool the slot ids refer to.
        query: (B, T, H, key_dim) the normalised queries.
        slots: (B, T, H, k) int64 slot ids.
        weights: (B, T, H, k) softmax weights.
    """

    layer: int
    pool: str
    query: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor


@dataclass
class RowPatch:
    """Replacement rows for a few slots of one pool, used while editing.

    ``rows`` usually requires grad; every other parameter stays frozen, so an
    optimiser over ``rows`` touches exactly these slots.

    Attributes:
        slots: (t,) sorted unique int64 slot ids.
        rows: (t, d_v) the rows' live values.
    """

    slots: torch.Tensor
    rows: torch.Tensor


class ValuePool(nn.Module):
    """The value table ``V`` (N x d_v); pass one instance to several layers to share it.

    Built inside :func:`knowedit.distributed.sharded_values`, the pool holds only this
    rank's columns of ``V`` (``shard``), drawn as the whole table's would be; lookups are
    then collectives over the shard's process group. Otherwise ``shard`` is None.
    """

    def __init__(self, n_slots: int, value_dim: int, name: str = "pool") -> None:
        super().__init__()
        from knowedit.distributed import current_shard

        self.name = name
        self.value_dim = value_dim
        """Width of a whole value row (the table's width unless sharded)."""
        self.shard = current_shard()
        # Small init: the memory output starts near zero, as an FFN's would.
        if self.shard is None:
            self.values = nn.Parameter(torch.empty(n_slots, value_dim))
            nn.init.normal_(self.values, std=value_dim**-0.5)
        else:
            self.values = nn.Parameter(self.shard.init_values(n_slots, value_dim, std=value_dim**-0.5))

    @property
    def n_slots(self) -> int:
        return self.values.shape[0]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


# Elements of one (rows, H, 2, n_keys) chunk of sub-key scores: 8 MiB in fp32, below glibc's
# largest mmap threshold (32 MiB), so the chunk buffers are reused instead of page-faulted in
# on every call, and a chunk's scores are still in cache when top-k reads them.
_SCORE_CHUNK_ELEMS = 1 << 21
_FAST_DTYPES = (torch.float32, torch.float64)
# Up to this many half keys per table the score gradient is scattered into a dense
# (R, H, 2, n_keys) tensor and multiplied out (two small bmm: fastest while n_keys is
# small); above it the backward touches only the selected keys (no O(n_keys) work).
_DENSE_SCORE_GRAD_MAX_KEYS = 128


@functools.lru_cache(maxsize=64)
def _pair_ranks(kk: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks ``(a, b)`` of the candidate pairs that can be among the top ``k``.

    With both sub-key lists sorted, pair ``(a, b)`` is dominated by every ``(a', b')`` with
    ``a' <= a, b' <= b``: ``(a + 1)(b + 1) - 1`` pairs score at least as high, so only pairs
    with ``(a + 1)(b + 1) <= k`` can make the top ``k`` (119 of 1,024 for k = 32).
    """
    a, b = zip(*[(i, j) for i in range(kk) for j in range(kk) if (i + 1) * (j + 1) <= k])
    return (
        torch.tensor(a, dtype=torch.int64, device=device),
        torch.tensor(b, dtype=torch.int64, device=device),
    )


class _SubKeyTopk(torch.autograd.Function):
    """Top-``kk`` sub-key scores of both halves, chunked, with a sparse backward.

    Forward scores a chunk of rows against all half keys and keeps the top ``kk``; the
    (R, H, 2, n_keys) score tensor never exists whole. Above
    ``_DENSE_SCORE_GRAD_MAX_KEYS`` the backward touches only the selected keys:
    ``dq = sum_j g_j K[id_j]`` is a weighted gather-sum (``embedding_bag``) and
    ``dK[id] = sum g q`` its transpose (:func:`knowedit.kernels.lookup.scatter_rows`),
    instead of two dense (R*H*2, n_keys) x (n_keys, half) matmuls over a mostly-zero grad.
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, keys: torch.Tensor, kk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r, h, _, _ = q.shape  # (R, H, 2, half)
        n = keys.shape[2]  # keys: (H, 2, n, half)
        vals = q.new_empty(r, h, 2, kk)
        ids = torch.empty(r, h, 2, kk, dtype=torch.int64, device=q.device)
        step = max(1, _SCORE_CHUNK_ELEMS // (h * 2 * n))
        for s in range(0, r, step):
            scores = torch.einsum("rhpd,hpnd->rhpn", q[s : s + step], keys)  # (c, H, 2, n)
            torch.topk(scores, kk, dim=-1, out=(vals[s : s + step], ids[s : s + step]))
        ctx.save_for_backward(q, keys, ids)
        ctx.mark_non_differentiable(ids)
        return vals, ids

    @staticmethod
    def backward(
        ctx: Any, grad_vals: torch.Tensor, _grad_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        from knowedit.kernels.lookup import scatter_rows

        q, keys, ids = ctx.saved_tensors
        r, h, _, half = q.shape
        n, kk = keys.shape[2], ids.shape[-1]
        grad_vals = grad_vals.to(q.dtype)
        grad_q = grad_keys = None
        if n <= _DENSE_SCORE_GRAD_MAX_KEYS:
            gs = q.new_zeros(r, h, 2, n).scatter_(-1, ids, grad_vals)  # (R, H, 2, n)
            if ctx.needs_input_grad[0]:
                grad_q = torch.einsum("rhpn,hpnd->rhpd", gs, keys)
            if ctx.needs_input_grad[1]:
                grad_keys = torch.einsum("rhpn,rhpd->hpnd", gs, q)
            return grad_q, grad_keys, None
        table = keys.reshape(h * 2 * n, half)  # (H*2*n, half): one row per half key
        base = torch.arange(h * 2, device=ids.device).view(1, h, 2, 1) * n
        gid = (ids + base).reshape(r * h * 2, kk)  # row of each selected key in ``table``
        g = grad_vals.reshape(r * h * 2, kk)
        if ctx.needs_input_grad[0]:
            grad_q = F.embedding_bag(gid, table, per_sample_weights=g, mode="sum")
            grad_q = grad_q.reshape(q.shape)
        if ctx.needs_input_grad[1]:
            uniq, rows = scatter_rows(gid, g, q.reshape(r * h * 2, half))
            grad_keys = table.new_zeros(table.shape).index_copy_(0, uniq, rows)
            grad_keys = grad_keys.reshape(keys.shape)
        return grad_q, grad_keys, None


def product_topk(
    q: torch.Tensor, keys: torch.Tensor, k: int, n_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the ``n_keys ** 2`` product keys of each head.

    Sub-key scoring and top-k run chunked with a sparse backward (:class:`_SubKeyTopk`);
    only the candidate pairs that can reach the top k are summed (:func:`_pair_ranks`).
    Same scores as :func:`product_topk_ref`; ids agree except among exactly tied scores.

    Args:
        q: (..., H, key_dim) queries.
        keys: (H, 2, n_keys, key_dim // 2) half-key tables.
        k: slots to return per head.
        n_keys: half-keys per table.

    Returns:
        scores (..., H, k) and slot ids (..., H, k), best first.
    """
    h, _, _, half = keys.shape
    lead = q.shape[:-2]
    if q.dtype not in _FAST_DTYPES or keys.dtype != q.dtype or q.numel() == 0:
        return product_topk_ref(q, keys, k, n_keys)
    kk = min(k, n_keys)
    qf = q.reshape(-1, h, 2, half)  # (R, H, 2, half)
    v, i = _SubKeyTopk.apply(qf, keys, kk)  # (R, H, 2, kk), best first
    a, b = _pair_ranks(kk, k, str(q.device))
    cand = v[:, :, 0].index_select(-1, a) + v[:, :, 1].index_select(-1, b)  # (R, H, P)
    scores, sel = cand.topk(k, dim=-1)  # (R, H, k)
    ids = i[:, :, 0].gather(-1, a[sel]) * n_keys + i[:, :, 1].gather(-1, b[sel])
    return scores.reshape(*lead, h, k), ids.reshape(*lead, h, k)


def product_topk_ref(
    q: torch.Tensor, keys: torch.Tensor, k: int, n_keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`product_topk`: plain autograd over all ``kk * kk`` candidates.

    Args:
        q: (..., H, key_dim) queries.
        keys: (H, 2, n_keys, key_dim // 2) half-key tables.
        k: slots to return per head.
        n_keys: half-keys per table.

    Returns:
        scores (..., H, k) and slot ids (..., H, k), best first.
    """
    half = keys.shape[-1]
    q1, q2 = q[..., :half], q[..., half:]  # (..., H, half)
    s1 = torch.einsum("...hd,hnd->...hn", q1, keys[:, 0])  # (..., H, n)
    s2 = torch.einsum("...hd,hnd->...hn", q2, keys[:, 1])
    kk = min(k, n_keys)
    v1, i1 = s1.topk(kk, dim=-1)  # (..., H, kk)
    v2, i2 = s2.topk(kk, dim=-1)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # (..., H, kk*kk)
    scores, flat = cand.topk(k, dim=-1)  # (..., H, k)
    ids = i1.gather(-1, flat // kk) * n_keys + i2.gather(-1, flat % kk)
    return scores, ids


def lookup(values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, backend: str) -> torch.Tensor:
    """Weighted sum of gathered value rows through the configured backend.

    Args:
        values: (N, d_v).
        ids: (..., K) int64 slot ids.
        weights: (..., K).
        backend: ``torch``, ``triton`` or ``auto``.

    Returns:
        (..., d_v). The gradient for ``values`` is sparse (touched rows only).
    """
    from knowedit import kernels

    return kernels.lookup(values, ids, weights, backend=backend)


def patch_correction(
    values: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, patch: RowPatch
) -> torch.Tensor:
    """sum_k w_k (patched_row - base_row) for the slots the patch replaces. (..., d_v)."""
    pos = torch.searchsorted(patch.slots, ids).clamp_(max=patch.slots.numel() - 1)
    hit = patch.slots[pos] == ids  # (..., K)
    delta = patch.rows - values.detach()[patch.slots]  # (t, d_v)
    w = (weights * hit).to(delta.dtype)
    return torch.einsum("...k,...kd->...d", w, delta[pos])


class ProductKeyMemory(nn.Module):
    """A memory layer used in place of a transformer block's FFN.

    Args:
        d_model: model width.
        cfg: memory settings.
        pool: the value pool to read (shared when several layers get the same one).
        layer: transformer layer index, recorded in traces.
    """

    def __init__(self, d_model: int, cfg: MemoryConfig, pool: ValuePool, layer: int) -> None:
        super().__init__()
        if cfg.key_dim % 2:
            raise ConfigError("memory.key_dim must be even (two half keys)")
        if cfg.topk > cfg.n_keys**2:
            raise ConfigError("memory.topk exceeds the number of slots")
        self.cfg = cfg
        self.layer = layer
        self.pool = pool
        self.n_keys = cfg.n_keys
        value_dim = pool.value_dim
        self.query = nn.Linear(d_model, cfg.heads * cfg.key_dim, bias=False)
        self.keys = nn.Parameter(torch.randn(cfg.heads, 2, cfg.n_keys, cfg.key_dim // 2))
        self.query_bn = nn.BatchNorm1d(cfg.heads * cfg.key_dim) if cfg.query_bn else None
        if cfg.swilu:
            self.gate = nn.Linear(d_model, value_dim, bias=False)
            self.out = nn.Linear(value_dim, d_model, bias=False)
        else:
            self.gate = None
            self.out = nn.Linear(value_dim, d_model, bias=False) if value_dim != d_model else None

    def half_keys(self) -> torch.Tensor:
        """(H, 2, n_keys, key_dim // 2): the (normalised) sub-key tables used for scoring."""
        return _rms(self.keys) * (self.keys.shape[-1] ** -0.5) if self.cfg.qk_norm else self.keys

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, H, key_dim) queries, per-half normalised with qk-norm."""
        q = self.query(x)
        if self.query_bn is not None:
            q = self._batch_norm(q)
        q = q.unflatten(-1, (self.cfg.heads, self.cfg.key_dim))  # (B, T, H, Dk)
        if self.cfg.qk_norm:
            half = self.cfg.key_dim // 2
            q = torch.cat([_rms(q[..., :half]), _rms(q[..., half:])], dim=-1)
        return q

    def _batch_norm(self, q: torch.Tensor) -> torch.Tensor:
        """``query_bn`` over every position of ``q`` (..., H*Dk). Batch statistics (and
        running-statistics updates) only while training with the query projection
        trainable; otherwise the running statistics, so value-only learning and
        editing leave the layer's buffers as they were."""
        bn = self.query_bn
        assert bn is not None
        batch_stats = self.training and self.query.weight.requires_grad and torch.is_grad_enabled()
        flat = q.reshape(-1, q.shape[-1])
        out = F.batch_norm(
            flat, bn.running_mean, bn.running_var, bn.weight, bn.bias,
            training=batch_stats, momentum=bn.momentum if bn.momentum is not None else 0.1, eps=bn.eps,
        )
        if batch_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return out.view_as(q)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, slot ids and softmax weights for ``x`` (B, T, d_model).

        Returns:
            query (B, T, H, Dk), ids (B, T, H, k), weights (B, T, H, k).
        """
        q = self.queries(x)
        scores, ids = product_topk(q, self.half_keys(), self.cfg.topk, self.n_keys)
        return q, ids, scores.softmax(dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        trace: list[MemoryTrace] | None = None,
        patch: RowPatch | None = None,
    ) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); appends a :class:`MemoryTrace` to ``trace``."""
        q, ids, w = self.select(x)
        if trace is not None:
            trace.append(MemoryTrace(self.layer, self.pool.name, q.detach(), ids, w.detach()))
        flat_ids = ids.flatten(-2)  # (B, T, H*k)
        flat_w = w.flatten(-2).to(self.pool.values.dtype)
        if self.pool.shard is not None:  # memory-parallel: a collective over the pool's ranks
            if patch is not None:
                raise ValueError("row patches (editing) need a whole value table; consolidate the shards first")
            mem = self.pool.shard.lookup(self.pool.values, flat_ids, flat_w, self.cfg.backend)
        else:
            mem = lookup(self.pool.values, flat_ids, flat_w, self.cfg.backend)  # (B, T, d_v)
        if patch is not None:
            mem = mem + patch_correction(self.pool.values, flat_ids, flat_w, patch)
        if self.gate is not None:
            mem = mem * F.silu(self.gate(x))
        return self.out(mem) if self.out is not None else mem


def usage_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Slot-usage metrics of Lample et al. 2019 from per-slot access mass.

    Args:
        counts: (N,) non-negative access counts or summed weights.

    Returns:
        ``used_fraction`` (share of slots accessed at all), ``kl_uniform``
        (KL(usage || uniform) in nats; 0 is perfectly even use) and
        ``top1pct_share`` (share of the mass on the most-used 1% of the slots, at
        least one slot: about 0.01 under even use; hubs that most reads go to push
        it towards 1).
    """
    counts = counts.double().clamp_min(0)
    n = counts.numel()
    total = counts.sum()
    if n == 0 or total <= 0:
        return {"used_fraction": 0.0, "kl_uniform": 0.0, "top1pct_share": 0.0}
    p = counts / total
    nz = p[p > 0]
    kl = float((nz * (nz * n).log()).sum())
    top = float(p.topk(max(1, n // 100)).values.sum())
    return {"used_fraction": float((counts > 0).double().mean()), "kl_uniform": kl, "top1pct_share": top}
