"""Bad input seen from outside, each pinned by a test (numbers follow the hardening
list): 6 text that is not valid Unicode, 8 misleading errors (a binary or oversized
``config.yaml``, a missing database driver, an accelerator this machine lacks),
9 interpolations in an untrusted ``config.yaml``, 11 a zero step budget, file
modes, and runs that repeat for a given seed and thread count.

"Changes nothing" means the model directory stays byte-identical and no ledger
is created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_helpers import clean_failure, tree
from conftest import CONFIG_DIR
from typer.testing import CliRunner

from knowedit.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
)
from knowedit.cli.app import app
from knowedit.editor import LEDGER_FILE

REPO = Path(__file__).resolve().parents[1]
STEPS = "5"
# "\udcff" is how Python's argv holds the invalid UTF-8 byte 0xff (surrogateescape);
# "\ud800" is a lone surrogate, what JSON's "\ud800" escape gives.
BAD_TEXTS = [
    pytest.param("The mother tongue of \udcff is", "invalid UTF-8 byte 0xff at position 21", id="invalid-utf8"),
    pytest.param("The mother tongue of \ud800 is", "lone surrogate U+D800 at position 21", id="lone-surrogate"),
]


@pytest.fixture
def fresh_threads() -> Iterator[None]:
    """Restore torch's thread count after a test whose command sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _first_request(model_dir: Path) -> dict:
    return json.loads((model_dir / "edits.jsonl").read_text(encoding="utf-8").splitlines()[0])


def _unchanged(model_dir: Path, before: dict[str, str]) -> None:
    assert tree(model_dir) == before
    assert not (model_dir / LEDGER_FILE).exists()


# --------------------------------------------------------------- 6: invalid text


@pytest.mark.parametrize(("text", "problem"), BAD_TEXTS)
@pytest.mark.parametrize("where", ["ask", "apply-prompt", "apply-target", "locate"])
def test_6_text_that_is_not_unicode_on_the_command_line_is_refused(
    model_dir: Path, runner: CliRunner, where: str, text: str, problem: str
) -> None:
    before = tree(model_dir)
    good = "The mother tongue of Danielle Darrieux is"
    args = {
        "ask": ["ask", text, "--model", str(model_dir)],
        "apply-prompt": ["edit", "apply", "-m", str(model_dir), "-p", text, "-t", "English", "--max-steps", STEPS],
        "apply-target": ["edit", "apply", "-m", str(model_dir), "-p", good, "-t", text, "--max-steps", STEPS],
        "locate": ["locate", "-m", str(model_dir), "-p", text, "-t", "English"],
    }[where]
    result = runner.invoke(app, args)
    out = clean_failure(result, "is not valid text", problem)
    assert "TextInputSequence" not in out
    _unchanged(model_dir, before)


def test_6_invalid_utf8_bytes_in_a_real_argv_are_one_line(model_dir: Path) -> None:
    """The bytes reach Python as the OS gives them (no CliRunner in between)."""
    before = tree(model_dir)
    code = "from knowedit.cli.app import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "ask", b"The mother tongue of \xff\xfe is", "--model", str(model_dir)],
        capture_output=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", "COLUMNS": "200"},
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "TextInputSequence" not in err
    assert "not valid text: invalid UTF-8 byte 0xff at position 21" in " ".join(err.split())
    _unchanged(model_dir, before)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("prompt", "The mother tongue of \\ud800 is", "field 'prompt'"),
        ("target_new", "Eng\\ud800lish", "field 'target_new'"),
        ("rephrase_prompt", ["fine", "Danielle Darrieux \\udfff speaks"], "field 'rephrase_prompt[1]'"),
        ("locality_prompt", "\\ud83d alone is", "field 'locality_prompt'"),
    ],
)
def test_6_a_lone_surrogate_in_a_records_file_is_refused(
    model_dir: Path, runner: CliRunner, tmp_path: Path, field: str, value: object, named: str
) -> None:
    req = _first_request(model_dir)
    req[field] = value
    if field == "locality_prompt":
        req["locality_ground_truth"] = "x"
    # Written by hand so the file holds the JSON escape, as another tool would write it.
    line = json.dumps(req).replace("\\\\u", "\\u")
    assert "\\ud" in line
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_first_request(model_dir)) + "\n" + line + "\n", encoding="ascii")
    before = tree(model_dir)
    result = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "--file", str(path), "--max-steps", STEPS])
    clean_failure(result, "bad.jsonl record 1", named, "is not valid text", "lone surrogate")
    _unchanged(model_dir, before)  # the good first record was not applied either
    result = runner.invoke(app, ["eval", "-m", str(model_dir), "--edits", str(path), "--n", "1"])
    clean_failure(result, "bad.jsonl record 1", named, "lone surrogate")
    _unchanged(model_dir, before)


