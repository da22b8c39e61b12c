"""``knowedit serve``: an HTTP service (FastAPI on uvicorn) holding one model in memory.

One :class:`~knowedit.editor.Editor` answers every request. An Editor is not
thread-safe, so every call that touches the model or the ledger runs on one
dedicated worker thread (:class:`ModelWorker`), one at a time, in arrival
order; the event loop stays free for ``/health``, refusals and queued
requests. Edits go through the ledger's write transaction, and every read
(``ask`` included) first replays the events other processes committed, so a
second server or a CLI writing the same model directory stays consistent.

Writes (edit, batch edit, revert) need ``Authorization: Bearer <token>``,
compared in constant time; without a token the server is read-only and
refuses them with 403. Reads are open, or token-protected with
``protect_reads``. Request bodies are size-limited before they are parsed, and
validated by pydantic models; every error is a JSON ``{"error": "..."}``.
Response keys are those of the CLI's ``--json`` output.

Usage::

    cfg = ServerConfig(model_dir=Path("runs/small"), token=load_token(Path("token")))
    run(cfg)  # blocks; or create_app(cfg) for any ASGI server (one worker process)
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from knowedit.edit_options import EditOptions
from knowedit.errors import KnoweditError, OptionError
from knowedit.events import event_detail, event_summary

log = logging.getLogger("uvicorn.error.knowedit")

T = TypeVar("T")

DEFAULT_MAX_BODY = 1 << 20
"""Largest request body accepted, in bytes (1 MiB)."""
MAX_TEXT = 4096
"""Longest prompt, target or note accepted, in characters (the model's context is far shorter)."""
MAX_BATCH = 1000
"""Most requests in one batch edit."""
MAX_PROMPTS = 64
"""Most prompts in one ``/generate`` call."""
MAX_NEW_TOKENS = 64


class ServeError(KnoweditError, ValueError):
    """A server setting that cannot be used (token file, host); the server does not start."""


# ------------------------------------------------------------------ settings
@dataclass
class ServerConfig:
    """How ``knowedit serve`` runs.

    Attributes:
        model_dir: the checkpoint directory (from ``knowedit train``).
        ledger: ledger path or SQLAlchemy URL (default ``model_dir/ledger.db``).
        host: address to bind; anything but loopback needs a token.
        port: TCP port.
        token: the bearer token for writes (``None``: a read-only server).
        protect_reads: reads need the token too.
        threads: torch intra-op threads for the model.
        max_body: largest request body, in bytes.
        author: recorded with every edit unless a request names its own.
    """

    model_dir: Path
    ledger: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    protect_reads: bool = False
    threads: int = 1
    max_body: int = DEFAULT_MAX_BODY
    author: str | None = None

    def check(self) -> None:
        """Refuse settings that are unsafe or cannot work.

        Raises:
            ServeError: a non-loopback host without a token, ``protect_reads``
                without a token, or an out-of-range number.
        """
        if self.token is None and not is_loopback(self.host):
            raise ServeError(
                f"--host {self.host} is not a loopback address: give --token-file, or the model's "
                "edits and ledger would be open to the network"
            )
        if self.protect_reads and self.token is None:
            raise ServeError("--protect-reads needs --token-file (reads are protected by the same token)")
        if self.threads < 1:
            raise ServeError(f"--threads must be at least 1, got {self.threads}")
        if self.max_body < 1024:
            raise ServeError(f"--max-body must be at least 1024 bytes, got {self.max_body}")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be in 0..65535, got {self.port}")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(path: Path) -> str:
    """Read the bearer token from ``path`` (surrounding whitespace stripped).

    Raises:
        ServeError: the file is missing, unreadable, empty, readable or writable
            by every user (``chmod 600`` it), or holds a token that is not
            printable ASCII without spaces.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ServeError(f"token file {path} does not exist") from None
    except OSError as err:
        raise ServeError(f"cannot read token file {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ServeError(f"token file {path} is not a regular file")
    if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ServeError(
            f"token file {path} is accessible to every user (mode {stat.S_IMODE(st.st_mode):03o}): chmod 600 {path}"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ServeError(f"cannot read token file {path}: {err.strerror or err}") from None
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ServeError(f"token file {path} holds non-ASCII bytes") from None
    if not token:
        raise ServeError(f"token file {path} is empty")
    if any(not (33 <= ord(c) <= 126) for c in token):
        raise ServeError(f"the token in {path} holds spaces or control characters")
    return token


# --------------------------------------------------------------- the worker
class ModelWorker:
    """Runs every model and ledger call on one thread, one at a time.

    The Editor is opened on that thread and used only there, so its SQLite
    connections and torch state never cross threads.
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knowedit-model", initializer=self._init)

    def _init(self) -> None:
        import torch

        torch.set_num_threads(self._threads)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and wait for it (from a non-async caller)."""
        return self._pool.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread, awaiting its result."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def shutdown(self) -> None:
        """Finish the queued calls and stop the thread."""
        self._pool.shutdown(wait=True)


# ------------------------------------------------------------------ errors
class ApiError(Exception):
    """An HTTP error answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def error_status(err: BaseException) -> int | None:
    """The 4xx/5xx status of a library error, or ``None`` for an unexpected one."""
    from knowedit.ledger import LedgerBusy, LedgerError, LedgerMissing

    if isinstance(err, LedgerBusy):
        return 503
    if isinstance(err, (LedgerError, ValueError)):
        text = str(err)
        if isinstance(err, LedgerMissing) or text.startswith("unknown edit id"):
            return 404
        if "already reverted" in text or isinstance(err, LedgerError):
            return 409
        return 400
    return None


def _json_error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413, before any parsing.

    A declared ``Content-Length`` over the limit is refused at once; a body
    without one (chunked) is read up to the limit and refused as soon as it
    passes it. The body read is handed on to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body over {self.max_bytes} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _json_error(400, "invalid Content-Length header")(scope, receive, send)
                    return
                if declared > self.max_bytes:
                    await _json_error(413, too_big)(scope, receive, send)
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _json_error(413, too_big)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        done = False

        async def replay() -> Message:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Text = Field(min_length=1, max_length=MAX_TEXT)


class AskBody(_Body):
    """``POST /ask``: one greedy completion."""

    prompt: str = Text
    max_new_tokens: int = Field(8, ge=1, le=MAX_NEW_TOKENS)


class GenerateBody(_Body):
    """``POST /generate``: greedy completions of several prompts at once."""

    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    max_new_tokens: int = Field(8, ge=1, le=MAX_NEW_TOKENS)


class _EditSettings(_Body):
    top_t: int | None = Field(None, ge=1, description="Value rows to update per edit [library default].")
    max_steps: int | None = Field(None, ge=1, description="Optimisation step budget per edit [library default].")
    conflict: Literal["joint", "avoid"] | None = Field(None, description="Slots owned by live edits [library default].")
    note: str | None = Field(None, max_length=MAX_TEXT, description="Free text recorded in the ledger.")
    author: str | None = Field(None, min_length=1, max_length=200, description="Recorded in the ledger [server's --author].")

    allow_failed: bool = Field(False, description="Commit an edit even if it does not reach its target.")
    edit_options: dict[str, bool | int | float | str] | None = Field(
        None, description="Any other edit option by name, e.g. {\"prompt_weight\": 1.0} (the CLI's --option).",
    )

    def options(self) -> dict[str, object]:
        out: dict[str, object] = {
            k: v for k, v in (("top_t", self.top_t), ("max_steps", self.max_steps), ("conflict", self.conflict)) if v is not None
        }
        extra = self.edit_options or {}
        clash = sorted(set(extra) & {"top_t", "max_steps", "conflict", "allow_failed"})
        if clash:
            raise OptionError(f"edit_options: give {', '.join(clash)} as its own field")
        out.update(extra)
        try:  # only EditOptions fields: anything else would reach Editor.apply as one of its own arguments
            EditOptions.from_mapping(out)
        except ValueError as err:
            raise OptionError(str(err)) from None
        if self.allow_failed:  # only when asked: the Editor's default refuses such an edit
            out["allow_failed"] = True
        return out


class EditBody(_EditSettings):
    """``POST /edits``: one edit (EasyEdit's record fields, plus the CLI's edit options)."""

    prompt: str = Text
    target_new: str = Text
    subject: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    ground_truth: str | None = Field(None, max_length=MAX_TEXT)
    rephrase_prompt: str | list[str] | None = None
    locality_prompt: str | list[str] | None = None
    locality_ground_truth: str | list[str] | None = None
    case_id: str | int | None = None
    portability_prompt: str | list[str] | None = None
    portability_ground_truth: str | list[str] | None = None

    def record(self) -> dict[str, object]:
        """The EasyEdit record (the library validates it: ``request_from_dict``)."""
        keys = (
            "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth", "case_id", "portability_prompt", "portability_ground_truth",
        )
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class BatchBody(_EditSettings):
    """``POST /edits/batch``: many edits in order, like ``edit apply --file``."""

    requests: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_BATCH, description="Records in any format `edit apply --file` reads (EasyEdit's flat one and the others)."
    )
    resume: bool = Field(False, description="Skip requests already live (finish a batch that stopped).")


