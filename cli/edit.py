"""``knowedit edit apply`` and ``knowedit edit revert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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
    parse_options,
)

app = typer.Typer(help="Apply and revert edits.", no_args_is_help=True)


def _default(name: str) -> object:
    """The library's default of an edit option: the CLI never has its own."""
    from knowedit.edit_options import EditOptions

    return getattr(EditOptions(), name)


def _record_row(rec: object) -> dict:
    d = rec.to_dict()  # type: ignore[attr-defined]
    d["slots"] = [list(s) for s in d["slots"]]
    return d


def _failure_row(index: int, err: object) -> dict:
    """One failed request of a batch (``index`` counts from 0, as in the file)."""
    req, m = err.request, err.metrics  # type: ignore[attr-defined]
    return {
        "index": index, "prompt": req.prompt, "target_new": req.target_new, "subject": req.subject,
        "prob_after": m["prob_after"], "steps": m["steps"], "error": str(err),
    }


@app.command("apply")
@friendly
def apply(
    model: ModelOpt,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The fact's prompt.")] = None,
    target: Annotated[str | None, typer.Option("--target", "-t", help="The new answer.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", "-s", help="Subject as written in the prompt.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="EasyEdit-format JSON or JSONL requests.")] = None,
    ledger: LedgerOpt = None,
    top_t: Annotated[int, typer.Option(help="Value rows to update per edit.")] = _default("top_t"),  # type: ignore[assignment]
    max_steps: Annotated[int, typer.Option(help="Optimisation step budget per edit.")] = _default("max_steps"),  # type: ignore[assignment]
    conflict: Annotated[str, typer.Option(help="Slots owned by live edits: joint or avoid.")] = _default("conflict"),  # type: ignore[assignment]
    allow_failed: Annotated[
        bool,
        typer.Option("--allow-failed", help="Commit an edit even when it does not reach its target (default: refuse it, write nothing, exit 1)."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="With --file: skip requests already live in the ledger (finish a batch that stopped, retry the failed ones).")
    ] = False,
    batch: Annotated[
        int,
        typer.Option("--batch", help="With --file: apply the requests N at a time, each group in one optimisation and one "
                     "ledger event (reverting its id reverts the group)."),
    ] = 1,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Any other edit option KEY=VALUE, e.g. prompt_weight=1.0 (repeatable; "
                     "the options and their defaults: docs/editing.md)."),
    ] = None,
    author: Annotated[str | None, typer.Option(help="Recorded in the ledger.")] = None,
    note: Annotated[str | None, typer.Option(help="Free text recorded in the ledger.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Apply one edit (--prompt/--target) or many (--file), each logged in the ledger.

    An edit that does not reach its target is not committed: the command names
    it and exits 1 (--allow-failed keeps it). A batch goes on with the other
    requests, then lists the failed ones and exits 1; rerun it with --resume.
    """
    from knowedit.editor import BatchFailed, Editor

    if (file is None) == (prompt is None and target is None):
        raise fail("give either --prompt and --target, or --file")
    if file is None and (prompt is None or target is None):
        raise fail("--prompt and --target go together")
    if resume and file is None:
        raise fail("--resume goes with --file")
    if batch != 1 and file is None:
        raise fail("--batch goes with --file")
    if batch < 1:
        raise fail(f"--batch must be at least 1, got {batch}")
    if max_steps < 1:
        raise fail(f"--max-steps must be at least 1, got {max_steps} (with no step nothing would change)")
    opts = {"top_t": top_t, "max_steps": max_steps, "conflict": conflict}
    extra = parse_options(option or [])
    clash = sorted(set(extra) & set(opts))
    if clash:
        raise fail(f"--option {clash[0]}=... : use --{clash[0].replace('_', '-')} for that one")
    opts.update(extra)
    from knowedit.edit_options import EditOptions

    try:
        EditOptions.from_mapping(opts)
    except ValueError as err:
        raise fail(str(err)) from None
    failed: list[dict] = []
    skipped = 0
    with Editor.open(model, ledger=ledger, author=author) as ed:
        if file is None:
            recs = [ed.edit(prompt, target, subject, note=note, allow_failed=allow_failed, **opts)]  # type: ignore[arg-type]
        else:
            from knowedit.data import load_records

            reqs = load_records(file)
            with Progress(
                TextColumn("editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, disable=json_out, transient=True,
            ) as bar:
                task = bar.add_task("edit", total=len(reqs))
                try:
                    recs = ed.edit_many(
                        reqs, on_edit=lambda _r: bar.advance(task), on_fail=lambda _i, _e: bar.advance(task),
                        resume=resume, note=note, allow_failed=allow_failed, batch=batch, **opts,
                    )
                except BatchFailed as err:
                    recs = err.applied
                    failed = [_failure_row(i, e) for i, e in err.failed]
            skipped = len(reqs) - sum(_n_requests(r) for r in recs) - len(failed)
    if json_out:
        rows = [_record_row(r) for r in recs]
        emit_json(rows[0] if file is None else {"applied": rows, "failed": failed, "skipped": skipped})
    else:
        _print_applied(recs, failed, skipped)
    if failed:
        which = ", ".join(f"{f['index']} ({f['prompt']!r})" for f in failed)
        raise fail(
            f"{len(failed)} edit(s) did not reach their targets and were not written: request(s) {which}; "
            "rerun with more --max-steps and --resume to retry only those, or keep them with --allow-failed"
        )


def _n_requests(rec: object) -> int:
    """Requests one applied record covers (a batch's, or 1)."""
    return len(rec.metrics.get("requests") or [None])  # type: ignore[attr-defined]


def _print_applied(recs: list, failed: list[dict], skipped: int) -> None:
    table = Table(title=f"{len(recs)} edit(s) applied" + (f", {skipped} already live (skipped)" if skipped else ""))
    add_id_column(table, [r.id for r in recs])
    for col in ("prompt", "target", "slots", "steps", "p before", "p after", "ok", "ms"):
        table.add_column(col)
    for r in recs:
        m = r.metrics
        table.add_row(
            r.id, r.prompt + (f" (batch of {_n_requests(r)})" if _n_requests(r) > 1 else ""), r.target_new, str(len(r.slots)), str(m["steps"]), f"{m['prob_before']:.3f}",
            f"{m['prob_after']:.3f}", "yes" if m["success"] else "[red]no[/]", f"{m['total_ms']:.0f}",
        )
    console.print(table)
    for r in recs:
        for c in r.conflicts:
            console.print(f"[yellow]{r.id}: shared slots with live edit {c['edit']} ({len(c['slots'])}), {c['resolution']}[/]")
    if failed:
        bad = Table(title=f"{len(failed)} edit(s) not applied (target not reached)", title_style="red")
        for col in ("request", "prompt", "target", "p after", "steps"):
            bad.add_column(col)
        for f in failed:
            bad.add_row(str(f["index"]), f["prompt"], f["target_new"], f"{f['prob_after']:.3f}", str(f["steps"]))
        console.print(bad)


@app.command("revert")
@friendly
def revert(
    model: ModelOpt,
    edit_id: Annotated[str | None, typer.Argument(help="The edit to revert.")] = None,
    cascade: Annotated[bool, typer.Option("--cascade", help="First revert later edits that changed the same slots.")] = False,
    to: Annotated[str | None, typer.Option("--to", help="Return to the state right after this edit.")] = None,
    ledger: LedgerOpt = None,
    author: Annotated[str | None, typer.Option(help="Recorded in the ledger.")] = None,
    note: Annotated[str | None, typer.Option(help="Free text recorded in the ledger.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Revert an edit bit for bit (or, with --to, every edit after one)."""
    from knowedit.editor import Editor

    if (edit_id is None) == (to is None):
        raise fail("give an edit ID, or --to ID")
    with Editor.open(model, ledger=ledger, author=author) as ed:
        done = ed.revert(edit_id, cascade=cascade, note=note) if edit_id else ed.revert_to(to, note=note)  # type: ignore[arg-type]
        live = ed.live_edits()
    if json_out:
        emit_json({"reverted": done, "live_edits": live})
    else:
        console.print(f"reverted {', '.join(done) if done else 'nothing'}; {len(live)} live edit(s) remain")
