"""Triton kernels (and launchers) for fused sparse optimizer steps on value rows.

Imported lazily by :mod:`knowedit.kernels.optim`. Every kernel takes the coalesced rows of
a sparse (N, D) gradient -- ``rows`` (U,) distinct row ids and ``grad`` (U, D) -- and
updates only those rows of the value table in place, so the cost is O(U * D), independent
of N. Math is in fp32 (IEEE-rounded sqrt and division), the result is cast back to the
table's dtype on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_power_of_2

_NUM_WARPS = 4


@triton.jit
def sparse_sgd_kernel(
    values_ptr,
    rows_ptr,
    grad_ptr,
    lr,
    D,
    stride_vn,
    stride_vd,
    stride_gn,
    BLOCK_D: tl.constexpr,
):
    """values[rows[u], d] -= lr * grad[u, d]; grid (U, cdiv(D, BLOCK_D))."""
    u = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = tl.load(rows_ptr + u)
    v_ptrs = values_ptr + row * stride_vn + offs_d * stride_vd
    v = tl.load(v_ptrs, mask=mask_d, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + u * stride_gn + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(v_ptrs, (v - lr * g).to(values_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def rowwise_adagrad_kernel(
    values_ptr,
    state_ptr,
    rows_ptr,
    grad_ptr,
    lr,
    eps,
    D,
    stride_vn,
    stride_vd,
    stride_gn,
    BLOCK_D: tl.constexpr,
):
    """Row-wise AdaGrad on row ``rows[u]``; grid (U,).

    ``state[r] += mean_d(g[d]^2)``, then ``values[r, d] -= g[d] * (lr / (sqrt(state[r]) +
    eps))``. Two passes over D (sum of squares, update); the row's gradient is re-read from
    cache in the second pass.
    """
    u = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + u)
    g_row = grad_ptr + u * stride_gn
    sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        g = tl.load(g_row + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        sq += g * g
    s = tl.load(state_ptr + row) + tl.sum(sq, axis=0) / D
    tl.store(state_ptr + row, s)
    scale = tl.math.div_rn(lr, tl.sqrt_rn(s) + eps)
    v_row = values_ptr + row * stride_vn
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(g_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        v = tl.load(v_row + offs_d * stride_vd, mask=mask_d, other=0.0).to(tl.float32)
        tl.store(
            v_row + offs_d * stride_vd,
            (v - g * scale).to(values_ptr.dtype.element_ty),
            mask=mask_d,
        )


def sparse_sgd(values: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """Launch :func:`sparse_sgd_kernel`.

    Args:
        values: (N, D) table, updated in place.
        rows: (U,) contiguous int64 distinct row ids.
        grad: (U, D) gradient rows, unit stride along D.
        lr: Learning rate.
    """
    n_rows, d = grad.shape
    if n_rows == 0 or d == 0:
        return
    block_d = min(next_power_of_2(d), 1024)
    grid = (n_rows, triton.cdiv(d, block_d))
    sparse_sgd_kernel[grid](
        values, rows, grad, float(lr), d, values.stride(0), values.stride(1), grad.stride(0),
        BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )  # fmt: skip


def rowwise_adagrad(
    values: torch.Tensor,
    state: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float,
) -> None:
    """Launch :func:`rowwise_adagrad_kernel`.

    Args:
        values: (N, D) table, updated in place.
        state: (N,) contiguous fp32 accumulator, updated in place.
        rows: (U,) contiguous int64 distinct row ids.
        grad: (U, D) gradient rows, unit stride along D.
        lr: Learning rate.
        eps: Added to ``sqrt(state)``.
    """
    n_rows, d = grad.shape
    if n_rows == 0 or d == 0:
        return
    block_d = min(next_power_of_2(d), 2048)
    rowwise_adagrad_kernel[(n_rows,)](
        values, state, rows, grad, float(lr), float(eps), d,
        values.stride(0), values.stride(1), grad.stride(0),
        BLOCK_D=block_d, num_warps=_NUM_WARPS,
    )  # fmt: skip
