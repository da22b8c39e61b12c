"""Ledger crash-and-tamper battery: measures that no edit is ever lost, half
applied, or silently rewritten, under three batteries on a copy of a model.

1. **random apply/revert** (``--steps``): a seeded random sequence of
   ``Editor.apply`` (layers last/all, conflict joint/avoid, re-edits of live
   prompts), ``Editor.revert`` with and without cascade (refusals included),
   ``revert_to`` and reverts of already reverted ids. After every step the live
   value pools are compared bit for bit with an independent replay of the
   ledger onto the base weights (incremental each step, from scratch every 25
   steps, with a second Editor opened on the same directory); at the end every
   edit is reverted and the pools must equal the base bit for bit, with
   ``Editor.verify() == []``.
2. **SIGKILL** (``--kills``): child processes editing one model directory are
   killed with SIGKILL at random instants and at chosen points: inside the
   ledger transaction (an apply's rows flushed; the first revert of a cascade
   flushed), when SQLite starts the ``COMMIT`` (the child sleeps there), right
   after the ``COMMIT`` starts (no sleep: the kill races the commit), right after
   the commit (before the child reports it), during a ``knowedit edit apply
   --file`` batch (then finished with ``--resume``), and during the *first*
   slot-statistics write of a fresh model directory (documents temporary
   written, between the two renames, statistics temporary written whole or
   half, random instants of the first ``Editor.open``). The child instruments
   itself (monkeypatched ``LedgerTxn`` appends, a SQLite trace callback,
   SQLAlchemy's ``after_commit``, a wrapped ``side_files.atomic_write``); knowedit
   has no test hook and none is needed. After each kill the directory is
   reopened: ``verify()`` clean, live rows == base + independent replay, no lock
   left behind, every edit the child reported committed is in the ledger
   (else *lost*), every event seen before is still there unchanged (else
   *lost*), every apply has all its rows and every cascade all its reverts
   (else *half applied*), and the side files are absent, valid or rebuilt and
   equal to a clean build.
3. **tamper**: 30 kinds of tampering with the SQLite ledger file (rows, events,
   metadata, hashes, HMAC, triggers, file bytes): 26 on both an unkeyed and a
   keyed ledger, 4 on the keyed one only. Each must make ``Editor.open``/``ask``
   refuse or ``knowedit ledger verify`` (run in process with Typer's CliRunner)
   exit non-zero; else it counts as *undetected*, with whether the ledger's SQL
   dump changed at all. Dropping events from
   the end, recomputed hashes of an unkeyed chain and a forged event appended
   to an unkeyed chain are documented limits (docs/ledger.md): they are run and
   reported apart, not counted as passes.

The battery's edits are short (3-8 steps): where ``Editor.apply`` refuses edits
that miss their target, they are committed with ``allow_failed=True`` (the
CLI with ``--allow-failed``), since what is measured is the ledger.

Every count is measured, never asserted; the script exits 1 when a count that
must be 0 is not. Run it (5 minutes on 2 CPU cores, 10 when other jobs share them)::

    python bench/ledger_battery.py --seed 1 --steps 200 --kills 24 --json-out runs/ledger_battery.json

Without ``--model`` it trains the ``tiny`` recipe into a temporary directory
(about 15 s); ``--model DIR`` uses a trained checkpoint directory instead (it is
copied, never changed; the first-statistics kills need its ``corpus.jsonl``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
STATS_FILES = ("slot_stats.safetensors", "slot_stats_docs.jsonl")
LEDGER = "ledger.db"


def allow_failed() -> dict[str, bool]:
    """``{"allow_failed": True}`` where ``Editor.apply`` refuses edits that miss their
    target unless told otherwise: the battery's short edits (3-8 steps) are about the
    ledger, so they are committed either way."""
    import inspect

    from knowedit.editor import Editor

    return {"allow_failed": True} if "allow_failed" in inspect.signature(Editor.apply).parameters else {}


def cli_allow_failed() -> list[str]:
    """``["--allow-failed"]`` where ``knowedit edit apply`` has that flag."""
    import inspect

    from knowedit.cli.edit import apply

    return ["--allow-failed"] if "allow_failed" in inspect.signature(apply).parameters else []

# ---------------------------------------------------------------- helpers


def pools_of(model: Any) -> dict[str, torch.Tensor]:
    """A copy of every value pool of a MemoryLM, on the CPU."""
    return {p.name: p.values.detach().cpu().clone() for p in model.pools.values()}


def live_pools(ed: Any) -> dict[str, torch.Tensor]:
    return {name: v.detach().cpu().clone() for name, v in ed.pools.items()}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def differing_rows(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """pool -> rows that differ bitwise (a pool of another dtype or shape: row -1)."""
    out: dict[str, list[int]] = {}
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.dtype != y.dtype or x.shape != y.shape:
            out[name] = [-1]
            continue
        bad = (~(_bytes(x) == _bytes(y)).all(-1)).nonzero().flatten().tolist()
        if bad:
            out[name] = bad
    return out


class Replay:
    """Base + ledger events, replayed independently of the Editor: an apply (or
    learn) writes its after rows, a revert its apply's before rows, in seq order."""

    def __init__(self, base: dict[str, torch.Tensor]) -> None:
        self.state = {name: v.clone() for name, v in base.items()}
        self.applies: dict[str, Any] = {}
        self.seq = 0

    def feed(self, events: list[Any]) -> None:
        for ev in events:
            if ev.seq <= self.seq:
                continue
            if ev.kind in ("apply", "learn"):
                self.applies[ev.edit_id] = ev
                rows, which = ev.rows, "after"
            else:
                rows, which = self.applies[ev.edit_id].rows, "before"
            for r in rows:
                self.state[r.pool][r.slot] = getattr(r, which)
            self.seq = ev.seq


def replay(base: dict[str, torch.Tensor], events: list[Any]) -> dict[str, torch.Tensor]:
    rp = Replay(base)
    rp.feed(events)
    return rp.state


def live_ids(events: list[Any]) -> list[str]:
    """Ids applied and not reverted, in seq order (from the events alone)."""
    reverted = {e.edit_id for e in events if e.kind == "revert"}
    return [e.edit_id for e in events if e.kind in ("apply", "learn") and e.edit_id not in reverted]