# ---------------------------------------------------------- 8: misleading errors


def test_8_a_binary_config_is_named(model_dir: Path, runner: CliRunner) -> None:
    (model_dir / CONFIG_FILE).write_bytes(b"model:\n  d_model: 64\n\xff\xfe\x00\x01binary")
    before = tree(model_dir)
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(model_dir)])
    out = clean_failure(result, f"{model_dir / CONFIG_FILE} is not a valid model config", "not UTF-8 text", "0xff")
    assert "codec can't decode" not in out
    _unchanged(model_dir, before)


def _set_config(model_dir: Path, old: str, new: str) -> None:
    path = model_dir / CONFIG_FILE
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("n_keys", [10_000_000, 65])
def test_8_a_config_that_does_not_match_the_weights_is_named_before_allocating(
    model_dir: Path, runner: CliRunner, n_keys: int
) -> None:
    """10^7 half-keys ask for 10^14 value rows: blamed on config.yaml, not on memory."""
    _set_config(model_dir, "n_keys: 64", f"n_keys: {n_keys}")
    before = tree(model_dir)
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(model_dir)])
    out = clean_failure(result, f"{model_dir / CONFIG_FILE} does not match {MODEL_FILE}", "in the file but the config gives")
    assert "allocate" not in out and "not a readable model" not in out
    _unchanged(model_dir, before)


def test_8_a_config_that_cannot_build_a_model_is_named(model_dir: Path, runner: CliRunner) -> None:
    _set_config(model_dir, "n_heads: 2", "n_heads: 3")  # d_model 64 is not a multiple of 3
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(model_dir)])
    clean_failure(result, f"{model_dir / CONFIG_FILE} is not a valid model config")


@pytest.mark.parametrize("url", ["postgresql://knowedit@127.0.0.1:9/nowhere", "postgresql+psycopg://knowedit@127.0.0.1:9/nowhere"])
def test_8_a_missing_postgresql_driver_names_the_extra(
    model_dir: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now raises ImportError
    before = tree(model_dir)
    for args in (
        ["ledger", "list", "-m", str(model_dir), "--ledger", url],
        ["edit", "apply", "-m", str(model_dir), "--ledger", url, "-p", "The mother tongue of Danielle Darrieux is",
         "-t", "English", "--max-steps", STEPS],
    ):
        result = runner.invoke(app, args)
        clean_failure(result, "the database driver is not installed", "pip install 'knowedit[postgres]'")
    _unchanged(model_dir, before)


def test_8_plain_postgresql_urls_use_the_driver_of_the_extra() -> None:
    """``knowedit[postgres]`` installs psycopg 3: a plain ``postgresql://`` must use it."""
    from sqlalchemy import create_engine

    engine = create_engine("postgresql://knowedit@127.0.0.1:9/nowhere")
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


@pytest.mark.parametrize(
    ("name", "what"), [("tpu", "is not available on this machine"), ("abacus", "is not a known accelerator")]
)
def test_8_an_accelerator_this_machine_lacks_is_one_line(
    runner: CliRunner, tmp_path: Path, name: str, what: str
) -> None:
    from knowedit.recipes.train import usable_accelerators

    usable = usable_accelerators()[0]
    assert name not in usable and "cpu" in usable
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "tiny", f"accelerator={name}", "--out", str(out), "-q"])
    text = clean_failure(result, f"accelerator {name!r} {what}; choose from {', '.join(usable)}")
    assert "ModuleNotFoundError" not in text
    assert not out.exists()  # refused before anything is written


# ------------------------------------------------------------- 9: interpolations


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("backend: ", "backend: ${oc.env:KNOWEDIT_TEST_SECRET} #", "model.memory.backend"),
        # Resolving this one would even load: a resolved value that happens to fit.
        ("d_model: 64", "d_model: ${oc.env:KNOWEDIT_TEST_D_MODEL}", "model.d_model"),
        ("d_model: 64", "d_model: ${oc.decode:'${oc.env:KNOWEDIT_TEST_D_MODEL}'}", "model.d_model"),
    ],
)
def test_9_interpolations_in_config_yaml_are_never_resolved(
    model_dir: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch, old: str, new: str, key: str
) -> None:
    monkeypatch.setenv("KNOWEDIT_TEST_SECRET", "s3cr3t-9f1c")
    monkeypatch.setenv("KNOWEDIT_TEST_D_MODEL", "64")
    _set_config(model_dir, old, new)
    before = tree(model_dir)
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(model_dir)])
    out = clean_failure(result, f"{model_dir / CONFIG_FILE} is not a valid model config", f"key {key!r} holds an interpolation")
    assert "s3cr3t-9f1c" not in out
    _unchanged(model_dir, before)


