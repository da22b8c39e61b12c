"""Continual learning: acquisition of new facts against retention of old ones.

Pretrain a memory LM on one half of a world's facts (A), then stream the other
half (B) with ``knowedit learn`` by each method (sparse memory finetuning, full
finetuning, all value rows, LoRA), and record curves over training steps:

- acquisition: greedy exact match on B's training phrasings and, in the
  synthetic world, on B's held-out phrasings (never trained on);
- retention: greedy exact match on A's training phrasings, and the held-out
  loss on A's text (synthetic: A's held-out phrasings; CounterFact: A's
  sentences).

Greedy exact match is measured teacher-forced: every answer token and the eos
must be the argmax, which is exactly when greedy decoding produces the answer.

The comparison is at equal acquisition (Lin et al. 2025): for each method, the
first evaluated step whose acquisition on B is within 2 points of full
finetuning's final acquisition; forgetting there is the relative drop of A's
accuracy from the base model. A method that never gets there is reported at
its best acquisition, marked as short.

Worlds:

- ``synthetic``: the ``small`` recipe's world (250 entities x 4 relations,
  3 training phrasings + 1 held out per fact), facts split in half at random.
- ``counterfact``: the first ``--limit`` records of an EasyEdit-format
  CounterFact file, split in half by record: A's true facts (prompts,
  rephrases, locality facts) are pretrained, B's prompts and rephrases with
  their true answers are streamed (sentences also in A's text are left out).

Run (one torch thread; about 20 minutes for the synthetic world on 2 cores):

    python bench/continual.py --world synthetic --threads 1 --out-dir runs/continual-syn
    python bench/continual.py --world counterfact --data PATH/counterfact-train.json \
        --limit 1000 --threads 1 --out-dir runs/continual-cf
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from knowedit.config import LearnConfig, load_train_config
from knowedit.data import Example, load_records, make_world, true_fact_examples, write_jsonl
from knowedit.inference import encode_examples, teacher_forced
from knowedit.model import MemoryLM
from knowedit.recipes.learn import learn
from knowedit.recipes.train import train
from knowedit.tokenizer import TextCodec

SMALL = "small"
CF_MODEL = [  # the 2,000-record CounterFact world's CPU model (docs/benchmarks.md)
    "model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.memory_layers=[1,3]",
    "model.memory.n_keys=64", "model.memory.topk=8", "model.memory.key_dim=64", "data.vocab_size=4096",
    "data.batch_size=64", "max_epochs=60", "stop_at_accuracy=0.98",
]
EVAL_CAP = 600


def split_synthetic(seed: int) -> dict[str, list[Example]]:
    """A/B halves of the small recipe's world (facts split at random)."""
    cfg = load_train_config(str(_recipe(SMALL)))
    world = make_world(cfg.data.world)
    facts = list(world.facts)
    random.Random(seed).shuffle(facts)
    half = len(facts) // 2
    parts: dict[str, list[Example]] = {}
    for name, fs in (("A", facts[:half]), ("B", facts[half:])):
        parts[name] = [Example(p.format(s=f.subject), f.object) for f in fs for p in f.train_phrasings]
        parts[f"{name}_held"] = [Example(p.format(s=f.subject), f.object) for f in fs for p in f.held_out_phrasings]
    return parts


def split_counterfact(path: str, limit: int) -> dict[str, list[Example]]:
    """A/B halves of the first ``limit`` records (by record)."""
    records = load_records(path, limit=limit)
    half = len(records) // 2
    a = true_fact_examples(records[:half])
    seen = set(a)
    b = [e for e in true_fact_examples(
        [replace(r, locality_prompt=[], locality_ground_truth=[]) for r in records[half:]]) if e not in seen]
    return {"A": a, "B": b, "A_held": a, "B_held": []}


def _recipe(name: str) -> Path:
    from knowedit.cli.model import config_path

    return config_path(name)


def pretrain(parts: dict[str, list[Example]], world: str, out: Path, threads: int, extra: list[str]) -> dict:
    """Train the base model on A (skipped when ``out`` already holds it)."""
    report_file = out / "train_report.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.parent / "A.jsonl"
    write_jsonl(data, [asdict(e) for e in parts["A"]])
    base = SMALL if world == "synthetic" else "counterfact"
    overrides = ["data.source=documents", f"data.path={data}", "logger=none", f"threads={threads}"]
    if world == "counterfact":
        overrides += CF_MODEL
    overrides += extra
    cfg = load_train_config(str(_recipe(base)), overrides)
    cfg.name = f"continual-{world}-A"
    cfg.out = str(out)
    return train(cfg, progress=False)


