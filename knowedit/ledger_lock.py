"""A fair, first-come-first-served writer queue for a SQLite ledger file.

SQLite's busy handler is not fair: a waiting writer sleeps and retries, and
writers that arrived after it can take the lock back to back in the meantime.
Three concurrent ``edit apply --file`` writers on one model directory starved
one of them for over a minute that way. So knowedit writers queue here before
they ask SQLite for its write lock:

- a writer takes a *ticket*: a file in ``<ledger>.queue/`` named by its arrival
  time, which it holds an exclusive ``flock`` on for as long as it lives;
- it enters when no live ticket is older than its own, and leaves by removing
  its ticket;
- a ticket whose owner died (the kernel released its ``flock``) is removed by
  the next writer that looks at it, so a SIGKILLed writer never blocks the queue.

A writer therefore waits only for the writers that arrived before it: with
``n`` writers ahead, each holding the lock for at most ``t`` seconds, the wait
is at most ``n * t``. Waiting longer than the ledger's timeout raises
:class:`LedgerBusy` with the number of writers still ahead. The queue covers
every process and thread on one machine (``flock`` locks belong to an open
file, not a process); it needs a local filesystem, as SQLite's WAL mode does.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from knowedit.ledger_schema import LedgerError

_STALE_TEMP_S = 30.0
"""A half-made ticket (a crash between create and rename) older than this is removed."""


class LedgerBusy(LedgerError):
    """A writer waited longer than the ledger's timeout for its turn."""


class WriterQueue:
    """The FIFO queue of writers of one ledger file.

    Args:
        ledger_path: the SQLite ledger file; the queue lives in ``<path>.queue/``.
    """

    def __init__(self, ledger_path: Path) -> None:
        self.ledger_path = ledger_path
        self.dir = ledger_path.with_name(ledger_path.name + ".queue")

    @contextmanager
    def turn(self, timeout_s: float) -> Iterator[None]:
        """Wait for this writer's turn (FIFO), hold it inside the block, then leave.

        Raises:
            LedgerBusy: more than ``timeout_s`` seconds passed with writers still ahead.
            LedgerError: the queue directory cannot be created or written.
        """
        try:
            self.dir.mkdir(exist_ok=True)
            name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
            temp = self.dir / f".{name}"
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except OSError as exc:
            raise LedgerError(
                f"cannot queue for the write lock of ledger {self.ledger_path} in {self.dir}: "
                f"{exc.strerror or exc}"
            ) from exc
        ticket = self.dir / name
        try:
            # Locked before it becomes visible: a visible ticket is always held by a live owner.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(temp, ticket)
            deadline = time.monotonic() + timeout_s
            delay = 0.001
            while True:
                ahead = self._live_ahead(name)
                if not ahead:
                    break
                if time.monotonic() >= deadline:
                    raise LedgerBusy(
                        f"ledger {self.ledger_path} is busy: {len(ahead)} writer(s) arrived before this "
                        f"one and still held or awaited the write lock after {timeout_s:g} s"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
            yield
        finally:
            for path in (ticket, temp):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            os.close(fd)

    def _live_ahead(self, mine: str) -> list[str]:
        """Tickets older than ``mine`` whose owners are alive; dead ones are removed."""
        ahead: list[str] = []
        for entry in sorted(os.listdir(self.dir)):
            temp = entry.startswith(".")
            if not temp and entry >= mine:
                break
            if temp and not _older_than(entry[1:], _STALE_TEMP_S):
                continue
            if not self._held(entry):
                continue
            if not temp:
                ahead.append(entry)
        return ahead

    def _held(self, entry: str) -> bool:
        """True when the ticket's owner still holds it; a dead owner's ticket is removed."""
        path = self.dir / entry
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # its owner finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            try:  # nobody holds it: its owner died (or is leaving); names are never reused
                os.unlink(path)
            except FileNotFoundError:
                pass
            return False
        finally:
            os.close(fd)


def _older_than(name: str, seconds: float) -> bool:
    try:
        born_ns = int(name.split("-", 1)[0])
    except ValueError:
        return True
    return time.time_ns() - born_ns > seconds * 1e9
