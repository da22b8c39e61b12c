"""The final-layer update's guard machinery against exact full-vocabulary answers."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from knowedit.data import Example, load_records
from knowedit.editor import Editor
from knowedit.inference import encode_examples
from knowedit.locate import slots_by_pool
from knowedit.update import (
    EditOptions,
    _FinalLayer,
    _GuardCheck,
    candidate_logits,
    final_layer_rows,
    final_selection,
    margins,
)


@pytest.fixture()
def setup(tiny_ckpt: Path, tmp_path: Path):
    out = tmp_path / "model"
    shutil.copytree(tiny_ckpt, out, ignore=shutil.ignore_patterns("ledger.db*"))
    ed = Editor.open(out)
    req = load_records(out / "edits.jsonl")[0]
    ex = Example(req.prompt, req.target_new)
    ranked = ed._locate_all([([ex], req.subject)], EditOptions())[0]
    pool, slots = next(iter(slots_by_pool(ranked[:64]).items()))
    guards = ed._final_guards(pool, slots, {ex.prompt})
    yield ed, ex, slots, guards
    ed.close()


def _layer(ed: Editor, ex: Example, slots: torch.Tensor, guards) -> tuple[_FinalLayer, _GuardCheck, int]:
    batch = encode_examples(ed.codec, [ex], ed.model.cfg.max_seq_len)
    scored = batch.targets != -100
    with torch.no_grad():
        x_edit = ed.model.residual_before_final_ffn(batch.ids)[scored]
        M = x_edit.shape[0]
        run = _FinalLayer(ed.model, torch.cat([x_edit, guards.x_mid]), slots)
        check = _GuardCheck(run, M, batch.targets[scored])
    return run, check, M


def test_full_guard_check_flags_exactly_the_flipped_guards(setup) -> None:
    ed, ex, slots, guards = setup
    assert guards.x_mid.shape[0] > 100  # enough guards for the check to mean something
    run, check, M = _layer(ed, ex, slots, guards)
    gen = torch.Generator().manual_seed(0)
    flipped_somewhere = False
    with torch.no_grad():
        for scale in (0.0, 0.3, 1.0, 3.0, 10.0):
            delta = scale * torch.randn(run.t, run.read.shape[1], generator=gen)
            exact = margins(run(delta, slice(M, None)), check.tok)
            fast = check.margins(delta, full=True)
            # The sign is exact everywhere; the value is exact wherever a guard flipped.
            assert torch.equal(fast < 0, exact < 0), scale
            flipped_somewhere |= bool((exact < 0).any())
            # Candidate-only margins never understate the exact one.
            assert bool((check.margins(delta) >= exact - 1e-4).all())
    assert flipped_somewhere  # the large changes did flip guards: the check was tested


def test_full_checks_along_a_path_stay_exact_and_rescore_few_guards(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full check moves the anchor of each guard it scored on the whole vocabulary:
    later checks near that point stay exact in sign, and score far fewer guards."""
    import knowedit.update as update

    ed, ex, slots, guards = setup
    run, check, M = _layer(ed, ex, slots, guards)
    scored_rows: list[int] = []
    chunks = update.head_chunks

    def counting(model, hid):  # noqa: ANN001, ANN202
        scored_rows.append(hid.shape[0])
        return chunks(model, hid)

    monkeypatch.setattr(update, "head_chunks", counting)
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(run.t, run.read.shape[1], generator=gen)
    other = torch.randn(run.t, run.read.shape[1], generator=gen)
    path = [3.0, 3.02, 3.04, 6.0, 6.01, 1.0]
    with torch.no_grad():
        for i, scale in enumerate(path):
            delta = scale * direction + (0.5 * other if i == len(path) - 1 else 0.0)
            scored_rows.clear()
            fast = check.margins(delta, full=True)
            exact = margins(run(delta, slice(M, None)), check.tok)
            assert torch.equal(fast < 0, exact < 0), scale
            assert bool((check.margins(delta) >= exact - 1e-4).all())
            if i == 0:
                first = sum(scored_rows)
                assert first > 0
            if i in (1, 2, 4):  # just past a full check: few guards are at risk
                assert sum(scored_rows) < 0.2 * first, (scale, sum(scored_rows), first)


def test_read_change_equals_the_dense_weight_matrix_product(setup) -> None:
    """The compressed reads (each row's hits on the edited slots) give what the dense
    (rows x t) matrix of read weights gives, also for a batch-sized slot set."""
    ed, ex, slots, guards = setup
    x = guards.x_mid
    ids, w, _gate = final_selection(ed.model, x)
    gen = torch.Generator().manual_seed(2)
    wide = torch.unique(torch.cat([slots, torch.randint(0, ed.model.final_memory().pool.n_slots, (1500,), generator=gen)]))
    for s in (slots, wide, slots[:1]):
        run = _FinalLayer(ed.model, x, s)
        dense = torch.zeros(x.shape[0], s.numel())
        for j, slot in enumerate(s.tolist()):
            dense[:, j] = (w * (ids == slot)).sum(1)
        delta = torch.randn(s.numel(), run.read.shape[1], generator=gen)
        rows = torch.randperm(x.shape[0], generator=gen)[:50]
        with torch.no_grad():
            assert torch.allclose(run.change(delta, slice(None)), dense @ delta, atol=1e-4)
            assert torch.allclose(run.change(delta, rows), dense[rows] @ delta, atol=1e-4)
        if s is slots:  # the guards read the edit's slots: the test compares non-zero reads
            assert bool((dense.sum(1) > 0).all())


