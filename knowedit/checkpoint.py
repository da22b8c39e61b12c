"""Checkpoint directories: ``model.safetensors`` + resolved ``config.yaml`` +
``tokenizer.json`` (+ ``slot_stats.safetensors``). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
    """SHA-256 of a file's bytes.

    Not a model identity: safetensors writes its header metadata in hash-map order,
    so two saves of the same weights differ here. Use :func:`model_fingerprint`.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_FINGERPRINT_TAG = b"knowedit-model-fingerprint/v1\n"


def model_fingerprint(path: str | Path) -> str:
    """Content fingerprint of a ``model.safetensors`` file: the identity of its weights.

    SHA-256 over the tensors as stored in the file, in sorted name order: each
    tensor's name, safetensors dtype and shape, then its raw bytes. The header
    metadata (written in random order, with tied-tensor aliases) is left out, so
    saving the same weights twice gives the same fingerprint, and any change to a
    stored weight, name, dtype or shape changes it. Tied/shared tensors count once,
    under the name the file stores them by.

    Raises:
        SafetensorError, OSError: the file is missing or not a readable safetensors file.
    """
    h = hashlib.sha256(_FINGERPRINT_TAG)
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            sl = f.get_slice(name)
            head = json.dumps([name, sl.get_dtype(), list(sl.get_shape())], separators=(",", ":"))
            data = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy()
            h.update(head.encode())
            h.update(b"\n")
            h.update(data.nbytes.to_bytes(8, "little"))
            h.update(data)
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


def check_checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a Path, if it is a directory holding the checkpoint's files.

    Raises:
        CheckpointError: not a directory, or a required file missing.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory")
    missing = [f for f in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{p} is not a knowedit checkpoint (missing {', '.join(missing)})")
    return p


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: missing files, or a file that does not parse.
    """
    p = check_checkpoint_dir(path)
    config_text = (p / CONFIG_FILE).read_text()
    if not config_text.strip():
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: the file is empty")
    try:
        cfg = model_config_from_yaml(config_text)
    except Exception as err:  # omegaconf raises many types
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: {detail}") from None
    if cfg.vocab_size <= 0:
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: vocab_size must be set (got {cfg.vocab_size})")
    try:
        codec = TextCodec.load(p / TOKENIZER_FILE)
    except Exception as err:
        raise CheckpointError(f"{p / TOKENIZER_FILE} is not a valid tokenizer: {err}") from None
    if codec.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{p / TOKENIZER_FILE} does not match the model: the tokenizer has {codec.vocab_size} tokens "
            f"but {CONFIG_FILE} gives vocab_size {cfg.vocab_size} (the embedding size)"
        )
    try:
        model = MemoryLM(cfg)
        missing_keys, unexpected = load_model(model, str(p / MODEL_FILE), strict=False)
        fingerprint = model_fingerprint(p / MODEL_FILE)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{p / MODEL_FILE} is not a readable model: {err}") from None
    if missing_keys or unexpected:
        raise CheckpointError(f"{p / MODEL_FILE} does not match config.yaml (missing {missing_keys[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return Checkpoint(model, codec, cfg, p, fingerprint)
