"""Configuration dataclasses and named presets.

The dataclass signatures are the schema: OmegaConf builds a structured config
from them, so a YAML recipe or a ``KEY=VALUE`` override with a misspelt key is
an error that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from knowedit.errors import KnoweditError


class ConfigError(KnoweditError, ValueError):
    """A recipe, a ``KEY=VALUE`` override or a saved config that cannot be used;
    the message names the file, the override or the key."""


@dataclass
class MemoryConfig:
    """Product-key memory layer (Lample et al. 2019; Berges et al. 2024)."""

    n_keys: int = 64
    """Half-keys per head; the layer has ``n_keys ** 2`` value slots."""
    heads: int = 4
    """Query heads; every head reads the same value pool."""
    topk: int = 8
    """Slots read per head and token (``k``)."""
    key_dim: int = 64
    """Full key dimension per head (each half-key has ``key_dim // 2``)."""
    value_dim: int = 0
    """Value row width; 0 means the model dimension (as in Memory Layers at Scale)."""
    swilu: bool = True
    """Memory+ gating: ``out = W2((sum w V) * silu(W1 x))`` (Berges et al. 2024)."""
    qk_norm: bool = True
    """Normalise queries and keys; Berges et al. found it helps small models."""
    query_bn: bool = False
    """Batch-normalise the queries before the key search (Lample et al. 2019): it
    spreads the reads over the slots. It trains with the query projection only;
    while that projection is frozen (value-only learning, editing) it uses its
    running statistics, so nothing but value rows ever changes there."""
    shared_values: bool = False
    """One value pool serves every memory layer (passed as a module, never a global).
    Off by default: separate pools used more of their slots in our runs, and an
    edit of the last layer's pool then leaves every earlier layer untouched."""
    backend: str = "torch"
    """Lookup backend: ``torch`` (reference), ``triton`` or ``auto``."""


@dataclass
class ModelConfig:
    """Decoder-only transformer whose configured layers use a memory layer as FFN."""

    vocab_size: int = 0
    """Set from the tokenizer at build time."""
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_mult: int = 4
    max_seq_len: int = 64
    memory_layers: list[int] = field(default_factory=lambda: [1, 3])
    """Layer indices whose FFN is replaced by a memory layer."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    dropout: float = 0.0
    tie_embeddings: bool = True


@dataclass
class WorldConfig:
    """Synthetic fact world: entities x relations, several phrasings each."""

    entities: int = 250
    relations: int = 4
    phrasings: int = 4
    """Phrasings per relation; the last one is held out of training."""
    held_out: int = 1
    objects_per_relation: int = 24
    seed: int = 0
    answers: str = "words"
    """``words``: each relation's objects are its built-in words (Paris, piano, ...);
    ``names``: generated two-word names instead (multi-token answers, up to 500 per
    relation), for a long-answer world."""


@dataclass
class DataConfig:
    """Where the training facts come from."""

    source: str = "synthetic"
    """``synthetic`` (a generated world), ``easyedit`` (an EasyEdit-format file: its
    true facts) or ``documents`` (any file ``knowedit learn`` reads: text, JSONL of
    ``{text}`` or ``{prompt, answer}``)."""
    path: str = ""
    """The data file when ``source`` is ``easyedit`` or ``documents``."""
    limit: int = 0
    """Use only the first ``limit`` records (0: all)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    vocab_size: int = 4096
    """Byte-level BPE vocabulary trained locally on the corpus."""
    batch_size: int = 64
    length_buckets: int = 1
    """Run each batch as this many parts of rows of like length, each padded only to its
    own longest row; their gradients add up to the whole batch's (one optimizer step,
    the same per-token mean loss), so training is unchanged up to float rounding, with
    less padding to compute. Worth it where lengths vary, as on CounterFact (4). With
    several processes (``trainer.devices``) a batch runs whole."""
    answer_only_loss: bool = False
    """Score only the answer tokens. Off by default: on the synthetic world a model
    trained on answers alone stalled near 10% accuracy where full next-token loss
    reached 99% (the subject tokens need their own training signal)."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    value_lr: float = 3e-2
    """Memory values train with their own learning rate (Berges et al. use 10x the rest)."""
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    """Cosine decay from the peak to ``min_lr_ratio`` x peak over the planned steps."""
    value_optimizer: str = "sparse_adam"
    """Optimizer of the memory values (sparse gradients, touched rows only):
    ``sparse_adam`` (torch SparseAdam), ``sparse_sgd`` or ``rowwise_adagrad``
    (knowedit.kernels.optim: the Triton kernel on CUDA, the torch reference elsewhere)."""


@dataclass
class TrainConfig:
    """One training run: what ``knowedit train`` reads from a recipe."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_epochs: int = 30
    max_steps: int = -1
    max_minutes: float = 0.0
    """Stop after this wall time (0: no limit)."""
    stop_at_accuracy: float = 1.01
    """Stop once greedy accuracy on the training phrasings reaches this (checked each epoch)."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto``, ``cpu``, ``cuda``, ``gpu``, ``mps`` or ``tpu``
    (checked against what this machine has before training starts)."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default. Results depend on it: a fixed
    seed gives the same weights only with the same thread count."""
    precision: str = "32-true"
    logger: str = "csv"
    """``csv`` (no extra dependency), ``tensorboard`` (needs the tensorboard package) or ``none``."""
    checkpoint_every_n_epochs: int = 1
    """Write the resume checkpoint ``OUT/checkpoints/last.ckpt`` every N epochs
    (``knowedit train ... --resume`` continues from it); 0 writes none."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """Further ``lightning.Trainer`` arguments, e.g. ``trainer.log_every_n_steps=5``.
    ``trainer.max_epochs``, ``max_steps``, ``accelerator`` and ``precision`` are the
    top-level keys of the same names (and win over them)."""
    out: str = ""
    """Checkpoint directory (the CLI's --out; default runs/NAME)."""


TRAINER_ALIASES = ("max_epochs", "max_steps", "accelerator", "precision")
"""``trainer.*`` keys that TrainConfig holds at its top level."""


def fold_trainer_aliases(cfg: TrainConfig) -> TrainConfig:
    """Move ``cfg.trainer``'s :data:`TRAINER_ALIASES` to the top-level keys, in place.

    Raises:
        ConfigError: a value of the wrong type, naming the ``trainer.`` key.
    """
    for key in TRAINER_ALIASES:
        if key in cfg.trainer:
            node = _merge(OmegaConf.structured(TrainConfig), OmegaConf.create({key: cfg.trainer[key]}), f"trainer.{key}")
            setattr(cfg, key, node[key])
            del cfg.trainer[key]
    return cfg


@dataclass
class LearnConfig:
    """One learning run: what ``knowedit learn`` reads (recipes/configs/learn/*.yaml).

    Sparse memory finetuning (Lin et al. 2025): per batch, rank the memory slots
    the batch reads by ``tf(i) * log((|B| + 1) / (df(i) + 1))`` against the
    model's background statistics and train only the top-``top_t`` value rows of
    each pool; everything else stays frozen.
    """

    method: str = "sparse"
    """``sparse`` (top-t value rows, recorded in the ledger), or a dense baseline
    written to ``--out``: ``ft`` (every weight), ``ft-memory`` (every value row)
    or ``lora`` (rank-r adapters, merged on save)."""
    top_t: int = 64
    """sparse: value rows trained per memory pool and batch."""
    lr: float = 0.0
    """Step size; 0 takes the method's default (``DEFAULT_LEARN_LR``)."""
    optimizer: str = "sgd"
    """Value-row optimizer for sparse and ft-memory: ``sgd`` (plain, as Lin et al.),
    ``adam`` (torch SparseAdam) or ``adagrad``. ft and lora use AdamW."""
    epochs: int = 10
    """Passes over the data."""
    max_steps: int = -1
    """Stop after this many batches (-1: all epochs)."""
    batch_size: int = 32
    answer_only_loss: bool = True
    """Score only the answer tokens of a fact (a plain document is scored after its first word)."""
    background: str = "answer"
    """sparse: ``stats`` ranks by TF-IDF against the model's slot statistics
    (``knowedit stats``; built from its corpus when missing), with ``df`` counting
    background documents that read a slot anywhere (Lin et al. 2025); ``answer``
    counts only those that read it where they predict their answer (the reads a
    change can break); ``none`` ranks by the batch's own access share (tf) alone."""
    positions: str = "answer"
    """sparse: where the batch's reads are counted for ``tf``: ``answer``, the
    positions whose next token is scored (where a fact is recalled), or ``all`` its
    tokens (Lin et al. 2025). On the demo world ``answer`` learnt 97% of 36 new
    sentences where ``all`` learnt 42%, with the same forgetting."""
    guard_docs: int = 0
    """sparse: per step, also train on up to this many background documents (the
    training corpus) that read the step's chosen rows most, on their own answers,
    so the rows keep what those documents recall (0: off, Lin et al.'s method)."""
    guard_weight: float = 1.0
    """sparse: weight of the guard documents' loss."""
    commit_every: int = 0
    """sparse: steps between ledger commits, each a ``learn`` event (0: one at the end)."""
    rank: int = 8
    """lora: adapter rank."""
    alpha: float = 16.0
    """lora: the update is scaled by ``alpha / rank``."""
    seed: int = 0
    """Seeds the batch order (and the LoRA init)."""
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""


DEFAULT_LEARN_LR = {"sgd": 30.0, "adam": 1e-2, "adagrad": 0.5, "ft": 3e-4, "lora": 3e-3}
"""Default step sizes by value optimizer (sparse, ft-memory) or method (ft, lora)."""
LEARN_METHODS = ("sparse", "ft", "ft-memory", "lora")


def _tiny_model() -> ModelConfig:
    return ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        memory_layers=[0, 1],
        memory=MemoryConfig(n_keys=16, heads=2, topk=4, key_dim=32),
    )


def _small_model() -> ModelConfig:
    return ModelConfig(
        d_model=128,
        n_layers=4,
        n_heads=4,
        max_seq_len=64,
        memory_layers=[1, 3],
        memory=MemoryConfig(n_keys=64, heads=4, topk=8, key_dim=64),
    )


def _base_model() -> ModelConfig:
    return ModelConfig(
        d_model=512,
        n_layers=8,
        n_heads=8,
        max_seq_len=128,
        memory_layers=[2, 5, 7],
        memory=MemoryConfig(n_keys=512, heads=4, topk=32, key_dim=256),
    )


MODEL_PRESETS = {"tiny": _tiny_model, "small": _small_model, "base": _base_model}


def model_preset(name: str) -> ModelConfig:
    """Return a named model preset: ``tiny`` (tests), ``small`` (CPU demo), ``base`` (GPU)."""
    try:
        return MODEL_PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose from {sorted(MODEL_PRESETS)}") from None


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from defaults, a YAML recipe and overrides (see :func:`load_config`),
    with ``trainer.max_epochs`` and the other :data:`TRAINER_ALIASES` moved to the top level."""
    return fold_trainer_aliases(load_config(TrainConfig, path, overrides))  # type: ignore[arg-type]


def load_learn_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LearnConfig:
    """A :class:`LearnConfig` from defaults, a YAML file and overrides, with its values checked.

    Raises:
        ConfigError: as :func:`load_config`, or a value out of range (named).
    """
    cfg: LearnConfig = load_config(LearnConfig, path, overrides)  # type: ignore[assignment]
    checks = [
        (cfg.method in LEARN_METHODS, f"method must be one of {', '.join(LEARN_METHODS)}, not {cfg.method!r}"),
        (cfg.optimizer in ("sgd", "adam", "adagrad"), f"optimizer must be sgd, adam or adagrad, not {cfg.optimizer!r}"),
        (cfg.background in ("stats", "answer", "none"), f"background must be stats, answer or none, not {cfg.background!r}"),
        (cfg.positions in ("all", "answer"), f"positions must be all or answer, not {cfg.positions!r}"),
        (cfg.top_t >= 1, f"top_t must be >= 1, got {cfg.top_t}"),
        (cfg.guard_docs >= 0, f"guard_docs must be >= 0, got {cfg.guard_docs}"),
        (cfg.guard_weight >= 0, f"guard_weight must be >= 0, got {cfg.guard_weight}"),
        (cfg.lr >= 0, f"lr must be >= 0 (0: the method's default), got {cfg.lr}"),
        (cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}"),
        (cfg.max_steps == -1 or cfg.max_steps >= 1, f"max_steps must be -1 or >= 1, got {cfg.max_steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.commit_every >= 0, f"commit_every must be >= 0, got {cfg.commit_every}"),
        (cfg.rank >= 1, f"rank must be >= 1, got {cfg.rank}"),
        (cfg.threads >= 0, f"threads must be >= 0, got {cfg.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def learn_lr(cfg: LearnConfig) -> float:
    """The step size a run uses: ``cfg.lr``, or the method's default."""
    if cfg.lr:
        return cfg.lr
    return DEFAULT_LEARN_LR[cfg.method if cfg.method in ("ft", "lora") else cfg.optimizer]


def load_config(schema: type, path: str | Path | None = None, overrides: list[str] | None = None) -> object:
    """Merge a config dataclass's defaults, a YAML file and ``KEY=VALUE`` overrides.

    Args:
        path: YAML recipe file, or None for defaults only.
        overrides: dotlist such as ``["model.d_model=64", "max_epochs=3"]``.

    Returns:
        The resolved ``schema`` instance (a TrainConfig's ``out`` may still be missing).

    Raises:
        ConfigError: for a recipe that is missing, unreadable, not YAML or not a
            mapping; an override that is not ``KEY=VALUE`` or whose value is not
            YAML; an unknown key or a value of the wrong type. The message names
            the file, the override or the key.
    """
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    if path is not None:
        merged = _merge(merged, _load_recipe(Path(path)), f"config file {str(path)!r}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        try:
            node = OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(err)})") from None
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from None
        merged = _merge(merged, node, f"override {item!r}")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A one-line summary of a YAML error (``problem`` + position when known)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def _omegaconf_message(err: Exception) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"bad config key {key!r}: {first}" if key else first


