"""The sequential-editing evaluation: metrics on hand-made fakes whose answers
are known, then `knowedit eval` and bench/editing.py on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from knowedit.cli.app import app
from knowedit.data import EditRequest, Example
from knowedit.evaluate import (
    edited_fact_statements,
    generalization,
    locality,
    locality_answers,
    reliability,
    retention_points,
    run_edits,
    true_fact_accuracy,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------- fakes
class FakeModel:
    """A "model" that answers from a dict. Teacher-forced token accuracy is the
    share of the expected answer's words that match the model's answer word by
    word: with the answer "New York City", teacher forcing "New York" scores 1.0
    while greedy decoding ("New York City" != "New York") scores 0."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = dict(answers)
        self.tf_calls: list[int] = []

    def greedy(self, prompts: list[str]) -> list[str]:
        return [self.answers.get(p, "") for p in prompts]

    def teacher_forced(self, examples: list[Example]) -> list[float]:
        self.tf_calls.append(len(examples))
        out = []
        for e in examples:
            want, got = e.answer.split(), self.answers.get(e.prompt, "").split()
            out.append(sum(w == g for w, g in zip(want, got)) / len(want))
        return out


class FakeEditor:
    """Edits the fake model: ``perfect`` sets the prompt and its rephrases,
    ``noop`` does nothing, ``break`` is perfect but overwrites the locality
    prompts, ``forget`` sets the prompt and undoes the previous edit."""

    name = "fake"
    settings: dict = {}

    def __init__(self, model: FakeModel, mode: str) -> None:
        self.model, self.mode = model, mode
        self.previous: EditRequest | None = None
        self.truth = dict(model.answers)

    def apply(self, req: EditRequest) -> dict:
        a = self.model.answers
        if self.mode in ("perfect", "break", "forget"):
            a[req.prompt] = req.target_new
        if self.mode in ("perfect", "break"):
            for p in req.rephrase_prompt:
                a[p] = req.target_new
        if self.mode == "break":
            for p in req.locality_prompt:
                a[p] = "something else"
        if self.mode == "forget" and self.previous is not None:
            a[self.previous.prompt] = self.truth[self.previous.prompt]
        self.previous = req
        return {"success": self.mode != "noop", "steps": 3, "seconds": 0.01, "slots_touched": 4, "params_touched": 16}


def world(n: int = 4) -> tuple[FakeModel, list[EditRequest]]:
    answers, reqs = {}, []
    for i in range(n):
        prompt, reph, loc = f"p{i} lives in", f"p{i} resides in", f"q{i} lives in"
        answers.update({prompt: "Paris", reph: "Paris", loc: f"Rome {i}"})
        reqs.append(EditRequest(prompt, "Berlin", f"p{i}", "Paris", [reph], [loc], [f"Rome {i}"]))
    return FakeModel(answers), reqs


def _both(m: dict) -> tuple[float | None, float | None]:
    return m["teacher_forced"], m["greedy"]


# ----------------------------------------------------------------- metrics
def test_perfect_editor_scores_one_everywhere() -> None:
    model, reqs = world()
    res = run_edits(FakeEditor(model, "perfect"), model, reqs)
    for key in ("reliability", "generalization", "locality", "base_accuracy"):
        assert _both(res[key]) == (1.0, 1.0), key
    assert _both(res["targets_before"]) == (0.0, 0.0)
    assert res["T"] == 4 and res["success_rate"] == 1.0
    assert [p["reliability"] for p in res["retention"]] == [1.0] * len(res["retention"])
    assert res["retention"][-1]["t"] == 4
    assert res["edit_seconds"]["median"] == pytest.approx(0.01)
    assert res["edit_seconds"]["total"] == pytest.approx(0.04)
    assert res["slots_touched"]["median"] == 4 and res["params_touched"]["median"] == 16
    assert len(res["edits"]) == 4 and res["edits"][0]["success"] is True
    json.dumps(res)  # JSON-serialisable


