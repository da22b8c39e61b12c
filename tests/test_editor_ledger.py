"""The Editor and its ledger together: every edit is logged, the live model is
always base + replay of the ledger (bit for bit), reverts are exact, bad input
and foreign/corrupt/tampered ledgers are refused or reported, two processes
can edit one model at once, and the CLI exposes all of it.

Every test works on its own copy of the session's ``tiny_ckpt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import clean_failure
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from ledger_helpers import assert_same_pools, replay
from typer.testing import CliRunner

from knowedit.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from knowedit.cli.app import app
from knowedit.data import EditRequest, load_records
from knowedit.editor import LEDGER_FILE, EditError, Editor
from knowedit.inference import PromptError
from knowedit.ledger import Event, Ledger, LedgerDamaged, LedgerError

REPO = Path(__file__).resolve().parents[1]

#: Small optimisation budgets keep every edit well under a second on the tiny model.
STEPS = 20

#: Edits per process in the two-process test (the issue's full size is 50; see the slow test).
CONCURRENT_EDITS = 10
CONCURRENT_EDITS_FULL = 50


# ------------------------------------------------------------------ helpers
def copy_model(src: Path, root: Path, name: str = "model") -> Path:
    dst = root / name
    shutil.copytree(src, dst)
    return dst


def requests(model_dir: Path) -> list[EditRequest]:
    return load_records(model_dir / "edits.jsonl")


def base_pools(model_dir: Path) -> dict[str, torch.Tensor]:
    """The base checkpoint's value pools, read from model.safetensors (not from an Editor)."""
    model = load_checkpoint(model_dir).model
    return {p.name: p.values.detach().clone() for p in model.pools.values()}


def live_pools(ed: Editor) -> dict[str, torch.Tensor]:
    return {name: v.detach().cpu().clone() for name, v in ed.pools.items()}


def live_ids(events: list[Event]) -> list[str]:
    reverted = {e.edit_id for e in events if e.kind == "revert"}
    return [e.edit_id for e in events if e.kind == "apply" and e.edit_id not in reverted]


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def n_events(model_dir: Path) -> int:
    with sqlite3.connect(model_dir / LEDGER_FILE) as con:
        return con.execute("SELECT count(*) FROM ledger_events").fetchone()[0]


def check_consistent(ed: Editor, base: dict[str, torch.Tensor]) -> list[Event]:
    """The Editor's live pools are base + replay of its ledger, and verify() agrees."""
    events = ed.history()
    assert_same_pools(live_pools(ed), replay(base, events), "live vs base + replay")
    assert ed.verify() == []
    assert ed.live_edits() == live_ids(events)
    return events


def slots_of(ev: Event) -> set[tuple[str, int]]:
    return {(r.pool, r.slot) for r in ev.rows}


@pytest.fixture
def model_dir(tiny_ckpt: Path, tmp_path: Path) -> Path:
    return copy_model(tiny_ckpt, tmp_path)