def test_9_the_home_directory_is_not_shown(model_dir: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/knowedit-test-home-7d2e")
    _set_config(model_dir, "backend: ", "backend: ${oc.env:HOME} #")
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(model_dir)])
    out = clean_failure(result, "holds an interpolation")
    assert "knowedit-test-home-7d2e" not in out


# ------------------------------------------------------------------- 11: minor


def test_11_a_zero_step_budget_is_refused(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    before = tree(model_dir)
    req = _first_request(model_dir)
    result = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "-p", req["prompt"], "-t", req["target_new"], "--max-steps", "0"])
    clean_failure(result, "--max-steps must be at least 1")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(req) + "\n")
    result = runner.invoke(app, ["edit", "apply", "-m", str(model_dir), "--file", str(path), "--max-steps", "0"])
    clean_failure(result, "--max-steps must be at least 1")
    _unchanged(model_dir, before)


def test_11_bad_edit_options_are_refused_before_anything_is_written(model_dir: Path, runner: CliRunner) -> None:
    before = tree(model_dir)
    req = _first_request(model_dir)
    base = ["edit", "apply", "-m", str(model_dir), "-p", req["prompt"], "-t", req["target_new"], "--max-steps", STEPS]
    for option, phrase in (
        ("no_such=1", "unknown edit option"),
        ("prompt_weight=-1", "prompt_weight must be a positive number"),
        ("beta1=high", "beta1 must be float"),
        ("prompt_weight", "is not KEY=VALUE"),
        ("top_t=4", "use --top-t"),
    ):
        clean_failure(runner.invoke(app, [*base, "--option", option]), phrase)
    _unchanged(model_dir, before)


