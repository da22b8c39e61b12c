"""``knowedit serve``: the model behind an HTTP API (see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from knowedit.cli.common import LedgerOpt, ModelOpt, fail, friendly

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def serve(
    model: ModelOpt,
    ledger: LedgerOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; a non-loopback one needs --token-file.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token_file: Annotated[
        Path | None,
        typer.Option("--token-file", help="File holding the bearer token for edits and reverts (chmod 600). "
                     "Without it the server is read-only."),
    ] = None,
    protect_reads: Annotated[
        bool, typer.Option("--protect-reads", help="Reads (ask, generate, ledger) need the token too.")
    ] = False,
    threads: Annotated[int, typer.Option(help="Torch threads for the model.")] = 1,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 1 << 20,
    author: Annotated[str | None, typer.Option(help="Recorded with each edit unless the request names one.")] = None,
    log_level: Annotated[str, typer.Option(help=f"Server log level: {', '.join(LOG_LEVELS)}.")] = "info",
) -> None:
    """Serve one model over HTTP: ask, generate, edit, revert, ledger list/show/verify, /health, /docs."""
    try:
        from knowedit.server import ServeError, ServerConfig, load_token, run
    except ImportError as err:
        raise fail(f"knowedit serve needs FastAPI and uvicorn ({err.name} is missing): pip install 'knowedit[serve]'") from None

    if log_level not in LOG_LEVELS:
        raise fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    try:
        token = load_token(token_file) if token_file is not None else None
        cfg = ServerConfig(
            model_dir=model, ledger=ledger, host=host, port=port, token=token, protect_reads=protect_reads,
            threads=threads, max_body=max_body, author=author,
        )
        cfg.check()
    except ServeError as err:
        raise fail(str(err)) from None
    run(cfg, log_level=log_level)


def register(app: typer.Typer) -> None:
    """Add ``knowedit serve`` to the app."""
    app.command("serve")(friendly(serve))
