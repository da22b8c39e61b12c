"""``knowedit demo``: the whole loop on CPU in a few minutes.

Train a small memory LM on a built-in synthetic world, ask it facts, edit one,
ask again, revert, ask again, learn facts about new people by sparse memory
finetuning, ask them and the old facts, revert the learning run, and show the
ledger.
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
    """Train a small model, ask, edit a fact, ask again, revert, learn new facts, revert, show the ledger."""
    from knowedit.checkpoint import MODEL_FILE, file_sha256
    from knowedit.cli.model import config_path
    from knowedit.config import load_train_config
    from knowedit.data import load_records, read_examples
    from knowedit.editor import EditFailed, Editor
    from knowedit.errors import FileAccessError, file_problem
    from knowedit.inference import greedy_exact
    from knowedit.recipes.train import EDITS_FILE, HELDOUT_FILE, REPORT_FILE, train

    say = (lambda *a, **k: None) if json_out else console.print
    t0 = time.monotonic()
    result: dict = {}
    if fresh or not (out / MODEL_FILE).is_file():
        if out.exists():
            try:
                shutil.rmtree(out)
            except OSError as err:
                raise file_problem(out, err, "write") from None
        cfg = load_train_config(str(config_path(recipe)), [])
        cfg.out = str(out)
        say(Panel(f"1. Training the [bold]{cfg.name}[/] memory LM on a synthetic world of "
                  f"{cfg.data.world.entities * cfg.data.world.relations} facts (CPU)", style="cyan"))
        report = train(cfg, progress=not json_out)
    else:
        import json

        try:
            report = json.loads((out / REPORT_FILE).read_text())
        except (OSError, ValueError) as err:
            raise FileAccessError(f"{out} holds no readable {REPORT_FILE} ({getattr(err, 'strerror', None) or err}); rerun with --fresh") from None
        say(Panel(f"1. Reusing the trained model in {out}", style="cyan"))
    result["train"] = report
    say(f"   trained in {report['train_seconds']:.0f} s: greedy accuracy {report['train_greedy_accuracy']:.1%} "
        f"on the training phrasings, {report['heldout_greedy_accuracy']:.1%} on held-out phrasings")

    base_fp = file_sha256(out / MODEL_FILE)
    edits = load_records(out / EDITS_FILE)
    held = read_examples(out / HELDOUT_FILE)
    with Editor.open(out, author="demo") as ed:
        # Pick an edit whose fact the model knows, in both phrasings.
        known = (r for r in edits if ed.ask(r.prompt) == r.ground_truth and ed.ask(r.rephrase_prompt[0]) == r.ground_truth)
        req = next(known)
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
        for _ in range(5):
            try:
                rec = ed.edit(req.prompt, req.target_new, subject=req.subject, note="demo edit")
                break
            except EditFailed as err:  # nothing was committed: show it, take the next known fact
                say(f"   [yellow]{err}[/]; nothing was committed")
                req = next(known)
                probes[:] = [req.prompt, req.rephrase_prompt[0], req.locality_prompt[0]]
                say(Panel(f"3. Edit instead: {req.prompt!r} -> {req.target_new!r}", style="cyan"))
                result["before"] = ask_all("before the edit")
        else:
            raise EditFailed("five edits in a row missed their target")
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
    world = load_train_config(str(config_path(recipe)), []).data.world
    result["learn"] = _learn_step(out, world, held[:400], say, json_out)
    say(Panel("8. The ledger", style="cyan"))
    if not json_out:
        from knowedit.cli.ledger import list_

        list_(out, None, False)
    assert base_fp == file_sha256(out / MODEL_FILE), "the base checkpoint must never change"
    result["seconds"] = round(time.monotonic() - t0, 1)
    say(f"demo finished in {result['seconds']:.0f} s; try: knowedit ask --model {out} \"{req.prompt}\"")
    if json_out:
        emit_json(result)


def _learn_step(out: Path, world_cfg: object, held: list, say: object, json_out: bool) -> dict:
    """6-7: learn facts about three new people by sparse memory finetuning, ask them
    and the old facts, then revert the learning run bit for bit."""
    from dataclasses import replace

    from knowedit.config import load_learn_config
    from knowedit.data import make_world, write_jsonl
    from knowedit.editor import Editor
    from knowedit.inference import greedy_exact
    from knowedit.recipes.learn import learn

    known = {f.subject for f in make_world(world_cfg).facts}
    fresh = [f for f in make_world(replace(world_cfg, entities=6, seed=world_cfg.seed + 7)).facts if f.subject not in known]
    people = sorted({f.subject for f in fresh})[:3]
    facts = [f for f in fresh if f.subject in people]
    rows = [{"prompt": p.format(s=f.subject), "answer": f.object} for f in facts for p in f.train_phrasings]
    data = out / "new_facts.jsonl"
    write_jsonl(data, rows)
    probes = [(p.format(s=f.subject), f.object) for f in facts[:4] for p in f.train_phrasings[:1]]
    say(Panel(f"6. Learn {len(facts)} new facts about {', '.join(people)} ({len(rows)} sentences) "
              "by sparse memory finetuning", style="cyan"))
    from knowedit.data import Example

    with Editor.open(out) as ed:
        held_before = sum(greedy_exact(ed.model, ed.codec, held)) / len(held)
        asked_before = [ed.ask(p) for p, _ in probes]
    cfg = load_learn_config(None, ["epochs=40", "batch_size=8", "lr=30", "top_t=64", "background=answer", "guard_docs=64"])
    report = learn(out, data, cfg, progress=not json_out, author="demo", note="demo learning run")
    (event,) = report["events"]
    with Editor.open(out) as ed:
        asked_after = [ed.ask(p) for p, _ in probes]
        held_after = sum(greedy_exact(ed.model, ed.codec, held)) / len(held)
        learnt = sum(greedy_exact(ed.model, ed.codec, [Example(r["prompt"], r["answer"]) for r in rows])) / len(rows)
        table = Table(title="new facts, before and after learning", title_justify="left")
        for col in ("prompt", "true answer", "before", "after"):
            table.add_column(col)
        for (p, a), b, c in zip(probes, asked_before, asked_after):
            table.add_row(p, a, b, f"[bold]{c}[/]")
        say(table)
        say(f"   learning run {event}: {report['steps']} steps, {report['rows_changed']} value rows changed in "
            f"{report['seconds']:.0f} s; {learnt:.0%} of the {len(rows)} new sentences answered right")
        say(f"   old facts (400 held-out phrasings): {held_before:.1%} right before learning, {held_after:.1%} after")
        say(Panel(f"7. Revert the learning run {event}", style="cyan"))
        ed.revert(event, note="demo revert of the learning run")
        identical = all(torch_equal(ed.pools[p], ed.base[p]) for p in ed.pools)
        problems = ed.verify()
        say(f"   memory values bit-identical to the base: [bold]{identical}[/]; ledger verify: "
            f"{'ok' if not problems else problems}")
    return {"event": event, "facts": len(facts), "sentences": len(rows), "steps": report["steps"],
            "rows_changed": report["rows_changed"], "new_accuracy": learnt, "heldout_accuracy_before": held_before,
            "heldout_accuracy_after": held_after, "bit_identical_after_revert": identical, "verify_problems": problems}


def torch_equal(a: object, b: object) -> bool:
    import torch

    return bool(torch.equal(a, b))  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.command("demo")(friendly(demo))
