"""The Lightning recipe that trains a retrofitted model's memory layers on a corpus.

``knowedit train-memory MODEL_DIR --data FILE --out DIR [KEY=VALUE ...]`` reads a
:class:`MemoryTrainConfig` (defaults < ``--config`` YAML < overrides), loads a
checkpoint written by ``knowedit retrofit``, and trains with
:class:`knowedit.recipes.train.MemoryLMModule`, the same module ``knowedit train``
uses: manual optimisation, AdamW for the memory's keys, queries, gate and output
projection at ``optim.lr``, the memory values with their own sparse optimizer at
``optim.value_lr``, warmup + cosine schedule, Lightning's progress bar, early
stopping at ``stop_at_accuracy`` and the resume checkpoint
``OUT/checkpoints/last.ckpt`` (``--resume``; loaded with ``weights_only=True``).

The base weights are frozen unless ``train_base=true``. The corpus is any file
``knowedit learn`` reads: plain text, JSONL of ``{"text"}`` or ``{"prompt",
"answer"}``, or EasyEdit records (their true facts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from knowedit.config import OptimConfig, load_config
from knowedit.errors import KnoweditError

REPORT_FILE = "train_report.json"
RESUME_FILE = "checkpoints/last.ckpt"
CORPUS_FILE = "corpus.jsonl"


class MemoryTrainError(KnoweditError, ValueError):
    """A setting or input the memory-training recipe cannot use."""


@dataclass
class SourceInfo:
    """What the run trains (compared on ``--resume``)."""

    fingerprint: str = ""
    """The input checkpoint's fingerprint (base + memory)."""


@dataclass
class CorpusConfig:
    path: str = ""
    sha256: str = ""
    limit: int = 0
    """Use only the first ``limit`` examples (0: all)."""
    batch_size: int = 32
    length_buckets: int = 1
    """Run each batch as this many parts of rows of like length (as ``knowedit train``'s
    ``data.length_buckets``: the same gradient, less padding)."""
    answer_only_loss: bool = False
    """Score only the answers (a plain document is scored after its first word either way)."""


@dataclass
class MemoryTrainConfig:
    """One memory-training run (``knowedit train-memory``)."""

    name: str = "retrofit"
    seed: int = 0
    model: SourceInfo = field(default_factory=SourceInfo)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, value_lr=1.0, warmup_steps=20, value_optimizer="sparse_sgd"))
    """``lr``: the memory's keys, queries, gate and output projection (and the base with
    ``train_base``); ``value_lr``: the memory values, with ``value_optimizer``."""
    train_base: bool = False
    balance: bool = True
    """After training, move scale from each memory's values into its output projection
    until that matches the block MLP's (the function is unchanged), so the editor's
    default step sizes move the logits as on a native model (:meth:`RetrofitLM.balance_memory`)."""
    """Also train the base model's weights (AdamW at ``optim.lr``); frozen by default."""
    max_epochs: int = 20
    max_steps: int = -1
    max_minutes: float = 0.0
    stop_at_accuracy: float = 1.01
    """Stop once teacher-forced exact accuracy on (a sample of) the corpus reaches this."""
    accelerator: str = "auto"
    threads: int = 0
    precision: str = "32-true"
    logger: str = "csv"
    checkpoint_every_n_epochs: int = 1
    trainer: dict[str, Any] = field(default_factory=dict)
    out: str = ""


def load_memory_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MemoryTrainConfig:
    try:
        return load_config(MemoryTrainConfig, path, overrides)  # type: ignore[return-value]
    except ValueError as err:
        raise MemoryTrainError(str(err)) from None


def _module_class(base: type) -> type:
    """:class:`MemoryLMModule` whose resume check fails as a :class:`MemoryTrainError`."""

    class RetrofitMemoryModule(base):  # type: ignore[misc, valid-type]
        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            try:
                super().on_load_checkpoint(checkpoint)
            except ValueError as err:
                raise MemoryTrainError(str(err)) from None

    return RetrofitMemoryModule


