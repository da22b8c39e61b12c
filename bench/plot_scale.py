"""Retention curves of ``bench/edit_scale.py`` runs: Rel, Gen and locality against T.

Reads the ``--json-out`` file of one or more runs (their ``checkpoints`` rows,
scored as the edits went on) and draws, per run, teacher-forced Rel (the edits
so far), Gen (their held-out phrasings), Loc (the records' locality prompts)
and Loc-bg (the background sample) against the number of edits, with greedy
scores dashed beside them.

    python bench/plot_scale.py runs/cf10k-10k.json --out docs/img/counterfact10k-T10000.png

A run scored before the locality rule of 2026-12-05 has no ``loc_all`` column:
its ``loc`` rows then are the old rule, and they are drawn as "Loc, old rule"
together with the ``loc_all`` rows of later checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SERIES = (
    ("rel", "Rel", "C0"),
    ("gen", "Gen", "C1"),
    ("loc", "Loc", "C2"),
    ("loc_old", "Loc, old rule", "C4"),
    ("loc_bg", "Loc-bg", "C3"),
)


def points(rows: list[dict], key: str, mode: str) -> list[tuple[int, float]]:
    """(T, score) of one series; ``mode`` is ``tf`` or ``greedy``."""
    out = []
    for r in rows:
        if key == "loc":
            v = r.get(f"loc_{mode}") if f"loc_all_{mode}" in r else None
        elif key == "loc_old":
            v = r.get(f"loc_all_{mode}", r.get(f"loc_{mode}"))
        else:
            v = r.get(f"{key}_{mode}")
        if v is not None:
            out.append((int(r["T"]), float(v)))
    return out


def load(path: Path) -> dict:
    try:
        run = json.loads(path.read_text())
    except OSError as err:
        raise SystemExit(f"error: {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path}: not JSON ({err.msg}, line {err.lineno})") from None
    rows = run.get("checkpoints") if isinstance(run, dict) else None
    if not rows or not all(isinstance(r, dict) and "T" in r for r in rows):
        raise SystemExit(f"error: {path}: no checkpoints (is it a bench/edit_scale.py --json-out file?)")
    return run


def plot(runs: list[tuple[Path, dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.4 * len(runs), 4.0), squeeze=False)
    for ax, (path, run) in zip(axes[0], runs):
        rows = sorted(run["checkpoints"], key=lambda r: r["T"])
        lowest = 1.0
        for key, label, color in SERIES:
            for mode, style in (("tf", "-"), ("greedy", ":")):
                pts = points(rows, key, mode)
                if pts:
                    lowest = min(lowest, *(v for _, v in pts))
                    ax.plot([t for t, _ in pts], [v for _, v in pts], style, marker="o" if mode == "tf" else None,
                            color=color, label=label if mode == "tf" else None)  # fmt: skip
        ax.set_title(f"{Path(str(run.get('model', path))).name}: {rows[-1]['T']:,} edits")
        ax.set_xlabel("sequential edits T")
        ax.set_ylabel("score (solid: teacher-forced, dotted: greedy)")
        ax.set_ylim(min(0.6, lowest) - 0.02, 1.005)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="bench/edit_scale.py --json-out files")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args()
    runs = [(p, load(p)) for p in args.runs]
    print(plot(runs, args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
