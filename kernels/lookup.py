"""Weighted memory lookup: ``out[..., :] = sum_k weights[..., k] * values[indices[..., k], :]``.

Four entry points share one contract (forward values and sparse value gradient):

* :func:`memory_lookup` -- Triton kernels wrapped in a ``torch.autograd.Function``.
* :func:`memory_lookup_bag` -- the ``torch`` backend's fast path: three fused ATen
  embedding-bag loops, each reading every gathered row once (see below).
* :func:`memory_lookup_ref` -- pure-PyTorch reference (gather, bmm, sparse matmul).
* :func:`lookup` -- dispatches via :func:`resolve_backend`; ``torch`` uses
  :func:`memory_lookup_bag` where it applies (fp32/fp64, one dtype, contiguous table) and
  :func:`memory_lookup_ref` otherwise.

How :func:`memory_lookup_bag` keeps memory traffic down (M tokens, K reads each, D wide
rows): the forward is ``F.embedding_bag`` with ``per_sample_weights`` (one pass over
the M*K rows, no (M, K, D) gather). The weight gradient ``<grad_out[m], values[idx[m, k]]>``
is ATen's fused per-sample-weights backward of ``embedding_bag`` (one more pass over the
rows, in ascending slot order, again nothing materialised). The value gradient is the same gather-sum transposed:
sort the M*K ids once, and ``embedding_bag`` over the (M, D) ``grad_out`` -- small, cache
resident -- with one bag per distinct slot writes the U coalesced rows directly, into a
reused buffer once they reach 32 MiB (:class:`_RowBuffers`). On one loaded CPU core at 1M
slots the forward still takes 2-3x and the weight-gradient pass 4-7x the time of moving
their bytes at copy bandwidth (random 2 KB rows are latency-bound); see the "Memory layer
scaling (CPU)" section of docs/benchmarks.md.

Gradient contract (every implementation): the gradient with respect to ``values`` is a
*coalesced* ``torch.sparse_coo_tensor`` of shape (N, D) with ``sparse_dim == 1`` whose
indices are exactly the distinct slot ids of the batch (ascending) and whose rows hold the
summed contributions, in ``values.dtype``; no (N, D) buffer is ever allocated. This is the
same layout ``nn.Embedding(sparse=True)`` produces, so autograd accumulates it into a dense
``nn.Parameter``'s ``.grad`` by sparse addition and ``torch.optim.SparseAdam``/``SGD`` and
:mod:`knowedit.kernels.optim` accept it. The gradient with respect to ``weights`` is dense,
in ``weights.dtype``. ``indices`` get no gradient. All accumulation is in fp32 (fp64 for
fp64 inputs of the reference), the output has ``values.dtype``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
import torch.nn.functional as F

from ._common import debug_enabled, load_triton_module, resolve_backend

__all__ = ["lookup", "memory_lookup", "memory_lookup_bag", "memory_lookup_ref"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of the (chunk, K, D) fp32 intermediates of the reference (64 MiB in fp32).
_REF_CHUNK_ELEMS = 1 << 24


def _flatten_inputs(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Validate inputs and flatten the leading dims.

    Args:
        values: (N, D) value table.
        indices: (..., K) integer slot ids.
        weights: (..., K) float weights.

    Returns:
        ``(idx, w, lead)``: (M, K) contiguous int64 ids, (M, K) contiguous weights and the
        leading shape ``...`` (``M = prod(lead)``).
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (N, D), got shape {tuple(values.shape)}")
    if indices.dim() < 1:
        raise ValueError("indices must have at least one dim (..., K)")
    if indices.shape != weights.shape:
        raise ValueError(
            f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have the "
            "same shape (..., K)"
        )
    if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    if indices.device != values.device or weights.device != values.device:
        raise ValueError(
            f"values ({values.device}), indices ({indices.device}) and weights "
            f"({weights.device}) must be on the same device"
        )
    lead = tuple(indices.shape[:-1])
    m, k = math.prod(lead), indices.shape[-1]
    idx = indices.reshape(m, k).to(torch.int64).contiguous()
    w = weights.reshape(m, k).contiguous()
    return idx, w, lead


def _check_index_range(idx: torch.Tensor, num_rows: int) -> None:
    """Raise IndexError if any slot id is outside ``[0, num_rows)`` (host sync)."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_rows):
        raise IndexError(
            f"slot ids must lie in [0, {num_rows}), got range [{int(idx.min())}, {int(idx.max())}]"
        )