def train_memory(model_dir: str | Path, data: str | Path, cfg: MemoryTrainConfig, progress: bool = True, resume: bool = False) -> dict:
    """Train the memory layers of the retrofitted checkpoint ``model_dir`` on ``data``;
    write the trained checkpoint to ``cfg.out``.

    Raises:
        MemoryTrainError, CheckpointError, DataError: one line; on a bad input nothing is written.
    """
    import lightning as L

    from knowedit.checkpoint import file_sha256, load_checkpoint, save_checkpoint
    from knowedit.data import write_jsonl
    from knowedit.data.documents import load_learning_data
    from knowedit.inference import encode_examples, greedy_exact, teacher_forced
    from knowedit.recipes.train import (
        EpochShuffle,
        MemoryLMModule,
        _AtomicCheckpointIO,
        _callbacks,
        _logger,
        _quiet_lightning,
        check_accelerator,
        check_fit,
        check_settings,
    )

    t0 = time.monotonic()
    out = Path(cfg.out)
    src = Path(model_dir)
    if not cfg.out:
        raise MemoryTrainError("give --out DIR for the trained checkpoint")
    if out.resolve() == src.resolve():
        raise MemoryTrainError("--out must be a new directory: the input checkpoint (and its ledger) stay as they are")
    if resume and not (out / RESUME_FILE).is_file():
        raise MemoryTrainError(f"nothing to resume: {out / RESUME_FILE} does not exist")
    if not resume and out.exists() and any(out.iterdir()):
        raise MemoryTrainError(f"{out} already exists; train into a new (or empty) directory, or pass --resume")
    ck = load_checkpoint(src)
    model = ck.model
    if not getattr(model, "is_retrofit", False):
        raise MemoryTrainError(f"{src} is not a retrofitted checkpoint (train native models with knowedit train)")
    try:
        check_settings(cfg)  # type: ignore[arg-type]
        check_accelerator(cfg.accelerator)
    except ValueError as err:
        raise MemoryTrainError(str(err)) from None
    if cfg.threads < 0:
        raise MemoryTrainError(f"threads must be >= 0, got {cfg.threads}")
    examples, fmt = load_learning_data(data)
    examples = examples[: cfg.data.limit or None]
    try:
        check_fit(examples, ck.codec, ck.cfg.max_seq_len)
    except ValueError as err:
        raise MemoryTrainError(str(err)) from None
    cfg.model.fingerprint = ck.fingerprint
    cfg.data.path = str(Path(data).resolve())
    cfg.data.sha256 = file_sha256(Path(data))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _quiet_lightning()
    L.seed_everything(cfg.seed, verbose=False)
    eval_sample = examples if len(examples) <= 4000 else random.Random(cfg.seed).sample(examples, 4000)
    model.train_base = cfg.train_base
    for p in model.hf.parameters():
        p.requires_grad_(cfg.train_base)
    codec, max_len, answer_only = ck.codec, ck.cfg.max_seq_len, cfg.data.answer_only_loss
    loader = torch.utils.data.DataLoader(
        examples, batch_size=cfg.data.batch_size, sampler=EpochShuffle(len(examples), cfg.seed),
        collate_fn=lambda exs: encode_examples(codec, exs, max_len, answer_only),
    )
    settings = {"devices": 1, **cfg.trainer}
    try:
        trainer = L.Trainer(
            max_epochs=cfg.max_epochs, max_steps=cfg.max_steps,
            max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
            accelerator=cfg.accelerator, precision=cfg.precision, logger=_logger(cfg, out),  # type: ignore[arg-type]
            callbacks=_callbacks(cfg, out, len(eval_sample)),  # type: ignore[arg-type]
            enable_checkpointing=bool(cfg.checkpoint_every_n_epochs), plugins=[_AtomicCheckpointIO()],
            enable_progress_bar=progress, enable_model_summary=settings.pop("enable_model_summary", False),
            log_every_n_steps=settings.pop("log_every_n_steps", 10), **settings,
        )
    except Exception as err:  # noqa: BLE001 - Lightning raises many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MemoryTrainError(f"cannot train with these settings: {first}") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MemoryTrainError(f"cannot create --out {out}: {err.strerror or err}") from None
    # The base stays in eval mode on purpose (no dropout): Lightning's notice about it is noise.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    module = _module_class(MemoryLMModule)(cfg, model, eval_sample, codec)  # type: ignore[arg-type]
    model.train()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(out / RESUME_FILE) if resume else None, weights_only=True)
    model = module.model.cpu().eval()
    balanced = model.balance_memory() if cfg.balance else {}
    train_seconds = time.monotonic() - t0
    # The checkpoint's files are written beside OUT and moved in at the end.
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".ckpt.", suffix=".tmp"))
    try:
        save_checkpoint(tmp, model, codec)
        write_jsonl(tmp / CORPUS_FILE, [asdict(e) for e in examples])
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tf = teacher_forced(model, codec, eval_sample)
    report = {
        "name": cfg.name, "source": str(src), "data": str(data), "format": fmt, "examples": len(examples),
        "train_teacher_forced_accuracy": sum(tf["exact"]) / max(1, len(tf["exact"])),
        "train_greedy_accuracy": sum(greedy_exact(model, codec, eval_sample[:1000])) / max(1, min(1000, len(eval_sample))),
        "epochs": trainer.current_epoch, "steps": trainer.global_step, "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(), "train_base": cfg.train_base,
        "balance": {k: round(v, 3) for k, v in balanced.items()},
        "memory_parameters": sum(p.numel() for p in model.memories.parameters()),
        "base_parameters": sum(p.numel() for p in model.hf.parameters()),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report
