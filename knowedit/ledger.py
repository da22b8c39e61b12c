"""The edit ledger: an append-only, hash-chained log of every edit.

An ``apply`` event stores the edit request, the method with its settings, the
metrics, and for each changed value row (memory name, slot) the exact
``before`` and ``after`` rows as raw bytes (native order: little-endian on x86
and ARM) with dtype and shape (never pickle), so any edit can be audited and
rolled back bit for bit. A ``revert`` event names the apply it undoes; the
rows to restore are that apply's ``before`` rows. Nothing is ever updated or deleted.

Each event's ``hash`` is sha256 over the previous event's hash and a canonical
encoding of the event (every scalar field, the JSON payloads, and per row the
pool, slot, dtype, shape and sha256 of the raw bytes), so ``verify_chain``
detects any change to a stored event, a dropped event in the middle, or a
reordering. (Dropping events from the *end* of the chain leaves a shorter
valid chain; keep an external copy of the last hash if that matters.)

The ledger records the fingerprint of its base checkpoint and refuses to open
against another base. Storage is SQLite through SQLAlchemy by default (WAL,
``synchronous=FULL``, busy timeout); writers serialise on
``Ledger.transaction()`` (``BEGIN IMMEDIATE``)::

    ledger = Ledger("runs/small/ledger.db", checkpoint.fingerprint)
    with ledger.transaction() as txn:
        new = txn.events(after_seq=seen)        # catch up with other processes
        ev = txn.append_apply(request, "sparse", settings, metrics, rows)
    # committed here; an exception inside the block appends nothing
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from knowedit.ledger_schema import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    Event,
    LedgerBase,
    LedgerError,
    MetaEntry,
    RowChange,
    append_event,
    event_label,
    find_apply,
    find_revert_seq,
    iter_records,
    last_seq,
    live_records,
    load_events,
    new_edit_id,
    record_digest,
    tensor_from_bytes,
    tensor_to_bytes,
    to_event,
)

__all__ = [
    "GENESIS_HASH",
    "Event",
    "Ledger",
    "LedgerError",
    "LedgerTxn",
    "RowChange",
    "tensor_from_bytes",
    "tensor_to_bytes",
]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_BEGIN_OPTION = "knowedit_sqlite_begin"


class LedgerTxn:
    """Reads and appends inside one ``Ledger.transaction()`` (all or nothing)."""

    def __init__(self, session: Session) -> None:
        self._session: Session | None = session

    @property
    def session(self) -> Session:
        """The SQLAlchemy session of this transaction (raises once it has ended)."""
        if self._session is None:
            raise LedgerError("this ledger transaction has ended; open a new Ledger.transaction()")
        return self._session

    def events(self, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq`` in seq order, rows loaded."""
        return load_events(self.session, after_seq)

    def last_seq(self) -> int:
        """The newest event's seq (0 when empty)."""
        return last_seq(self.session)

    def get(self, edit_id: str) -> Event:
        """The apply event of ``edit_id``; LedgerError if there is none."""
        rec = find_apply(self.session, edit_id)
        if rec is None:
            raise LedgerError(f"unknown edit id {edit_id!r}")
        return to_event(rec)

    def is_live(self, edit_id: str) -> bool:
        """True when ``edit_id`` was applied and not reverted."""
        s = self.session
        return find_apply(s, edit_id) is not None and find_revert_seq(s, edit_id) is None

    def live_ids(self) -> list[str]:
        """Ids of the live (applied, not reverted) edits, in seq order."""
        return [r.edit_id for r in live_records(self.session)]

    def append_apply(
        self,
        request: dict,
        method: str,
        settings: dict,
        metrics: dict,
        rows: Sequence[RowChange],
        author: str | None = None,
        note: str | None = None,
    ) -> Event:
        """Record a new edit under a fresh id (``"e"`` + 10 hex chars).

        Args:
            request: the edit request (EasyEdit fields), JSON.
            method: the editing method, e.g. ``"sparse"``.
            settings: the method's settings, JSON.
            metrics: measured metrics, JSON (numpy/tensor scalars become numbers).
            rows: the changed rows; each ``(pool, slot)`` at most once.
            author: who made the edit.
            note: free text.

        Returns:
            The appended event, as it reads back.
        """
        s = self.session
        return append_event(
            s,
            kind="apply",
            edit_id=new_edit_id(s),
            request=request,
            method=method,
            settings=settings,
            metrics=metrics,
            rows=rows,
            author=author,
            note=note,
        )

    def append_revert(
        self,
        edit_id: str,
        author: str | None = None,
        note: str | None = None,
        request: dict | None = None,
    ) -> Event:
        """Record that ``edit_id`` is reverted (its ``before`` rows are live again).

        The ledger checks only that the edit exists and is live; whether the
        live rows still equal its ``after`` rows is the caller's check.

        Raises:
            LedgerError: unknown id, or the edit is already reverted.
        """
        s = self.session
        if find_apply(s, edit_id) is None:
            raise LedgerError(f"unknown edit id {edit_id!r}")
        done = find_revert_seq(s, edit_id)
        if done is not None:
            raise LedgerError(f"edit {edit_id!r} is already reverted (event {done})")
        return append_event(
            s,
            kind="revert",
            edit_id=edit_id,
            request={} if request is None else request,
            method="",
            settings={},
            metrics={},
            rows=[],
            author=author,
            note=note,
        )


