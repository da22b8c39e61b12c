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
    assert "after 1 step(s), also with 128 rows" in text  # the second try, with retry_top_t rows, failed too
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


# ------------------------------------------- 2: EasyEdit's raw zsRE and CounterFact


def _zsre(r: EditRequest) -> dict:
    """``r`` as a raw zsRE record (MEND's zsre_mend_eval.json)."""
    return {
        "subject": r.subject, "src": r.prompt, "pred": r.ground_truth, "rephrase": r.rephrase_prompt[0],
        "alt": r.target_new, "answers": [r.ground_truth], "loc": "nq question: " + r.locality_prompt[0],
        "loc_ans": r.locality_ground_truth[0], "cond": f"{r.ground_truth} >> {r.target_new} || {r.prompt}",
    }


def _counterfact(r: EditRequest, case_id: int) -> dict:
    """``r`` as a raw CounterFact record (ROME's counterfact.json)."""
    assert r.subject and r.subject in r.prompt
    return {
        "case_id": case_id, "pararel_idx": case_id,
        "requested_rewrite": {
            "prompt": r.prompt.replace(r.subject, "{}"), "relation_id": "P103", "subject": r.subject,
            "target_new": {"str": r.target_new, "id": "Q1"}, "target_true": {"str": r.ground_truth, "id": "Q2"},
        },
        "paraphrase_prompts": r.rephrase_prompt, "neighborhood_prompts": r.locality_prompt,
        "attribute_prompts": [], "generation_prompts": [],
    }


def _same_fact(a: EditRequest, b: EditRequest) -> None:
    for name in ("prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt"):
        assert getattr(a, name) == getattr(b, name), name


