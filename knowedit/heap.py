"""Large temporary buffers go back to the operating system when they are freed.

An edit allocates and frees many buffers of a few to tens of megabytes (the
guards' hidden states, margins and logits, a chunk at a time). glibc's
allocator serves a freed block's size from its heap from then on (its mmap
threshold rises to the largest block freed, up to 32 MiB), and memory freed
inside the heap stays with the process: an editing process's resident memory
then keeps what its largest edits left behind. With a fixed threshold, blocks
of at least that size are mapped on their own and unmapped when freed.

On the CounterFact world with 3,468 live edits (``bench/edit_memory.py``,
docs/benchmarks.md), a 16 MiB threshold lowered the largest edit's peak from
1,243 to 1,083 MB at the same edit time; 4 MiB lowered it further but made
edits about 40% slower (every smaller block mapped and faulted in afresh).

:func:`release_large_buffers` is called when an :class:`~knowedit.editor.Editor`
is created. It changes the allocator of the whole process, so it leaves it
alone where the user chose: ``MALLOC_MMAP_THRESHOLD_`` set (glibc's own
setting), or ``KNOWEDIT_MMAP_THRESHOLD`` set (bytes; ``0`` leaves the
allocator as it is). It does nothing outside Linux or without glibc's
``mallopt``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

DEFAULT_THRESHOLD = 16 << 20
"""Blocks of at least this many bytes are mapped on their own (glibc caps it at 32 MiB)."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_applied: int | None = None


def release_large_buffers(threshold: int | None = None) -> int:
    """Fix glibc's mmap threshold (default: ``KNOWEDIT_MMAP_THRESHOLD`` or
    :data:`DEFAULT_THRESHOLD`) once per process; returns the threshold in force
    from this call on, or 0 where the allocator was left alone."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = 0
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return 0
    if threshold is None:
        raw = os.environ.get("KNOWEDIT_MMAP_THRESHOLD", "").strip()
        try:
            threshold = int(raw) if raw else DEFAULT_THRESHOLD
        except ValueError:
            warnings.warn(f"KNOWEDIT_MMAP_THRESHOLD={raw!r} is not a number of bytes: the allocator is left as it is", stacklevel=2)
            return 0
    if threshold <= 0:
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return 0
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
        _applied = threshold
    return _applied