def test_editor_that_changes_nothing() -> None:
    model, reqs = world()
    res = run_edits(FakeEditor(model, "noop"), model, reqs)
    # Reliability stays at the base rate on the new targets (0 here); locality is intact.
    assert _both(res["reliability"]) == _both(res["targets_before"]) == (0.0, 0.0)
    assert _both(res["generalization"]) == (0.0, 0.0)
    assert _both(res["locality"]) == (1.0, 1.0)
    assert res["success_rate"] == 0.0


def test_editor_that_breaks_locality() -> None:
    model, reqs = world()
    res = run_edits(FakeEditor(model, "break"), model, reqs)
    assert _both(res["reliability"]) == (1.0, 1.0)
    assert _both(res["locality"]) == (0.0, 0.0)


def test_retention_curve_tracks_forgetting() -> None:
    model, reqs = world(4)
    res = run_edits(FakeEditor(model, "forget"), model, reqs, checkpoints=4)
    # Only the latest edit survives: reliability on edits 1..t is 1/t.
    assert [(p["t"], p["reliability"]) for p in res["retention"]] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert _both(res["reliability"]) == (0.25, 0.25)
    # Batched: one teacher-forced call per retention point, each on edits 1..t.
    # calls: base accuracy, targets before, the four points, then the final three metrics
    assert model.tf_calls[2:6] == [1, 2, 3, 4]


def test_rephrase_lists_of_unequal_length_average_per_edit() -> None:
    model = FakeModel({"a1": "X", "b1": "X", "b2": "no", "b3": "no"})
    reqs = [
        EditRequest("a", "X", rephrase_prompt=["a1"]),
        EditRequest("b", "X", rephrase_prompt=["b1", "b2", "b3"]),
        EditRequest("c", "X"),  # no rephrases: left out, not counted as 0
    ]
    g = generalization(model, reqs)
    assert g["teacher_forced"] == pytest.approx((1 + 1 / 3) / 2)
    assert g["greedy"] == pytest.approx((1 + 1 / 3) / 2)
    assert g["edits"] == 2 and g["prompts"] == 4


def test_teacher_forced_and_greedy_differ() -> None:
    model = FakeModel({"p": "New York City", "q": "New York", "l": "Paris Spain"})
    reqs = [
        EditRequest("p", "New York", locality_prompt=["l"], locality_ground_truth=["x"]),
        EditRequest("q", "New Delhi"),
    ]
    r = reliability(model, reqs)
    # p: every target token is the argmax under teacher forcing, but greedy runs on ("City").
    # q: "New" right, "Delhi" wrong -> 0.5 teacher-forced, 0 greedy.
    assert r["teacher_forced"] == pytest.approx((1.0 + 0.5) / 2)
    assert r["greedy"] == 0.0
    # Locality: the pre-edit answer "Paris France" keeps its first token only.
    loc = locality(model, reqs, [["Paris France"], []])
    assert (loc["teacher_forced"], loc["greedy"]) == (0.5, 0.0)
    assert loc["edits"] == 1


def test_locality_leaves_out_prompts_that_are_edited_themselves() -> None:
    # Edit 0's locality prompt is edit 1's prompt, edit 1's is edit 0's rephrase:
    # both are meant to change, so a perfect editor still has locality 1.0 on the rest.
    model = FakeModel({"a is": "x", "a'": "x", "b is": "y", "c is": "z"})
    reqs = [
        EditRequest("a is", "X", rephrase_prompt=["a'"], locality_prompt=["b is", "c is"], locality_ground_truth=["y", "z"]),
        EditRequest("b is", "Y", locality_prompt=[" a' "], locality_ground_truth=["x"]),
    ]
    res = run_edits(FakeEditor(model, "perfect"), model, reqs)
    assert res["locality"]["excluded"] == 2
    assert res["locality"]["prompts"] == 1 and res["locality"]["edits"] == 1
    assert _both(res["locality"]) == (1.0, 1.0)
    # The prompt left in is still scored: moving it is caught.
    model.answers["c is"] = "moved"
    assert _both(locality(model, reqs, [["y", "z"], ["x"]])) == (0.0, 0.0)


