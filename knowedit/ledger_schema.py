"""The ledger's storage format: event dataclasses, SQL tables, byte and hash
encodings, and the store functions over a ``Session`` (``knowedit.ledger`` has
the ``Ledger`` that owns engines and transactions).

Three tables, all append-only:

``ledger_meta``
    key/value pairs written once when the ledger is created: the schema
    version, the fingerprint of the base checkpoint and, for a keyed ledger,
    the id of its HMAC key.
``ledger_events``
    one row per ``apply``, ``learn`` or ``revert``, in ``seq`` order, with its
    JSON payloads stored as canonical JSON text, its chained sha256 hash and,
    in a keyed ledger, an HMAC of that hash.
``ledger_rows``
    one row per changed value row of an ``apply`` or ``learn``: memory (pool)
    name, slot, dtype name, shape (JSON), and the raw ``before``/``after`` bytes.

Triggers (SQLite, and PL/pgSQL ones on PostgreSQL) abort any UPDATE or DELETE
on these tables (and TRUNCATE on PostgreSQL), so a bug in the caller cannot
rewrite history; deliberate tampering (dropping the triggers) is caught by
the hash chain, and recomputed hashes by the keyed HMAC. Store functions take
a ``Session`` inside a transaction the caller owns, and flush; they never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from sqlalchemy import (
    DDL,
    CheckConstraint,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from knowedit.errors import KnoweditError

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event."""

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _FLOAT_DTYPES[_name] = getattr(torch, _name)


class LedgerError(KnoweditError):
    """Any user-facing ledger failure; the message names the problem."""


class LedgerMissing(LedgerError):
    """There is no ledger at that location yet (no file, or no ledger tables)."""


class LedgerDamaged(LedgerError):
    """The stored chain does not verify: a changed, dropped or reordered event."""


APPLY_KINDS = ("apply", "learn")
"""Event kinds that change value rows (and can be reverted)."""
EVENT_KINDS = (*APPLY_KINDS, "revert")


@dataclass(eq=False, slots=True)
class RowChange:
    """One value row changed by an edit.

    Attributes:
        pool: memory (value pool) name, e.g. ``"pool"``.
        slot: row index in that pool.
        before: the row before the edit, shape ``(d,)``, any float dtype.
        after: the row after the edit, same dtype and shape as ``before``.
    """

    pool: str
    slot: int
    before: torch.Tensor
    after: torch.Tensor


@dataclass
class Event:
    """One ledger event, as read back (tensors decoded from the stored bytes).

    Attributes:
        seq: position in the ledger, 1, 2, 3, ...
        kind: ``"apply"`` (an edit), ``"learn"`` (a learning run's committed
            part) or ``"revert"``.
        edit_id: the new event's id (apply, learn) or the id it reverts (revert).
        created_at: ISO-8601 UTC timestamp.
        author: who made the event, if known.
        note: free text.
        request: the edit request (apply) or e.g. ``{"cascade_of": id}`` (revert).
        method: editing method name (apply) or ``""`` (revert).
        settings: method settings (JSON).
        metrics: edit metrics (JSON).
        rows: the changed rows (apply, learn) or ``[]`` (revert).
        prev_hash: the previous event's hash (64 zeros for the first).
        hash: sha256 over ``prev_hash`` and this event's canonical encoding.
        mac: HMAC-SHA256 of ``hash`` under the ledger's key (keyed ledgers), else None.
    """

    seq: int
    kind: str
    edit_id: str
    created_at: str
    author: str | None
    note: str | None
    request: dict
    method: str
    settings: dict
    metrics: dict
    rows: list[RowChange]
    prev_hash: str
    hash: str
    mac: str | None = None


