"""Helpers for tests that drive the ``knowedit`` CLI and check what it left behind."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from click.testing import Result


def clean_failure(result: Result, *phrases: str) -> str:
    """Assert a command failed as a user error: non-zero exit, no traceback, every
    phrase in its output. Returns the output on one line (whitespace collapsed)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for phrase in phrases:
        assert phrase in text, result.output
    return text


def digest(p: Path) -> str:
    """sha256 of a file; of a SQLite database, of its logical content (its WAL
    checkpoints and -wal/-shm files come and go as connections open and close)."""
    data = p.read_bytes()
    if data[:16] == b"SQLite format 3\x00":
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        try:
            data = "\n".join(con.iterdump()).encode()
        finally:
            con.close()
    return hashlib.sha256(data).hexdigest()


def tree(path: Path) -> dict[str, str]:
    """Content of every file under ``path`` (to show a command changed nothing)."""
    return {
        str(p.relative_to(path)): digest(p)
        for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }
