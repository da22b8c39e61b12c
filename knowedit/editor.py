"""The Editor: locate a fact's slots, update only those rows, log every edit in
the ledger, and roll any edit back bit for bit.

The base checkpoint on disk never changes. The ledger is the source of truth:
the live model is the base plus a replay of the live edits, so an edit is
committed exactly when its ledger transaction commits (crash-safe by
construction), and two processes serialise on the ledger's write lock,
each replaying the other's events before it edits. The ledger is created by
the first write (an edit or a learning run's commit), never by opening or reading.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from knowedit.checkpoint import LEDGER_FILE, Checkpoint, load_checkpoint, save_checkpoint
from knowedit.data.records import EditRequest, Example, requests_from
from knowedit.errors import FileAccessError, KnoweditError
from knowedit.events import event_requests
from knowedit.guards import GuardBuilder
from knowedit.heap import release_large_buffers
from knowedit.inference import PromptError, encode_pair, greedy, teacher_forced
from knowedit.ledger import (
    APPLY_KINDS,
    Event,
    Ledger,
    LedgerError,
    LedgerMissing,
    LedgerTxn,
    RowChange,
    is_in_memory,
)
from knowedit.locate import (
    KeySearch,
    Location,
    SlotScore,
    locate,
    slots_by_pool,
    trace_fact,
    trace_facts,
)
from knowedit.side_files import CORPUS_FILE, STATS_DOCS_FILE, build_stats, load_background
from knowedit.stats import SlotStats
from knowedit.update import (
    EditOptions,
    Guards,
    final_layer_rows,
    guard_flips,
    optimise_rows,
    uses_final_pool_only,
)

PROVENANCE_FILE = "provenance.json"
"""Where an exported checkpoint (:meth:`Editor.save`) came from."""
MAX_GUARD_ROUNDS = 3
"""Times an edit is optimised again with the unguarded background readers it would flip added as guards."""
REPLAY_PAGE = 256
"""Events decoded at a time when the editor replays a ledger (bounds memory on long ledgers)."""
WAIT_ENV = "KNOWEDIT_LEDGER_WAIT_S"
"""Seconds a writer waits for its turn at the ledger (default 60)."""


class EditError(KnoweditError, ValueError):
    """An edit or revert that cannot be done; nothing was changed."""


class EditFailed(EditError):
    """An edit whose optimisation ended without reaching its target; nothing was written.

    Attributes:
        request: the edit request.
        metrics: what the attempt measured (``prob_after``, ``steps``, ...).
    """

    def __init__(self, message: str, request: EditRequest, metrics: dict) -> None:
        super().__init__(message)
        self.request = request
        self.metrics = metrics


class BatchFailed(EditError):
    """A batch ran to its end but some edits did not reach their targets.

    ``applied`` edits are committed; the ``failed`` ones (``(index, error)``
    pairs, index into the batch) wrote nothing.
    """

    def __init__(self, message: str, applied: list[EditRecord], failed: list[tuple[int, EditFailed]]) -> None:
        super().__init__(message)
        self.applied = applied
        self.failed = failed


class BatchError(EditError):
    """A batch stopped midway: ``applied`` edits are committed, the rest are not."""

    def __init__(self, message: str, applied: list[EditRecord], index: int) -> None:
        super().__init__(message)
        self.applied = applied
        self.index = index


def _wait_seconds(wait_s: float | None) -> float:
    if wait_s is None:
        raw = os.environ.get(WAIT_ENV, "60")
        try:
            wait_s = float(raw)
        except ValueError:
            raise EditError(f"{WAIT_ENV}={raw!r} is not a number of seconds") from None
    if not wait_s > 0:
        raise EditError(f"the ledger wait must be a positive number of seconds, not {wait_s!r}")
    return float(wait_s)


def _request_key(req: EditRequest) -> tuple[str, str, str | None]:
    return (req.prompt.strip(), req.target_new.strip(), req.subject)


@dataclass
class EditRecord:
    """What one applied edit did."""

    id: str
    prompt: str
    target_new: str
    subject: str | None
    slots: list[tuple[str, int]]
    metrics: dict
    conflicts: list[dict] = field(default_factory=list)
    seq: int = 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Attempt:
    """One computed (not yet committed) edit: its rows, metrics and conflicts."""

    rows: list[RowChange]
    metrics: dict
    conflicts: list[dict]
    compute_ms: float


class Editor:
    """Edit the facts of a memory-layer model; see :meth:`open`."""

    def __init__(
        self,
        ck: Checkpoint,
        ledger: Ledger | None,
        stats: SlotStats | None,
        docs: list[Example],
        author: str | None,
        ledger_url: str | None = None,
        background: str = "loaded",
    ) -> None:
        self.ck = ck
        self.model = ck.model
        self.codec = ck.codec
        self.ledger = ledger
        self.ledger_url = ledger_url if ledger_url is not None else (ledger.url if ledger is not None else str(ck.path / LEDGER_FILE))
        self._stats = stats
        self._docs = docs
        self.author = author
        self._background = background
        self._load_background: Callable[[], tuple[SlotStats | None, list[Example], str]] | None = None
        release_large_buffers()  # an editing process's large temporaries go back to the system (knowedit.heap)
        self.search = KeySearch(self.model)
        self.pools = {p.name: p.values for p in self.model.pools.values()}
        self.base = {name: v.detach().clone() for name, v in self.pools.items()}
        self._applies: dict[str, Event] = {}
        self._live: dict[str, Event] = {}
        self._reads: dict[str, dict[str, set[int]]] = {}
        self._guard_builder: GuardBuilder | None = None
        self._seq = 0
        self._learning: LearningSession | None = None
        self.wait_s = 60.0
        if self.ledger is not None:
            self._replay(self.ledger)

    # ------------------------------------------------------------ background
    def _ensure_background(self) -> None:
        if self._load_background is not None:
            load, self._load_background = self._load_background, None
            self._stats, self._docs, self._background = load()

    @property
    def stats(self) -> SlotStats | None:
        """The background slot statistics (loaded, or built, when first needed)."""
        self._ensure_background()
        return self._stats

    @property
    def docs(self) -> list[Example]:
        """The background documents the statistics count (the training corpus)."""
        self._ensure_background()
        return self._docs

    @property
    def background(self) -> str:
        """How the background statistics were had: ``loaded``, ``built``, ``rebuilt``,
        ``memory`` (computed, not stored: the directory is not writable, or the
        editor was opened ``read_only``) or ``none``."""
        self._ensure_background()
        return self._background

    @property
    def guards(self) -> GuardBuilder:
        """Guard construction for last-layer edits, with its caches."""
        if self._guard_builder is None:
            self._guard_builder = GuardBuilder(self.model, self.codec, self.stats, self.docs)
        return self._guard_builder

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        model_dir: str | Path,
        ledger: str | None = None,
        device: str = "cpu",
        author: str | None = None,
        wait_s: float | None = None,
        read_only: bool = False,
    ) -> Editor:
        """Open a checkpoint directory for editing and replay its ledger.

        Args:
            model_dir: a directory written by ``knowedit train``.
            ledger: a path or SQLAlchemy URL; default ``model_dir/ledger.db``.
                Opening never creates it: the first edit does.
            device: where the model runs.
            author: recorded with every event this Editor writes.
            wait_s: how long a write waits for its turn behind other writers
                (default: ``KNOWEDIT_LEDGER_WAIT_S`` or 60 s); then it fails with
                :class:`~knowedit.ledger.LedgerBusy` and changes nothing.

            read_only: never write the directory: background statistics that
                are missing are computed in memory, not stored (``ask`` and
                ``locate`` open this way).

        The background statistics are read when first needed (an edit or a
        locate; ``ask`` never needs them). If the directory has no
        ``slot_stats.safetensors`` but has its training corpus, they are
        computed then and stored (what ``knowedit stats`` does; not with
        ``read_only``); a damaged pair is rebuilt, or refused naming the file
        (:func:`knowedit.side_files.load_background`).

        Raises:
            CheckpointError, SideFileError, LedgerError, EditError: the message names the problem.
        """
        url = ledger if ledger is not None else None
        if url is not None and is_in_memory(url):
            raise EditError(
                f"ledger {url!r} is in memory: every edit would be lost when the process exits; "
                "give a file path or a database URL"
            )
        wait = _wait_seconds(wait_s)
        ck = load_checkpoint(model_dir, device=device)
        url = url if url is not None else str(ck.path / LEDGER_FILE)
        try:
            led: Ledger | None = Ledger(url, ck.fingerprint, create=False, busy_timeout_s=wait)
        except LedgerMissing:
            led = None
        try:
            ed = cls(ck, led, None, [], author, ledger_url=url, background="none")
        except BaseException:
            if led is not None:
                led.close()
            raise
        ed._load_background = lambda: load_background(ck, persist=not read_only)
        ed.wait_s = wait
        return ed

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Editor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writable_ledger(self) -> Ledger:
        """The ledger, created now if this is the first write."""
        if self.ledger is None:
            self.ledger = Ledger(self.ledger_url, self.ck.fingerprint, create=True, busy_timeout_s=self.wait_s)
        return self.ledger

    def _reader_ledger(self) -> Ledger | None:
        """The ledger, if one exists by now (another process may have created it)."""
        if self.ledger is None:
            try:
                self.ledger = Ledger(self.ledger_url, self.ck.fingerprint, create=False, busy_timeout_s=self.wait_s)
            except LedgerMissing:
                return None
        return self.ledger

    # ----------------------------------------------------------- live state
    def _drop_caches(self) -> None:
        """The residual stream before the last memory layer may have changed."""
        if self._guard_builder is not None:
            self._guard_builder.invalidate()
        self._reads.clear()

    def _write(self, rows: list[RowChange], which: str, event: str = "") -> None:
        final = self.model.final_memory()
        if any(final is None or r.pool != final.pool.name for r in rows) or (final and not uses_final_pool_only(self.model, {final.pool.name})):
            self._drop_caches()
        session = self._learning
        with torch.no_grad():
            for r in rows:
                if session is not None:
                    session._external_write(r.pool, r.slot, event)
                self.pools[r.pool][r.slot] = getattr(r, which).to(self.pools[r.pool].device)
                if session is not None:
                    session._snapshot[r.pool][r.slot] = self.pools[r.pool][r.slot]

    def _sync(self, events: list[Event], source: Ledger | LedgerTxn) -> None:
        """Apply events this process has not seen yet (other processes' edits).

        ``source`` (the ledger, or the transaction the events were read in)
        gives a reverted edit's rows: the editor keeps only which rows each
        edit changed (:func:`_slim`), never the rows themselves.
        """
        full: dict[str, Event] = {}
        for ev in events:
            if ev.seq <= self._seq:
                continue
            if ev.kind in APPLY_KINDS:
                self._write(ev.rows, "after", f"{ev.kind} {ev.edit_id}")
                full[ev.edit_id] = ev
                self._remember(ev)
            else:
                applied = full.get(ev.edit_id) or source.get(ev.edit_id)
                self._write(applied.rows, "before", f"the revert of {ev.edit_id}")
                self._live.pop(ev.edit_id, None)
                if self._guard_builder is not None:
                    self._guard_builder.live.discard(ev.edit_id)
            self._seq = ev.seq

    def _remember(self, ev: Event) -> None:
        """A committed apply or learn event is live (kept without its rows)."""
        slim = _slim(ev)
        self._applies[ev.edit_id] = slim
        self._live[ev.edit_id] = slim

    def _replay(self, led: Ledger) -> None:
        """Sync with every event of ``led`` after the last one seen, a page at a time."""
        while True:
            page = led.events(after_seq=self._seq, limit=REPLAY_PAGE)
            if not page:
                return
            self._sync(page, led)

    def _owned(self) -> dict[str, dict[int, str]]:
        """pool -> slot -> id of the newest live edit that changed it."""
        out: dict[str, dict[int, str]] = {}
        for ev in sorted(self._live.values(), key=lambda e: e.seq):
            for r in ev.rows:
                out.setdefault(r.pool, {})[r.slot] = ev.edit_id
        return out

    def _reads_of(self, ev: Event) -> dict[str, set[int]]:
        if ev.edit_id not in self._reads:
            self._reads[ev.edit_id] = {}
            for req in event_requests(ev):
                trace, pos = trace_fact(self.model, self.codec, req["prompt"], req["target_new"], req.get("subject"), True)
                for tr in trace:
                    self._reads[ev.edit_id].setdefault(tr.pool, set()).update(tr.slots[0, pos].flatten().tolist())
        return self._reads[ev.edit_id]

    # ----------------------------------------------------------------- ask
    def refresh(self) -> None:
        """Replay edits that other processes committed since this Editor last looked."""
        led = self._reader_ledger()
        if led is not None:
            self._replay(led)

    def ask(self, prompt: str, max_new_tokens: int = 8) -> str:
        """Greedy completion of ``prompt`` by the live (edited) model."""
        self.refresh()
        return greedy(self.model, self.codec, [prompt], max_new_tokens=max_new_tokens)[0]

    def locate(
        self, prompt: str, target: str, subject: str | None = None, widen: int = 1, use_subject: bool = True,
        idf_source: str = "any", layers: str = "all",
    ) -> Location:
        """Rank the slots ``prompt`` reads while predicting ``target`` (see :func:`knowedit.locate.locate`).

        ``layers``: ``all`` memory layers, or ``last`` (the last block's only).
        """
        return locate(
            self.model, self.codec, self.search, self.stats, prompt, target, subject, widen, use_subject,
            idf_source, self._layer_filter(layers),
        )

    def _layer_filter(self, layers: str) -> list[int] | None:
        if layers == "all":
            return None
        if layers == "last":
            final = self.model.final_memory()
            if final is None:
                raise EditError("layers='last' needs a memory layer in the last block; use layers='all'")
            return [final.layer]
        raise EditError(f"layers must be 'last' or 'all', not {layers!r}")

    # ---------------------------------------------------------------- edit
    def _guards(self, req: EditRequest, chosen: dict[str, torch.Tensor], overlapping: set[str], n: int) -> list[Example]:
        """Facts that must keep their answers: background readers of the chosen
        slots (not the edited subject's) and live edits that read them."""
        out: list[Example] = []
        replaced = self._same_prompt_edits(req.prompt)
        for ev in self._live.values():
            if ev.edit_id in replaced or ev.kind != "apply":
                continue  # a re-edit of the same prompt replaces it; learn events have no prompt
            reads = self._reads_of(ev)
            if ev.edit_id in overlapping or any(
                set(ids.tolist()) & reads.get(pool, set()) for pool, ids in chosen.items()
            ):
                out.extend(Example(r["prompt"], r["target_new"]) for r in event_requests(ev))
        if self.stats is not None and n > 0:
            counts: Counter[int] = Counter()
            for pool, ids in chosen.items():
                if pool in self.stats.inv_ptr:
                    counts.update(self.stats.readers(pool, ids).tolist())
            for doc, _ in counts.most_common():
                if len(out) >= n:
                    break
                ex = self.docs[doc]
                if ex.prompt == req.prompt.strip() or (req.subject and req.subject in ex.prompt):
                    continue
                out.append(ex)
        return out

    def _same_prompt_edits(self, prompt: str) -> set[str]:
        """Live edits of the same prompt (a new edit of it replaces them)."""
        p = prompt.strip()
        return {
            eid for eid, ev in self._live.items()
            if any(str(r.get("prompt", "")).strip() == p for r in event_requests(ev))
        }

    def _options(self, options: Mapping[str, object]) -> EditOptions:
        try:
            opts = EditOptions.from_mapping(options)
        except ValueError as err:
            raise EditError(str(err)) from None
        if opts.max_steps < 1:
            raise EditError(f"max_steps must be at least 1, got {opts.max_steps} (with no step nothing would change)")
        if "layers" not in options and opts.layers == "last" and self.model.final_memory() is None:
            # a model whose last block has no memory layer (a retrofit with --layers elsewhere):
            # the default edits the layers it has, through the whole-model path; the record
            # says layers='all'. Asking for layers='last' explicitly is still refused.
            opts = replace(opts, layers="all")
        return opts

    def _check(self, req: EditRequest) -> None:
        encode_pair(self.codec, req.prompt, req.target_new, self.model.cfg.max_seq_len)

    def edit(
        self, prompt: str, target_new: str, subject: str | None = None, *, note: str | None = None,
        allow_failed: bool = False, **options: object,
    ) -> EditRecord:
        """Make ``prompt`` answer ``target_new`` by updating a few value rows.

        Args:
            prompt: the fact's prompt, e.g. "The mother tongue of Danielle Darrieux is".
            target_new: the new answer.
            subject: the subject as written in the prompt (improves locating).
            note: free text stored in the ledger.
            allow_failed: commit the edit even when the optimisation ends without
                reaching the target (its metrics say ``success: false``).
            **options: :class:`knowedit.update.EditOptions` fields (``max_steps`` at least 1).

        Returns:
            The :class:`EditRecord` (id, slots, metrics, conflicts).

        Raises:
            EditFailed: the target was not reached (and ``allow_failed`` is False);
                nothing is written, not even a new ledger.
            PromptError, EditError: bad input; nothing is changed.
        """
        req = EditRequest(prompt=prompt, target_new=target_new, subject=subject)
        return self.apply(req, note=note, allow_failed=allow_failed, **options)

    def apply(
        self, req: EditRequest, note: str | None = None, *, allow_failed: bool = False, **options: object
    ) -> EditRecord:
        """Apply one :class:`EditRequest` (see :meth:`edit`).

        An edit that does not reach its target raises :class:`EditFailed` inside the
        ledger transaction, so nothing is appended; ``allow_failed=True`` commits it
        anyway (the evaluation harness does, to count it in reliability).
        """
        opts = self._options(options)
        self._check_request(req)
        return self._commit([req], opts, note, allow_failed)

    def edit_batch(
        self, requests: str | Path | Iterable[Mapping | EditRequest], note: str | None = None, *,
        allow_failed: bool = False, **options: object,
    ) -> EditRecord:
        """Apply several requests in one optimisation and one ledger event (batch editing, as MEMIT does).

        Each request's slots are located as for a single edit (``top_t`` of them
        each); the union of their rows is optimised until every request reaches
        its target while the guards (the background readers of those rows and the
        live edits) keep their answers. The ledger gets one ``apply`` event whose
        request is ``{"batch": n, "requests": [...]}``; reverting its id reverts the
        whole batch. Final-layer editing only (``layers="last"``).

        Returns:
            One :class:`EditRecord` for the batch: ``prompt`` and ``target_new`` are
            the first request's, ``metrics["requests"]`` has each request's result.

        Raises:
            EditFailed: some request did not reach its target (and ``allow_failed``
                is False); nothing is written. It names every failed request.
            EditError: an empty batch, a prompt given twice, ``layers="all"``, or a bad request.
        """
        reqs = requests_from(requests)
        opts = self._options(options)
        if not reqs:
            raise EditError("an empty batch: give at least one request")
        if opts.layers != "last":
            raise EditError("batch editing changes the last memory layer only: use layers='last'")
        prompts = [r.prompt.strip() for r in reqs]
        dup = sorted({p for p in prompts if prompts.count(p) > 1})
        if dup:
            raise EditError(f"a batch edits each prompt once; given twice: {dup[:3]}")
        for i, r in enumerate(reqs):
            try:
                self._check_request(r)
            except (PromptError, EditError) as err:
                raise EditError(f"request {i + 1} of the batch: {err}") from None
        return self._commit(reqs, opts, note, allow_failed)

    def _check_request(self, req: EditRequest) -> None:
        if req.subject is not None and req.subject not in req.prompt:
            raise EditError(f"subject {req.subject!r} does not occur in the prompt")
        self._check(req)

    def _commit(self, reqs: list[EditRequest], opts: EditOptions, note: str | None, allow_failed: bool) -> EditRecord:
        """Compute the edit of ``reqs`` and append it as one ledger event (see :meth:`apply`)."""
        self._ensure_background()  # before any write: a damaged side file fails here
        pre: _Attempt | None = None
        if self._reader_ledger() is None:
            # No ledger yet: compute first, so that a failed edit does not create one.
            pre = self._attempt(reqs, opts)
            if not allow_failed:
                self._require_success(reqs, pre, opts)
        request = reqs[0].to_dict() if len(reqs) == 1 else {"batch": len(reqs), "requests": [r.to_dict() for r in reqs]}
        with self._writable_ledger().transaction() as txn:
            t_start = time.perf_counter()
            fresh = txn.events(after_seq=self._seq)
            self._sync(fresh, txn)
            att = pre if pre is not None and not fresh else self._attempt(reqs, opts)
            if att is pre:  # computed before the transaction: its time counts as compute
                t_start -= att.compute_ms / 1000
            if not allow_failed:
                self._require_success(reqs, att, opts)  # raised inside: nothing is appended
            ev = txn.append_apply(
                request=request, method="sparse", settings=opts.to_dict(), metrics=att.metrics,
                rows=att.rows, author=self.author, note=note,
            )
        # Committed: only now does the live model change.
        self._write(ev.rows, "after")
        self._remember(ev)
        self._seq = ev.seq
        total_ms = (time.perf_counter() - t_start) * 1000
        # Everything but locate+optimise is ledger work: the lock, syncing,
        # encoding rows, the insert and the durable commit.
        out = dict(att.metrics, total_ms=round(total_ms, 2), ledger_ms=round(total_ms - att.compute_ms, 2))
        req = reqs[0]
        return EditRecord(ev.edit_id, req.prompt, req.target_new, req.subject, [(r.pool, r.slot) for r in ev.rows], out, att.conflicts, ev.seq)

    @staticmethod
    def _require_success(reqs: list[EditRequest], att: _Attempt, opts: EditOptions) -> None:
        m = att.metrics
        if m["success"]:
            return
        tries = f", also with {m['top_t']} rows" if m.get("retried") else ""
        rule = (
            f"success needs every target token to be the argmax with probability >= {opts.min_prob} and the "
            "guards kept). Nothing was written. Give it more steps (max_steps, --max-steps) or keep it anyway "
            "(allow_failed=True, --allow-failed)"
        )
        if len(reqs) == 1:
            req = reqs[0]
            raise EditFailed(
                f"edit not applied: {req.prompt!r} -> {req.target_new!r} did not reach its target "
                f"(probability {m['prob_after']:.4f} after {m['steps']} step(s){tries}; {rule}",
                req,
                dict(m),
            )
        bad = [(i, r) for i, (r, res) in enumerate(zip(reqs, m["requests"])) if not res["success"]]
        which = "; ".join(f"request {i + 1} ({r.prompt!r} -> {r.target_new!r})" for i, r in bad)
        raise EditFailed(
            f"batch not applied: {len(bad)} of {len(reqs)} request(s) did not reach their targets after "
            f"{m['steps']} step(s){tries}: {which} ({rule}",
            bad[0][1],
            dict(m),
        )

    def _attempt(self, reqs: list[EditRequest], opts: EditOptions) -> _Attempt:
        """Locate the slots and optimise their rows against the live model (changes nothing).

        If the edit does not pass with ``top_t`` rows and ``retry_top_t`` is larger, it
        is computed once more with that many: ``metrics`` are the second try's
        (``top_t`` says which counted, ``retried`` whether there was a second try,
        ``first_try_steps`` its steps); ``compute_ms`` is both tries'. The co-phrasings
        and the slot rankings do not depend on ``top_t``: both tries share them."""
        t0 = time.perf_counter()
        primary = [Example(r.prompt.strip(), r.target_new.strip()) for r in reqs]
        cophrases = self._cophrases(reqs, opts)
        located = self._locate_all([([ex, *co], r.subject) for r, ex, co in zip(reqs, primary, cophrases)], opts)
        if opts.max_df < 1 and self.stats is not None:
            located = [self._without_hubs(r, ranked, opts.max_df) for r, ranked in zip(reqs, located)]
        ranked_ms = (time.perf_counter() - t0) * 1000
        att = self._attempt_once(reqs, opts, primary, cophrases, located)
        if not att.metrics["success"] and opts.retry_top_t > opts.top_t:
            first = att
            att = self._attempt_once(reqs, replace(opts, top_t=opts.retry_top_t, retry_top_t=0), primary, cophrases, located)
            att.compute_ms += first.compute_ms
            att.metrics["retried"] = True
            att.metrics["first_try_steps"] = first.metrics["steps"]
        att.compute_ms += ranked_ms
        att.metrics["compute_ms"] = round(att.compute_ms, 2)
        return att

    def _without_hubs(self, req: EditRequest, ranked: list[SlotScore], max_df: float) -> list[SlotScore]:
        """``ranked`` without the slots more than ``max_df`` of the background documents read."""
        stats = self.stats
        assert stats is not None
        cap = max_df * stats.n_docs
        kept = [sc for sc in ranked if float(stats.df[sc.pool][sc.slot]) <= cap]
        if not kept:
            raise EditError(
                f"no slot left to edit for {req.prompt!r}: every candidate slot is read by more than "
                f"max_df={max_df:g} of the background documents; raise max_df"
            )
        return kept

    def _attempt_once(
        self, reqs: list[EditRequest], opts: EditOptions, primary: list[Example],
        cophrases: list[list[Example]], located: list[list[SlotScore]],
    ) -> _Attempt:
        """One try of :meth:`_attempt` with ``opts.top_t`` rows of each request's ranking."""
        t0 = time.perf_counter()
        examples = [*primary, *(e for c in cophrases for e in c)]
        # A live edit of the same prompt is being replaced: its slots are not in the way.
        same = set().union(*(self._same_prompt_edits(r.prompt) for r in reqs))
        owned = {pool: {slot: eid for slot, eid in m.items() if eid not in same} for pool, m in self._owned().items()}
        picked: dict[tuple[str, int], SlotScore] = {}
        clash: dict[str, list[tuple[str, int]]] = {}
        for r, ranked in zip(reqs, located):
            for sc in ranked[: opts.top_t]:
                eid = owned.get(sc.pool, {}).get(sc.slot)
                if eid is not None and (sc.pool, sc.slot) not in clash.get(eid, []):
                    clash.setdefault(eid, []).append((sc.pool, sc.slot))
            if opts.conflict == "avoid":
                ranked = [sc for sc in ranked if sc.slot not in owned.get(sc.pool, {})]
            if not ranked:
                raise EditError(
                    f"no slot left to edit for {r.prompt!r}: every candidate slot belongs to a live edit "
                    "(conflict=avoid); use conflict=joint, or revert those edits"
                )
            for sc in ranked[: opts.top_t]:
                picked.setdefault((sc.pool, sc.slot), sc)
        chosen = slots_by_pool(list(picked.values()))
        final_only = opts.layers == "last" and uses_final_pool_only(self.model, set(chosen))
        checked = rounds = 0
        if final_only:
            pool, ids = next(iter(chosen.items()))
            editing = {e.prompt for e in examples}
            guards = self._final_guards(pool, ids, editing, opts.guard_reads)
            res = final_layer_rows(self.model, self.codec, examples, ids, guards, opts, n_primary=len(reqs))
            # The optimisation guarded each slot's strongest readers; the others are
            # checked once against the result, and any it would flip join the guards.
            rest = self.guards.unguarded(pool, ids, editing, opts.guard_reads)
            while rest is not None and len(rest):
                checked += len(rest)
                delta = res.rows[pool].float() - self.pools[pool][ids.to(self.pools[pool].device)].detach().float()
                bad = guard_flips(self.model, self.codec, examples, ids, rest, delta)
                if not bad.any():
                    break
                if rounds == MAX_GUARD_ROUNDS:  # still flipping: reported, never hidden
                    res.guard_flips += int(bad.sum())
                    break
                guards, rest = guards + rest.take(bad), rest.take(~bad)
                spent = res.steps
                res = final_layer_rows(self.model, self.codec, examples, ids, guards, opts, n_primary=len(reqs), init=delta)
                res.steps += spent  # every round's steps
                rounds += 1
            n_guard = len(guards)
        elif len(reqs) > 1:
            raise EditError("batch editing needs a memory layer in the last block (final-layer editing)")
        else:
            guards = self._guards(reqs[0], chosen, set(clash), opts.guard_facts)
            res = optimise_rows(self.model, self.codec, examples[0], chosen, guards, opts)
            n_guard = len(guards)
        compute_ms = (time.perf_counter() - t0) * 1000
        rows = [
            RowChange(pool, int(slot), self.pools[pool][slot].detach().cpu().clone(), res.rows[pool][i].cpu().clone())
            for pool, ids in chosen.items()
            for i, slot in enumerate(ids.tolist())
        ]
        rows = [r for r in rows if not torch.equal(r.before, r.after)]
        resolution = "avoided" if opts.conflict == "avoid" else "joint, guarded"
        conflicts = [{"edit": eid, "slots": [list(x) for x in sl], "resolution": resolution} for eid, sl in clash.items()]
        metrics = {
            "prob_before": round(res.prob_before, 6),
            "prob_after": round(res.prob_after, 6),
            "steps": res.steps,
            "success": res.success,
            "slots_touched": len(rows),
            "constraint": opts.constraint if final_only else "kl-guard",
            "guard_flips": res.guard_flips,
            "scale": res.scale,
            "guards": n_guard,
            "guards_checked": checked,
            "guard_rounds": rounds,
            "free_dims": res.free_dims,
            "guard_kl": round(res.guard_kl, 6),
            "cophrases": [e.prompt for c in cophrases for e in c],
            "cophrases_passed": res.edits_passed - sum(res.passed[: len(reqs)]) if res.passed else res.edits_passed - int(res.success),
            "compute_ms": round(compute_ms, 2),
            "conflicts": conflicts,
            "top_t": opts.top_t,
            "retried": False,
        }
        if len(reqs) > 1:
            assert res.passed is not None
            metrics["requests"] = [
                {"prompt": r.prompt, "target_new": r.target_new, "success": bool(ok), "cophrases": [e.prompt for e in co]}
                for r, ok, co in zip(reqs, res.passed, cophrases)
            ]
        return _Attempt(rows, metrics, conflicts, compute_ms)

    def _cophrases(self, reqs: list[EditRequest], opts: EditOptions) -> list[list[Example]]:
        """Per request, other phrasings of the same fact in the background corpus:
        documents that name the subject and give the model's current answer to the
        prompt (the current answers come from one batched greedy decode)."""
        out: list[list[Example]] = [[] for _ in reqs]
        if not (opts.cophrase and self.docs):
            return out
        ask = [i for i, r in enumerate(reqs) if r.subject]
        olds = greedy(self.model, self.codec, [reqs[i].prompt for i in ask]) if ask else []  # no refresh: inside the transaction
        for i, old in zip(ask, olds):
            req = reqs[i]
            if not old or old == req.target_new.strip():
                continue
            prompt = req.prompt.strip()
            seen = {prompt}
            for d in self.guards.docs_answering(old):
                if req.subject in d.prompt and d.prompt not in seen:  # type: ignore[operator]
                    seen.add(d.prompt)
                    out[i].append(Example(d.prompt, req.target_new.strip()))
        return out

    def _locate_all(self, groups: list[tuple[list[Example], str | None]], opts: EditOptions) -> list[list[SlotScore]]:
        """Per group of examples (a request and its co-phrasings, with the subject):
        the candidate slots of every example, scores summed per slot, best first.
        Every example is traced in one batched forward."""
        facts = [(ex.prompt, ex.answer, subject) for examples, subject in groups for ex in examples]
        traced = trace_facts(self.model, self.codec, facts, opts.use_subject)
        layers = self._layer_filter(opts.layers)
        out, k = [], 0
        for examples, subject in groups:
            total: dict[tuple[str, int], SlotScore] = {}
            for ex in examples:
                loc = locate(
                    self.model, self.codec, self.search, self.stats, ex.prompt, ex.answer, subject, opts.widen,
                    opts.use_subject, opts.idf_source, layers, traced=traced[k],
                )
                k += 1
                for sc in loc.ranked:
                    cur = total.get((sc.pool, sc.slot))
                    if cur is None:
                        total[(sc.pool, sc.slot)] = SlotScore(sc.pool, sc.slot, sc.score, sc.weight, sc.idf)
                    else:
                        cur.score += sc.score
                        cur.weight += sc.weight
            out.append(sorted(total.values(), key=lambda x: (-x.score, x.pool, x.slot)))
        return out

    def _final_guards(self, pool: str, slots: torch.Tensor, editing: set[str], per_slot: int | None = None) -> Guards:
        """Positions that read ``slots`` in the last memory layer, except the
        documents being edited: each slot's ``per_slot`` strongest background
        readers (default: :attr:`EditOptions.guard_reads`) and every live
        edit's answer positions (see :class:`knowedit.guards.GuardBuilder`)."""
        live = {eid for eid, ev in self._live.items() if ev.kind == "apply"}  # a learn event has no prompt to guard
        for eid in live:
            if eid not in self.guards.live:
                ev = self._live[eid]
                reads = []
                per_request = ev.metrics.get("requests")
                for i, r in enumerate(event_requests(ev)):
                    co = per_request[i]["cophrases"] if per_request else ev.metrics.get("cophrases", [])
                    reads += self.guards.edit_reads([r["prompt"], *co], r["target_new"])
                self.guards.live.add(eid, reads)
        k = EditOptions().guard_reads if per_slot is None else per_slot
        return self.guards.build(pool, slots, editing, k, live)

    def edit_many(
        self,
        requests: str | Path | Iterable[Mapping | EditRequest],
        on_edit: Callable[[EditRecord], None] | None = None,
        *,
        resume: bool = False,
        note: str | None = None,
        allow_failed: bool = False,
        on_fail: Callable[[int, EditFailed], None] | None = None,
        batch: int = 1,
        **options: object,
    ) -> list[EditRecord]:
        """Apply EasyEdit-format requests (dicts, :class:`EditRequest` or a JSON/JSONL path) in order.

        Every request is validated before the first edit, so a malformed file changes nothing.
        A request whose edit does not reach its target (:class:`EditFailed`) writes
        nothing; the batch goes on with the rest and raises :class:`BatchFailed`
        at the end, naming every failed request (unless ``allow_failed``).

        Args:
            requests: the requests.
            on_edit: called after each applied edit.
            resume: skip requests that are already live in the ledger (same prompt,
                target and subject): finishes a batch that stopped midway, and
                retries the requests that failed.
            note: free text stored with every edit.
            allow_failed: commit edits that do not reach their targets too.
            on_fail: called with (index, error) for each request that failed (for
                a group, each of its requests that missed its target).
            batch: apply the requests ``batch`` at a time, each group in one
                optimisation and one ledger event (:meth:`edit_batch`); a group
                that fails writes nothing, and its failed requests are named.
            **options: :class:`knowedit.update.EditOptions` fields.

        Returns:
            The applied edits, in order (skipped requests have none).

        Raises:
            BatchFailed: the batch ran to its end but some edits did not reach
                their targets (they wrote nothing; the others are committed).
            BatchError: an edit could not be attempted (e.g. the writer waited
                too long for the ledger): it names the edits applied before it
                and how many are left; the rest of the batch is not attempted.
        """
        reqs = requests_from(requests)
        self._options(options)
        if batch < 1:
            raise EditError(f"batch must be at least 1, got {batch}")
        for i, r in enumerate(reqs):
            try:
                self._check(r)
            except PromptError as err:
                raise EditError(f"request {i}: {err}") from None
        live = self.live_requests() if resume else set()
        out: list[EditRecord] = []
        failed: list[tuple[int, EditFailed]] = []
        todo = [(i, r) for i, r in enumerate(reqs) if _request_key(r) not in live]
        groups = [todo[s : s + batch] for s in range(0, len(todo), batch)]
        for group in groups:
            i, r = group[0]
            try:
                if batch == 1:
                    rec = self.apply(r, note=note, allow_failed=allow_failed, **options)
                else:
                    rec = self.edit_batch([q for _, q in group], note=note, allow_failed=allow_failed, **options)
            except EditFailed as err:
                for j, q in group:  # a failed group writes none of its requests
                    e = err if batch == 1 else EditFailed(str(err), q, err.metrics)
                    failed.append((j, e))
                    if on_fail:
                        on_fail(j, e)
                continue
            except (EditError, LedgerError) as err:
                done = ", ".join(x.id for x in out) or "none"
                left = sum(1 for q in reqs[i:] if _request_key(q) not in live)
                fails = f" {len(failed)} earlier request(s) failed and wrote nothing." if failed else ""
                raise BatchError(
                    f"stopped at request {i + 1} of {len(reqs)} ({r.prompt!r}): {err}. Applied in this run: "
                    f"{len(out)} ({done}).{fails} {left} request(s) not applied: run the same command with "
                    "--resume (edit_many(..., resume=True)) to apply them",
                    applied=out,
                    index=i,
                ) from err
            live.update(_request_key(q) for _, q in group)
            out.append(rec)
            if on_edit:
                on_edit(rec)
        if failed:
            which = "; ".join(
                f"request {i + 1} ({e.request.prompt!r} -> {e.request.target_new!r}, "
                f"probability {e.metrics['prob_after']:.4f})"
                for i, e in failed
            )
            raise BatchFailed(
                f"{len(failed)} of {len(reqs)} edit(s) did not reach their targets and wrote nothing: {which}. "
                f"Applied: {len(out)}. Rerun with more steps and --resume to retry only those, "
                "or keep them with --allow-failed",
                applied=out,
                failed=failed,
            )
        return out

    def live_requests(self) -> set[tuple[str, str, str | None]]:
        """(prompt, target_new, subject) of every live edit."""
        self.refresh()
        return {
            (str(r.get("prompt", "")).strip(), str(r.get("target_new", "")).strip(), r.get("subject"))
            for ev in self._live.values()
            for r in event_requests(ev)
        }

    # -------------------------------------------------------------- revert
    def _dependents(self, ev: Event) -> list[Event]:
        """Later live edits that changed any slot of ``ev`` (transitively), newest first."""
        todo, found = [ev], {}
        while todo:
            cur = todo.pop()
            slots = {(r.pool, r.slot) for r in cur.rows}
            for other in self._live.values():
                if other.seq > cur.seq and other.edit_id not in found and slots & {(r.pool, r.slot) for r in other.rows}:
                    found[other.edit_id] = other
                    todo.append(other)
        return sorted(found.values(), key=lambda e: -e.seq)

    def revert(self, edit_id: str, cascade: bool = False, note: str | None = None) -> list[str]:
        """Restore an edit's before rows.

        Args:
            edit_id: the edit to revert.
            cascade: first revert later live edits that changed the same slots, newest first.
            note: free text stored in the ledger.

        Returns:
            The ids reverted, in order.

        Raises:
            EditError: unknown or already reverted id, or later edits in the way without ``cascade``.
        """
        with self._ledger_for_revert(edit_id).transaction() as txn:
            self._sync(txn.events(after_seq=self._seq), txn)
            ev = self._live_apply(edit_id)
            deps = self._dependents(ev)
            if deps and not cascade:
                names = ", ".join(d.edit_id for d in deps)
                raise EditError(f"later edit(s) {names} changed slots of {edit_id}; revert them first or use --cascade")
            order = [txn.get(e.edit_id) for e in (*deps, ev)]  # with their rows
            self._check_revertible(order)
            request = {"cascade_of": edit_id} if deps else None
            appended = [txn.append_revert(e.edit_id, author=self.author, note=note, request=request) for e in order]
        self._after_revert(order, appended)
        return [e.edit_id for e in order]

    def revert_to(self, edit_id: str, note: str | None = None) -> list[str]:
        """Return to the state right after edit ``edit_id``: revert every later live edit, newest first."""
        with self._ledger_for_revert(edit_id).transaction() as txn:
            self._sync(txn.events(after_seq=self._seq), txn)
            ev = self._live_apply(edit_id)
            order = [txn.get(e.edit_id) for e in sorted((e for e in self._live.values() if e.seq > ev.seq), key=lambda e: -e.seq)]
            self._check_revertible(order)
            appended = [txn.append_revert(e.edit_id, author=self.author, note=note, request={"revert_to": edit_id}) for e in order]
        self._after_revert(order, appended)
        return [e.edit_id for e in order]

    def _ledger_for_revert(self, edit_id: str) -> Ledger:
        """The ledger (a revert never creates one: with no ledger, no id is known)."""
        led = self._reader_ledger()
        if led is None:
            raise EditError(f"unknown edit id {edit_id!r}: no edit has been applied yet (no ledger at {self.ledger_url})")
        return led

    def _live_apply(self, edit_id: str) -> Event:
        ev = self._applies.get(edit_id)
        if ev is None:
            raise EditError(f"unknown edit id {edit_id!r}")
        if edit_id not in self._live:
            raise EditError(f"edit {edit_id} is already reverted")
        return ev

    def _check_revertible(self, order: list[Event]) -> None:
        """The live rows must equal each edit's after rows (reverting in ``order``)."""
        state: dict[tuple[str, int], torch.Tensor] = {}
        for ev in order:
            for r in ev.rows:
                cur = state.get((r.pool, r.slot), self.pools[r.pool][r.slot].detach().cpu())
                if not _same(cur, r.after):
                    raise EditError(
                        f"live row {r.pool}[{r.slot}] differs from edit {ev.edit_id}'s after row; run `knowedit ledger verify`"
                    )
                state[(r.pool, r.slot)] = r.before

    def _after_revert(self, order: list[Event], appended: list[Event]) -> None:
        """Committed: restore the rows and the bookkeeping."""
        for ev, rev in zip(order, appended):
            self._write(ev.rows, "before")
            self._live.pop(ev.edit_id, None)
            if self._guard_builder is not None:
                self._guard_builder.live.discard(ev.edit_id)
            self._seq = rev.seq

    # ------------------------------------------------------------ learning
    @contextmanager
    def learning(self) -> Iterator[LearningSession]:
        """A learning run on the live model: train value rows of ``self.model`` in
        place, commit what changed as ``learn`` events (:meth:`LearningSession.commit`).

        Leaving the block, normally or by an exception, restores every row changed
        since the last commit, so uncommitted learning never outlives the run.
        """
        if self._learning is not None:
            raise EditError("a learning session is already open on this Editor")
        self.refresh()
        session = LearningSession(self)
        self._learning = session
        try:
            yield session
        finally:
            session.discard()
            self._learning = None
            self._drop_caches()

    # ------------------------------------------------------------- history
    def history(self) -> list[Event]:
        """Every ledger event, oldest first (``[]`` before the first edit)."""
        led = self._reader_ledger()
        return led.events() if led is not None else []

    def live_edits(self) -> list[str]:
        """Ids of the live (applied, not reverted) edits, oldest first."""
        self.refresh()
        return [e.edit_id for e in sorted(self._live.values(), key=lambda e: e.seq)]

    def verify(self) -> list[str]:
        """Check the hash chain, replay every event from the base, and compare with the live rows.

        Returns:
            Problems found (empty when the ledger and the model agree).
        """
        self.refresh()
        led = self._reader_ledger()
        if led is None:
            return []
        # The live rows reflect the events up to ``seen``; another process may commit
        # more while this runs. Those are replayed and checked too, but the live rows
        # are compared with the replay as of ``seen``, not with edits they cannot hold.
        seen = self._seq
        problems = list(led.verify_chain())
        state = {name: v.clone() for name, v in self.base.items()}
        applies: dict[str, Event] = {}
        compared = False
        for ev in led.events():
            if ev.seq > seen and not compared:
                problems += self._compare_live(state)
                compared = True
            applied = ev.kind in APPLY_KINDS
            rows = ev.rows if applied else applies.get(ev.edit_id, ev).rows
            src, dst = ("before", "after") if applied else ("after", "before")
            for r in rows:
                if not _same(state[r.pool][r.slot], getattr(r, src)):
                    problems.append(f"event {ev.seq} ({ev.kind} {ev.edit_id}): row {r.pool}[{r.slot}] does not match its recorded {src} row")
                state[r.pool][r.slot] = getattr(r, dst)
            if applied:
                applies[ev.edit_id] = ev
        if not compared:
            problems += self._compare_live(state)
        return problems

    def _compare_live(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Problems where the live rows differ from the replayed ``state``."""
        problems = []
        for name, v in self.pools.items():
            diff = (~_eq_rows(v.detach().cpu(), state[name])).nonzero().flatten()
            if diff.numel():
                problems.append(f"live model differs from base + ledger replay in {diff.numel()} row(s) of {name}, e.g. {diff[:5].tolist()}")
        return problems

    def save(self, out_dir: str | Path, *, corpus: bool = True) -> Path:
        """Write the live model (base + live edits) as a new, self-contained checkpoint directory.

        The directory gets the weights, config and tokenizer, a copy of the
        training corpus (``corpus.jsonl``, so its background slot statistics can
        be rebuilt: the first :meth:`open` builds them, or ``knowedit stats``)
        and ``provenance.json``: the source directory, its fingerprint, the ledger
        and its head (seq and hash) and the live edit ids that went into the
        weights. It has no ledger: its first edit creates one, with no events,
        against the new weights' fingerprint. (The ledger has no field for
        provenance; ``provenance.json`` carries it.)

        It is written into a temporary directory beside ``out_dir`` and renamed
        into place, so ``out_dir`` is either complete or not there.

        Args:
            out_dir: a new directory (or an empty one); never the source.
            corpus: copy the source's ``corpus.jsonl`` when it has one.

        Returns:
            ``out_dir``.

        Raises:
            EditError: ``out_dir`` is the source, or exists and is not an empty directory.
            FileAccessError: the directory cannot be written (nothing is left behind); an OSError.
        """
        import json
        import shutil
        import tempfile
        from datetime import datetime, timezone

        from knowedit.checkpoint import MODEL_FILE, _umask, model_fingerprint, plain_file_mode

        out = Path(out_dir)
        if out.resolve() == self.ck.path.resolve():
            raise EditError("save to a new directory: the base checkpoint is what the ledger replays onto")
        if out.exists() and not (out.is_dir() and not any(out.iterdir())):
            raise EditError(f"{out} already exists; export into a new (or empty) directory")
        self.refresh()
        led = self._reader_ledger()
        head = led.events(after_seq=self._seq - 1)[-1] if led is not None and self._seq > 0 else None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        except (FileExistsError, NotADirectoryError):
            raise FileAccessError(f"cannot write {out}: {out.parent} is not a directory") from None
        except OSError as err:
            raise FileAccessError(f"cannot write {out}: {err.strerror or err}") from None
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
            save_checkpoint(tmp, self.model, self.codec)
            src_corpus = self.ck.path / CORPUS_FILE
            copied = corpus and src_corpus.is_file()
            if copied:
                shutil.copyfile(src_corpus, tmp / CORPUS_FILE)
                os.chmod(tmp / CORPUS_FILE, plain_file_mode())
            live = sorted(self._live.values(), key=lambda e: e.seq)
            provenance = {
                "format": "knowedit-provenance/v1",
                "fingerprint": model_fingerprint(tmp / MODEL_FILE),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                # Flat, with the names a dense `knowedit learn` report uses for the same things.
                "source": str(self.ck.path.resolve()),
                "source_fingerprint": self.ck.fingerprint,
                "source_ledger": led.url if led is not None else None,
                "source_ledger_seq": self._seq,
                "source_ledger_head_hash": head.hash if head is not None else None,
                "live_edits": [e.edit_id for e in live],
                "live_kinds": {e.edit_id: e.kind for e in live},
                "corpus": CORPUS_FILE if copied else None,
            }
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
            os.chmod(tmp / PROVENANCE_FILE, plain_file_mode())
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError) and not isinstance(err, KnoweditError):
                raise FileAccessError(f"cannot write {out}: {err.strerror or err}") from None
            raise
        return out

    def score(self, examples: list[Example]) -> dict[str, list]:
        """Teacher-forced scores of the live model (see :func:`knowedit.inference.teacher_forced`)."""
        return teacher_forced(self.model, self.codec, examples)


class LearningSession:
    """A learning run's hold on an :class:`Editor` (from :meth:`Editor.learning`).

    The run trains the memory value rows of ``editor.model`` in place; every
    other parameter must stay as it is. :meth:`commit` turns the rows that
    differ bitwise from the last commit (or the start) into one ledger
    ``learn`` event with their exact before/after rows. The session keeps a
    copy of the value pools as of the last commit (memory: one more copy of the
    value tables) and of the other parameters.
    """

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        self._snapshot = {name: v.detach().clone() for name, v in editor.pools.items()}
        values = {id(p) for p in editor.model.value_parameters()}
        self._dense = {n: p.detach().clone() for n, p in editor.model.named_parameters() if id(p) not in values}
        self._conflicts: dict[tuple[str, int], str] = {}
        self.commits: list[EditRecord] = []

    def _external_write(self, pool: str, slot: int, event: str) -> None:
        """Another event is about to write a row: a conflict if this run changed it."""
        live, snap = self.editor.pools[pool][slot].detach(), self._snapshot[pool][slot]
        if not _same(live.cpu(), snap.cpu()):
            self._conflicts.setdefault((pool, int(slot)), event or "another event")

    def changed(self) -> dict[str, torch.Tensor]:
        """pool -> sorted slot ids whose live row differs from the last commit."""
        out = {}
        for name, v in self.editor.pools.items():
            ids = (~_eq_rows(v.detach().cpu(), self._snapshot[name].cpu())).nonzero().flatten()
            if ids.numel():
                out[name] = ids
        return out

    def _check_dense(self) -> None:
        params = dict(self.editor.model.named_parameters())
        for name, before in self._dense.items():
            if not _same(params[name].detach().cpu(), before.cpu()):
                raise EditError(
                    f"the learning run changed {name}, which is not a memory value row; only value "
                    "rows are recorded in the ledger (use a dense method with an output directory)"
                )

    def commit(
        self, request: dict, settings: dict, metrics: dict, note: str | None = None, method: str = "sparse"
    ) -> EditRecord:
        """Record every value row changed since the last commit as one ``learn`` event.

        Other writers' new events are replayed first, in the same transaction; if
        one of them changed a row this run changed, nothing is committed.

        Returns:
            The :class:`EditRecord` of the event (id ``l...``, slots, metrics).

        Raises:
            EditError: nothing changed, a non-value parameter changed, or a conflict.
        """
        ed = self.editor
        if ed._learning is not self:
            raise EditError("this learning session has ended")
        self._check_dense()
        if self._conflicts:
            raise self._conflict_error()
        if not self.changed():
            raise EditError("nothing to commit: no value row changed since the last commit")
        with ed._writable_ledger().transaction() as txn:
            ed._sync(txn.events(after_seq=ed._seq), txn)
            if self._conflicts:
                raise self._conflict_error()
            changed = self.changed()
            rows = [
                RowChange(pool, int(slot), self._snapshot[pool][slot].detach().cpu().clone(), ed.pools[pool][slot].detach().cpu().clone())
                for pool, ids in changed.items()
                for slot in ids.tolist()
            ]
            ev = txn.append_apply(
                request=request, method=method, settings=settings, metrics=metrics, rows=rows,
                author=ed.author, note=note, kind="learn",
            )
        # Committed: the rows are already live; the bookkeeping follows.
        for r in ev.rows:
            self._snapshot[r.pool][r.slot] = r.after.to(self._snapshot[r.pool].device)
        ed._remember(ev)
        ed._seq = ev.seq
        ed._drop_caches()
        rec = EditRecord(ev.edit_id, "", "", None, [(r.pool, r.slot) for r in ev.rows], dict(metrics), [], ev.seq)
        self.commits.append(rec)
        return rec

    def _conflict_error(self) -> EditError:
        (pool, slot), event = next(iter(self._conflicts.items()))
        return EditError(
            f"{event}, committed by another writer during this learning run, changed "
            f"{len(self._conflicts)} row(s) the run had changed (e.g. {pool}[{slot}]); the uncommitted "
            "part of the run is discarded"
        )

    def discard(self) -> None:
        """Restore every row (and parameter) changed since the last commit."""
        ed = self.editor
        with torch.no_grad():
            for pool, ids in self.changed().items():
                ed.pools[pool][ids] = self._snapshot[pool][ids].to(ed.pools[pool].device)
            params = dict(ed.model.named_parameters())
            for name, before in self._dense.items():
                if not _same(params[name].detach().cpu(), before.cpu()):
                    params[name].copy_(before)


_NO_ROW = torch.empty(0)


def _slim(ev: Event) -> Event:
    """``ev`` as the editor keeps a live edit: which rows it changed (pool, slot),
    its request and its co-phrasings. The rows themselves, the settings and the
    rest of the metrics stay in the ledger: 10,000 CounterFact edits would
    otherwise hold over a gigabyte of rows, and their metrics (which list every
    conflict) about 30 KB a CounterFact edit."""
    metrics: dict = {}
    if "cophrases" in ev.metrics:
        metrics["cophrases"] = ev.metrics["cophrases"]
    if isinstance(ev.metrics.get("requests"), list):
        metrics["requests"] = [{"cophrases": q.get("cophrases", [])} for q in ev.metrics["requests"]]
    return replace(
        ev, settings={}, metrics=metrics,
        rows=[RowChange(sys.intern(r.pool), r.slot, _NO_ROW, _NO_ROW) for r in ev.rows],
    )  # fmt: skip


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _eq_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) bool: rows of ``a`` and ``b`` that are bitwise equal."""
    return (a.contiguous().view(torch.uint8) == b.contiguous().view(torch.uint8)).all(-1)


__all__ = ["CORPUS_FILE", "PROVENANCE_FILE", "STATS_DOCS_FILE", "build_stats", "BatchError", "BatchFailed", "EditError", "EditFailed", "EditOptions", "EditRecord", "Editor", "LearningSession", "LedgerError"]