def test_locality_leaves_out_other_statements_of_an_edited_fact() -> None:
    # Edit 1 changes Pirlo's sport (old answer soccer). Edit 0's neighbourhood prompt
    # "Andrea Pirlo professionally plays" states that fact in other words, and the model
    # answers it "soccer": it is meant to change. "Andrea Pirlo was born in" names the
    # same subject but another fact (another answer), and stays a locality prompt.
    model = FakeModel({
        "Beckham plays": "soccer", "Andrea Pirlo professionally plays": "soccer",
        "Andrea Pirlo was born in": "Flero", "Pirlo plays": "soccer",
    })
    reqs = [
        EditRequest("Beckham plays", "tennis", subject="Beckham", ground_truth="soccer",
                    locality_prompt=["Andrea Pirlo professionally plays", "Andrea Pirlo was born in"],
                    locality_ground_truth=["soccer", "Flero"]),
        EditRequest("Pirlo plays", "golf", subject="Andrea Pirlo", ground_truth="soccer"),
    ]
    before = locality_answers(model, reqs)
    states = edited_fact_statements(reqs)
    assert states("Andrea Pirlo professionally plays", "soccer") and states("Pirlo plays", "anything")
    assert not states("Andrea Pirlo was born in", "Flero") and not states("Zidane plays", "soccer")
    model.answers.update({"Andrea Pirlo professionally plays": "golf"})  # the edit's knock-on: not a locality loss
    loc = locality(model, reqs, before)
    assert loc["excluded"] == 1 and loc["prompts"] == 1 and _both(loc) == (1.0, 1.0)
    model.answers["Andrea Pirlo was born in"] = "Milan"  # another fact of the subject moved: a loss
    assert _both(locality(model, reqs, before)) == (0.0, 0.0)


def test_locality_with_empty_pre_edit_answer_counts_in_greedy_only() -> None:
    model = FakeModel({"l1": "", "l2": "Rome"})
    reqs = [EditRequest("p", "X", locality_prompt=["l1", "l2"], locality_ground_truth=["a", "b"])]
    before = locality_answers(model, reqs)
    assert before == [["", "Rome"]]
    loc = locality(model, reqs, before)
    assert loc["teacher_forced"] == 1.0 and loc["greedy"] == 1.0
    model.answers["l1"] = "Oslo"
    assert locality(model, reqs, before)["greedy"] == 0.5
    with pytest.raises(ValueError):
        locality(model, reqs, [["Rome"]])


def test_true_fact_accuracy_skips_records_without_ground_truth() -> None:
    model = FakeModel({"a": "Paris", "b": "Rome"})
    reqs = [EditRequest("a", "X", ground_truth="Paris"), EditRequest("b", "X", ground_truth="Oslo"), EditRequest("c", "X")]
    acc = true_fact_accuracy(model, reqs)
    assert (acc["teacher_forced"], acc["greedy"], acc["edits"]) == (0.5, 0.5, 2)
    empty = true_fact_accuracy(model, [EditRequest("c", "X")])
    assert empty["teacher_forced"] is None and empty["greedy"] is None


def test_nan_scores_are_left_out() -> None:
    class NanModel(FakeModel):
        def teacher_forced(self, examples: list[Example]) -> list[float]:
            return [math.nan if e.prompt == "b" else 1.0 for e in examples]

    r = reliability(NanModel({"a": "X"}), [EditRequest("a", "X"), EditRequest("b", "X")])
    assert r["teacher_forced"] == 1.0 and r["greedy"] == 0.5