# ------------------------------------------------------------------- tables
SCHEMA_VERSION = 2
"""Bump when the tables or the hash encoding change; old ledgers are refused.
2: ``learn`` events, the ``mac`` column, PostgreSQL append-only triggers."""

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class LedgerBase(DeclarativeBase):
    """Declarative base of the ledger tables (own metadata, named constraints)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MetaEntry(LedgerBase):
    """One ``key = value`` fact about the ledger (schema version, base fingerprint)."""

    __tablename__ = "ledger_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class EventRecord(LedgerBase):
    """One stored ledger event; JSON payloads are canonical JSON text."""

    __tablename__ = "ledger_events"
    __table_args__ = (
        # An id is applied once and reverted at most once.
        UniqueConstraint("kind", "edit_id"),
        CheckConstraint("kind IN ('apply', 'learn', 'revert')", name="kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    edit_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[str] = mapped_column(String(40))
    author: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    request_json: Mapped[str] = mapped_column("request", Text)
    method: Mapped[str] = mapped_column(String(64))
    settings_json: Mapped[str] = mapped_column("settings", Text)
    metrics_json: Mapped[str] = mapped_column("metrics", Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(64))
    """HMAC-SHA256 of ``hash`` under the ledger key (keyed ledgers only)."""

    rows: Mapped[list[RowRecord]] = relationship(
        back_populates="event", order_by="RowRecord.position", lazy="selectin"
    )


class RowRecord(LedgerBase):
    """One changed value row of an ``apply`` event, as raw bytes (never pickle)."""

    __tablename__ = "ledger_rows"
    __table_args__ = (
        UniqueConstraint("event_id", "position"),
        Index("ix_ledger_rows_pool_slot", "pool", "slot"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("ledger_events.id"), index=True)
    position: Mapped[int]
    """Order of the row within its event (the hash covers rows in this order)."""
    pool: Mapped[str] = mapped_column(String(128))
    slot: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(32))
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``, ``bfloat16``."""
    shape: Mapped[str] = mapped_column(String(128))
    """JSON list of ints, e.g. ``[512]``."""
    before: Mapped[bytes] = mapped_column(LargeBinary)
    after: Mapped[bytes] = mapped_column(LargeBinary)

    event: Mapped[EventRecord] = relationship(back_populates="rows")


APPEND_ONLY_MESSAGE = "the knowedit ledger is append-only"

PG_GUARD_FUNCTION = "knowedit_ledger_append_only"


def trigger_names(table: str) -> list[str]:
    """The append-only triggers every ledger table must have."""
    return [f"trg_{table}_no_update", f"trg_{table}_no_delete"]


LEDGER_TABLES = ("ledger_meta", "ledger_events", "ledger_rows")


def _forbid_rewrites(table: Table) -> None:
    """Attach triggers that abort every UPDATE and DELETE on ``table`` (SQLite and
    PostgreSQL; on PostgreSQL also TRUNCATE)."""
    for op, name in zip(("UPDATE", "DELETE"), trigger_names(table.name)):
        sqlite_ddl = DDL(
            f"CREATE TRIGGER {name} BEFORE {op} ON {table.name} "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY_MESSAGE}'); END"
        )
        event.listen(table, "after_create", sqlite_ddl.execute_if(dialect="sqlite"))
        op_pg = "DELETE OR TRUNCATE" if op == "DELETE" else op
        row_level = "" if op == "DELETE" else " FOR EACH ROW"  # TRUNCATE triggers are per statement
        pg_ddl = DDL(
            f"CREATE TRIGGER {name} BEFORE {op_pg} ON {table.name}{row_level} "
            f"EXECUTE FUNCTION {PG_GUARD_FUNCTION}()"
        )
        event.listen(table, "after_create", pg_ddl.execute_if(dialect="postgresql"))


_PG_FUNCTION_DDL = DDL(
    f"CREATE OR REPLACE FUNCTION {PG_GUARD_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}'; END $$"
)


for _model in (MetaEntry, EventRecord, RowRecord):
    event.listen(_model.__table__, "before_create", _PG_FUNCTION_DDL.execute_if(dialect="postgresql"))
    _forbid_rewrites(_model.__table__)  # type: ignore[arg-type]


def missing_triggers(conn: Connection) -> list[str]:
    """Append-only triggers that should exist on this database but do not.

    SQLite and PostgreSQL only; other dialects report nothing (their append-only
    rules are the operator's, documented in docs/ledger.md).
    """
    dialect = conn.dialect.name
    if dialect == "sqlite":
        have = set(conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars())
    elif dialect == "postgresql":
        have = set(
            conn.exec_driver_sql(
                "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE NOT t.tgisinternal AND c.relname IN ('ledger_meta', 'ledger_events', 'ledger_rows') "
                "AND c.relnamespace = to_regnamespace(current_schema())::oid AND t.tgenabled <> 'D'"
            ).scalars()
        )
    else:
        return []
    want = [name for table in LEDGER_TABLES for name in trigger_names(table)]
    return [name for name in want if name not in have]


