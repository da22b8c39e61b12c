"""Bounded guards for last-layer edits (knowedit.guards)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from knowedit.data import Example, load_records
from knowedit.editor import Editor
from knowedit.guards import BackgroundCache, LiveReads, strongest_mask
from knowedit.inference import encode_examples
from knowedit.locate import slots_by_pool
from knowedit.update import EditOptions, final_selection


def test_strongest_mask_keeps_the_heaviest_per_slot() -> None:
    col = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    w = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.9, 0.4, 0.5])
    # slot 0: weights 0.5 (read 1) and 0.5 (read 6) beat 0.3 and 0.1; ties keep index order
    assert strongest_mask(col, w, 2).nonzero().flatten().tolist() == [1, 3, 4, 5, 6]
    assert strongest_mask(col, w, 1).nonzero().flatten().tolist() == [1, 4, 5]
    assert strongest_mask(col, w, 0).all()  # 0: every read


@pytest.fixture()
def editor(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "model"
    shutil.copytree(tiny_ckpt, out, ignore=shutil.ignore_patterns("ledger.db*"))
    ed = Editor.open(out)
    yield ed
    ed.close()


def test_background_cache_matches_a_fresh_forward_and_respects_its_bound(editor: Editor) -> None:
    docs = editor.docs
    cache = BackgroundCache(editor.model, editor.codec, docs, max_rows=40)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # later rounds overflow the 40-row bound: the cache starts afresh
        pick = torch.randperm(len(docs), generator=gen)[:12]
        b = encode_examples(editor.codec, [docs[d] for d in pick.tolist()], editor.model.cfg.max_seq_len)
        doc = torch.repeat_interleave(pick, b.answer_len)
        pos = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(b.answer_start, b.answer_len)])
        rows = cache.rows(doc, pos)
        with torch.no_grad():
            x = editor.model.residual_before_final_ffn(b.ids)
        expect = torch.cat([x[i, int(s) : int(s + n)] for i, (s, n) in enumerate(zip(b.answer_start, b.answer_len))])
        assert cache.x is not None
        assert torch.allclose(cache.x[rows], expect, atol=1e-5)
        ids, w, _ = cache.selection(rows)
        ref_ids, ref_w, _ = final_selection(editor.model, expect)
        assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w, atol=1e-5)
        assert cache.size <= max(40, int(b.answer_len.sum()))


def test_guard_budget_bounds_the_guards_and_zero_guards_every_reader(editor: Editor) -> None:
    req = load_records(editor.ck.path / "edits.jsonl")[0]
    ex = Example(req.prompt, req.target_new)
    ranked = editor._locate_all([([ex], req.subject)], EditOptions())[0]
    pool, slots = next(iter(slots_by_pool(ranked[:64]).items()))
    assert editor.stats is not None
    _, doc, pos, _ = editor.stats.reads(pool, slots)
    keep = torch.tensor([editor.docs[d].prompt != ex.prompt for d in doc.tolist()])
    every_position = {(d, p) for d, p, k in zip(doc.tolist(), pos.tolist(), keep.tolist()) if k}
    full = editor._final_guards(pool, slots, {ex.prompt}, 0)
    assert full.x_mid.shape[0] == len(every_position) > 0
    for k in (1, 4):
        bounded = editor._final_guards(pool, slots, {ex.prompt}, k)
        assert 0 < len(bounded) <= k * slots.numel()
        # every chosen slot that has readers keeps its strongest one
        heaviest = bounded.weights.max(0).values
        assert torch.allclose(heaviest, full.weights.max(0).values)
        # the checked ones are other positions, each slot's next 4k strongest, with all their reads
        rest = editor.guards.unguarded(pool, slots, {ex.prompt}, k)
        assert rest is not None and 0 < len(rest) <= 4 * k * slots.numel()
        assert len(bounded) + len(rest) <= len(full)
        assert bool((bounded.weights.sum(0) + rest.weights.sum(0) <= full.weights.sum(0) + 1e-5).all())
    # a budget as large as every reader guards them all, and leaves nothing to check
    assert len(editor._final_guards(pool, slots, {ex.prompt}, 10_000)) == len(full)
    assert editor.guards.unguarded(pool, slots, {ex.prompt}, 10_000) is None


def test_a_bounded_edit_keeps_every_background_answer(editor: Editor, monkeypatch: pytest.MonkeyPatch) -> None:
    """One guard per slot during the optimisation; the unguarded readers (here
    all of them) are checked afterwards and guarded where the edit would flip them."""
    import knowedit.guards
    from knowedit.inference import greedy

    monkeypatch.setattr(knowedit.guards, "CHECK_FACTOR", 10_000)

    req = load_records(editor.ck.path / "edits.jsonl")[1]
    others = [d.prompt for d in editor.docs if req.subject not in d.prompt]
    before = greedy(editor.model, editor.codec, others)
    rec = editor.edit(req.prompt, req.target_new, subject=req.subject, guard_reads=1, max_steps=300)
    assert rec.metrics["success"] and rec.metrics["guard_flips"] == 0
    assert rec.metrics["guards_checked"] > 0
    assert greedy(editor.model, editor.codec, others) == before
    assert editor.verify() == []


def test_live_reads_add_discard_and_compact_against_a_plain_list() -> None:
    """LiveReads answers as a plain per-edit list would, through adds, re-adds,
    discards and the compaction they trigger; it keeps copies, not views of the
    caller's (larger) tensors."""
    g = torch.Generator().manual_seed(1)
    ref: dict[str, list] = {}
    lr = LiveReads()

    def reads(n: int) -> list:
        big = torch.randn(n, 4, 8, generator=g)  # a batch's residuals: each read is a view of it
        return [(f"p{k}", big[k, 0], torch.randint(0, 20, (3,), generator=g), torch.rand(3, generator=g)) for k in range(n)]

    def check(live: set[str], slots: torch.Tensor) -> None:
        want = [(p, x, s, w) for eid, rs in ref.items() if eid in live for p, x, s, w in rs if torch.isin(s, slots).any()]
        prompts, x, s, w = lr.reading(slots, 8, live)
        assert prompts == [r[0] for r in want]
        if want:
            assert torch.equal(x, torch.stack([r[1] for r in want]))
            assert torch.equal(s, torch.stack([r[2] for r in want]))
            assert torch.equal(w, torch.stack([r[3] for r in want]))
        else:
            assert x.shape == (0, 8)

    rng = torch.Generator().manual_seed(2)
    for _step in range(60):
        op = int(torch.randint(0, 3, (1,), generator=rng))
        eid = f"e{int(torch.randint(0, 12, (1,), generator=rng))}"
        if op < 2:
            rs = reads(int(torch.randint(0, 4, (1,), generator=rng)))
            lr.add(eid, rs)
            ref.pop(eid, None)
            ref[eid] = [(p, x.clone(), s.clone(), w.clone()) for p, x, s, w in rs]  # a re-add moves the edit last
            for _p, x, s, w in rs:  # the caller's tensors change after the add: LiveReads kept copies
                x.zero_(), s.zero_(), w.zero_()
        else:
            lr.discard(eid)
            ref.pop(eid, None)
        assert (eid in lr) == (eid in ref)
        assert len(lr) == sum(len(v) for v in ref.values())
        live = {e for e in ref if int(e[1:]) % 3}  # some held edits are not live
        check(live, torch.randint(0, 20, (4,), generator=rng))
    lr.clear()
    assert len(lr) == 0 and lr.reading(torch.tensor([1]), 8, set())[1].shape == (0, 8)