def token_loss(model: MemoryLM, codec: TextCodec, examples: list[Example]) -> float:
    """Mean next-token loss over every token of the examples (their text)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), 256):
            b = encode_examples(codec, examples[s : s + 256], model.cfg.max_seq_len, answer_only=False)
            logits = model(b.ids)
            loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((b.targets != -100).sum())
    return total / max(1, count)


class Curves(L.Callback):
    """Evaluates acquisition and retention every ``every`` steps (and at step 0)."""

    def __init__(self, sets: dict[str, list[Example]], codec: TextCodec, every: int) -> None:
        self.sets, self.codec, self.every = sets, codec, every
        self.points: list[dict] = []
        self.offset = 0
        """Steps of the earlier phases (a run's steps count on across its phases)."""
        self.phase = 0

    def measure(self, model: MemoryLM, step: int) -> None:
        was = model.training
        model.eval()
        p: dict = {"step": self.offset + step, "phase": self.phase}
        for name in ("B", "B_held", "A"):
            if self.sets.get(name):
                p[f"acc_{name}"] = sum(teacher_forced(model, self.codec, self.sets[name])["exact"]) / len(self.sets[name])
        p["loss_A_held"] = token_loss(model, self.codec, self.sets["A_held"])
        self.points.append(p)
        model.train(was)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.points:  # a later phase starts where the last one's final point is
            self.measure(module.model, 0)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self.measure(module.model, step)


def run_method(base: Path, work: Path, data: Path | list[Path], cfg: LearnConfig, sets: dict, every: int) -> dict:
    """One learning run on a fresh copy of the base; returns its curve and report.

    With a list of data files (phases), the method learns them one after another:
    sparse commits one ``learn`` event per phase to the same model directory; a
    dense method starts each phase from the checkpoint the last one wrote. The
    curve's steps count on across phases, and its report is the last phase's
    (with every phase's in ``phases``).
    """
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work / "model")
    codec = TextCodec.load(base / "tokenizer.json")
    curves = Curves(sets, codec, every)
    files = data if isinstance(data, list) else [data]
    model = work / "model"
    reports = []
    t0 = time.monotonic()
    for i, part in enumerate(files):
        curves.phase = i
        out = None if cfg.method == "sparse" else work / f"out{i}"
        report = learn(model, part, cfg, out=out, progress=False, callbacks=[curves])
        curves.offset += report["steps"]
        if curves.points[-1]["step"] != curves.offset:
            raise RuntimeError("the curve must end at the phase's last step")
        reports.append(report)
        if out is not None:
            model = out
    report = {**reports[-1], "steps": curves.offset, "wall_s": round(time.monotonic() - t0, 1)}
    if len(reports) > 1:
        report["phases"] = reports
    shutil.rmtree(work)
    return {"label": label(cfg), "settings": {**asdict(cfg)}, "report": report, "curve": curves.points}


def label(cfg: LearnConfig) -> str:
    if cfg.method == "sparse":
        return f"sparse t={cfg.top_t} lr={cfg.lr or 'default'}"
    return cfg.method


def equal_acquisition(runs: list[dict], base_acc_a: float, tol: float = 0.02) -> tuple[float, list[dict]]:
    """Each run at the first step within ``tol`` of ft's final acquisition on B."""
    ft = next((r for r in runs if r["settings"]["method"] == "ft"), None)
    if ft is None:  # no full finetuning run: compare at the best acquisition of all runs
        ft = max(runs, key=lambda r: r["curve"][-1]["acc_B"])
    target = ft["curve"][-1]["acc_B"]
    rows = []
    for r in runs:
        hit = next((p for p in r["curve"] if p["acc_B"] >= target - tol), None)
        short = hit is None
        p = hit or max(r["curve"], key=lambda q: q["acc_B"])
        rows.append({
            "label": r["label"], "step": p["step"], "acc_B": p["acc_B"], "acc_B_held": p.get("acc_B_held"),
            "acc_A": p["acc_A"], "loss_A_held": p["loss_A_held"],
            "forgetting": (base_acc_a - p["acc_A"]) / base_acc_a if base_acc_a else math.nan,
            "reached": not short, "final_acc_B": r["curve"][-1]["acc_B"], "final_acc_A": r["curve"][-1]["acc_A"],
        })
    return target, rows


