"""The Lightning training recipe: a memory LM learns a world of facts.

``knowedit train CONFIG [KEY=VALUE ...]`` resolves a :class:`TrainConfig`
(dataclass defaults < YAML < overrides) and calls :func:`train`, which writes
a checkpoint directory (``model.safetensors``, ``config.yaml``,
``tokenizer.json``, ``corpus.jsonl``, ``train_report.json``).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from knowedit.checkpoint import save_checkpoint
from knowedit.config import TrainConfig
from knowedit.data import (
    EditRequest,
    Example,
    load_records,
    make_world,
    true_fact_examples,
    write_jsonl,
)
from knowedit.inference import encode_examples, greedy_exact, teacher_forced
from knowedit.model import MemoryLM, build_model
from knowedit.tokenizer import TextCodec, corpus_texts

CORPUS_FILE = "corpus.jsonl"
HELDOUT_FILE = "heldout.jsonl"
EDITS_FILE = "edits.jsonl"
REPORT_FILE = "train_report.json"


class FactDataModule(L.LightningDataModule):
    """Builds the fact corpus and the tokenizer, and serves padded batches.

    Synthetic worlds keep held-out phrasings and ready-made edit requests;
    an EasyEdit file gives the CounterFact world (all true facts are trained).
    """

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.data
        self.held_out: list[Example] = []
        self.edits: list[EditRequest] = []
        if d.source == "synthetic":
            world = make_world(d.world)
            self.train_ex = world.train_examples()
            self.held_out = world.held_out_examples()
            self.edits = world.edit_requests()
        elif d.source == "easyedit":
            if not d.path:
                raise ValueError("data.source=easyedit needs data.path")
            self.edits = load_records(d.path, limit=d.limit)
            self.train_ex = true_fact_examples(self.edits)
        elif d.source == "documents":
            if not d.path:
                raise ValueError("data.source=documents needs data.path")
            from knowedit.data.documents import load_learning_data

            self.train_ex = load_learning_data(d.path)[0][: d.limit or None]
        else:
            raise ValueError(f"unknown data.source {d.source!r} (synthetic, easyedit or documents)")
        self.codec = TextCodec.train(corpus_texts(self.train_ex), vocab_size=d.vocab_size)

    def train_dataloader(self) -> DataLoader:
        max_len = self.cfg.model.max_seq_len
        answer_only = self.cfg.data.answer_only_loss
        return DataLoader(
            self.train_ex,
            batch_size=self.cfg.data.batch_size,
            shuffle=True,
            collate_fn=lambda exs: encode_examples(self.codec, exs, max_len, answer_only),
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )


class MemoryLMModule(L.LightningModule):
    """Trains a :class:`MemoryLM`; memory values get their own sparse optimizer and lr."""

    def __init__(self, cfg: TrainConfig, model: MemoryLM, eval_examples: list[Example], codec: TextCodec) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.codec = codec
        self.eval_examples = eval_examples
        self.automatic_optimization = False  # two optimizers: dense AdamW + sparse values
        self.train_accuracy = 0.0
        self.started = time.monotonic()

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's union type)
        o = self.cfg.optim
        dense = torch.optim.AdamW(self.model.other_parameters(), lr=o.lr, weight_decay=o.weight_decay)
        opts = [dense]
        if self.model.value_parameters():
            # SparseAdam is lazy: it updates only the rows present in the sparse gradient.
            opts.append(torch.optim.SparseAdam(self.model.value_parameters(), lr=o.value_lr))
        return opts

    def _lr_scale(self) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio`` over the planned steps."""
        o, step = self.cfg.optim, self.global_step
        if o.warmup_steps > 0 and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        total = max(self.trainer.estimated_stepping_batches, o.warmup_steps + 1)
        frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scale = self._lr_scale()
        for opt, base in zip(opts, (self.cfg.optim.lr, self.cfg.optim.value_lr)):
            for g in opt.param_groups:
                g["lr"] = base * scale
        logits = self.model(batch.ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.model.eval()
        ex = self.eval_examples
        self.train_accuracy = sum(teacher_forced(self.model, self.codec, ex)["exact"]) / max(1, len(ex))
        self.model.train()
        self.log("train_acc", self.train_accuracy, prog_bar=True)
        minutes = (time.monotonic() - self.started) / 60
        if self.train_accuracy >= self.cfg.stop_at_accuracy or (
            self.cfg.max_minutes and minutes >= self.cfg.max_minutes
        ):
            self.trainer.should_stop = True


def _logger(cfg: TrainConfig, out: Path):  # noqa: ANN202
    if cfg.logger == "csv":
        return L.pytorch.loggers.CSVLogger(str(out), name="logs")
    if cfg.logger == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(str(out), name="logs")
    if cfg.logger == "none":
        return False
    raise ValueError(f"unknown logger {cfg.logger!r} (csv, tensorboard, none)")


def train(cfg: TrainConfig, progress: bool = True, config_dir: str | Path | None = None) -> dict:
    """Train per ``cfg`` and write the checkpoint directory ``cfg.out``.

    Runs repeat on CPU for a given ``cfg.seed`` and ``cfg.threads``: every random
    generator is seeded, and torch uses ``cfg.threads`` intra-op threads (0: its
    default, which depends on the machine) until training ends.

    Args:
        cfg: the resolved config.
        progress: show Lightning's progress bar.
        config_dir: the recipe file's directory: a relative ``data.path`` that is
            not found from the current directory is looked up there
            (:func:`resolve_data_path`).

    Returns:
        The training report: accuracies, wall time, the thread count, sizes.

    Raises:
        ValueError: an accelerator this machine lacks (naming the usable ones),
            a negative thread count, a data file that is not there (naming the
            ``data.path=`` override), a training example longer than the
            model's context (naming the ``model.max_seq_len=`` override), or a
            setting Lightning refuses; nothing is written then.
    """
    t0 = time.monotonic()
    _quiet_lightning()
    check_accelerator(cfg.accelerator)  # before anything is written
    resolve_data_path(cfg, config_dir)
    if cfg.threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    prior_threads = torch.get_num_threads()
    if cfg.threads:
        # Float reductions split across threads sum in a different order: the same
        # seed gives the same weights only with the same thread count.
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, progress, t0)
    finally:
        torch.set_num_threads(prior_threads)