def _merge(base: DictConfig, node: object, where: str) -> DictConfig:
    """``OmegaConf.merge`` with its errors turned into a ConfigError naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, node)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_omegaconf_message(err)}") from None


def _load_recipe(path: Path) -> DictConfig:
    """Read a YAML recipe; every failure is a ConfigError naming the file."""
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({_yaml_problem(err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except OSError as err:
        if err.errno is None:  # OmegaConf's "Invalid loaded object type" for a bare scalar
            raise ConfigError(f"config file {str(path)!r} must be a mapping of config keys ({err})") from None
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror or err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {str(path)!r}: {str(err).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        kind = "a list" if isinstance(node, ListConfig) else type(node).__name__
        raise ConfigError(f"config file {str(path)!r} must be a mapping of config keys, not {kind}")
    return node


def to_yaml(cfg: object) -> str:
    """Serialise a config dataclass to YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def model_config_from_yaml(text: str) -> ModelConfig:
    """Parse a saved ``config.yaml`` (a resolved :class:`TrainConfig` or bare ModelConfig).

    A checkpoint's config is untrusted input and was saved resolved, so no
    interpolation is resolved here. The text is read as plain YAML, and only
    the model part (the ``model`` mapping, or the whole file for a bare
    ModelConfig) goes on to OmegaConf, after a string holding ``${`` anywhere in
    it (say ``backend: ${oc.env:HOME}``, which would read the environment) has
    been refused, naming its key and never showing what it would resolve to.

    Raises:
        ConfigError: for empty text, a top level that is not a mapping, or an
            interpolation (YAML and OmegaConf errors for malformed text or bad
            keys propagate as they are).
    """
    data = yaml.safe_load(text)
    if data is None:
        raise ConfigError("it is empty (no config keys)")
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of config keys")
    if not data:
        raise ConfigError("it is empty (no config keys)")
    where = "model" if "model" in data else ""
    node = data["model"] if where else data
    _refuse_interpolations(node, where)
    if not isinstance(node, dict):
        raise ConfigError("key 'model' must be a mapping of model config keys")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(node)))  # type: ignore[return-value]


def _refuse_interpolations(node: object, key: str, seen: set[int] | None = None) -> None:
    """Raise ConfigError naming the first key whose string value holds ``${``, or
    that repeats an earlier mapping or list (a YAML alias).

    A saved config has neither. Aliases are refused because copying them into
    OmegaConf expands them, and nested aliases grow exponentially.
    """
    seen = set() if seen is None else seen
    if isinstance(node, (dict, list)):
        if id(node) in seen:
            raise ConfigError(
                f"key {key or '(top level)'!r} repeats an earlier part of the file (a YAML alias); "
                "a checkpoint's config must hold plain values"
            )
        seen.add(id(node))
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_interpolations(v, f"{key}.{k}" if key else str(k), seen)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_interpolations(v, f"{key}[{i}]", seen)
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(
            f"key {key or '(top level)'!r} holds an interpolation ('${{...}}'); a checkpoint's "
            "config must hold plain values and is never resolved"
        )