@pytest.fixture(scope="module")
def edited_ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny_ckpt with two edits in its ledger (closed); copy it before use."""
    d = copy_model(tiny_ckpt, tmp_path_factory.mktemp("edited"))
    reqs = requests(d)
    with Editor.open(d) as ed:
        ids = [ed.apply(r, max_steps=STEPS, allow_failed=True).id for r in reqs[:2]]
    return {"dir": d, "ids": ids}


@pytest.fixture
def edited_dir(edited_ckpt: dict, tmp_path: Path) -> Path:
    return copy_model(edited_ckpt["dir"], tmp_path)


# ------------------------------------------------------- the state machine
class LedgerMachine(RuleBasedStateMachine):
    """Random applies and reverts; the live model must always be base + replay."""

    def __init__(self, ckpt: Path, root: Path) -> None:
        super().__init__()
        self.dir = copy_model(ckpt, Path(tempfile.mkdtemp(dir=root)))
        self.reqs = requests(self.dir)
        self.base = base_pools(self.dir)
        self.model_sha = file_sha(self.dir / MODEL_FILE)
        self.ed = Editor.open(self.dir)
        # The test's own model of the ledger: id -> (seq, slots) of live and dead edits.
        self.live: dict[str, tuple[int, frozenset]] = {}
        self.dead: dict[str, tuple[int, frozenset]] = {}

    def teardown(self) -> None:
        self.ed.close()
        assert file_sha(self.dir / MODEL_FILE) == self.model_sha, "the base checkpoint changed"
        shutil.rmtree(self.dir.parent, ignore_errors=True)

    def _pick(self, k: int) -> str:
        ids = sorted(self.live, key=lambda i: self.live[i][0])
        return ids[k % len(ids)]

    def _dependents(self, edit_id: str) -> set[str]:
        """Later live edits sharing a changed slot, transitively."""
        found: set[str] = set()
        todo = [edit_id]
        while todo:
            cur = todo.pop()
            seq, slots = self.live[cur]
            for other, (oseq, oslots) in self.live.items():
                if oseq > seq and other not in found and slots & oslots:
                    found.add(other)
                    todo.append(other)
        return found

    def _ordered_newest_first(self, ids: set[str]) -> list[str]:
        return sorted(ids, key=lambda i: -self.live[i][0])

    def _kill(self, ids: list[str]) -> None:
        for i in ids:
            self.dead[i] = self.live.pop(i)

    @rule(
        k=st.integers(0, 10_000),
        conflict=st.sampled_from(["joint", "joint", "avoid"]),  # joint: edits share slots
        layers=st.sampled_from(["last", "all"]),
    )
    def apply(self, k: int, conflict: str, layers: str) -> None:
        req = self.reqs[k % len(self.reqs)]
        owned = set().union(*(s for _, s in self.live.values())) if self.live else set()
        rec = self.ed.apply(req, max_steps=STEPS, allow_failed=True, conflict=conflict, layers=layers)
        assert rec.id not in self.live and rec.id not in self.dead
        slots = frozenset(rec.slots)
        assert len(slots) == len(rec.slots), "a slot appears twice in one edit"
        assert rec.metrics["slots_touched"] == len(rec.slots)
        if conflict == "avoid":
            assert not slots & owned, "conflict='avoid' changed slots of live edits"
        self.live[rec.id] = (rec.seq, slots)

    @precondition(lambda self: self.live)
    @rule(k=st.integers(0, 10_000), cascade=st.booleans())
    def revert(self, k: int, cascade: bool) -> None:
        target = self._pick(k)
        deps = self._dependents(target)
        n = n_events(self.dir)
        before = live_pools(self.ed)
        try:
            done = self.ed.revert(target, cascade=cascade)
        except EditError as err:
            assert not cascade and deps, f"revert refused without a later edit in the way: {err}"
            assert any(d in str(err) for d in deps), f"the refusal does not name the later edit: {err}"
            assert n_events(self.dir) == n
            assert_same_pools(live_pools(self.ed), before, "a refused revert changed the model")
            return
        assert cascade or not deps, f"revert of {target} ignored later edits {deps}"
        assert done == [*self._ordered_newest_first(deps), target]
        self._kill(done)

    @precondition(lambda self: self.live)
    @rule(k=st.integers(0, 10_000))
    def revert_to(self, k: int) -> None:
        target = self._pick(k)
        later = {i for i, (seq, _) in self.live.items() if seq > self.live[target][0]}
        done = self.ed.revert_to(target)
        assert done == self._ordered_newest_first(later)
        self._kill(done)

    @precondition(lambda self: self.dead)
    @rule(k=st.integers(0, 10_000), cascade=st.booleans())
    def revert_dead(self, k: int, cascade: bool) -> None:
        ids = sorted(self.dead)
        target = ids[k % len(ids)]
        n = n_events(self.dir)
        with pytest.raises(EditError, match="already reverted"):
            self.ed.revert(target, cascade=cascade)
        with pytest.raises(EditError, match="already reverted"):
            self.ed.revert_to(target)
        assert n_events(self.dir) == n

    @invariant()
    def live_is_base_plus_replay(self) -> None:
        events = check_consistent(self.ed, self.base)
        assert self.ed.live_edits() == sorted(self.live, key=lambda i: self.live[i][0])
        assert {e.edit_id for e in events if e.kind == "revert"} == set(self.dead)
        with Editor.open(self.dir) as fresh:
            assert_same_pools(live_pools(fresh), live_pools(self.ed), "a reopened Editor differs")
            assert fresh.live_edits() == self.ed.live_edits()


def test_ledger_state_machine(tiny_ckpt: Path, tmp_path: Path) -> None:
    run_state_machine_as_test(
        lambda: LedgerMachine(tiny_ckpt, tmp_path),
        settings=settings(
            max_examples=5, stateful_step_count=6, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# ------------------------------------------------------------------ reverts
def test_reverting_every_edit_restores_the_base_bit_for_bit(model_dir: Path) -> None:
    base = base_pools(model_dir)
    sha = file_sha(model_dir / MODEL_FILE)
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed:
        recs = [ed.apply(r, max_steps=STEPS, allow_failed=True) for r in reqs[:3]]
        recs += [ed.apply(r, max_steps=STEPS, allow_failed=True, layers="all") for r in reqs[3:5]]
        assert len({r.id for r in recs}) == 5
        check_consistent(ed, base)
        assert any(not torch.equal(ed.pools[n], base[n]) for n in base), "the edits changed nothing"
        # The oldest with cascade (takes every later edit sharing its slots), then the rest newest first.
        ed.revert(recs[0].id, cascade=True)
        for rid in reversed(ed.live_edits()):
            ed.revert(rid)
        assert ed.live_edits() == []
        check_consistent(ed, base)
        assert_same_pools(live_pools(ed), base, "all reverted vs base")
    with Editor.open(model_dir) as ed:
        assert_same_pools(live_pools(ed), base, "reopened after reverting all")
        assert ed.verify() == []
    assert file_sha(model_dir / MODEL_FILE) == sha


def test_the_editor_keeps_no_rows_and_replays_a_page_at_a_time(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows stay in the ledger: the Editor remembers which rows each live edit
    changed, fetches the rows a revert needs, and replays a long ledger in pages."""
    import knowedit.editor as editor_mod

    base = base_pools(model_dir)
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed:
        ids = [ed.apply(r, max_steps=STEPS, allow_failed=True).id for r in reqs[:5]]
        ed.revert(ids[1], cascade=True)
        assert all(r.before.numel() == 0 and r.after.numel() == 0 for ev in ed._live.values() for r in ev.rows)
        live = ed.live_edits()
        check_consistent(ed, base)
        want = live_pools(ed)
    monkeypatch.setattr(editor_mod, "REPLAY_PAGE", 2)
    with Ledger(str(model_dir / LEDGER_FILE), load_checkpoint(model_dir).fingerprint) as led:
        pages = [led.events(after_seq=s, limit=2) for s in range(0, led.last_seq(), 2)]
        assert [len(p) for p in pages[:-1]] == [2] * (len(pages) - 1) and sum(map(len, pages)) == led.last_seq()
        assert [e.seq for p in pages for e in p] == [e.seq for e in led.events()]
    with Editor.open(model_dir) as ed:  # replayed two events at a time
        assert ed.live_edits() == live
        assert_same_pools(live_pools(ed), want, "replayed in pages")
        for rid in reversed(live):
            ed.revert(rid)  # each revert fetches its rows from the ledger
        assert_same_pools(live_pools(ed), base, "all reverted")
        assert ed.verify() == []


