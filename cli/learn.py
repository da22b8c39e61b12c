"""``knowedit learn``: continual learning by sparse memory finetuning (or a dense baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from knowedit.cli.common import JsonOpt, LedgerOpt, ModelOpt, console, emit_json, fail, friendly


def shipped_learn_configs() -> list[str]:
    """Names of the learning configs shipped with the package (``--config NAME``)."""
    from importlib.resources import files

    root = files("knowedit.recipes") / "configs" / "learn"
    return sorted(Path(str(f)).stem for f in root.iterdir() if str(f).endswith(".yaml"))


def learn_config_path(name: str) -> Path:
    """A learning config path, or the name of a shipped one."""
    p = Path(name)
    if p.is_file():
        return p
    from importlib.resources import files

    shipped = Path(str(files("knowedit.recipes") / "configs" / "learn" / f"{name}.yaml"))
    if shipped.is_file():
        return shipped
    raise fail(f"no learning config {name!r}: not a file and not a shipped one ({', '.join(shipped_learn_configs())})")


def learn(
    model: ModelOpt,
    data: Annotated[Path, typer.Option("--data", "-d", help="New knowledge: .txt (a document a line), JSONL of {text} or {prompt, answer}, or EasyEdit records.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE settings, e.g. top_t=128 lr=2 method=lora.")] = None,
    config: Annotated[str, typer.Option("--config", "-c", help="A YAML file or a shipped config: sparse, ft, ft-memory, lora.")] = "sparse",
    ledger: LedgerOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Dense methods only: the new checkpoint directory.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Sparse: continue the same run after its last committed step.")] = False,
    author: Annotated[str | None, typer.Option(help="Recorded in the ledger.")] = None,
    note: Annotated[str | None, typer.Option(help="Free text recorded in the ledger.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Learn new knowledge by sparse memory finetuning: a revertible ledger event."""
    from knowedit.config import load_learn_config
    from knowedit.recipes.learn import learn as run_learn

    cfg = load_learn_config(learn_config_path(config), list(overrides or []))
    report = run_learn(model, data, cfg, ledger=ledger, out=out, resume=resume, progress=not (quiet or json_out),
                       author=author, note=note)
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"learn ({report['method']}) on {data}")
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for k, v in report.items():
        if k in ("settings", "live_edits"):
            continue
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("learn")(friendly(learn))