def test_guard_margins_on_a_subset_equal_the_same_rows_of_all(setup) -> None:
    ed, ex, slots, guards = setup
    run, check, M = _layer(ed, ex, slots, guards)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        delta = 10.0 * torch.randn(run.t, run.read.shape[1], generator=gen)
        exact = run(delta, slice(M, None))
        lost = torch.nonzero(margins(exact, check.tok) < 0).flatten()
        assert lost.numel()
        check.add_rivals(lost, exact[lost].argmax(-1))  # later rivals, as the optimiser adds them
        everything = check.margins(delta)
        rows = torch.randperm(check.G, generator=gen)[: check.G // 3]
        assert torch.allclose(check.margins(delta, rows), everything[rows], atol=1e-5)
        # A check gathered for the subset once (the optimiser's active guards) agrees,
        # the later rivals of its guards included.
        sub = check.take(rows)
        assert sub.G == rows.numel() and sub.ex_row.numel() == int(torch.isin(check.ex_row, rows).sum())
        assert torch.allclose(sub.margins(delta), everything[rows], atol=1e-5)
        assert torch.equal(sub.margins(delta, full=True) < 0, check.margins(delta, full=True)[rows] < 0)
        # With its new rival on the candidate list, a flipped guard's margin is exact.
        assert torch.allclose(everything[lost], margins(exact[lost], check.tok[lost]), atol=1e-4)


def test_cached_selection_gives_the_same_edit(setup) -> None:
    ed, ex, slots, guards = setup
    assert guards.selection is not None
    fresh = final_selection(ed.model, guards.x_mid)
    chunked = final_selection(ed.model, guards.x_mid, chunk=97)
    # Slot ids exactly; weights and gates up to the last bits a batch size can move
    # (the cache computes them a few documents at a time).
    for cached, recomputed, in_chunks in zip(guards.selection, fresh, chunked):
        if cached is not None:
            same = torch.equal if cached.dtype == torch.long else lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-5)
            assert same(cached, recomputed)
            assert same(in_chunks, recomputed)
    opts = EditOptions()
    a = final_layer_rows(ed.model, ed.codec, [ex], slots, guards, opts)
    b = final_layer_rows(ed.model, ed.codec, [ex], slots, replace(guards, selection=None), opts)
    assert a.steps == b.steps and a.success == b.success
    for pool in a.rows:
        # Selecting in another batch may move the last bits of a float.
        assert torch.allclose(a.rows[pool], b.rows[pool], atol=1e-4, rtol=1e-4)


def test_an_edit_started_from_its_own_result_is_done_at_once(setup) -> None:
    ed, ex, slots, guards = setup
    opts = EditOptions()
    a = final_layer_rows(ed.model, ed.codec, [ex], slots, guards, opts)
    assert a.success and a.steps > 0
    base = ed.model.final_memory().pool.values.detach()[slots].float()
    b = final_layer_rows(ed.model, ed.codec, [ex], slots, guards, opts, init=a.rows[next(iter(a.rows))].float() - base)
    assert b.success and b.steps == 0
    assert torch.allclose(b.rows[next(iter(b.rows))].float(), a.rows[next(iter(a.rows))].float(), atol=1e-6)


def test_candidate_logits_match_the_gathered_product_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked gather scores each row's own tokens, also where rows span several chunks,
    and passes gradients to the hidden states (the active guards' hinge needs them)."""
    import knowedit.update as update

    g = torch.Generator().manual_seed(0)
    head_w = torch.randn(50, 16, generator=g)
    hid = torch.randn(23, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 50, (23, 4), generator=g)
    want = torch.einsum("rd,rcd->rc", hid, head_w[tokens])
    monkeypatch.setattr(update, "GATHER_ROWS", 5)  # 23 rows: five chunks, the last one short
    got = candidate_logits(hid, head_w, tokens)
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    assert torch.allclose(hid.grad, head_w[tokens].sum(1), atol=1e-5)


def test_margins_scored_in_chunks_equal_one_pass(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring every guard a chunk at a time (bounded temporaries) gives the margins,
    rivals, floors and anchors that one pass over all guards gives, along a path
    of full checks."""
    import knowedit.update as update

    ed, ex, slots, guards = setup
    run, one, M = _layer(ed, ex, slots, guards)
    _run, chunked, _M = _layer(ed, ex, slots, guards)
    assert one.G > 3 * 37
    gen = torch.Generator().manual_seed(3)
    direction = torch.randn(run.t, run.read.shape[1], generator=gen)
    with torch.no_grad():
        for scale in (3.0, 3.02, 6.0, 1.0):
            delta = scale * direction
            monkeypatch.setattr(update, "MARGIN_ROWS", 1 << 30)
            a = one.margins(delta, full=True)
            a_cand = one.margins(delta)
            monkeypatch.setattr(update, "MARGIN_ROWS", 37)
            b = chunked.margins(delta, full=True)
            b_cand = chunked.margins(delta)
            assert torch.equal(a < 0, b < 0), scale
            assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a_cand, b_cand, atol=1e-4), scale
    assert chunked.ex_row.numel() > 0  # full checks added rivals: the chunks' share of them was tested
    assert sorted(zip(one.ex_row.tolist(), one.ex_tok.tolist())) == sorted(zip(chunked.ex_row.tolist(), chunked.ex_tok.tolist()))
    assert torch.allclose(one.floor, chunked.floor, atol=1e-4) and torch.allclose(one.anchor, chunked.anchor, atol=1e-5)
