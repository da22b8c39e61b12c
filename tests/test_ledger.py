"""Tests for the edit ledger: opening, bit-exact rows, the hash chain, reverts,
append-only storage, atomic transactions and two writer processes."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from base64 import b64decode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sqlalchemy import Engine, event

import knowedit.ledger as ledger_module
import knowedit.ledger_schema as schema_module
from knowedit.ledger import Event, Ledger, LedgerError, RowChange

FP = "a" * 64
OTHER_FP = "b" * 64


def _row(slot: int, d: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> RowChange:
    g = torch.Generator().manual_seed(seed * 1000 + slot)
    return RowChange(
        "pool", slot, torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    )


def _apply(led: Ledger, *slots: int, metrics: dict | None = None) -> Event:
    with led.transaction() as txn:
        return txn.append_apply(
            {"prompt": "p", "target_new": "t"},
            "sparse",
            {"lr": 0.1},
            metrics or {"loss": 0.5},
            [_row(s) for s in slots],
            author="tester",
            note="n",
        )


def _revert(led: Ledger, edit_id: str) -> Event:
    with led.transaction() as txn:
        return txn.append_revert(edit_id)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, so NaN payloads and -0.0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@contextmanager
def _raw(path: Path, restore_triggers: bool = True) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection that bypasses the append-only triggers (a tamperer),
    who puts the triggers back afterwards unless ``restore_triggers`` is False."""
    con = sqlite3.connect(path, isolation_level=None)
    triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _ in triggers:
        con.execute(f"DROP TRIGGER {name}")
    try:
        yield con
    finally:
        if restore_triggers:
            for _, sql in triggers:
                con.execute(sql)
        con.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


# ---------------------------------------------------------------- opening
def test_create_and_reopen(db: Path) -> None:
    led = Ledger(db, FP)
    assert led.base_fingerprint == FP and led.last_seq() == 0 and led.events() == []
    ev = _apply(led, 1, 2)
    led.close()
    again = Ledger(str(db), FP, create=False)
    (back,) = again.events()
    assert (back.seq, back.edit_id, back.hash, back.kind) == (1, ev.edit_id, ev.hash, "apply")
    assert back.request == {"prompt": "p", "target_new": "t"} and back.author == "tester"
    assert back.prev_hash == "0" * 64 and re.fullmatch(r"e[0-9a-f]{10}", back.edit_id)
    assert back.created_at.endswith("+00:00")
    again.close()
    with Ledger(f"sqlite:///{db}", FP) as by_url:  # a SQLAlchemy URL works too
        assert by_url.last_seq() == 1


def test_in_memory() -> None:
    led = Ledger("sqlite://", FP)
    ev = _apply(led, 3)
    assert led.get(ev.edit_id).rows[0].slot == 3 and led.verify_chain() == []


def test_missing_file_without_create(db: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger at"):
        Ledger(db, FP, create=False)
    assert not db.exists()


def test_schema_version_mismatch(db: Path) -> None:
    Ledger(db, FP).close()
    with _raw(db) as con:
        con.execute("UPDATE ledger_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema version 99.*schema version 2"):
        Ledger(db, FP)


def test_wrong_base_refused(db: Path) -> None:
    Ledger(db, FP).close()
    with pytest.raises(
        LedgerError, match="ledger belongs to base model aaaaaaaaaaaa, not bbbbbbbbbbbb"
    ):
        Ledger(db, OTHER_FP)


def test_garbage_file(db: Path) -> None:
    db.write_bytes(os.urandom(4096))
    with pytest.raises(LedgerError, match="not a SQLite database"):
        Ledger(db, FP)
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))  # right magic, garbage after
    with pytest.raises(LedgerError, match="not a SQLite database|corrupt"):
        Ledger(db, FP)


