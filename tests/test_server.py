"""``knowedit serve``: the real server process driven over HTTP (httpx), on loopback only.

Two servers share one copy of the tiny model: ``main`` (writes with a token,
open reads) and ``guarded`` (the same token, --protect-reads, a 4 KiB body
limit). Every server a test starts is terminated and waited for in its fixture.
Which facts the tiny model knows, and which edits of them succeed, depend on
its training: the tests pick their facts at run time (:func:`_pick`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

if os.environ.get("CI"):  # CI installs .[dev], which has them: missing is a failure there
    import fastapi  # noqa: F401
    import httpx
    import uvicorn  # noqa: F401
else:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")

from knowedit.data import load_records  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
HOST = "127.0.0.1"
START_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 180.0


def _knowedit() -> list[str]:
    """The installed ``knowedit`` entry point (beside this Python, else on PATH)."""
    exe = Path(sys.executable).with_name("knowedit")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("knowedit")
    if found is None:
        pytest.skip("the knowedit entry point is not installed")
    return [found]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _start(model_dir: Path, log: Path, *args: str) -> Server:
    port = _free_port()
    cmd = [*_knowedit(), "serve", "--model", str(model_dir), "--host", HOST, "--port", str(port), "--log-level", "warning", *args]
    with open(log, "wb") as out:  # a file, never a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=model_dir.parent)
    return Server(f"http://{HOST}:{port}", proc, log)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log_text()}")
        try:
            r = httpx.get(server.url + "/health", timeout=2.0)
            if r.status_code == 200 and r.json()["ready"]:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {START_TIMEOUT_S} s:\n{server.log_text()}")


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model_dir(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("serve") / "model"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def token_file(model_dir: Path) -> Path:
    p = model_dir.parent / "token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture(scope="module")
def servers(model_dir: Path, token_file: Path) -> Iterator[dict[str, Server]]:
    """Two servers on one model directory, started together (terminated at the end)."""
    logs = model_dir.parent
    started: dict[str, Server] = {}
    try:
        started["main"] = _start(model_dir, logs / "main.log", "--token-file", str(token_file))
        started["guarded"] = _start(model_dir, logs / "guarded.log", "--token-file", str(token_file), "--protect-reads", "--max-body", "4096")
        for s in started.values():
            _wait_ready(s)
        yield started
    finally:
        for s in started.values():
            _stop(s)
    for name, s in started.items():
        assert "Traceback" not in s.log_text(), f"{name} server logged a traceback:\n{s.log_text()}"


@pytest.fixture(scope="module")
def reqs(model_dir: Path) -> list:
    return load_records(model_dir / "edits.jsonl")


def _edit_body(r: object) -> dict:
    return {"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject}  # type: ignore[attr-defined]


def _ask(c: httpx.Client, prompt: str) -> str:
    r = c.post("/ask", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()["answer"]


def _relation(r: object, reqs: list) -> frozenset[str]:
    """The answers of ``r``'s relation: every answer of the records phrased like it, or
    like one sharing an answer with it ("X speaks natively" and "The mother tongue of X is")."""
    def template(x: object) -> str:
        return x.prompt.replace(x.subject, "#")  # type: ignore[attr-defined]

    by_template: dict[str, set[str]] = {}
    for x in reqs:
        by_template.setdefault(template(x), set()).update({x.ground_truth, x.target_new})
    answers = set(by_template[template(r)])
    for other in by_template.values():
        if other & answers:
            answers |= other
    return frozenset(answers)


def _pick(c: httpx.Client, candidates: list, n: int = 1) -> list:
    """The first ``n`` candidates the live model answers with their ground truth and
    whose edit succeeds now: each is applied and reverted (bit for bit), so applying
    it again from this state succeeds the same way."""
    out = []
    for r in candidates:
        if len(out) == n:
            break
        if _ask(c, r.prompt) != r.ground_truth:
            continue
        resp = c.post("/edits", json=_edit_body(r))
        if resp.status_code != 200:
            continue  # the tiny model cannot take this edit: nothing was written
        assert c.post("/revert", json={"id": resp.json()["id"]}).status_code == 200
        if resp.json()["metrics"]["success"]:
            out.append(r)
    if len(out) < n:
        pytest.fail(f"only {len(out)} of {len(candidates)} facts are known and editable on the tiny model")
    return out


# --------------------------------------------------------------- the servers
def test_health_and_openapi_document_every_endpoint(servers: dict[str, Server]) -> None:
    with servers["main"].client() as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["ready"] and h["writes"] and not h["protect_reads"]
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/ask", "post"), ("/generate", "post"), ("/edits", "post"), ("/edits/batch", "post"), ("/revert", "post"),
        ("/ledger", "get"), ("/ledger/verify", "get"), ("/ledger/{edit_id}", "get"), ("/health", "get"),
    ]:
        assert method in paths[path], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    with servers["guarded"].client() as c:
        assert c.get("/health").json()["protect_reads"] is True


def test_writes_need_the_right_token(servers: dict[str, Server], reqs: list) -> None:
    r = reqs[0]
    body = _edit_body(r)
    with servers["main"].client() as c:
        before, answer = c.get("/ledger").json(), _ask(c, r.prompt)
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"}):
            for path, payload in (("/edits", body), ("/edits/batch", {"requests": [body]}), ("/revert", {"id": "e0"})):
                resp = c.post(path, json=payload, headers=headers)
                assert resp.status_code == 401, (path, headers, resp.text)
                assert "bearer token" in resp.json()["error"]
                assert resp.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/ledger").json() == before  # nothing was written
        assert _ask(c, r.prompt) == answer
    # --protect-reads: reads need the token as well; /health and the docs do not.
    with servers["guarded"].client() as c:
        for resp in (c.post("/ask", json={"prompt": r.prompt}), c.post("/generate", json={"prompts": [r.prompt]}),
                     c.get("/ledger"), c.get("/ledger/verify"), c.get("/ledger/e0"),
                     c.post("/ask", json={"prompt": r.prompt}, headers={"Authorization": "Bearer nope"})):
            assert resp.status_code == 401 and "bearer token" in resp.json()["error"]
        assert c.get("/health").status_code == 200 and c.get("/openapi.json").status_code == 200
    with servers["guarded"].client(TOKEN) as c:
        assert _ask(c, r.prompt) == answer


def test_bad_requests_get_json_4xx_never_a_traceback(servers: dict[str, Server], reqs: list) -> None:
    r0 = reqs[0]
    with servers["main"].client(TOKEN) as c:
        before = c.get("/ledger").json()
        cases = [
            (c.post("/ask", content=b'{"prompt": ', headers={"Content-Type": "application/json"}), 422, "not valid JSON"),
            (c.post("/ask", json={"prompt": r0.prompt, "temperature": 2}), 422, "temperature"),
            (c.post("/ask", json={}), 422, "prompt"),
            (c.post("/ask", json={"prompt": 7}), 422, "prompt"),
            (c.post("/ask", json={"prompt": r0.prompt, "max_new_tokens": 0}), 422, "max_new_tokens"),
            (c.post("/ask", json={"prompt": "   "}), 400, "empty"),
            (c.post("/ask", json={"prompt": " ".join(["word"] * 100)}), 400, "context"),
            (c.post("/ask", json={"prompt": "x" * 5000}), 422, "prompt"),
            (c.post("/generate", json={"prompts": []}), 422, "prompts"),
            (c.post("/edits", json={"prompt": r0.prompt}), 422, "target_new"),
            (c.post("/edits", json={**_edit_body(r0), "subject": "Nobody"}), 400, "does not occur"),
            (c.post("/edits", json={**_edit_body(r0), "conflict": "maybe"}), 422, "conflict"),
            (c.post("/edits", json={**_edit_body(r0), "max_steps": 0}), 422, "max_steps"),
            (c.post("/edits", json={**_edit_body(r0), "edit_options": {"no_such": 1}}), 400, "unknown edit option"),
            (c.post("/edits", json={**_edit_body(r0), "edit_options": {"top_t": 3}}), 400, "own field"),
            (c.post("/edits", json={**_edit_body(r0), "edit_options": {"prompt_weight": -1}}), 400, "prompt_weight"),
            (c.post("/edits", json={**_edit_body(r0), "edit_options": {"note": "x"}}), 400, "unknown edit option"),
            (c.post("/edits/batch", json={"requests": [{"prompt": r0.prompt}]}), 400, "target_new"),
            (c.post("/revert", json={"id": "e00000000000"}), 404, "unknown edit id"),
            (c.post("/revert", json={"id": "a", "to": "b"}), 422, "not both"),
            (c.get("/ledger/e00000000000"), 404, "unknown edit id"),
            (c.get("/no/such/route"), 404, "Not Found"),
            (c.get("/ask"), 405, "Method Not Allowed"),
        ]
        for resp, status, phrase in cases:
            assert resp.status_code == status, (resp.request.url, resp.text)
            assert resp.headers["content-type"].startswith("application/json")
            assert phrase in resp.json()["error"], resp.text
        assert c.get("/ledger").json() == before  # none of them wrote anything
    with servers["guarded"].client(TOKEN) as c:  # --max-body 4096
        resp = c.post("/ask", json={"prompt": "x" * 5000})  # Content-Length over the limit: refused unread
        assert resp.status_code == 413 and "over 4096 bytes" in resp.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: refused once the limit is passed
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        resp = c.post("/ask", content=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and "error" in resp.json()
        assert c.post("/ask", json={"prompt": r0.prompt}).status_code == 200  # still serving


def test_edit_show_verify_revert_round_trip(servers: dict[str, Server], reqs: list) -> None:
    with servers["main"].client(TOKEN) as c:
        (r,) = _pick(c, reqs[:20])
        other = next(x for x in reqs if x.prompt != r.prompt)
        resp = c.post("/edits", json={**_edit_body(r), "note": "from the test", "author": "tester", "edit_options": {"prompt_weight": 1.0}})
        assert resp.status_code == 200, resp.text
        rec = resp.json()
        assert set(rec) == {"id", "prompt", "target_new", "subject", "slots", "metrics", "conflicts", "seq"}
        assert rec["metrics"]["success"] and rec["slots"] and all(len(s) == 2 for s in rec["slots"])
        got = c.post("/ask", json={"prompt": r.prompt}).json()
        assert got["answer"] == r.target_new and got["live_edits"] >= 1
        gen = c.post("/generate", json={"prompts": [r.prompt, other.prompt]}).json()
        assert [x["answer"] for x in gen["results"]] == [r.target_new, _ask(c, other.prompt)]
        show = c.get(f"/ledger/{rec['id']}").json()
        assert show["live"] and show["author"] == "tester" and show["note"] == "from the test"
        assert show["settings"]["prompt_weight"] == 1.0
        assert show["request"]["prompt"] == r.prompt and len(show["rows"]) == len(rec["slots"])
        assert c.get("/ledger/verify").json() == {"ok": True, "events": rec["seq"], "problems": []}
        rv = c.post("/revert", json={"id": rec["id"]})
        assert rv.status_code == 200, rv.text
        assert rv.json()["reverted"] == [rec["id"]] and rec["id"] not in rv.json()["live_edits"]
        assert _ask(c, r.prompt) == r.ground_truth
        again = c.post("/revert", json={"id": rec["id"]})
        assert again.status_code == 409 and "already reverted" in again.json()["error"]
        assert c.get("/ledger/verify").json()["ok"]


def test_batch_edits_resume_and_revert(servers: dict[str, Server], reqs: list) -> None:
    with servers["main"].client(TOKEN) as c:
        picked = _pick(c, reqs[10:30], n=2)
        batch = {"requests": [{**_edit_body(r), "case_id": i} for i, r in enumerate(picked)], "note": "batch"}
        resp = c.post("/edits/batch", json=batch)
        assert resp.status_code == 200, resp.text
        recs = resp.json()
        assert [x["prompt"] for x in recs] == [r.prompt for r in picked]
        assert [_ask(c, r.prompt) for r in picked] == [r.target_new for r in picked]
        again = c.post("/edits/batch", json={**batch, "resume": True})
        assert again.status_code == 200 and again.json() == []  # every request is live already: skipped
        for rec in reversed(recs):
            assert c.post("/revert", json={"id": rec["id"]}).json()["reverted"] == [rec["id"]]
        assert [_ask(c, r.prompt) for r in picked] == [r.ground_truth for r in picked]


def test_concurrent_readers_during_an_edit(servers: dict[str, Server], reqs: list) -> None:
    with servers["main"].client(TOKEN) as c:
        (r,) = _pick(c, reqs[20:])
    done = threading.Event()
    answers: list[tuple[int, str]] = []
    health: list[int] = []

    def read() -> None:
        with servers["main"].client() as rc:
            for _ in range(300):  # bounded
                resp = rc.post("/ask", json={"prompt": r.prompt})
                answers.append((resp.status_code, resp.json().get("answer", resp.text)))
                if done.is_set():
                    return

    def edit() -> dict:
        try:
            with servers["main"].client(TOKEN) as wc:
                resp = wc.post("/edits", json=_edit_body(r))
                assert resp.status_code == 200, resp.text
                return resp.json()
        finally:
            done.set()

    with ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(read) for _ in range(3)]
        while len(answers) < 3:  # readers are in full swing before the edit starts
            time.sleep(0.01)
        wrote = pool.submit(edit)
        with servers["main"].client() as hc:
            while not done.is_set() and len(health) < 1000:  # the event loop never waits for the model
                health.append(hc.get("/health").status_code)
        rec = wrote.result(timeout=120)
        for f in readers:
            f.result(timeout=120)
    assert rec["metrics"]["success"]
    assert all(code == 200 for code, _ in answers), answers
    assert {a for _, a in answers} <= {r.ground_truth, r.target_new}  # never a half-applied edit
    assert health and all(code == 200 for code in health)
    with servers["main"].client() as c:
        assert _ask(c, r.prompt) == r.target_new
    # The other server on the same directory picks the edit up on its next ask.
    with servers["guarded"].client(TOKEN) as c:
        assert _ask(c, r.prompt) == r.target_new


def test_a_server_and_the_cli_editing_at_once(servers: dict[str, Server], reqs: list, model_dir: Path) -> None:
    with servers["main"].client(TOKEN) as c:
        live = {e["prompt"] for e in c.get("/ledger").json() if e["live"]}
        fresh = [x for x in reqs if x.prompt not in live]
        (theirs,) = _pick(c, fresh[::-1])  # from the end: facts the other tests left alone
        # The server's edits are of another relation: they leave the CLI's fact alone.
        mine = [x for x in fresh if x.ground_truth not in _relation(theirs, reqs)][:8]
        cmd = [*_knowedit(), "edit", "apply", "--model", str(model_dir), "-p", theirs.prompt, "-t", theirs.target_new,
               "-s", theirs.subject, "--author", "cli", "--json"]
        cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=model_dir.parent)
        served: list[dict] = []
        try:
            # The server keeps editing while the CLI starts, syncs and commits its edit.
            deadline = time.monotonic() + CLI_TIMEOUT_S
            while mine and cli.poll() is None and time.monotonic() < deadline:
                resp = c.post("/edits", json=_edit_body(mine.pop(0)))
                if resp.status_code == 200:
                    served.append(resp.json())
                else:  # an edit the tiny model cannot take is refused; nothing is written
                    assert resp.status_code == 400 and "target" in resp.json()["error"], resp.text
                time.sleep(1.0)
            out, err = cli.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(timeout=30)
        assert cli.returncode == 0, err
        cli_rec = json.loads(out)
        assert served and set(cli_rec) == set(served[0])  # the same keys as the CLI's --json
        # Both are recorded and live, and the server answers with the CLI's edit live.
        listed = c.get("/ledger").json()
        by_id = {e["id"]: e for e in listed}
        assert all(by_id[x["id"]]["live"] for x in [*served, cli_rec])
        assert by_id[cli_rec["id"]]["author"] == "cli"
        assert served[0]["seq"] < cli_rec["seq"]  # the CLI replayed the server's edits before its own
        served_ask = c.post("/ask", json={"prompt": theirs.prompt}).json()
        assert served_ask["answer"] == theirs.target_new
        assert served_ask["live_edits"] == sum(e["live"] for e in listed)
        assert c.get("/ledger/verify").json()["ok"]
    # The server's JSON is the CLI's JSON: ledger list and ask, key for key (the CLI in-process).
    from typer.testing import CliRunner

    from knowedit.cli.app import app

    runner = CliRunner()
    lst = runner.invoke(app, ["ledger", "list", "--model", str(model_dir), "--json"])
    ask = runner.invoke(app, ["ask", "--model", str(model_dir), theirs.prompt, "--json"])
    assert lst.exit_code == 0 and ask.exit_code == 0, lst.output + ask.output
    assert json.loads(lst.stdout) == listed
    assert json.loads(ask.stdout) == served_ask


# ------------------------------------------------------- refusing to start
def _serve_in_process(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from knowedit.cli.app import app

    res = CliRunner().invoke(app, ["serve", *args])
    return res.exit_code, res.output


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("world", "chmod 600"),
        ("public-host", "not a loopback address"),
        ("protect-without-token", "--protect-reads needs --token-file"),
        ("not-a-model", "not a knowedit checkpoint"),
    ],
)
def test_refuses_to_start_with_one_line(case: str, phrase: str, tmp_path: Path, tiny_ckpt: Path) -> None:
    tok = tmp_path / "token"
    args = ["--model", str(tiny_ckpt), "--port", str(_free_port())]
    if case == "missing":
        args += ["--token-file", str(tmp_path / "nope")]
    elif case == "empty":
        tok.write_text("  \n")
        tok.chmod(0o600)
        args += ["--token-file", str(tok)]
    elif case == "world":
        tok.write_text(TOKEN)
        tok.chmod(0o644)
        args += ["--token-file", str(tok)]
    elif case == "public-host":
        args += ["--host", "0.0.0.0"]
    elif case == "protect-without-token":
        args += ["--protect-reads"]
    else:
        args = ["--model", str(tmp_path), "--port", str(_free_port())]
    code, out = _serve_in_process(*args)
    assert code != 0
    assert "Traceback" not in out
    text = " ".join(out.split())
    assert text.startswith("error:") and phrase in text, out


# ---------------------------------------------------------- in-process units
def test_unexpected_errors_are_a_generic_500_library_errors_4xx(caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from knowedit.ledger import LedgerBusy
    from knowedit.server import ModelWorker, ServerConfig, create_app

    class Fake:
        def ask(self, prompt: str, n: int) -> dict:
            if prompt == "busy":
                raise LedgerBusy("ledger x is busy")
            raise RuntimeError("secret internals")

        def close(self) -> None:
            pass

    cfg = ServerConfig(model_dir=Path("unused"))
    app = create_app(cfg)
    app.state.knowedit.update(service=Fake(), worker=ModelWorker(1))
    with TestClient(app) as c, caplog.at_level("ERROR"):
        r = c.post("/ask", json={"prompt": "boom"})
        assert r.status_code == 500
        assert "secret" not in r.text and "traceback is in the server log" in r.json()["error"]
        busy = c.post("/ask", json={"prompt": "busy"})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
    assert "RuntimeError: secret internals" in caplog.text


def test_without_a_token_the_server_is_read_only() -> None:
    from fastapi.testclient import TestClient

    from knowedit.server import ModelWorker, ServerConfig, create_app

    class Fake:
        def ask(self, prompt: str, n: int) -> dict:
            return {"prompt": prompt, "answer": "yes", "live_edits": 0}

        def edit(self, body: object) -> dict:
            raise AssertionError("a read-only server never edits")

        def close(self) -> None:
            pass

    app = create_app(ServerConfig(model_dir=Path("unused")))
    app.state.knowedit.update(service=Fake(), worker=ModelWorker(1))
    with TestClient(app) as c:
        assert c.get("/health").json()["writes"] is False
        for path, body in (("/edits", {"prompt": "p", "target_new": "t"}), ("/edits/batch", {"requests": [{}]}),
                           ("/revert", {"id": "e0"})):
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                r = c.post(path, json=body, headers=headers)
                assert r.status_code == 403 and "read-only" in r.json()["error"]
        assert c.post("/ask", json={"prompt": "p"}).json()["answer"] == "yes"


def test_ledger_probe_notices_every_commit(tmp_path: Path) -> None:
    from knowedit.server import LedgerProbe, sqlite_file

    db = tmp_path / "ledger.db"
    assert sqlite_file(str(db)) == db.resolve() and sqlite_file(f"sqlite:///{db}") == db.resolve()
    assert sqlite_file("postgresql+psycopg://u@h/db") is None
    probe = LedgerProbe(db)
    assert not probe.changed()  # no ledger yet
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE t (x)")
    assert probe.changed() and not probe.changed()
    con.execute("INSERT INTO t VALUES (1)")
    assert probe.changed() and not probe.changed()
    con.close()
    db.unlink()
    assert probe.changed()  # gone: look again
    assert LedgerProbe(None).changed() and LedgerProbe(None).changed()  # not SQLite: always refresh


def test_token_and_host_checks(tmp_path: Path) -> None:
    from knowedit.server import ServeError, ServerConfig, is_loopback, load_token

    tok = tmp_path / "t"
    tok.write_text(f"  {TOKEN}\n")
    tok.chmod(0o600)
    assert load_token(tok) == TOKEN
    tok.write_text("two words")
    with pytest.raises(ServeError, match="spaces"):
        load_token(tok)
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1") and not is_loopback("example.org")
    ServerConfig(model_dir=tmp_path, host="0.0.0.0", token=TOKEN).check()  # a token makes it allowed
    with pytest.raises(ServeError, match="loopback"):
        ServerConfig(model_dir=tmp_path, host="::").check()