class _MemoryLookupTriton(torch.autograd.Function):
    """Autograd wrapper over the Triton kernels of :mod:`._lookup_triton`."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        resolve_backend("triton", values.device)
        kern = load_triton_module("_lookup_triton")
        if values.dtype not in _TRITON_DTYPES or weights.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"memory_lookup supports values/weights in {_TRITON_DTYPES}, got values "
                f"{values.dtype} and weights {weights.dtype}; use memory_lookup_ref"
            )
        idx, w, lead = _flatten_inputs(values, indices, weights)
        if debug_enabled():
            _check_index_range(idx, values.shape[0])
        table = values if values.stride(1) == 1 else values.contiguous()
        out = kern.lookup_forward(table, idx, w)
        ctx.save_for_backward(table, idx, w)
        ctx.w_shape = weights.shape
        return out.reshape(*lead, values.shape[1])

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        kern = load_triton_module("_lookup_triton")
        table, idx, w = ctx.saved_tensors
        n, d = table.shape
        go = grad_out.reshape(idx.shape[0], d).contiguous()
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_values = kern.lookup_backward_values(idx, w, go, n, table.dtype)
        if ctx.needs_input_grad[2]:
            grad_weights = kern.lookup_backward_weights(table, idx, go, w.dtype)
            grad_weights = grad_weights.reshape(ctx.w_shape)
        return grad_values, None, grad_weights


def memory_lookup(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted gather-sum of value rows with Triton kernels (autograd-aware).

    Args:
        values: (N, D) value table (usually an ``nn.Parameter``), fp32, fp16 or bf16, on
            CUDA (or CPU under ``TRITON_INTERPRET=1``). Any row stride works; a table without
            unit stride along D is copied first.
        indices: (..., K) integer slot ids in ``[0, N)`` (not range-checked except in
            :func:`knowedit.kernels.debug_mode`; out-of-range ids read arbitrary memory).
        weights: (..., K) fp32, fp16 or bf16 weights.

    Returns:
        (..., D) tensor in ``values.dtype``: ``sum_k weights[..., k] * values[indices[..., k]]``
        accumulated in fp32. Backward gives ``values`` a coalesced sparse COO gradient (only
        the distinct touched rows) and ``weights`` a dense one; see the module docstring.

    Raises:
        RuntimeError: Triton is not importable.
        ValueError: Tensors on CPU without ``TRITON_INTERPRET=1``, or bad shapes/devices.
        TypeError: Unsupported dtypes.
    """
    return _MemoryLookupTriton.apply(values, indices, weights)


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 if any input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _ref_chunk(k: int, d: int) -> int:
    """Tokens per chunk so that a (chunk, K, D) intermediate stays below the budget."""
    return max(1, _REF_CHUNK_ELEMS // max(1, k * d))


def _ref_forward(table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(M, D) output of the reference, accumulated in fp32 (fp64 for fp64 inputs)."""
    m, k = idx.shape
    d = table.shape[1]
    acc = _acc_dtype(table, w)
    if m == 0 or k == 0 or d == 0:
        return torch.zeros(m, d, dtype=table.dtype, device=table.device)
    if table.dtype == acc and w.dtype == acc and table.is_contiguous():
        # No upcast needed: embedding_bag never materialises the (M, K, D) gather (it would
        # copy a non-contiguous table, hence the contiguity condition).
        return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    out = torch.empty(m, d, dtype=table.dtype, device=table.device)
    step = _ref_chunk(k, d)
    for s in range(0, m, step):
        rows = F.embedding(idx[s : s + step], table).to(acc)  # (c, K, D)
        wc = w[s : s + step].to(acc).unsqueeze(1)  # (c, 1, K)
        out[s : s + step] = torch.bmm(wc, rows).squeeze(1).to(table.dtype)
    return out


def _ref_grad_weights(
    table: torch.Tensor, idx: torch.Tensor, go: torch.Tensor, w_dtype: torch.dtype
) -> torch.Tensor:
    """(M, K) gradient of the weights: <grad_out[m], values[idx[m, k]]>."""
    m, k = idx.shape
    d = table.shape[1]
    acc = _acc_dtype(table, go)
    gw = torch.zeros(m, k, dtype=w_dtype, device=table.device)
    if m == 0 or k == 0 or d == 0:
        return gw
    step = _ref_chunk(k, d)
    for s in range(0, m, step):
        rows = F.embedding(idx[s : s + step], table).to(acc)  # (c, K, D)
        gc = go[s : s + step].to(acc).unsqueeze(-1)  # (c, D, 1)
        gw[s : s + step] = torch.bmm(rows, gc).squeeze(-1).to(w_dtype)
    return gw


def _ref_grad_values(
    idx: torch.Tensor, w: torch.Tensor, go: torch.Tensor, num_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """Coalesced sparse (N, D) gradient of the values: rows summed over their slots.

    With ``A`` the sparse (U, M) matrix ``A[u, m] = sum of w[m, k] over k with
    idx[m, k] == uniq[u]``, the gradient rows are ``A @ grad_out``: one sparse-dense
    matmul, no (M, K, D) intermediate.
    """
    m, k = idx.shape
    d = go.shape[1]
    acc = _acc_dtype(w, go)
    uniq, inverse = torch.unique(idx.reshape(-1), sorted=True, return_inverse=True)
    if uniq.numel() and d:
        tokens = torch.arange(m, device=go.device).repeat_interleave(k)
        a = torch.sparse_coo_tensor(
            torch.stack([inverse.reshape(-1), tokens]),
            w.reshape(-1).to(acc),
            (uniq.numel(), m),
            check_invariants=False,
        )
        rows = torch.sparse.mm(a, go.to(acc))
    else:
        rows = torch.zeros(uniq.numel(), d, dtype=acc, device=go.device)
    return torch.sparse_coo_tensor(
        uniq.unsqueeze(0), rows.to(dtype), (num_rows, d), is_coalesced=True, check_invariants=False
    )


class _MemoryLookupRef(torch.autograd.Function):
    """Autograd wrapper over the pure-PyTorch reference."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        idx, w, lead = _flatten_inputs(values, indices, weights)
        _check_index_range(idx, values.shape[0])
        out = _ref_forward(values, idx, w)
        ctx.save_for_backward(values, idx, w)
        ctx.w_shape = weights.shape
        return out.reshape(*lead, values.shape[1])

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        table, idx, w = ctx.saved_tensors
        n, d = table.shape
        go = grad_out.reshape(idx.shape[0], d)
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_values = _ref_grad_values(idx, w, go, n, table.dtype)
        if ctx.needs_input_grad[2]:
            grad_weights = _ref_grad_weights(table, idx, go, w.dtype).reshape(ctx.w_shape)
        return grad_values, None, grad_weights


def memory_lookup_ref(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`memory_lookup` (same outputs and gradient layout).

    Works on any device and for fp64 too. Intermediates are bounded by processing tokens in
    chunks (at most ~2^24 gathered elements at a time); fp32 inputs use
    ``F.embedding_bag`` and never materialise the gather.

    Args:
        values: (N, D) value table.
        indices: (..., K) integer slot ids in ``[0, N)`` (range-checked, IndexError).
        weights: (..., K) float weights.

    Returns:
        (..., D) tensor in ``values.dtype``; backward gives ``values`` a coalesced sparse COO
        gradient over the distinct touched rows, ``weights`` a dense gradient.
    """
    return _MemoryLookupRef.apply(values, indices, weights)


# --------------------------------------------------------------------------- embedding-bag path

_BAG_DTYPES = (torch.float32, torch.float64)


def bag_applies(values: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether :func:`memory_lookup_bag` handles these inputs exactly like the reference.

    ``embedding_bag`` accumulates in the table's dtype, so the path is taken where that is
    the reference's accumulation dtype (fp32, fp64) and the weights share it; a table without
    unit strides would be copied on every call.
    """
    return (
        values.dtype in _BAG_DTYPES
        and weights.dtype == values.dtype
        and values.dim() == 2
        and values.is_contiguous()
    )


# Value-gradient row buffers at least this large (bytes) are kept and reused: glibc serves
# larger allocations with a fresh mmap, and page-faulting a 250 MB gradient in and out on
# every step costs ~10x writing it (measured: 221 ms vs 23 ms for 256 MB on one core).
_REUSE_MIN_BYTES = 32 << 20
# Elements per embedding_bag call when writing into a reused buffer: 1 MiB in fp32, so
# each part is copied out of L2 (1.6x faster than 4 MiB parts at 64K slots, 1.2x at 1M).
_ROW_CHUNK_ELEMS = 1 << 18


class _RowBuffers:
    """One reusable (rows, D) buffer per (device, dtype, D) for value-gradient rows.

    :func:`scatter_rows` hands out a view of the buffer as the sparse gradient's values.
    The buffer is reused only when nothing but this cache references its storage (the last
    gradient was freed, e.g. by ``zero_grad(set_to_none=True)``); otherwise a fresh buffer
    is allocated, so a gradient that is still alive is never overwritten.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bufs: dict[tuple[str, torch.dtype, int], tuple[torch.Tensor, int]] = {}

    @staticmethod
    def _refs(buf: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)

    def take(self, rows: int, d: int, like: torch.Tensor) -> torch.Tensor | None:
        """A (rows, d) view of a free cached buffer, or None below the size threshold."""
        size = rows * d * like.element_size()
        if size < _REUSE_MIN_BYTES or not hasattr(torch._C, "_storage_Use_Count"):
            return None
        key = (str(like.device), like.dtype, d)
        with self._lock:
            held = self._bufs.get(key)
            if held is not None:
                buf, idle_refs = held
                if buf.shape[0] >= rows and self._refs(buf) == idle_refs:
                    return buf[:rows]
            # 1/8 headroom: the number of distinct rows varies a little from step to step.
            buf = torch.empty(rows + rows // 8, d, dtype=like.dtype, device=like.device)
            self._bufs[key] = (buf, self._refs(buf))
            return buf[:rows]

    def clear(self) -> None:
        """Drop every cached buffer (their memory is freed once no gradient uses it)."""
        with self._lock:
            self._bufs.clear()


_row_buffers = _RowBuffers()


def _sort_entries(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries of (M, K) ``idx`` in ascending slot order.

    Returns:
        ``(ids, order, bag)``: (M*K,) sorted ids, the flat position of each and its row m.
    """
    ids, order = torch.sort(idx.reshape(-1))
    return ids, order, torch.div(order, idx.shape[1], rounding_mode="floor")


def gather_dot(
    rows: torch.Tensor,
    table: torch.Tensor,
    idx: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``out[m, k] = <rows[m], table[idx[m, k]]>`` without materialising the gather.

    This is the weight gradient of ``embedding_bag``: ATen's fused per-sample-weights
    backward reads each indexed row once and dots it with its bag's row. The entries are
    visited in ascending slot order, so the table is read front to back (2-3x faster than
    token order once it no longer fits in cache).

    Args:
        rows: (M, D) one row per bag.
        table: (N, D) contiguous table, same dtype.
        idx: (M, K) int64 ids in ``[0, N)``.
        entries: :func:`_sort_entries` of ``idx`` if already computed.

    Returns:
        (M, K) dot products in ``table.dtype``.
    """
    m, k = idx.shape
    ids, order, bag = entries if entries is not None else _sort_entries(idx)
    # In "sum" mode ATen reads only ``bag`` (offset2bag); ``offsets`` is passed for the schema.
    offsets = torch.arange(0, m * k, k, device=idx.device)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.contiguous(), table, ids, offsets, bag, 0, -1
    )
    out = torch.empty(m * k, dtype=dots.dtype, device=dots.device)
    out[order] = dots
    return out.reshape(m, k)


def scatter_rows(
    idx: torch.Tensor,
    w: torch.Tensor,
    rows: torch.Tensor,
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose of the weighted gather-sum: per distinct id, the weighted sum of bag rows.

    ``out[u] = sum over (m, k) with idx[m, k] == uniq[u] of w[m, k] * rows[m]``: the ids
    sorted once, then ``embedding_bag`` over ``rows`` with one bag per distinct id. Large
    outputs are written, chunk by chunk, into a reused buffer (:class:`_RowBuffers`).

    Args:
        idx: (M, K) int64 ids.
        w: (M, K) weights, ``rows.dtype``.
        rows: (M, D) one row per bag.
        entries: :func:`_sort_entries` of ``idx`` if already computed.

    Returns:
        ``(uniq, out)``: (U,) ascending distinct ids and (U, D) summed rows.
    """
    total, d = idx.numel(), rows.shape[1]
    ids, order, bag = entries if entries is not None else _sort_entries(idx)
    uniq, counts = torch.unique_consecutive(ids, return_counts=True)
    offsets = counts.cumsum(0) - counts  # first entry of each distinct id
    ws = w.reshape(-1)[order]
    rows = rows.contiguous()
    u = uniq.numel()
    out = _row_buffers.take(u, d, rows)
    if out is None:
        return uniq, F.embedding_bag(bag, rows, offsets, mode="sum", per_sample_weights=ws)
    step = max(1, _ROW_CHUNK_ELEMS // max(1, d))
    starts = offsets[step::step].tolist()  # first entry of each chunk after the first
    lo = 0
    for j, s in enumerate(range(0, u, step)):
        hi = starts[j] if j < len(starts) else total
        part = F.embedding_bag(
            bag[lo:hi], rows, offsets[s : s + step] - lo, mode="sum", per_sample_weights=ws[lo:hi]
        )
        out[s : s + step].copy_(part)
        lo = hi
    return uniq, out


class _MemoryLookupBag(torch.autograd.Function):
    """Autograd wrapper over the fused ``embedding_bag`` loops (forward and both gradients)."""

    @staticmethod
    def forward(
        ctx: Any, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        idx, w, lead = _flatten_inputs(values, indices, weights)
        _check_index_range(idx, values.shape[0])
        m, k = idx.shape
        d = values.shape[1]
        if m == 0 or k == 0 or d == 0:
            out = torch.zeros(m, d, dtype=values.dtype, device=values.device)
        else:
            out = F.embedding_bag(idx, values, per_sample_weights=w, mode="sum")  # (M, D)
        ctx.save_for_backward(values, idx, w)
        ctx.w_shape = weights.shape
        return out.reshape(*lead, d)

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        table, idx, w = ctx.saved_tensors
        n, d = table.shape
        m, k = idx.shape
        go = grad_out.reshape(m, d).to(table.dtype)
        grad_values = grad_weights = None
        empty = m == 0 or k == 0 or d == 0
        # One sort of the M*K ids serves both gradients.
        entries = None if empty else _sort_entries(idx)
        if ctx.needs_input_grad[0]:
            if empty:
                grad_values = _ref_grad_values(idx, w, go, n, table.dtype)
            else:
                uniq, rows = scatter_rows(idx, w, go, entries)
                grad_values = torch.sparse_coo_tensor(
                    uniq.unsqueeze(0), rows, (n, d), is_coalesced=True, check_invariants=False
                )
        if ctx.needs_input_grad[2]:
            if empty:
                grad_weights = torch.zeros(m, k, dtype=w.dtype, device=w.device)
            else:
                grad_weights = gather_dot(go, table, idx, entries)
            grad_weights = grad_weights.reshape(ctx.w_shape)
        return grad_values, None, grad_weights


def memory_lookup_bag(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted gather-sum on fused ``embedding_bag`` loops (the ``torch`` backend's fast path).

    Same outputs and gradient layout as :func:`memory_lookup_ref`, on any device; each of
    forward, weight gradient and value gradient reads every gathered row once and never
    materialises an (M, K, D) gather (see the module docstring).

    Args:
        values: (N, D) contiguous fp32 or fp64 table.
        indices: (..., K) integer slot ids in ``[0, N)`` (range-checked, IndexError).
        weights: (..., K) weights in ``values.dtype``.

    Returns:
        (..., D) tensor in ``values.dtype``; backward gives ``values`` a coalesced sparse COO
        gradient over the distinct touched rows, ``weights`` a dense gradient.

    Raises:
        ValueError: Inputs outside :func:`bag_applies` (use :func:`memory_lookup_ref`).
    """
    if not bag_applies(values, weights):
        raise ValueError(
            "memory_lookup_bag needs a contiguous fp32/fp64 table and weights of the same "
            f"dtype, got values {values.dtype} (contiguous={values.is_contiguous()}) and "
            f"weights {weights.dtype}; use memory_lookup_ref"
        )
    return _MemoryLookupBag.apply(values, indices, weights)


def lookup(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted memory lookup dispatched to Triton or the PyTorch reference.

    Args:
        values: (N, D) value table.
        indices: (..., K) integer slot ids.
        weights: (..., K) float weights.
        backend: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or
            ``"triton"`` (see :func:`knowedit.kernels.resolve_backend`). ``torch`` runs
            :func:`memory_lookup_bag` where :func:`bag_applies`, else the reference.

    Returns:
        (..., D) tensor in ``values.dtype``.
    """
    if resolve_backend(backend, values.device) == "triton":
        return memory_lookup(values, indices, weights)
    if bag_applies(values, weights):
        return memory_lookup_bag(values, indices, weights)
    return memory_lookup_ref(values, indices, weights)