def test_truncated_file(db: Path) -> None:
    led = Ledger(db, FP)
    for i in range(10):
        _apply(led, *range(i * 8, i * 8 + 8))
    led.close()
    data = db.read_bytes()
    assert len(data) > 8 * 4096
    db.write_bytes(data[: len(data) // 2])
    with pytest.raises(LedgerError, match="corrupt or truncated"):
        Ledger(db, FP).events()


def test_other_sqlite_database_refused(db: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (x)")
    with pytest.raises(LedgerError, match="not a knowedit ledger"):
        Ledger(db, FP)


def test_path_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="is a file, not a directory"):
        Ledger(blocker / "ledger.db", FP)
    with pytest.raises(LedgerError, match="does not exist"):
        Ledger(tmp_path / "nope" / "ledger.db", FP)
    with pytest.raises(LedgerError, match="is a directory"):
        Ledger(tmp_path, FP)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LedgerError, match="read-only"):
            Ledger(ro / "ledger.db", FP)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------- rows
def _roundtrip(led: Ledger, before: torch.Tensor, after: torch.Tensor) -> RowChange:
    with led.transaction() as txn:
        ev = txn.append_apply({}, "m", {}, {}, [RowChange("pool", 0, before, after)])
    (row,) = led.get(ev.edit_id).rows
    return row


def test_row_roundtrip_bit_exact_float32() -> None:
    led = Ledger("sqlite://", FP)

    @settings(max_examples=40, deadline=None)
    @given(bits=arrays(np.uint32, st.integers(1, 64)), values=arrays(np.float32, 3))
    def check(bits: np.ndarray, values: np.ndarray) -> None:
        before = torch.from_numpy(bits.view(np.float32).copy())  # every bit pattern, NaNs too
        after = torch.from_numpy(np.resize(values, before.shape).astype(np.float32))
        row = _roundtrip(led, before, after)
        assert row.before.dtype == torch.float32 and row.before.shape == before.shape
        assert torch.equal(_bits(row.before), _bits(before))
        assert torch.equal(_bits(row.after), _bits(after))

    check()


@pytest.mark.parametrize(
    ("dtype", "patterns"),
    [
        # quiet NaN with payload, negative NaN, signalling NaN, -0.0, -inf, smallest subnormal
        (torch.float32, [0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0xFF800000, 0x00000001]),
        (torch.bfloat16, [0x7FC1, 0xFFFF, 0x7F81, 0x8000, 0xFF80, 0x0001]),
        (torch.float16, [0x7E01, 0xFFFF, 0x7C01, 0x8000, 0xFC00, 0x0001]),
    ],
)
def test_row_roundtrip_special_bits(dtype: torch.dtype, patterns: list[int]) -> None:
    itype = {torch.float32: torch.int64, torch.bfloat16: torch.int32, torch.float16: torch.int32}
    signed = [
        p - (1 << (8 * dtype.itemsize)) if p >> (8 * dtype.itemsize - 1) else p for p in patterns
    ]
    small = _bits(torch.zeros(1, dtype=dtype)).dtype
    before = torch.tensor(signed, dtype=itype[dtype]).to(small).view(dtype)
    after = -before
    row = _roundtrip(Ledger("sqlite://", FP), before, after)
    assert row.before.dtype == dtype
    assert torch.equal(_bits(row.before), _bits(before)) and torch.equal(
        _bits(row.after), _bits(after)
    )


def test_bad_rows_refused() -> None:
    led = Ledger("sqlite://", FP)
    cases = [
        (
            RowChange("pool", 1, torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)),
            "before is float32",
        ),
        (RowChange("pool", 1, torch.zeros(4), torch.zeros(5)), "before is float32"),
        (
            RowChange("pool", 1, torch.zeros(4, dtype=torch.int64), torch.zeros(4)),
            "unsupported row dtype",
        ),
        (RowChange("pool", -1, torch.zeros(4), torch.zeros(4)), "slot must be >= 0"),
    ]
    for row, msg in cases:
        with pytest.raises(LedgerError, match=msg), led.transaction() as txn:
            txn.append_apply({}, "m", {}, {}, [row])
    with pytest.raises(LedgerError, match="appears twice"), led.transaction() as txn:
        txn.append_apply({}, "m", {}, {}, [_row(1), _row(1)])
    with pytest.raises(LedgerError, match="not JSON-serialisable"), led.transaction() as txn:
        txn.append_apply({"x": object()}, "m", {}, {}, [_row(1)])
    assert led.last_seq() == 0


