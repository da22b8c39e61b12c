"""Weighted memory lookup: ``out[..., :] = sum_k weights[..., k] * values[indices[..., k], :]``.

Three entry points share one contract (forward values and sparse value gradient):

* :func:`memory_lookup` -- Triton kernels wrapped in a ``torch.autograd.Function``.
* :func:`memory_lookup_ref` -- pure-PyTorch reference (the ``torch`` backend).
* :func:`lookup` -- dispatches between the two via :func:`resolve_backend`.

Gradient contract (both implementations): the gradient with respect to ``values`` is a
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
from typing import Any

import torch
import torch.nn.functional as F

from ._common import debug_enabled, load_triton_module, resolve_backend

__all__ = ["lookup", "memory_lookup", "memory_lookup_ref"]

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
            ``"triton"`` (see :func:`knowedit.kernels.resolve_backend`).

    Returns:
        (..., D) tensor in ``values.dtype``.
    """
    if resolve_backend(backend, values.device) == "triton":
        return memory_lookup(values, indices, weights)
    return memory_lookup_ref(values, indices, weights)
