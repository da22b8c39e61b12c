"""Fused sparse optimizer steps for memory value tables.

A sparse (N, D) COO gradient (as produced by :func:`knowedit.kernels.memory_lookup` or
``nn.Embedding(sparse=True)``) touches U << N rows; these steps update exactly those rows
in place, at a cost of O(U * D) independent of N, and leave every other row bit-identical.

* :func:`sparse_sgd_step_` / :func:`sparse_sgd_step_ref`: ``v_r -= lr * g_r``.
* :func:`rowwise_adagrad_step_` / :func:`rowwise_adagrad_step_ref` (FBGEMM row-wise
  AdaGrad): ``state[r] += mean(g_r ** 2)``; ``v_r -= lr * g_r / (sqrt(state[r]) + eps)``.
* :class:`SparseSGD` and :class:`RowwiseAdagrad`: ``torch.optim.Optimizer`` wrappers that
  pick the Triton kernel or the torch reference per parameter (``backend`` argument).

Updates are computed in fp32 (fp64 for fp64 tables in the references) and rounded once to
the table's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._common import BACKENDS, load_triton_module, resolve_backend

__all__ = [
    "RowwiseAdagrad",
    "SparseSGD",
    "rowwise_adagrad_step_",
    "rowwise_adagrad_step_ref",
    "sparse_sgd_step_",
    "sparse_sgd_step_ref",
]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _sparse_rows(values: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a sparse row gradient and return its rows.

    Args:
        values: (N, D) table.
        grad: Sparse COO (N, D) gradient with ``sparse_dim == 1``; coalesced here if needed.

    Returns:
        ``(rows, g)``: (U,) contiguous int64 distinct row ids and (U, D) gradient rows with
        unit stride along D.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (N, D), got shape {tuple(values.shape)}")
    if not grad.is_sparse:
        raise TypeError(f"grad must be a sparse COO tensor, got layout {grad.layout}")
    if grad.shape != values.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != values shape {tuple(values.shape)}")
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"grad must be sparse over rows only (sparse_dim == 1), got sparse_dim "
            f"{grad.sparse_dim()}"
        )
    if grad.device != values.device:
        raise ValueError(f"grad on {grad.device} but values on {values.device}")
    if not grad.is_coalesced():
        grad = grad.coalesce()
    rows = grad.indices()[0].contiguous()
    g = grad.values()
    if g.dim() != 2 or g.stride(1) != 1:
        g = g.reshape(rows.numel(), values.shape[1]).contiguous()
    return rows, g


def _check_state(state: torch.Tensor, values: torch.Tensor) -> None:
    if state.shape != (values.shape[0],) or state.dtype != torch.float32:
        raise ValueError(
            f"state must be an fp32 tensor of shape ({values.shape[0]},), got "
            f"{state.dtype} {tuple(state.shape)}"
        )
    if state.device != values.device or not state.is_contiguous():
        raise ValueError("state must be contiguous and on the device of values")


def _acc(values: torch.Tensor) -> torch.dtype:
    return torch.float64 if values.dtype == torch.float64 else torch.float32


@torch.no_grad()
def sparse_sgd_step_ref(values: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """Reference sparse SGD step, in place: ``values[r] -= lr * grad[r]`` for touched rows.

    Args:
        values: (N, D) table (e.g. an ``nn.Parameter``), updated in place.
        grad: Sparse COO (N, D) gradient, ``sparse_dim == 1``.
        lr: Learning rate.
    """
    rows, g = _sparse_rows(values, grad)
    if rows.numel() == 0:
        return
    acc = _acc(values)
    cur = values.index_select(0, rows).to(acc)
    values.index_copy_(0, rows, (cur - lr * g.to(acc)).to(values.dtype))


@torch.no_grad()
def rowwise_adagrad_step_ref(
    values: torch.Tensor,
    state: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float = 1e-10,
) -> None:
    """Reference row-wise AdaGrad step (FBGEMM semantics), in place.

    For every touched row ``r``: ``state[r] += mean(g_r ** 2)``, then
    ``values[r] -= g_r * (lr / (sqrt(state[r]) + eps))``.

    Args:
        values: (N, D) table, updated in place.
        state: (N,) fp32 accumulated mean squared gradient, updated in place.
        grad: Sparse COO (N, D) gradient, ``sparse_dim == 1``.
        lr: Learning rate.
        eps: Added to ``sqrt(state[r])``.
    """
    _check_state(state, values)
    rows, g = _sparse_rows(values, grad)
    if rows.numel() == 0 or values.shape[1] == 0:
        return
    acc = _acc(values)
    g = g.to(acc)
    s = state.index_select(0, rows) + g.square().mean(1).to(torch.float32)
    state.index_copy_(0, rows, s)
    scale = (lr / (s.sqrt() + eps)).to(acc)
    cur = values.index_select(0, rows).to(acc)
    values.index_copy_(0, rows, (cur - g * scale.unsqueeze(1)).to(values.dtype))


def _triton_optim(values: torch.Tensor) -> Any:
    resolve_backend("triton", values.device)
    kern = load_triton_module("_optim_triton")
    if values.dtype not in _TRITON_DTYPES:
        raise TypeError(f"Triton optimizer steps support {_TRITON_DTYPES}, got {values.dtype}")
    return kern


@torch.no_grad()
def sparse_sgd_step_(values: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """Fused Triton sparse SGD step, in place (same semantics as :func:`sparse_sgd_step_ref`).

    Args:
        values: (N, D) fp32/fp16/bf16 table, updated in place; CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        grad: Sparse COO (N, D) gradient, ``sparse_dim == 1`` (coalesced here if needed).
        lr: Learning rate.

    Raises:
        RuntimeError: Triton is not importable.
        ValueError: CPU tensors without the interpreter, or bad shapes.
    """
    kern = _triton_optim(values)
    rows, g = _sparse_rows(values, grad)
    kern.sparse_sgd(values, rows, g, lr)


@torch.no_grad()
def rowwise_adagrad_step_(
    values: torch.Tensor,
    state: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float = 1e-10,
) -> None:
    """Fused Triton row-wise AdaGrad step, in place (see :func:`rowwise_adagrad_step_ref`).

    Args:
        values: (N, D) fp32/fp16/bf16 table, updated in place.
        state: (N,) fp32 accumulated mean squared gradient, updated in place.
        grad: Sparse COO (N, D) gradient, ``sparse_dim == 1`` (coalesced here if needed).
        lr: Learning rate.
        eps: Added to ``sqrt(state[r])``.

    Raises:
        RuntimeError: Triton is not importable.
        ValueError: CPU tensors without the interpreter, or bad shapes.
    """
    kern = _triton_optim(values)
    _check_state(state, values)
    rows, g = _sparse_rows(values, grad)
    kern.rowwise_adagrad(values, state, rows, g, lr, eps)


ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


class SparseSGD(torch.optim.Optimizer):
    """Plain SGD whose cost on sparse row gradients depends on the touched rows only.

    Sparse COO gradients (``nn.Embedding(sparse=True)``, :func:`memory_lookup`) use
    :func:`sparse_sgd_step_` (Triton) or :func:`sparse_sgd_step_ref`; dense gradients fall
    back to ``p.add_(grad, alpha=-lr)``.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        backend: ``"auto"`` (Triton for CUDA params when available), ``"torch"`` or
            ``"triton"`` (CPU only under ``TRITON_INTERPRET=1``).
    """

    def __init__(self, params: ParamsT, lr: float = 1e-2, backend: str = "auto") -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        _check_backend(backend)
        super().__init__(params, {"lr": lr, "backend": backend})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Optional closure re-evaluating the model and returning the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    p.add_(p.grad.to(p.dtype), alpha=-lr)
                elif resolve_backend(group["backend"], p.device) == "triton":
                    sparse_sgd_step_(p, p.grad, lr)
                else:
                    sparse_sgd_step_ref(p, p.grad, lr)
        return loss


class RowwiseAdagrad(torch.optim.Optimizer):
    """Row-wise AdaGrad (FBGEMM style) for 2-D value tables.

    Keeps one fp32 accumulator per row (``state[p]["sum"]``, shape (N,)). Sparse gradients
    update only the touched rows (Triton :func:`rowwise_adagrad_step_` or the reference);
    a dense gradient is converted with ``to_sparse(1)``, which is equivalent because an
    all-zero row leaves both its accumulator and its values unchanged.

    Args:
        params: Parameters (2-D) or parameter groups.
        lr: Learning rate.
        eps: Added to ``sqrt(state)``.
        initial_accumulator_value: Initial value of every row's accumulator.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :class:`SparseSGD`).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        backend: str = "auto",
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0 or initial_accumulator_value < 0.0:
            raise ValueError("eps and initial_accumulator_value must be non-negative")
        _check_backend(backend)
        defaults = {
            "lr": lr,
            "eps": eps,
            "initial_accumulator_value": initial_accumulator_value,
            "backend": backend,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowwiseAdagrad needs 2-D params, got {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the row accumulators stay fp32.

        ``torch.optim.Optimizer`` casts floating state to its parameter's dtype, which
        for a bf16/fp16 table would round the fp32 accumulators (and the steps refuse them).
        """
        sums = {i: s["sum"] for i, s in state_dict["state"].items() if "sum" in s}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, total in sums.items():
            p = params[i]
            self.state[p]["sum"] = total.to(device=p.device, dtype=torch.float32).contiguous()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient.

        Args:
            closure: Optional closure re-evaluating the model and returning the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = float(group["lr"]), float(group["eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full(
                        (p.shape[0],),
                        float(group["initial_accumulator_value"]),
                        dtype=torch.float32,
                        device=p.device,
                    )
                grad = p.grad if p.grad.is_sparse else p.grad.to_sparse(1)
                if resolve_backend(group["backend"], p.device) == "triton":
                    rowwise_adagrad_step_(p, state["sum"], grad, lr, eps)
                else:
                    rowwise_adagrad_step_ref(p, state["sum"], grad, lr, eps)
        return loss
