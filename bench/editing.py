"""Sequential editing: knowedit's sparse editor against dense baselines.

For every method (sparse, ft, ft-memory, lora) and every T (1, 10, 100, 1000,
clipped to the records available), apply T edits one after another to a fresh
copy of the model and score the final model on all T (knowedit.evaluate):
reliability, generalization and locality, teacher-forced and greedy; the base
model's accuracy on the true facts; edit time; slots and parameters touched.
Writes ``editing.json``, ``editing.md`` (the table) and PNG plots into --out-dir:
``editing-teacher_forced.png`` and ``editing-greedy.png`` (Rel/Gen/Loc vs T per
method) and ``editing-retention.png`` (reliability on edits 1..t at the largest T).

    python bench/editing.py --model runs/counterfact \
        --edits PATH/counterfact-train.json --device cuda
    python bench/editing.py --model runs/tiny --quick --out-dir /tmp/bench   # seconds on CPU

--edits defaults to MODEL/edits.jsonl (written by `knowedit train` for synthetic worlds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

METHODS = ("sparse", "ft", "ft-memory", "lora")
METRICS = ("reliability", "generalization", "locality")


def _f(x: object) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(results: list[dict]) -> str:
    """One row per (method, T): Rel/Gen/Loc in both modes, then cost, then the
    locality prompts left out because they are among the T edits themselves."""
    head = (
        "| method | T | Rel TF | Rel greedy | Gen TF | Gen greedy | Loc TF | Loc greedy | base acc TF / greedy "
        "| success | s/edit median | s/edit p95 | slots/edit | params/edit | lr | loc prompts left out |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in results:
        cells = [r["method"], str(r["T"])]
        for m in METRICS:
            cells += [_f(r[m]["teacher_forced"]), _f(r[m]["greedy"])]
        b = r["base_accuracy"]
        cells += [
            f"{_f(b['teacher_forced'])} / {_f(b['greedy'])}",
            f"{r['success_rate']:.2f}",
            f"{r['edit_seconds']['median']:.3f}",
            f"{r['edit_seconds']['p95']:.3f}",
            f"{r['slots_touched']['median']:.0f}",
            f"{r['params_touched']['median']:.0f}",
            f"{r['settings'].get('lr')}",
            str(r["locality"].get("excluded", 0)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out_dir: Path) -> list[Path]:
    """Rel/Gen/Loc vs T per method (one figure per scoring mode) and the retention curves."""
    import matplotlib

    from knowedit.evaluate import plot_retention

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    paths = []
    for mode in ("teacher_forced", "greedy"):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
        for ax, metric in zip(axes, METRICS):
            for m in methods:
                rows = sorted((r for r in results if r["method"] == m), key=lambda r: r["T"])
                pts = [(r["T"], r[metric][mode]) for r in rows if r[metric][mode] is not None]
                ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=m)
            ax.set_xscale("log")
            ax.set_title(f"{metric} ({mode.replace('_', '-')})")
            ax.set_xlabel("sequential edits T")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        path = out_dir / f"editing-{mode}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    last = [max((r for r in results if r["method"] == m), key=lambda r: r["T"]) for m in methods]
    paths.append(plot_retention(last, out_dir / "editing-retention.png"))
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    ap.add_argument("--edits", type=Path, default=None, help="EasyEdit records (default: MODEL/edits.jsonl)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all four)")
    ap.add_argument("--ts", default="1,10,100,1000", help="comma-separated T values (clipped to the records)")
    ap.add_argument("--max-steps", type=int, default=None, help="step budget for every method (default: EditOptions')")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="T in {1, 3}: a smoke run")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/img"), help="JSON, markdown and PNGs go here")
    args = ap.parse_args(argv)

    import torch

    from knowedit.data import load_records
    from knowedit.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    edits = args.edits or args.model / "edits.jsonl"
    reqs = load_records(edits)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ts = [1, 3] if args.quick else [int(t) for t in args.ts.split(",") if t.strip()]
    if not reqs or not ts or min(ts) < 1:
        raise SystemExit("need at least one record and T values >= 1")
    ts = sorted({min(t, len(reqs)) for t in ts})
    options = {"max_steps": args.max_steps} if args.max_steps is not None else None
    args.out_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for m in methods:
        for t in ts:
            t0 = time.perf_counter()
            res = evaluate(args.model, reqs, n=t, method=m, options=options, device=device)
            res.pop("edits", None)  # per-edit rows: kept out of the summary file
            results.append(res)
            print(
                f"{m:>10} T={t:<5} rel {_f(res['reliability']['teacher_forced'])}/{_f(res['reliability']['greedy'])} "
                f"gen {_f(res['generalization']['teacher_forced'])}/{_f(res['generalization']['greedy'])} "
                f"loc {_f(res['locality']['teacher_forced'])}/{_f(res['locality']['greedy'])} "
                f"({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
            )
    report = {
        "model": str(args.model),
        "edits": str(edits),
        "device": device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "command": "python bench/editing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": results,
    }
    (args.out_dir / "editing.json").write_text(json.dumps(report, indent=2))
    table = markdown(results)
    (args.out_dir / "editing.md").write_text(table)
    report["plots"] = [str(p) for p in plot(results, args.out_dir)]
    print(table)
    return report


if __name__ == "__main__":
    main()