# ------------------------------------------------------------------ opening
def _resolve(url: str | os.PathLike[str]) -> tuple[URL, Path | None, bool]:
    """Turn a path or SQLAlchemy URL into (URL, sqlite file path or None, in-memory?)."""
    if isinstance(url, os.PathLike) or "://" not in str(url):
        path = Path(os.fspath(url)).expanduser().resolve()
        return URL.create("sqlite", database=str(path)), path, False
    try:
        u = make_url(str(url))
    except ArgumentError as exc:
        raise LedgerError(f"invalid ledger URL {url!r}: {exc}") from exc
    if u.get_backend_name() != "sqlite":
        return u, None, False
    db = u.database
    if not db or db == ":memory:" or u.query.get("mode") == "memory":
        return u, None, True
    if db.startswith("file:"):  # a sqlite URI: leave it to the driver
        return u, None, False
    path = Path(db).expanduser().resolve()
    return u.set(database=str(path)), path, False


def _check_path(path: Path, create: bool) -> None:
    """Clear errors for file problems sqlite would report as 'unable to open'."""
    if path.is_dir():
        raise LedgerError(f"ledger path {path} is a directory, not a database file")
    if path.exists():
        try:
            with open(path, "rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {path}: {exc.strerror}") from exc
        if not header and not create:
            raise LedgerError(f"ledger {path} is an empty file, not a knowedit ledger")
        if header and header != _SQLITE_MAGIC:
            raise LedgerError(
                f"{path} is not a SQLite database (bad file header): not a knowedit ledger"
            )
        return
    if not create:
        raise LedgerError(f"no ledger at {path} (the file does not exist)")
    parent = path.parent
    if not parent.is_dir():
        blocker = next((p for p in path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise LedgerError(
                f"cannot create ledger at {path}: {blocker} is a file, not a directory"
            )
        raise LedgerError(f"cannot create ledger at {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LedgerError(f"cannot create ledger at {path}: directory {parent} is read-only")


def _sqlite_engine(url: URL, in_memory: bool, busy_timeout_s: float) -> Engine:
    """A SQLite engine where SQLAlchemy, not pysqlite, emits BEGIN (see module doc)."""
    kwargs: dict[str, Any] = {"connect_args": {"timeout": busy_timeout_s}}
    if in_memory:  # one shared connection, else every pooled connection is a new empty db
        kwargs = {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool}
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # pysqlite's implicit BEGIN skips SELECTs (reads outside the transaction);
        # turn it off and emit BEGIN [IMMEDIATE] ourselves in _on_begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            try:  # WAL: readers never block the writer. Not everywhere (network fs, memory).
                cur.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError:
                pass  # a garbage file fails here too; the first real query reports it
            cur.execute("PRAGMA synchronous = FULL")  # a commit survives power loss
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _describe(exc: BaseException, where: str, busy_timeout_s: float) -> str:
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, ImportError):
        return f"ledger {where}: the database driver is not installed ({orig})"
    text = str(orig).lower()
    if "file is not a database" in text or "not a database" in text:
        return f"{where} is not a SQLite database (or it is encrypted or corrupt): not a knowedit ledger"
    if "malformed" in text or "corrupt" in text or "disk i/o error" in text:
        return (
            f"ledger {where} is corrupt or truncated ({orig}); restore it from a backup or export"
        )
    if "readonly" in text or "read-only" in text:
        return f"ledger {where} is read-only ({orig}): cannot write to it"
    if "locked" in text or "busy" in text:
        return f"ledger {where} is locked: another process held it longer than {busy_timeout_s:g} s"
    if "unable to open" in text:
        return f"cannot open ledger {where} ({orig})"
    return f"ledger {where}: database error: {orig}"


class Ledger:
    """An append-only, hash-chained ledger of edits to one base checkpoint.

    Args:
        url: a filesystem path (``sqlite:///abs/path``) or any SQLAlchemy URL;
            ``"sqlite://"`` is an in-memory ledger (single process, for tests).
        base_fingerprint: fingerprint of the base checkpoint; an existing
            ledger with another fingerprint is refused.
        create: create the database and tables when missing.
        busy_timeout_s: how long to wait for another process's write lock.

    Raises:
        LedgerError: missing/unwritable location, not a SQLite file, corrupt or
            truncated file, another schema version, another base model.
    """

    SCHEMA_VERSION: int = SCHEMA_VERSION

    def __init__(
        self,
        url: str | os.PathLike[str],
        base_fingerprint: str,
        *,
        create: bool = True,
        busy_timeout_s: float = 60.0,
    ) -> None:
        if not isinstance(base_fingerprint, str) or not base_fingerprint:
            raise LedgerError("base_fingerprint must be a non-empty string")
        self._fingerprint = base_fingerprint
        self._busy_timeout_s = float(busy_timeout_s)
        self._engine: Engine | None = None
        self._local = threading.local()
        sa_url, self.path, in_memory = _resolve(url)
        self.url: str = sa_url.render_as_string(hide_password=True)
        self._where = str(self.path) if self.path is not None else self.url
        if self.path is not None:
            _check_path(self.path, create)
        with self._db_errors():
            if sa_url.get_backend_name() == "sqlite":
                engine = _sqlite_engine(sa_url, in_memory, self._busy_timeout_s)
            else:
                engine = create_engine(sa_url, pool_pre_ping=True)
        self._engine = engine
        self._write_engine = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        try:
            with self._db_errors():
                self._open(create)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing
    @contextmanager
    def _db_errors(self) -> Iterator[None]:
        """Turn database/driver exceptions into a LedgerError with a clear message."""
        try:
            yield
        except (SQLAlchemyError, sqlite3.Error, ImportError) as exc:
            raise LedgerError(_describe(exc, self._where, self._busy_timeout_s)) from exc

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise LedgerError(f"ledger {self._where} is closed")
        return self._engine

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A short read transaction (a consistent snapshot)."""
        engine = self._live_engine()
        if getattr(self._local, "in_txn", False):
            raise LedgerError(
                "Ledger read methods cannot run inside Ledger.transaction() in the same "
                "thread (they would not see its appends); use the LedgerTxn instead"
            )
        with self._db_errors(), Session(engine) as session, session.begin():
            yield session

    def _open(self, create: bool) -> None:
        with Session(self._live_engine()) as s, s.begin():
            meta = self._read_meta(s)
        if meta is None:
            if not create:
                raise LedgerError(f"{self._where} is not a knowedit ledger (no ledger_meta table)")
            with Session(self._write_engine) as s, s.begin():
                # Again, under the write lock: another process may have created it meanwhile.
                meta = self._read_meta(s)
                if meta is None:
                    meta = self._initialise(s)
        version = meta.get("schema_version")
        if version is None:
            raise LedgerError(
                f"{self._where} is not a knowedit ledger (no schema version recorded)"
            )
        if version != str(SCHEMA_VERSION):
            raise LedgerError(
                f"ledger {self._where} has schema version {version}; this knowedit reads "
                f"schema version {SCHEMA_VERSION} only"
            )
        stored = meta.get("base_fingerprint", "")
        if stored != self._fingerprint:
            raise LedgerError(
                f"ledger belongs to base model {stored[:12]}, not {self._fingerprint[:12]} "
                f"({self._where}); a ledger never applies to another base"
            )

    @staticmethod
    def _read_meta(session: Session) -> dict[str, str] | None:
        if not inspect(session.connection()).has_table(MetaEntry.__tablename__):
            return None
        return {m.key: m.value for m in session.scalars(select(MetaEntry))}

    def _initialise(self, session: Session) -> dict[str, str]:
        conn = session.connection()
        if conn.dialect.name == "sqlite" and inspect(conn).get_table_names():
            raise LedgerError(
                f"{self._where} is a SQLite database with other tables but no ledger_meta: "
                "not a knowedit ledger"
            )
        LedgerBase.metadata.create_all(conn)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "base_fingerprint": self._fingerprint,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        session.add_all(MetaEntry(key=k, value=v) for k, v in meta.items())
        session.flush()
        return meta

    # ---------------------------------------------------------- public API
    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base checkpoint this ledger belongs to."""
        return self._fingerprint

    @contextmanager
    def transaction(self) -> Iterator[LedgerTxn]:
        """An exclusive write transaction: read new events, compute, append, atomically.

        On SQLite this is ``BEGIN IMMEDIATE``, taken on entry: a second process
        blocks here (up to ``busy_timeout_s``) until the first commits. Commits
        on normal exit; an exception rolls back (nothing appended) and propagates.
        Not re-entrant; the Ledger's read methods are refused inside it.
        """
        self._live_engine()
        if getattr(self._local, "in_txn", False):
            raise LedgerError("Ledger.transaction() is not re-entrant")
        self._local.in_txn = True
        txn: LedgerTxn | None = None
        try:
            with self._db_errors(), Session(self._write_engine) as session, session.begin():
                # Take the lock now (SQLite: the BEGIN IMMEDIATE; others: a row lock).
                session.execute(
                    select(MetaEntry.key).where(MetaEntry.key == "schema_version").with_for_update()
                )
                txn = LedgerTxn(session)
                yield txn
                session.flush()
        finally:
            if txn is not None:
                txn._session = None
            self._local.in_txn = False

    def events(self, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq`` in seq order, rows loaded."""
        with self._read() as s:
            return load_events(s, after_seq)

    def last_seq(self) -> int:
        """The newest event's seq (0 when empty)."""
        with self._read() as s:
            return last_seq(s)

    def get(self, edit_id: str) -> Event:
        """The apply event of ``edit_id``.

        Raises:
            LedgerError: ``unknown edit id 'x'``.
        """
        with self._read() as s:
            return LedgerTxn(s).get(edit_id)

    def is_live(self, edit_id: str) -> bool:
        """True when ``edit_id`` was applied and not reverted (False if unknown)."""
        with self._read() as s:
            return LedgerTxn(s).is_live(edit_id)

    def live_edits(self) -> list[Event]:
        """The live (applied, not reverted) apply events in seq order."""
        with self._read() as s:
            return [to_event(r) for r in live_records(s)]

    def verify_chain(self) -> list[str]:
        """Check every event's hash, link and seq; ``[]`` when the ledger is intact.

        Returns:
            One message per bad event, naming it, e.g.
            ``"event 7 (apply e1a2b3c4d5e): hash mismatch"``.
        """
        problems: list[str] = []
        applied: set[str] = set()
        prev_seq, prev_hash = 0, GENESIS_HASH
        with self._read() as s:
            for rec in iter_records(s):
                bad: list[str] = []
                if rec.seq != prev_seq + 1:
                    bad.append(f"seq gap (expected {prev_seq + 1})")
                if rec.prev_hash != prev_hash:
                    bad.append(
                        f"prev_hash does not link to event {prev_seq}"
                        if prev_seq
                        else "prev_hash is not the genesis hash (64 zeros)"
                    )
                try:
                    if record_digest(rec) != rec.hash:
                        bad.append("hash mismatch")
                except ValueError as exc:
                    bad.append(str(exc))
                for r in rec.rows:
                    try:
                        for raw in (r.before, r.after):
                            tensor_from_bytes(raw, r.dtype, json.loads(r.shape))
                    except (TypeError, ValueError) as exc:
                        bad.append(
                            f"row {r.position} ({r.pool}[{r.slot}]) cannot be decoded: {exc}"
                        )
                if rec.kind == "apply":
                    applied.add(rec.edit_id)
                elif rec.kind == "revert" and rec.edit_id not in applied:
                    bad.append("reverts an edit that was not applied before it")
                elif rec.kind not in ("apply", "revert"):
                    bad.append(f"unknown kind {rec.kind!r}")
                if bad:
                    problems.append(f"{event_label(rec)}: " + "; ".join(bad))
                prev_seq, prev_hash = rec.seq, rec.hash
        return problems

    def export_jsonl(self, fp: TextIO) -> int:
        """Write one JSON object per event (rows as base64 bytes + dtype + shape).

        Returns:
            The number of events written.
        """
        n = 0
        with self._read() as s:
            for rec in iter_records(s):
                try:
                    obj = {
                        "seq": rec.seq,
                        "kind": rec.kind,
                        "edit_id": rec.edit_id,
                        "created_at": rec.created_at,
                        "author": rec.author,
                        "note": rec.note,
                        "request": json.loads(rec.request_json),
                        "method": rec.method,
                        "settings": json.loads(rec.settings_json),
                        "metrics": json.loads(rec.metrics_json),
                        "rows": [
                            {
                                "pool": r.pool,
                                "slot": r.slot,
                                "dtype": r.dtype,
                                "shape": json.loads(r.shape),
                                "before": base64.b64encode(r.before).decode("ascii"),
                                "after": base64.b64encode(r.after).decode("ascii"),
                            }
                            for r in rec.rows
                        ],
                        "prev_hash": rec.prev_hash,
                        "hash": rec.hash,
                    }
                except (TypeError, ValueError) as exc:
                    raise LedgerError(f"{event_label(rec)} cannot be exported: {exc}") from exc
                fp.write(json.dumps(obj, sort_keys=True) + "\n")
                n += 1
        return n

    def close(self) -> None:
        """Release the database connections (idempotent)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._where!r}, base={self._fingerprint[:12]})"
