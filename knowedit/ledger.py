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

Every read checks the chain: the first read of a ``Ledger`` verifies every
event from the genesis hash (the replay reads every row anyway), later reads
verify only the new events, linked to the head verified before. A broken
chain raises :class:`LedgerDamaged`; only :meth:`Ledger.verify_chain` and
:meth:`Ledger.get` (``knowedit ledger verify`` / ``show``) still read such a
ledger, to report it. A keyed ledger (HMAC-SHA256, key from
``KNOWEDIT_LEDGER_KEY_FILE`` or ``KNOWEDIT_LEDGER_KEY``) also catches
recomputed hashes.

A ledger is never created by accident: a missing location is
:class:`LedgerMissing` unless ``create=True``; an empty (0-byte) or foreign
file is refused; a new SQLite ledger is built in a temporary file and linked
into place whole, so no reader ever sees a half-made one.

The ledger records the fingerprint of its base checkpoint and refuses to open
against another base. Storage is SQLite through SQLAlchemy by default (WAL,
``synchronous=FULL``); writers queue first-come-first-served
(:mod:`knowedit.ledger_lock`) and then serialise on ``Ledger.transaction()``
(``BEGIN IMMEDIATE``; a row lock on PostgreSQL, whose lock queue is FIFO)::

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

from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, select, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from knowedit.ledger_lock import LedgerBusy, WriterQueue
from knowedit.ledger_schema import (
    APPLY_KINDS,
    GENESIS_HASH,
    SCHEMA_VERSION,
    ChainCheck,
    Event,
    EventRecord,
    LedgerBase,
    LedgerDamaged,
    LedgerError,
    LedgerMissing,
    MetaEntry,
    RowChange,
    append_event,
    event_label,
    find_apply,
    find_revert_seq,
    iter_records,
    key_id,
    last_seq,
    live_records,
    load_events,
    missing_triggers,
    new_edit_id,
    record_digest,
    tensor_from_bytes,
    tensor_to_bytes,
    to_event,
)

__all__ = [
    "APPLY_KINDS",
    "GENESIS_HASH",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "Event",
    "Ledger",
    "LedgerBusy",
    "LedgerDamaged",
    "LedgerError",
    "LedgerMissing",
    "LedgerTxn",
    "RowChange",
    "is_in_memory",
    "ledger_key_from_env",
    "tensor_from_bytes",
    "tensor_to_bytes",
]

KEY_FILE_ENV = "KNOWEDIT_LEDGER_KEY_FILE"
"""Environment variable naming a file that holds the ledger's HMAC key."""
KEY_ENV = "KNOWEDIT_LEDGER_KEY"
"""Environment variable holding the ledger's HMAC key itself (the file is preferred)."""
_MIN_KEY_BYTES = 16

_SQLITE_MAGIC = b"SQLite format 3\x00"
_BEGIN_OPTION = "knowedit_sqlite_begin"


