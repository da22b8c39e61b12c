"""Edit and revert latency on a trained model (CPU by default).

Applies N edits one after another (each a separate ledger transaction), then
reverts them newest first, and reports per-edit wall time (median, p95), the
ledger's share of edit time, and revert latency.

    python bench/edit_latency.py --model runs/small --n 100 --json-out runs/edit_latency.json

Without --model it trains the `small` recipe into runs/bench-small first.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: train `small`)")
    ap.add_argument("--n", type=int, default=100, help="edits to apply")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from knowedit.config import load_train_config
    from knowedit.data import load_records
    from knowedit.editor import Editor
    from knowedit.recipes.train import train

    model = args.model
    if model is None:
        model = Path("runs/bench-small")
        if not (model / "model.safetensors").is_file():
            cfg = load_train_config(str(Path(__file__).resolve().parent.parent / "recipes/configs/small.yaml"))
            cfg.out = str(model)
            train(cfg, progress=False)
    work = Path(tempfile.mkdtemp(prefix="knowedit-bench-"))
    shutil.copytree(model, work / "m", ignore=shutil.ignore_patterns("ledger.db*", "logs"))
    reqs = load_records(work / "m" / "edits.jsonl")[: args.n]

    t_open = time.perf_counter()
    ed = Editor.open(work / "m")
    open_s = time.perf_counter() - t_open
    # Warm-up: the first edit builds the background cache (once per process).
    t_warm = time.perf_counter()
    warm = ed.edit(reqs[0].prompt, reqs[0].target_new, subject=reqs[0].subject, allow_failed=True)
    warm_ms = (time.perf_counter() - t_warm) * 1000
    ed.revert(warm.id)

    wall, ledger, ok, steps = [], [], [], []
    ids = []
    for r in reqs:
        t0 = time.perf_counter()
        rec = ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True)  # success is counted
        wall.append((time.perf_counter() - t0) * 1000)
        ledger.append(rec.metrics["ledger_ms"])
        ok.append(rec.metrics["success"])
        steps.append(rec.metrics["steps"])
        ids.append(rec.id)
    rev = []
    for eid in reversed(ids):
        t0 = time.perf_counter()
        ed.revert(eid)
        rev.append((time.perf_counter() - t0) * 1000)
    identical = all(torch.equal(ed.pools[p], ed.base[p]) for p in ed.pools)
    problems = ed.verify()
    ed.close()
    shutil.rmtree(work, ignore_errors=True)

    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": str(model),
        "edits": len(wall),
        "open_s": round(open_s, 2),
        "first_edit_ms": round(warm_ms, 1),
        "edit_ms_median": round(statistics.median(wall), 1),
        "edit_ms_p95": round(pct(wall, 0.95), 1),
        "edit_steps_median": statistics.median(steps),
        "success_rate": sum(ok) / len(ok),
        "ledger_share_median": round(statistics.median(lg / w for lg, w in zip(ledger, wall)), 4),
        "ledger_share_total": round(sum(ledger) / sum(wall), 4),
        "ledger_ms_median": round(statistics.median(ledger), 2),
        "revert_ms_median": round(statistics.median(rev), 2),
        "revert_ms_p95": round(pct(rev, 0.95), 2),
        "bit_identical_after_reverting_all": identical,
        "verify_problems": problems,
    }
    print(json.dumps(res, indent=2))
    print()
    print("| edits | edit median ms | edit p95 ms | steps (median) | success | ledger share | revert median ms | revert p95 ms |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {res['edits']} | {res['edit_ms_median']} | {res['edit_ms_p95']} | {res['edit_steps_median']} | "
        f"{res['success_rate']:.2f} | {res['ledger_share_median']:.1%} | {res['revert_ms_median']} | {res['revert_ms_p95']} |"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
