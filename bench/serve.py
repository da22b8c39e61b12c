"""Ask and edit latency through ``knowedit serve`` (HTTP), beside the same calls through the CLI.

Starts the real server (``knowedit serve``, 1 torch thread by default) on a free
loopback port over a copy of a trained model, then measures with httpx:

- ask latency: N sequential ``POST /ask`` (median, p95);
- ask throughput: the same asks from C concurrent clients (asks/s; the server
  answers them one at a time on its model thread);
- edit latency: E sequential ``POST /edits`` of the model's ``edits.jsonl``
  records (median, p95, and the server's own ``total_ms``), then revert latency;
- the library: each ask and edit is also made through an in-process
  ``Editor`` on a fresh copy, right after the HTTP one (same load; what HTTP
  and the server add is the difference);
- the CLI: ``knowedit ask`` and ``knowedit edit apply`` as subprocesses, the
  way a script without the server would do it (process start, imports and
  model load included).

    python bench/serve.py --model runs/small --asks 200 --edits 30 --json-out runs/bench-serve.json

The model directory is copied (without its ledger) first: the original is never written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    """Median, p95, mean, min and max of latencies in ms."""
    return {
        "n": len(xs), "median_ms": round(statistics.median(xs), 2), "p95_ms": round(pct(xs, 0.95), 2),
        "mean_ms": round(statistics.fmean(xs), 2), "min_ms": round(min(xs), 2), "max_ms": round(max(xs), 2),
    }


def knowedit_exe() -> list[str]:
    """The ``knowedit`` entry point beside this Python (or on PATH)."""
    exe = Path(sys.executable).with_name("knowedit")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("knowedit")
    if found is None:
        raise SystemExit("error: the knowedit entry point is not installed (pip install -e '.[dev]')")
    return [found]


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, object]:
    """Where the numbers were taken."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> float:
    """Seconds until ``/health`` says ready (raises if the server exits or never gets there)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2.0).json().get("ready"):
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: the server was not ready after {timeout_s} s:\n{log.read_text()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/small"), help="trained checkpoint dir (copied first)")
    ap.add_argument("--asks", type=int, default=200, help="sequential asks (and as many concurrent ones)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients for the throughput run")
    ap.add_argument("--edits", type=int, default=30, help="sequential edits through HTTP")
    ap.add_argument("--cli-asks", type=int, default=5, help="`knowedit ask` subprocesses")
    ap.add_argument("--cli-edits", type=int, default=3, help="`knowedit edit apply` subprocesses")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (and the CLI)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if not (args.model / "model.safetensors").is_file():
        raise SystemExit(f"error: {args.model} is not a trained model: knowedit train small --out {args.model}")

    from knowedit.data import load_records, read_examples

    work = Path(tempfile.mkdtemp(prefix="knowedit-bench-serve-"))
    model = work / "model"
    shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("ledger.db*", "logs", "*.queue"))
    reqs = load_records(model / "edits.jsonl")
    need = args.edits + args.cli_edits + 1
    if len(reqs) < need:
        raise SystemExit(f"error: {model}/edits.jsonl has {len(reqs)} records; this run needs {need}")
    prompts = [e.prompt for e in read_examples(model / "corpus.jsonl")][: max(args.asks, 1)]
    token = work / "token"
    token.write_text(os.urandom(24).hex())
    token.chmod(0o600)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    info = machine()
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = work / "server.log"
    cmd = [*knowedit_exe(), "serve", "--model", str(model), "--host", HOST, "--port", str(port), "--token-file",
           str(token), "--threads", str(args.threads), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    t_popen = time.monotonic()
    result: dict[str, object] = {"machine": info, "settings": vars(args) | {"model": str(args.model), "json_out": str(args.json_out)}}
    lib = Library(args, work, reqs, prompts)  # the same calls in this process, paired with the HTTP ones
    try:
        wait_ready(url, proc, log)
        # process start to ready, while this process loads its own copy of the model too
        result["server_start_s"] = round(time.monotonic() - t_popen, 2)
        auth = {"Authorization": f"Bearer {token.read_text()}"}
        with httpx.Client(base_url=url, timeout=120.0) as c:
            # Warm-up: the first asks, and the first edit of a process (it builds the background cache).
            for p in prompts[:5]:
                c.post("/ask", json={"prompt": p}).raise_for_status()
            warm = c.post("/edits", json=_body(reqs[-1]), headers=auth)
            if warm.status_code == 200:
                c.post("/revert", json={"id": warm.json()["id"]}, headers=auth).raise_for_status()

            health_ms = []
            for _ in range(args.asks):
                t0 = time.perf_counter()
                c.get("/health").raise_for_status()
                health_ms.append((time.perf_counter() - t0) * 1000)
            result["http_health"] = summary(health_ms)

            ask_ms, lib_ask_ms = [], []
            for i in range(args.asks):
                p = prompts[i % len(prompts)]
                t0 = time.perf_counter()
                c.post("/ask", json={"prompt": p}).raise_for_status()
                ask_ms.append((time.perf_counter() - t0) * 1000)
                lib_ask_ms.append(lib.ask(p))
            result["http_ask"] = summary(ask_ms)
            result["library_ask"] = summary(lib_ask_ms)

            conc_ms: list[float] = []
            lock = threading.Lock()

            def client(k: int) -> None:
                with httpx.Client(base_url=url, timeout=120.0) as cc:
                    for i in range(k, args.asks, args.concurrency):
                        t0 = time.perf_counter()
                        cc.post("/ask", json={"prompt": prompts[i % len(prompts)]}).raise_for_status()
                        with lock:
                            conc_ms.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                for f in [pool.submit(client, k) for k in range(args.concurrency)]:
                    f.result()
            wall = time.perf_counter() - t0
            result["http_ask_concurrent"] = summary(conc_ms) | {
                "clients": args.concurrency, "asks_per_s": round(len(conc_ms) / wall, 1),
                "sequential_asks_per_s": round(1000 / statistics.fmean(ask_ms), 1),
            }

            edit_ms, server_ms, lib_edit_ms, ids, refused = [], [], [], [], 0
            for r in reqs[: args.edits]:
                t0 = time.perf_counter()
                resp = c.post("/edits", json=_body(r), headers=auth)
                edit_ms.append((time.perf_counter() - t0) * 1000)
                if resp.status_code == 200:
                    ids.append(resp.json()["id"])
                    server_ms.append(resp.json()["metrics"]["total_ms"])
                elif resp.status_code == 400:
                    refused += 1  # the edit did not reach its target: refused, nothing written
                else:
                    resp.raise_for_status()
                lib_edit_ms.append(lib.edit(r))
            result["http_edit"] = summary(edit_ms) | {
                "applied": len(ids), "refused": refused,
                "server_total_ms_median": round(statistics.median(server_ms), 2) if server_ms else None,
            }
            result["library_edit"] = summary(lib_edit_ms) | {"refused": lib.refused}
            rev_ms = []
            for eid in reversed(ids):
                t0 = time.perf_counter()
                c.post("/revert", json={"id": eid}, headers=auth).raise_for_status()
                rev_ms.append((time.perf_counter() - t0) * 1000)
            if rev_ms:
                result["http_revert"] = summary(rev_ms)
            result["verify"] = c.get("/ledger/verify").json()
    finally:
        lib.close()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)

    cli_ask_ms = []
    for p in prompts[: args.cli_asks]:
        t0 = time.perf_counter()
        subprocess.run([*knowedit_exe(), "ask", "--model", str(model), p, "--json"], check=True, env=env,
                       capture_output=True, timeout=600)
        cli_ask_ms.append((time.perf_counter() - t0) * 1000)
    if cli_ask_ms:
        result["cli_ask"] = summary(cli_ask_ms)
    cli_edit_ms, cli_refused = [], 0
    for r in reqs[args.edits : args.edits + args.cli_edits]:
        t0 = time.perf_counter()
        done = subprocess.run([*knowedit_exe(), "edit", "apply", "--model", str(model), "-p", r.prompt, "-t", r.target_new,
                               *(["-s", r.subject] if r.subject else []), "--json"], env=env, capture_output=True, timeout=600)
        cli_edit_ms.append((time.perf_counter() - t0) * 1000)
        cli_refused += done.returncode != 0
    if cli_edit_ms:
        result["cli_edit"] = summary(cli_edit_ms) | {"refused": cli_refused}
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    shutil.rmtree(work, ignore_errors=True)

    print(json.dumps(result, indent=2))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


class Library:
    """The same asks and edits in this process through :class:`knowedit.Editor` (no HTTP),
    on a fresh copy of the model: what the server adds is the difference."""

    def __init__(self, args: argparse.Namespace, work: Path, reqs: list, prompts: list[str]) -> None:
        import torch

        from knowedit.editor import EditError, Editor

        torch.set_num_threads(args.threads)
        model = work / "library"
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("ledger.db*", "logs", "*.queue"))
        self.error = EditError
        self.ed = Editor.open(model)
        self.refused = 0
        for p in prompts[:5]:
            self.ed.ask(p)
        try:  # the first edit of a process builds the background cache
            r = reqs[-1]
            self.ed.revert(self.ed.edit(r.prompt, r.target_new, subject=r.subject).id)
        except EditError:
            pass

    def ask(self, prompt: str) -> float:
        """ms for ``Editor.ask``."""
        t0 = time.perf_counter()
        self.ed.ask(prompt)
        return (time.perf_counter() - t0) * 1000

    def edit(self, r: object) -> float:
        """ms for ``Editor.edit`` (a refused edit counts too)."""
        t0 = time.perf_counter()
        try:
            self.ed.edit(r.prompt, r.target_new, subject=r.subject)  # type: ignore[attr-defined]
        except self.error:
            self.refused += 1
        return (time.perf_counter() - t0) * 1000

    def close(self) -> None:
        self.ed.close()


def _body(r: object) -> dict[str, object]:
    return {"prompt": r.prompt, "target_new": r.target_new, "subject": r.subject}  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
