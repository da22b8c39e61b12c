"""Derived side files of a checkpoint directory: the background slot
statistics (``slot_stats.safetensors``) and the documents they index
(``slot_stats_docs.jsonl``), computed from the training corpus (``corpus.jsonl``).

They are derived data, so they are written whole or not at all (a temporary
file renamed into place) and checked on every load: the statistics file
records the sha256 and size of its documents file, the document count and the
model's fingerprint. A damaged, cut-short or mismatched pair is rebuilt from
the corpus when the directory has one, or refused with a message naming the
file. A read-only directory gets statistics computed in memory for the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from knowedit.checkpoint import STATS_FILE, Checkpoint, plain_file_mode
from knowedit.data.records import Example, RecordError, read_examples
from knowedit.errors import FileAccessError, KnoweditError
from knowedit.stats import SlotStats, compute_slot_stats

CORPUS_FILE = "corpus.jsonl"
STATS_DOCS_FILE = "slot_stats_docs.jsonl"


class SideFileError(KnoweditError, ValueError):
    """A side file that is damaged and cannot be rebuilt; the message names it."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file in the
    same directory, which is synced and renamed over ``path``.

    The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask).

    Raises:
        OSError: the directory is not writable, the disk is full, ...
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temp))
        os.chmod(temp, plain_file_mode())
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def docs_bytes(docs: list[Example]) -> bytes:
    """The JSONL text of ``docs`` (one ``{"prompt", "answer"}`` object a line)."""
    return "".join(
        json.dumps({"prompt": e.prompt, "answer": e.answer}, ensure_ascii=False) + "\n" for e in docs
    ).encode("utf-8")


def read_docs(path: Path) -> list[Example]:
    """A JSONL file of ``{"prompt", "answer"}`` objects (:func:`knowedit.data.records.read_examples`).

    Raises:
        SideFileError: unreadable file, or a line that is not such an object (named with its number).
    """
    try:
        return read_examples(path)
    except RecordError as err:
        raise SideFileError(str(err)) from None


def save_stats(ck: Checkpoint, stats: SlotStats, docs: list[Example]) -> None:
    """Store ``stats`` and ``docs`` in the checkpoint directory, documents first.

    A crash between the two renames leaves new documents beside old statistics
    that name other documents' hash: the next load sees the mismatch and rebuilds.
    """
    data = docs_bytes(docs)
    atomic_write(ck.path / STATS_DOCS_FILE, lambda p: p.write_bytes(data))
    meta = {
        "docs_sha256": hashlib.sha256(data).hexdigest(),
        "docs_bytes": str(len(data)),
        "n_docs": str(len(docs)),
        "model_fingerprint": ck.fingerprint,
    }
    atomic_write(ck.path / STATS_FILE, lambda p: stats.save(p, metadata=meta))


def build_stats(
    ck: Checkpoint,
    docs: list[Example],
    on_batch: Callable[[int], None] | None = None,
    persist: bool = True,
) -> SlotStats:
    """Compute background slot statistics over ``docs`` and (``persist``) store them.

    Raises:
        FileAccessError: the directory is not writable (with ``persist``); an OSError.
    """
    stats = compute_slot_stats(ck.model, ck.codec, docs, on_batch=on_batch)
    if persist:
        try:
            save_stats(ck, stats, docs)
        except OSError as err:
            raise FileAccessError(
                f"cannot store the slot statistics in {ck.path}: {err.strerror or err}"
            ) from None
    return stats


def _stored_problem(ck: Checkpoint) -> str | tuple[SlotStats, list[Example]]:
    """The stored statistics and documents, or what is wrong with them."""
    stats_path, docs_path = ck.path / STATS_FILE, ck.path / STATS_DOCS_FILE
    if not stats_path.is_file():
        return f"{stats_path} is missing"
    if not docs_path.is_file():
        return f"{docs_path} is missing"
    try:
        stats, meta = SlotStats.load_with_metadata(stats_path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        return f"{stats_path} is damaged ({' '.join(str(err).split()) or type(err).__name__})"
    if meta.get("model_fingerprint") != ck.fingerprint:
        return f"{stats_path} was not computed for this model (no or another model fingerprint)"
    data = docs_path.read_bytes()
    if str(len(data)) != meta.get("docs_bytes") or hashlib.sha256(data).hexdigest() != meta.get("docs_sha256"):
        return f"{docs_path} is damaged or does not belong to {stats_path.name} (size or sha256 differ)"
    docs = read_docs(docs_path)
    if len(docs) != stats.n_docs or meta.get("n_docs") != str(len(docs)):
        return f"{docs_path} holds {len(docs)} documents, {stats_path.name} counts {stats.n_docs}"
    if set(stats.df) != {p.name for p in ck.model.pools.values()}:
        return f"{stats_path} covers pools {sorted(stats.df)}, the model has others"
    return stats, docs


def load_background(ck: Checkpoint, persist: bool = True) -> tuple[SlotStats | None, list[Example], str]:
    """The checkpoint's background statistics and documents, built or rebuilt as needed
    (and stored, unless ``persist`` is False).

    Returns:
        ``(stats, docs, status)``; status is ``loaded`` (stored and intact),
        ``built`` (first computed and stored now), ``rebuilt`` (the stored pair
        was damaged: why is in the log of :func:`describe`), ``memory``
        (computed, but the directory is not writable) or ``none`` (no
        statistics and no corpus: edits run without background guards).

    Raises:
        SideFileError: the stored pair is damaged and there is no corpus to rebuild it from.
    """
    stats_path, docs_path, corpus = ck.path / STATS_FILE, ck.path / STATS_DOCS_FILE, ck.path / CORPUS_FILE
    had = stats_path.exists() or docs_path.exists()
    if had:
        found = _stored_problem(ck)
        if not isinstance(found, str):
            return found[0], found[1], "loaded"
        problem = found
        if not corpus.is_file():
            raise SideFileError(
                f"{problem}; there is no {CORPUS_FILE} in {ck.path} to rebuild it from: run "
                f"`knowedit stats --model {ck.path} --corpus FILE`"
            )
    elif not corpus.is_file():
        return None, [], "none"
    docs = read_docs(corpus)
    stats = compute_slot_stats(ck.model, ck.codec, docs)
    if not persist:
        return stats, docs, "memory"
    try:
        save_stats(ck, stats, docs)
    except OSError:
        return stats, docs, "memory"
    return stats, docs, "rebuilt" if had else "built"
