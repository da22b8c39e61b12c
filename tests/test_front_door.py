"""Front-door defects, each pinned by a test: 1 an edit that misses its target is
not committed, 2 EasyEdit's raw zsRE / CounterFact records and portability,
3 ``knowedit export``, 4 help defaults, full ids and the eval plot, 5 training
data that does not fit the context, 6 start-up imports, 7 JSON key names.

"Changes nothing" means the model directory (ledger included) stays
byte-identical (:func:`cli_helpers.tree`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_helpers import clean_failure, tree
from typer.testing import CliRunner

from knowedit.cli.app import app
from knowedit.data import EditRequest, load_records
from knowedit.editor import LEDGER_FILE, BatchFailed, EditError, EditFailed, Editor


@pytest.fixture
def model_dir(tiny_ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _reqs(model_dir: Path) -> list[EditRequest]:
    return load_records(model_dir / "edits.jsonl")


def _known(r: EditRequest) -> EditRequest:
    """An edit to the answer the model already gives: succeeds with no step."""
    assert r.ground_truth
    return EditRequest(prompt=r.prompt, target_new=r.ground_truth, subject=r.subject)


# ------------------------------------------------ 1: a failed edit is not committed


@pytest.mark.parametrize("with_ledger", [False, True], ids=["no-ledger-yet", "ledger-with-an-edit"])
def test_1_a_failed_edit_changes_nothing_and_exits_non_zero(model_dir: Path, runner: CliRunner, with_ledger: bool) -> None:
    reqs = _reqs(model_dir)
    if with_ledger:
        with Editor.open(model_dir) as ed:
            ed.apply(_known(reqs[2]), max_steps=1)
    before = tree(model_dir)
    r = reqs[1]
    args = ["edit", "apply", "--model", str(model_dir), "-p", r.prompt, "-t", r.target_new, "-s", r.subject or "",
            "--max-steps", "1", "--json"]
    result = runner.invoke(app, args)
    text = clean_failure(result, "edit not applied", repr(r.prompt), repr(r.target_new), "probability", "--allow-failed")
    assert "after 1 step(s)" in text
    assert result.stdout == ""  # no record printed for an edit that was not made
    assert tree(model_dir) == before
    assert (model_dir / LEDGER_FILE).exists() == with_ledger  # a failed first edit creates no ledger


def test_1_allow_failed_keeps_the_edit(model_dir: Path, runner: CliRunner) -> None:
    r = _reqs(model_dir)[1]
    result = runner.invoke(app, ["edit", "apply", "--model", str(model_dir), "-p", r.prompt, "-t", r.target_new,
                                 "--max-steps", "1", "--allow-failed", "--json"])
    assert result.exit_code == 0, result.output
    rec = json.loads(result.stdout)
    assert rec["metrics"]["success"] is False
    with Editor.open(model_dir) as ed:
        assert ed.live_edits() == [rec["id"]]


def test_1_library_raises_inside_the_transaction(model_dir: Path) -> None:
    reqs = _reqs(model_dir)
    with Editor.open(model_dir) as ed:
        ok = ed.apply(_known(reqs[0]), max_steps=1)
        before = tree(model_dir)
        pools = {n: v.clone() for n, v in ed.pools.items()}
        with pytest.raises(EditFailed) as info:
            ed.apply(reqs[1], max_steps=1)
        assert info.value.request == reqs[1] and info.value.metrics["success"] is False
        assert f"{info.value.metrics['prob_after']:.4f}" in str(info.value)
        assert tree(model_dir) == before
        assert all((pools[n] == v).all() for n, v in ed.pools.items())
        assert ed.live_edits() == [ok.id]
        assert [e.seq for e in ed.history()] == [1]


@pytest.mark.parametrize("steps", [0, -3])
def test_1_library_refuses_max_steps_below_one(model_dir: Path, steps: int) -> None:
    before = tree(model_dir)
    with Editor.open(model_dir) as ed, pytest.raises(EditError, match="max_steps must be"):
        ed.apply(_known(_reqs(model_dir)[0]), max_steps=steps)
    assert tree(model_dir) == before


def test_1_a_batch_reports_failures_goes_on_and_resume_retries_them(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    reqs = _reqs(model_dir)
    batch = [reqs[0], _known(reqs[2]), reqs[1]]
    f = tmp_path / "batch.jsonl"
    f.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in batch))
    result = runner.invoke(app, ["edit", "apply", "--model", str(model_dir), "--file", str(f), "--max-steps", "1", "--json"])
    text = clean_failure(result, "2 edit(s) did not reach their targets", "request(s) 0", ", 2 (", "--resume")
    out = json.loads(result.stdout)
    assert [x["prompt"] for x in out["applied"]] == [batch[1].prompt]  # went on past the first failure
    assert [x["index"] for x in out["failed"]] == [0, 2]
    assert [x["prompt"] for x in out["failed"]] == [batch[0].prompt, batch[2].prompt]
    assert all(0 <= x["prob_after"] < 0.6 and x["steps"] == 1 for x in out["failed"])
    assert out["skipped"] == 0 and repr(batch[0].prompt) in text
    with Editor.open(model_dir) as ed:
        assert [e.request["prompt"] for e in ed.history()] == [batch[1].prompt]
    # --resume skips the live request and retries only the failed ones.
    again = runner.invoke(app, ["edit", "apply", "--model", str(model_dir), "--file", str(f), "--resume", "--json"])
    assert again.exit_code == 0, again.output
    out = json.loads(again.stdout)
    assert [x["prompt"] for x in out["applied"]] == [batch[0].prompt, batch[2].prompt]
    assert out["failed"] == [] and out["skipped"] == 1


def test_1_edit_many_raises_batch_failed_with_the_failures(model_dir: Path) -> None:
    reqs = _reqs(model_dir)
    with Editor.open(model_dir) as ed:
        seen: list[int] = []
        with pytest.raises(BatchFailed) as info:
            ed.edit_many([reqs[1], _known(reqs[2])], on_fail=lambda i, _e: seen.append(i), max_steps=1)
        assert [i for i, _ in info.value.failed] == [0] == seen
        assert [r.prompt for r in info.value.applied] == [reqs[2].prompt]
        assert "request 1 (" in str(info.value)


def test_1_the_evaluation_still_counts_failed_edits(tiny_ckpt: Path) -> None:
    from knowedit.evaluate import evaluate

    res = evaluate(tiny_ckpt, tiny_ckpt / "edits.jsonl", n=2, options={"max_steps": 1})
    assert res["T"] == 2 and res["success_rate"] == 0.0
    assert [e["success"] for e in res["edits"]] == [False, False]

