"""The Lightning continual-learning recipe: a trained memory LM absorbs new knowledge.

``knowedit learn --model DIR --data FILE [KEY=VALUE ...]`` resolves a
:class:`~knowedit.config.LearnConfig` and calls :func:`learn`.

- ``sparse`` (default), sparse memory finetuning (Lin et al. 2025, "Continual
  Learning via Sparse Memory Finetuning"): per batch, the slots the batch reads
  where it predicts scored tokens are ranked by
  ``tf(i) * log((|B| + 1) / (df(i) + 1))`` (``tf``: the slot's share of the
  batch's reads; ``df``: background documents that read it, from the model's
  slot statistics), and only the top-``top_t`` value rows of each pool get
  their gradient; every other weight is frozen. The run trains the live model
  (base + live edits) in place and commits what changed as ``learn`` events in
  the ledger (every ``commit_every`` steps and at the end), each with the exact
  before/after rows, so ``knowedit edit revert`` undoes it bit for bit. A run
  killed between commits leaves the model as of its last commit.
- ``ft``, ``ft-memory``, ``lora``: dense baselines that change too many weights
  to record as rows; they write a new checkpoint directory (``--out``) and
  leave the model directory and its ledger as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from knowedit.baselines import LoRA, lora_targets
from knowedit.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from knowedit.config import LearnConfig, learn_lr
from knowedit.data.documents import DataError, load_learning_data
from knowedit.data.records import Example
from knowedit.editor import Editor, LearningSession
from knowedit.errors import FileAccessError, OptionError
from knowedit.inference import Batch, PromptError, encode_examples, encode_pair, greedy_exact
from knowedit.memory import MemoryTrace
from knowedit.model import MemoryLM
from knowedit.side_files import CORPUS_FILE
from knowedit.stats import SlotStats
from knowedit.tokenizer import TextCodec

REPORT_FILE = "learn_report.json"


def batch_plan(n: int, cfg: LearnConfig) -> list[list[int]]:
    """The run's batches as example indices: a seeded shuffle per epoch.

    Deterministic from ``cfg.seed``, so a resumed run continues with exactly
    the batches the interrupted one had not committed.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    plan: list[list[int]] = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g).tolist()
        plan += [perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return plan[: cfg.max_steps] if cfg.max_steps > 0 else plan


def run_id(data_sha256: str, cfg: LearnConfig) -> str:
    """Identity of a run: its data and every setting but the commit cadence and threads."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("commit_every", "threads")}
    blob = json.dumps([data_sha256, settings], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tfidf_rows(
    trace: Sequence[MemoryTrace],
    scored: torch.Tensor,
    top_t: int,
    idf: dict[str, torch.Tensor] | None,
    n_slots: dict[str, int],
) -> dict[str, torch.Tensor]:
    """The value rows a batch may train: per pool, the top-``top_t`` slots by TF-IDF.

    Args:
        trace: what each memory layer read for the batch (slots (B, T, H, k)).
        scored: (B, T) bool, positions whose next token is in the loss.
        top_t: rows per pool.
        idf: pool -> (N,) ``log((|B| + 1) / (df + 1))``, or None for tf alone.
        n_slots: pool -> N.

    Returns:
        pool -> sorted int64 slot ids (at most ``top_t``; only slots the batch read).
    """
    counts: dict[str, torch.Tensor] = {}
    for tr in trace:
        slots = tr.slots.detach().cpu()
        m = scored[:, :, None, None].expand_as(slots)
        c = torch.bincount(slots[m], minlength=n_slots[tr.pool]).double()
        counts[tr.pool] = counts[tr.pool] + c if tr.pool in counts else c
    out = {}
    for pool, c in counts.items():
        total = c.sum()
        if total == 0:
            continue
        score = c / total
        if idf is not None:
            score = score * idf[pool].double()
        read = (c > 0).nonzero().flatten()
        k = min(top_t, read.numel())
        best = read[score[read].topk(k).indices]  # ties broken by topk's order: deterministic
        out[pool] = best.sort().values
    return out


def _mask_sparse_grad(p: torch.nn.Parameter, keep: torch.Tensor | None) -> None:
    """Leave only the rows ``keep`` (sorted slot ids) in ``p``'s sparse gradient."""
    if p.grad is None:
        return
    if keep is None or keep.numel() == 0:
        p.grad = None
        return
    g = p.grad.coalesce()
    rows = g.indices()[0]
    pos = torch.searchsorted(keep, rows).clamp_(max=keep.numel() - 1)
    hit = keep[pos] == rows
    p.grad = torch.sparse_coo_tensor(rows[hit][None], g.values()[hit], p.shape, is_coalesced=True, check_invariants=False)


def _value_optimizer(params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """An optimizer that takes the lookup's sparse value gradients."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.SparseAdam(params, lr=lr)
    return torch.optim.Adagrad(params, lr=lr)


class LearnModule(L.LightningModule):
    """Continues training a :class:`MemoryLM` by one of the learning methods.

    Args:
        cfg: the run's settings.
        model: the live model (trained in place).
        idf: sparse only: pool -> (N,) background IDF, or None (tf alone).
    """

    def __init__(
        self, cfg: LearnConfig, model: MemoryLM, idf: dict[str, torch.Tensor] | None = None,
        guard_batch: Callable[[dict[str, torch.Tensor]], Batch | None] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.idf = idf
        self.guard_batch = guard_batch
        """sparse with ``guard_docs``: the background documents to keep, given the step's rows."""
        self.lr = learn_lr(cfg)
        self._keep: dict[str, torch.Tensor] = {}
        self.adapters: list[LoRA] = []
        self.rows_trained: dict[str, set[int]] = {}
        self.losses: list[float] = []
        self.n_slots = {p.name: p.n_slots for p in model.pools.values()}
        self.pool_params = {p.name: p.values for p in model.pools.values()}
        trainable = {
            "sparse": set(map(id, model.value_parameters())),
            "ft-memory": set(map(id, model.value_parameters())),
            "ft": set(map(id, model.parameters())),
            "lora": set(),
        }[cfg.method]
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        if cfg.method == "lora":
            g = torch.Generator().manual_seed(cfg.seed)
            self.adapters = [LoRA(lin, cfg.rank, cfg.alpha, g) for lin in lora_targets(model).values()]

    def on_fit_start(self) -> None:
        self.model.train()  # the Editor keeps it in eval mode

    def configure_optimizers(self) -> torch.optim.Optimizer:
        m = self.cfg.method
        if m in ("sparse", "ft-memory"):
            return _value_optimizer(self.model.value_parameters(), self.cfg.optimizer, self.lr)
        if m == "ft":  # the value gradients are made dense in on_before_optimizer_step
            return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        return torch.optim.AdamW([t for a in self.adapters for t in (a.A, a.B)], lr=self.lr, weight_decay=0.0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        trace: list[MemoryTrace] | None = [] if self.cfg.method == "sparse" else None
        logits, targets = self.model.target_logits(batch.ids, batch.targets, trace)  # the head where scored
        loss = F.cross_entropy(logits, targets)
        if trace is not None:
            if self.cfg.positions == "answer":
                counted = batch.targets != -100
            else:  # every token of every sequence (not the padding)
                counted = torch.arange(batch.ids.shape[1], device=batch.ids.device)[None] < (batch.answer_start + batch.answer_len)[:, None]
            self._keep = tfidf_rows(trace, counted.cpu(), self.cfg.top_t, self.idf, self.n_slots)
        self.losses.append(float(loss.detach()))
        self.log("loss", loss, prog_bar=True, on_step=True)
        guards = self.guard_batch(self._keep) if trace is not None and self.guard_batch is not None else None
        if guards is not None:  # the background documents that read these rows keep their answers
            guards = guards.to(batch.ids.device)
            g_logits, g_targets = self.model.target_logits(guards.ids, guards.targets)
            g_loss = F.cross_entropy(g_logits, g_targets)
            self.log("guard_loss", g_loss, on_step=True)
            return loss + self.cfg.guard_weight * g_loss
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """sparse: keep only the batch's top-t rows of each pool's gradient; ft: densify it."""
        for pool, p in self.pool_params.items():
            if self.cfg.method == "sparse":
                rows = self._keep.get(pool)
                _mask_sparse_grad(p, None if rows is None else rows.to(p.device))
                if rows is not None:
                    self.rows_trained.setdefault(pool, set()).update(rows.tolist())
            elif self.cfg.method == "ft" and p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()

    def merge_adapters(self) -> None:
        """LoRA: fold every adapter into its weight (the model then has no adapters)."""
        for a in self.adapters:
            a.merge()
        self.adapters = []


class LedgerCommits(L.Callback):
    """Commits the sparse run's changed rows as a ``learn`` event every ``every`` steps."""

    def __init__(self, session: LearningSession, every: int, event: Callable[[int], tuple[dict, dict, dict]]) -> None:
        self.session = session
        self.every = every
        self.event = event

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if self.every and trainer.global_step % self.every == 0 and self.session.changed():
            request, settings, metrics = self.event(trainer.global_step)
            self.session.commit(request, settings, metrics)


def check_data(examples: list[Example], codec: TextCodec, max_len: int, source: str) -> None:
    """Every example must fit the model's context, before anything is trained or written.

    Raises:
        DataError: naming the first example that does not (its index in the file's order).
    """
    for i, ex in enumerate(examples):
        try:
            encode_pair(codec, ex.prompt, ex.answer, max_len)
        except PromptError as err:
            raise DataError(f"{source}: document {i + 1} ({ex.prompt} {ex.answer[:40]!r}...): {err}") from None


def _trainer(cfg: LearnConfig, steps: int, progress: bool, callbacks: list[L.Callback]) -> L.Trainer:
    from knowedit.recipes.train import _quiet_lightning

    _quiet_lightning()
    return L.Trainer(
        max_steps=steps,
        max_epochs=1,  # the batch plan already spans every epoch
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,  # a sparse run's checkpoints are its ledger commits
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def learn(
    model_dir: str | Path,
    data: str | Path,
    cfg: LearnConfig,
    *,
    ledger: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    author: str | None = None,
    note: str | None = None,
    callbacks: Sequence[L.Callback] = (),
    on_editor: Callable[[Editor], None] | None = None,
) -> dict:
    """Run one learning run (see the module docstring).

    Args:
        model_dir: a checkpoint directory.
        data: the new knowledge (:func:`knowedit.data.documents.load_learning_data`).
        cfg: the run's settings.
        ledger: sparse: the ledger path or URL (default ``model_dir/ledger.db``).
        out: dense methods: the new checkpoint directory (must not exist or be empty).
        resume: sparse: continue the same run (same data and settings) after its last
            live commit instead of starting over.
        progress: show Lightning's progress bar.
        author, note: recorded with each ledger event.
        callbacks: more Lightning callbacks (the benchmark's evaluation curves).
        on_editor: called with the open :class:`Editor` before training (tests, benchmarks).

    Returns:
        The run's report: method, steps, loss, rows changed, acquisition, events, seconds.

    Raises:
        DataError, OptionError: bad data, settings or output directory; nothing was changed.
        EditError: a conflict at commit time (the uncommitted part is discarded).
    """
    t0 = time.monotonic()
    data = Path(data)
    examples, fmt = load_learning_data(data)
    sha = file_sha256(data)
    dense = cfg.method != "sparse"
    if dense:
        if out is None:
            raise OptionError(f"method {cfg.method} changes too many weights for the ledger: give --out DIR for the new checkpoint")
        out = Path(out)
        if out.resolve() == Path(model_dir).resolve():
            raise OptionError("--out must be a new directory, not the model directory")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise OptionError(f"--out {out} exists and is not an empty directory")
        if resume:
            raise OptionError("--resume is for sparse runs (their commits are in the ledger); dense runs start over")
    elif out is not None:
        raise OptionError("--out is for the dense methods (ft, ft-memory, lora); a sparse run commits to the ledger")
    ck = load_checkpoint(model_dir)  # read-only: check the data before anything is written
    check_data(examples, ck.codec, ck.cfg.max_seq_len, str(data))
    prior_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with Editor.open(model_dir, ledger=ledger, author=author) as ed:
            if on_editor is not None:
                on_editor(ed)
            if dense:
                return _learn_dense(ed, examples, cfg, out, fmt, sha, data, progress, callbacks, t0)  # type: ignore[arg-type]
            return _learn_sparse(ed, examples, cfg, fmt, sha, data, resume, progress, note, callbacks, t0)
    finally:
        torch.set_num_threads(prior_threads)


def _loader(ed: Editor, examples: list[Example], plan: list[list[int]], cfg: LearnConfig) -> DataLoader:
    max_len = ed.model.cfg.max_seq_len
    return DataLoader(
        examples,
        batch_sampler=plan,
        collate_fn=lambda exs: encode_examples(ed.codec, exs, max_len, cfg.answer_only_loss),
    )


def _idf(ed: Editor, cfg: LearnConfig, model_dir: Path) -> dict[str, torch.Tensor] | None:
    if cfg.background == "none":
        return None
    stats: SlotStats | None = ed.stats
    if stats is None:
        raise OptionError(
            f"{model_dir} has no slot statistics and no {CORPUS_FILE} to compute them from: run "
            f"`knowedit stats --model {model_dir} --corpus FILE`, or learn with background=none"
        )
    return {pool: stats.idf(pool, "any" if cfg.background == "stats" else "answer") for pool in stats.df}


def _guard_source(
    ed: Editor, examples: list[Example], cfg: LearnConfig
) -> Callable[[dict[str, torch.Tensor]], Batch | None] | None:
    """``guard_docs``: per step, the background documents that read the step's
    chosen rows at their answer positions with the most weight (documents with
    a prompt of the new data are left out: those are meant to change)."""
    if cfg.guard_docs <= 0:
        return None
    stats, docs = ed.stats, ed.docs
    if stats is None or not docs:
        raise OptionError(
            f"guard_docs needs the model's background documents: {ed.ck.path} has no {CORPUS_FILE} "
            "and no slot statistics (run `knowedit stats`), or learn with guard_docs=0"
        )
    new = {e.prompt.strip() for e in examples}
    max_len = ed.model.cfg.max_seq_len

    def guard_batch(keep: dict[str, torch.Tensor]) -> Batch | None:
        weight = torch.zeros(len(docs))
        for pool, rows in keep.items():
            if pool in stats.inv_ptr and rows.numel():
                _, doc, _, w = stats.reads(pool, rows.cpu())
                weight.index_add_(0, doc, w.float())
        order = torch.argsort(weight, descending=True, stable=True)
        chosen = []
        for d in order[: 4 * cfg.guard_docs].tolist():
            if weight[d] <= 0 or len(chosen) == cfg.guard_docs:
                break
            if docs[d].prompt.strip() not in new:
                chosen.append(docs[d])
        return encode_examples(ed.codec, chosen, max_len, cfg.answer_only_loss) if chosen else None

    return guard_batch


def _acquisition(model: MemoryLM, codec: TextCodec, examples: list[Example]) -> float:
    model.eval()
    hits = greedy_exact(model, codec, examples)
    return sum(hits) / len(hits)


def _learn_sparse(
    ed: Editor, examples: list[Example], cfg: LearnConfig, fmt: str, sha: str, data: Path,
    resume: bool, progress: bool, note: str | None, callbacks: Sequence[L.Callback], t0: float,
) -> dict:
    idf = _idf(ed, cfg, ed.ck.path)
    rid = run_id(sha, cfg)
    plan = batch_plan(len(examples), cfg)
    done = 0
    if resume:
        live = set(ed.live_edits())
        done = max(
            (int(ev.request.get("step_to", 0)) for ev in ed.history()
             if ev.kind == "learn" and ev.edit_id in live and ev.request.get("run") == rid),
            default=0,
        )
    report = {"method": "sparse", "run": rid, "data": str(data), "format": fmt, "documents": len(examples),
              "steps_planned": len(plan), "resumed_from_step": done, "events": []}
    if done >= len(plan):
        report.update(steps=0, note="nothing to do: this run is already committed in full", seconds=round(time.monotonic() - t0, 2))
        return report
    settings = asdict(cfg)
    settings["lr"] = learn_lr(cfg)
    module = LearnModule(cfg, ed.model, idf, _guard_source(ed, examples, cfg))
    last = {"step": done, "loss_at": 0, "t": time.monotonic()}

    def event(step: int) -> tuple[dict, dict, dict]:
        absolute = done + step
        losses = module.losses[last["loss_at"]:]
        request = {"data": data.name, "data_sha256": sha, "format": fmt, "documents": len(examples),
                   "run": rid, "step_from": last["step"], "step_to": absolute, "steps_planned": len(plan)}
        metrics = {"steps": absolute - last["step"], "loss_mean": sum(losses) / max(1, len(losses)),
                   "seconds": round(time.monotonic() - last["t"], 3)}
        last.update(step=absolute, loss_at=len(module.losses), t=time.monotonic())
        return request, settings, metrics

    with ed.learning() as session:
        commits = LedgerCommits(session, cfg.commit_every, event)
        trainer = _trainer(cfg, len(plan) - done, progress, [commits, *callbacks])
        trainer.fit(module, train_dataloaders=_loader(ed, examples, plan[done:], cfg))
        ed.model.eval()
        report["acquisition"] = _acquisition(ed.model, ed.codec, examples)
        if session.changed():
            request, settings_, metrics = event(trainer.global_step)
            metrics["acquisition"] = report["acquisition"]
            session.commit(request, settings_, metrics, note=note)
        report["events"] = [r.id for r in session.commits]
        report["rows_changed"] = sum(len(r.slots) for r in session.commits)
    for p in ed.model.parameters():
        p.requires_grad_(True)
    report.update(steps=trainer.global_step, loss_final=module.losses[-1] if module.losses else None,
                  rows_trained_per_pool={p: len(s) for p, s in module.rows_trained.items()},
                  seconds=round(time.monotonic() - t0, 2))
    return report


def _learn_dense(
    ed: Editor, examples: list[Example], cfg: LearnConfig, out: Path, fmt: str, sha: str, data: Path,
    progress: bool, callbacks: Sequence[L.Callback], t0: float,
) -> dict:
    plan = batch_plan(len(examples), cfg)
    module = LearnModule(cfg, ed.model)
    try:
        trainer = _trainer(cfg, len(plan), progress, list(callbacks))
        trainer.fit(module, train_dataloaders=_loader(ed, examples, plan, cfg))
        module.merge_adapters()
        ed.model.eval()
        acquisition = _acquisition(ed.model, ed.codec, examples)
        try:
            out.mkdir(parents=True, exist_ok=True)
            save_checkpoint(out, ed.model, ed.codec)
            if (ed.ck.path / CORPUS_FILE).is_file():  # later edits on the new model keep their guards
                shutil.copyfile(ed.ck.path / CORPUS_FILE, out / CORPUS_FILE)
        except OSError as err:
            raise FileAccessError(f"cannot write --out {out}: {err.strerror or err}") from None
    finally:
        for a in module.adapters:
            a.remove()
        for p in ed.model.parameters():
            p.requires_grad_(True)
    report = {"method": cfg.method, "data": str(data), "data_sha256": sha, "format": fmt, "documents": len(examples),
              "source": str(ed.ck.path), "source_fingerprint": ed.ck.fingerprint, "live_edits": ed.live_edits(),
              "settings": {**asdict(cfg), "lr": learn_lr(cfg)}, "steps": trainer.global_step,
              "loss_final": module.losses[-1] if module.losses else None, "acquisition": acquisition, "out": str(out)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    report["seconds"] = round(time.monotonic() - t0, 2)
    return report