def test_revert_without_cascade_names_the_later_edit(model_dir: Path) -> None:
    base = base_pools(model_dir)
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed:
        # joint: the second edit shares slots with the first (the tiny model reuses them).
        a = ed.apply(reqs[0], max_steps=STEPS, allow_failed=True, conflict="joint")
        b = next(
            rec for r in reqs[1:10]
            if set((rec := ed.apply(r, max_steps=STEPS, allow_failed=True, conflict="joint")).slots) & set(a.slots)
        )
        later = [i for i in ed.live_edits() if i != a.id]
        n, before = n_events(model_dir), live_pools(ed)
        with pytest.raises(EditError, match=b.id):
            ed.revert(a.id)
        assert n_events(model_dir) == n
        assert_same_pools(live_pools(ed), before, "a refused revert")
        done = ed.revert(a.id, cascade=True)
        assert done[-1] == a.id and b.id in done and set(done) <= {a.id, *later}
        check_consistent(ed, base)
        revs = [e for e in ed.history() if e.kind == "revert"]
        assert all(e.request.get("cascade_of") == a.id for e in revs)


def test_revert_to(model_dir: Path) -> None:
    base = base_pools(model_dir)
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed:
        ids = [ed.apply(r, max_steps=STEPS, allow_failed=True).id for r in reqs[:4]]
        assert ed.revert_to(ids[1]) == [ids[3], ids[2]]
        assert ed.live_edits() == ids[:2]
        assert ed.revert_to(ids[1]) == []  # nothing later: a no-op
        check_consistent(ed, base)


