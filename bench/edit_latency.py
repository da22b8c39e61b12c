"""Edit and revert latency on trained models (CPU by default).

Applies N edits one after another (each a separate ledger transaction), then
reverts them newest first, and reports per-edit wall time (median, p95), the
ledger's share of edit time, and revert latency.

    python bench/edit_latency.py --model runs/small --n 100 --json-out runs/edit_latency.json

Without --model it trains the `small` recipe into runs/bench-small first.

Several ``--model`` flags time the models side by side in one process: every
round applies the next edit to each model, in an order that rotates, so each
sees the same load; the report then gives each model's latency and its ratio
to the first model's. ``--edits FILE`` (EasyEdit records) sets the edits of
the ``--model`` just before it (default: that model's ``edits.jsonl``):

    python bench/edit_latency.py --model runs/small --model runs/cf10k --edits PATH/counterfact-train.json --n 100 --threads 1

``--option KEY=VALUE`` (repeatable) passes edit options (docs/editing.md) to
every model's edits.
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


class _ModelAction(argparse.Action):
    """``--model DIR`` starts an entry; ``--edits FILE`` fills in the last one's edits."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        runs = getattr(namespace, "runs", None) or []
        if option_string == "--model":
            runs.append({"model": Path(value), "edits": None})
        elif not runs:
            parser.error("--edits belongs to the --model given before it")
        elif runs[-1]["edits"] is not None:
            parser.error(f"--model {runs[-1]['model']} has two --edits")
        else:
            runs[-1]["edits"] = Path(value)
        namespace.runs = runs


class _Run:
    """One model's copy, its editor and its timings."""

    def __init__(self, model: Path, edits: Path | None, n: int, root: Path, index: int, options: dict) -> None:
        from knowedit.data import load_records
        from knowedit.editor import Editor

        self.model = model
        self.options = options
        self.dir = root / f"m{index}"
        shutil.copytree(model, self.dir, ignore=shutil.ignore_patterns("ledger.db*", "logs", "checkpoints"))
        self.reqs = load_records(edits or self.dir / "edits.jsonl", limit=n)
        if not self.reqs:
            raise SystemExit(f"{model}: no edit records")
        t0 = time.perf_counter()
        self.ed = Editor.open(self.dir)
        self.open_s = time.perf_counter() - t0
        self.wall: list[float] = []
        self.ledger: list[float] = []
        self.ok: list[bool] = []
        self.steps: list[int] = []
        self.guards: list[int] = []
        self.ids: list[str] = []
        self.rev: list[float] = []
        self.warm_ms = 0.0

    def warm_up(self) -> None:
        """The first edit builds the background cache (once per process); it is reverted
        and timed again with the others."""
        r = self.reqs[0]
        t0 = time.perf_counter()
        rec = self.ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True, **self.options)
        self.warm_ms = (time.perf_counter() - t0) * 1000
        self.ed.revert(rec.id)

    def apply(self, i: int) -> None:
        r = self.reqs[i]
        t0 = time.perf_counter()
        rec = self.ed.edit(r.prompt, r.target_new, subject=r.subject, allow_failed=True, **self.options)  # success is counted
        self.wall.append((time.perf_counter() - t0) * 1000)
        self.ledger.append(rec.metrics["ledger_ms"])
        self.ok.append(rec.metrics["success"])
        self.steps.append(rec.metrics["steps"])
        self.guards.append(int(rec.metrics.get("guards", 0)))
        self.ids.append(rec.id)

    def revert_all(self) -> dict:
        for eid in reversed(self.ids):
            t0 = time.perf_counter()
            self.ed.revert(eid)
            self.rev.append((time.perf_counter() - t0) * 1000)
        identical = all(torch.equal(self.ed.pools[p], self.ed.base[p]) for p in self.ed.pools)
        problems = self.ed.verify()
        self.ed.close()
        wall, ledger = self.wall, self.ledger
        return {
            "model": str(self.model),
            "edits": len(wall),
            "open_s": round(self.open_s, 2),
            "first_edit_ms": round(self.warm_ms, 1),
            "edit_ms_median": round(statistics.median(wall), 1),
            "edit_ms_p95": round(pct(wall, 0.95), 1),
            "edit_steps_median": statistics.median(self.steps),
            "guards_median": statistics.median(self.guards),
            "options": self.options,
            "success_rate": sum(self.ok) / len(self.ok),
            "ledger_share_median": round(statistics.median(lg / w for lg, w in zip(ledger, wall)), 4),
            "ledger_share_total": round(sum(ledger) / sum(wall), 4),
            "ledger_ms_median": round(statistics.median(ledger), 2),
            "revert_ms_median": round(statistics.median(self.rev), 2),
            "revert_ms_p95": round(pct(self.rev, 0.95), 2),
            "bit_identical_after_reverting_all": identical,
            "verify_problems": problems,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action=_ModelAction, help="checkpoint dir (repeatable; default: train `small`)")
    ap.add_argument("--edits", action=_ModelAction, help="EasyEdit records for the --model before it (default: MODEL/edits.jsonl)")
    ap.add_argument("--n", type=int, default=100, help="edits to apply (per model)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--option", action="append", default=[], help="edit option KEY=VALUE for every model (repeatable)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from knowedit.checkpoint import check_checkpoint_dir
    from knowedit.config import load_train_config
    from knowedit.errors import KnoweditError
    from knowedit.recipes.train import train

    specs = getattr(args, "runs", None) or []
    if not specs:
        model = Path("runs/bench-small")
        if not (model / "model.safetensors").is_file():
            cfg = load_train_config(str(Path(__file__).resolve().parent.parent / "recipes/configs/small.yaml"))
            cfg.out = str(model)
            train(cfg, progress=False)
        specs = [{"model": model, "edits": None}]
    from knowedit.cli.common import parse_options
    from knowedit.edit_options import EditOptions

    try:
        options = parse_options(args.option)
        EditOptions.from_mapping(options)
        for s in specs:
            check_checkpoint_dir(s["model"])
    except (ValueError, KnoweditError) as err:  # a bad --option or checkpoint: one line, not a traceback
        raise SystemExit(f"error: {err}") from None
    work = Path(tempfile.mkdtemp(prefix="knowedit-bench-"))
    try:
        try:
            runs = [_Run(s["model"], s["edits"], args.n, work, i, options) for i, s in enumerate(specs)]
        except KnoweditError as err:  # a bad records file or checkpoint: one line, not a traceback
            raise SystemExit(f"error: {err}") from None
        for run in runs:
            run.warm_up()
        n = min(len(run.reqs) for run in runs)
        for i in range(n):
            for j in range(len(runs)):  # the order rotates: no model always goes first
                runs[(i + j) % len(runs)].apply(i)
        results = [run.revert_all() for run in runs]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }
    if len(results) == 1:
        res = {**head, **results[0]}
    else:
        first = results[0]["edit_ms_median"]
        for r in results:
            r["ratio_to_first"] = round(r["edit_ms_median"] / first, 2)
        res = {**head, "interleaved": True, "models": results}
    print(json.dumps(res, indent=2))
    print()
    print("| model | edits | edit median ms | edit p95 ms | steps (median) | guards (median) | success | ledger share | revert median ms | revert p95 ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['edits']} | {r['edit_ms_median']} | {r['edit_ms_p95']} | {r['edit_steps_median']} | {r['guards_median']:g} | "
            f"{r['success_rate']:.2f} | {r['ledger_share_median']:.1%} | {r['revert_ms_median']} | {r['revert_ms_p95']} | "
            f"{r.get('ratio_to_first', 1.0):.2f} |"
        )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
