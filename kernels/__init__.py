"""Triton kernels for product-key memory layers, with pure-PyTorch references.

Public API:

* :func:`memory_lookup` (Triton) / :func:`memory_lookup_ref` (torch) / :func:`lookup`
  (dispatch): ``out[..., :] = sum_k weights[..., k] * values[indices[..., k], :]`` with a
  coalesced sparse COO gradient for ``values``.
* :func:`sparse_sgd_step_`, :func:`rowwise_adagrad_step_` (Triton) and their ``*_ref``
  references; :class:`SparseSGD` and :class:`RowwiseAdagrad` optimizers.
* :func:`resolve_backend`, :func:`triton_available`, :func:`debug_mode`.

Importing this package never imports Triton; the kernels are loaded on first use, so the
package works (torch backend) on machines without Triton. See ``docs/kernels.md``.
"""

from ._common import BACKENDS, debug_mode, resolve_backend, triton_available
from .lookup import lookup, memory_lookup, memory_lookup_ref
from .optim import (
    RowwiseAdagrad,
    SparseSGD,
    rowwise_adagrad_step_,
    rowwise_adagrad_step_ref,
    sparse_sgd_step_,
    sparse_sgd_step_ref,
)

__all__ = [
    "BACKENDS",
    "RowwiseAdagrad",
    "SparseSGD",
    "debug_mode",
    "lookup",
    "memory_lookup",
    "memory_lookup_ref",
    "resolve_backend",
    "rowwise_adagrad_step_",
    "rowwise_adagrad_step_ref",
    "sparse_sgd_step_",
    "sparse_sgd_step_ref",
    "triton_available",
]
