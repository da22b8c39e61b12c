"""``knowedit learn``: sparse memory finetuning committed to the ledger, revertible
bit for bit; dense baselines to a new directory; bad input changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import clean_failure, tree
from ledger_helpers import assert_same_pools, replay
from typer.testing import CliRunner

from knowedit.cli.app import app
from knowedit.config import load_learn_config
from knowedit.data import load_records
from knowedit.data.documents import DataError, load_learning_data
from knowedit.editor import LEDGER_FILE, Editor
from knowedit.recipes.learn import batch_plan, learn, tfidf_rows
from knowedit.side_files import CORPUS_FILE, STATS_DOCS_FILE

LEARN = ["epochs=3", "batch_size=4", "lr=20", "top_t=16", "threads=1"]


@pytest.fixture
def facts(model_dir: Path, tmp_path: Path) -> Path:
    """Eight new facts in EasyEdit format (the tiny world's edits: prompt + target_new)."""
    path = tmp_path / "new.jsonl"
    rows = [r.to_dict() for r in load_records(model_dir / "edits.jsonl")[:8]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pools(model_dir: Path) -> dict[str, torch.Tensor]:
    with Editor.open(model_dir) as ed:
        return {n: v.detach().clone() for n, v in ed.pools.items()}


def _learn_cli(runner: CliRunner, model_dir: Path, data: Path, *extra: str):  # noqa: ANN202
    return runner.invoke(app, ["learn", "--model", str(model_dir), "--data", str(data), "--json", *LEARN, *extra])


def test_learn_commits_an_event_and_revert_restores_the_base_bit_for_bit(model_dir: Path, facts: Path, runner: CliRunner) -> None:
    base = _pools(model_dir)
    res = _learn_cli(runner, model_dir, facts)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["method"] == "sparse" and len(report["events"]) == 1 and report["rows_changed"] > 0
    # Only the top-t rows of each pool per batch were trainable.
    assert all(n <= 16 * report["steps"] for n in report["rows_trained_per_pool"].values())
    with Editor.open(model_dir) as ed:
        (ev,) = [e for e in ed.history() if e.kind == "learn"]
        assert ev.request["data_sha256"] and ev.request["step_to"] == report["steps"]
        assert len(ev.rows) == report["rows_changed"]
        live = {n: v.detach().clone() for n, v in ed.pools.items()}
        assert_same_pools(live, replay(base, ed.history()), "live = base + replay")
        assert any(not torch.equal(live[n], base[n]) for n in base)
        assert ed.verify() == []
    listed = runner.invoke(app, ["ledger", "list", "--model", str(model_dir), "--json"])
    assert listed.exit_code == 0 and ev.edit_id in listed.output
    res = runner.invoke(app, ["edit", "revert", "--model", str(model_dir), ev.edit_id])
    assert res.exit_code == 0, res.output
    assert_same_pools(_pools(model_dir), base, "after reverting the learning run")
    assert runner.invoke(app, ["ledger", "verify", "--model", str(model_dir)]).exit_code == 0


def test_learning_raises_acquisition_and_only_values_change(model_dir: Path, facts: Path) -> None:
    examples, fmt = load_learning_data(facts)
    assert fmt == "easyedit" and len(examples) > 8  # prompts and rephrases
    with Editor.open(model_dir) as ed:
        before = {n: p.detach().clone() for n, p in ed.model.named_parameters()}
        from knowedit.inference import greedy_exact

        acc0 = sum(greedy_exact(ed.model, ed.codec, examples)) / len(examples)
    cfg = load_learn_config(None, ["epochs=15", "batch_size=4", "lr=20", "top_t=32", "threads=1"])
    report = learn(model_dir, facts, cfg, progress=False)
    assert report["acquisition"] > acc0 + 0.3, (acc0, report)
    with Editor.open(model_dir) as ed:
        values = {id(p) for p in ed.model.value_parameters()}
        for n, p in ed.model.named_parameters():
            if id(p) not in values:
                assert torch.equal(p, before[n]), n


def test_revert_of_a_learn_event_under_a_later_edit_refuses_then_cascades(model_dir: Path, facts: Path, runner: CliRunner) -> None:
    base = _pools(model_dir)
    report = json.loads(_learn_cli(runner, model_dir, facts, "top_t=4096").output)
    (learn_id,) = report["events"]
    req = load_records(facts)[0]  # a fact the run just learnt: the edit reads the same slots
    with Editor.open(model_dir) as ed:
        rec = ed.edit(req.prompt, req.ground_truth or "x", subject=req.subject, max_steps=30)
        shared = {tuple(s) for s in rec.slots} & {(r.pool, r.slot) for e in ed.history() if e.edit_id == learn_id for r in e.rows}
    assert shared, "the edit must share slots with the learning run"
    res = runner.invoke(app, ["edit", "revert", "--model", str(model_dir), learn_id])
    clean_failure(res, rec.id)
    res = runner.invoke(app, ["edit", "revert", "--model", str(model_dir), learn_id, "--cascade"])
    assert res.exit_code == 0, res.output
    assert_same_pools(_pools(model_dir), base, "after the cascade")


def test_interrupted_run_keeps_its_commits_and_resume_finishes_like_an_uninterrupted_run(tiny_ckpt: Path, facts: Path, tmp_path: Path) -> None:
    import lightning as L

    cfg = load_learn_config(None, [*LEARN, "commit_every=2"])
    whole = tmp_path / "whole"
    shutil.copytree(tiny_ckpt, whole)
    full = learn(whole, facts, cfg, progress=False)
    assert len(full["events"]) == -(-full["steps"] // 2)

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    cut = tmp_path / "cut"
    shutil.copytree(tiny_ckpt, cut)
    with pytest.raises(RuntimeError, match="simulated crash"):
        learn(cut, facts, cfg, progress=False, callbacks=[Crash()])
    with Editor.open(cut) as ed:
        steps = [e.request["step_to"] for e in ed.history()]
        assert steps == [2, 4]  # step 5's rows were never committed
        assert ed.verify() == []
    resumed = learn(cut, facts, cfg, progress=False, resume=True)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == full["steps"] - 4
    assert_same_pools(_pools(cut), _pools(whole), "resumed run = uninterrupted run")
    again = learn(cut, facts, cfg, progress=False, resume=True)
    assert again["steps"] == 0 and not again["events"]


def test_dense_method_writes_a_new_checkpoint_and_leaves_the_model_alone(model_dir: Path, facts: Path, tmp_path: Path, runner: CliRunner) -> None:
    before = tree(model_dir)
    out = tmp_path / "lora"
    res = _learn_cli(runner, model_dir, facts, "method=lora", "lr=0.01", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert tree(model_dir) == before and not (model_dir / LEDGER_FILE).exists()
    assert (out / "model.safetensors").is_file() and (out / CORPUS_FILE).is_file()
    ask = runner.invoke(app, ["ask", "--model", str(out), "--json", load_records(facts)[0].prompt])
    assert ask.exit_code == 0, ask.output
    clean_failure(_learn_cli(runner, model_dir, facts, "method=ft"), "--out")


@pytest.mark.parametrize(
    ("content", "extra", "phrases"),
    [
        (None, [], ["no data file"]),
        ("", [], ["is empty"]),
        ('{"prompt": "a b", "answer": "c"}\n{"prompt": "x", "answer": \n', [], ["line 2", "invalid JSON"]),
        ('{"prompt": "a b", "answer": ""}\n', [], ["line 1", "answer"]),
        ('{"prompt": "a b", "answer": "c"}\n', ["method=magic"], ["method must be one of"]),
        ('{"prompt": "a b", "answer": "c"}\n', ["no_such=1"], ["no_such"]),
        ('{"prompt": "a b", "answer": "c"}\n', ["top_t=0"], ["top_t"]),
        ('{"prompt": "' + "word " * 60 + '", "answer": "c"}\n', [], ["document 1", "context"]),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    model_dir: Path, tmp_path: Path, runner: CliRunner, content: str | None, extra: list[str], phrases: list[str]
) -> None:
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    before = tree(model_dir)
    clean_failure(_learn_cli(runner, model_dir, data, *extra), *phrases)
    assert tree(model_dir) == before


def test_a_model_without_statistics_or_corpus_is_refused(model_dir: Path, facts: Path, runner: CliRunner) -> None:
    for name in (CORPUS_FILE, STATS_DOCS_FILE, "slot_stats.safetensors"):
        (model_dir / name).unlink()
    before = tree(model_dir)
    clean_failure(_learn_cli(runner, model_dir, facts), "no slot statistics", "knowedit stats")
    assert tree(model_dir) == before
    # guard documents are background documents: without any, say how to go on
    clean_failure(_learn_cli(runner, model_dir, facts, "background=none"), "guard_docs=0")
    assert tree(model_dir) == before
    res = _learn_cli(runner, model_dir, facts, "background=none", "guard_docs=0")  # tf alone needs no statistics
    assert res.exit_code == 0, res.output


def test_data_formats(tmp_path: Path) -> None:
    txt = tmp_path / "docs.txt"
    txt.write_text("Nefa Venmarmi was born in Lisbon\n\nThe sky is blue today\n")
    ex, fmt = load_learning_data(txt)
    assert fmt == "text" and [(e.prompt, e.answer) for e in ex] == [("Nefa", "Venmarmi was born in Lisbon"), ("The", "sky is blue today")]
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "Paris is in France"}\n')
    assert load_learning_data(docs)[1] == "documents"
    pairs = tmp_path / "pairs.json"
    pairs.write_text('[{"prompt": "Paris is in", "answer": "France"}]')
    assert load_learning_data(pairs) == ([type(ex[0])("Paris is in", "France")], "facts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"text": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        load_learning_data(bad)


def test_tfidf_prefers_slots_the_background_rarely_reads() -> None:
    from knowedit.memory import MemoryTrace

    slots = torch.tensor([[[[0, 1], [0, 2]]]])  # (B=1, T=1, H=2, k=2): slot 0 read twice
    tr = MemoryTrace(0, "p", torch.zeros(1, 1, 2, 4), slots, torch.ones(1, 1, 2, 2))
    scored = torch.ones(1, 1, dtype=torch.bool)
    assert tfidf_rows([tr], scored, 1, None, {"p": 4})["p"].tolist() == [0]  # tf alone: most read
    idf = {"p": torch.tensor([0.0, 1.0, 2.0, 3.0])}  # slot 0 read by every background document
    assert tfidf_rows([tr], scored, 1, idf, {"p": 4})["p"].tolist() == [2]
    assert tfidf_rows([tr], scored, 9, idf, {"p": 4})["p"].tolist() == [0, 1, 2]  # only slots read, sorted
    assert tfidf_rows([tr], torch.zeros(1, 1, dtype=torch.bool), 4, idf, {"p": 4}) == {}


def test_batch_plan_is_seeded_and_covers_every_example() -> None:
    cfg = load_learn_config(None, ["epochs=2", "batch_size=3"])
    plan = batch_plan(7, cfg)
    assert plan == batch_plan(7, cfg) and len(plan) == 6
    assert sorted(i for b in plan[:3] for i in b) == list(range(7))
    assert len(batch_plan(7, load_learn_config(None, ["epochs=2", "batch_size=3", "max_steps=4"]))) == 4


def _committed(db: Path) -> int:
    import sqlite3

    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM ledger_events").fetchone()[0]
    finally:
        con.close()


@pytest.mark.slow
def test_sigkill_during_learning_leaves_the_pre_run_or_a_committed_state(model_dir: Path, facts: Path) -> None:
    """Ten SIGKILLs of `knowedit learn --resume` (a commit every step): two at random
    moments of start-up, eight at random moments after a commit landed (training,
    committing). Each reopen is base + the committed events, the chain verifies, and
    the committed step ranges follow each other without a gap or an overlap."""
    import random
    import signal
    import subprocess
    import sys
    import time

    base = _pools(model_dir)
    db = model_dir / LEDGER_FILE
    rng = random.Random(0)
    cmd = [sys.executable, "-c", "from knowedit.cli.app import main; main()", "learn", "--model", str(model_dir),
           "--data", str(facts), "--resume", "--quiet", "epochs=200", "batch_size=4", "lr=20", "top_t=16",
           "threads=1", "commit_every=1"]
    kills = 0
    for i in range(10):
        seen = _committed(db)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i < 2:
            time.sleep(rng.uniform(0.5, 3.0))
        else:
            deadline = time.monotonic() + 120
            while _committed(db) == seen and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        with Editor.open(model_dir) as ed:
            events = ed.history()
            assert ed.verify() == []
            assert_same_pools({n: v.detach().clone() for n, v in ed.pools.items()}, replay(base, events), "after a kill")
            ranges = [(e.request["step_from"], e.request["step_to"]) for e in events]
            assert ranges == sorted(ranges) and all(a < b for a, b in ranges)
            assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:])), ranges
    assert kills == 10
    assert len(ranges) >= 8, "commits must have landed between the kills"


def test_guard_docs_are_the_background_readers_of_the_rows(model_dir: Path, facts: Path) -> None:
    from knowedit.recipes.learn import _guard_source

    examples, _ = load_learning_data(facts)
    cfg = load_learn_config(None, ["guard_docs=5"])
    with Editor.open(model_dir) as ed:
        assert _guard_source(ed, examples, load_learn_config(None, [])) is None  # off by default
        source = _guard_source(ed, examples, cfg)
        assert source is not None and ed.stats is not None
        pool = next(iter(ed.stats.inv_ptr))
        rows = torch.argsort(ed.stats.inv_ptr[pool][1:] - ed.stats.inv_ptr[pool][:-1], descending=True)[:8].sort().values
        batch = source({pool: rows})
        assert batch is not None and batch.ids.shape[0] == 5
        _, doc, _, _ = ed.stats.reads(pool, rows)
        readers = {ed.docs[d].prompt for d in doc.tolist()}
        texts = [ed.codec.decode(batch.ids[i].tolist()) for i in range(5)]
        assert all(any(p in t for p in readers) for t in texts)
        new = {e.prompt.strip() for e in examples}
        assert not any(p in t for t in texts for p in new)


def test_learning_with_guard_docs_commits_and_keeps_more_of_the_background(model_dir: Path, facts: Path, tmp_path: Path) -> None:
    from knowedit.inference import greedy_exact

    with Editor.open(model_dir) as ed:
        examples, _ = load_learning_data(facts)
        subjects = {r.subject for r in load_records(facts) if r.subject}
        keep = [d for d in ed.docs if not any(s in d.prompt for s in subjects)]
        base_acc = sum(greedy_exact(ed.model, ed.codec, keep)) / len(keep)
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    args = ["epochs=15", "batch_size=4", "lr=20", "top_t=64", "threads=1"]
    plain = learn(model_dir, facts, load_learn_config(None, args), progress=False)
    guarded = learn(other, facts, load_learn_config(None, [*args, "guard_docs=16"]), progress=False)
    kept = {}
    for name, d in (("plain", model_dir), ("guarded", other)):
        with Editor.open(d) as ed:
            kept[name] = sum(greedy_exact(ed.model, ed.codec, keep)) / len(keep)
            assert ed.verify() == []
    assert guarded["events"] and guarded["acquisition"] > 0.5
    # forgetting of the background at least halves (here 19% -> 7%)
    assert base_acc - kept["guarded"] <= 0.5 * (base_acc - kept["plain"]), (base_acc, kept, plain["acquisition"])


def test_a_query_bn_model_round_trips_and_only_its_value_rows_ever_change(tmp_path: Path, runner: CliRunner) -> None:
    """``model.memory.query_bn``: the batch-norm statistics are saved and loaded with
    the model, and neither learning nor editing changes them (they train with the
    query projection only), so revert stays bit for bit."""
    from knowedit.checkpoint import load_checkpoint
    from knowedit.inference import greedy_exact

    out = tmp_path / "bn"
    res = runner.invoke(app, ["train", "tiny", "model.memory.query_bn=true", "logger=none", "threads=1", "--out", str(out), "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["train_greedy_accuracy"] >= 0.95
    ck = load_checkpoint(out)
    bns = [m.query_bn for m in ck.model.memory_layers()]
    assert bns and all(bn is not None and int(bn.num_batches_tracked) > 0 for bn in bns)
    # Trained statistics, not the initial ones, come back from the file.
    assert all(not torch.equal(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)  # type: ignore[union-attr]
    state = {n: t.clone() for n, t in ck.model.state_dict().items()}
    values = {n for n, t in ck.model.state_dict().items() if any(t.data_ptr() == v.data_ptr() for v in ck.model.value_parameters())}
    data = tmp_path / "new.jsonl"
    rows = [r.to_dict() for r in load_records(out / "edits.jsonl")[:8]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_learning_data(data)
    report = learn(out, data, load_learn_config(None, ["epochs=15", "batch_size=4", "lr=20", "top_t=32", "threads=1"]), progress=False)
    assert report["acquisition"] > sum(greedy_exact(ck.model, ck.codec, examples)) / len(examples)
    with Editor.open(out) as ed:
        r = load_records(out / "edits.jsonl")[8]
        rec = ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True)
        now = ed.model.state_dict()
        changed = {n for n in state if not torch.equal(now[n], state[n])}
        assert changed and changed <= values, changed - values
        ed.revert(rec.id)
        for ev in [e for e in ed.history() if e.kind == "learn"]:
            ed.revert(ev.edit_id, cascade=True)
        now = ed.model.state_dict()
        assert all(torch.equal(now[n], state[n]) for n in state)
        assert ed.verify() == []