class RevertBody(_Body):
    """``POST /revert``: revert one edit (``id``), or every edit after one (``to``)."""

    id: str | None = Field(None, min_length=1, max_length=200)
    to: str | None = Field(None, min_length=1, max_length=200)
    cascade: bool = False
    note: str | None = Field(None, max_length=MAX_TEXT)
    author: str | None = Field(None, min_length=1, max_length=200)


# ------------------------------------------------------------- JSON shapes
def record_json(rec: Any) -> dict[str, Any]:
    """An :class:`~knowedit.editor.EditRecord` as ``knowedit edit apply --json`` prints it."""
    d = rec.to_dict()
    d["slots"] = [list(s) for s in d["slots"]]
    return d


# ----------------------------------------------------------- the service
def sqlite_file(url: str) -> Path | None:
    """The SQLite file a ledger path or URL names (``None`` for another database)."""
    if "://" not in url:
        return Path(url).expanduser().resolve()
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        return None
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:") or u.query:
        return None
    return Path(db).expanduser().resolve()


class LedgerProbe:
    """Has any connection committed to a SQLite ledger since the last look?

    ``PRAGMA data_version`` on a read-only connection of its own: a few
    microseconds, where replaying (``Editor.refresh``: read the new events and
    check the chain's head) costs milliseconds. Any doubt (no SQLite file, an
    error) answers "changed", so the caller refreshes: a probe can only save
    work, never skip a commit.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._con: sqlite3.Connection | None = None
        self._version: int | None = None
        self._inode: tuple[int, int] | None = None

    def changed(self) -> bool:
        """True when the ledger may hold events committed since the previous call."""
        if self.path is None:
            return True
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._con is None:
                return False  # no ledger yet: nothing to replay (Editor.refresh would find none)
            self.close()
            return True
        except OSError:
            self.close()
            return True
        try:
            if self._con is not None and self._inode != (st.st_dev, st.st_ino):
                self.close()  # another file at that path now: look again from scratch
            if self._con is None:
                self._con = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True, isolation_level=None)
                self._inode = (st.st_dev, st.st_ino)
            version = int(self._con.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            self.close()
            return True
        if version != self._version:
            self._version = version
            return True
        return False

    def close(self) -> None:
        """Close the probe's connection (the next call reopens it)."""
        if self._con is not None:
            self._con.close()
        self._con, self._version, self._inode = None, None, None