def test_unknown_or_reverted_ids_are_refused_and_change_nothing(edited_dir: Path, edited_ckpt: dict) -> None:
    base = base_pools(edited_dir)
    first, second = edited_ckpt["ids"]
    with Editor.open(edited_dir) as ed:
        ed.revert(second)
        n, before = n_events(edited_dir), live_pools(ed)
        for call in (
            lambda: ed.revert("e0000000000"),
            lambda: ed.revert("e0000000000", cascade=True),
            lambda: ed.revert_to("nope"),
            lambda: ed.revert(second),
            lambda: ed.revert(second, cascade=True),
            lambda: ed.revert_to(second),
        ):
            with pytest.raises(EditError, match="unknown edit id|already reverted"):
                call()
            assert n_events(edited_dir) == n
            assert_same_pools(live_pools(ed), before, "a refused revert")
            assert ed.live_edits() == [first]
        check_consistent(ed, base)


def test_two_editors_in_one_process_see_each_others_edits(model_dir: Path) -> None:
    base = base_pools(model_dir)
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed1, Editor.open(model_dir) as ed2:
        a = ed1.apply(reqs[0], max_steps=STEPS, allow_failed=True)
        b = ed2.apply(reqs[1], max_steps=STEPS, allow_failed=True)  # syncs a first
        assert ed2.live_edits() == [a.id, b.id]
        check_consistent(ed2, base)
        assert ed1.revert(b.id, cascade=True)[-1] == b.id  # syncs b first, then reverts it
        with pytest.raises(EditError, match="already reverted"):
            ed2.revert(b.id)  # syncs the revert, then refuses
        check_consistent(ed1, base)
        check_consistent(ed2, base)


def test_verify_is_not_fooled_by_another_editors_new_edit(model_dir: Path) -> None:
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed1, Editor.open(model_dir) as ed2:
        ed1.apply(reqs[0], max_steps=STEPS, allow_failed=True)
        assert ed2.verify() == []