def structural_problems(events: list[Any]) -> list[tuple[str, str]]:
    """(edit id, problem) for half-recorded edits: an apply without all its rows,
    a revert of an unknown or twice-reverted edit, a cascade missing reverts."""
    out: list[tuple[str, str]] = []
    if [e.seq for e in events] != list(range(1, len(events) + 1)):
        out.append(("-", "seq is not 1..n"))
    applied: set[str] = set()
    reverted: set[str] = set()
    for ev in events:
        if ev.kind in ("apply", "learn"):
            applied.add(ev.edit_id)
            want = ev.metrics.get("slots_touched") if ev.kind == "apply" else len(ev.rows)
            if len(ev.rows) != want:
                out.append((ev.edit_id, f"{len(ev.rows)} rows recorded, {want} touched"))
            if len({(r.pool, r.slot) for r in ev.rows}) != len(ev.rows):
                out.append((ev.edit_id, "a row recorded twice"))
        else:
            if ev.edit_id not in applied or ev.edit_id in reverted:
                out.append((ev.edit_id, "revert of an edit that is not live"))
            reverted.add(ev.edit_id)
    # A cascade is one transaction: consecutive reverts with {"cascade_of": X}, X's own last.
    i = 0
    while i < len(events):
        root = events[i].request.get("cascade_of") if events[i].kind == "revert" else None
        if root is None:
            i += 1
            continue
        j = i
        while j < len(events) and events[j].kind == "revert" and events[j].request.get("cascade_of") == root:
            j += 1
        if events[j - 1].edit_id != root:
            out.extend((e.edit_id, f"cascade of {root} recorded without the revert of {root}") for e in events[i:j])
        i = j
    return out


