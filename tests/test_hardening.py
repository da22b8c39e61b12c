"""Defects found by testing knowedit from outside, each pinned by a test
(the ledger, the writers, the side files; bad text input is in test_bad_input.py).

Numbers in the test names follow the hardening list: 1 ledgers created or
accepted by accident, 2 tampering noticed on every open, 3 fair writers,
4 atomic side files, 5 read-only model directories, 7 in-memory ledgers,
10 re-editing an edited prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import clean_failure, tree
from ledger_helpers import assert_same_pools, replay
from typer.testing import CliRunner

from knowedit.checkpoint import STATS_FILE, load_checkpoint
from knowedit.cli.app import app
from knowedit.data import load_records
from knowedit.editor import LEDGER_FILE, BatchError, Editor
from knowedit.ledger import KEY_FILE_ENV, Ledger, LedgerBusy, LedgerDamaged, LedgerError, RowChange
from knowedit.ledger_schema import record_digest
from knowedit.side_files import CORPUS_FILE, STATS_DOCS_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS = 20


def _reqs(model_dir: Path) -> list:
    return load_records(model_dir / "edits.jsonl")


def _apply_cli(runner: CliRunner, model_dir: Path, req, *extra: str):  # noqa: ANN001, ANN202
    return runner.invoke(app, [
        "edit", "apply", "--model", str(model_dir), "-p", req.prompt, "-t", req.target_new,
        "-s", req.subject, "--max-steps", str(STEPS), "--allow-failed", "--json", *extra,
    ])


def _edited(model_dir: Path, n: int = 3) -> list[str]:
    with Editor.open(model_dir) as ed:
        return [ed.apply(r, max_steps=STEPS, allow_failed=True).id for r in _reqs(model_dir)[:n]]


def _tamper(db: Path, *sql: tuple, restore_triggers: bool = True) -> None:
    """Bypass the append-only triggers like a tamperer with file access would."""
    con = sqlite3.connect(db, isolation_level=None)
    triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _ in triggers:
        con.execute(f"DROP TRIGGER {name}")
    for stmt in sql:
        con.execute(*stmt)
    if restore_triggers:
        for _, text in triggers:
            con.execute(text)
    con.close()


# ------------------------------------------- 1: no ledger created by accident
def test_1_an_empty_ledger_file_is_refused_by_every_command(model_dir: Path, runner: CliRunner) -> None:
    (model_dir / LEDGER_FILE).write_bytes(b"")
    before = tree(model_dir)
    req = _reqs(model_dir)[0]
    for args in (
        ["ledger", "verify", "--model", str(model_dir)],
        ["ledger", "list", "--model", str(model_dir)],
        ["ask", "--model", str(model_dir), req.prompt],
        ["edit", "revert", "--model", str(model_dir), "e0000000000"],
    ):
        clean_failure(runner.invoke(app, args), "empty file")
    clean_failure(_apply_cli(runner, model_dir, req), "empty file")
    assert tree(model_dir) == before, "a command wrote into the empty ledger or beside it"


def test_1_a_mistyped_ledger_path_is_an_error_for_read_commands(model_dir: Path, runner: CliRunner) -> None:
    _edited(model_dir, 1)
    typo = model_dir / "typo.db"
    req = _reqs(model_dir)[0]
    for args in (
        ["ledger", "verify"], ["ledger", "list"], ["ledger", "export"], ["ledger", "show", "e0000000000"],
        ["edit", "revert", "e0000000000"], ["ask", req.prompt],
        ["locate", "-p", req.prompt, "-t", req.target_new],
    ):
        clean_failure(runner.invoke(app, [*args, "--model", str(model_dir), "--ledger", str(typo)]), "no ledger")
    assert not typo.exists()


def test_1_revert_and_read_commands_never_create_a_ledger(model_dir: Path, runner: CliRunner) -> None:
    req = _reqs(model_dir)[0]
    before = tree(model_dir)
    clean_failure(runner.invoke(app, ["edit", "revert", "--model", str(model_dir), "e0000000000"]), "unknown edit id")
    assert runner.invoke(app, ["ask", "--model", str(model_dir), req.prompt]).exit_code == 0
    assert runner.invoke(app, ["locate", "--model", str(model_dir), "-p", req.prompt, "-t", req.target_new]).exit_code == 0
    with Editor.open(model_dir) as ed:
        ed.ask(req.prompt)
        assert ed.history() == [] and ed.verify() == []
    assert tree(model_dir) == before
    assert not (model_dir / LEDGER_FILE).exists()


def test_1_the_first_edit_creates_the_ledger_whole(model_dir: Path, runner: CliRunner) -> None:
    assert _apply_cli(runner, model_dir, _reqs(model_dir)[0]).exit_code == 0
    assert (model_dir / LEDGER_FILE).read_bytes()[:16] == b"SQLite format 3\x00"
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".creating")]


def test_1_a_foreign_sqlite_file_is_refused(model_dir: Path, runner: CliRunner) -> None:
    with sqlite3.connect(model_dir / LEDGER_FILE) as con:
        con.execute("CREATE TABLE notes (x TEXT)")
    before = tree(model_dir)
    clean_failure(_apply_cli(runner, model_dir, _reqs(model_dir)[0]), "not a knowedit ledger")
    clean_failure(runner.invoke(app, ["ledger", "verify", "--model", str(model_dir)]), "not a knowedit ledger")
    assert tree(model_dir) == before


# --------------------------------------------- 2: tampering noticed on every open
def _changed_after_row(db: Path) -> None:
    _tamper(db, ("UPDATE ledger_rows SET after = before WHERE id = (SELECT min(id) FROM ledger_rows)",))


def _deleted_revert(db: Path) -> None:
    """Delete a revert from the middle of the chain: the reverted edit would be live again."""
    (seq,) = sqlite3.connect(db).execute("SELECT seq FROM ledger_events WHERE kind = 'revert'").fetchone()
    _tamper(db, ("DELETE FROM ledger_events WHERE seq = ?", (seq,)))


def _changed_slot(db: Path) -> None:
    _tamper(db, ("UPDATE ledger_rows SET slot = slot + 1 WHERE id = (SELECT max(id) FROM ledger_rows)",))


@pytest.mark.parametrize("tamper", [_changed_after_row, _deleted_revert, _changed_slot])
def test_2_every_command_refuses_a_tampered_ledger(model_dir: Path, runner: CliRunner, tamper) -> None:  # noqa: ANN001
    ids = _edited(model_dir, 2)
    with Editor.open(model_dir) as ed:
        ed.revert(ids[1])
        last = ed.apply(_reqs(model_dir)[5], max_steps=STEPS, allow_failed=True).id  # the revert is in the middle
    tamper(model_dir / LEDGER_FILE)
    before = tree(model_dir)
    req = _reqs(model_dir)[9]
    for args in (
        ["ask", "--model", str(model_dir), req.prompt],
        ["edit", "revert", "--model", str(model_dir), last],
        ["ledger", "list", "--model", str(model_dir)],
        ["locate", "--model", str(model_dir), "-p", req.prompt, "-t", req.target_new],
    ):
        clean_failure(runner.invoke(app, args), "is damaged", "ledger verify")
    clean_failure(_apply_cli(runner, model_dir, req), "is damaged")
    assert tree(model_dir) == before, "a new event was chained onto a tampered history"
    out = runner.invoke(app, ["ledger", "verify", "--model", str(model_dir), "--json"])
    assert out.exit_code == 1 and json.loads(out.stdout)["ok"] is False
    shown = runner.invoke(app, ["ledger", "show", ids[1], "--model", str(model_dir), "--json"])
    assert shown.exit_code == 0, shown.output  # show still reads it, to report


def _recompute_hashes(db: Path) -> None:
    """Change an after row and recompute every later hash: an unkeyed chain cannot tell."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from knowedit.ledger_schema import EventRecord

    _tamper(db, ("UPDATE ledger_rows SET after = before WHERE id = (SELECT min(id) FROM ledger_rows)",))
    engine = create_engine(f"sqlite:///{db}")
    with Session(engine) as s:
        recs = list(s.scalars(select(EventRecord).order_by(EventRecord.seq)))
        prev, fixed = "0" * 64, []
        for rec in recs:
            rec.prev_hash = prev
            rec.hash = record_digest(rec)
            fixed.append((rec.prev_hash, rec.hash, rec.seq))
            prev = rec.hash
        s.rollback()
    engine.dispose()
    _tamper(db, *[("UPDATE ledger_events SET prev_hash = ?, hash = ? WHERE seq = ?", f) for f in fixed])