class LedgerTxn:
    """Reads and appends inside one ``Ledger.transaction()`` (all or nothing).

    ``fresh`` holds the events other writers committed since the ledger last
    looked, already verified against the chain when the transaction began.
    """

    def __init__(self, session: Session, key: bytes | None = None, fresh: list[Event] | None = None, fresh_after: int = 0) -> None:
        self._session: Session | None = session
        self._key = key
        self._fresh = fresh
        self._fresh_after = fresh_after
        self.appended: list[Event] = []

    @property
    def session(self) -> Session:
        """The SQLAlchemy session of this transaction (raises once it has ended)."""
        if self._session is None:
            raise LedgerError("this ledger transaction has ended; open a new Ledger.transaction()")
        return self._session

    def events(self, after_seq: int = 0) -> list[Event]:
        """Events with ``seq > after_seq`` in seq order, rows loaded."""
        session = self.session  # raises once the transaction has ended
        if self._fresh is not None and after_seq >= self._fresh_after and not self.appended:
            return [e for e in self._fresh if e.seq > after_seq]
        return load_events(session, after_seq)

    def last_seq(self) -> int:
        """The newest event's seq (0 when empty)."""
        return last_seq(self.session)

    def _append(self, **fields: Any) -> Event:
        ev = append_event(self.session, key=self._key, **fields)
        self.appended.append(ev)
        return ev

    def get(self, edit_id: str) -> Event:
        """The apply event of ``edit_id``; LedgerError if there is none."""
        rec = find_apply(self.session, edit_id)
        if rec is None:
            raise LedgerError(f"unknown edit id {edit_id!r}")
        return to_event(rec)

    def is_live(self, edit_id: str) -> bool:
        """True when ``edit_id`` was applied (or learnt) and not reverted."""
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
        kind: str = "apply",
    ) -> Event:
        """Record a new edit (or learning run) under a fresh id (``"e"``, or
        ``"l"`` for ``kind="learn"``, + 10 hex chars).

        Args:
            request: the edit request (EasyEdit fields), JSON.
            method: the editing method, e.g. ``"sparse"``.
            settings: the method's settings, JSON.
            metrics: measured metrics, JSON (numpy/tensor scalars become numbers).
            rows: the changed rows; each ``(pool, slot)`` at most once.
            author: who made the edit.
            note: free text.
            kind: ``"apply"`` (an edit) or ``"learn"`` (a learning run's committed part).

        Returns:
            The appended event, as it reads back.
        """
        if kind not in APPLY_KINDS:
            raise LedgerError(f"append_apply records {' or '.join(APPLY_KINDS)} events, not {kind!r}")
        s = self.session
        return self._append(
            kind=kind,
            edit_id=new_edit_id(s, "e" if kind == "apply" else "l"),
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
        return self._append(
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


def is_in_memory(url: str | os.PathLike[str]) -> bool:
    """True for an in-memory SQLite URL (``sqlite://``): a ledger that dies with its process."""
    return _resolve(url)[2]


def ledger_key_from_env() -> bytes | None:
    """The HMAC key named by ``KNOWEDIT_LEDGER_KEY_FILE`` (or held in ``KNOWEDIT_LEDGER_KEY``).

    Raises:
        LedgerError: the key file cannot be read, or the key is shorter than 16 bytes.
    """
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            key = Path(path).expanduser().read_bytes().strip()
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger key file {path} ({KEY_FILE_ENV}): {exc.strerror or exc}") from exc
        where = f"the key file {path}"
    elif os.environ.get(KEY_ENV):
        key = os.environ[KEY_ENV].strip().encode("utf-8", "surrogateescape")
        where = KEY_ENV
    else:
        return None
    if len(key) < _MIN_KEY_BYTES:
        raise LedgerError(f"the ledger key in {where} is too short: {len(key)} bytes, at least {_MIN_KEY_BYTES}")
    return key


def _check_path(path: Path, create: bool) -> bool:
    """Clear errors for file problems sqlite would report as 'unable to open'.

    Returns:
        True when the file exists (and starts like a SQLite database).

    Raises:
        LedgerMissing: no file there and ``create`` is False.
        LedgerError: a directory, an empty or foreign file, or nowhere to create one.
    """
    if path.is_dir():
        raise LedgerError(f"ledger path {path} is a directory, not a database file")
    if path.exists():
        try:
            with open(path, "rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise LedgerError(f"cannot read ledger {path}: {exc.strerror}") from exc
        if not header:
            raise LedgerError(
                f"ledger {path} is an empty file (0 bytes), not a knowedit ledger: if it was truncated, "
                "restore it from a backup; to start a new ledger, remove the file"
            )
        if header != _SQLITE_MAGIC:
            raise LedgerError(
                f"{path} is not a SQLite database (bad file header): not a knowedit ledger"
            )
        return True
    if not create:
        raise LedgerMissing(f"no ledger at {path} (the file does not exist)")
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
    return False


def _sqlite_engine(url: URL, in_memory: bool, busy_timeout_s: float, wal: bool = False) -> Engine:
    """A SQLite engine where SQLAlchemy, not pysqlite, emits BEGIN (see module doc).

    ``wal`` switches the database to WAL mode, which then persists in the file: only
    for a new ledger, so that opening a file that may not be a ledger changes nothing.
    """
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
            if wal:  # WAL: readers never block the writer. Not everywhere (network fs, memory).
                cur.execute("PRAGMA journal_mode = WAL")
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
        return (
            f"ledger {where}: the database driver is not installed ({orig}); for PostgreSQL, "
            "`pip install 'knowedit[postgres]'` brings psycopg 3 (postgresql+psycopg:// URLs; "
            "plain postgresql:// also works once it is installed, or use postgresql+psycopg2:// with psycopg2)"
        )
    text_ = str(orig).lower()
    if "file is not a database" in text_ or "not a database" in text_:
        return f"{where} is not a SQLite database (or it is encrypted or corrupt): not a knowedit ledger"
    if "malformed" in text_ or "corrupt" in text_ or "disk i/o error" in text_:
        return (
            f"ledger {where} is corrupt or truncated ({orig}); restore it from a backup or export"
        )
    if "append-only" in text_:
        return f"ledger {where} refused the write: {orig}"
    if "readonly" in text_ or "read-only" in text_:
        return f"ledger {where} is read-only ({orig}): cannot write to it"
    if "lock timeout" in text_ or "locknotavailable" in type(orig).__name__.lower():
        return f"ledger {where} is busy: its write lock was held longer than {busy_timeout_s:g} s"
    if "locked" in text_ or "busy" in text_:
        return f"ledger {where} is locked: another process held it longer than {busy_timeout_s:g} s"
    if "unable to open" in text_:
        return f"cannot open ledger {where} ({orig})"
    return f"ledger {where}: database error: {orig}"


class Ledger:
    """An append-only, hash-chained ledger of edits to one base checkpoint.

    Args:
        url: a filesystem path (``sqlite:///abs/path``) or any SQLAlchemy URL;
            ``"sqlite://"`` is an in-memory ledger (single process, for tests;
            :class:`~knowedit.editor.Editor` refuses it).
        base_fingerprint: fingerprint of the base checkpoint; an existing
            ledger with another fingerprint is refused.
        create: create the ledger when there is none (never over an existing
            file: an empty or foreign file is refused either way).
        busy_timeout_s: how long a writer waits for its turn (writers ahead of
            it included) before :class:`LedgerBusy`.
        key: the HMAC key of a keyed ledger; ``None`` reads
            ``KNOWEDIT_LEDGER_KEY_FILE`` / ``KNOWEDIT_LEDGER_KEY`` (see
            :func:`ledger_key_from_env`). A new ledger is keyed when a key is given.

    Raises:
        LedgerMissing: nothing there and ``create`` is False.
        LedgerError: unwritable location, empty or foreign file, corrupt or
            truncated file, another schema version, another base model, a keyed
            ledger without its key (or with another key), a key for an unkeyed ledger.
    """

    SCHEMA_VERSION: int = SCHEMA_VERSION

    def __init__(
        self,
        url: str | os.PathLike[str],
        base_fingerprint: str,
        *,
        create: bool = True,
        busy_timeout_s: float = 60.0,
        key: bytes | None = None,
    ) -> None:
        if not isinstance(base_fingerprint, str) or not base_fingerprint:
            raise LedgerError("base_fingerprint must be a non-empty string")
        self._fingerprint = base_fingerprint
        self._busy_timeout_s = float(busy_timeout_s)
        self._engine: Engine | None = None
        self._local = threading.local()
        self._key = key if key is not None else ledger_key_from_env()
        self._chain = ChainCheck(self._key)
        self._chain_lock = threading.Lock()
        self._damage: str | None = None
        sa_url, self.path, self.in_memory = _resolve(url)
        self.url: str = sa_url.render_as_string(hide_password=True)
        self._where = str(self.path) if self.path is not None else self.url
        self._queue = WriterQueue(self.path) if self.path is not None else None
        if self.path is not None and not _check_path(self.path, create):
            self._create_file(sa_url)
        with self._db_errors():
            if sa_url.get_backend_name() == "sqlite":
                engine = _sqlite_engine(sa_url, self.in_memory, self._busy_timeout_s)
            else:
                engine = create_engine(sa_url, pool_pre_ping=True)
        self._engine = engine
        self._write_engine = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        try:
            with self._db_errors():
                self._open(create and self.path is None)
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

    def _create_file(self, url: URL) -> None:
        """Build a new ledger in a temporary file beside ``self.path`` and link it into
        place whole: nobody ever sees a half-made ledger, and an existing file (another
        process's new ledger) is never overwritten."""
        assert self.path is not None
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.creating")
        engine = None
        try:
            with self._db_errors():
                engine = _sqlite_engine(url.set(database=str(temp)), False, self._busy_timeout_s, wal=True)
                with Session(engine) as s, s.begin():
                    self._initialise(s)
                engine.dispose()  # the last connection closes: the WAL is checkpointed into the file
                engine = None
            try:
                os.link(temp, self.path)
            except FileExistsError:
                pass  # another process created it first: open theirs
            except OSError:  # no hard links on this filesystem
                if not self.path.exists():
                    os.replace(temp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise LedgerError(f"cannot create ledger at {self.path}: {exc.strerror or exc}") from exc
        finally:
            if engine is not None:
                engine.dispose()
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(f"{temp}{suffix}")
                except FileNotFoundError:
                    pass

    def _open(self, create: bool) -> None:
        with Session(self._live_engine()) as s, s.begin():
            meta = self._read_meta(s)
        if meta is None:
            if self.path is not None:
                raise LedgerError(
                    f"{self._where} is a SQLite database without knowedit's tables: not a knowedit ledger"
                )
            if not create:
                raise LedgerMissing(f"no ledger at {self._where} (no ledger_meta table)")
            with Session(self._write_engine) as s, s.begin():
                if s.get_bind().dialect.name == "postgresql":  # serialise concurrent first writers
                    s.execute(text("SELECT pg_advisory_xact_lock(hashtext('knowedit-ledger-create'))"))
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
        keyed = meta.get("hmac_key_id")
        if keyed and self._key is None:
            raise LedgerError(
                f"ledger {self._where} is keyed (HMAC key id {keyed}): give its key with "
                f"{KEY_FILE_ENV}=PATH (or {KEY_ENV})"
            )
        if keyed and keyed != key_id(self._key):  # type: ignore[arg-type]
            raise LedgerError(
                f"the HMAC key given does not match ledger {self._where} (its key id is {keyed}, "
                f"the key given has id {key_id(self._key)})"  # type: ignore[arg-type]
            )
        if not keyed and self._key is not None:
            raise LedgerError(
                f"ledger {self._where} is not keyed, but an HMAC key was given "
                f"({KEY_FILE_ENV} / {KEY_ENV}); unset it to use this ledger"
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
        if self._key is not None:
            meta["hmac_key_id"] = key_id(self._key)
        session.add_all(MetaEntry(key=k, value=v) for k, v in meta.items())
        session.flush()
        return meta

    # ------------------------------------------------------- the chain
    def _verified(self, session: Session, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        """Check every stored event the chain has not verified yet; return the
        decoded events with ``seq > after_seq`` among them (and before them,
        read without re-checking: they were verified earlier). With ``limit``,
        stop after that many events (the rest are checked by a later call).

        Raises:
            LedgerDamaged: an event does not verify (this Ledger then refuses every read).
        """
        with self._chain_lock:
            if self._damage is not None:
                raise LedgerDamaged(self._damage)
            chain = self._chain
            if chain.seq:  # the head verified before must still be there, unchanged
                head_rec = session.scalars(select(EventRecord).where(EventRecord.seq == chain.seq)).first()
                head = None if head_rec is None else head_rec.hash
                if head_rec is not None and head == chain.head:
                    try:
                        head = head if record_digest(head_rec) == head_rec.hash else ""
                    except ValueError:
                        head = ""
                if head != chain.head:
                    self._damage = (
                        f"ledger {self._where} is damaged: event {chain.seq}, verified earlier, "
                        f"{'is gone' if head is None else 'has changed'}; run `knowedit ledger verify`"
                    )
                    raise LedgerDamaged(self._damage)
            out: list[Event] = []
            for rec in iter_records(session, min(after_seq, chain.seq)):
                if rec.seq > chain.seq:
                    bad = chain.problems(rec)
                    if bad:
                        self._damage = (
                            f"ledger {self._where} is damaged: {event_label(rec)}: {'; '.join(bad)}; "
                            "run `knowedit ledger verify`"
                        )
                        raise LedgerDamaged(self._damage)
                if rec.seq > after_seq:
                    out.append(to_event(rec))
                    if limit is not None and len(out) >= limit:
                        break
            return out

    def _extend_chain(self, events: Sequence[Event]) -> None:
        """Our own committed appends (made on the verified head): move the head past them."""
        with self._chain_lock:
            chain = self._chain
            for ev in events:
                if ev.seq == chain.seq + 1 and ev.prev_hash == chain.head:
                    chain.seq, chain.head = ev.seq, ev.hash
                    if ev.kind in APPLY_KINDS:
                        chain.applied.add(ev.edit_id)

    # ---------------------------------------------------------- public API
    @property
    def base_fingerprint(self) -> str:
        """Fingerprint of the base checkpoint this ledger belongs to."""
        return self._fingerprint

    @property
    def keyed(self) -> bool:
        """True when the ledger's events carry an HMAC under a key."""
        return self._key is not None

    @contextmanager
    def transaction(self) -> Iterator[LedgerTxn]:
        """An exclusive write transaction: read new events, compute, append, atomically.

        The writer first waits for its turn in the FIFO writer queue (SQLite
        files) and then takes the database's write lock: ``BEGIN IMMEDIATE`` on
        SQLite, a row lock with ``lock_timeout`` on other databases. Events other
        writers committed meanwhile are verified against the chain before the
        block runs (``txn.events(after_seq=...)`` returns them). Commits on normal
        exit; an exception rolls back (nothing appended) and propagates. Not
        re-entrant; the Ledger's read methods are refused inside it.

        Raises:
            LedgerBusy: the writer waited longer than ``busy_timeout_s``.
            LedgerDamaged: the stored chain does not verify.
        """
        self._live_engine()
        if getattr(self._local, "in_txn", False):
            raise LedgerError("Ledger.transaction() is not re-entrant")
        self._local.in_txn = True
        txn: LedgerTxn | None = None
        try:
            with self._turn(), self._db_errors(), Session(self._write_engine) as session, session.begin():
                if session.get_bind().dialect.name != "sqlite":
                    session.execute(text(f"SET LOCAL lock_timeout = {int(self._busy_timeout_s * 1000)}"))
                # Take the lock now (SQLite: the BEGIN IMMEDIATE; others: a row lock).
                session.execute(
                    select(MetaEntry.key).where(MetaEntry.key == "schema_version").with_for_update()
                )
                start = self._chain.seq
                fresh = self._verified(session, start)
                txn = LedgerTxn(session, self._key, fresh, start)
                yield txn
                session.flush()
            self._extend_chain(txn.appended)
        finally:
            if txn is not None:
                txn._session = None
            self._local.in_txn = False

    @contextmanager
    def _turn(self) -> Iterator[None]:
        if self._queue is None:
            yield
        else:
            with self._queue.turn(self._busy_timeout_s):
                yield

    def events(self, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        """Events with ``seq > after_seq`` in seq order (at most ``limit``), rows
        loaded, chain checked.

        Raises:
            LedgerDamaged: the chain does not verify.
        """
        with self._read() as s:
            return self._verified(s, after_seq, limit)

    def last_seq(self) -> int:
        """The newest event's seq (0 when empty)."""
        with self._read() as s:
            return last_seq(s)

    def get(self, edit_id: str) -> Event:
        """The apply (or learn) event of ``edit_id``; readable even from a damaged
        ledger (``knowedit ledger show``), with no chain check.

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
        """The live (applied or learnt, not reverted) events in seq order, chain checked."""
        with self._read() as s:
            self._verified(s, last_seq(s))
            return [to_event(r) for r in live_records(s)]

    def verify_chain(self) -> list[str]:
        """Check every event's hash, link, seq and HMAC, and the append-only
        triggers; ``[]`` when the ledger is intact.

        Returns:
            One message per bad event, naming it, e.g.
            ``"event 7 (apply e1a2b3c4d5e): hash mismatch"``, and one per missing trigger.
        """
        problems: list[str] = []
        chain = ChainCheck(self._key)
        with self._read() as s:
            for rec in iter_records(s):
                bad = chain.problems(rec)
                for r in rec.rows:
                    try:
                        for raw in (r.before, r.after):
                            tensor_from_bytes(raw, r.dtype, json.loads(r.shape))
                    except (TypeError, ValueError) as exc:
                        bad.append(
                            f"row {r.position} ({r.pool}[{r.slot}]) cannot be decoded: {exc}"
                        )
                if bad:
                    problems.append(f"{event_label(rec)}: " + "; ".join(bad))
            problems.extend(
                f"append-only trigger {name} is missing: the ledger's tables can be rewritten"
                for name in missing_triggers(s.connection())
            )
            if self.path is not None and s.get_bind().dialect.name == "sqlite":
                problems.extend(_trailing_bytes(s, self.path))
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


def _trailing_bytes(session: Session, path: Path) -> list[str]:
    """Bytes appended after the end of a SQLite ledger file (SQLite itself ignores them).

    Under the read transaction the database's size is ``page_count * page_size``;
    pages still in the WAL make the file shorter than that, never longer, and the
    ledger never shrinks, so a longer file was appended to from outside.
    """
    pages = session.execute(text("PRAGMA page_count")).scalar_one()
    size = session.execute(text("PRAGMA page_size")).scalar_one()
    extra = path.stat().st_size - pages * size
    if extra > 0:
        return [f"ledger file {path} has {extra} byte(s) after the end of its database: it was appended to"]
    return []


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
