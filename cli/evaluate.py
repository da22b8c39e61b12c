"""``knowedit eval``: sequential-editing evaluation (reliability, generalization,
locality, teacher-forced and greedy) of one edit method on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from knowedit.cli.common import JsonOpt, ModelOpt, console, emit_json, friendly, parse_options
from knowedit.errors import OptionError, file_problem


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_tables(res: dict) -> tuple[Table, Table]:
    """The headline numbers of one :func:`knowedit.evaluate.evaluate` result:
    the scores in both modes, and what the edits cost."""
    scores = Table(title=f"{res['method']}: {res['T']} sequential edit(s) on {res['model']}", title_justify="left")
    scores.add_column("final model")
    scores.add_column("teacher-forced", justify="right")
    scores.add_column("greedy", justify="right")
    scores.add_column("scored", justify="right", style="dim")
    rows = [
        ("Reliability", "reliability"),
        ("Generalization", "generalization"),
        ("Locality", "locality"),
        ("Portability", "portability"),
        ("Base accuracy (true facts, before editing)", "base_accuracy"),
        ("New targets before editing", "targets_before"),
    ]
    for label, key in rows:
        m = res.get(key)
        if m is None:  # portability: no record has portability prompts
            continue
        left_out = f" ({m['excluded']} edited, left out)" if m.get("excluded") else ""
        scores.add_row(label, _fmt(m["teacher_forced"]), _fmt(m["greedy"]), f"{m['prompts']} prompts{left_out}")
    t = res["edit_seconds"]
    cost = Table(title="per edit", title_justify="left")
    cost.add_column("")
    cost.add_column("value", justify="right")
    cost.add_row("Success at apply time", f"{res['success_rate']:.3f}")
    cost.add_row("Edit time, s: median / p95 / total", f"{t['median']:.3f} / {t['p95']:.3f} / {t['total']:.1f}")
    b = res.get("batch_seconds")
    if b:
        cost.add_row(f"Batch of {res['batch']} time, s: median / p95", f"{b['median']:.3f} / {b['p95']:.3f}")
    cost.add_row("Slots touched (median)", f"{res['slots_touched']['median']:.0f}")
    cost.add_row("Parameters touched (median)", f"{res['params_touched']['median']:.0f}")
    cost.add_row("Optimiser steps (median)", f"{res['steps']['median']:.0f}")
    return scores, cost


def eval_cmd(
    model: ModelOpt,
    edits: Annotated[Path, typer.Option("--edits", "-e", help="EasyEdit-format records (JSON list or JSONL).")],
    n: Annotated[int | None, typer.Option("--n", help="Edits to apply sequentially (T); default: all records.")] = None,
    method: Annotated[str, typer.Option("--method", help="sparse (knowedit), ft, ft-memory or lora.")] = "sparse",
    option: Annotated[
        list[str] | None, typer.Option("--option", help="Method setting KEY=VALUE, e.g. max_steps=50 (repeatable).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the full results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG (Rel over t; final Rel, Gen, Loc) into this directory, under a new name each run.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "cpu",
    threads: Annotated[
        int,
        typer.Option(help="CPU threads for torch (0: its default, which depends on the machine). Results repeat for a given --seed and thread count."),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seeds Python's, NumPy's and torch's random generators before the run.")] = 0,
    batch: Annotated[int, typer.Option("--batch", help="Apply the edits N at a time, each group as one batch edit (sparse only).")] = 1,
    json_out: JsonOpt = False,
) -> None:
    """Apply T edits one after another, then score the final model on all T:
    reliability, generalization and locality, teacher-forced and greedy.

    Never writes the model directory or its ledger: the sparse method edits a
    temporary copy with a throwaway ledger; the baselines an in-memory model.
    On CPU the numbers repeat for a given --seed and --threads.
    """
    from knowedit.baselines import METHODS
    from knowedit.data import load_records
    from knowedit.evaluate import evaluate, new_plot_path, plot_run

    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if n is not None and n < 1:
        raise OptionError(f"--n must be at least 1, got {n}")
    import torch

    if threads < 0:
        raise OptionError(f"--threads must be >= 0 (0: torch's default), got {threads}")
    if seed < 0:
        raise OptionError(f"--seed must be >= 0, got {seed}")
    if batch < 1:
        raise OptionError(f"--batch must be at least 1, got {batch}")
    if batch > 1 and method != "sparse":
        raise OptionError(f"--batch goes with --method sparse (the {method} baseline edits one fact at a time)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = parse_options(option or [])
    reqs = load_records(edits)
    if not reqs:
        raise OptionError(f"{edits} holds no records")
    total = min(n, len(reqs)) if n is not None else len(reqs)
    prior_threads = torch.get_num_threads()
    try:
        # Float sums split across threads add up in another order: the same seed
        # gives the same numbers only with the same thread count.
        if threads:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        _seed_everything(seed)
        with Progress(
            TextColumn(f"{method}: editing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=json_out, transient=True,
        ) as bar:
            task = bar.add_task("edit", total=total)
            res = evaluate(model, reqs, n=n, method=method, options=options, device=device,
                           on_edit=lambda _t, _o: bar.advance(task), batch=batch)
    finally:
        torch.set_num_threads(prior_threads)
    res["edits_file"] = str(edits)
    res["threads"] = used_threads
    res["seed"] = seed
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(res, indent=2))
        except OSError as err:
            raise file_problem(f"--out {out}", err, "write") from None
    if plot is not None:
        res["plot"] = str(plot_run(res, new_plot_path(plot, method, res["T"])))
    if json_out:
        emit_json(res)
        return
    for table in results_tables(res):
        console.print(table)
    if out is not None:
        console.print(f"results: {out}")
    if plot is not None:
        console.print(f"retention curve: {res['plot']}")


def _seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def register(app: typer.Typer) -> None:
    app.command("eval")(friendly(eval_cmd))
