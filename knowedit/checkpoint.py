"""Checkpoint directories: ``model.safetensors`` + resolved ``config.yaml`` +
``tokenizer.json`` (+ ``slot_stats.safetensors``). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.overrides import TorchFunctionMode

from knowedit.config import ModelConfig, model_config_from_yaml, to_yaml
from knowedit.errors import KnoweditError
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATS_FILE = "slot_stats.safetensors"
LEDGER_FILE = "ledger.db"
"""The default ledger of a checkpoint directory (created by its first edit)."""


class CheckpointError(KnoweditError, ValueError):
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


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``).

    Elsewhere it is set and put back at once, which another thread creating a
    file in between would see.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask.

    ``tempfile.mkstemp`` creates files 0600; a file written to a temporary name
    and renamed into place gets this mode first, so every file of a checkpoint
    directory is as readable as the others (0644 under umask 022).

    Returns:
        The permission bits, e.g. ``0o644``.
    """
    return 0o666 & ~_umask()


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a synced temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, model: MemoryLM, codec: TextCodec, config: object | None = None) -> Path:
    """Write a checkpoint directory.

    Args:
        path: target directory (created).
        model: the model; its weights go to ``model.safetensors``.
        codec: the tokenizer.
        config: the resolved training config to save (defaults to the model config).
    """
    if getattr(model, "is_retrofit", False):  # a transformers model with memory layers
        from knowedit.retrofit import save_retrofit

        return save_retrofit(path, model, getattr(model, "tokenizer_json", None) or codec.tok.to_str().encode())  # type: ignore[arg-type]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp"
    save_model(model, str(tmp), metadata={"format": "knowedit"})
    os.chmod(tmp, plain_file_mode())
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


def _read_config_text(path: Path) -> str:
    """The text of a checkpoint's ``config.yaml``; every failure names the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path} is not a valid model config: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def _file_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable model: {err}") from None


class _SkipInit(TorchFunctionMode):
    """``torch.nn.init`` functions do nothing to a meta tensor (shapes only).

    Initialising on the meta device goes through torch's Python reference
    implementations, whose first use imports ``torch._dynamo`` (seconds of start-up
    for ``knowedit ask``); the values are thrown away anyway. Thread-local, like
    every torch function mode.
    """

    _INITS = frozenset(
        getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))
    )

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self._INITS:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def _check_shapes(p: Path, cfg: ModelConfig) -> int:
    """Compare the parameters ``cfg`` implies with the tensors in the file, before allocating.

    The model is built on torch's ``meta`` device (shapes only, no memory), so a
    config that asks for 10^10 slots is caught here rather than as a failed
    allocation blamed on the weights file.

    Returns:
        The bytes the real model's parameters take.

    Raises:
        CheckpointError: the config cannot build a model, or names or shapes differ.
    """
    try:
        with torch.device("meta"), _SkipInit():
            meta = MemoryLM(cfg)
    except (ValueError, RuntimeError, TypeError, OverflowError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: {detail}") from None
    stored = _file_shapes(p / MODEL_FILE)
    params = meta.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # tied tensors: one stored name covers them all
    for name, t in params.items():
        aliases.setdefault(id(t), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in stored for n in names)]
    unexpected = [n for n in stored if n not in params]
    if missing or unexpected:
        raise CheckpointError(
            f"{p / MODEL_FILE} does not match {CONFIG_FILE} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, shape in stored.items():
        want = list(params[name].shape)
        if shape != want:
            raise CheckpointError(
                f"{p / CONFIG_FILE} does not match {MODEL_FILE}: {name} is {shape} in the file "
                f"but the config gives {want}"
            )
    seen: set[int] = set()
    size = 0
    for t in params.values():
        if id(t) not in seen:
            seen.add(id(t))
            size += t.numel() * t.element_size()
    return size


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory written by :func:`save_checkpoint`.

    A model directory is untrusted input: ``config.yaml`` is read without
    resolving OmegaConf interpolations, and the shapes it implies are checked
    against the weights file before anything is allocated.

    Raises:
        CheckpointError: missing files, a file that does not parse, a config that
            does not match the weights, or too little memory for the model.
    """
    p = check_checkpoint_dir(path)
    config_text = _read_config_text(p / CONFIG_FILE)
    if not config_text.strip():
        raise CheckpointError(f"{p / CONFIG_FILE} is not a valid model config: the file is empty")
    if "kind:" in config_text:
        from knowedit.retrofit import is_retrofit_config, load_retrofit

        if is_retrofit_config(config_text):  # knowedit retrofit: a transformers model with memory layers
            return load_retrofit(p, config_text, device)
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
    size = _check_shapes(p, cfg)
    try:
        model = MemoryLM(cfg)
        missing_keys, unexpected = load_model(model, str(p / MODEL_FILE), strict=False)
        fingerprint = model_fingerprint(p / MODEL_FILE)
    except MemoryError:
        raise CheckpointError(_no_memory(p, size, "out of memory")) from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if "allocate" in str(err).lower() or "out of memory" in str(err).lower():
            raise CheckpointError(_no_memory(p, size, " ".join(str(err).split()))) from None
        raise CheckpointError(f"{p / MODEL_FILE} is not a readable model: {err}") from None
    if missing_keys or unexpected:
        raise CheckpointError(f"{p / MODEL_FILE} does not match config.yaml (missing {missing_keys[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return Checkpoint(model, codec, cfg, p, fingerprint)


def _no_memory(p: Path, size: int, detail: str) -> str:
    return (
        f"not enough memory to load the model in {p}: its weights take {size / 2**30:.2f} GiB "
        f"(config.yaml and model.safetensors agree; {detail})"
    )