def test_max_df_edits_no_hub_and_guards_fewer_positions(editor: Editor) -> None:
    """``max_df``: every edited slot is read by at most that share of the background
    documents, the edit still passes with its guards kept, and it guards fewer
    positions than the same edit with hubs allowed (the option's purpose)."""
    from knowedit.inference import greedy

    stats = editor.stats
    assert stats is not None
    req = load_records(editor.ck.path / "edits.jsonl")[1]
    others = [d.prompt for d in editor.docs if req.subject not in d.prompt]
    before = greedy(editor.model, editor.codec, others)
    full = editor.edit(req.prompt, req.target_new, subject=req.subject)
    editor.revert(full.id)
    dfs = sorted(float(stats.df[p][s]) / stats.n_docs for p, s in full.slots)
    cut = dfs[len(dfs) // 2]  # half of the default edit's rows are above it
    rec = editor.edit(req.prompt, req.target_new, subject=req.subject, max_df=cut, max_steps=300)
    assert rec.metrics["success"] and rec.metrics["guard_flips"] == 0
    assert all(float(stats.df[p][s]) <= cut * stats.n_docs for p, s in rec.slots)
    assert rec.metrics["guards"] < full.metrics["guards"]
    assert greedy(editor.model, editor.codec, others) == before
    assert editor.verify() == []
