"""Triton kernels (and their launchers) for the weighted memory lookup.

Imported lazily by :mod:`knowedit.kernels.lookup` (see :mod:`knowedit.kernels._common`
for why). All kernels accumulate in fp32 and cast on store. ``K`` (slots per token) and
``D`` (value width) are runtime arguments: ``K`` is looped over in blocks of ``BLOCK_K``
and ``D`` tiled in blocks of ``BLOCK_D``, both masked, so neither needs to be a power of
two.

Shapes below use ``M`` for the number of tokens (all leading dims flattened), ``K`` for
slots per token, ``N`` for value rows, ``D`` for the value width and ``U`` for the number
of distinct slot ids in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import alloc_output, next_power_of_2


@triton.jit
def lookup_fwd_kernel(
    values_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    stride_vn,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[m, d] = sum_k w[m, k] * values[idx[m, k], d]; grid (M, cdiv(D, BLOCK_D))."""
    m = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(idx_ptr + m * K + offs_k, mask=mask_k, other=0)
        w = tl.load(w_ptr + m * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(
            values_ptr + idx[:, None] * stride_vn + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    tl.store(out_ptr + m * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def lookup_bwd_weights_kernel(
    values_ptr,
    idx_ptr,
    gout_ptr,
    gw_ptr,
    K,
    D,
    stride_vn,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """gw[m, k] = <gout[m, :], values[idx[m, k], :]>; grid (M, cdiv(K, BLOCK_K))."""
    m = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + m * K + offs_k, mask=mask_k, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(gout_ptr + m * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        v = tl.load(
            values_ptr + idx[:, None] * stride_vn + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(v * g[None, :], axis=1)
    tl.store(gw_ptr + m * K + offs_k, acc.to(gw_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def lookup_bwd_values_kernel(
    gout_ptr,
    w_ptr,
    perm_ptr,
    seg_ptr,
    grows_ptr,
    K,
    D,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grows[u, d] = sum over flat slots j of row u of w[j] * gout[j // K, d].

    ``perm`` lists the flat slot positions sorted by slot id and ``seg[u]:seg[u + 1]`` is
    the segment of row ``u``; one program reduces one (row, D tile), reading its
    contributions ``BLOCK_S`` at a time. Grid (U, cdiv(D, BLOCK_D)).
    """
    u = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(seg_ptr + u)
    end = tl.load(seg_ptr + u + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        j = tl.load(perm_ptr + offs_s, mask=mask_s, other=0)
        tok = j // K
        w = tl.load(w_ptr + j, mask=mask_s, other=0.0).to(tl.float32)
        g = tl.load(
            gout_ptr + tok[:, None] * D + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(g * w[:, None], axis=0)
    tl.store(grows_ptr + u * D + offs_d, acc.to(grows_ptr.dtype.element_ty), mask=mask_d)


def lookup_forward(
    values: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    *,
    block_k: int = 16,
    block_d: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """Launch :func:`lookup_fwd_kernel`.

    Args:
        values: (N, D) value table, unit stride along D.
        idx: (M, K) contiguous int64 slot ids in ``[0, N)``.
        w: (M, K) contiguous float weights.
        block_k, block_d, num_warps: launch configuration (powers of two; ``block_k``
            and ``block_d`` are capped at the next power of two of K and D). The defaults
            were the fastest of ``bench/lookup_kernels.py --sweep`` on an H200 at N = 2^20,
            T = 16384, K = 128, D = 1024, bf16 (docs/benchmarks.md, "GPU lookup kernels").

    Returns:
        (M, D) output in ``values.dtype``.
    """
    m, k = idx.shape
    d = values.shape[1]
    out = alloc_output((m, d), values.dtype, values.device)
    if m == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    block_d = min(next_power_of_2(d), block_d)
    block_k = min(next_power_of_2(k), block_k)
    grid = (m, triton.cdiv(d, block_d))
    lookup_fwd_kernel[grid](
        values, idx, w, out, k, d, values.stride(0),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


def lookup_backward_weights(
    values: torch.Tensor,
    idx: torch.Tensor,
    grad_out: torch.Tensor,
    w_dtype: torch.dtype,
    *,
    block_k: int = 32,
    block_d: int = 128,
    num_warps: int = 8,
) -> torch.Tensor:
    """Launch :func:`lookup_bwd_weights_kernel`.

    Args:
        values: (N, D) value table, unit stride along D.
        idx: (M, K) contiguous int64 slot ids.
        grad_out: (M, D) contiguous gradient of the output.
        w_dtype: dtype of the weights (and of the returned gradient).
        block_k, block_d, num_warps: launch configuration, chosen as in
            :func:`lookup_forward`.

    Returns:
        (M, K) gradient with respect to the weights.
    """
    m, k = idx.shape
    d = values.shape[1]
    gw = alloc_output((m, k), w_dtype, values.device)
    if m == 0 or k == 0:
        return gw
    if d == 0:
        return gw.zero_()
    block_d = min(next_power_of_2(d), block_d)
    block_k = min(next_power_of_2(k), block_k)
    grid = (m, triton.cdiv(k, block_k))
    lookup_bwd_weights_kernel[grid](
        values, idx, grad_out, gw, k, d, values.stride(0),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return gw


def lookup_backward_values(
    idx: torch.Tensor,
    w: torch.Tensor,
    grad_out: torch.Tensor,
    num_rows: int,
    dtype: torch.dtype,
    *,
    block_s: int = 4,
    block_d: int = 1024,
    num_warps: int = 2,
) -> torch.Tensor:
    """Sparse gradient with respect to the value table.

    Sorts the flat slot ids (stably, so the result is deterministic), finds the unique ids
    and their segments, then launches :func:`lookup_bwd_values_kernel` with one program per
    (unique row, D tile). Never allocates an (N, D) buffer.

    Args:
        idx: (M, K) contiguous int64 slot ids.
        w: (M, K) contiguous float weights.
        grad_out: (M, D) contiguous gradient of the output.
        num_rows: N, the number of rows of the value table.
        dtype: dtype of the value table (and of the gradient's values).
        block_s, block_d, num_warps: launch configuration (contributions read at a
            time, D tile, warps), chosen as in :func:`lookup_forward`.

    Returns:
        Coalesced sparse COO tensor of shape (N, D) with ``sparse_dim == 1``: indices
        (1, U) sorted ascending, values (U, D).
    """
    k = idx.shape[1]
    d = grad_out.shape[1]
    device = grad_out.device
    flat = idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    n_unique = uniq.numel()
    rows = alloc_output((n_unique, d), dtype, device)
    if n_unique > 0 and d > 0:
        seg = torch.zeros(n_unique + 1, dtype=torch.int64, device=device)
        torch.cumsum(counts, 0, out=seg[1:])
        block_d = min(next_power_of_2(d), block_d)
        grid = (n_unique, triton.cdiv(d, block_d))
        lookup_bwd_values_kernel[grid](
            grad_out, w, perm, seg, rows, k, d,
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    return torch.sparse_coo_tensor(
        uniq.unsqueeze(0), rows, (num_rows, d), is_coalesced=True, check_invariants=False
    )
