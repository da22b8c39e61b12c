"""Memory of an editing process: after open, between edits, and each edit's own peak.

Copies a model directory and its ledger to a temporary directory, opens an
:class:`~knowedit.editor.Editor` there and applies the next ``--n`` records of
``--edits`` one at a time: by default the records after the ones the ledger's
live edits came from, in file order, as ``edit_scale.py`` applies them
(``--start`` to choose). ``--work DIR`` takes the model of a ``bench/edit_scale.py
--work DIR`` run with its live edits, and that run's records and edit options.
The source is left unchanged; its SQLite ledger is copied with SQLite's backup
API, so a run still writing to it is read consistently.

Before each edit the process's peak resident memory (``VmHWM``) is reset
through ``/proc/self/clear_refs`` (Linux), so each edit's own peak is read
after it. Reported: the resident memory (``VmRSS``) before and after
``Editor.open`` (which replays the live edits), and per edit its guards, wall
time, resident memory before it and its peak; then the largest peak and a
least-squares slope of the peaks over the guards (MB per 1,000 guards).

    python bench/edit_memory.py --work runs/cf10k-10k --n 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

LEDGER_NAMES = ("ledger.db", "ledger.db-wal", "ledger.db-shm", "ledger.db.queue")


def status_mb() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
    return out


def reset_peak() -> None:
    """Set VmHWM back to the present VmRSS (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def copy_model(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n in LEDGER_NAMES or n in ("checkpoints", "logs")])
    if (src / "ledger.db").is_file():
        with sqlite3.connect(f"file:{src / 'ledger.db'}?mode=ro", uri=True) as a, sqlite3.connect(dst / "ledger.db") as b:
            a.backup(b)


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint directory, with its ledger (left unchanged)")
    src.add_argument("--work", type=Path, help="a bench/edit_scale.py --work directory: its model, records and options")
    ap.add_argument("--edits", type=Path, default=None, help="EasyEdit records (default: MODEL/edits.jsonl)")
    ap.add_argument("--n", type=int, default=20, help="edits to apply")
    ap.add_argument("--start", type=int, default=None, help="first record to apply (default: the number of live edits)")
    ap.add_argument("--option", action="append", default=[], help="edit option KEY=VALUE (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this bench reads and resets the peak memory through /proc (Linux only)")

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -P`, which leaves this folder out
    from edit_scale import parse_option

    from knowedit.checkpoint import check_checkpoint_dir
    from knowedit.data import load_records
    from knowedit.editor import Editor
    from knowedit.errors import KnoweditError

    options = dict(parse_option(o) for o in args.option)
    edits = args.edits
    if args.work is not None:
        state = args.work / "state.json"
        try:
            settings = json.loads(state.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            sys.exit(f"error: {state}: not the state of a bench/edit_scale.py --work run ({type(err).__name__}: {err})")
        args.model = args.work / "model"
        edits = edits or Path(settings["edits"])
        options = options or settings["options"]
    try:
        check_checkpoint_dir(args.model)
        records = load_records(edits or (args.model / "edits.jsonl"))
    except KnoweditError as err:
        sys.exit(f"error: {err}")
    with tempfile.TemporaryDirectory(prefix="edit_memory.") as tmp:
        model = Path(tmp) / "model"
        copy_model(args.model, model)
        before_open = status_mb()["VmRSS"]
        ed = Editor.open(model)
        n_live = len(ed.live_edits())
        after_open = status_mb()["VmRSS"]
        start = n_live if args.start is None else args.start
        todo = records[start : start + args.n]
        if not todo:
            sys.exit(f"no records from {start} on ({len(records)} in all)")
        print(f"open: {n_live} live edits, RSS {before_open} -> {after_open} MB", file=sys.stderr)
        rows = []
        for k, req in enumerate(todo):
            reset_peak()
            before = status_mb()["VmRSS"]
            t = time.perf_counter()
            rec = ed.apply(req, allow_failed=True, **options)
            s = status_mb()
            rows.append({
                "record": start + k, "guards": rec.metrics["guards"], "s": round(time.perf_counter() - t, 2),
                "rss_before_mb": before, "peak_mb": s["VmHWM"], "rss_after_mb": s["VmRSS"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr)
        ed.close()
    steady = rows[1:] or rows  # the first edit builds the caches
    k = slope([r["guards"] / 1000 for r in steady], [r["peak_mb"] for r in steady])
    out = {
        "model": str(args.model), "live_edits": n_live, "options": options, "threads": args.threads,
        "rss_before_open_mb": before_open, "rss_after_open_mb": after_open,
        "max_peak_mb": max(r["peak_mb"] for r in rows),
        "median_rss_between_edits_mb": statistics.median(r["rss_before_mb"] for r in steady),
        "median_edit_s": statistics.median(r["s"] for r in steady),
        "peak_mb_per_1000_guards": None if k is None else round(k, 1),
        "edits": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k != "edits"}, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
