"""Fixtures for the kernel tests.

``TRITON_INTERPRET`` is set at import time, before any kernel module is imported.
Triton 3.x reads it when a ``@triton.jit`` function is decorated, and
``knowedit.kernels`` imports its kernel modules lazily on first use, so this works even if
other test modules imported ``torch``, ``triton`` or ``knowedit.kernels`` earlier. Export
``TRITON_INTERPRET=0`` on a GPU machine to test the compiled kernels (the CPU cases of the
Triton tests are then skipped).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from knowedit.kernels import debug_mode  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

#: Devices the Triton kernels can run on here: CPU through the interpreter, CUDA if present.
TRITON_DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU needs TRITON_INTERPRET=1")
    ),
    pytest.param("cuda", marks=requires_cuda),
]


@pytest.fixture(autouse=True)
def _poison_outputs() -> Iterator[None]:
    """Run every test in debug mode: kernel outputs start as NaN, ids are range-checked."""
    with debug_mode(True):
        yield


@pytest.fixture(params=TRITON_DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Device for Triton-kernel tests."""
    return torch.device(request.param)
