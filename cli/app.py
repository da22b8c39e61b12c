"""The ``knowedit`` command line: one sub-app per noun (``edit``, ``ledger``)."""

from __future__ import annotations

import typer

from knowedit.cli.common import JsonOpt, console, emit_json, friendly

app = typer.Typer(
    name="knowedit",
    help="Edit the facts of memory-layer language models; audit and roll back every edit.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from knowedit.cli import demo, edit, evaluate, learn, ledger, model, retrofit, serve

    app.add_typer(edit.app, name="edit")
    app.add_typer(ledger.app, name="ledger")
    model.register(app)
    demo.register(app)
    evaluate.register(app)
    learn.register(app)
    retrofit.register(app)
    serve.register(app)


@app.callback()
def _root() -> None:
    """knowedit: change a fact in milliseconds, touch nothing else, show what changed, undo it bit for bit."""


_register()


@app.command("version")
@friendly
def version(json_out: JsonOpt = False) -> None:
    """Print the knowedit version."""
    from knowedit import __version__

    if json_out:
        emit_json({"version": __version__})
    else:
        console.print(__version__)


__all__ = ["app", "main"]


def main() -> None:
    app()