def _eval_json(runner: CliRunner, model: Path, edits: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["eval", "-m", str(model), "--edits", str(edits), "--threads", "1",
                                 "--option", "max_steps=20", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _scores(res: dict) -> dict:
    return {k: res[k] for k in ("T", "reliability", "generalization", "locality", "portability")}


def test_2_raw_zsre_and_counterfact_load_and_evaluate_like_the_flat_format(
    tiny_ckpt: Path, runner: CliRunner, tmp_path: Path
) -> None:
    reqs = _reqs(tiny_ckpt)[:2]
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    zsre = tmp_path / "zsre.json"  # a JSON list, as distributed; a record with no new target is skipped
    zsre.write_text(json.dumps([_zsre(reqs[0]), {**_zsre(reqs[1]), "alt": ""}, _zsre(reqs[1])], indent=1))
    cf = tmp_path / "counterfact.json"
    cf.write_text(json.dumps([_counterfact(r, i) for i, r in enumerate(reqs)]))

    got_z, got_c = load_records(zsre), load_records(cf)
    assert len(got_z) == len(got_c) == 2
    for r, z, c in zip(reqs, got_z, got_c):
        _same_fact(r, z)
        _same_fact(r, c)
        assert z.locality_prompt == r.locality_prompt  # "nq question: " is not part of the prompt
        assert z.locality_ground_truth == r.locality_ground_truth
        assert c.locality_ground_truth == [r.ground_truth]  # CounterFact's neighbours keep the true target
    assert [c.case_id for c in got_c] == ["0", "1"]

    base = _eval_json(runner, tiny_ckpt, flat)
    for path in (zsre, cf):
        res = _eval_json(runner, tiny_ckpt, path)
        assert _scores(res) == _scores(base), path.name
        ee = res["easyedit"]
        assert ee == {
            "rewrite_acc": res["reliability"]["teacher_forced"], "rephrase_acc": res["generalization"]["teacher_forced"],
            "locality": res["locality"]["teacher_forced"], "portability": None,
        }
        assert res["reliability"]["prompts"] == 2 and res["locality"]["prompts"] == 2


def test_2_portability_prompts_are_scored_when_present(tiny_ckpt: Path, runner: CliRunner, tmp_path: Path) -> None:
    reqs = _reqs(tiny_ckpt)[:2]
    rows = []
    for r in reqs:
        d = r.to_dict()
        d.pop("portability_prompt"), d.pop("portability_ground_truth")
        # KnowEdit's shape; the prompts are the rephrases, so portability must equal generalization.
        d["portability"] = {"Subject_Aliasing": [{"prompt": p, "ground_truth": [[r.target_new, "alias"]]} for p in r.rephrase_prompt]}
        rows.append(d)
    f = tmp_path / "knowedit.json"
    f.write_text(json.dumps(rows))
    loaded = load_records(f)
    assert [x.portability_prompt for x in loaded] == [r.rephrase_prompt for r in reqs]
    assert [x.portability_ground_truth for x in loaded] == [[r.target_new] * len(r.rephrase_prompt) for r in reqs]
    res = _eval_json(runner, tiny_ckpt, f)
    port, gen = res["portability"], res["generalization"]
    assert port is not None and port["prompts"] == gen["prompts"] > 0
    assert (port["teacher_forced"], port["greedy"]) == (gen["teacher_forced"], gen["greedy"])
    assert res["easyedit"]["portability"] == port["teacher_forced"]
    # The other EasyEdit shape (BaseEditor.edit's portability_inputs) loads the same.
    other = [{**row, "portability": {"one_hop": {"prompt": r.rephrase_prompt, "ground_truth": [r.target_new] * len(r.rephrase_prompt)}}}
             for row, r in zip(rows, reqs)]
    g = tmp_path / "inputs.json"
    g.write_text(json.dumps(other))
    assert [x.portability_prompt for x in load_records(g)] == [x.portability_prompt for x in loaded]


@pytest.mark.parametrize(
    ("record", "phrase"),
    [
        ({"requested_rewrite": {"prompt": "The tongue of {} is", "subject": "X", "target_true": {"str": "A"}}},
         "missing required field 'requested_rewrite.target_new.str'"),
        ({"requested_rewrite": {"prompt": "The tongue of X is", "subject": "X", "target_new": {"str": "B"},
                                "target_true": {"str": "A"}}}, "must hold {} where the subject goes"),
        ({"src": "Who?", "alt": "B", "answers": ["A"], "loc": "nq question: q"}, "field 'loc_ans' must be a non-empty string"),
        ({"prompt": "a b", "target_new": "c", "portability": {"R": [{"prompt": "q"}]}},
         "portability.R[0] must be an object with 'prompt' and 'ground_truth'"),
    ],
    ids=["counterfact-no-target", "counterfact-no-slot", "zsre-no-loc-answer", "portability-no-answer"],
)
def test_2_malformed_raw_records_are_named(tmp_path: Path, record: dict, phrase: str) -> None:
    from knowedit.data import RecordError

    f = tmp_path / "bad.json"
    f.write_text(json.dumps([record]))
    with pytest.raises(RecordError) as info:
        load_records(f)
    assert "bad.json record 0" in str(info.value) and phrase in str(info.value)


def test_2_evaluate_is_exported() -> None:
    import knowedit
    from knowedit import evaluate

    assert evaluate is knowedit.evaluate and callable(evaluate.evaluate) and "evaluate" in knowedit.__all__


# --------------------------------------------------------------- 3: knowedit export


def test_3_export_answers_like_the_source_and_edits_with_guards(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    from knowedit.editor import PROVENANCE_FILE

    reqs = _reqs(model_dir)
    with Editor.open(model_dir) as ed:
        recs = [ed.apply(r, allow_failed=True, max_steps=30) for r in reqs[:3]]
        ed.revert(recs[2].id)  # a reverted edit is not in the export
        live = ed.live_edits()
        head = ed.history()[-1]
    assert live == [recs[0].id, recs[1].id]
    prompts = [r.prompt for r in reqs[:6]] + [r.rephrase_prompt[0] for r in reqs[:3]]
    source_answers = [json.loads(runner.invoke(app, ["ask", p, "-m", str(model_dir), "--json"]).stdout)["answer"] for p in prompts]
    before = tree(model_dir)

    new = tmp_path / "exported"
    result = runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(new), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert tree(model_dir) == before  # the source is only read
    assert out["out"] == str(new) and out["live_edits"] == live
    assert out["source"] == str(model_dir.resolve())
    assert out["source_ledger_seq"] == head.seq and out["source_ledger_head_hash"] == head.hash
    from knowedit.checkpoint import load_checkpoint, model_fingerprint

    assert out["source_fingerprint"] == load_checkpoint(model_dir).fingerprint
    assert out["fingerprint"] == model_fingerprint(new / "model.safetensors") != out["source_fingerprint"]
    assert json.loads((new / PROVENANCE_FILE).read_text()) == {k: v for k, v in out.items() if k != "out"}
    assert (new / "corpus.jsonl").read_bytes() == (model_dir / "corpus.jsonl").read_bytes()
    assert not (new / LEDGER_FILE).exists() and not (new / "slot_stats.safetensors").exists()
    assert not list(tmp_path.glob(".exported.*"))  # no temporary directory left behind

    # The export, with no ledger, answers as the source with its live edits.
    asked = [json.loads(runner.invoke(app, ["ask", p, "-m", str(new), "--json"]).stdout) for p in prompts]
    assert [a["answer"] for a in asked] == source_answers and all(a["live_edits"] == 0 for a in asked)
    assert source_answers[0] == reqs[0].target_new or not recs[0].metrics["success"]
    # An edit of the export runs with guards: the statistics are rebuilt from its corpus.
    with Editor.open(new) as ed:
        assert ed.background != "none" and ed.stats is not None
        rec = ed.apply(reqs[5], allow_failed=True, max_steps=5)
        assert rec.metrics["guards"] > 0
        assert [e.edit_id for e in ed.history()] == [rec.id]  # its ledger started with no edits


def test_3_export_refuses_an_existing_directory_and_the_source(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    before = tree(model_dir)
    clean_failure(runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(taken)]), "already exists", "new (or empty) directory")
    assert tree(taken) == {"keep.txt": tree(taken)["keep.txt"]} and (taken / "keep.txt").read_text() == "mine"
    clean_failure(runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(model_dir)]), "save to a new directory")
    assert tree(model_dir) == before


