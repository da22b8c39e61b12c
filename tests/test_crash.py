"""Crash safety: SIGKILL an editing process at random instants, again and again,
on one model directory; after every kill a fresh Editor must find a ledger whose
hash chain is intact, whose every apply has all its rows, and whose replay onto
the base is exactly the live model (each edit fully applied and recorded, or absent).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ledger_helpers import assert_same_pools, replay

from knowedit.checkpoint import MODEL_FILE, load_checkpoint
from knowedit.editor import LEDGER_FILE, Editor
from knowedit.ledger import Event

REPO = Path(__file__).resolve().parents[1]

KILLS = 20
SLEEP_S = (0.2, 2.5)
SEED = int(os.environ.get("KNOWEDIT_CRASH_SEED", "20240611"))

# The child edits forever: mostly applies, sometimes a cascading revert (a revert
# appends several events in one transaction). It prints each committed event.
CHILD = textwrap.dedent(
    """
    import json, os, random, sys
    import torch
    torch.set_num_threads(1)
    from knowedit.data import load_records
    from knowedit.editor import Editor

    model, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    reqs = load_records(os.path.join(model, "edits.jsonl"))
    ed = Editor.open(model, author=f"child-{seed}")
    # Warm up what the first edit would import lazily (torch.optim pulls in torch._dynamo,
    # ~2 s), so that the kills land in edits, not in imports.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    ed.locate(reqs[0].prompt, reqs[0].target_new, reqs[0].subject)
    print("ready", flush=True)
    while True:
        live = ed.live_edits()
        if len(live) > 3 and rng.random() < 0.3:
            done = ed.revert(rng.choice(live), cascade=True)
            print(json.dumps({"reverted": done}), flush=True)
        else:
            rec = ed.apply(rng.choice(reqs), max_steps=rng.choice([3, 8]), layers=rng.choice(["last", "all"]), allow_failed=True)
            print(json.dumps({"applied": rec.id}), flush=True)
    """
)


def _pools(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {p.name: p.values.detach().cpu().clone() for p in model.pools.values()}


def _check_after_crash(model_dir: Path, base: dict[str, torch.Tensor], committed: dict[str, set[str]], kill: int) -> list[Event]:
    with Editor.open(model_dir) as ed:
        problems = ed.verify()
        assert problems == [], f"kill {kill}: {problems}"
        events = ed.history()
        assert_same_pools(_pools(ed.model), replay(base, events), f"kill {kill}: live vs base + replay")
        if ed.ledger is not None:
            with ed.ledger.transaction():  # the killed process left no lock behind
                pass
        else:  # killed before its first commit: an edit creates the ledger only when it commits
            assert not committed["applied"], f"kill {kill}: edits were reported but there is no ledger"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for ev in events:
        if ev.kind == "apply":
            assert len(ev.rows) == ev.metrics["slots_touched"], f"kill {kill}: {ev.edit_id} lost rows"
            assert len({(r.pool, r.slot) for r in ev.rows}) == len(ev.rows)
        else:
            assert ev.rows == []
    # Everything the child reported as done was committed before it said so.
    applied = {e.edit_id for e in events if e.kind == "apply"}
    reverted = {e.edit_id for e in events if e.kind == "revert"}
    assert committed["applied"] <= applied, f"kill {kill}: reported applies missing from the ledger"
    assert committed["reverted"] <= reverted, f"kill {kill}: reported reverts missing from the ledger"
    return events


@pytest.mark.slow
def test_sigkill_at_random_instants_never_breaks_the_ledger(tiny_ckpt: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model_dir)
    base = _pools(load_checkpoint(model_dir).model)
    model_bytes = (model_dir / MODEL_FILE).read_bytes()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    rng = random.Random(SEED)
    committed: dict[str, set[str]] = {"applied": set(), "reverted": set()}
    sizes = []
    for kill in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(model_dir), str(rng.randrange(1 << 30))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        )
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == "ready", f"seed {SEED}, kill {kill}: {line!r} {proc.stderr.read()}"  # type: ignore[union-attr]
            time.sleep(rng.uniform(*SLEEP_S))
            assert proc.poll() is None, f"seed {SEED}, kill {kill}: the child died: {proc.stderr.read()}"  # type: ignore[union-attr]
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        for msg in map(json.loads, out.splitlines()):
            if "applied" in msg:
                committed["applied"].add(msg["applied"])
            else:
                committed["reverted"].update(msg["reverted"])
        events = _check_after_crash(model_dir, base, committed, kill)
        sizes.append(len(events))
    print(f"crash test (seed {SEED}): ledger size after each kill {sizes}")
    assert sizes == sorted(sizes), f"the ledger shrank: {sizes}"
    assert sizes[-1] >= KILLS // 2, f"too few events to mean anything: {sizes}"
    assert (model_dir / MODEL_FILE).read_bytes() == model_bytes, "the base checkpoint changed"
    assert (model_dir / LEDGER_FILE).is_file()
    # After all that, the model still edits, and reverting every edit gives the base back.
    with Editor.open(model_dir) as ed:
        ed.edit("The mother tongue of nobody is", "Czech", max_steps=3, allow_failed=True)
        for eid in reversed(ed.live_edits()):
            ed.revert(eid)
        assert ed.verify() == []
        assert_same_pools(_pools(ed.model), base, "all reverted after the crashes")