# ----------------------------------------------------------------- encoding


def _canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that the hash covers (sorted keys, no spaces)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True
    )


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and tensors in metrics are common; store them as plain numbers.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _to_json_text(value: Any, what: str) -> str:
    """Validate a JSON payload (a dict) and return its canonical text."""
    if not isinstance(value, dict):
        raise LedgerError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        # Round trip first so tuples, numpy numbers etc. hash as what is read back.
        plain = json.loads(json.dumps(value, default=_json_default, allow_nan=True))
        return _canonical_json(plain)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{what} is not JSON-serialisable: {exc}") from exc


def tensor_to_bytes(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    """Encode a float tensor as (dtype name, shape, raw bytes); bit-exact, no pickle.

    Args:
        t: any floating-point tensor, e.g. a value row of shape ``(d,)``.

    Returns:
        ``("float32", [d], raw)`` where ``raw`` holds ``d * 4`` bytes in native
        order (little-endian on x86 and ARM).
    """
    if not isinstance(t, torch.Tensor):
        raise LedgerError(f"expected a torch.Tensor, got {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in _FLOAT_DTYPES:
        raise LedgerError(
            f"unsupported row dtype {name!r} (expected one of {sorted(_FLOAT_DTYPES)})"
        )
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    raw = flat.view(torch.uint8).numpy().tobytes()  # (numel * itemsize,)
    return name, list(t.shape), raw


def tensor_from_bytes(raw: bytes, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Decode :func:`tensor_to_bytes` output back into a fresh tensor (bit-exact).

    Raises:
        ValueError: unknown dtype, bad shape, or a byte count that does not match.
    """
    dt = _FLOAT_DTYPES.get(dtype)
    if dt is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"bad shape {shape!r}")
    want = math.prod(shape) * dt.itemsize
    if len(raw) != want:
        raise ValueError(f"{len(raw)} bytes, expected {want} for {dtype}{list(shape)}")
    if want == 0:
        return torch.empty(tuple(shape), dtype=dt)
    # bytearray: a private writable copy, so the tensor owns its memory.
    return torch.frombuffer(bytearray(raw), dtype=dt).reshape(tuple(shape))


def record_digest(rec: EventRecord) -> str:
    """sha256 chaining ``rec.prev_hash`` with the canonical encoding of ``rec``.

    Raises:
        ValueError: a stored JSON field or row shape cannot be parsed.
    """
    payload: dict[str, Any] = {
        "seq": rec.seq,
        "kind": rec.kind,
        "edit_id": rec.edit_id,
        "created_at": rec.created_at,
        "author": rec.author,
        "note": rec.note,
        "method": rec.method,
    }
    for field, text in (
        ("request", rec.request_json),
        ("settings", rec.settings_json),
        ("metrics", rec.metrics_json),
    ):
        try:
            payload[field] = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{field} is not valid JSON") from exc
    rows = []
    for r in rec.rows:
        try:
            shape = json.loads(r.shape)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"row {r.position} shape is not valid JSON") from exc
        rows.append(
            {
                "pool": r.pool,
                "slot": r.slot,
                "dtype": r.dtype,
                "shape": shape,
                "before_sha256": hashlib.sha256(r.before).hexdigest(),
                "after_sha256": hashlib.sha256(r.after).hexdigest(),
            }
        )
    payload["rows"] = rows
    return hashlib.sha256((rec.prev_hash + _canonical_json(payload)).encode("utf-8")).hexdigest()


def event_label(rec: EventRecord) -> str:
    return f"event {rec.seq} ({rec.kind} {rec.edit_id})"


def key_id(key: bytes) -> str:
    """A public id of an HMAC key (stored in the ledger's meta; it does not reveal the key)."""
    return hmac.new(key, b"knowedit-ledger-key-id/v1", hashlib.sha256).hexdigest()[:16]


def event_mac(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of an event's chained hash under the ledger key."""
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


class ChainCheck:
    """Follows the hash chain one stored record at a time, in seq order.

    It remembers the last verified head (seq, hash) and the ids applied so
    far, so a later refresh checks only the new events, linked to that head.

    Args:
        key: the ledger's HMAC key (keyed ledgers), else None.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.seq = 0
        self.head = GENESIS_HASH
        self.applied: set[str] = set()

    def problems(self, rec: EventRecord) -> list[str]:
        """What is wrong with ``rec`` as the next event (``[]`` when it verifies);
        the head moves on to ``rec`` either way."""
        bad: list[str] = []
        if rec.seq != self.seq + 1:
            bad.append(f"seq gap (expected {self.seq + 1})")
        if rec.prev_hash != self.head:
            bad.append(
                f"prev_hash does not link to event {self.seq}"
                if self.seq
                else "prev_hash is not the genesis hash (64 zeros)"
            )
        try:
            if record_digest(rec) != rec.hash:
                bad.append("hash mismatch")
        except ValueError as exc:
            bad.append(str(exc))
        if self.key is not None and not (
            isinstance(rec.mac, str) and hmac.compare_digest(rec.mac, event_mac(self.key, rec.hash))
        ):
            bad.append("HMAC mismatch (the event was changed or its hash recomputed)")
        if rec.kind in APPLY_KINDS:
            self.applied.add(rec.edit_id)
        elif rec.kind == "revert":
            if rec.edit_id not in self.applied:
                bad.append("reverts an edit that was not applied before it")
        else:
            bad.append(f"unknown kind {rec.kind!r}")
        self.seq, self.head = rec.seq, rec.hash
        return bad


def to_event(rec: EventRecord) -> Event:
    """Decode a stored record; a row or JSON that cannot be decoded is a LedgerError."""
    try:
        rows = [
            RowChange(
                pool=r.pool,
                slot=r.slot,
                before=tensor_from_bytes(r.before, r.dtype, json.loads(r.shape)),
                after=tensor_from_bytes(r.after, r.dtype, json.loads(r.shape)),
            )
            for r in rec.rows
        ]
        request, settings, metrics = (
            json.loads(t) for t in (rec.request_json, rec.settings_json, rec.metrics_json)
        )
    except (TypeError, ValueError) as exc:
        raise LedgerError(
            f"{event_label(rec)} cannot be decoded ({exc}); run `knowedit ledger verify`"
        ) from exc
    return Event(
        seq=rec.seq,
        kind=rec.kind,
        edit_id=rec.edit_id,
        created_at=rec.created_at,
        author=rec.author,
        note=rec.note,
        request=request,
        method=rec.method,
        settings=settings,
        metrics=metrics,
        rows=rows,
        prev_hash=rec.prev_hash,
        hash=rec.hash,
        mac=rec.mac,
    )


# ---------------------------------------------------------- store functions
# Each takes a Session inside a transaction the caller owns, and flushes.
def load_events(session: Session, after_seq: int = 0) -> list[Event]:
    """Events with ``seq > after_seq`` in seq order, rows decoded."""
    recs = session.scalars(
        select(EventRecord).where(EventRecord.seq > after_seq).order_by(EventRecord.seq)
    )
    return [to_event(r) for r in recs]


def iter_records(session: Session, after_seq: int = 0, batch: int = 256) -> Iterator[EventRecord]:
    """Stored records in seq order, ``batch`` events (with rows) at a time."""
    cursor = after_seq
    while True:
        recs = list(
            session.scalars(
                select(EventRecord)
                .where(EventRecord.seq > cursor)
                .order_by(EventRecord.seq)
                .limit(batch)
            )
        )
        yield from recs
        if len(recs) < batch:
            return
        cursor = recs[-1].seq
        session.expunge_all()  # keep memory flat on long ledgers


def last_seq(session: Session) -> int:
    """The newest event's seq, or 0 for an empty ledger."""
    return session.scalar(select(func.max(EventRecord.seq))) or 0


def find_apply(session: Session, edit_id: str) -> EventRecord | None:
    """The apply (or learn) record of ``edit_id``, or ``None``."""
    return session.scalars(
        select(EventRecord).where(EventRecord.kind.in_(APPLY_KINDS), EventRecord.edit_id == edit_id)
    ).first()


def find_revert_seq(session: Session, edit_id: str) -> int | None:
    """Seq of the revert of ``edit_id``, or ``None`` if it was never reverted."""
    return session.scalar(
        select(EventRecord.seq).where(EventRecord.kind == "revert", EventRecord.edit_id == edit_id)
    )


def live_records(session: Session) -> list[EventRecord]:
    """Apply and learn records that have no revert, in seq order."""
    reverted = select(EventRecord.edit_id).where(EventRecord.kind == "revert")
    return list(
        session.scalars(
            select(EventRecord)
            .where(EventRecord.kind.in_(APPLY_KINDS), EventRecord.edit_id.not_in(reverted))
            .order_by(EventRecord.seq)
        )
    )


def new_edit_id(session: Session, prefix: str = "e") -> str:
    while True:  # 40 random bits; a collision is astronomically rare but checked
        edit_id = prefix + secrets.token_hex(5)
        if find_apply(session, edit_id) is None:
            return edit_id


def _encode_rows(rows: Sequence[RowChange]) -> list[RowRecord]:
    out: list[RowRecord] = []
    seen: set[tuple[str, int]] = set()
    for i, rc in enumerate(rows):
        if not isinstance(rc, RowChange):
            raise LedgerError(f"rows[{i}] must be a RowChange, got {type(rc).__name__}")
        if not isinstance(rc.pool, str) or not rc.pool:
            raise LedgerError(f"rows[{i}].pool must be a non-empty string")
        try:
            slot = int(rc.slot.__index__())
        except (AttributeError, TypeError):
            raise LedgerError(f"rows[{i}].slot must be an int, got {rc.slot!r}") from None
        if slot < 0:
            raise LedgerError(f"rows[{i}].slot must be >= 0, got {slot}")
        if (rc.pool, slot) in seen:
            raise LedgerError(f"rows[{i}]: {rc.pool}[{slot}] appears twice in one edit")
        seen.add((rc.pool, slot))
        dtype, shape, before = tensor_to_bytes(rc.before)
        dtype_a, shape_a, after = tensor_to_bytes(rc.after)
        if (dtype, shape) != (dtype_a, shape_a):
            raise LedgerError(
                f"rows[{i}] ({rc.pool}[{slot}]): before is {dtype}{shape} but after is {dtype_a}{shape_a}"
            )
        out.append(
            RowRecord(
                position=i,
                pool=rc.pool,
                slot=slot,
                dtype=dtype,
                shape=_canonical_json(shape),
                before=before,
                after=after,
            )
        )
    return out


def append_event(
    session: Session,
    *,
    kind: str,
    edit_id: str,
    request: dict,
    method: str,
    settings: dict,
    metrics: dict,
    rows: Sequence[RowChange],
    author: str | None,
    note: str | None,
    key: bytes | None = None,
) -> Event:
    """Append one event after the current last one, chain its hash, and flush.

    The caller must hold the write lock (``Ledger.transaction``) so that the
    seq and ``prev_hash`` read here are still the newest at commit. With a
    ``key``, the event also carries the HMAC of its hash.
    """
    if kind not in EVENT_KINDS:
        raise LedgerError(f"unknown event kind {kind!r} (one of {', '.join(EVENT_KINDS)})")
    for what, text in (("author", author), ("note", note)):
        if text is not None and not isinstance(text, str):
            raise LedgerError(f"{what} must be a string or None, got {type(text).__name__}")
    if not isinstance(method, str):
        raise LedgerError(f"method must be a string, got {type(method).__name__}")
    last = session.execute(
        select(EventRecord.seq, EventRecord.hash).order_by(EventRecord.seq.desc()).limit(1)
    ).first()
    rec = EventRecord(
        seq=(last.seq + 1) if last else 1,
        kind=kind,
        edit_id=edit_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        author=author,
        note=note,
        request_json=_to_json_text(request, "request"),
        method=method,
        settings_json=_to_json_text(settings, "settings"),
        metrics_json=_to_json_text(metrics, "metrics"),
        prev_hash=last.hash if last else GENESIS_HASH,
        hash="",
    )
    rec.rows = _encode_rows(rows)
    rec.hash = record_digest(rec)
    rec.mac = event_mac(key, rec.hash) if key is not None else None
    session.add(rec)
    session.flush()
    return to_event(rec)
