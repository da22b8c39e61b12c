"""The Lightning training recipe, end to end on the debug recipe (seconds on CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from knowedit.checkpoint import load_checkpoint
from knowedit.config import TrainConfig, load_train_config, model_config_from_yaml
from knowedit.data import load_records, make_world, read_examples
from knowedit.recipes.train import RESUME_FILE

CKPT_FILES = [
    "model.safetensors",
    "config.yaml",
    "tokenizer.json",
    "corpus.jsonl",
    "train_report.json",
]


def _epoch_losses(out: Path) -> list[float]:
    (metrics,) = out.glob("logs/version_*/metrics.csv")
    with open(metrics, newline="") as f:
        return [
            float(r["train_loss_epoch"]) for r in csv.DictReader(f) if r.get("train_loss_epoch")
        ]


def test_loss_falls(debug_ckpt: Path) -> None:
    losses = _epoch_losses(debug_ckpt)
    assert len(losses) == 15  # one per epoch (max_epochs=15 in the fixture)
    assert losses[-1] < 0.5 * losses[0]
    assert min(losses[-3:]) < min(losses[:3])


def test_checkpoint_directory(debug_ckpt: Path) -> None:
    for name in CKPT_FILES:
        assert (debug_ckpt / name).is_file(), name
    # a synthetic world also ships its held-out phrasings and ready-made edits
    assert (debug_ckpt / "heldout.jsonl").is_file()
    assert load_records(debug_ckpt / "edits.jsonl")
    # Lightning's resume state, the only .ckpt file: --resume continues from it
    assert [p.relative_to(debug_ckpt).as_posix() for p in debug_ckpt.rglob("*.ckpt")] == [RESUME_FILE]


def test_config_yaml_reloads_into_the_schema(debug_ckpt: Path) -> None:
    cfg = load_train_config(str(debug_ckpt / "config.yaml"))
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == "debug" and cfg.max_epochs == 15 and cfg.logger == "csv"  # overrides kept
    assert cfg.out == str(debug_ckpt)
    ck = load_checkpoint(debug_ckpt)
    assert cfg.model == ck.cfg == model_config_from_yaml((debug_ckpt / "config.yaml").read_text())
    assert cfg.model.vocab_size == ck.codec.vocab_size > 0


def test_corpus_is_the_world(debug_ckpt: Path) -> None:
    cfg = load_train_config(str(debug_ckpt / "config.yaml"))
    world = make_world(cfg.data.world)
    assert read_examples(debug_ckpt / "corpus.jsonl") == world.train_examples()
    assert read_examples(debug_ckpt / "heldout.jsonl") == world.held_out_examples()


def test_train_report(debug_ckpt: Path) -> None:
    report = json.loads((debug_ckpt / "train_report.json").read_text())
    corpus = read_examples(debug_ckpt / "corpus.jsonl")
    assert report["name"] == "debug"
    assert report["facts_trained"] == len(corpus)
    assert report["epochs"] == 15
    assert report["steps"] > 0
    assert 0.0 < report["train_greedy_accuracy"] <= 1.0
    assert 0.0 <= report["heldout_greedy_accuracy"] <= 1.0
    ck = load_checkpoint(debug_ckpt)
    assert report["parameters"] == sum(p.numel() for p in ck.model.parameters())
    assert report["memory_slots"] == ck.cfg.memory.n_keys**2


def test_unknown_data_source_raises(tmp_path: Path) -> None:
    from knowedit.recipes.train import train

    cfg = load_train_config(None, ["data.source=wiki", f"out={tmp_path}"])
    with pytest.raises(ValueError, match="wiki"):
        train(cfg, progress=False)
