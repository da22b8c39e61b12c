"""Checkpoint directories: ``model.safetensors`` + resolved ``config.yaml`` +
``tokenizer.json`` (+ ``slot_stats.safetensors``). Loading never unpickles."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from knowedit.config import ModelConfig, model_config_from_yaml, to_yaml
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATS_FILE = "slot_stats.safetensors"


class CheckpointError(ValueError):
    """A directory that is not a (readable) knowedit checkpoint."""


@dataclass
class Checkpoint:
    model: MemoryLM
    codec: TextCodec
    cfg: ModelConfig
    path: Path
    fingerprint: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str | Path, model: MemoryLM, codec: TextCodec, config: object | None = None) -> Path:
    """Write a checkpoint directory.

    Args:
        path: target directory (created).
        model: the model; its weights go to ``model.safetensors``.
        codec: the tokenizer.
        config: the resolved training config to save (defaults to the model config).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp"
    save_model(model, str(tmp), metadata={"format": "knowedit"})
    os.replace(tmp, out / MODEL_FILE)
    _atomic_write_text(out / CONFIG_FILE, to_yaml(config if config is not None else model.cfg))
    codec.save(out / TOKENIZER_FILE)
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing files, or a file that does not parse.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{p} is not a knowedit checkpoint (missing {', '.join(missing)})")
    try:
        cfg = model_config_from_yaml((p / CONFIG_FILE).read_text())
    except Exception as err:  # omegaconf raises many types
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: {err}") from None
    try:
        codec = TextCodec.load(p / TOKENIZER_FILE)
    except Exception as err:
        raise CheckpointError(f"{p / TOKENIZER_FILE} is not a valid tokenizer: {err}") from None
    try:
        model = MemoryLM(cfg)
        missing_keys, unexpected = load_model(model, str(p / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{p / MODEL_FILE} is not a readable model: {err}") from None
    if missing_keys or unexpected:
        raise CheckpointError(f"{p / MODEL_FILE} does not match config.yaml (missing {missing_keys[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return Checkpoint(model, codec, cfg, p, file_sha256(p / MODEL_FILE))
