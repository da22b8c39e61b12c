"""The editing engine on a tiny trained model: locate, edit, precision, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from knowedit.checkpoint import CheckpointError
from knowedit.data import Example, load_records, read_examples
from knowedit.editor import EditError, Editor
from knowedit.inference import PromptError, greedy_exact
from knowedit.locate import trace_fact

N_EDITS = 50


@pytest.fixture()
def model_dir(tiny_ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_ckpt, out, ignore=shutil.ignore_patterns("ledger.db*"))
    return out


def _state(ed: Editor) -> dict[str, torch.Tensor]:
    """Every parameter once (a shared pool appears under its ``pools.NAME.values`` name)."""
    return {k: v.detach().clone() for k, v in ed.model.named_parameters()}


@pytest.mark.slow
def test_fifty_sequential_edits_are_reliable_and_local(model_dir: Path) -> None:
    ed = Editor.open(model_dir)
    reqs = load_records(model_dir / "edits.jsonl")[:N_EDITS]
    corpus = read_examples(model_dir / "corpus.jsonl")
    base = _state(ed)
    base_ok = greedy_exact(ed.model, ed.codec, corpus)
    # Facts the edits change: every phrasing of (subject, old answer).
    edited = {(r.subject, r.ground_truth) for r in reqs}
    # Edits that miss their target are committed too: reliability counts them.
    records = [ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True) for r in reqs]

    rel = greedy_exact(ed.model, ed.codec, [Example(r.prompt, r.target_new) for r in reqs])
    gen = greedy_exact(ed.model, ed.codec, [Example(p, r.target_new) for r in reqs for p in r.rephrase_prompt])
    keep = [e for e, ok in zip(corpus, base_ok) if ok and not any(s in e.prompt and e.answer == a for s, a in edited)]
    loc = greedy_exact(ed.model, ed.codec, keep)
    reliability, generalization, locality = (sum(x) / len(x) for x in (rel, gen, loc))
    print(f"\n{N_EDITS} sequential edits: reliability {reliability:.3f}, generalization (held-out phrasings) "
          f"{generalization:.3f}, locality {locality:.3f} over {len(keep)} facts")
    assert reliability >= 0.99
    assert locality >= 0.98

    # The only bytes that differ from the base are value rows the Editor reported.
    reported: dict[str, set[int]] = {}
    for rec in records:
        for pool, slot in rec.slots:
            reported.setdefault(pool, set()).add(slot)
    now = _state(ed)
    n_changed = 0
    for name, before in base.items():
        diff = (before.view(torch.uint8) != now[name].view(torch.uint8)).reshape(before.shape[0], -1).any(1) if before.dim() else None
        if not name.startswith("pools.") or not name.endswith(".values"):
            assert torch.equal(before, now[name]), f"{name} changed"
            continue
        pool = name.split(".")[1]
        changed = set(torch.nonzero(diff).flatten().tolist())
        assert changed <= reported.get(pool, set()), f"unreported rows changed in {pool}"
        n_changed += len(changed)
    assert n_changed > 0, "edits changed no row"
    # The checkpoint on disk is the base, untouched.
    disk = load_file(str(model_dir / "model.safetensors"))
    for name, t in disk.items():
        if name in base:
            assert torch.equal(t, base[name])


def test_faiss_locate_returns_exactly_the_slots_the_forward_reads(model_dir: Path) -> None:
    ed = Editor.open(model_dir)
    for r in load_records(model_dir / "edits.jsonl")[:5]:
        trace, positions = trace_fact(ed.model, ed.codec, r.prompt, r.target_new, r.subject, True)
        for tr in trace:
            q = tr.query[0, positions]  # (P, H, Dk)
            k = ed.search.layers[tr.layer].cfg.topk
            scores, ids = ed.search.search(tr.layer, q, k)
            read = tr.slots[0, positions]  # (P, H, k)
            assert torch.equal(ids.sort(-1).values, read.sort(-1).values)
            # widening keeps the read slots and adds more
            _, wide = ed.search.search(tr.layer, q, 3 * k)
            for p in range(read.shape[0]):
                for h in range(read.shape[1]):
                    assert set(read[p, h].tolist()) <= set(wide[p, h].tolist())
        loc = ed.locate(r.prompt, r.target_new, r.subject)
        read_all = {(tr.pool, s) for tr in trace for s in tr.slots[0, positions].flatten().tolist()}
        assert {(s.pool, s.slot) for s in loc.ranked} == read_all
        scores = [s.score for s in loc.ranked]
        assert scores == sorted(scores, reverse=True)


def test_edit_reports_metrics_and_changes_the_answer(model_dir: Path) -> None:
    ed = Editor.open(model_dir)
    r = load_records(model_dir / "edits.jsonl")[0]
    assert ed.ask(r.prompt) == r.ground_truth
    rec = ed.edit(r.prompt, r.target_new, subject=r.subject)
    assert ed.ask(r.prompt) == r.target_new
    m = rec.metrics
    assert m["success"] and m["prob_after"] > m["prob_before"]
    assert m["slots_touched"] == len(rec.slots) > 0
    assert m["total_ms"] > 0 and 0 <= m["ledger_ms"] <= m["total_ms"]
    assert [e.edit_id for e in ed.history()] == [rec.id]


def test_overlapping_edits_are_reported_and_both_kept(model_dir: Path) -> None:
    ed = Editor.open(model_dir)
    reqs = load_records(model_dir / "edits.jsonl")
    r = reqs[0]
    first = ed.edit(r.prompt, r.target_new, subject=r.subject)
    # Another fact of the same relation reads many of the same slots.
    other = next(x for x in reqs[1:] if x.prompt.replace(x.subject, "") == r.prompt.replace(r.subject, ""))
    second = ed.edit(other.prompt, other.target_new, subject=other.subject)
    assert any(c["edit"] == first.id for c in second.conflicts)
    assert ed.ask(r.prompt) == r.target_new and ed.ask(other.prompt) == other.target_new


@pytest.mark.parametrize(
    "prompt,target,err",
    [("", "Paris", PromptError), ("   ", "Paris", PromptError), ("X was born in", "", PromptError),
     ("X was born in", "   ", PromptError), ("word " * 200, "Paris", PromptError)],
)
def test_bad_input_changes_nothing(model_dir: Path, prompt: str, target: str, err: type) -> None:
    ed = Editor.open(model_dir)
    before = _state(ed)
    with pytest.raises(err):
        ed.edit(prompt, target)
    with pytest.raises(EditError):
        ed.edit("Kalo Miren was born in", "Paris", bogus_option=1)
    with pytest.raises(EditError):
        ed.edit("Kalo Miren was born in", "Paris", subject="Nobody")
    assert ed.history() == []
    assert all(torch.equal(v, _state(ed)[k]) for k, v in before.items())


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        Editor.open(tmp_path)


def test_an_edit_that_fails_with_top_t_rows_is_retried_with_retry_top_t(model_dir: Path) -> None:
    ed = Editor.open(model_dir)
    req = load_records(model_dir / "edits.jsonl")[0]
    before = _state(ed)
    # One row and 40 steps: the first try cannot pass, and without a retry nothing is written.
    with pytest.raises(EditError, match="did not reach its target"):
        ed.edit(req.prompt, req.target_new, subject=req.subject, top_t=1, max_steps=40, retry_top_t=0)
    assert all(torch.equal(before[k], v) for k, v in _state(ed).items())
    rec = ed.edit(req.prompt, req.target_new, subject=req.subject, top_t=1, max_steps=40, retry_top_t=64)
    assert rec.metrics["retried"] and rec.metrics["top_t"] == 64 and rec.metrics["success"]
    assert rec.metrics["first_try_steps"] == 40  # the one-row try spent its budget
    assert len(rec.slots) > 1  # the second try used more than the first try's one row
    assert ed.ask(req.prompt) == req.target_new
    ok = ed.edit(req.rephrase_prompt[0], req.target_new, subject=req.subject)
    assert not ok.metrics["retried"] and ok.metrics["top_t"] == 64
