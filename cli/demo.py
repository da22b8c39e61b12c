"""``knowedit demo``: the whole loop on CPU in a few minutes.

Train a small memory LM on a built-in synthetic world, ask it facts, edit one,
ask again, revert, ask again, and show the ledger.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from knowedit.cli.common import JsonOpt, console, emit_json, friendly


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo model goes.")] = Path("runs/demo"),
    recipe: Annotated[str, typer.Option(help="Recipe to train (a shipped name or a YAML path).")] = "small",
    fresh: Annotated[bool, typer.Option("--fresh/--reuse", help="Retrain even if OUT holds a demo model.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Train a small model, ask, edit a fact, ask again, revert, ask, show the ledger."""
    from knowedit.checkpoint import MODEL_FILE, file_sha256
    from knowedit.cli.model import config_path
    from knowedit.config import load_train_config
    from knowedit.data import load_records, read_examples
    from knowedit.editor import Editor
    from knowedit.inference import greedy_exact
    from knowedit.recipes.train import EDITS_FILE, HELDOUT_FILE, REPORT_FILE, train

    say = (lambda *a, **k: None) if json_out else console.print
    t0 = time.monotonic()
    result: dict = {}
    if fresh or not (out / MODEL_FILE).is_file():
        if out.exists():
            shutil.rmtree(out)
        cfg = load_train_config(str(config_path(recipe)), [])
        cfg.out = str(out)
        say(Panel(f"1. Training the [bold]{cfg.name}[/] memory LM on a synthetic world of "
                  f"{cfg.data.world.entities * cfg.data.world.relations} facts (CPU)", style="cyan"))
        report = train(cfg, progress=not json_out)
    else:
        import json

        report = json.loads((out / REPORT_FILE).read_text())
        say(Panel(f"1. Reusing the trained model in {out}", style="cyan"))
    result["train"] = report
    say(f"   trained in {report['train_seconds']:.0f} s: greedy accuracy {report['train_greedy_accuracy']:.1%} "
        f"on the training phrasings, {report['heldout_greedy_accuracy']:.1%} on held-out phrasings")

    base_fp = file_sha256(out / MODEL_FILE)
    edits = load_records(out / EDITS_FILE)
    held = read_examples(out / HELDOUT_FILE)
    with Editor.open(out, author="demo") as ed:
        # Pick an edit whose fact the model knows, in both phrasings.
        req = next(r for r in edits if ed.ask(r.prompt) == r.ground_truth and ed.ask(r.rephrase_prompt[0]) == r.ground_truth)
        probes = [req.prompt, req.rephrase_prompt[0], req.locality_prompt[0]]

        def ask_all(title: str) -> list[str]:
            answers = [ed.ask(p) for p in probes]
            table = Table(title=title, title_justify="left")
            table.add_column("prompt")
            table.add_column("answer", style="bold")
            for p, a, kind in zip(probes, answers, ("edited fact", "held-out paraphrase", "unrelated fact")):
                table.add_row(f"{p}  [dim]({kind})[/]", a)
            say(table)
            return answers

        say(Panel("2. Ask", style="cyan"))
        result["before"] = ask_all("before the edit")
        sample = held[:400]
        result["heldout_accuracy_before_edit"] = sum(greedy_exact(ed.model, ed.codec, sample)) / len(sample)
        say(Panel(f"3. Edit: {req.prompt!r} -> {req.target_new!r}", style="cyan"))
        rec = ed.edit(req.prompt, req.target_new, subject=req.subject, note="demo edit")
        m = rec.metrics
        say(f"   edit {rec.id}: {len(rec.slots)} value rows changed in {m['total_ms']:.0f} ms "
            f"({m['steps']} steps, p(target) {m['prob_before']:.3f} -> {m['prob_after']:.3f}, ledger {m['ledger_ms']:.1f} ms)")
        result["edit"] = rec.to_dict()
        say(Panel("4. Ask again", style="cyan"))
        result["after_edit"] = ask_all("after the edit")
        result["heldout_accuracy_after_edit"] = sum(greedy_exact(ed.model, ed.codec, sample)) / len(sample)
        say(f"   400 held-out phrasings (never trained on): {result['heldout_accuracy_before_edit']:.1%} right "
            f"before the edit, {result['heldout_accuracy_after_edit']:.1%} after")
        say(Panel(f"5. Revert {rec.id}", style="cyan"))
        ed.revert(rec.id, note="demo revert")
        result["after_revert"] = ask_all("after the revert")
        problems = ed.verify()
        identical = all(torch_equal(ed.pools[p], ed.base[p]) for p in ed.pools)
        result["bit_identical_to_base"] = identical
        result["verify_problems"] = problems
        say(f"   memory values bit-identical to the base: [bold]{identical}[/]; ledger verify: "
            f"{'ok' if not problems else problems}")
    say(Panel("6. The ledger", style="cyan"))
    if not json_out:
        from knowedit.cli.ledger import list_

        list_(out, None, False)
    assert base_fp == file_sha256(out / MODEL_FILE), "the base checkpoint must never change"
    result["seconds"] = round(time.monotonic() - t0, 1)
    say(f"demo finished in {result['seconds']:.0f} s; try: knowedit ask --model {out} \"{req.prompt}\"")
    if json_out:
        emit_json(result)


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.command("demo")(friendly(demo))