class Service:
    """What the endpoints do, on the worker thread (never call these from the event loop)."""

    def __init__(self, cfg: ServerConfig) -> None:
        from knowedit.editor import Editor

        self.cfg = cfg
        self.editor = Editor.open(cfg.model_dir, ledger=cfg.ledger, author=cfg.author)
        self.probe = LedgerProbe(sqlite_file(self.editor.ledger_url))
        self._live_count = len(self.editor.live_edits())

    def close(self) -> None:
        """Close the probe and the Editor (its ledger connections)."""
        self.probe.close()
        self.editor.close()

    def _synced(self) -> int:
        """Replay other writers' new events if there are any; the live edit count."""
        if self.probe.changed():
            self._live_count = len(self.editor.live_edits())  # Editor.refresh() + the live ids
        return self._live_count

    def ask(self, prompt: str, max_new_tokens: int) -> dict[str, Any]:
        """``POST /ask``: the live model's greedy completion, after other writers' new events."""
        from knowedit.inference import greedy

        live = self._synced()
        ed = self.editor
        answer = greedy(ed.model, ed.codec, [prompt], max_new_tokens)[0]  # Editor.ask, refreshed above
        return {"prompt": prompt, "answer": answer, "live_edits": live}

    def generate(self, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
        """``POST /generate``: greedy completions of several prompts (batched by length)."""
        from knowedit.inference import greedy

        live = self._synced()
        ed = self.editor
        answers = greedy(ed.model, ed.codec, prompts, max_new_tokens)
        return {"results": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)], "live_edits": live}

    def _as_author(self, author: str | None, fn: Callable[[], T]) -> T:
        ed = self.editor
        saved = ed.author
        ed.author = author if author is not None else self.cfg.author
        try:
            return fn()
        finally:
            ed.author = saved

    def edit(self, body: EditBody) -> dict[str, Any]:
        """``POST /edits``: one edit through the ledger's write transaction."""
        from knowedit.data.records import request_from_dict

        req = request_from_dict(body.record(), "request")
        rec = self._as_author(body.author, lambda: self.editor.apply(req, note=body.note, **body.options()))
        return record_json(rec)

    def edit_batch(self, body: BatchBody) -> list[dict[str, Any]]:
        """``POST /edits/batch``: ``Editor.edit_many``; a batch that stops names what it applied."""
        from knowedit.editor import EditError

        try:
            recs = self._as_author(
                body.author,
                lambda: self.editor.edit_many(body.requests, resume=body.resume, note=body.note, **body.options()),
            )
        except EditError as err:
            applied = getattr(err, "applied", None)  # a batch that stopped, or ended with failures
            if applied is None:
                raise
            cause = err.__cause__ if err.__cause__ is not None else err
            extra: dict[str, Any] = {"applied": [record_json(r) for r in applied]}
            failed = getattr(err, "failed", None)
            if failed:
                extra["failed"] = [{"index": i, "error": str(e)} for i, e in failed]
            raise ApiError(error_status(cause) or 400, str(err), **extra) from err
        return [record_json(r) for r in recs]

    def revert(self, body: RevertBody) -> dict[str, Any]:
        """``POST /revert``: ``Editor.revert`` (``id``) or ``Editor.revert_to`` (``to``)."""
        if (body.id is None) == (body.to is None):
            raise ApiError(422, "give an edit id (\"id\") or \"to\", not both")
        ed = self.editor

        def go() -> list[str]:
            if body.id is not None:
                return ed.revert(body.id, cascade=body.cascade, note=body.note)
            return ed.revert_to(body.to, note=body.note)  # type: ignore[arg-type]

        done = self._as_author(body.author, go)
        return {"reverted": done, "live_edits": ed.live_edits()}

    def ledger_list(self) -> list[dict[str, Any]]:
        """``GET /ledger``: every event, as ``ledger list --json``."""
        ed = self.editor
        events = ed.history()
        live = set(ed.live_edits())
        return [event_summary(e, live) for e in events]

    def ledger_show(self, edit_id: str) -> dict[str, Any]:
        """``GET /ledger/{id}``: one edit, as ``ledger show --json``."""
        ed = self.editor
        ed.refresh()
        led = ed.ledger
        if led is None:
            raise ApiError(404, f"unknown edit id {edit_id!r}: no edit has been applied yet")
        ev = led.get(edit_id)
        return event_detail(ev, led.is_live(edit_id))

    def ledger_verify(self) -> dict[str, Any]:
        """``GET /ledger/verify``: the chain and the replay checked, as ``ledger verify --json``."""
        from knowedit.ledger import LedgerError

        ed = self.editor
        try:
            problems = ed.verify()
            n = len(ed.history())
        except LedgerError as err:  # cannot even be replayed: what the hash chain says
            led = ed.ledger
            if led is None:
                raise
            problems = led.verify_chain() or [str(err)]
            n = led.last_seq()
        return {"ok": not problems, "events": n, "problems": problems}


