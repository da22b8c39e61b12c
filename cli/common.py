"""Shared CLI plumbing: consoles, JSON output, and errors as messages."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (from `knowedit train`).")]
LedgerOpt = Annotated[
    str | None, typer.Option("--ledger", help="Ledger path or SQLAlchemy URL.", show_default="MODEL/ledger.db")
]


def parse_options(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs (``--option``); values are read as JSON where they parse
    (numbers, booleans), else kept as strings."""
    from knowedit.errors import OptionError

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"option {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, shown as one message and exit 1.

    Only :class:`~knowedit.errors.KnoweditError`: every problem with the user's
    input or environment is raised as one (converted where the input is read).
    Anything else is a bug and shows its traceback.
    """
    from knowedit.errors import KnoweditError

    return (KnoweditError,)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr and return the ``typer.Exit`` to raise.

    The message is shown as it is: brackets in it (``knowedit[postgres]``, a
    list of names) are text, not Rich markup.
    """
    from rich.markup import escape

    # soft_wrap: a long path or id stays on one line (copyable), never cut at 80 columns
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    """Turn user errors (:func:`user_errors`) into a clear message and a non-zero exit;
    any other exception is a bug and propagates with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as err:  # noqa: BLE001 - filtered just below
            if isinstance(err, user_errors()):
                raise fail(str(err) or type(err).__name__) from None
            raise

    return wrapper  # type: ignore[return-value]


def add_id_column(table: Any, ids: list[str], name: str = "id") -> None:
    """An id column that is never cut: as wide as the longest id (the other
    columns wrap first), folded onto a second line only if the terminal is narrower."""
    table.add_column(name, no_wrap=True, overflow="fold", min_width=max((len(i) for i in ids), default=len(name)))


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
