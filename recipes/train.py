"""The Lightning training recipe: a memory LM learns a world of facts.

``knowedit train CONFIG [KEY=VALUE ...]`` resolves a :class:`TrainConfig`
(dataclass defaults < YAML < overrides) and calls :func:`train`, which writes
a checkpoint directory (``model.safetensors``, ``config.yaml``,
``tokenizer.json``, ``corpus.jsonl``, ``train_report.json``).

Lightning does the bookkeeping: the warmup + cosine schedule is an
``lr_scheduler`` per optimizer, ``ModelCheckpoint`` writes the resume state
``checkpoints/last.ckpt`` each epoch (``--resume`` continues from it, loaded
with ``weights_only=True``), ``EarlyStopping`` ends the run at
``stop_at_accuracy`` and the Trainer's ``max_time`` at ``max_minutes``.
``trainer.*`` keys pass through to ``lightning.Trainer``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Sampler

from knowedit.checkpoint import save_checkpoint
from knowedit.config import ConfigError, OptimConfig, TrainConfig, fold_trainer_aliases, to_yaml
from knowedit.data import (
    EditRequest,
    Example,
    load_records,
    make_world,
    true_fact_examples,
    write_jsonl,
)
from knowedit.errors import FileAccessError, file_problem
from knowedit.inference import Batch, encode_examples, greedy_exact, teacher_forced
from knowedit.model import MemoryLM, build_model
from knowedit.tokenizer import TextCodec, corpus_texts

CORPUS_FILE = "corpus.jsonl"
HELDOUT_FILE = "heldout.jsonl"
EDITS_FILE = "edits.jsonl"
REPORT_FILE = "train_report.json"
RESUME_FILE = "checkpoints/last.ckpt"
"""Lightning's resume state (weights, optimizer and loop state), under the output directory."""
VALUE_OPTIMIZERS = ("sparse_adam", "sparse_sgd", "rowwise_adagrad")
LOGGERS = ("csv", "tensorboard", "none")

#: Trainer arguments the recipe sets itself, with what to use instead.
TRAINER_OWNED = {
    "logger": "choose it with logger=csv|tensorboard|none",
    "max_time": "set the time cap with max_minutes=N",
    "callbacks": "the recipe adds its own (resume checkpoint, early stopping)",
    "enable_checkpointing": "checkpoint_every_n_epochs=0 writes no resume checkpoint",
    "plugins": "the recipe writes its resume checkpoint with its own CheckpointIO",
    "default_root_dir": "give the output directory with --out",
    "enable_progress_bar": "use --quiet",
    "strategy": "with trainer.devices x trainer.num_nodes > 1 the recipe trains memory-parallel with DDP "
    "(value tables sharded over the ranks; see docs/distributed.md)",
    "use_distributed_sampler": "the recipe splits each global batch over the ranks itself",
    "accumulate_grad_batches": "the recipe steps its two optimizers itself (manual optimisation)",
    "gradient_clip_val": "the recipe steps its two optimizers itself (manual optimisation)",
    "gradient_clip_algorithm": "the recipe steps its two optimizers itself (manual optimisation)",
}


