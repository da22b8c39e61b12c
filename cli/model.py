"""``knowedit train``, ``ask``, ``stats``, ``locate`` and ``export``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from knowedit.cli.common import JsonOpt, LedgerOpt, ModelOpt, console, emit_json, fail, friendly

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (``knowedit train NAME``)."""
    from importlib.resources import files

    root = files("knowedit.recipes") / "configs"
    return sorted(Path(str(f)).stem for f in root.iterdir() if str(f).endswith(".yaml"))


def config_path(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (see :func:`shipped_recipes`)."""
    p = Path(name)
    if p.is_file():
        return p
    from importlib.resources import files

    shipped = Path(str(files("knowedit.recipes") / "configs" / f"{name}.yaml"))
    if shipped.is_file():
        return shipped
    raise fail(f"no recipe {name!r}: not a file and not a shipped recipe ({', '.join(shipped_recipes())})")


def train(
    config: Annotated[str, typer.Argument(help=f"Recipe YAML path, or a shipped recipe name: {', '.join(shipped_recipes())}.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE overrides, e.g. model.d_model=64.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint directory.", show_default="runs/NAME")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from OUT/checkpoints/last.ckpt (same recipe and overrides).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a memory LM from a recipe and write a checkpoint directory.

    A trainer.KEY=VALUE override passes an argument to lightning.Trainer.
    """
    from knowedit.config import load_train_config
    from knowedit.recipes.train import train as run_train

    recipe = config_path(config)
    cfg = load_train_config(str(recipe), list(overrides or []))
    cfg.out = str(out if out is not None else Path("runs") / cfg.name)
    report = run_train(cfg, progress=not (quiet or json_out), config_dir=recipe.parent, resume=resume)
    if report.get("rank", 0):  # a memory-parallel run's other ranks: rank 0 reports and writes
        return
    report["out"] = cfg.out
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"trained {cfg.name} -> {cfg.out}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt to complete.")],
    model: ModelOpt,
    ledger: LedgerOpt = None,
    base: Annotated[bool, typer.Option("--base", help="Ask the base model, ignoring the ledger.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Greedy completion by the model (base + the ledger's live edits, when a ledger exists)."""
    # The checkpoint, not the editor: with no ledger there is nothing to replay (no FAISS, no SQLAlchemy).
    from knowedit.checkpoint import LEDGER_FILE, load_checkpoint
    from knowedit.inference import greedy

    if not base and (ledger is not None or (model / LEDGER_FILE).exists()):
        from knowedit.cli.ledger import open_existing_ledger
        from knowedit.editor import Editor

        open_existing_ledger(model, ledger).close()  # a mistyped --ledger is an error, not the base model

        with Editor.open(model, ledger=ledger, read_only=True) as ed:
            answer, live = ed.ask(prompt, max_new_tokens), len(ed.live_edits())
    else:
        ck = load_checkpoint(model)
        answer, live = greedy(ck.model, ck.codec, [prompt], max_new_tokens)[0], 0
    if json_out:
        emit_json({"prompt": prompt, "answer": answer, "live_edits": live})
    else:
        console.print(f"{prompt} [bold green]{answer}[/]", highlight=False)


def stats(
    model: ModelOpt,
    corpus: Annotated[
        Path | None, typer.Option(help="JSONL of {prompt, answer} or EasyEdit records.", show_default="MODEL/corpus.jsonl")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and show the usage, store nothing.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Compute background slot usage over the training corpus (or another) and store it in MODEL."""
    from knowedit.checkpoint import load_checkpoint
    from knowedit.side_files import CORPUS_FILE, build_stats

    ck = load_checkpoint(model)
    src = corpus or model / CORPUS_FILE
    if not src.is_file():
        raise fail(f"no corpus at {src}; pass --corpus")
    docs = _read_corpus(src)
    if not docs:
        raise fail(f"{src} holds no documents")
    with Progress(console=console, disable=json_out, transient=True) as bar:
        task = bar.add_task("scanning corpus", total=len(docs))
        st = build_stats(ck, docs, on_batch=lambda n: bar.update(task, completed=n), persist=not dry_run)
    out = {"documents": st.n_docs, "pools": {p: st.usage(p) for p in st.df}, "stored": not dry_run}
    if json_out:
        emit_json(out)
        return
    table = Table(title=f"slot usage over {st.n_docs} documents")
    for col in ("pool", "slots", "used fraction", "KL(usage || uniform)", "share on the top 1% of slots"):
        table.add_column(col)
    for p in st.df:
        u = st.usage(p)
        table.add_row(p, str(st.df[p].numel()), f"{u['used_fraction']:.3f}", f"{u['kl_uniform']:.3f}", f"{u['top1pct_share']:.3f}")
    console.print(table)


def _read_corpus(path: Path) -> list:
    """JSONL of ``{prompt, answer}`` documents, or EasyEdit records (their true facts)."""
    from knowedit.data import load_records, read_examples, true_fact_examples
    from knowedit.data.records import RecordError

    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError as err:
        raise fail(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise fail(f"{path} is not UTF-8 text") from None
    if first.startswith("{") and '"answer"' in first:
        try:
            return read_examples(path)
        except RecordError as err:
            raise fail(f"not a JSONL file of {{prompt, answer}} objects: {err}") from None
    return true_fact_examples(load_records(path))


def locate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The fact's prompt.")],
    target: Annotated[str, typer.Option("--target", "-t", help="The answer whose slots to find.")],
    subject: Annotated[str | None, typer.Option("--subject", "-s", help="Subject as written in the prompt.")] = None,
    top: Annotated[int, typer.Option("--top", help="Slots to show.")] = 16,
    widen: Annotated[int, typer.Option(help="Search widen x k slots per head.")] = 1,
    ledger: LedgerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the memory slots a fact reads, ranked by access weight x IDF."""
    from knowedit.editor import Editor

    if top < 1:
        raise fail("--top must be >= 1")
    if ledger is not None:
        from knowedit.cli.ledger import open_existing_ledger

        open_existing_ledger(model, ledger).close()
    with Editor.open(model, ledger=ledger, read_only=True) as ed:
        loc = ed.locate(prompt, target, subject, widen=widen)
    rows = [vars(s) for s in loc.top(top)]
    if json_out:
        emit_json({"positions": loc.positions, "candidates": len(loc.ranked), "slots": rows})
        return
    table = Table(title=f"{len(loc.ranked)} candidate slots; query positions {loc.positions}")
    for col in ("pool", "slot", "score", "weight", "idf"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["pool"], str(r["slot"]), f"{r['score']:.4f}", f"{r['weight']:.4f}", f"{r['idf']:.3f}")
    console.print(table)


def export(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The new checkpoint directory (must not exist, or be empty).")],
    ledger: LedgerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write base + live edits as a new self-contained checkpoint directory.

    It gets the weights, config, tokenizer, a copy of corpus.jsonl (its slot
    statistics are rebuilt from it on first use) and provenance.json (source,
    fingerprints, ledger head and the live edit ids). Its ledger starts empty.
    """
    import json

    from knowedit.editor import PROVENANCE_FILE, Editor

    if ledger is not None:
        from knowedit.cli.ledger import open_existing_ledger

        open_existing_ledger(model, ledger).close()  # a mistyped --ledger is an error, not the base model
    with Editor.open(model, ledger=ledger, read_only=True) as ed:
        path = ed.save(out)
    provenance = json.loads((path / PROVENANCE_FILE).read_text(encoding="utf-8"))
    if json_out:
        emit_json({"out": str(path), **provenance})
        return
    console.print(
        f"exported {provenance['source']} with {len(provenance['live_edits'])} live edit(s) to {path}; "
        f"fingerprint {provenance['fingerprint'][:16]}, provenance in {path / PROVENANCE_FILE}",
        highlight=False, soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app.command("train")(friendly(train))
    app.command("ask")(friendly(ask))
    app.command("stats")(friendly(stats))
    app.command("locate")(friendly(locate))
    app.command("export")(friendly(export))
