"""Shared helpers for :mod:`knowedit.kernels`: backend resolution, debug mode, allocation.

Triton is never imported at import time of this package. Triton 3.x decides whether a
``@triton.jit`` function is compiled or interpreted when the function is *decorated*
(``TRITON_INTERPRET`` is read then), so the modules holding the kernels
(``_lookup_triton``, ``_optim_triton``) are imported lazily, on first use, through
:func:`load_triton_module`. Tests can therefore set ``TRITON_INTERPRET=1`` in a
``conftest.py`` even when another test module imported ``torch``, ``triton`` or
``knowedit.kernels`` first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton", "auto")

_DEBUG: bool = False


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` (and ``triton.language``) can be imported.

    The result is cached; call ``triton_available.cache_clear()`` after changing the
    environment (tests do this to simulate a machine without Triton).

    Returns:
        True if Triton imports cleanly.
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def interpret_mode() -> bool:
    """Whether the Triton interpreter is requested (``TRITON_INTERPRET == "1"``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Resolve a backend name to the implementation that will run.

    Args:
        name: ``"torch"``, ``"triton"`` or ``"auto"``.
        device: Device holding the tensors.

    Returns:
        ``"torch"`` or ``"triton"``. ``"auto"`` gives ``"triton"`` on CUDA when Triton is
        importable and ``"torch"`` otherwise.

    Raises:
        ValueError: Unknown name, or ``"triton"`` requested for a non-CUDA device while
            ``TRITON_INTERPRET`` is not ``"1"``.
        RuntimeError: ``"triton"`` requested but Triton cannot be imported.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    # name == "triton"
    if not triton_available():
        raise RuntimeError(
            "Triton kernels requested but triton is not importable (not installed, or a broken "
            "install); install triton or use backend='torch' (the *_ref functions)"
        )
    if device.type != "cuda" and not interpret_mode():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got device {device}; set TRITON_INTERPRET=1 "
            "(before triton is imported) to run the Triton interpreter on CPU, or use "
            "backend='torch' / 'auto'"
        )
    return "triton"


def load_triton_module(name: str) -> ModuleType:
    """Import a kernel module of this package lazily (see the module docstring).

    Args:
        name: Submodule name, e.g. ``"_lookup_triton"``.

    Returns:
        The imported module.

    Raises:
        RuntimeError: Triton is not importable.
    """
    if not triton_available():
        raise RuntimeError(
            "Triton kernels requested but triton is not importable (not installed, or a broken "
            "install); install triton or use backend='torch' (the *_ref functions)"
        )
    module = importlib.import_module(f"{__package__}.{name}")
    _check_interpreter_consistency(module)
    return module


def _check_interpreter_consistency(module: ModuleType) -> None:
    """Raise if ``TRITON_INTERPRET`` changed after Triton or ``module`` was imported.

    Triton decorates its own ``@jit`` helpers (``tl.zeros``, ``tl.sum`` ...) when
    ``triton.language`` is imported and ours when ``module`` is imported; a mix of compiled
    and interpreted functions fails deep inside Triton with an obscure error.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    try:  # Triton's own reading of the variable (it also accepts "true", "on" ...)
        from triton import knobs

        wanted = bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # Triton < 3.4 has no knobs
        wanted = interpret_mode()
    lib = getattr(importlib.import_module("triton.language"), "zeros", None)
    kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
    for fn in [lib, *kernels]:
        if not isinstance(fn, (JITFunction, InterpretedFunction)):
            continue
        if isinstance(fn, InterpretedFunction) != wanted:
            raise RuntimeError(
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now, but Triton (or "
                f"{module.__name__}) was imported with the other setting; set TRITON_INTERPRET "
                "before triton is imported (e.g. at the top of conftest.py) and keep it fixed"
            )


def debug_enabled() -> bool:
    """Whether debug mode is on (see :func:`debug_mode`)."""
    return _DEBUG


@contextlib.contextmanager
def debug_mode(enabled: bool = True) -> Iterator[None]:
    """Context manager switching the kernels' debug mode.

    In debug mode every floating-point buffer a Triton kernel writes is allocated filled
    with NaN ("poisoned") instead of uninitialised, so an element a kernel forgot to write
    shows up in the result, and slot indices are range-checked (a host sync) before
    launching. Not thread-safe; meant for tests.

    Args:
        enabled: Turn debug mode on (True) or off (False) inside the block.
    """
    global _DEBUG
    previous = _DEBUG
    _DEBUG = enabled
    try:
        yield
    finally:
        _DEBUG = previous


def alloc_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: uninitialised, or NaN-filled in debug mode."""
    if _DEBUG and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
