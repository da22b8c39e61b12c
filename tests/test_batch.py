"""Batch editing: several requests in one optimisation and one ledger event."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import clean_failure, tree
from ledger_helpers import assert_same_pools

from knowedit.checkpoint import LEDGER_FILE
from knowedit.cli.app import app
from knowedit.data import EditRequest, load_records
from knowedit.editor import EditError, EditFailed, Editor


def _pools(ed: Editor) -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in ed.pools.items()}


def _reqs(model_dir: Path) -> list[EditRequest]:
    return load_records(model_dir / "edits.jsonl")


def _editable(ed: Editor, n: int) -> list[EditRequest]:
    """``n`` requests the (weak) tiny model can each reach on its own."""
    good = [r for r in _reqs(ed.ck.path)[:16] if ed._attempt([r], ed._options({})).metrics["success"]]
    assert len(good) >= n, "the tiny model should reach a few of its edits"
    return good[:n]


#: A batch has to move every request at once: more room than a single edit.
STEPS = 400


def test_a_batch_is_one_event_every_request_lands_and_one_revert_undoes_it(model_dir: Path) -> None:
    with Editor.open(model_dir) as ed:
        reqs = _editable(ed, 4)
        base = _pools(ed)
        rec = ed.edit_batch(reqs, max_steps=STEPS)
        assert rec.metrics["success"] and [r["success"] for r in rec.metrics["requests"]] == [True] * 4
        assert rec.metrics["guard_flips"] == 0
        hist = ed.history()
        assert len(hist) == 1 and hist[0].request["batch"] == 4
        assert [r["prompt"] for r in hist[0].request["requests"]] == [r.prompt for r in reqs]
        assert ed.live_requests() == {(r.prompt.strip(), r.target_new.strip(), r.subject) for r in reqs}
        for r in reqs:
            assert ed.ask(r.prompt) == r.target_new
        assert ed.revert(rec.id) == [rec.id]
        assert_same_pools(_pools(ed), base, "the batch reverted")
        assert ed.verify() == []


def test_a_later_edit_keeps_a_batch_and_replaces_its_own_prompt(model_dir: Path) -> None:
    with Editor.open(model_dir) as ed:
        reqs = _editable(ed, 4)
        batch = ed.edit_batch(reqs[:3], max_steps=STEPS)
        ed.apply(reqs[3], max_steps=STEPS)  # guards the batch's answer positions it reads
        for r in reqs:
            assert ed.ask(r.prompt) == r.target_new
        assert ed._same_prompt_edits(reqs[1].prompt) == {batch.id}  # a re-edit of a batch prompt replaces it
    with Editor.open(model_dir) as ed:  # replayed from the ledger by a new process
        for r in reqs:
            assert ed.ask(r.prompt) == r.target_new
        assert ed.verify() == []


def test_a_failed_batch_writes_nothing_and_names_each_failure(model_dir: Path) -> None:
    reqs = _reqs(model_dir)[:3]
    before = tree(model_dir)
    with Editor.open(model_dir) as ed:
        with pytest.raises(EditFailed, match="batch not applied"):
            ed.edit_batch(reqs, max_steps=1)
        assert ed.history() == []
    assert tree(model_dir) == before and not (model_dir / LEDGER_FILE).exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [("empty", "empty batch"), ("twice", "given twice"), ("all", "layers='last'"), ("subject", "request 2 of the batch")],
)
def test_bad_batches_are_refused(model_dir: Path, change: str, match: str) -> None:
    reqs = _reqs(model_dir)[:2]
    options: dict = {}
    if change == "empty":
        reqs = []
    elif change == "twice":
        reqs = [reqs[0], reqs[0]]
    elif change == "all":
        options = {"layers": "all"}
    else:
        reqs = [reqs[0], EditRequest(prompt=reqs[1].prompt, target_new="x", subject="nobody")]
    with Editor.open(model_dir) as ed, pytest.raises(EditError, match=match):
        ed.edit_batch(reqs, **options)
    assert not (model_dir / LEDGER_FILE).exists()


def test_cli_file_batches(model_dir: Path, runner, tmp_path: Path) -> None:  # noqa: ANN001
    src = [json.loads(line) for line in (model_dir / "edits.jsonl").read_text().splitlines()[:5]]
    f = tmp_path / "five.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in src))
    out = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "--file", str(f), "--batch", "2", "--json", "--allow-failed"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert len(res["applied"]) == 3 and res["failed"] == [] and res["skipped"] == 0  # 2 + 2 + 1
    listed = runner.invoke(app, ["ledger", "list", "-m", str(model_dir), "--json"])
    rows = json.loads(listed.output)
    assert [r["prompt"].endswith("(batch of 2)") for r in rows] == [True, True, False]
    again = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "--file", str(f), "--batch", "2", "--resume", "--json", "--allow-failed"])
    assert again.exit_code == 0 and json.loads(again.output)["skipped"] == 5
    clean_failure(runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "-p", "x", "-t", "y", "--batch", "2"]), "--batch goes with --file")


def test_eval_batches(model_dir: Path, runner) -> None:  # noqa: ANN001
    out = runner.invoke(app, ["eval", "-m", str(model_dir), "-e", str(model_dir / "edits.jsonl"), "--n", "4", "--batch", "2",
                              "--threads", "1", "--option", "max_steps=300", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["batch"] == 2 and len(res["edits"]) == 4 and res["batch_seconds"]["median"] > 0
    assert res["reliability"]["prompts"] == 4
    clean_failure(runner.invoke(app, ["eval", "-m", str(model_dir), "-e", str(model_dir / "edits.jsonl"), "--n", "2",
                                      "--batch", "2", "--method", "ft"]), "--batch goes with --method sparse")
