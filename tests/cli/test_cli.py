"""The ``knowedit`` command line through Typer's CliRunner: help, train, ask and
clear errors (a message and a non-zero exit, never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from knowedit.checkpoint import load_checkpoint
from knowedit.cli.app import app
from knowedit.inference import greedy

COMMANDS = [
    [],
    ["version"],
    ["train"],
    ["ask"],
    ["stats"],
    ["locate"],
    ["demo"],
    ["eval"],
    ["edit"],
    ["edit", "apply"],
    ["edit", "revert"],
    ["ledger"],
    ["ledger", "list"],
    ["ledger", "show"],
    ["ledger", "verify"],
    ["ledger", "export"],
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def assert_clean_failure(result: Result, *phrases: str) -> None:
    """Non-zero exit through a message: no exception escaped, no traceback printed."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long messages
    for phrase in phrases:
        assert phrase in text, result.output


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "root")
def test_help(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_root_help_lists_the_commands(runner: CliRunner) -> None:
    out = runner.invoke(app, ["--help"]).output
    for name in ("train", "ask", "stats", "locate", "demo", "edit", "ledger"):
        assert name in out


def test_train_debug_json(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "debug", "--out", str(out), "-q", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["out"] == str(out) and report["name"] == "debug"
    assert report["facts_trained"] > 0 and report["steps"] > 0
    ck = load_checkpoint(out)
    assert ck.cfg.vocab_size == ck.codec.vocab_size
    assert not (out / "logs").exists()  # the debug recipe logs nothing


def test_train_with_overrides(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "debug", "max_epochs=1", "model.d_model=32", "--out", str(out), "-q", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1
    assert load_checkpoint(out).cfg.d_model == 32


def test_train_misspelt_override(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "debug", "model.d_modl=3", "--out", str(out), "-q"])
    assert_clean_failure(result, "model.d_modl")
    assert not out.exists()


def test_train_unknown_recipe(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "nosuchrecipe", "--out", str(tmp_path / "r")])
    shipped = sorted(f.stem for f in (Path(__file__).resolve().parents[2] / "recipes" / "configs").glob("*.yaml"))
    assert "counterfact" in shipped
    assert_clean_failure(result, "nosuchrecipe", ", ".join(shipped))


def test_train_malformed_override_value(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", "debug", "model.memory_layers=[0", "--out", str(tmp_path / "r")]
    )
    assert_clean_failure(result, "memory_layers", "not valid YAML")
    assert not (tmp_path / "r").exists()


def test_train_malformed_recipe(runner: CliRunner, tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: [1,\n")
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "r")])
    assert_clean_failure(result, "broken.yaml", "not valid YAML")


def test_ask_json(runner: CliRunner, debug_ckpt: Path) -> None:
    prompt = "The mother tongue of Danielle Darrieux is"
    result = runner.invoke(app, ["ask", "--model", str(debug_ckpt), prompt, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["prompt"] == prompt and out["live_edits"] == 0
    assert isinstance(out["answer"], str) and out["answer"]
    ck = load_checkpoint(debug_ckpt)
    assert out["answer"] == greedy(ck.model, ck.codec, [prompt])[0]


def test_ask_plain(runner: CliRunner, debug_ckpt: Path) -> None:
    result = runner.invoke(app, ["ask", "-m", str(debug_ckpt), "Kalo Miren was born in"])
    assert result.exit_code == 0, result.output
    assert "Kalo Miren was born in" in result.output


def test_ask_not_a_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = runner.invoke(app, ["ask", "--model", str(tmp_path), "Hello"])
    assert_clean_failure(result, "not a knowedit checkpoint")


def test_ask_missing_directory(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["ask", "--model", str(tmp_path / "nowhere"), "Hello"])
    assert_clean_failure(result, "not a directory")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_ask_empty_prompt(runner: CliRunner, debug_ckpt: Path, prompt: str) -> None:
    result = runner.invoke(app, ["ask", "--model", str(debug_ckpt), prompt])
    assert_clean_failure(result, "empty")


def test_ask_too_long_prompt(runner: CliRunner, debug_ckpt: Path) -> None:
    result = runner.invoke(app, ["ask", "--model", str(debug_ckpt), "word " * 200])
    assert_clean_failure(result, "context")


def test_version(runner: CliRunner) -> None:
    from knowedit import __version__

    result = runner.invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"version": __version__}