# ------------------------------------------ 5: the training data sets the context


def test_5_an_example_longer_than_the_context_fails_before_training(tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from knowedit.recipes import train as recipe

    def no_step(*_a: object, **_k: object) -> None:
        raise AssertionError("a training step ran")

    monkeypatch.setattr(recipe.MemoryLMModule, "training_step", no_step)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "debug", "model.max_seq_len=6", "--out", str(out), "--quiet"])
    text = clean_failure(result, "do not fit the model's context of 6 tokens", "model.max_seq_len=")
    assert len(result.output.strip().splitlines()) == 1, result.output
    n = int(text.split("train with model.max_seq_len=")[1].split()[0])
    assert n > 6 and f"is {n} tokens" in text
    assert not out.exists()  # nothing written


def test_5_check_fit_names_the_longest_example() -> None:
    from knowedit.data import Example
    from knowedit.recipes.train import check_fit
    from knowedit.tokenizer import TextCodec, corpus_texts

    exs = [Example("a b", "c"), Example("a b c d e f g h", "i j"), Example("a", "b")]
    codec = TextCodec.train(corpus_texts(exs), vocab_size=300)
    check_fit(exs, codec, 64)
    with pytest.raises(ValueError, match=r"example 1 \('a b c d e f g h' -> 'i j'\)") as info:
        check_fit(exs, codec, 4)
    n = int(str(info.value).split("model.max_seq_len=")[1].split()[0])
    check_fit(exs, codec, n)  # the override it names is enough
    with pytest.raises(ValueError):
        check_fit(exs, codec, n - 1)