def plot(runs: list[dict], title: str, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        ax.plot([p["acc_B"] for p in r["curve"]], [p["acc_A"] for p in r["curve"]], marker=".", label=r["label"])
    ax.set_xlabel("acquisition: exact match on B (new facts)")
    ax.set_ylabel("retention: exact match on A (old facts)")
    ax.set_title(f"{title}: acquisition vs retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    f = out_dir / "tradeoff.png"
    fig.tight_layout()
    fig.savefig(f, dpi=120)
    plt.close(fig)
    files.append(str(f))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        steps = [p["step"] for p in r["curve"]]
        axes[0].plot(steps, [p["acc_B"] for p in r["curve"]], label=r["label"])
        axes[1].plot(steps, [p["acc_A"] for p in r["curve"]], label=r["label"])
    ends = sorted({a["step"] for r in runs for a, b in zip(r["curve"], r["curve"][1:]) if b.get("phase") != a.get("phase")})
    for ax in axes:
        for x in ends:  # phase boundaries
            ax.axvline(x, color="grey", lw=0.6, ls=":")
    axes[0].set_title(f"{title}: acquisition (B)")
    axes[1].set_title(f"{title}: retention (A)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    f = out_dir / "curves.png"
    fig.tight_layout()
    fig.savefig(f, dpi=120)
    plt.close(fig)
    files.append(str(f))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", choices=["synthetic", "counterfact"], default="synthetic")
    ap.add_argument("--data", help="counterfact: an EasyEdit-format CounterFact file")
    ap.add_argument("--limit", type=int, default=1000, help="counterfact: records used (half A, half B)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="ft,lora,ft-memory,sparse")
    ap.add_argument("--ts", default="64", help="sparse: top_t values to sweep")
    ap.add_argument("--lrs", default="0", help="sparse: learning rates to sweep (0: default)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--every", type=int, default=20, help="evaluate every N steps")
    ap.add_argument("--phases", type=int, default=1,
                    help="stream B in this many parts, learnt one after another (each --epochs)")
    ap.add_argument("--set", nargs="*", default=[], help="more LearnConfig KEY=VALUE for every run")
    ap.add_argument("--train-set", nargs="*", default=["model.memory.n_keys=256"],
                    help="overrides for pretraining on A (default: 65,536 slots per memory pool)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.world == "counterfact" and not args.data:
        ap.error("--world counterfact needs --data")
    parts = split_synthetic(args.seed) if args.world == "synthetic" else split_counterfact(args.data, args.limit)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "base"
    t0 = time.monotonic()
    train_report = pretrain(parts, args.world, base, args.threads, args.train_set)
    print(f"base: trained on A ({len(parts['A'])} sentences): {train_report['train_greedy_accuracy']:.3f} "
          f"in {train_report['train_seconds']} s", flush=True)
    data: Path | list[Path] = out_dir / "B.jsonl"
    write_jsonl(data, [asdict(e) for e in parts["B"]])
    if args.phases > 1:  # contiguous parts: a fact's phrasings stay together (B lists them by fact)
        b = parts["B"]
        cuts = [round(i * len(b) / args.phases) for i in range(args.phases + 1)]
        data = [out_dir / f"B{i + 1}.jsonl" for i in range(args.phases)]
        for i, f in enumerate(data):
            write_jsonl(f, [asdict(e) for e in b[cuts[i] : cuts[i + 1]]])
    sets = {k: (v if len(v) <= EVAL_CAP else random.Random(args.seed).sample(v, EVAL_CAP)) for k, v in parts.items()}
    from knowedit.config import load_learn_config

    configs = []
    for m in args.methods.split(","):
        if m == "sparse":
            for t in args.ts.split(","):
                for lr in args.lrs.split(","):
                    configs.append(["method=sparse", f"top_t={t}", f"lr={lr}"])
        else:
            configs.append([f"method={m}"])
    runs = []
    for i, c in enumerate(configs):
        cfg = load_learn_config(None, c + [f"epochs={args.epochs}", f"batch_size={args.batch_size}",
                                           f"seed={args.seed}", f"threads={args.threads}", *args.set])
        r = run_method(base, out_dir / f"work{i}", data, cfg, sets, args.every)
        last = r["curve"][-1]
        print(f"{r['label']:<28} steps {r['report']['steps']:>4}  B {last['acc_B']:.3f}  A {last['acc_A']:.3f}  "
              f"({r['report']['wall_s']} s)", flush=True)
        runs.append(r)
    base_acc_a = runs[0]["curve"][0]["acc_A"]
    target, rows = equal_acquisition(runs, base_acc_a)
    title = "synthetic world" if args.world == "synthetic" else f"CounterFact world ({args.limit} records)"
    files = plot(runs, title, out_dir)
    result = {"world": args.world, "limit": args.limit if args.world == "counterfact" else None,
              "sizes": {k: len(v) for k, v in parts.items()}, "base": train_report, "base_acc_A": base_acc_a,
              "target_acc_B": target, "equal_acquisition": rows, "runs": runs, "plots": files,
              "threads": args.threads, "seconds": round(time.monotonic() - t0, 1), "argv": sys.argv[1:]}
    (out_dir / "continual.json").write_text(json.dumps(result, indent=2))
    print(f"\nbase accuracy on A {base_acc_a:.3f}; ft's final acquisition on B {target:.3f} (equal acquisition: within 0.02)")
    print("| method | step | acq. B | acq. B held-out | acc. A | forgetting | A held-out loss | reached |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        held = "-" if r["acc_B_held"] is None else f"{r['acc_B_held']:.3f}"
        print(f"| {r['label']} | {r['step']} | {r['acc_B']:.3f} | {held} | {r['acc_A']:.3f} | "
              f"{r['forgetting']:.1%} | {r['loss_A_held']:.3f} | {'yes' if r['reached'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