class EpochShuffle(Sampler[int]):
    """A shuffle of ``range(n)`` that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch, after a resume too, so a
    resumed run reads its remaining epochs in the order an uninterrupted run does.
    The orders are those the recipe had before it could resume,
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``,
    whose every epoch draws from the generator one int64 (the loader's worker base
    seed) and two permutations (``RandomSampler`` draws one more, for a remainder
    of length 0): models trained before and after this sampler are identical.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):
            _epoch_draws(g, self.n)
        return iter(_epoch_draws(g, self.n))


def _epoch_draws(g: torch.Generator, n: int) -> list[int]:
    torch.empty((), dtype=torch.int64).random_(generator=g)
    order = torch.randperm(n, generator=g).tolist()
    torch.randperm(n, generator=g)
    return order


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
                raise ConfigError("data.source=easyedit needs data.path")
            self.edits = load_records(d.path, limit=d.limit)
            self.train_ex = true_fact_examples(self.edits)
        elif d.source == "documents":
            if not d.path:
                raise ConfigError("data.source=documents needs data.path")
            from knowedit.data.documents import load_learning_data

            self.train_ex = load_learning_data(d.path)[0][: d.limit or None]
        else:
            raise ConfigError(f"unknown data.source {d.source!r} (synthetic, easyedit or documents)")
        self.codec = TextCodec.train(corpus_texts(self.train_ex), vocab_size=d.vocab_size)

    def train_dataloader(self) -> DataLoader:
        max_len = self.cfg.model.max_seq_len
        answer_only = self.cfg.data.answer_only_loss
        sampler = EpochShuffle(len(self.train_ex), self.cfg.seed)
        collate = functools.partial(_collate, self.codec, max_len=max_len, answer_only=answer_only)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:  # data.batch_size is the global batch: each rank trains on its share of it
            from knowedit.distributed import ShardedBatches

            batches = ShardedBatches(sampler, self.cfg.data.batch_size, world)
            share = functools.partial(_collate_share, collate, rank=self.trainer.global_rank, world=world)
            return DataLoader(self.train_ex, batch_sampler=batches, collate_fn=share)
        return DataLoader(self.train_ex, batch_size=self.cfg.data.batch_size, sampler=sampler, collate_fn=collate)


def _collate(codec: TextCodec, exs: list[Example], *, max_len: int, answer_only: bool):  # noqa: ANN202
    return encode_examples(codec, exs, max_len, answer_only)


def _collate_share(collate: Any, exs: list[Example], *, rank: int, world: int):  # noqa: ANN202, ANN401
    """One rank's rows of the global batch, padded as the whole global batch is."""
    from dataclasses import fields

    from knowedit.distributed import rank_share

    batch = collate(exs)
    return type(batch)(*(rank_share(getattr(batch, f.name), rank, world) for f in fields(batch)))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then
    cosine decay to ``min_ratio`` at ``total`` steps (and ``min_ratio`` after)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def value_optimizer(o: OptimConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The memory values' optimizer named by ``o.value_optimizer``, at ``o.value_lr``.

    Every choice is lazy: it reads the sparse gradient and updates only the rows a
    batch touched. SparseSGD and RowwiseAdagrad run the Triton kernel for CUDA
    tensors and the torch reference elsewhere (``backend="auto"``).
    """
    from knowedit.kernels.optim import RowwiseAdagrad, SparseSGD

    if o.value_optimizer == "sparse_adam":
        return torch.optim.SparseAdam(params, lr=o.value_lr)
    if o.value_optimizer == "sparse_sgd":
        return SparseSGD(params, lr=o.value_lr)
    if o.value_optimizer == "rowwise_adagrad":
        return RowwiseAdagrad(params, lr=o.value_lr)
    raise ConfigError(f"optim.value_optimizer must be one of {', '.join(VALUE_OPTIMIZERS)}, not {o.value_optimizer!r}")


class MemoryLMModule(L.LightningModule):
    """Trains a :class:`MemoryLM`; memory values get their own sparse optimizer and lr."""

    def __init__(self, cfg: TrainConfig, model: MemoryLM, eval_examples: list[Example], codec: TextCodec) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.codec = codec
        self.eval_examples = eval_examples
        # Two optimizers (dense AdamW + the sparse value optimizer): Lightning's automatic
        # optimisation takes one, so training_step steps both and their schedulers.
        self.automatic_optimization = False
        self.train_accuracy = 0.0

    def configure_optimizers(self):  # noqa: ANN201 (Lightning's union type)
        o = self.cfg.optim
        opts = [torch.optim.AdamW(self.model.other_parameters(), lr=o.lr, weight_decay=o.weight_decay)]
        if self.model.value_parameters():
            opts.append(value_optimizer(o, self.model.value_parameters()))
        # The schedule's step is Lightning's global_step, which under manual optimisation
        # counts every optimizer's steps: len(opts) per batch. Its horizon is the planned batches.
        total = max(self.trainer.estimated_stepping_batches, o.warmup_steps + 1)
        scale = functools.partial(
            _scale_at_batch, per_batch=len(opts), warmup=o.warmup_steps, total=total, min_ratio=o.min_lr_ratio
        )
        return opts, [torch.optim.lr_scheduler.LambdaLR(opt, scale) for opt in opts]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        opts, scheds = _as_list(self.optimizers()), _as_list(self.lr_schedulers())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        # The head (d x vocabulary, the largest matmul of a small model) runs only where a
        # target is: on a CounterFact batch 35% of the padded positions.
        if self.trainer.world_size > 1:  # one backward per step: DDP's reducer expects one
            from knowedit.distributed import share_of_global_loss

            logits, targets = self.model.target_logits(batch.ids, batch.targets)
            loss, shown = share_of_global_loss(logits, targets)
            self.manual_backward(loss)
        else:
            shown = backward_in_parts(self.model, batch, self.cfg.data.length_buckets, self.manual_backward)
        for opt in opts:
            opt.step()
        for sched in scheds:
            sched.step()
        self.log("train_loss", shown, prog_bar=True, on_step=True, on_epoch=True)
        return shown

    def on_train_epoch_end(self) -> None:
        self.model.eval()
        ex = self.eval_examples
        self.train_accuracy = sum(teacher_forced(self.model, self.codec, ex)["exact"]) / max(1, len(ex))
        self.model.train()
        self.log("train_acc", self.train_accuracy, prog_bar=True)  # EarlyStopping reads it next

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["knowedit_config"] = to_yaml(self.cfg)  # what --resume must match

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resumable(checkpoint.get("knowedit_config"), self.cfg)
        epoch = int(checkpoint.get("epoch", 0))
        if 0 <= self.cfg.max_epochs < epoch:  # Lightning would refuse it later, with a traceback
            raise ConfigError(
                f"cannot resume with max_epochs={self.cfg.max_epochs}: the run's checkpoint is at epoch {epoch}; "
                f"give max_epochs={epoch} or more"
            )


def length_parts(batch: Batch, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A padded batch as ``k`` parts of rows of like length, each cut to its own longest
    row: (ids, targets) per part. A part's rows are a run of the batch sorted by length,
    so the short rows no longer carry the long ones' padding; the scored positions are
    the batch's, each once. ``k`` <= 1: the batch itself."""
    if k <= 1:
        return [(batch.ids, batch.targets)]
    n = batch.answer_start + batch.answer_len  # tokens of each row before its padding
    order = torch.argsort(n, stable=True)
    out = []
    for rows in torch.tensor_split(order, k):
        if rows.numel():
            T = int(n[rows].max())
            out.append((batch.ids[rows, :T], batch.targets[rows, :T]))
    return out


def backward_in_parts(
    model: MemoryLM, batch: Batch, k: int, backward: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """The batch's per-token mean cross-entropy, run as :func:`length_parts` of ``k``:
    ``backward`` is called on each part's share, so the gradients add up to the
    batch's. Returns the batch's loss (detached)."""
    scored = (batch.targets != -100).sum().clamp_min(1)
    shown = torch.zeros((), device=batch.ids.device)
    for ids, tgt in length_parts(batch, k):
        logits, targets = model.target_logits(ids, tgt)
        part = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / scored
        backward(part)
        shown = shown + part.detach()
    return shown


def _scale_at_batch(batch: int, *, per_batch: int, warmup: int, total: int, min_ratio: float) -> float:
    return warmup_cosine(per_batch * batch, warmup, total, min_ratio)


def _as_list(x: Any) -> list:  # noqa: ANN401 - Lightning returns one object or a list
    if x is None:
        return []
    return x if isinstance(x, list) else [x]


def check_resumable(saved_yaml: str | None, cfg: TrainConfig) -> None:
    """Refuse to resume a run whose model, data, optimizer or seed differ from ``cfg``.

    Raises:
        ConfigError: one line naming the first keys that differ, old and new values.
    """
    import yaml

    if saved_yaml is None:
        raise ConfigError("the resume checkpoint was not written by knowedit train (no saved config)")
    saved, now = yaml.safe_load(saved_yaml), yaml.safe_load(to_yaml(cfg))
    diffs = [
        f"{key}={_at(saved, key)!r} before, {_at(now, key)!r} now"
        for section in ("seed", "model", "data", "optim")
        for key in _leaf_keys(now, section)
        if _at(saved, key) != _at(now, key)
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume: the run was started with other settings ({'; '.join(diffs[:3])}); "
            "resume with the recipe and overrides it was started with"
        )


def _leaf_keys(tree: dict, key: str) -> list[str]:
    node = _at(tree, key)
    if isinstance(node, dict):
        return [k for sub in node for k in _leaf_keys(tree, f"{key}.{sub}")]
    return [key]


def _at(tree: dict, key: str) -> Any:  # noqa: ANN401 - any YAML value
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


class _AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, then a rename: a run killed
    mid-write leaves the previous ``last.ckpt`` whole (Lightning's own writer stages the
    file in the system temp directory, and moves it across file systems by copying)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:  # noqa: ANN401
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def _callbacks(cfg: TrainConfig, out: Path, n_eval: int, resumable: bool = True) -> list[L.Callback]:
    """Resume checkpoint (each ``checkpoint_every_n_epochs``; not in memory-parallel runs) and
    early stopping at ``stop_at_accuracy``."""
    callbacks: list[L.Callback] = []
    if cfg.checkpoint_every_n_epochs and resumable:
        callbacks.append(ModelCheckpoint(
            dirpath=str((out / RESUME_FILE).parent), filename=Path(RESUME_FILE).stem, monitor=None, save_top_k=1,
            every_n_epochs=cfg.checkpoint_every_n_epochs, save_on_train_epoch_end=True, enable_version_counter=False,
        ))  # fmt: skip
    threshold = accuracy_threshold(cfg.stop_at_accuracy, n_eval)
    if threshold is not None:
        callbacks.append(EarlyStopping(
            monitor="train_acc", mode="max", stopping_threshold=threshold, patience=sys.maxsize,
            check_on_train_epoch_end=True, check_finite=False,
        ))  # fmt: skip
    return callbacks


def accuracy_threshold(stop_at: float, n: int) -> float | None:
    """EarlyStopping's ``stopping_threshold`` for "accuracy over ``n`` examples >= ``stop_at``".

    EarlyStopping stops when the metric is strictly above the threshold, and reads it as
    float32. Accuracy is a multiple of ``1/n``, so the threshold is half a step below the
    lowest reachable accuracy that is ``>= stop_at``: exact in both respects. None: not reachable.
    """
    need = next((c for c in range(n + 1) if c / max(1, n) >= stop_at), None)
    return None if need is None else (need - 0.5) / max(1, n)


def _logger(cfg: TrainConfig, out: Path):  # noqa: ANN202
    if cfg.logger == "csv":
        return L.pytorch.loggers.CSVLogger(str(out), name="logs")
    if cfg.logger == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(str(out), name="logs")
    return False


def check_settings(cfg: TrainConfig) -> None:
    """Check the recipe's own choices and every ``trainer.*`` key, before anything is written.

    Raises:
        ConfigError: one line: an unknown logger, a logger whose package is missing, an
            unknown value optimizer, a negative ``checkpoint_every_n_epochs``, a key
            ``lightning.Trainer`` does not take (with the nearest names), or one the recipe
            sets itself (with what to use instead).
    """
    import importlib.util

    if cfg.logger not in LOGGERS:
        raise ConfigError(f"unknown logger {cfg.logger!r}; choose from {', '.join(LOGGERS)}")
    if cfg.logger == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise ConfigError("logger=tensorboard needs the tensorboard package (pip install tensorboard); or use logger=csv")
    if cfg.optim.value_optimizer not in VALUE_OPTIMIZERS:
        raise ConfigError(
            f"optim.value_optimizer must be one of {', '.join(VALUE_OPTIMIZERS)}, not {cfg.optim.value_optimizer!r}"
        )
    if cfg.checkpoint_every_n_epochs < 0:
        raise ConfigError(f"checkpoint_every_n_epochs must be >= 0 (0: none), got {cfg.checkpoint_every_n_epochs}")
    if cfg.data.length_buckets < 1:
        raise ConfigError(f"data.length_buckets must be >= 1, got {cfg.data.length_buckets}")
    world = world_size(cfg)
    if world > 1:
        if cfg.model.memory.query_bn:
            raise ConfigError("model.memory.query_bn is not supported with several processes (its statistics would differ per rank)")
        check_memory_parallel(cfg, world)
    known = [k for k in inspect.signature(L.Trainer.__init__).parameters if k != "self"]
    for key in cfg.trainer:
        if key in TRAINER_OWNED:
            raise ConfigError(f"trainer.{key} is set by the recipe: {TRAINER_OWNED[key]}")
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join('trainer.' + k for k in near)}?" if near else ""
            raise ConfigError(f"unknown trainer key trainer.{key}: lightning.Trainer takes no argument {key!r}{hint}")


def check_memory_parallel(cfg: TrainConfig, world: int) -> None:
    """What a run over ``world`` processes needs (value tables sharded by columns over them).

    Raises:
        DistributedError: one line: a value width or global batch not divisible by / smaller
            than the ranks, or the row-wise AdaGrad value optimizer (its per-row state needs
            whole rows).
    """
    from knowedit.distributed import DistributedError

    width = cfg.model.memory.value_dim or cfg.model.d_model
    if cfg.model.memory_layers and width % world:
        raise DistributedError(
            f"memory-parallel training over {world} processes shards each value row's {width} columns: "
            f"choose trainer.devices x trainer.num_nodes dividing {width}"
        )
    if cfg.data.batch_size < world:
        raise DistributedError(
            f"data.batch_size={cfg.data.batch_size} is the global batch; it must hold at least one example "
            f"per process ({world})"
        )
    if cfg.optim.value_optimizer == "rowwise_adagrad":
        raise DistributedError(
            "optim.value_optimizer=rowwise_adagrad keeps one state per whole row, which a column shard "
            "does not have; use sparse_adam or sparse_sgd for memory-parallel runs"
        )


def train(
    cfg: TrainConfig, progress: bool = True, config_dir: str | Path | None = None, resume: bool = False
) -> dict:
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
        resume: continue from ``cfg.out``'s resume checkpoint (:data:`RESUME_FILE`),
            the weights, optimizer, schedule, epoch and early-stopping state of the
            last epoch it saved; the run then ends where an uninterrupted one would.

    Returns:
        The training report: accuracies, wall time, the thread count, sizes.

    Raises:
        ConfigError: an accelerator this machine lacks (naming the usable ones),
            a negative thread count, a data file that is not there (naming the
            ``data.path=`` override), a training example longer than the
            model's context (naming the ``model.max_seq_len=`` override), or a
            setting Lightning refuses, a bad setting named by :func:`check_settings`,
            or ``resume`` without a resume checkpoint; nothing is written then.
    """
    t0 = time.monotonic()
    _quiet_lightning()
    fold_trainer_aliases(cfg)
    check_settings(cfg)  # before anything is written
    check_accelerator(cfg.accelerator)
    if resume and world_size(cfg) > 1:
        from knowedit.distributed import DistributedError

        raise DistributedError("--resume is not supported for memory-parallel runs yet (they write no resume checkpoint)")
    if resume and not (Path(cfg.out) / RESUME_FILE).is_file():
        raise ConfigError(
            f"nothing to resume: {Path(cfg.out) / RESUME_FILE} does not exist (train without --resume, "
            "or give the --out of the interrupted run)"
        )
    resolve_data_path(cfg, config_dir)
    if cfg.threads < 0:
        raise ConfigError(f"threads must be >= 0 (0: torch's default), got {cfg.threads}")
    prior_threads = torch.get_num_threads()
    if cfg.threads:
        # Float reductions split across threads sum in a different order: the same
        # seed gives the same weights only with the same thread count.
        torch.set_num_threads(cfg.threads)
    try:
        report = _train(cfg, progress, t0, resume)
    finally:
        torch.set_num_threads(prior_threads)
    _leave_process_group()
    return report


def _leave_process_group() -> None:
    """A memory-parallel run's ranks, once every one has trained, leave together and tear
    their process group down themselves instead of at interpreter exit, where a gloo
    rank sometimes aborted ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train(cfg: TrainConfig, progress: bool, t0: float, resume: bool) -> dict:
    out = Path(cfg.out)
    L.seed_everything(cfg.seed, verbose=False)
    random.seed(cfg.seed)
    dm = FactDataModule(cfg)
    eval_sample = dm.train_ex if len(dm.train_ex) <= 4000 else random.Random(cfg.seed).sample(dm.train_ex, 4000)
    settings = {"devices": 1, **cfg.trainer}
    world = world_size(cfg)
    if world > 1:  # memory-parallel: DDP for the dense parameters, value tables sharded over the ranks
        from knowedit.distributed import memory_parallel_strategy

        settings.update(strategy=memory_parallel_strategy(cfg.accelerator), use_distributed_sampler=False)
    try:  # before writing: a Trainer that cannot be built leaves nothing behind
        trainer = L.Trainer(
            max_epochs=cfg.max_epochs,
            max_steps=cfg.max_steps,
            max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
            accelerator=cfg.accelerator,
            precision=cfg.precision,
            logger=_logger(cfg, out),
            callbacks=_callbacks(cfg, out, len(eval_sample), resumable=world == 1),
            enable_checkpointing=bool(cfg.checkpoint_every_n_epochs) and world == 1,
            plugins=[_AtomicCheckpointIO()],
            enable_progress_bar=progress,
            enable_model_summary=settings.pop("enable_model_summary", False),
            log_every_n_steps=settings.pop("log_every_n_steps", 10),
            **settings,
        )
    except (ImportError, MisconfigurationException, TypeError, ValueError) as err:  # what the checks cannot foresee
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        extra = "".join(f", trainer.{k}={v!r}" for k, v in cfg.trainer.items())
        raise ConfigError(
            f"cannot train with accelerator {cfg.accelerator!r} and precision {cfg.precision!r}{extra}: {first}"
        ) from None
    check_fit(dm.train_ex, dm.codec, cfg.model.max_seq_len)  # before the first step, and before writing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileAccessError(f"--out {out} is a file, not a directory") from None
    except OSError as err:
        raise file_problem(f"--out {out}", err, "write") from None
    if not resume:  # a fresh run: an earlier run's resume state must not be resumed later
        (out / RESUME_FILE).unlink(missing_ok=True)
    cfg.model.vocab_size = dm.codec.vocab_size
    if world > 1:
        from knowedit.distributed import ShardSpec, ddp_ignore_names, sharded_values

        # Every rank draws the single-process model's initial weights, keeping its columns of the values.
        with sharded_values(ShardSpec(trainer.global_rank, world)):
            model = build_model(cfg.model, seed=cfg.seed)
    else:
        model = build_model(cfg.model, seed=cfg.seed)
    module = MemoryLMModule(cfg, model, eval_sample, dm.codec)
    if world > 1:
        module._ddp_params_and_buffers_to_ignore = [f"model.{n}" for n in ddp_ignore_names(model)]
    # weights_only: the resume file is read by torch's restricted unpickler (tensors and
    # plain containers only), never by plain pickle.
    trainer.fit(module, datamodule=dm, ckpt_path=str(out / RESUME_FILE) if resume else None, weights_only=True)
    if world > 1:
        whole = _consolidate(cfg, module.model)
        if whole is None:  # ranks other than 0 write nothing
            return {"name": cfg.name, "rank": trainer.global_rank, "world_size": world}
        model = whole
    else:
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
        "world_size": world,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def world_size(cfg: TrainConfig) -> int:
    """Processes of the run: ``trainer.devices`` x ``trainer.num_nodes`` (1 when not set).

    Raises:
        ConfigError: a value that is not a positive whole number.
    """
    n = 1
    for key in ("devices", "num_nodes"):
        v = cfg.trainer.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"trainer.{key} must be a positive whole number (processes to train on), got {v!r}")
        n *= v
    return n