def test_5_a_relative_data_path_is_found_next_to_the_recipe(tiny_ckpt: Path, tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    shutil.copyfile(tiny_ckpt / "edits.jsonl", recipes / "data" / "facts.jsonl")
    (recipes / "mine.yaml").write_text(
        "name: mine\nmodel: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 32, memory_layers: [0],"
        " memory: {n_keys: 8, heads: 1, topk: 2, key_dim: 16}}\n"
        "data: {source: easyedit, path: data/facts.jsonl, limit: 4, vocab_size: 300, batch_size: 8}\n"
        "max_epochs: 1\nlogger: none\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipes / "mine.yaml"), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["facts_trained"] > 0
    assert str(recipes / "data" / "facts.jsonl") in (out / "config.yaml").read_text()  # the file it read

    # Neither here nor next to the recipe: one line naming the override, nothing written.
    missing = tmp_path / "run2"
    result = runner.invoke(app, ["train", str(recipes / "mine.yaml"), "data.path=nope.jsonl", "--out", str(missing)])
    clean_failure(result, "data.path 'nope.jsonl' not found", str(recipes / "nope.jsonl"), "data.path=/path/to/file")
    assert not missing.exists()


# ------------------------------------- 4: help defaults, full ids, the eval plot


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["ask"], ["Ledger path or SQLAlchemy URL. [default: (MODEL/ledger.db)]", "[default: 8]"]),
        (["edit", "apply"], ["Ledger path or SQLAlchemy URL. [default: (MODEL/ledger.db)]", "[default: 300]", "[default: joint]"]),
        (["train"], ["Checkpoint directory. [default: (runs/NAME)]"]),
        (["stats"], ["[default: (MODEL/corpus.jsonl)]"]),
        (["ledger", "export"], ["Write JSONL here. [default: (stdout)]"]),
    ],
)
def test_4_help_shows_every_default(runner: CliRunner, command: list[str], shown: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], terminal_width=250)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for phrase in shown:
        assert phrase in text, (phrase, text)
    assert " ." not in text  # what Rich left of an eaten "[default: ...]"


def test_4_ledger_list_and_edit_tables_never_cut_an_id(model_dir: Path, runner: CliRunner) -> None:
    from knowedit.cli.common import console

    reqs = _reqs(model_dir)
    with Editor.open(model_dir) as ed:
        ids = [ed.apply(_known(r), max_steps=1, allow_failed=True).id for r in reqs[:2]]  # the ids are what counts here
    old = console.width
    console.width = 70
    try:
        listed = runner.invoke(app, ["ledger", "list", "-m", str(model_dir)])
        applied = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "-p", reqs[3].prompt, "-t", reqs[3].ground_truth or "",
                                      "--max-steps", "1", "--allow-failed"])
    finally:
        console.width = old
    assert listed.exit_code == 0 and applied.exit_code == 0, listed.output + applied.output
    for eid in ids:
        assert eid in listed.output, listed.output
    with Editor.open(model_dir) as ed:
        assert ed.live_edits()[-1] in applied.output, applied.output


