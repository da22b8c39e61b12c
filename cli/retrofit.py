"""``knowedit retrofit`` (add memory layers to a Hugging Face model) and
``knowedit train-memory`` (train them on a corpus)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from knowedit.cli.common import JsonOpt, console, emit_json, friendly


def _table(title: str, report: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for k, v in report.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


def retrofit(
    source: Annotated[Path, typer.Option("--from", help="A local Hugging Face causal-LM directory (config.json, model.safetensors, tokenizer.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new knowedit checkpoint directory.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE settings, e.g. memory.topk=16 memory.heads=4 seed=0.")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Comma-separated block indices that get a memory layer (negative: from the end).", show_default="the last block")] = None,
    slots: Annotated[int | None, typer.Option("--slots", help="Value slots per memory layer (a perfect square).", show_default="65536")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add product-key memory layers beside the MLPs of a Hugging Face causal LM.

    The memory's output projection starts at zero: the new checkpoint's logits equal
    the original's until the memory is trained (knowedit train-memory).
    """
    from knowedit.retrofit import retrofit as run

    report = run(source, out, layers=layers, slots=slots, overrides=list(overrides or []))
    if json_out:
        emit_json(report)
    else:
        _table(f"retrofitted {source} -> {out}", report)


def train_memory(
    model: Annotated[Path, typer.Argument(help="A checkpoint written by knowedit retrofit.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Corpus: .txt (a document a line), JSONL of {text} or {prompt, answer}, or EasyEdit records.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The trained checkpoint directory (new, or the run's own with --resume).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE settings, e.g. max_epochs=10 optim.value_lr=1 train_base=true.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A YAML file of settings (overrides win).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUT/checkpoints/last.ckpt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a retrofitted model's memory layers on a corpus (base weights frozen by default)."""
    from knowedit.recipes.retrofit import load_memory_train_config
    from knowedit.recipes.retrofit import train_memory as run

    cfg = load_memory_train_config(config, list(overrides or []))
    cfg.out = str(out)
    report = run(model, data, cfg, progress=not (quiet or json_out), resume=resume)
    report["out"] = str(out)
    if json_out:
        emit_json(report)
    else:
        _table(f"trained the memory of {model} -> {out}", report)


def register(app: typer.Typer) -> None:
    app.command("retrofit")(friendly(retrofit))
    app.command("train-memory")(friendly(train_memory))