def test_json_payloads_normalised() -> None:
    led = Ledger("sqlite://", FP)
    ev = _apply(
        led,
        1,
        metrics={"nan": float("nan"), "np": np.float32(0.5), "t": torch.tensor(2), "tup": (1, 2)},
    )
    got = led.get(ev.edit_id).metrics
    assert got["np"] == 0.5 and got["t"] == 2 and got["tup"] == [1, 2] and got["nan"] != got["nan"]
    assert led.verify_chain() == []


# ---------------------------------------------------------------- the chain
def test_intact_chain_verifies(db: Path) -> None:
    led = Ledger(db, FP)
    a = _apply(led, 1, 2)
    _apply(led, 3)
    _revert(led, a.edit_id)
    evs = led.events()
    assert [e.seq for e in evs] == [1, 2, 3]
    assert all(e.prev_hash == p.hash for p, e in zip(evs[:-1], evs[1:], strict=True))
    assert led.verify_chain() == []


def test_tampered_row_bytes_detected(db: Path) -> None:
    led = Ledger(db, FP)
    _apply(led, 1)
    victim = _apply(led, 2, 3)
    _apply(led, 4)
    with _raw(db) as con:
        (rid, before) = con.execute(
            "SELECT r.id, r.before FROM ledger_rows r JOIN ledger_events e ON r.event_id = e.id "
            "WHERE e.seq = 2 ORDER BY r.position DESC"
        ).fetchone()
        flipped = bytes([before[0] ^ 1]) + before[1:]
        con.execute("UPDATE ledger_rows SET before = ? WHERE id = ?", (flipped, rid))
    (msg,) = led.verify_chain()
    assert msg.startswith(f"event 2 (apply {victim.edit_id})") and "hash mismatch" in msg
    with _raw(db) as con:  # a wrong byte count is also undecodable
        con.execute("UPDATE ledger_rows SET before = ? WHERE id = ?", (flipped[:-1], rid))
    (msg,) = led.verify_chain()
    assert "event 2" in msg and "cannot be decoded" in msg
    with pytest.raises(LedgerError, match="event 2"):
        led.events()


def test_tampered_metrics_detected(db: Path) -> None:
    led = Ledger(db, FP)
    _apply(led, 1)
    victim = _apply(led, 2, metrics={"reliability": 0.25})
    with _raw(db) as con:
        con.execute("UPDATE ledger_events SET metrics = ? WHERE seq = 2", ('{"reliability":1.0}',))
    assert led.verify_chain() == [f"event 2 (apply {victim.edit_id}): hash mismatch"]


def test_tampered_hash_and_deleted_event_detected(db: Path) -> None:
    led = Ledger(db, FP)
    evs = [_apply(led, i) for i in range(5)]
    with _raw(db) as con:
        con.execute("UPDATE ledger_events SET hash = ? WHERE seq = 2", ("f" * 64,))
    problems = led.verify_chain()
    assert problems[0] == f"event 2 (apply {evs[1].edit_id}): hash mismatch"
    assert problems[1] == f"event 3 (apply {evs[2].edit_id}): prev_hash does not link to event 2"
    with _raw(db) as con:
        con.execute("DELETE FROM ledger_events WHERE seq = 4")
    problems = led.verify_chain()
    assert any(p.startswith("event 5") and "seq gap" in p and "event 3" in p for p in problems)


def test_storage_is_append_only(db: Path) -> None:
    sources = [Path(m.__file__).read_text() for m in (ledger_module, schema_module)]
    dml = re.compile(
        r"\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b|\b(update|delete)\(|\.delete\(", re.I
    )
    assert not any(dml.search(src) for src in sources)

    seen: list[str] = []

    def record(conn, cursor, statement, params, context, executemany) -> None:  # noqa: ANN001
        seen.append(statement.lstrip().upper())

    event.listen(Engine, "before_cursor_execute", record)
    try:
        led = Ledger(db, FP)
        a = _apply(led, 1)
        _apply(led, 1)
        _revert(led, a.edit_id)
        led.verify_chain()
        led.export_jsonl(io.StringIO())
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert seen and not [s for s in seen if s.startswith(("UPDATE", "DELETE"))]
    with sqlite3.connect(db) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE ledger_events SET note = 'x'")
    with sqlite3.connect(db) as con, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM ledger_rows")


