"""``knowedit ledger list|show|verify|export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from knowedit.cli.common import (
    JsonOpt,
    LedgerOpt,
    ModelOpt,
    add_id_column,
    console,
    emit_json,
    fail,
    friendly,
)
from knowedit.events import event_detail, event_summary

app = typer.Typer(help="Inspect, verify and export the edit ledger.", no_args_is_help=True)


def open_existing_ledger(model: Path, ledger: str | None):  # noqa: ANN202
    """The ledger, checked against the model's base fingerprint, without creating one:
    a missing ledger (a mistyped --ledger too) is a one-line error."""
    from knowedit.checkpoint import LEDGER_FILE, MODEL_FILE, model_fingerprint
    from knowedit.ledger import Ledger, LedgerMissing, is_in_memory

    if ledger is not None and is_in_memory(ledger):
        raise fail(f"ledger {ledger!r} is in memory: it holds nothing a command could read; give a file path or a database URL")
    if not (model / MODEL_FILE).is_file():
        raise fail(f"{model} is not a knowedit checkpoint (missing {MODEL_FILE})")
    url = ledger if ledger is not None else str(model / LEDGER_FILE)
    try:
        return Ledger(url, model_fingerprint(model / MODEL_FILE), create=False)
    except LedgerMissing as err:
        hint = "no edit has been applied yet" if ledger is None else "check the --ledger path or URL"
        raise fail(f"{err}: {hint}") from None



@app.command("list")
@friendly
def list_(model: ModelOpt, ledger: LedgerOpt = None, json_out: JsonOpt = False) -> None:
    """List every event, oldest first."""
    led = open_existing_ledger(model, ledger)
    events = led.events()
    live = {e.edit_id for e in led.live_edits()}
    rows = [event_summary(e, live) for e in events]
    led.close()
    if json_out:
        emit_json(rows)
        return
    table = Table(title=f"ledger: {len(rows)} event(s), {len(live)} live edit(s)")
    table.add_column("seq")
    table.add_column("kind")
    add_id_column(table, [r["id"] for r in rows])
    table.add_column("when")
    for col in ("prompt", "target", "slots", "live"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["seq"]), r["kind"], r["id"], r["created_at"][:19], r["prompt"] or "", r["target_new"] or "",
            str(r["slots"]), "yes" if r["live"] else "",
        )
    console.print(table)


@app.command("show")
@friendly
def show(
    edit_id: Annotated[str, typer.Argument(help="Edit id.")],
    model: ModelOpt,
    ledger: LedgerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one edit: request, settings, metrics and the slots it changed."""
    led = open_existing_ledger(model, ledger)
    ev = led.get(edit_id)
    out = event_detail(ev, led.is_live(edit_id))
    led.close()
    if json_out:
        emit_json(out)
        return
    console.print_json(json.dumps({k: v for k, v in out.items() if k != "rows"}, default=str))
    console.print(f"{len(out['rows'])} row(s) changed: " + ", ".join(f"{r['pool']}[{r['slot']}]" for r in out["rows"][:20]))


@app.command("verify")
@friendly
def verify(model: ModelOpt, ledger: LedgerOpt = None, json_out: JsonOpt = False) -> None:
    """Recompute the hash chain and check the live rows equal base + the live edits."""
    from knowedit.editor import Editor
    from knowedit.ledger import LedgerError

    open_existing_ledger(model, ledger).close()  # a missing ledger is an error, never a new one
    try:
        with Editor.open(model, ledger=ledger) as ed:
            problems = ed.verify()
            n = len(ed.history())
    except LedgerError as err:
        # The ledger cannot even be replayed: report what the hash chain says.
        led = open_existing_ledger(model, ledger)
        try:
            problems = led.verify_chain() or [str(err)]
            n = led.last_seq()
        finally:
            led.close()
    if json_out:
        emit_json({"ok": not problems, "events": n, "problems": problems})
    elif problems:
        for p in problems:
            console.print(f"[red]{p}[/]", highlight=False)
    else:
        console.print(f"[green]ledger verified[/]: {n} event(s), chain intact, live rows = base + live edits")
    if problems:
        raise typer.Exit(1)


@app.command("export")
@friendly
def export(
    model: ModelOpt,
    ledger: LedgerOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write JSONL here.", show_default="stdout")] = None,
) -> None:
    """Export every event as JSONL (rows as base64 bytes with dtype and shape)."""
    led = open_existing_ledger(model, ledger)
    if out is None:
        led.export_jsonl(sys.stdout)
    else:
        from knowedit.errors import file_problem

        try:
            f = open(out, "w", encoding="utf-8")  # noqa: SIM115 - closed just below
        except OSError as err:
            led.close()
            raise file_problem(f"--out {out}", err, "write") from None
        with f:
            n = led.export_jsonl(f)
        console.print(f"wrote {n} event(s) to {out}")
    led.close()