def test_2_a_keyed_chain_catches_recomputed_hashes(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "ledger.key"
    key.write_bytes(os.urandom(32).hex().encode())
    monkeypatch.setenv(KEY_FILE_ENV, str(key))
    _edited(model_dir, 2)
    with Editor.open(model_dir) as ed:
        assert ed.verify() == [] and ed.ledger is not None and ed.ledger.keyed
    _recompute_hashes(model_dir / LEDGER_FILE)
    with pytest.raises(LedgerDamaged, match="HMAC mismatch"):
        Editor.open(model_dir)
    monkeypatch.delenv(KEY_FILE_ENV)
    with pytest.raises(LedgerError, match="is keyed"):
        Editor.open(model_dir)  # without the key, a keyed ledger is not read at all
    other = tmp_path / "other.key"
    other.write_bytes(b"x" * 32)
    monkeypatch.setenv(KEY_FILE_ENV, str(other))
    with pytest.raises(LedgerError, match="does not match"):
        Editor.open(model_dir)


def test_2_recomputed_hashes_pass_an_unkeyed_chain(model_dir: Path) -> None:
    """The documented limit of an unkeyed chain (docs/ledger.md): the replay check of
    verify still sees that the live rows are not what the before rows say."""
    _edited(model_dir, 2)
    _recompute_hashes(model_dir / LEDGER_FILE)
    with Ledger(model_dir / LEDGER_FILE, load_checkpoint(model_dir).fingerprint, create=False) as led:
        assert led.verify_chain() == []


def test_2_a_key_for_an_unkeyed_ledger_is_refused(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edited(model_dir, 1)
    key = tmp_path / "k"
    key.write_bytes(b"k" * 32)
    monkeypatch.setenv(KEY_FILE_ENV, str(key))
    with pytest.raises(LedgerError, match="not keyed"):
        Editor.open(model_dir)


def test_2_verify_reports_dropped_triggers(model_dir: Path, runner: CliRunner) -> None:
    _edited(model_dir, 1)
    _tamper(model_dir / LEDGER_FILE, restore_triggers=False)
    out = runner.invoke(app, ["ledger", "verify", "--model", str(model_dir), "--json"])
    assert out.exit_code == 1
    problems = json.loads(out.stdout)["problems"]
    assert len(problems) == 6 and all("append-only trigger" in p for p in problems)


def test_2_a_long_running_editor_notices_tampering_behind_it(model_dir: Path) -> None:
    _edited(model_dir, 2)
    with Editor.open(model_dir) as ed:
        _tamper(model_dir / LEDGER_FILE, ("UPDATE ledger_events SET note = 'x' WHERE seq = 2",))
        with pytest.raises(LedgerDamaged, match="event 2, verified earlier, has changed"):
            ed.apply(_reqs(model_dir)[7], max_steps=STEPS, allow_failed=True)
        with pytest.raises(LedgerDamaged):
            ed.ask("anything")  # once damaged, every read refuses


# ------------------------------------------------------------ 3: fair writers
WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from knowedit.data import load_records
    from knowedit.editor import Editor

    model, ledger, start, n, go = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    reqs = load_records(os.path.join(model, "edits.jsonl"))[start:start + n]
    ed = Editor.open(model, ledger=ledger, author=f"w{start}", wait_s=120)
    ed.locate(reqs[0].prompt, reqs[0].target_new, reqs[0].subject)  # warm up
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    for rec in ed.edit_many(reqs, max_steps=15, allow_failed=True):
        print(json.dumps({"id": rec.id, "seq": rec.seq}), flush=True)
    ed.close()
    """
)

WRITERS, PER_WRITER = 5, 10


def run_writers(model_dir: Path, tmp_path: Path, ledger: str | None) -> None:
    """Five writer processes, ten edits each, on one model directory (and ledger)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    go = tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(model_dir), ledger or "", str(w * PER_WRITER), str(PER_WRITER), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        for w in range(WRITERS)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == "ready", (line, p.stderr.read())  # type: ignore[union-attr]
        go.touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err  # no writer starved or gave up
    with Editor.open(model_dir, ledger=ledger) as ed:
        events = ed.history()
        assert ed.verify() == []
        base = {p.name: p.values.detach().clone() for p in load_checkpoint(model_dir).model.pools.values()}
        assert_same_pools({n: v.detach().clone() for n, v in ed.pools.items()}, replay(base, events))
    reqs = _reqs(model_dir)
    assert [e.seq for e in events] == list(range(1, WRITERS * PER_WRITER + 1))
    keys = [(e.request["prompt"], e.request["target_new"]) for e in events]
    assert len(set(keys)) == len(keys) == WRITERS * PER_WRITER, "an edit was lost or duplicated"
    assert set(keys) == {(r.prompt, r.target_new) for r in reqs[: WRITERS * PER_WRITER]}
    # Fair: a writer re-queues behind the others after each edit, so its edits are at
    # most about WRITERS apart once all are running (an unfair lock lets one run back to back).
    by_writer: dict[str, list[int]] = {}
    for e in events:
        by_writer.setdefault(e.author or "", []).append(e.seq)
    assert len(by_writer) == WRITERS
    for author, seqs in by_writer.items():
        gaps = [b - a for a, b in zip(seqs, seqs[1:])]
        assert seqs[0] <= 2 * WRITERS and max(gaps) <= 2 * WRITERS, (author, seqs)


def test_3_five_writers_on_sqlite_lose_nothing_and_none_starves(model_dir: Path, tmp_path: Path) -> None:
    run_writers(model_dir, tmp_path, None)


def test_3_five_writers_on_postgresql(model_dir: Path, tmp_path: Path, pg_url: str) -> None:
    run_writers(model_dir, tmp_path, pg_url)


def test_3_a_writer_that_gives_up_names_what_it_applied_and_resume_finishes(model_dir: Path) -> None:
    reqs = _reqs(model_dir)[:4]
    fp = load_checkpoint(model_dir).fingerprint
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with Ledger(model_dir / LEDGER_FILE, fp, create=False) as other, other.transaction():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)

    def after_first(rec) -> None:  # noqa: ANN001
        if not holder.is_alive() and not held.is_set():
            holder.start()
            held.wait(10)

    with Editor.open(model_dir, wait_s=0.5) as ed:
        with pytest.raises(BatchError) as info:
            ed.edit_many(reqs, on_edit=after_first, max_steps=STEPS, allow_failed=True)
        release.set()
        holder.join()
        err = info.value
        assert len(err.applied) == 1 and err.index == 1
        assert err.applied[0].id in str(err) and "3 request(s) not applied" in str(err) and "--resume" in str(err)
        assert isinstance(err.__cause__, LedgerBusy)
        done = ed.edit_many(reqs, resume=True, max_steps=STEPS, allow_failed=True)
        assert len(done) == 3
        prompts = [e.request["prompt"] for e in ed.history()]
        assert sorted(prompts) == sorted(r.prompt for r in reqs)  # each exactly once


def test_3_cli_resume_skips_what_is_live(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    reqs = _reqs(model_dir)[:3]
    f = tmp_path / "batch.jsonl"
    f.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    with Editor.open(model_dir) as ed:
        ed.apply(reqs[0], max_steps=STEPS, allow_failed=True)
    out = runner.invoke(app, ["edit", "apply", "--model", str(model_dir), "--file", str(f), "--resume",
                              "--max-steps", str(STEPS), "--allow-failed", "--json"])
    assert out.exit_code == 0, out.output
    batch = json.loads(out.stdout)
    assert [r["prompt"] for r in batch["applied"]] == [reqs[1].prompt, reqs[2].prompt] and batch["skipped"] == 1
    clean_failure(runner.invoke(app, ["edit", "apply", "--model", str(model_dir), "--resume", "-p", "x", "-t", "y"]),
                   "--resume goes with --file")


def test_3_the_queue_is_first_come_first_served(tmp_path: Path) -> None:
    """Threads queue in arrival order, and a dead writer's ticket does not block."""
    from knowedit.ledger_lock import WriterQueue

    q = WriterQueue(tmp_path / "x.db")
    order: list[int] = []
    first = threading.Event()

    def writer(i: int) -> None:
        with q.turn(10):
            order.append(i)
            if i == 0:
                first.set()
                time.sleep(0.3)

    threads = [threading.Thread(target=writer, args=(0,))]
    threads[0].start()
    first.wait(5)
    for i in range(1, 5):
        t = threading.Thread(target=writer, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.03)  # arrive in order
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    # a ticket left by a killed process: nobody holds its flock, so it is cleared
    (q.dir / f"{1:020d}-1-dead").write_text("")
    with q.turn(1):
        pass
    assert list(q.dir.iterdir()) == []
    with pytest.raises(LedgerBusy, match="1 writer"):
        holder = threading.Event()
        done = threading.Event()

        def hold() -> None:
            with q.turn(5):
                holder.set()
                done.wait(5)

        t = threading.Thread(target=hold)
        t.start()
        holder.wait(5)
        try:
            with q.turn(0.2):
                pass
        finally:
            done.set()
            t.join()


# ------------------------------------------------------ 4: atomic side files
def _stats_pair(model_dir: Path) -> tuple[Path, Path]:
    return model_dir / STATS_FILE, model_dir / STATS_DOCS_FILE


@pytest.mark.parametrize("damage", ["stats_cut", "docs_cut_mid_line", "docs_missing", "stats_garbage"])
def test_4_a_damaged_side_file_is_rebuilt_from_the_corpus(model_dir: Path, runner: CliRunner, damage: str) -> None:
    stats, docs = _stats_pair(model_dir)
    good = stats.read_bytes(), docs.read_bytes()
    if damage == "stats_cut":
        stats.write_bytes(good[0][: len(good[0]) // 2])
    elif damage == "docs_cut_mid_line":
        docs.write_bytes(good[1][: len(good[1]) // 2 + 7])
    elif damage == "docs_missing":
        docs.unlink()
    else:
        stats.write_bytes(b"\x00" * 100)
    req = _reqs(model_dir)[0]
    out = _apply_cli(runner, model_dir, req)
    assert out.exit_code == 0, out.output
    assert docs.read_bytes() == good[1]
    with Editor.open(model_dir) as ed:
        assert ed.background == "loaded" and ed.stats is not None and len(ed.docs) == ed.stats.n_docs


def test_4_a_damaged_side_file_without_a_corpus_is_refused_by_name(model_dir: Path, runner: CliRunner) -> None:
    stats, docs = _stats_pair(model_dir)
    docs.write_bytes(docs.read_bytes()[:-40])
    (model_dir / CORPUS_FILE).unlink()
    before = tree(model_dir)
    text = clean_failure(_apply_cli(runner, model_dir, _reqs(model_dir)[0]), STATS_DOCS_FILE, "knowedit stats")
    assert "IndexError" not in text
    assert tree(model_dir) == before


def test_4_side_files_are_written_by_rename(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies midway leaves the old file whole and no temporary behind."""
    import knowedit.side_files as side

    for p in _stats_pair(model_dir):
        p.unlink()
    ck = load_checkpoint(model_dir)
    docs = side.read_docs(model_dir / CORPUS_FILE)
    stats = side.build_stats(ck, docs)
    good = tree(model_dir)

    def dies(self, path, **kw) -> None:  # noqa: ANN001
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt  # a kill between the write and the rename

    monkeypatch.setattr(type(stats), "save", dies)
    with pytest.raises(KeyboardInterrupt):
        side.save_stats(ck, stats, docs)
    assert tree(model_dir) == good
    assert not [p for p in model_dir.iterdir() if p.name.endswith(".tmp")]
    assert oct((model_dir / STATS_FILE).stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_4_stats_of_another_model_are_rebuilt(model_dir: Path, debug_ckpt: Path) -> None:
    # a stats pair copied from another checkpoint does not name this model's fingerprint
    for name in (STATS_FILE, STATS_DOCS_FILE):
        if (debug_ckpt / name).exists():
            shutil.copy(debug_ckpt / name, model_dir / name)
    shutil.copy(model_dir / CORPUS_FILE, model_dir / "corpus.bak")
    with Editor.open(model_dir) as ed:
        assert ed.background in ("rebuilt", "loaded")
        assert ed.stats is not None and ed.stats.n_docs == len(ed.docs)


# ------------------------------------------------- 5: read-only model directory
def test_5_a_read_only_directory_without_stats_edits_with_stats_in_memory(
    model_dir: Path, tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import knowedit.side_files as side

    for p in _stats_pair(model_dir):
        p.unlink()

    def read_only(path: Path, write) -> None:  # noqa: ANN001
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(side, "atomic_write", read_only)  # root ignores chmod, so simulate it
    ledger = tmp_path / "elsewhere.db"
    out = _apply_cli(runner, model_dir, _reqs(model_dir)[0], "--ledger", str(ledger))
    assert out.exit_code == 0, out.output
    assert not any(p.exists() for p in _stats_pair(model_dir))
    with Editor.open(model_dir, ledger=str(ledger)) as ed:
        assert ed.background == "memory" and ed.stats is not None and len(ed.history()) == 1


# ----------------------------------------------------- 7: in-memory ledgers
def test_7_an_in_memory_ledger_is_refused_for_writes(model_dir: Path, runner: CliRunner) -> None:
    before = tree(model_dir)
    clean_failure(_apply_cli(runner, model_dir, _reqs(model_dir)[0], "--ledger", "sqlite://"), "in memory")
    clean_failure(runner.invoke(app, ["ask", "--model", str(model_dir), "--ledger", "sqlite://", "x"]), "in memory")
    assert tree(model_dir) == before


# ---------------------------------------------- 10: re-editing an edited prompt
@pytest.mark.parametrize("conflict", ["joint", "avoid"])
def test_10_a_second_edit_of_the_same_prompt_replaces_the_first(model_dir: Path, runner: CliRunner, conflict: str) -> None:
    req = _reqs(model_dir)[0]
    first = _apply_cli(runner, model_dir, req, "--conflict", conflict)
    assert first.exit_code == 0, first.output
    second_target = req.ground_truth  # back to the old answer: a different target again
    again = runner.invoke(app, [
        "edit", "apply", "--model", str(model_dir), "-p", req.prompt, "-t", second_target, "-s", req.subject,
        "--conflict", conflict, "--json",
    ])
    assert again.exit_code == 0, again.output
    rec = json.loads(again.stdout)
    assert rec["metrics"]["success"], rec["metrics"]
    with Editor.open(model_dir) as ed:
        assert ed.ask(req.prompt) == second_target
        assert len(ed.live_edits()) == 2 and ed.verify() == []


def test_10_cli_edit_defaults_are_the_librarys(runner: CliRunner) -> None:
    from knowedit.update import EditOptions

    out = runner.invoke(app, ["edit", "apply", "--help"], terminal_width=200)
    text = " ".join(out.output.split())
    d = EditOptions()
    for flag, value in (("--top-t", d.top_t), ("--max-steps", d.max_steps), ("--conflict", d.conflict)):
        assert flag in text and f"default: {value}" in text, (flag, text)


def test_learn_events_replay_and_revert_like_edits(model_dir: Path) -> None:
    """The ledger side of a learning run: rows changed in place become one learn event,
    revert restores them bit for bit, and uncommitted changes are discarded."""
    base = {p.name: p.values.detach().clone() for p in load_checkpoint(model_dir).model.pools.values()}
    with Editor.open(model_dir) as ed:
        pool = next(iter(ed.pools))
        with ed.learning() as run:
            with torch.no_grad():
                ed.pools[pool][[3, 5]] += 1.0
            rec = run.commit({"data": "x.jsonl"}, {"t": 2}, {"loss": 1.0})
            assert rec.id.startswith("l") and sorted(s for _, s in rec.slots) == [3, 5]
            with torch.no_grad():
                ed.pools[pool][7] += 1.0  # never committed
        assert torch.equal(ed.pools[pool][7], base[pool][7])
        with ed.learning() as run, pytest.raises(Exception, match="nothing to commit"):
            run.commit({}, {}, {})
        edit = ed.apply(_reqs(model_dir)[0], max_steps=STEPS, allow_failed=True)
        assert [e.kind for e in ed.history()] == ["learn", "apply"]
        ed.revert(rec.id, cascade=True)
        if edit.id in ed.live_edits():
            ed.revert(edit.id)
        assert_same_pools({n: v.detach().clone() for n, v in ed.pools.items()}, base)
        assert ed.verify() == []


def test_2_postgresql_ledger_is_append_only_and_checked(pg_url: str) -> None:
    from sqlalchemy import create_engine

    fp = "f" * 64
    led = Ledger(pg_url, fp)
    with led.transaction() as txn:
        ev = txn.append_apply({"prompt": "p"}, "m", {}, {}, [RowChange("pool", 1, torch.zeros(4), torch.ones(4))])
    with led.transaction() as txn:
        txn.append_revert(ev.edit_id)
    assert [e.kind for e in led.events()] == ["apply", "revert"] and led.verify_chain() == []
    engine = create_engine(pg_url)
    for sql in ("UPDATE ledger_events SET note = 'x'", "DELETE FROM ledger_events WHERE seq = 2",
                "TRUNCATE ledger_rows CASCADE", "UPDATE ledger_meta SET value = 'x'"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as con:
            con.exec_driver_sql(sql)
    with engine.begin() as con:  # a tamperer with the rights to switch the guard off
        con.exec_driver_sql("ALTER TABLE ledger_events DISABLE TRIGGER trg_ledger_events_no_update")
        con.exec_driver_sql("UPDATE ledger_events SET note = 'rewritten' WHERE seq = 1")
    engine.dispose()
    problems = Ledger(pg_url, fp, create=False).verify_chain()
    assert any("event 1 (apply" in p and "hash mismatch" in p for p in problems), problems
    assert any("trg_ledger_events_no_update is missing" in p for p in problems), problems
    with pytest.raises(LedgerDamaged):
        Ledger(pg_url, fp, create=False).events()
    led.close()