def test_retention_points() -> None:
    assert retention_points(1000) == [1, *range(100, 1001, 100)]
    assert retention_points(3) == [1, 2, 3]
    assert retention_points(1) == [1]
    assert retention_points(25, 10)[-1] == 25 and len(retention_points(25, 10)) <= 12
    assert retention_points(0) == []


def test_run_edits_rejects_no_requests() -> None:
    model, _ = world()
    with pytest.raises(ValueError):
        run_edits(FakeEditor(model, "noop"), model, [])


# ---------------------------------------------------------- tiny model: CLI
runner = CliRunner()


def test_eval_cli_two_methods_write_json(tiny_ckpt: Path, tmp_path: Path) -> None:
    edits = tiny_ckpt / "edits.jsonl"
    for method in ("sparse", "ft"):
        out = tmp_path / f"{method}.json"
        args = ["eval", "--model", str(tiny_ckpt), "--edits", str(edits), "--n", "3", "--method", method, "--out", str(out)]
        if method == "ft":
            args += ["--plot", str(tmp_path / "img")]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "Reliability" in res.output and "Locality" in res.output
        data = json.loads(out.read_text())
        for key in ("method", "settings", "T", "reliability", "generalization", "locality", "base_accuracy",
                    "edit_seconds", "slots_touched", "params_touched", "success_rate", "retention"):
            assert key in data, key
        assert data["method"] == method and data["T"] == 3
        for key in ("reliability", "generalization", "locality", "base_accuracy"):
            assert set(data[key]) >= {"teacher_forced", "greedy"}
        assert {"median", "p95", "total"} <= set(data["edit_seconds"])
        assert data["retention"][-1]["t"] == 3
        assert "lr" in data["settings"] and "max_steps" in data["settings"]
    (png,) = (tmp_path / "img").glob("eval-ft-T3-*.png")
    assert png.stat().st_size > 0
    # Evaluation never writes the model directory or a ledger there.
    assert not (tiny_ckpt / "ledger.db").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--edits", "{missing}"], "cannot read"),
        (["--edits", "{bad}"], "missing required field"),
        (["--edits", "{edits}", "--n", "0"], "at least 1"),
        (["--edits", "{edits}", "--method", "rome"], "unknown method"),
        (["--edits", "{edits}", "--option", "nope=1", "--method", "ft"], "unknown option"),
    ],
)
def test_eval_cli_bad_input_exits_without_traceback(tiny_ckpt: Path, tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x is"}) + "\n")
    paths = {"missing": str(tmp_path / "nope.json"), "bad": str(bad), "edits": str(tiny_ckpt / "edits.jsonl")}
    res = runner.invoke(app, ["eval", "--model", str(tiny_ckpt), *[a.format(**paths) for a in args]])
    assert res.exit_code == 1
    assert message in " ".join(res.output.split())  # rich wraps long messages
    assert "Traceback" not in res.output and not isinstance(res.exception, AssertionError)


def test_eval_cli_missing_model_dir(tiny_ckpt: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "nomodel"), "--edits", str(tiny_ckpt / "edits.jsonl")])
    assert res.exit_code == 1 and "not a directory" in " ".join(res.output.split())
    assert "Traceback" not in res.output


# ------------------------------------------------------------------- bench
def test_bench_editing_quick(tiny_ckpt: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_editing", REPO / "bench" / "editing.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--model", str(tiny_ckpt), "--quick", "--methods", "sparse,ft,ft-memory,lora", "--out-dir", str(tmp_path)])
    assert {(r["method"], r["T"]) for r in report["results"]} == {
        (m, t) for m in ("sparse", "ft", "ft-memory", "lora") for t in (1, 3)
    }
    assert json.loads((tmp_path / "editing.json").read_text())["results"]
    assert (tmp_path / "editing.md").read_text().count("\n") == 2 + 8
    for name in ("editing-teacher_forced.png", "editing-greedy.png", "editing-retention.png"):
        assert (tmp_path / name).stat().st_size > 0