def _train(cfg: TrainConfig, progress: bool, t0: float) -> dict:
    out = Path(cfg.out)
    try:  # first: a Trainer that cannot be built leaves nothing behind
        trainer = L.Trainer(
            max_epochs=cfg.max_epochs,
            max_steps=cfg.max_steps,
            accelerator=cfg.accelerator,
            devices=1,
            precision=cfg.precision,
            logger=_logger(cfg, out),
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            log_every_n_steps=10,
        )
    except (ImportError, MisconfigurationException) as err:  # what check_accelerator cannot foresee
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot train with accelerator {cfg.accelerator!r} and precision {cfg.precision!r}: {first}"
        ) from None
    L.seed_everything(cfg.seed, verbose=False)
    random.seed(cfg.seed)
    dm = FactDataModule(cfg)
    check_fit(dm.train_ex, dm.codec, cfg.model.max_seq_len)  # before the first step, and before writing
    out.mkdir(parents=True, exist_ok=True)
    cfg.model.vocab_size = dm.codec.vocab_size
    model = build_model(cfg.model, seed=cfg.seed)
    eval_sample = dm.train_ex if len(dm.train_ex) <= 4000 else random.Random(cfg.seed).sample(dm.train_ex, 4000)
    module = MemoryLMModule(cfg, model, eval_sample, dm.codec)
    trainer.fit(module, datamodule=dm)
    model = module.model.cpu().eval()
    train_seconds = time.monotonic() - t0
    save_checkpoint(out, model, dm.codec, cfg)
    write_jsonl(out / CORPUS_FILE, [asdict(e) for e in dm.train_ex])
    if dm.held_out:
        write_jsonl(out / HELDOUT_FILE, [asdict(e) for e in dm.held_out])
    if dm.edits and cfg.data.source == "synthetic":
        write_jsonl(out / EDITS_FILE, [e.to_dict() for e in dm.edits])
    report = {
        "name": cfg.name,
        "facts_trained": len(dm.train_ex),
        "train_greedy_accuracy": _mean(greedy_exact(model, dm.codec, dm.train_ex)),
        "heldout_greedy_accuracy": _mean(greedy_exact(model, dm.codec, dm.held_out)) if dm.held_out else None,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_slots": cfg.model.memory.n_keys**2 if cfg.model.memory_layers else 0,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def resolve_data_path(cfg: TrainConfig, config_dir: str | Path | None = None) -> None:
    """Find ``cfg.data.path`` (for ``easyedit`` and ``documents`` data), in place.

    A path that exists from the current directory is kept; a relative one that
    does not is looked up next to the recipe file (``config_dir``) and, found
    there, replaced by that path (so the saved ``config.yaml`` names the file read).

    Raises:
        ValueError: the file is in neither place; the message names the
            ``data.path=`` override.
    """
    d = cfg.data
    if d.source == "synthetic" or not d.path:
        return  # FactDataModule names a missing data.path
    given = Path(d.path).expanduser()
    if given.exists():
        return
    looked = [str(given.resolve())]
    if not given.is_absolute() and config_dir is not None:
        beside = Path(config_dir) / given
        if beside.exists():
            d.path = str(beside)
            return
        looked.append(str(beside.resolve()))
    raise ValueError(
        f"data.path {d.path!r} not found (looked for {' and '.join(looked)}); "
        "give the file with data.path=/path/to/file"
    )


def check_fit(examples: list[Example], codec: TextCodec, max_len: int) -> None:
    """Every training example must fit the model's context (prompt + answer + eos).

    Raises:
        ValueError: one line naming the longest example, its token count and the
            ``model.max_seq_len=N`` override that makes every example fit.
    """
    longest, worst, too_long = 0, -1, 0
    for i, ex in enumerate(examples):
        n = len(codec.encode_prompt(ex.prompt)) + len(codec.encode_answer(ex.answer, eos=True)) - 1
        too_long += n > max_len
        if n > longest:
            longest, worst = n, i
    if longest > max_len:
        ex = examples[worst]
        text = ex.prompt if len(ex.prompt) <= 80 else ex.prompt[:77] + "..."
        raise ValueError(
            f"{too_long} training example(s) do not fit the model's context of {max_len} tokens; the longest, "
            f"example {worst} ({text!r} -> {ex.answer!r}), is {longest} tokens: "
            f"train with model.max_seq_len={longest} (or more), or shorten the data"
        )


def usable_accelerators() -> tuple[list[str], list[str]]:
    """Lightning's accelerator names, as two lists: usable on this machine, and
    known but unusable here (``tpu`` without torch_xla, ``cuda`` without a GPU).

    ``auto`` is always usable; ``gpu`` (Lightning's alias) is usable where
    ``cuda`` or ``mps`` is.
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry

    usable, unusable = ["auto"], []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        try:
            ok = bool(AcceleratorRegistry[name]["accelerator"].is_available())
        except Exception:  # noqa: BLE001 - a missing optional dependency means "not here"
            ok = False
        (usable if ok else unusable).append(name)
    if "cuda" in usable or "mps" in usable:
        usable.append("gpu")
    else:
        unusable.append("gpu")
    return usable, sorted(unusable)


def check_accelerator(name: str) -> None:
    """Raise ValueError, naming ``name`` and the valid choices, unless this machine has it.

    Lightning would otherwise fail inside ``Trainer(...)`` with a traceback
    (``tpu`` without torch_xla: ModuleNotFoundError; ``cuda`` without a GPU).
    """
    usable, unusable = usable_accelerators()
    if name in usable:
        return
    what = "is not available on this machine" if name in unusable else "is not a known accelerator"
    raise ValueError(f"accelerator {name!r} {what}; choose from {', '.join(usable)}")


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device summary, tips) off the console."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