def test_verify_is_not_fooled_by_an_edit_committed_while_it_runs(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process commits an edit after verify has synced the live rows and
    before it reads the events: the new event is replayed and checked, but the
    live rows are compared with the replay they reflect (found by a T = 10,000
    run being verified from a second process)."""
    reqs = requests(model_dir)
    with Editor.open(model_dir) as ed1, Editor.open(model_dir) as ed2:
        ed1.apply(reqs[0], max_steps=STEPS, allow_failed=True)
        real = ed2.refresh
        late: list[str] = []

        def refresh_then_commit() -> None:
            real()
            if not late:  # verify's own refresh: the other editor commits just after it
                late.append(ed1.apply(reqs[1], max_steps=STEPS, allow_failed=True).id)

        monkeypatch.setattr(ed2, "refresh", refresh_then_commit)
        assert ed2.verify() == []
        assert late  # the commit did land inside verify
        monkeypatch.undo()
        assert ed2.live_edits()[-1] == late[0]  # the next refresh takes it
        assert ed2.verify() == []


# ---------------------------------------------------- foreign/corrupt ledgers
def test_a_ledger_of_another_base_is_refused(edited_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(edited_dir)
    with torch.no_grad():
        w = next(iter(ck.model.pools.values())).values
        w[0, 0] += 1.0
    other = save_checkpoint(tmp_path / "other", ck.model, ck.codec)
    assert load_checkpoint(other).fingerprint != load_checkpoint(edited_dir).fingerprint
    n, sha = n_events(edited_dir), file_sha(edited_dir / LEDGER_FILE)
    with pytest.raises(LedgerError, match="base"):
        Editor.open(other, ledger=str(edited_dir / LEDGER_FILE))
    shutil.copy(edited_dir / LEDGER_FILE, other / LEDGER_FILE)  # closed ledger: no -wal
    with pytest.raises(LedgerError, match="base"):
        Editor.open(other)
    assert n_events(edited_dir) == n and file_sha(edited_dir / LEDGER_FILE) == sha
    with Editor.open(edited_dir) as ed:  # the right base still opens it
        assert ed.verify() == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda good: os.urandom(8192), id="random-bytes"),
        pytest.param(lambda good: b"this is not a database\n" * 100, id="text"),
        pytest.param(lambda good: b"SQLite format 3\x00" + os.urandom(8192), id="sqlite-header-then-garbage"),
        pytest.param(lambda good: good[: len(good) // 2], id="truncated"),
        pytest.param(lambda good: good[:100], id="header-only"),
        pytest.param(lambda good: good[:100] + os.urandom(len(good) - 100), id="garbled-pages"),
        pytest.param(lambda good: good[:4096] + bytes(len(good) - 4096), id="zeroed-pages"),
    ],
)
def test_a_corrupt_ledger_file_is_a_ledger_error(edited_dir: Path, content) -> None:  # noqa: ANN001
    path = edited_dir / LEDGER_FILE
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    path.write_bytes(content(path.read_bytes()))
    with pytest.raises(LedgerError, match="SQLite|corrupt|not a knowedit ledger"):
        Editor.open(edited_dir)


# --------------------------------------------------------------- bad input
def _bad(**change: object):  # noqa: ANN202
    """A variant of a good request: (prompt, target, subject, options)."""

    def make(req: EditRequest) -> tuple[str, str, str | None, dict]:
        opts = {"max_steps": STEPS, **change.pop("options", {})}  # type: ignore[dict-item]
        d = {"prompt": req.prompt, "target_new": req.target_new, "subject": req.subject, **change}
        if d["subject"] is not None and d["subject"] not in d["prompt"] and "subject" not in change:
            d["subject"] = None  # only the subject case is about the subject
        return d["prompt"], d["target_new"], d["subject"], opts  # type: ignore[return-value]

    return make


BAD_EDITS = [
    pytest.param(_bad(prompt=""), PromptError, id="empty-prompt"),
    pytest.param(_bad(prompt="   \n"), PromptError, id="blank-prompt"),
    pytest.param(_bad(target_new=""), PromptError, id="empty-target"),
    pytest.param(_bad(target_new="  \t "), PromptError, id="whitespace-target"),
    pytest.param(_bad(prompt="and so on " * 40), PromptError, id="longer-than-context"),
    pytest.param(_bad(options={"bogus": 1}), EditError, id="unknown-option"),
    pytest.param(_bad(options={"top_t": 0}), EditError, id="top_t-0"),
    pytest.param(_bad(options={"max_steps": -1}), EditError, id="negative-steps"),
    pytest.param(_bad(options={"conflict": "merge"}), EditError, id="bad-conflict"),
    pytest.param(_bad(options={"layers": "middle"}), EditError, id="bad-layers"),
    pytest.param(_bad(options={"idf_source": "bogus"}), EditError, id="bad-idf-source"),
    pytest.param(_bad(options={"max_df": 0.0}), EditError, id="max_df-0"),
    pytest.param(_bad(options={"max_df": 1.5}), EditError, id="max_df-above-1"),
    pytest.param(_bad(options={"max_df": 1e-9}), EditError, id="max_df-leaves-no-slot"),
    pytest.param(_bad(options={"lr": float("nan")}), EditError, id="nan-lr"),
    pytest.param(_bad(subject="Nobody In Particular"), EditError, id="subject-not-in-prompt"),
    pytest.param(
        _bad(options={"top_t": "3"}), EditError, id="top_t-not-an-int",
    ),
    pytest.param(
        _bad(options={"max_steps": 2.5}), EditError, id="max_steps-not-an-int",
    ),
]


@pytest.mark.parametrize(("make", "error"), BAD_EDITS)
def test_bad_edit_input_raises_and_changes_nothing(edited_dir: Path, make, error: type) -> None:  # noqa: ANN001
    prompt, target, subject, opts = make(requests(edited_dir)[5])
    assert issubclass(error, ValueError)
    base = base_pools(edited_dir)
    with Editor.open(edited_dir) as ed:
        n, before, live = n_events(edited_dir), live_pools(ed), ed.live_edits()
        with pytest.raises(error):
            ed.edit(prompt, target, subject, **opts)
        assert n_events(edited_dir) == n
        assert ed.live_edits() == live
        assert_same_pools(live_pools(ed), before, "a refused edit changed the model")
        check_consistent(ed, base)


def test_edit_many_validates_every_request_first(edited_dir: Path) -> None:
    reqs = requests(edited_dir)
    bad = EditRequest(prompt=reqs[7].prompt, target_new="   ")
    with Editor.open(edited_dir) as ed:
        n, before = n_events(edited_dir), live_pools(ed)
        with pytest.raises(EditError, match="request 2"):
            ed.edit_many([reqs[5], reqs[6], bad], max_steps=STEPS, allow_failed=True)
        with pytest.raises(EditError, match="unknown edit option"):
            ed.edit_many([reqs[5]], bogus=True)
        assert n_events(edited_dir) == n
        assert_same_pools(live_pools(ed), before, "a refused edit_many")


# ----------------------------------------------------------------- tampering
def _drop_triggers(con: sqlite3.Connection) -> None:
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
    assert {"trg_ledger_rows_no_update", "trg_ledger_events_no_update"} <= set(names), names
    for name in names:
        con.execute(f"DROP TRIGGER {name}")


def _label(ev: Event) -> str:
    return f"event {ev.seq} ({ev.kind} {ev.edit_id})"


def _refused_and_reported(model_dir: Path) -> list[str]:
    """A tampered ledger: opening an Editor (every command but verify and show)
    refuses it, and the chain check reports what is wrong."""
    with pytest.raises(LedgerDamaged, match="is damaged.*ledger verify"):
        Editor.open(model_dir)
    with Ledger(model_dir / LEDGER_FILE, load_checkpoint(model_dir).fingerprint, create=False) as led:
        return led.verify_chain()


def test_the_ledger_refuses_updates_and_deletes(edited_dir: Path) -> None:
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        for sql in (
            "UPDATE ledger_rows SET after = before",
            "UPDATE ledger_events SET note = 'x'",
            "DELETE FROM ledger_events WHERE seq = 2",
            "DELETE FROM ledger_rows",
            "UPDATE ledger_meta SET value = 'x'",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
    with Editor.open(edited_dir) as ed:
        assert ed.verify() == []


@pytest.mark.parametrize("which", ["after", "before"])
def test_tampering_with_a_row_is_reported(edited_dir: Path, which: str) -> None:
    with Editor.open(edited_dir) as ed:
        target = ed.history()[0]
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        _drop_triggers(con)
        row_id, raw = con.execute(
            f"SELECT r.id, r.{which} FROM ledger_rows r JOIN ledger_events e ON r.event_id = e.id "
            "WHERE e.seq = ? ORDER BY r.position LIMIT 1",
            (target.seq,),
        ).fetchone()
        raw = bytearray(raw)
        raw[1] ^= 0x01  # one bit of one float
        con.execute(f"UPDATE ledger_rows SET {which} = ? WHERE id = ?", (bytes(raw), row_id))
    problems = _refused_and_reported(edited_dir)
    assert any(_label(target) in p for p in problems), problems


@pytest.mark.parametrize("column", ["metrics", "request", "settings", "note", "created_at"])
def test_tampering_with_an_event_field_is_reported(edited_dir: Path, column: str) -> None:
    with Editor.open(edited_dir) as ed:
        target = ed.history()[1]
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        _drop_triggers(con)
        (text,) = con.execute(f"SELECT {column} FROM ledger_events WHERE seq = ?", (target.seq,)).fetchone()
        if column == "metrics":
            m = json.loads(text)
            m["success"], m["prob_after"] = True, 0.999999  # a nicer-looking edit
            new = json.dumps(m, sort_keys=True, separators=(",", ":"))
        elif column in ("request", "settings"):
            d = json.loads(text)
            key = "target_new" if column == "request" else "max_steps"
            d[key] = "Klingon" if column == "request" else 999
            new = json.dumps(d, sort_keys=True, separators=(",", ":"))
        else:
            new = (text or "") + "!"
        assert new != text
        con.execute(f"UPDATE ledger_events SET {column} = ? WHERE seq = ?", (new, target.seq))
    problems = _refused_and_reported(edited_dir)
    assert any(_label(target) in p for p in problems), problems


def test_deleting_an_event_from_the_middle_is_reported(edited_dir: Path) -> None:
    with Editor.open(edited_dir) as ed:
        ed.apply(requests(edited_dir)[8], max_steps=STEPS, allow_failed=True)
        events = ed.history()
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        _drop_triggers(con)
        (eid,) = con.execute("SELECT id FROM ledger_events WHERE seq = 2").fetchone()
        con.execute("DELETE FROM ledger_rows WHERE event_id = ?", (eid,))
        con.execute("DELETE FROM ledger_events WHERE id = ?", (eid,))
    problems = _refused_and_reported(edited_dir)
    assert any(_label(events[2]) in p for p in problems), problems


# -------------------------------------------------------------- concurrency
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from knowedit.data import load_records
    from knowedit.editor import Editor

    model, start, n, steps, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    reqs = load_records(os.path.join(model, "edits.jsonl"))[start:start + n]
    ed = Editor.open(model, author=f"proc-{start}")
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    for r in reqs:
        rec = ed.apply(r, max_steps=steps, allow_failed=True)
        print(json.dumps({"id": rec.id, "seq": rec.seq, "case_id": r.case_id}), flush=True)
    ed.close()
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_two_editors(model_dir: Path, tmp_path: Path, per_process: int) -> None:
    reqs = requests(model_dir)
    assert len(reqs) >= 2 * per_process
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(model_dir), str(i * per_process), str(per_process), str(STEPS), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(), cwd=tmp_path,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == "ready", (line, p.stderr.read())  # type: ignore[union-attr]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reported: dict[str, dict] = {}
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        for line in out.splitlines():
            rec = json.loads(line)
            assert rec["id"] not in reported
            reported[rec["id"]] = rec
    assert len(reported) == 2 * per_process

    base = base_pools(model_dir)
    with Editor.open(model_dir) as ed:
        events = check_consistent(ed, base)
    applies = [e for e in events if e.kind == "apply"]
    assert len(events) == len(applies) == 2 * per_process
    assert [e.seq for e in events] == list(range(1, 2 * per_process + 1))
    ids = [e.edit_id for e in applies]
    assert len(set(ids)) == len(ids) == 2 * per_process  # distinct ids
    assert set(ids) == set(reported)
    for e in applies:
        assert e.seq == reported[e.edit_id]["seq"]
        assert e.request["case_id"] == reported[e.edit_id]["case_id"]
    # each request applied exactly once, by the process that owned it
    case_ids = [e.request["case_id"] for e in applies]
    assert sorted(case_ids) == sorted(r.case_id for r in reqs[: 2 * per_process])
    for e in applies:
        start = next(i for i, r in enumerate(reqs) if r.case_id == e.request["case_id"]) // per_process * per_process
        assert e.author == f"proc-{start}"


def test_two_processes_edit_one_model(model_dir: Path, tmp_path: Path) -> None:
    run_two_editors(model_dir, tmp_path, CONCURRENT_EDITS)


@pytest.mark.slow
def test_two_processes_edit_one_model_full(model_dir: Path, tmp_path: Path) -> None:
    run_two_editors(model_dir, tmp_path, CONCURRENT_EDITS_FULL)


# ---------------------------------------------------------------------- CLI
def _json(result) -> object:  # noqa: ANN001
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_apply_list_show_verify_revert_export(model_dir: Path, runner: CliRunner) -> None:
    req = requests(model_dir)[0]
    m = str(model_dir)
    rec = _json(runner.invoke(app, [
        "edit", "apply", "--model", m, "-p", req.prompt, "-t", req.target_new, "-s", req.subject,
        "--max-steps", str(STEPS), "--allow-failed", "--author", "cli-test", "--json",
    ]))
    assert isinstance(rec, dict) and rec["id"].startswith("e") and rec["prompt"] == req.prompt
    eid = rec["id"]

    listed = _json(runner.invoke(app, ["ledger", "list", "--model", m, "--json"]))
    assert [(e["seq"], e["kind"], e["id"], e["live"]) for e in listed] == [(1, "apply", eid, True)]
    assert listed[0]["author"] == "cli-test" and listed[0]["slots"] == len(rec["slots"])

    shown = _json(runner.invoke(app, ["ledger", "show", eid, "--model", m, "--json"]))
    assert shown["id"] == eid and shown["live"] is True
    assert shown["request"]["target_new"] == req.target_new
    assert [[r["pool"], r["slot"]] for r in shown["rows"]] == rec["slots"]

    verified = _json(runner.invoke(app, ["ledger", "verify", "--model", m, "--json"]))
    assert verified == {"ok": True, "events": 1, "problems": []}

    reverted = _json(runner.invoke(app, ["edit", "revert", "--model", m, eid, "--json"]))
    assert reverted == {"reverted": [eid], "live_edits": []}

    exported = runner.invoke(app, ["ledger", "export", "--model", m])
    assert exported.exit_code == 0, exported.output
    lines = exported.stdout.splitlines()
    assert len(lines) == 2
    events = [json.loads(x) for x in lines]
    assert [(e["seq"], e["kind"], e["edit_id"]) for e in events] == [(1, "apply", eid), (2, "revert", eid)]
    assert len(events[0]["rows"]) == len(rec["slots"]) and events[1]["rows"] == []
    assert events[1]["prev_hash"] == events[0]["hash"]

    assert _json(runner.invoke(app, ["ledger", "verify", "--model", m, "--json"]))["events"] == 2
    with Editor.open(model_dir) as ed:
        assert_same_pools(live_pools(ed), base_pools(model_dir), "after the CLI revert")


def test_cli_revert_of_an_unknown_id_is_a_clean_error(edited_dir: Path, runner: CliRunner) -> None:
    n = n_events(edited_dir)
    clean_failure(runner.invoke(app, ["edit", "revert", "--model", str(edited_dir), "e0000000000"]), "unknown edit id")
    clean_failure(runner.invoke(app, ["edit", "revert", "--model", str(edited_dir), "e0000000000", "--json"]), "unknown edit id")
    clean_failure(runner.invoke(app, ["ledger", "show", "e0000000000", "--model", str(edited_dir)]), "unknown edit id")
    assert n_events(edited_dir) == n


def test_cli_ledger_commands_without_a_ledger(model_dir: Path, runner: CliRunner) -> None:
    for args in (["ledger", "list"], ["ledger", "verify"], ["ledger", "export"], ["ledger", "show", "e0000000000"]):
        clean_failure(runner.invoke(app, [*args, "--model", str(model_dir)]), "no ledger")
    assert not (model_dir / LEDGER_FILE).exists(), "a read-only command created a ledger"


def test_cli_verify_reports_an_undecodable_event(edited_dir: Path, runner: CliRunner) -> None:
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        _drop_triggers(con)
        con.execute("UPDATE ledger_events SET metrics = '{not json' WHERE seq = 1")
    result = runner.invoke(app, ["ledger", "verify", "--model", str(edited_dir), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = json.loads(result.stdout)
    assert out["ok"] is False and any("event 1 (apply" in p for p in out["problems"])


def test_cli_verify_reports_tampering(edited_dir: Path, runner: CliRunner) -> None:
    with sqlite3.connect(edited_dir / LEDGER_FILE) as con:
        _drop_triggers(con)
        con.execute("UPDATE ledger_events SET note = 'rewritten' WHERE seq = 1")
    result = runner.invoke(app, ["ledger", "verify", "--model", str(edited_dir), "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False and any("event 1 (apply" in p for p in out["problems"])

