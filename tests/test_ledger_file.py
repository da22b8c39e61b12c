"""The ledger file itself: bytes appended after SQLite's last page are reported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from typer.testing import CliRunner

from knowedit.cli.app import app
from knowedit.data import load_records
from knowedit.editor import LEDGER_FILE, Editor


def test_junk_appended_to_the_ledger_file_is_reported_by_verify(tiny_ckpt: Path, tmp_path: Path) -> None:
    """SQLite ignores bytes after its last page, so every edit still reads back the
    same; `ledger verify` reports the file as appended to all the same."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model_dir)
    req = load_records(model_dir / "edits.jsonl")[0]
    with Editor.open(model_dir) as ed:
        ed.apply(req)
    runner = CliRunner()
    assert runner.invoke(app, ["ledger", "verify", "--model", str(model_dir)]).exit_code == 0
    with open(model_dir / LEDGER_FILE, "ab") as f:
        f.write(os.urandom(5000))
    res = runner.invoke(app, ["ledger", "verify", "--model", str(model_dir)])
    assert res.exit_code != 0 and "appended to" in " ".join(res.output.split()), res.output
