"""EditOptions is the one source of every edit default: the CLI, the server and
the docs' option table read it, and a read-only command writes nothing."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import typer.main

from knowedit.cli.app import app
from knowedit.edit_options import EditOptions

REPO = Path(__file__).resolve().parents[1]


def _command(*path: str):  # noqa: ANN202 - a click command (typer may vendor its own click)
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    return cmd


def test_every_cli_edit_option_defaults_to_the_library() -> None:
    defaults = EditOptions().to_dict()
    apply = _command("edit", "apply")
    seen = set()
    for param in apply.params:
        if param.name in defaults:
            assert param.default == defaults[param.name], f"--{param.name}: {param.default!r} != {defaults[param.name]!r}"
            seen.add(param.name)
    assert {"top_t", "max_steps", "conflict"} <= seen


def test_the_docs_option_table_lists_every_option_with_its_default() -> None:
    text = (REPO / "docs" / "editing.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| `?([^|`]+?)`? \|", text, flags=re.M))
    for f in fields(EditOptions):
        assert f.name in rows, f"docs/editing.md's option table has no row for {f.name}"
        assert rows[f.name] == str(f.default), f"{f.name}: docs say {rows[f.name]}, EditOptions says {f.default}"


def test_read_only_commands_leave_the_directory_byte_identical(model_dir: Path, runner) -> None:  # noqa: ANN001
    """locate builds missing slot statistics in memory only; ask, ledger list and
    stats --dry-run write nothing either."""
    from cli_helpers import tree

    from knowedit.data import load_records
    from knowedit.side_files import STATS_DOCS_FILE, STATS_FILE

    for name in (STATS_FILE, STATS_DOCS_FILE):  # missing: locate needs them, and must not store them
        (model_dir / name).unlink()
    req = load_records(model_dir / "edits.jsonl")[0]
    before = tree(model_dir)
    m = str(model_dir)
    assert runner.invoke(app, ["locate", "-m", m, "-p", req.prompt, "-t", req.target_new, "-s", req.subject]).exit_code == 0
    assert runner.invoke(app, ["ask", "-m", m, req.prompt]).exit_code == 0
    assert runner.invoke(app, ["ledger", "list", "-m", m]).exit_code != 0  # no ledger yet: said, not created
    assert runner.invoke(app, ["stats", "-m", m, "--dry-run"]).exit_code == 0
    assert tree(model_dir) == before


def test_knowedit_errors_share_one_base() -> None:
    import knowedit
    from knowedit.checkpoint import CheckpointError
    from knowedit.data.documents import DataError
    from knowedit.data.records import RecordError
    from knowedit.editor import EditError, EditFailed
    from knowedit.inference import PromptError
    from knowedit.ledger import LedgerBusy, LedgerDamaged, LedgerError, LedgerMissing
    from knowedit.side_files import SideFileError

    for cls in (CheckpointError, DataError, RecordError, EditError, EditFailed, PromptError, SideFileError,
                LedgerError, LedgerBusy, LedgerDamaged, LedgerMissing):
        assert issubclass(cls, knowedit.KnoweditError), cls
    assert issubclass(EditError, ValueError)  # still caught where ValueError was


def test_edit_apply_passes_any_option_to_the_editor_and_the_ledger_records_it(model_dir: Path, runner) -> None:  # noqa: ANN001
    import json

    from knowedit.data import load_records

    req = load_records(model_dir / "edits.jsonl")[0]
    m = str(model_dir)
    out = runner.invoke(app, [
        "edit", "apply", "-m", m, "-p", req.prompt, "-t", req.target_new, "--max-steps", "5", "--allow-failed",
        "--option", "prompt_weight=1.5", "--option", "beta1=0.8", "--json",
    ])
    assert out.exit_code == 0, out.output
    eid = json.loads(out.stdout)["id"]
    shown = json.loads(runner.invoke(app, ["ledger", "show", eid, "-m", m, "--json"]).stdout)
    settings = shown["settings"]
    assert settings["prompt_weight"] == 1.5 and settings["beta1"] == 0.8 and settings["max_steps"] == 5
    assert settings["top_t"] == EditOptions().top_t