def _consolidate(cfg: TrainConfig, sharded: MemoryLM) -> MemoryLM | None:
    """The whole model on rank 0, from every rank's value columns (a collective); None elsewhere."""
    from knowedit.distributed import consolidated_state_dict

    state = consolidated_state_dict(sharded)
    if state is None:
        return None
    whole = build_model(cfg.model)
    whole.load_state_dict(state)
    return whole.eval()


def resolve_data_path(cfg: TrainConfig, config_dir: str | Path | None = None) -> None:
    """Find ``cfg.data.path`` (for ``easyedit`` and ``documents`` data), in place.

    A path that exists from the current directory is kept; a relative one that
    does not is looked up next to the recipe file (``config_dir``) and, found
    there, replaced by that path (so the saved ``config.yaml`` names the file read).

    Raises:
        ConfigError: the file is in neither place; the message names the
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
    raise ConfigError(
        f"data.path {d.path!r} not found (looked for {' and '.join(looked)}); "
        "give the file with data.path=/path/to/file"
    )


def check_fit(examples: list[Example], codec: TextCodec, max_len: int) -> None:
    """Every training example must fit the model's context (prompt + answer + eos).

    Raises:
        ConfigError: one line naming the longest example, its token count and the
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
        raise ConfigError(
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
    """Raise ConfigError, naming ``name`` and the valid choices, unless this machine has it.

    Lightning would otherwise fail inside ``Trainer(...)`` with a traceback
    (``tpu`` without torch_xla: ModuleNotFoundError; ``cuda`` without a GPU).
    """
    usable, unusable = usable_accelerators()
    if name in usable:
        return
    what = "is not available on this machine" if name in unusable else "is not a known accelerator"
    raise ConfigError(f"accelerator {name!r} {what}; choose from {', '.join(usable)}")


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (device summary, tips) off the console."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    # Memory-parallel runs log the global batch's loss and an accuracy every rank computes alike.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # --resume


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