def test_4_eval_plot_names_model_data_and_t_and_never_overwrites(tiny_ckpt: Path, runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    seen: list[dict] = []
    real = Figure.savefig

    def spy(self: Figure, *args: object, **kwargs: object) -> None:
        right = self.axes[1]
        seen.append({"title": self._suptitle.get_text() if self._suptitle else "",
                     "bars": [t.get_text() for t in right.get_xticklabels()]})
        real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    img = tmp_path / "img"
    paths = []
    for _ in range(2):
        result = runner.invoke(app, ["eval", "-m", str(tiny_ckpt), "--edits", str(tiny_ckpt / "edits.jsonl"), "--n", "2",
                                     "--method", "ft", "--plot", str(img), "--json"])
        assert result.exit_code == 0, result.output
        paths.append(Path(json.loads(result.stdout)["plot"]))
    assert paths[0] != paths[1] and all(p.parent == img and p.stat().st_size > 0 for p in paths)
    assert sorted(img.iterdir()) == sorted(paths)
    for s in seen:
        assert tiny_ckpt.name in s["title"] and "edits.jsonl" in s["title"] and "T = 2" in s["title"], s
        assert s["bars"] == ["Rel", "Gen", "Loc"]


# ------------------------------------------------------- 7: one JSON vocabulary


def _keys(obj: object) -> set[str]:
    """Every key at any depth (lists included)."""
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


def test_7_json_outputs_match_docs_json_md(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "json.md").read_text()
    r = _reqs(model_dir)[0]
    m = str(model_dir)

    def run(*args: str) -> object:
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    rec = run("edit", "apply", "-m", m, "-p", r.prompt, "-t", r.ground_truth or "", "-s", r.subject or "", "--max-steps", "1")
    batch_file = tmp_path / "b.jsonl"
    batch_file.write_text(json.dumps(_known(_reqs(model_dir)[2]).to_dict()) + "\n")
    outputs = {
        "version": (run("version"), {"version"}),
        "ask": (run("ask", r.prompt, "-m", m), {"prompt", "answer", "live_edits"}),
        "edit apply": (rec, {"id", "seq", "prompt", "target_new", "subject", "slots", "metrics", "conflicts"}),
        "edit apply --file": (run("edit", "apply", "-m", m, "--file", str(batch_file), "--max-steps", "1"), {"applied", "failed", "skipped"}),
        "ledger show": (run("ledger", "show", rec["id"], "-m", m), {"id", "seq", "created_at", "author", "note", "live", "method", "request", "settings", "metrics", "hash", "rows"}),
        "ledger verify": (run("ledger", "verify", "-m", m), {"ok", "events", "problems"}),
        "locate": (run("locate", "-m", m, "-p", r.prompt, "-t", r.target_new, "--top", "2"), {"positions", "candidates", "slots"}),
        "stats": (run("stats", "-m", m), {"documents", "pools", "stored"}),
        "export": (run("export", "-m", m, "--out", str(tmp_path / "x")), {"out", "format", "fingerprint", "created_at", "source", "source_fingerprint", "source_ledger", "source_ledger_seq", "source_ledger_head_hash", "live_edits", "live_kinds", "corpus"}),
        "edit revert": (run("edit", "revert", "-m", m, rec["id"]), {"reverted", "live_edits"}),
    }
    listed = run("ledger", "list", "-m", m)
    assert isinstance(listed, list) and set(listed[0]) == {"seq", "kind", "id", "created_at", "author", "prompt", "target_new", "slots", "live"}
    for name, (out, keys) in outputs.items():
        assert isinstance(out, dict) and set(out) == keys, (name, sorted(out))  # type: ignore[arg-type]
        assert f"`knowedit {name.split(' --')[0]}" in doc, name
        for k in keys:
            assert f"`{k}`" in doc, (name, k)
    everything = set().union(*(_keys(o) for o, _ in outputs.values()), _keys(listed))
    assert "edit_id" not in everything  # one name for an event id: `id`
    assert isinstance(outputs["edit apply --file"][0]["applied"][0]["slots"], list)  # type: ignore[index]


# ------------------------------------------------------------ 6: start-up imports

_PROBE = """
import sys
from knowedit.cli.app import app
sys.argv = ["knowedit", *sys.argv[1:]]
try:
    app()
except SystemExit:
    pass
heavy = [m for m in ("torch", "lightning", "faiss", "sqlalchemy", "omegaconf", "matplotlib") if m in sys.modules]
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
"""


@pytest.mark.parametrize("args", [["--help"], ["version"], ["version", "--json"], ["ask", "--help"], ["edit", "apply", "--help"]])
def test_6_help_and_version_import_no_torch(args: list[str]) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr, proc.stderr  # none of them
    assert proc.stdout.strip()


def test_6_import_knowedit_is_light_and_names_still_resolve() -> None:
    import subprocess
    import sys

    code = ("import sys, knowedit; light = 'torch' not in sys.modules; "
            "from knowedit import Editor, EditOptions, MemoryLM, evaluate; "
            "print(light, Editor.__name__, EditOptions().max_steps, MemoryLM.__name__, evaluate.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "Editor", "300", "MemoryLM", "knowedit.evaluate"]