@pytest.fixture
def umask() -> Iterator[None]:
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_11_every_checkpoint_file_gets_the_same_mode(
    tiny_ckpt: Path, tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    from knowedit.data import read_examples
    from knowedit.side_files import CORPUS_FILE, build_stats

    os.umask(mask)
    ck = load_checkpoint(tiny_ckpt)
    out = save_checkpoint(tmp_path / "saved", ck.model, ck.codec)
    build_stats(load_checkpoint(out), read_examples(tiny_ckpt / CORPUS_FILE)[:50])
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert {MODEL_FILE, CONFIG_FILE, "tokenizer.json", "slot_stats.safetensors", "slot_stats_docs.jsonl"} <= set(modes)
    assert set(modes.values()) == {oct(mode)}, modes


def test_11_umask_is_read_without_changing_it(umask: None) -> None:
    from knowedit.checkpoint import plain_file_mode

    os.umask(0o077)
    assert plain_file_mode() == 0o600
    assert os.umask(0o077) == 0o077  # still set


def _eval(runner: CliRunner, model: Path, *extra: str) -> object:
    result = runner.invoke(app, [
        "eval", "-m", str(model), "--edits", str(model / "edits.jsonl"), "--n", "3", "--json",
        "--option", "max_steps=20", *extra,
    ])
    assert result.exit_code == 0, result.output
    return _without_timings(json.loads(result.stdout))


def _without_timings(obj: object) -> object:
    """``obj`` less every ``*seconds`` key (wall times differ between runs)."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if not k.endswith("seconds")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_11_eval_repeats_for_a_seed_and_thread_count(
    tiny_ckpt: Path, runner: CliRunner, fresh_threads: None
) -> None:
    torch.set_num_threads(1)
    first = _eval(runner, tiny_ckpt, "--threads", "2", "--seed", "3")
    assert isinstance(first, dict) and first["threads"] == 2 and first["seed"] == 3
    assert "edit_seconds" not in first and first["edits"] and "seconds" not in first["edits"][0]
    assert torch.get_num_threads() == 1  # the command gives the thread count back
    assert _eval(runner, tiny_ckpt, "--threads", "2", "--seed", "3") == first


@pytest.mark.parametrize(("args", "phrase"), [(["--threads", "-1"], "--threads must be >= 0"), (["--seed", "-1"], "--seed must be >= 0")])
def test_11_eval_refuses_bad_threads_and_seeds(tiny_ckpt: Path, runner: CliRunner, args: list[str], phrase: str) -> None:
    result = runner.invoke(app, ["eval", "-m", str(tiny_ckpt), "--edits", str(tiny_ckpt / "edits.jsonl"), *args])
    clean_failure(result, phrase)


def test_11_training_repeats_for_a_seed_and_thread_count(tmp_path: Path, fresh_threads: None) -> None:
    from knowedit.config import load_train_config
    from knowedit.recipes.train import train

    torch.set_num_threads(1)
    prints = []
    for run in ("a", "b"):
        cfg = load_train_config(str(CONFIG_DIR / "debug.yaml"), ["max_epochs=2", "logger=none", "threads=2", "seed=5"])
        cfg.out = str(tmp_path / run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = train(cfg, progress=False)
        assert report["threads"] == 2
        assert torch.get_num_threads() == 1  # given back
        prints.append(model_fingerprint(tmp_path / run / MODEL_FILE))
    assert prints[0] == prints[1]


def test_11_train_refuses_negative_threads(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "tiny", "threads=-1", "--out", str(out), "-q"])
    clean_failure(result, "threads must be >= 0")
    assert not out.exists()


# ------------------------------------------- only KnoweditError is a user error


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("a bug"), OSError("a bug"), KeyError("a bug")])
def test_an_error_that_is_not_a_knowedit_error_shows_its_traceback(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bug: Exception
) -> None:
    """A builtin exception inside a command is a bug: it propagates (a traceback), never a one-line ``error:``."""
    import knowedit.checkpoint

    def broken(*_args: object, **_kwargs: object) -> None:
        raise bug

    monkeypatch.setattr(knowedit.checkpoint, "load_checkpoint", broken)
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(tmp_path), "--base"])
    assert result.exit_code != 0
    assert result.exception is bug
    assert "error:" not in result.output


def test_a_knowedit_error_inside_a_command_is_one_line(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import knowedit.checkpoint
    from knowedit.checkpoint import CheckpointError

    def broken(*_args: object, **_kwargs: object) -> None:
        raise CheckpointError("the checkpoint is broken")

    monkeypatch.setattr(knowedit.checkpoint, "load_checkpoint", broken)
    result = runner.invoke(app, ["ask", "The mother tongue of Danielle Darrieux is", "--model", str(tmp_path), "--base"])
    clean_failure(result, "error: the checkpoint is broken")


def test_train_into_a_file_is_one_line(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.write_text("not a directory")
    result = runner.invoke(app, ["train", "tiny", "--out", str(out), "-q"])
    clean_failure(result, f"--out {out} is a file, not a directory")
    assert out.read_text() == "not a directory"


def test_export_under_a_file_is_one_line(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = tree(model_dir)
    result = runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(blocker / "new")])
    clean_failure(result, f"cannot write {blocker / 'new'}", "is not a directory")
    _unchanged(model_dir, before)


def test_stats_that_cannot_be_stored_is_one_line(model_dir: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import knowedit.side_files

    def read_only(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(knowedit.side_files, "save_stats", read_only)
    result = runner.invoke(app, ["stats", "-m", str(model_dir)])
    clean_failure(result, f"cannot store the slot statistics in {model_dir}", "Permission denied")


def test_a_corpus_that_is_not_prompt_answer_objects_is_one_line(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer": "d", "extra": 1}\n')
    result = runner.invoke(app, ["stats", "-m", str(model_dir), "--corpus", str(corpus), "--dry-run"])
    clean_failure(result, "not a JSONL file of {prompt, answer} objects", "line 2")


def test_the_new_error_classes_keep_their_builtin_bases() -> None:
    """Python callers that caught ValueError / OSError still catch them."""
    from knowedit.config import ConfigError
    from knowedit.errors import FileAccessError, KnoweditError, OptionError
    from knowedit.tokenizer import TextError

    for cls in (ConfigError, OptionError, TextError):
        assert issubclass(cls, KnoweditError) and issubclass(cls, ValueError), cls
    assert issubclass(FileAccessError, KnoweditError) and issubclass(FileAccessError, OSError)
    assert str(FileAccessError("x cannot be read")) == "x cannot be read"


def test_ledger_export_into_a_directory_is_one_line(model_dir: Path, runner: CliRunner, tmp_path: Path) -> None:
    req = _first_request(model_dir)
    m = str(model_dir)
    args = ["edit", "apply", "-m", m, "-p", req["prompt"], "-t", req["target_new"], "--max-steps", STEPS, "--allow-failed"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["ledger", "export", "-m", m, "--out", str(tmp_path)])
    clean_failure(result, f"--out {tmp_path} is a directory, not a file")
