"""The recipe's Lightning parts: trainer.* pass-through, the value optimizers, the
schedule, early stopping, and --resume after a SIGKILL (on the debug recipe)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import clean_failure
from typer.testing import CliRunner

from knowedit.cli.app import app
from knowedit.config import ConfigError, load_train_config
from knowedit.recipes.train import (
    RESUME_FILE,
    VALUE_OPTIMIZERS,
    EpochShuffle,
    accuracy_threshold,
    train,
    warmup_cosine,
)

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "recipes" / "configs"
FAST = ["data.batch_size=16", "optim.lr=1e-2", "optim.value_lr=1e-1", "optim.warmup_steps=5", "threads=1"]


def _train(out: Path, *overrides: str, recipe: str = "debug", resume: bool = False) -> dict:
    cfg = load_train_config(str(CONFIG_DIR / f"{recipe}.yaml"), [*FAST, *overrides])
    cfg.out = str(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's small-dataset advice
        return train(cfg, progress=False, resume=resume)


# ---------------------------------------------------------------- trainer.* keys


def test_trainer_max_epochs_override(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "tiny", "trainer.max_epochs=1", "--out", str(out), "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_epochs"] == 1 and saved["trainer"] == {}  # saved where the recipe reads it


def test_trainer_key_passes_through(tmp_path: Path) -> None:
    _train(tmp_path / "run", "max_epochs=2", "logger=csv", "trainer.log_every_n_steps=1")
    (metrics,) = (tmp_path / "run").glob("logs/version_*/metrics.csv")
    with open(metrics, newline="") as f:
        steps = [r for r in csv.DictReader(f) if r.get("train_loss_step")]
    assert len(steps) == 16  # one per step (2 epochs of 8 batches), not one per 10


@pytest.mark.parametrize(
    ("override", "phrases"),
    [
        ("trainer.no_such=1", ["unknown trainer key trainer.no_such", "lightning.Trainer takes no argument 'no_such'"]),
        ("trainer.max_epoch=1", ["did you mean trainer.max_epochs"]),
        ("trainer.logger=false", ["trainer.logger is set by the recipe", "logger=csv|tensorboard|none"]),
        ("trainer.max_time=5", ["trainer.max_time is set by the recipe", "max_minutes="]),
        ("trainer.strategy=ddp", ["trainer.strategy is set by the recipe", "memory-parallel"]),
        ("trainer.devices=3", ["shards each value row's", "columns", "dividing"]),
        ("trainer.devices=two", ["trainer.devices must be a positive whole number"]),
        ("trainer.num_nodes=0", ["trainer.num_nodes must be a positive whole number"]),
        ("trainer.devices=2 optim.value_optimizer=rowwise_adagrad", ["rowwise_adagrad keeps one state per whole row"]),
        ("trainer.max_epochs=abc", ["trainer.max_epochs", "abc"]),
        ("trainer.devices=2 model.memory.query_bn=true", ["model.memory.query_bn is not supported with several processes"]),
        ("optim.value_optimizer=adam", ["optim.value_optimizer must be one of sparse_adam, sparse_sgd, rowwise_adagrad"]),
        ("logger=wandb", ["unknown logger 'wandb'"]),
    ],
)
def test_bad_settings_are_one_line_errors(runner: CliRunner, tmp_path: Path, override: str, phrases: list[str]) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "tiny", *override.split(), "--out", str(out), "-q"])
    clean_failure(result, *phrases)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()  # nothing written


def test_tensorboard_needs_its_package(runner: CliRunner, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    result = runner.invoke(app, ["train", "tiny", "logger=tensorboard", "--out", str(tmp_path / "r"), "-q"])
    clean_failure(result, "logger=tensorboard needs the tensorboard package")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- optimizers and schedule


@pytest.mark.parametrize("name", VALUE_OPTIMIZERS)
def test_value_optimizers_train_and_checkpoint(tmp_path: Path, name: str) -> None:
    lr = {"sparse_adam": "1e-1", "sparse_sgd": "30", "rowwise_adagrad": "0.5"}[name]
    report = _train(tmp_path / "run", "max_epochs=2", f"optim.value_optimizer={name}", f"optim.value_lr={lr}")
    assert report["steps"] > 0
    state = torch.load(tmp_path / "run" / RESUME_FILE, weights_only=True)  # plain tensors and containers
    assert len(state["optimizer_states"]) == 2 and len(state["lr_schedulers"]) == 2


def test_rowwise_adagrad_reload_keeps_fp32_accumulators() -> None:
    """A bf16 table's resumed optimizer: torch would cast its state to bf16."""
    from knowedit.kernels.optim import RowwiseAdagrad

    table = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = RowwiseAdagrad([table], lr=0.1)
    table.grad = torch.randn(8, 4, dtype=torch.bfloat16).to_sparse(1)
    opt.step()
    again = RowwiseAdagrad([table], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state[table]["sum"].dtype == torch.float32
    assert torch.equal(again.state[table]["sum"], opt.state[table]["sum"])
    again.step()  # the steps accept it


def test_every_value_optimizer_has_a_shipped_recipe() -> None:
    used = {load_train_config(str(p)).optim.value_optimizer for p in CONFIG_DIR.glob("*.yaml")}
    assert used == set(VALUE_OPTIMIZERS)


def test_warmup_cosine() -> None:
    assert [warmup_cosine(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 20, 0.1) == 1.0
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(20, 4, 20, 0.1) == warmup_cosine(99, 4, 20, 0.1) == pytest.approx(0.1)


def test_epoch_shuffle_is_the_old_loader_order() -> None:
    """The orders of ``DataLoader(shuffle=True, generator=manual_seed(seed))`` over
    successive epochs (the recipe's sampler before resume), for any one epoch alone."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(37)), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3))
    old = [[i for b in loader for i in b.tolist()] for _ in range(4)]
    sampler = EpochShuffle(37, 3)
    for epoch in (2, 0, 3, 1):
        sampler.set_epoch(epoch)
        assert list(sampler) == old[epoch]


@pytest.mark.parametrize(("stop_at", "n", "stops_at"), [(1.0, 360, 360), (0.995, 1000, 995), (0.5, 3, 2), (1.01, 10, None)])
def test_accuracy_threshold(stop_at: float, n: int, stops_at: int | None) -> None:
    """EarlyStopping stops at float32(accuracy) > threshold: exactly at ``correct/n >= stop_at``."""
    t = accuracy_threshold(stop_at, n)
    if stops_at is None:
        assert t is None
        return
    acc = torch.tensor([(stops_at - 1) / n, stops_at / n], dtype=torch.float32)
    assert torch.gt(acc, t).tolist() == [False, True]


# ---------------------------------------------------------------- resume


def test_resume_needs_a_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "debug", "--out", str(out), "-q", "--resume"])
    clean_failure(result, "nothing to resume", "last.ckpt")
    assert not out.exists()


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(out, "max_epochs=1")
    with pytest.raises(ValueError, match=r"cannot resume: .*model.d_model=64 before, 32 now"):
        _train(out, "max_epochs=2", "model.d_model=32", resume=True)


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    """max_epochs may change on resume: two epochs, then two more, is four epochs."""
    _train(tmp_path / "run", "max_epochs=2")
    report = _train(tmp_path / "run", "max_epochs=4", resume=True)
    assert report["epochs"] == 4 and report["steps"] == 4 * 2 * 8  # 8 batches, two optimizer steps each


def test_resume_below_the_epochs_done_is_refused_as_a_config_error(tmp_path: Path) -> None:
    """Lightning itself would refuse it later, with a traceback (a ConfigError is one CLI line)."""
    out = tmp_path / "run"
    _train(out, "max_epochs=3")
    with pytest.raises(ConfigError, match=r"cannot resume with max_epochs=1: the run's checkpoint is at epoch 2"):
        _train(out, "max_epochs=1", resume=True)


@pytest.mark.slow
def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    """Acceptance: kill `knowedit train debug` after its first resume checkpoint, resume it,
    and end at the uninterrupted run's accuracy (here: the very same weights)."""
    from knowedit.checkpoint import model_fingerprint

    overrides = [*FAST, "max_epochs=40", "logger=none"]
    whole = _train(tmp_path / "whole", *overrides[len(FAST):])

    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "from knowedit.cli.app import app; app()", "train", "debug", *overrides, "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / RESUME_FILE).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err  # killed mid-run, not finished
    assert not (out / "train_report.json").exists()
    saved_epoch = torch.load(out / RESUME_FILE, weights_only=True)["epoch"]
    assert saved_epoch < 39

    result = CliRunner().invoke(app, ["train", "debug", *overrides, "--out", str(out), "-q", "--json", "--resume"])
    assert result.exit_code == 0, result.output
    resumed = json.loads(result.stdout)
    assert abs(resumed["train_greedy_accuracy"] - whole["train_greedy_accuracy"]) <= 0.005
    assert (resumed["epochs"], resumed["steps"]) == (whole["epochs"], whole["steps"])
    assert model_fingerprint(out / "model.safetensors") == model_fingerprint(tmp_path / "whole" / "model.safetensors")


def test_length_parts_give_the_whole_batchs_loss_and_gradients() -> None:
    """data.length_buckets: the parts hold every scored position once, each part is cut
    to its own longest row, and the parts' summed losses and gradients are the batch's."""
    from knowedit.config import model_preset
    from knowedit.data.records import Example
    from knowedit.inference import encode_examples
    from knowedit.model import build_model
    from knowedit.recipes.train import length_parts
    from knowedit.tokenizer import TextCodec

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    exs = [Example(" ".join(words[: 1 + (i * 5) % 8] * (1 + i % 3)), words[i % 8]) for i in range(13)]
    codec = TextCodec.train([f"{e.prompt} {e.answer}" for e in exs], vocab_size=300)
    batch = encode_examples(codec, exs, 64, answer_only=False)
    cfg = model_preset("tiny")
    cfg.vocab_size = codec.vocab_size
    parts = length_parts(batch, 4)
    assert len(parts) == 4 and sum(ids.shape[0] for ids, _ in parts) == 13
    assert sum(int((t != -100).sum()) for _, t in parts) == int((batch.targets != -100).sum())
    assert max(ids.shape[1] for ids, _ in parts) == batch.ids.shape[1] > min(ids.shape[1] for ids, _ in parts)
    for _, t in parts:  # no part is padded beyond its own longest row
        assert bool((t[:, -1] != -100).any())
    assert length_parts(batch, 1)[0][0] is batch.ids
    results = []
    for k in (1, 4):
        model = build_model(cfg, seed=2).train()
        total = (batch.targets != -100).sum()
        loss = sum(
            torch.nn.functional.cross_entropy(*model.target_logits(ids, t), reduction="sum") / total
            for ids, t in length_parts(batch, k)
        )
        loss.backward()
        results.append((loss.detach(), {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l4, g4) = results
    assert torch.allclose(l1, l4, atol=1e-6) and g1.keys() == g4.keys()
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n


def test_length_buckets_train_and_a_bad_value_is_one_line(tmp_path: Path) -> None:
    report = _train(tmp_path / "g", "data.length_buckets=3", "max_epochs=1")
    assert report["epochs"] >= 1 and report["facts_trained"] > 0
    res = CliRunner().invoke(app, ["train", "debug", "data.length_buckets=0", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "data.length_buckets must be >= 1" in res.output
    assert not (tmp_path / "bad").exists()