@contextlib.contextmanager
def key_env(key_file: Path | None) -> Iterator[None]:
    """Run with the ledger HMAC key file set (or with no key at all)."""
    from knowedit.ledger import KEY_ENV, KEY_FILE_ENV

    saved = {k: os.environ.get(k) for k in (KEY_ENV, KEY_FILE_ENV)}
    os.environ.pop(KEY_ENV, None)
    os.environ.pop(KEY_FILE_ENV, None)
    if key_file is not None:
        os.environ[KEY_FILE_ENV] = str(key_file)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def copy_model(src: Path, dst: Path, stats: bool) -> Path:
    """Copy a checkpoint directory without its ledger, logs and (unless ``stats``) side files."""
    skip = [f"{LEDGER}*", ".ledger.db*", "logs", ".*.tmp"] + ([] if stats else list(STATS_FILES))
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def prepare_models(model: Path | None, work: Path) -> tuple[Path, Path, float]:
    """(pristine dir without side files, seeded dir with side files, seconds spent)."""
    from knowedit.checkpoint import load_checkpoint
    from knowedit.side_files import CORPUS_FILE, build_stats, read_docs

    t0 = time.perf_counter()
    if model is None:
        from knowedit.config import load_train_config
        from knowedit.recipes.train import train

        model = work / "trained-tiny"
        cfg = load_train_config(str(REPO / "recipes" / "configs" / "tiny.yaml"), ["logger=none"])
        cfg.out = str(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's small-dataset advice
            train(cfg, progress=False)
    pristine = copy_model(model, work / "pristine", stats=False)
    seeded = copy_model(model, work / "seeded", stats=True)
    if not all((seeded / f).is_file() for f in STATS_FILES) and (seeded / CORPUS_FILE).is_file():
        build_stats(load_checkpoint(seeded), read_docs(seeded / CORPUS_FILE))
    return pristine, seeded, time.perf_counter() - t0


# ------------------------------------------------- battery 1: apply/revert


def battery_random(seeded: Path, work: Path, seed: int, steps: int) -> dict[str, Any]:
    from knowedit.checkpoint import load_checkpoint
    from knowedit.data import load_records
    from knowedit.data.records import EditRequest
    from knowedit.editor import EditError, Editor

    t0 = time.perf_counter()
    d = copy_model(seeded, work / "random", stats=True)
    base = pools_of(load_checkpoint(d).model)
    reqs = load_records(d / "edits.jsonl")
    rng = random.Random(seed)
    allow = allow_failed()
    rp = Replay(base)
    ops: dict[str, int] = {}
    mismatched_steps: list[int] = []
    half_ids: set[str] = set()
    lost: list[str] = []
    problems: list[str] = []
    errors: list[str] = []

    def count(op: str) -> None:
        ops[op] = ops.get(op, 0) + 1

    ed = Editor.open(d, author="battery")
    events: list[Any] = []
    for step in range(1, steps + 1):
        live = ed.live_edits()
        before_n = len(events)
        u = rng.random()
        committed: list[tuple[str, str]] = []  # (kind, id) the call reported done
        kind = ""
        try:
            if not live or u < 0.55:
                req = rng.choice(reqs)
                if live and rng.random() < 0.15:  # re-edit a live prompt with another target
                    pick = rng.choice(live)
                    ev = next(e for e in events if e.edit_id == pick)
                    old = ev.request
                    target = old.get("ground_truth") or "Czech"
                    if target == old["target_new"]:
                        target = rng.choice([r.target_new for r in reqs if r.target_new != target])
                    req = EditRequest(prompt=old["prompt"], target_new=target, subject=old.get("subject"))
                    kind = "apply (re-edit)"
                opts = {"max_steps": rng.choice([3, 8]), "layers": rng.choice(["last", "all"]),
                        "conflict": rng.choice(["joint", "joint", "avoid"])}
                kind = kind or f"apply ({opts['layers']}, {opts['conflict']})"
                rec = ed.apply(req, **opts, **allow)
                committed.append(("apply", rec.id))
            elif u < 0.85:
                cascade = rng.random() < 0.5
                kind = "revert (cascade)" if cascade else "revert"
                done = ed.revert(rng.choice(live), cascade=cascade)
                committed.extend(("revert", i) for i in done)
            elif u < 0.93:
                kind = "revert_to"
                done = ed.revert_to(rng.choice(live))
                committed.extend(("revert", i) for i in done)
            else:
                reverted = [e.edit_id for e in events if e.kind == "revert"]
                if not reverted:
                    continue
                kind = "revert of a reverted id"
                ed.revert(rng.choice(reverted))
                problems.append(f"step {step}: reverting a reverted id was accepted")
        except EditError:
            kind += " refused"
            if ed.ledger is not None and ed.ledger.last_seq() != before_n:
                problems.append(f"step {step}: a refused {kind} changed the ledger")
        except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
            errors.append(f"step {step} {kind}: {type(exc).__name__}: {exc}")
        count(kind)
        events = ed.history()
        rp.feed(events)
        diff = differing_rows(live_pools(ed), rp.state)
        if diff:
            mismatched_steps.append(step)
            touched = {(p, s) for p, rows in diff.items() for s in rows}
            half_ids.update(e.edit_id for e in events if e.kind != "revert" and {(r.pool, r.slot) for r in e.rows} & touched)
        if ed.live_edits() != live_ids(events):
            problems.append(f"step {step}: Editor.live_edits() differs from the ledger's live ids")
        have = {(e.kind if e.kind == "revert" else "apply", e.edit_id) for e in events}
        lost.extend(f"step {step}: {k} {i}" for k, i in committed if (k, i) not in have)
        half_ids.update(i for i, _ in structural_problems(events))
        if step % 25 == 0 or step == steps:
            if differing_rows(replay(base, events), rp.state):
                problems.append(f"step {step}: incremental and full replay differ")
            with Editor.open(d) as other:
                if differing_rows(live_pools(other), rp.state):
                    problems.append(f"step {step}: a fresh Editor differs from the replay")
                problems.extend(f"step {step} (fresh Editor): {p}" for p in other.verify())
            problems.extend(f"step {step}: {p}" for p in ed.verify())
    n_events = len(ed.history())
    max_live = len(ed.live_edits())
    for eid in reversed(ed.live_edits()):
        ed.revert(eid)
    final_diff = differing_rows(live_pools(ed), base)
    final_verify = ed.verify()
    ed.close()
    with Editor.open(d) as again:
        reopened_diff = differing_rows(live_pools(again), base)
        reopened_verify = again.verify()
    bit_identical = not final_diff and not reopened_diff
    problems.extend(final_verify + reopened_verify)
    if not bit_identical:
        problems.append(f"after reverting everything the pools differ from the base: {final_diff or reopened_diff}")
    return {
        "cases": steps,
        "lost": len(lost),
        "half_applied": len(half_ids),
        "undetected": None,
        "mismatched_steps": len(mismatched_steps),
        "final_bit_identical": bit_identical,
        "final_verify": final_verify,
        "events": n_events,
        "live_before_final_revert": max_live,
        "ops": dict(sorted(ops.items())),
        "problems": problems,
        "unexpected_errors": errors,
        "lost_detail": lost,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------- battery 2: SIGKILL

CHILD = textwrap.dedent(
    r'''
    """An editing process to be killed; it instruments itself (knowedit has no test hooks).

    argv: model_dir mode seed k. It prints one JSON object a line: {"ready"},
    {"applied": id} / {"reverted": [ids]} once committed, and at its trigger
    point {"pending": [...], "at": ...} (then it sleeps until killed).
    """
    import json, os, random, sys, time
    import torch
    torch.set_num_threads(1)

    model, mode, seed, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)


    def say(**msg):
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


    def hang():
        while True:
            time.sleep(60)


    if mode.startswith("stats_"):
        import knowedit.side_files as side
        from knowedit.checkpoint import STATS_FILE

        real_atomic_write = side.atomic_write

        def hooked(path, write):
            name = path.name

            def write_then_stop(p):
                write(p)
                if mode == "stats_tmp_half":  # as if killed halfway through the write
                    data = p.read_bytes()
                    p.write_bytes(data[: len(data) // 2])
                say(pending=[], at=f"{name} temporary written, not renamed")
                hang()

            if (mode == "stats_docs_tmp" and name == side.STATS_DOCS_FILE) or (
                mode in ("stats_tmp", "stats_tmp_half") and name == STATS_FILE
            ):
                return real_atomic_write(path, write_then_stop)
            out = real_atomic_write(path, write)
            if mode == "stats_between" and name == side.STATS_DOCS_FILE:
                say(pending=[], at="documents renamed, statistics not yet written")
                hang()
            return out

        side.atomic_write = hooked

    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session

    from knowedit.data import load_records
    from knowedit.data.records import EditRequest
    from knowedit.editor import EditError, Editor
    from knowedit.ledger import LedgerTxn

    pending = []  # ids appended in the open write transaction
    counts = {"apply": 0, "commit": 0, "after": 0}
    armed = [False]
    real_apply, real_revert = LedgerTxn.append_apply, LedgerTxn.append_revert


    def hooked_apply(self, *a, **kw):
        ev = real_apply(self, *a, **kw)
        pending.append(["apply", ev.edit_id])
        counts["apply"] += 1
        if mode == "in_txn_apply" and counts["apply"] == k:
            say(pending=list(pending), at="inside the transaction: apply event and rows flushed, not committed")
            hang()
        return ev


    def hooked_revert(self, *a, **kw):
        ev = real_revert(self, *a, **kw)
        pending.append(["revert", ev.edit_id])
        if armed[0]:
            say(pending=list(pending), at="inside the transaction: first revert of the cascade flushed")
            hang()
        return ev


    LedgerTxn.append_apply, LedgerTxn.append_revert = hooked_apply, hooked_revert


    def on_sql(sql):
        s = sql.lstrip()[:6].upper()
        if s.startswith("BEGIN"):
            pending.clear()
        elif s == "COMMIT" and pending:
            counts["commit"] += 1
            if counts["commit"] == k and mode in ("commit_start", "commit_window"):
                say(pending=list(pending), at="SQLite COMMIT statement started")
                if mode == "commit_start":
                    hang()  # inside sqlite3_step of the COMMIT, before it runs


    @event.listens_for(Engine, "connect")
    def _trace(dbapi_conn, _record):
        if hasattr(dbapi_conn, "set_trace_callback"):
            dbapi_conn.set_trace_callback(on_sql)


    @event.listens_for(Session, "after_commit")
    def _after_commit(_session):
        if pending and mode == "post_commit":
            counts["after"] += 1
            if counts["after"] == k:
                say(pending=list(pending), at="committed, not yet reported")
                hang()
        pending.clear()


    import inspect

    ALLOW = {"allow_failed": True} if "allow_failed" in inspect.signature(Editor.apply).parameters else {}
    reqs = load_records(os.path.join(model, "edits.jsonl"))
    if mode.startswith("stats_"):
        say(opening=True)
        ed = Editor.open(model, author=f"child-{seed}")
        say(opened=ed.background)
        rec = ed.apply(rng.choice(reqs), max_steps=3, layers="last", **ALLOW)
        say(applied=rec.id)
        hang()

    ed = Editor.open(model, author=f"child-{seed}")
    # Warm up what the first edit imports lazily (torch.optim pulls in torch._dynamo).
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    ed.locate(reqs[0].prompt, reqs[0].target_new, reqs[0].subject)
    say(ready=True)


    def op():
        live = ed.live_edits()
        try:
            if len(live) > 3 and rng.random() < 0.3:
                done = ed.revert(rng.choice(live), cascade=True)
                say(reverted=done)
            else:
                rec = ed.apply(rng.choice(reqs), max_steps=rng.choice([3, 8]), layers=rng.choice(["last", "all"]), **ALLOW)
                say(applied=rec.id)
        except EditError as err:
            say(refused=str(err))


    if mode == "in_txn_revert":
        for _ in range(k - 1):
            op()
        # An edit, then later edits until one shares a slot with it: reverting the
        # first with cascade then appends several reverts in one transaction.
        # An edit that changes rows: of a prompt no live edit has set already.
        live_prompts = {key[0] for key in ed.live_requests()}
        fresh = [q for q in reqs if q.prompt.strip() not in live_prompts] or reqs
        for r in rng.sample(fresh, min(5, len(fresh))):
            a = ed.apply(r, max_steps=8, **ALLOW)
            say(applied=a.id)
            if a.slots:
                break
        # A re-edit of the same prompt, then edits of the same subject, read the
        # same slots: the likeliest to share one.
        back = EditRequest(prompt=r.prompt, target_new=r.ground_truth or "Czech", subject=r.subject)
        same = [q for q in reqs if q.subject == r.subject and q.prompt != r.prompt]
        for q in ([back] + same + rng.sample(reqs, 12))[:12]:
            b = ed.apply(q, max_steps=8, **ALLOW)
            shared = set(map(tuple, a.slots)) & set(map(tuple, b.slots))
            say(applied=b.id, shares_slots_with=a.id if shared else None)
            if shared:
                break
        armed[0] = True
        ed.revert(a.id, cascade=True)
        say(error="the revert returned")
        hang()
    while True:
        op()
    '''
)

#: The kill plan cycles through these modes (``--kills 24``: 6 mid-commit, 7 in the first stats write).
KILL_MODES = [
    "random", "in_txn_apply", "commit_start", "stats_docs_tmp", "commit_window", "in_txn_revert",
    "post_commit", "stats_between", "random", "commit_window", "stats_tmp", "cli_random",
    "in_txn_apply", "stats_tmp_half", "commit_start", "stats_random",
]
MODE_DESCRIPTION = {
    "random": "random instant of an apply/revert loop",
    "in_txn_apply": "inside the transaction, apply rows flushed",
    "in_txn_revert": "inside a cascade revert, first revert flushed",
    "commit_start": "mid-commit: SQLite COMMIT started (child stalled there)",
    "commit_window": "mid-commit: kill races a running COMMIT",
    "post_commit": "committed, before the child reports it",
    "cli_random": "random instant of `knowedit edit apply --file` (then --resume)",
    "stats_docs_tmp": "first stats write: documents temporary written",
    "stats_between": "first stats write: between the two renames",
    "stats_tmp": "first stats write: statistics temporary written",
    "stats_tmp_half": "first stats write: statistics temporary half written",
    "stats_random": "random instant of the first Editor.open (stats build)",
}


class Child:
    """A child process whose stdout lines are read by a thread into a queue."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, env=env, cwd=cwd)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.all: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pred: Callable[[dict], bool], timeout: float) -> dict | None:
        """The first JSON line satisfying ``pred`` (None: the child ended or timed out)."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self.lines.put(None)
                return None
            self.all.append(line)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and pred(msg):
                return msg

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(30)
        self.reader.join(30)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.all.append(line)
        return rc

    def messages(self) -> list[dict]:
        out = []
        for line in self.all:
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict):
                    out.append(msg)
        return out

    def stderr_tail(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-1500:]


class KillState:
    """What the checks remember across kills of one model directory."""

    def __init__(self, base: dict[str, torch.Tensor]) -> None:
        self.base = base
        self.seen: dict[int, str] = {}  # seq -> hash of every event seen after a kill
        self.reported: set[tuple[str, str]] = set()  # ("apply"|"revert", id) a child said was done


def check_dir(d: Path, st: KillState) -> dict[str, Any]:
    """Reopen a killed directory and measure what the crash did."""
    from knowedit.editor import Editor
    from knowedit.ledger import LedgerBusy

    out: dict[str, Any] = {"problems": [], "lost": [], "half": set(), "events": 0}
    with Editor.open(d, wait_s=15) as ed:
        out["problems"] += ed.verify()
        events = ed.history()
        out["events"] = len(events)
        diff = differing_rows(live_pools(ed), replay(st.base, events))
        if diff:
            touched = {(p, s) for p, rows in diff.items() for s in rows}
            out["half"].update(e.edit_id for e in events if e.kind != "revert" and {(r.pool, r.slot) for r in e.rows} & touched)
            out["problems"].append(f"live rows differ from base + replay: { {p: r[:5] for p, r in diff.items()} }")
        if ed.ledger is not None:
            try:
                with ed.ledger.transaction():
                    pass
            except LedgerBusy as err:
                out["problems"].append(f"a lock was left behind: {err}")
    for eid, why in structural_problems(events):
        out["half"].add(eid)
        out["problems"].append(f"{eid}: {why}")
    if out["problems"] and not out["half"]:
        out["half"].add("?")  # verify found something no edit id explains: still counted
    have = {(e.kind if e.kind == "revert" else "apply", e.edit_id) for e in events}
    out["lost"] += [f"reported {k} {i} is not in the ledger" for k, i in sorted(st.reported) if (k, i) not in have]
    now = {e.seq: e.hash for e in events}
    out["lost"] += [f"event {s} seen earlier is {'gone' if s not in now else 'changed'}" for s, h in st.seen.items() if now.get(s) != h]
    st.seen.update(now)
    out["have"] = have
    return out


def _record_reports(msgs: list[dict], st: KillState) -> None:
    for m in msgs:
        if "applied" in m:
            st.reported.add(("apply", m["applied"]))
        if "reverted" in m:
            st.reported.update(("revert", i) for i in m["reverted"])


def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for k in ("KNOWEDIT_LEDGER_KEY", "KNOWEDIT_LEDGER_KEY_FILE"):
        env.pop(k, None)
    return env


def _knowedit_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "knowedit"
    return [str(exe)] if exe.is_file() else [sys.executable, "-c", "from knowedit.cli.app import main; main()"]


def _last_seq(db: Path) -> int:
    """The newest event's seq, read with plain sqlite3 while a child writes (0: no ledger yet)."""
    if not db.is_file():
        return 0
    con = sqlite3.connect(db, timeout=5)
    try:
        return int(con.execute("SELECT coalesce(max(seq), 0) FROM ledger_events").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def _cli_rows(text: str) -> list[dict]:
    """The applied edits in `knowedit edit apply --file --json` output (a list, or
    ``{"applied": [...], "failed": [...], ...}``)."""
    data = json.loads(text)
    return data["applied"] if isinstance(data, dict) else data


def kill_cli(d: Path, st: KillState, rng: random.Random, work: Path, env: dict[str, str], i: int) -> dict[str, Any]:
    """Kill `knowedit edit apply --file` at a random instant, check, then finish it with --resume."""
    from knowedit.data import load_records
    from knowedit.editor import Editor

    reqs = rng.sample(load_records(d / "edits.jsonl"), 8)
    batch = work / f"batch-{i}.jsonl"
    batch.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    cmd = [*_knowedit_cmd(), "edit", "apply", "--model", str(d), "--file", str(batch), "--max-steps", "8", "--json", *cli_allow_failed()]
    start = _last_seq(d / LEDGER)
    child = Child(cmd, env, work)
    end = time.monotonic() + 120
    while child.proc.poll() is None and _last_seq(d / LEDGER) <= start and time.monotonic() < end:
        time.sleep(0.05)  # wait for the batch's first commit
    delay = rng.uniform(0.0, 1.0)
    time.sleep(delay)
    finished = child.proc.poll() is not None
    rc = child.kill()
    out = b"".join(child.all).decode(errors="replace")
    if finished and rc == 0:
        _record_reports([{"applied": r["id"]} for r in _cli_rows(out)], st)
    res = check_dir(d, st)
    res.update(at=f"{delay:.2f} s after the batch's first commit" + (" (it had finished)" if finished else ""), rc=rc)
    # Finish the batch: each request live once, nothing applied twice.
    with Editor.open(d) as ed:
        live_before = ed.live_requests()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    if done.returncode != 0:
        res["problems"].append(f"--resume failed: {done.stderr[-500:]}")
    else:
        resumed = _cli_rows(done.stdout)
        _record_reports([{"applied": r["id"]} for r in resumed], st)
        twice = [r["id"] for r in resumed if (r["prompt"].strip(), r["target_new"].strip(), r["subject"]) in live_before]
        if twice:
            res["problems"].append(f"--resume applied live requests again: {twice}")
        with Editor.open(d) as ed:
            live = ed.live_requests()
        missing = [r.prompt for r in reqs if (r.prompt.strip(), r.target_new.strip(), r.subject) not in live]
        res["lost"] += [f"batch request {p!r} not live after --resume" for p in missing]
        after = check_dir(d, st)
        res["problems"] += after["problems"]
        res["lost"] += after["lost"]
        res["half"] |= after["half"]
        res["resumed"] = len(resumed)
    return res


def battery_sigkill(
    pristine: Path, seeded: Path, work: Path, seed: int, kills: int, modes: list[str] | None = None
) -> dict[str, Any]:
    """``kills`` SIGKILLs cycling through ``modes`` (default :data:`KILL_MODES`)."""
    from knowedit.checkpoint import MODEL_FILE, load_checkpoint
    from knowedit.editor import Editor
    from knowedit.side_files import CORPUS_FILE

    t0 = time.perf_counter()
    rng = random.Random(seed)
    env = _child_env()
    script = work / "child.py"
    script.write_text(CHILD)
    d = copy_model(seeded, work / "killed", stats=True)
    model_bytes = hashlib.sha256((d / MODEL_FILE).read_bytes()).hexdigest()
    st = KillState(pools_of(load_checkpoint(d).model))
    ref_docs = (seeded / STATS_FILES[1]).read_bytes()
    from safetensors.torch import load_file

    ref_stats = load_file(str(seeded / STATS_FILES[0]))
    has_corpus = (pristine / CORPUS_FILE).is_file()
    cycle = modes or KILL_MODES
    plan = [cycle[i % len(cycle)] for i in range(kills)]
    records: list[dict[str, Any]] = []
    for i, mode in enumerate(plan):
        tk = time.perf_counter()
        k = rng.randint(1, 3)
        rec: dict[str, Any] = {"kill": i + 1, "mode": mode}
        if mode == "cli_random":
            res = kill_cli(d, st, rng, work, env, i)
            rec.update(at=res.pop("at"), resumed=res.pop("resumed", None))
        elif mode.startswith("stats_"):
            if not has_corpus:
                rec.update(skipped="no corpus.jsonl: the first statistics write cannot happen")
                records.append(rec)
                continue
            sd = work / f"fresh-{i}"
            copy_model(pristine, sd, stats=False)
            child = Child([sys.executable, str(script), str(sd), mode, str(rng.randrange(1 << 30)), str(k)], env, work)
            msg = child.wait_for(lambda m: "opening" in m, 120)
            if msg is not None and mode == "stats_random":
                delay = rng.uniform(0.05, 2.5)
                time.sleep(delay)
                msg = {"at": f"{delay:.2f} s into the first Editor.open", "pending": []}
            elif msg is not None:
                msg = child.wait_for(lambda m: "at" in m, 120)
            alive = child.proc.poll() is None
            rc = child.kill()
            rec["at"] = msg["at"] if msg else None
            if msg is None or not alive:
                rec["child_error"] = f"rc {rc}: {child.stderr_tail()}"
            side = {
                "docs": (sd / STATS_FILES[1]).is_file(), "stats": (sd / STATS_FILES[0]).is_file(),
                "temporaries": sorted(p.name for p in sd.iterdir() if p.name.endswith(".tmp")),
                "ledger": (sd / LEDGER).exists(),
            }
            sst = KillState(pools_of(load_checkpoint(sd).model))
            _record_reports(child.messages(), sst)
            with Editor.open(sd) as ed:
                side["reopened"] = ed.background
                side_ok = ed.stats is not None and ed.stats.n_docs == len(ed.docs)
            side["temporaries_after_reopen"] = sorted(p.name for p in sd.iterdir() if p.name.endswith(".tmp"))
            got = load_file(str(sd / STATS_FILES[0]))
            same_stats = got.keys() == ref_stats.keys() and all(torch.equal(got[n], ref_stats[n]) for n in got)
            side_ok = side_ok and (sd / STATS_FILES[1]).read_bytes() == ref_docs and same_stats
            res = check_dir(sd, sst)
            if not side_ok:
                res["problems"].append("side files not valid (or not equal to a clean build) after reopening")
                res["half"].add("side files")
            rec["side_files"] = side
            shutil.rmtree(sd)
        else:
            child = Child([sys.executable, str(script), str(d), mode, str(rng.randrange(1 << 30)), str(k)], env, work)
            msg = child.wait_for(lambda m: "ready" in m, 120)
            if msg is not None and mode == "random":
                delay = rng.uniform(0.2, 2.5)
                time.sleep(delay)
                msg = {"at": f"{delay:.2f} s after ready", "pending": []}
            elif msg is not None:
                msg = child.wait_for(lambda m: "pending" in m or "error" in m, 120)
                if msg is not None and mode == "commit_window":
                    time.sleep(rng.uniform(0.0, 0.002))
            alive = child.proc.poll() is None
            rc = child.kill()
            rec["at"] = msg.get("at") if msg else None
            if msg is None or not alive or "error" in msg:
                rec["child_error"] = f"rc {rc}: {msg} {child.stderr_tail()}"
            msgs = child.messages()
            _record_reports(msgs, st)
            res = check_dir(d, st)
            pending = msg.get("pending", []) if msg else []
            rec["pending"] = pending
            rec["pending_committed"] = [p for p in pending if tuple(p) in res["have"]]
            if mode in ("in_txn_apply", "in_txn_revert", "commit_start") and rec["pending_committed"]:
                res["problems"].append(f"killed before COMMIT, yet committed: {rec['pending_committed']}")
            if mode == "post_commit" and len(rec["pending_committed"]) != len(pending):
                res["lost"].append(f"committed (after_commit ran) but not in the ledger: {pending}")
            cascade = next((m for m in msgs if m.get("shares_slots_with")), None)
            if mode == "in_txn_revert":
                rec["cascade"] = cascade is not None  # a later edit shares a slot: several reverts
        rec.update(
            lost=len(res["lost"]), half_applied=len(res["half"]), events=res["events"],
            problems=res["problems"] + res["lost"], seconds=round(time.perf_counter() - tk, 1),
        )
        records.append(rec)
        print(f"  kill {i + 1:2d}/{kills} {mode:15s} events={rec['events']:3d} lost={rec['lost']} "
              f"half={rec['half_applied']} {rec.get('at') or ''}", flush=True)
    # After all the kills the base file is unchanged, the model still edits, and
    # reverting every edit gives the base back bit for bit.
    with Editor.open(d) as ed:
        ed.edit("The mother tongue of nobody is", "Czech", max_steps=3, **allow_failed())
        for eid in reversed(ed.live_edits()):
            ed.revert(eid)
        final_diff = differing_rows(live_pools(ed), st.base)
        final_verify = ed.verify()
    base_same = hashlib.sha256((d / MODEL_FILE).read_bytes()).hexdigest() == model_bytes
    done = [r for r in records if "skipped" not in r]
    by_mode: dict[str, dict[str, Any]] = {}
    for r in done:
        m = by_mode.setdefault(r["mode"], {"kills": 0, "lost": 0, "half_applied": 0, "pending_committed": 0, "child_errors": 0})
        m["kills"] += 1
        m["lost"] += r["lost"]
        m["half_applied"] += r["half_applied"]
        m["pending_committed"] += bool(r.get("pending_committed"))
        m["child_errors"] += "child_error" in r
    temporaries = sum(len(r["side_files"]["temporaries_after_reopen"]) for r in done if "side_files" in r)
    return {
        "cases": len(done),
        "lost": sum(r["lost"] for r in done),
        "half_applied": sum(r["half_applied"] for r in done),
        "undetected": None,
        "child_errors": sum("child_error" in r for r in done),
        "final_bit_identical": not final_diff,
        "final_verify": final_verify,
        "base_checkpoint_unchanged": base_same,
        "events_in_ledger": max((r["events"] for r in done if not r["mode"].startswith("stats_")), default=0),
        "stale_temporaries_after_reopen": temporaries,
        "by_mode": by_mode,
        "kills": records,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -------------------------------------------------------- battery 3: tamper


def _sql(db: Path, *stmts: tuple, restore_triggers: bool = True) -> None:
    """Rewrite the ledger like a tamperer with file access: drop the append-only
    triggers, run the statements, put the triggers back (unless told not to)."""
    con = sqlite3.connect(db, isolation_level=None)
    try:
        triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
        for name, _ in triggers:
            con.execute(f"DROP TRIGGER {name}")
        for stmt in stmts:
            con.execute(*stmt)
        if restore_triggers:
            for _, text in triggers:
                con.execute(text)
    finally:
        con.close()


def _q(db: Path, sql: str, *args: Any) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _rehash(db: Path, forge: bool = False, keep_macs: bool = True) -> None:
    """Recompute every hash from the stored events, as a tamperer who knows the
    encoding but not the HMAC key: each event keeps its old HMAC (``keep_macs``)
    or none. ``forge`` also appends a made-up apply event with a valid hash."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from knowedit.ledger_schema import GENESIS_HASH, EventRecord, RowRecord, record_digest

    engine = create_engine(f"sqlite:///{db}")
    stmts: list[tuple] = []
    try:
        with Session(engine) as s:
            recs = list(s.scalars(select(EventRecord).order_by(EventRecord.seq)))
            prev = GENESIS_HASH
            for rec in recs:
                rec.prev_hash = prev
                rec.hash = record_digest(rec)
                mac = rec.mac if keep_macs else None
                stmts.append(("UPDATE ledger_events SET prev_hash = ?, hash = ?, mac = ? WHERE seq = ?",
                              (rec.prev_hash, rec.hash, mac, rec.seq)))
                prev = rec.hash
            fake = None
            if forge:
                src = next(r for r in reversed(recs) if r.kind == "apply" and r.rows)
                r0 = src.rows[0]
                fake = EventRecord(
                    seq=recs[-1].seq + 1, kind="apply", edit_id="e00f0f0f0f0", created_at=src.created_at,
                    author="intruder", note=None, request_json=src.request_json, method=src.method,
                    settings_json=src.settings_json, metrics_json=src.metrics_json, prev_hash=prev, hash="",
                    mac=None,
                )
                # It takes over a live row of the newest edit: its before row is what is live.
                fake.rows = [RowRecord(position=0, pool=r0.pool, slot=r0.slot, dtype=r0.dtype, shape=r0.shape,
                                       before=r0.after, after=bytes(len(r0.after)))]
                fake.hash = record_digest(fake)
            s.expunge_all()  # the recomputed hashes go in below, with the triggers dropped
            if fake is not None:
                s.add(fake)
                s.commit()  # an INSERT: the append-only triggers allow it
    finally:
        engine.dispose()
    _sql(db, *stmts)


def _flip_bit(b: bytes, i: int = 3) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


def tamper_kinds(db: Path, keyed: bool) -> list[tuple[str, Callable[[], None], bool]]:
    """(name, tamper function, is a documented limit) for one pristine ledger."""
    events = _q(db, "SELECT id, seq, kind, edit_id FROM ledger_events ORDER BY seq")
    n = len(events)
    reverted = {e[3] for e in events if e[2] == "revert"}
    applies = [e for e in events if e[2] == "apply"]
    # An apply committed with allow_failed may have changed no row: tamper with one that did.
    with_rows = [e for e in applies if _q(db, "SELECT count(*) FROM ledger_rows WHERE event_id = ?", e[0])[0][0]]
    mid_apply = with_rows[len(with_rows) // 2]
    live_mid = next(e for e in applies[1:] if e[3] not in reverted and e[1] < n)
    rev_mid = next(e for e in events if e[2] == "revert" and e[1] < n - 1)
    row_id, row_after, row_shape = _q(db, "SELECT id, after, shape FROM ledger_rows WHERE event_id = ? ORDER BY position", mid_apply[0])[0]
    dim = json.loads(row_shape)[0]
    last2 = [e[1] for e in events[-2:]]

    def file_bytes(f: Callable[[bytes], bytes]) -> Callable[[], None]:
        return lambda: db.write_bytes(f(db.read_bytes()))

    def bitrot(data: bytes) -> bytes:
        at = data.find(row_after)
        if at < 0:
            raise RuntimeError("row bytes not found in the file")
        return data[: at + 5] + bytes([data[at + 5] ^ 0x10]) + data[at + 6:]

    def swap_seq() -> None:
        a, b = applies[1][1], applies[2][1]
        _sql(db, ("UPDATE ledger_events SET seq = -1 WHERE seq = ?", (a,)), ("UPDATE ledger_events SET seq = ? WHERE seq = ?", (a, b)),
             ("UPDATE ledger_events SET seq = ? WHERE seq = -1", (b,)))

    def delete_event(seqs: list[int]) -> Callable[[], None]:
        return lambda: _sql(db, *[s for q in seqs for s in (
            ("DELETE FROM ledger_rows WHERE event_id = (SELECT id FROM ledger_events WHERE seq = ?)", (q,)),
            ("DELETE FROM ledger_events WHERE seq = ?", (q,)),
        )])

    first_row = "(SELECT min(id) FROM ledger_rows)"
    kinds: list[tuple[str, Callable[[], None], bool]] = [
        ("row after bytes changed (after = before)", lambda: _sql(db, (f"UPDATE ledger_rows SET after = before WHERE id = {first_row}",)), False),
        ("row before bytes changed (one bit)", lambda: _sql(db, ("UPDATE ledger_rows SET before = ? WHERE id = ?", (_flip_bit(_q(db, "SELECT before FROM ledger_rows WHERE id = ?", row_id)[0][0]), row_id))), False),
        ("row slot changed", lambda: _sql(db, ("UPDATE ledger_rows SET slot = slot + 1 WHERE id = ?", (row_id,))), False),
        ("row pool renamed", lambda: _sql(db, ("UPDATE ledger_rows SET pool = pool || 'x' WHERE id = ?", (row_id,))), False),
        ("row dtype changed (float32 -> float16)", lambda: _sql(db, ("UPDATE ledger_rows SET dtype = 'float16' WHERE id = ?", (row_id,))), False),
        ("row shape changed, same byte count", lambda: _sql(db, ("UPDATE ledger_rows SET shape = ? WHERE id = ?", (json.dumps([2, dim // 2]).replace(" ", ""), row_id))), False),
        ("row deleted from an apply", lambda: _sql(db, ("DELETE FROM ledger_rows WHERE id = ?", (row_id,))), False),
        ("row added to an apply", lambda: _sql(db, ("INSERT INTO ledger_rows (event_id, position, pool, slot, dtype, shape, before, after) "
                                                   "SELECT event_id, 999, pool, slot + 100000, dtype, shape, before, after FROM ledger_rows WHERE id = ?", (row_id,))), False),
        ("apply event deleted (middle)", delete_event([mid_apply[1]]), False),
        ("revert event deleted (middle)", delete_event([rev_mid[1]]), False),
        ("two events' seq swapped", swap_seq, False),
        ("revert re-targeted at another live edit", lambda: _sql(db, ("UPDATE ledger_events SET edit_id = ? WHERE seq = ?", (live_mid[3], rev_mid[1]))), False),
        ("request JSON changed (target_new)", lambda: _sql(db, ("UPDATE ledger_events SET request = replace(request, '\"target_new\":\"', '\"target_new\":\"X') WHERE seq = ?", (mid_apply[1],))), False),
        ("settings JSON changed", lambda: _sql(db, ("UPDATE ledger_events SET settings = replace(settings, '\"top_t\":', '\"top_t\":1') WHERE seq = ?", (mid_apply[1],))), False),
        ("author changed", lambda: _sql(db, ("UPDATE ledger_events SET author = 'someone else' WHERE seq = ?", (mid_apply[1],))), False),
        ("created_at changed", lambda: _sql(db, ("UPDATE ledger_events SET created_at = '2000-01-01T00:00:00.000000+00:00' WHERE seq = ?", (mid_apply[1],))), False),
        ("event hash changed", lambda: _sql(db, ("UPDATE ledger_events SET hash = substr(hash, 2) || '0' WHERE seq = ?", (mid_apply[1],))), False),
        ("event prev_hash changed", lambda: _sql(db, ("UPDATE ledger_events SET prev_hash = ? WHERE seq = ?", ("1" * 64, mid_apply[1]))), False),
        ("append-only triggers dropped (nothing else)", lambda: _sql(db, restore_triggers=False), False),
        ("base fingerprint swapped", lambda: _sql(db, ("UPDATE ledger_meta SET value = ? WHERE key = 'base_fingerprint'", ("f" * 64,))), False),
        ("schema version changed", lambda: _sql(db, ("UPDATE ledger_meta SET value = '1' WHERE key = 'schema_version'",)), False),
        ("row byte flipped in the file (bit rot)", file_bytes(bitrot), False),
        ("file truncated to half", file_bytes(lambda b: b[: len(b) // 2]), False),
        ("file truncated to zero bytes", file_bytes(lambda b: b""), False),
        ("file header overwritten", file_bytes(lambda b: b"\x00" * 16 + b[16:]), False),
        ("junk appended to the file", file_bytes(lambda b: b + random.Random(7).randbytes(5000)), False),
    ]
    def row_changed() -> None:
        _sql(db, (f"UPDATE ledger_rows SET after = before WHERE id = {first_row}",))

    if keyed:
        kinds += [
            ("keyed: row changed, hashes recomputed without the key", lambda: (row_changed(), _rehash(db)), False),
            ("keyed: an event's HMAC changed", lambda: _sql(db, ("UPDATE ledger_events SET mac = ? WHERE seq = ?", ("0" * 64, mid_apply[1]))), False),
            ("keyed: forged event appended (valid hash, no key)", lambda: _rehash(db, forge=True), False),
            ("keyed: key id and HMACs stripped, row changed, hashes recomputed (opened with the key)",
             lambda: (_sql(db, ("DELETE FROM ledger_meta WHERE key = 'hmac_key_id'",)), row_changed(),
                      _rehash(db, keep_macs=False)), False),
            ("keyed: last 2 events dropped", delete_event(last2), True),
        ]
    else:
        kinds += [
            ("unkeyed: last event dropped", delete_event(last2[-1:]), True),
            ("unkeyed: row changed, all hashes recomputed", lambda: (row_changed(), _rehash(db)), True),
            ("unkeyed: forged event appended with a valid hash", lambda: _rehash(db, forge=True), True),
        ]
    return kinds


def _build_history(d: Path, key_file: Path | None) -> None:
    """Applies, a revert in the middle, a cascade revert, more applies after them."""
    from knowedit.data import load_records
    from knowedit.data.records import EditRequest
    from knowedit.editor import Editor

    reqs = load_records(d / "edits.jsonl")
    allow = allow_failed()
    with key_env(key_file), Editor.open(d, author="tamper-setup") as ed:
        ids = [ed.apply(r, max_steps=8, **allow).id for r in reqs[:4]]
        ed.revert(ids[3])
        r = reqs[0]
        ed.apply(EditRequest(prompt=r.prompt, target_new=r.ground_truth or "Czech", subject=r.subject), max_steps=8, **allow)
        ed.revert(ids[0], cascade=True)
        for q in reqs[4:7]:
            ed.apply(q, max_steps=8, **allow)
        assert ed.verify() == [], ed.verify()
    con = sqlite3.connect(d / LEDGER)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _dump(db: Path) -> str | None:
    """The logical content of a SQLite file (its SQL dump), or None when SQLite cannot read it."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return "\n".join(con.iterdump())
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _restore(d: Path, pristine: bytes) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{d / LEDGER}{suffix}")
    (d / LEDGER).write_bytes(pristine)


def detect(d: Path, key_file: Path | None, prompt: str) -> dict[str, Any]:
    """Does Editor.open/ask refuse, and does `knowedit ledger verify` exit non-zero?"""
    from typer.testing import CliRunner

    from knowedit.cli.app import app
    from knowedit.editor import Editor

    out: dict[str, Any] = {}
    with key_env(key_file):
        try:
            with Editor.open(d) as ed:
                ed.ask(prompt)
                ed.live_edits()
            out["open_refused"] = False
        except Exception as exc:  # noqa: BLE001 - what refused it is recorded
            out["open_refused"] = True
            out["open_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        res = CliRunner().invoke(app, ["ledger", "verify", "--model", str(d)])
        out["verify_exit"] = res.exit_code
        out["verify_traceback"] = "Traceback" in res.output or not isinstance(res.exception, (SystemExit, type(None)))
        out["verify_says"] = " ".join(res.output.split())[:160]
    out["detected"] = out["open_refused"] or out["verify_exit"] != 0
    return out


def battery_tamper(seeded: Path, work: Path, select: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Every tamper kind (or those whose name ``select`` accepts) on an unkeyed and a keyed ledger."""
    from knowedit.data import load_records

    t0 = time.perf_counter()
    key_file = work / "ledger.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    prompt = load_records(seeded / "edits.jsonl")[0].prompt
    results: list[dict[str, Any]] = []
    for keyed in (False, True):
        d = copy_model(seeded, work / f"tamper-{'keyed' if keyed else 'plain'}", stats=True)
        kf = key_file if keyed else None
        _build_history(d, kf)
        pristine = (d / LEDGER).read_bytes()
        _restore(d, pristine)
        clean = detect(d, kf, prompt)
        if clean["detected"]:
            raise RuntimeError(f"the untampered {'keyed' if keyed else 'unkeyed'} ledger is refused: {clean}")
        clean_dump = _dump(d / LEDGER)
        for name, fn, limit in tamper_kinds(d / LEDGER, keyed):
            if select is not None and not select(name):
                continue
            _restore(d, pristine)
            fn()
            changed = _dump(d / LEDGER) != clean_dump  # before anything opens the tampered file
            res = detect(d, kf, prompt)
            res["content_changed"] = changed
            res.update(kind=name, keyed=keyed, known_limit=limit)
            results.append(res)
            mark = "detected" if res["detected"] else ("not detected (documented limit)" if limit else "NOT DETECTED")
            print(f"  {name:75s} open refused={res['open_refused']!s:5s} verify exit={res['verify_exit']}  {mark}", flush=True)
    required = [r for r in results if not r["known_limit"]]
    limits = [r for r in results if r["known_limit"]]
    return {
        "cases": len(required),
        "distinct_kinds": len({r["kind"] for r in required}),
        "lost": None,
        "half_applied": None,
        "undetected": sum(not r["detected"] for r in required),
        "undetected_kinds": [
            {"kind": r["kind"], "keyed": r["keyed"], "content_changed": r["content_changed"]} for r in required if not r["detected"]
        ],
        "open_accepted_but_verify_failed": [r["kind"] for r in required if not r["open_refused"] and r["verify_exit"] != 0],
        "verify_tracebacks": [r["kind"] for r in results if r["verify_traceback"]],
        "known_limit_cases": len(limits),
        "known_limit_undetected": sum(not r["detected"] for r in limits),
        "kinds": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -------------------------------------------------------------------- main


def _cell(v: Any) -> str:
    return "–" if v is None else str(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="trained checkpoint dir (default: train `tiny` into a temp dir)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="random apply/revert steps")
    ap.add_argument("--kills", type=int, default=24, help="SIGKILLs (at least 20 for the full battery)")
    ap.add_argument("--only", default="random,sigkill,tamper", help="comma-separated batteries to run")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="knowedit-battery-"))
    try:
        pristine, seeded, prep_s = prepare_models(args.model, work)
        print(f"model ready in {prep_s:.1f} s ({'trained tiny' if args.model is None else args.model}); work dir {work}", flush=True)
        out: dict[str, Any] = {}
        if "random" in only:
            print(f"battery 1: random apply/revert, {args.steps} steps", flush=True)
            out["random_apply_revert"] = battery_random(seeded, work, args.seed, args.steps)
        if "sigkill" in only:
            print(f"battery 2: SIGKILL, {args.kills} kills", flush=True)
            out["sigkill"] = battery_sigkill(pristine, seeded, work, args.seed, args.kills)
        if "tamper" in only:
            print("battery 3: tamper", flush=True)
            out["tamper"] = battery_tamper(seeded, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - t_all

    labels = {"random_apply_revert": ("random apply/revert", "steps"), "sigkill": ("SIGKILL", "kills"), "tamper": ("tamper", "cases")}
    if "tamper" in out:
        labels["tamper"] = ("tamper", f"cases ({out['tamper']['distinct_kinds']} kinds, unkeyed and keyed ledger)")
    print("\n| battery | cases | lost | half applied | undetected | seconds |")
    print("|---|---|---|---|---|---|")
    for key, r in out.items():
        name, unit = labels[key]
        print(f"| {name} | {r['cases']} {unit} | {_cell(r['lost'])} | {_cell(r['half_applied'])} | {_cell(r['undetected'])} | {r['seconds']} |")
    if "tamper" in out:
        t = out["tamper"]
        print(f"| tamper, documented limits (not counted) | {t['known_limit_cases']} cases | – | – | "
              f"{t['known_limit_undetected']} (expected) | – |")
    extra = []
    if "random_apply_revert" in out:
        r = out["random_apply_revert"]
        extra.append(f"random: {r['events']} events, steps with live != replay: {r['mismatched_steps']}, "
                     f"all reverted -> bit-identical: {r['final_bit_identical']}, verify: {r['final_verify'] or 'clean'}, "
                     f"other problems: {len(r['problems'])}, unexpected errors: {len(r['unexpected_errors'])}")
    if "sigkill" in out:
        s = out["sigkill"]
        extra.append(f"sigkill: child errors {s['child_errors']}, final bit-identical {s['final_bit_identical']}, "
                     f"base checkpoint unchanged {s['base_checkpoint_unchanged']}, .tmp files left by stats kills (still there "
                     f"after reopening) {s['stale_temporaries_after_reopen']}")
        print("\n| kill point | kills | lost | half applied | pending event committed |")
        print("|---|---|---|---|---|")
        for mode, m in s["by_mode"].items():
            print(f"| {MODE_DESCRIPTION[mode]} | {m['kills']} | {m['lost']} | {m['half_applied']} | {m['pending_committed']} |")
    if "tamper" in out:
        t = out["tamper"]
        for u in t["undetected_kinds"]:
            extra.append(f"tamper NOT DETECTED: {u['kind']} ({'keyed' if u['keyed'] else 'unkeyed'} ledger); "
                         f"SQL dump of the ledger changed: {u['content_changed']}")
        extra.append(f"tamper: accepted by Editor.open but failed by ledger verify: {sorted(set(t['open_accepted_but_verify_failed']))}; "
                     f"verify tracebacks: {t['verify_tracebacks'] or 'none'}")
    print()
    for line in extra:
        print(line)
    print(f"total {total_s:.0f} s")
    bad = any(
        (r.get("lost") or 0) + (r.get("half_applied") or 0) + (r.get("undetected") or 0) for r in out.values()
    ) or any(r.get("problems") or r.get("unexpected_errors") for r in out.values())
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "cuda": torch.cuda.is_available()},
            "seed": args.seed, "total_seconds": round(total_s, 1), "all_zero": not bad,
        }
        args.json_out.write_text(json.dumps({**meta, **out}, indent=2, default=str) + "\n")
        print(f"wrote {args.json_out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