# ----------------------------------------------------------------- the app
def create_app(cfg: ServerConfig) -> FastAPI:
    """The ASGI app. The model is loaded when the app starts (its lifespan), on its worker thread.

    Args:
        cfg: the server's settings (checked here: see :meth:`ServerConfig.check`).

    Returns:
        A FastAPI app; serve it with one worker process (it holds the model).

    Raises:
        ServeError: unusable settings.
    """
    cfg.check()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker = state.get("worker")
        if worker is None:  # not opened by open_service(): open now
            worker = ModelWorker(cfg.threads)
            state["worker"] = worker
            state["service"] = await worker.run(Service, cfg)
        try:
            yield
        finally:
            service = state.pop("service", None)
            if service is not None:
                await worker.run(service.close)
            worker.shutdown()

    from knowedit import __version__

    app = FastAPI(
        title="knowedit",
        version=__version__,
        summary="Ask, edit, revert and audit the facts of one memory-layer language model.",
        lifespan=lifespan,
    )
    app.state.knowedit = state
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body)
    bearer = HTTPBearer(auto_error=False, description="The token from the server's --token-file.")
    expected = cfg.token.encode("ascii") if cfg.token is not None else None

    def _check_token(cred: HTTPAuthorizationCredentials | None) -> None:
        assert expected is not None
        if cred is None:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.credentials.encode("utf-8", "surrogateescape"), expected):
            raise ApiError(401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def writer(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if expected is None:
            raise ApiError(403, "this server is read-only: start it with --token-file to allow edits and reverts")
        _check_token(cred)

    async def reader(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cfg.protect_reads:
            _check_token(cred)

    async def call(method: str, *args: Any) -> Any:
        """``Service.method(*args)`` on the worker thread; library errors become ApiErrors."""
        service = state.get("service")
        if service is None:
            raise ApiError(503, "the model is not loaded yet")
        try:
            return await state["worker"].run(getattr(service, method), *args)
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - sorted just below
            status = error_status(err)
            if status is None:
                log.error("unexpected error in %s", method, exc_info=err)
                raise ApiError(500, "internal server error (the traceback is in the server log)") from err
            headers = {"Retry-After": "1"} if status == 503 else None
            raise ApiError(status, str(err) or type(err).__name__, headers) from err

    # ---- errors: always {"error": ...}
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, err: ApiError) -> JSONResponse:
        return _json_error(err.status, err.message, err.headers, **err.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors()[:5]:
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            if e.get("type") == "json_invalid":
                why = (e.get("ctx") or {}).get("error", "malformed")
                parts.append(f"the body is not valid JSON (at character {'.'.join(loc) or '?'}: {why})")
            else:
                parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
        return _json_error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, err: StarletteHTTPException) -> JSONResponse:
        return _json_error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, _err: Exception) -> JSONResponse:
        # Starlette re-raises the error after this response: the server logs its traceback.
        return _json_error(500, "internal server error (the traceback is in the server log)")

    # ---- endpoints
    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness: never waits for the model. ``ready`` is true once it is loaded."""
        return {
            "status": "ok", "ready": "service" in state, "version": __version__, "model": str(cfg.model_dir),
            "writes": expected is not None, "protect_reads": cfg.protect_reads,
        }

    @app.post("/ask", tags=["model"], dependencies=[Depends(reader)])
    async def ask(body: AskBody) -> dict[str, Any]:
        """Greedy completion by the live model (base + the ledger's live edits): ``knowedit ask --json``."""
        return await call("ask", body.prompt, body.max_new_tokens)

    @app.post("/generate", tags=["model"], dependencies=[Depends(reader)])
    async def generate(body: GenerateBody) -> dict[str, Any]:
        """Greedy completions of several prompts in one call (the same answers as ``/ask``)."""
        return await call("generate", body.prompts, body.max_new_tokens)

    @app.post("/edits", tags=["edits"], dependencies=[Depends(writer)])
    async def edit(body: EditBody) -> dict[str, Any]:
        """Apply one edit, recorded in the ledger: ``knowedit edit apply -p -t --json``."""
        return await call("edit", body)

    @app.post("/edits/batch", tags=["edits"], dependencies=[Depends(writer)])
    async def edit_batch(body: BatchBody) -> list[dict[str, Any]]:
        """Apply many edits in order: ``knowedit edit apply --file --json``.

        A batch that stops midway answers its error with ``applied``: the edits committed before it.
        """
        return await call("edit_batch", body)

    @app.post("/revert", tags=["edits"], dependencies=[Depends(writer)])
    async def revert(body: RevertBody) -> dict[str, Any]:
        """Revert an edit bit for bit (``id``, optionally ``cascade``), or every edit after one (``to``)."""
        return await call("revert", body)

    @app.get("/ledger", tags=["ledger"], dependencies=[Depends(reader)])
    async def ledger_list() -> list[dict[str, Any]]:
        """Every event, oldest first: ``knowedit ledger list --json`` (``[]`` before the first edit)."""
        return await call("ledger_list")

    @app.get("/ledger/verify", tags=["ledger"], dependencies=[Depends(reader)])
    async def ledger_verify() -> dict[str, Any]:
        """Check the hash chain and that the live rows equal base + the live edits: ``knowedit ledger verify --json``."""
        return await call("ledger_verify")

    @app.get("/ledger/{edit_id}", tags=["ledger"], dependencies=[Depends(reader)])
    async def ledger_show(edit_id: str) -> dict[str, Any]:
        """One edit: request, settings, metrics and the rows it changed: ``knowedit ledger show --json``."""
        return await call("ledger_show", edit_id)

    return app


def open_service(app: FastAPI, cfg: ServerConfig) -> None:
    """Load the model into ``app`` now (on its worker thread), so that a bad model
    directory or ledger fails before the port is bound.

    Raises:
        CheckpointError, SideFileError, LedgerError, EditError: the model cannot be opened.
    """
    state = app.state.knowedit
    worker = ModelWorker(cfg.threads)
    try:
        state["service"] = worker.call(Service, cfg)
    except BaseException:
        worker.shutdown()
        raise
    state["worker"] = worker


def run(cfg: ServerConfig, log_level: str = "info") -> None:
    """Load the model, then serve it with uvicorn until SIGINT/SIGTERM.

    Args:
        cfg: the server's settings.
        log_level: uvicorn's log level (``info`` logs every request).

    Raises:
        ServeError, CheckpointError, LedgerError, EditError: the server cannot start.
    """
    import uvicorn

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = create_app(cfg)
    open_service(app, cfg)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, workers=1, lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise ServeError(f"the server did not start on {cfg.host}:{cfg.port} (see the log above)")


__all__ = [
    "DEFAULT_MAX_BODY",
    "ApiError",
    "BodyLimit",
    "ModelWorker",
    "ServeError",
    "ServerConfig",
    "create_app",
    "error_status",
    "event_detail",
    "event_summary",
    "is_loopback",
    "load_token",
    "open_service",
    "record_json",
    "run",
]