# ---------------------------------------------------------------- reverts
def test_unknown_id_and_double_revert() -> None:
    led = Ledger("sqlite://", FP)
    with pytest.raises(LedgerError, match="unknown edit id 'nope'"):
        led.get("nope")
    with pytest.raises(LedgerError, match="unknown edit id 'nope'"):
        _revert(led, "nope")
    a = _apply(led, 1)
    rev = _revert(led, a.edit_id)
    assert (rev.kind, rev.edit_id, rev.rows, rev.method, rev.request) == (
        "revert",
        a.edit_id,
        [],
        "",
        {},
    )
    with pytest.raises(LedgerError, match="already reverted"):
        _revert(led, a.edit_id)
    assert led.last_seq() == 2 and not led.is_live("nope")


def test_live_edits_after_applies_and_reverts() -> None:
    led = Ledger("sqlite://", FP)
    a, b, c = (_apply(led, i) for i in range(3))
    with led.transaction() as txn:
        txn.append_revert(b.edit_id, request={"cascade_of": a.edit_id})
        assert txn.live_ids() == [a.edit_id, c.edit_id]
    d = _apply(led, 4)
    assert [e.edit_id for e in led.live_edits()] == [a.edit_id, c.edit_id, d.edit_id]
    assert led.is_live(a.edit_id) and not led.is_live(b.edit_id)
    assert led.events(after_seq=3)[0].request == {"cascade_of": a.edit_id}
    assert led.get(b.edit_id).kind == "apply"  # get returns the apply even after a revert


# ----------------------------------------------------------- transactions
def test_rollback_on_exception_appends_nothing(db: Path) -> None:
    led = Ledger(db, FP)
    _apply(led, 1)
    with pytest.raises(RuntimeError, match="boom"), led.transaction() as txn:
        txn.append_apply({}, "m", {}, {}, [_row(2)])
        assert txn.last_seq() == 2
        raise RuntimeError("boom")
    assert led.last_seq() == 1 and led.verify_chain() == []
    assert _apply(led, 3).seq == 2  # the chain continues from the committed head


def test_transaction_guards(db: Path) -> None:
    led = Ledger(db, FP)
    with led.transaction() as txn:
        with pytest.raises(LedgerError, match="not re-entrant"), led.transaction():
            pass
        with pytest.raises(LedgerError, match="use the LedgerTxn"):
            led.events()
    with pytest.raises(LedgerError, match="has ended"):
        txn.events()
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        led.events()


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from knowedit.ledger import Ledger, RowChange

    path, fp, wid, tmp = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    led = Ledger(path, fp)  # both may create the file at once
    (tmp / f"ready{wid}").touch()
    deadline = time.time() + 30
    while not all((tmp / f"ready{w}").exists() for w in (0, 1)) and time.time() < deadline:
        time.sleep(0.005)
    for i in range(30):
        with led.transaction() as txn:
            seen = txn.last_seq()
            txn.events(after_seq=max(seen - 1, 0))
            row = torch.full((4,), float(i))
            txn.append_apply({"worker": wid, "i": i, "seen": seen}, "test", {}, {},
                             [RowChange("pool", wid * 100 + i, row, row + 1)])
    led.close()
    """
)


def test_two_processes_serialise(db: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db), FP, str(w), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    led = Ledger(db, FP)
    evs = led.events()
    assert [e.seq for e in evs] == list(range(1, 61))
    # Each append saw exactly the events before it: read-then-append was atomic.
    assert all(e.request["seen"] == e.seq - 1 for e in evs)
    assert sorted(e.request["worker"] for e in evs) == [0] * 30 + [1] * 30
    assert led.verify_chain() == []


# ------------------------------------------------------------------ export
def test_export_jsonl(db: Path) -> None:
    led = Ledger(db, FP)
    a = _apply(led, 1, 2)
    _revert(led, a.edit_id)
    buf = io.StringIO()
    assert led.export_jsonl(buf) == 2
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["edit_id"] == a.edit_id and first["hash"] == a.hash and second["kind"] == "revert"
    row = first["rows"][1]
    assert (row["pool"], row["slot"], row["dtype"], row["shape"]) == ("pool", 2, "float32", [8])
    got = torch.frombuffer(bytearray(b64decode(row["after"])), dtype=torch.float32)
    assert torch.equal(_bits(got), _bits(a.rows[1].after))
