"""Editing at scale: edit latency, peak memory and quality as edits and background grow.

Applies T edits one after another to a copy of a trained model (one ledger
transaction each, as ``knowedit edit apply`` does) and reports:

- per-edit wall time (median and p95, the first edit of the process apart:
  it builds the FAISS indexes) and the guards per edit;
- peak resident memory of the process (``ru_maxrss``) after each checkpoint
  count of edits;
- Rel/Gen (teacher-forced and greedy, :mod:`knowedit.evaluate`) over the edits
  applied so far, locality on the records' locality prompts, and locality on a
  random sample of background sentences that name no edited subject ("Loc-bg"):
  each keeps the greedy answer the model gave before any edit. These are
  scored at every ``--checkpoints`` count (the retention curve; each row goes
  to ``--json-out`` as soon as it is scored, so a long run that is stopped
  keeps what it reached) and at T.

``--background-extra N`` adds N sentences of another synthetic world (its own
seed: names the model never saw) to the copy's background corpus and rebuilds
its slot statistics: the same model then edits against a background N
sentences larger. That isolates how an edit's cost grows with the background.

    python bench/edit_scale.py --model runs/small --n 200 --threads 1
    python bench/edit_scale.py --model runs/small --n 200 --threads 1 --background-extra 100000
    python bench/edit_scale.py --model runs/small --n 200 --threads 1 --option guard_reads=0

``--work DIR`` keeps the model copy, its ledger and the run's progress in DIR
instead of a temporary directory, and running the same command again goes on
from the edits DIR's ledger already holds: a run of many hours (T = 10,000 on
the CounterFact world) can be stopped and continued. The Loc-bg sample and the
answers every locality prompt gave before any edit are stored there on the
first run; per-edit times are appended to ``DIR/progress.jsonl``. Peak memory
is per process: a continued run reports the peak of the process that reopened
the ledger with its live edits.

    python bench/edit_scale.py --model runs/cf10k --edits PATH/counterfact-train.json --n 10000 --work runs/cf10k-10k --json-out runs/cf10k-10k.json

``--batch N`` applies the edits N at a time (:meth:`Editor.edit_batch`, one ledger
event each) and reports per-batch times. ``--min-answer-tokens N`` keeps only the
records whose new target is N or more tokens (answer tokens, the end-of-text token
not counted) under the model's tokenizer, for the long-answer measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def extra_background(n: int, seed: int) -> list:
    """``n`` sentences of a synthetic world the model never saw."""
    from knowedit.config import WorldConfig
    from knowedit.data import make_world

    per_entity = 4 * 3  # 4 relations x 3 trained phrasings
    world = make_world(WorldConfig(entities=max(1, -(-n // per_entity)), seed=seed))
    return world.train_examples()[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="checkpoint directory (left unchanged)")
    ap.add_argument("--edits", type=Path, default=None, help="EasyEdit records (default: MODEL/edits.jsonl)")
    ap.add_argument("--n", type=int, default=200, help="edits to apply (T)")
    ap.add_argument(
        "--checkpoints", default="", help="edit counts at which to score Rel/Gen/Loc and record peak memory (always n)"
    )
    ap.add_argument("--background-extra", type=int, default=0, help="sentences of an unseen world added to the background")
    ap.add_argument("--loc-sample", type=int, default=2000, help="background sentences for Loc-bg")
    ap.add_argument("--option", action="append", default=[], help="edit option KEY=VALUE (repeatable)")
    ap.add_argument("--batch", type=int, default=1, help="edits per batch edit (1: one at a time)")
    ap.add_argument("--min-answer-tokens", type=int, default=0, help="only targets of at least N tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary model copy goes (default: the system's temp dir)")
    ap.add_argument("--work", type=Path, default=None, help="keep the model copy and progress here, and continue a run stopped there")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from knowedit.data import load_records, write_jsonl
    from knowedit.data.records import Example
    from knowedit.editor import Editor
    from knowedit.evaluate import ModelScorer, edited_fact_statements, generalization, reliability
    from knowedit.side_files import CORPUS_FILE, STATS_DOCS_FILE, STATS_FILE, read_docs

    options = dict(parse_option(o) for o in args.option)
    settings = {  # what a continued run must share with the run it continues
        "model": str(args.model.resolve()), "edits": str((args.edits or (args.model / "edits.jsonl")).resolve()),
        "options": options, "batch": max(1, args.batch), "min_answer_tokens": args.min_answer_tokens,
        "background_extra": args.background_extra, "loc_sample": args.loc_sample, "seed": args.seed,
    }  # fmt: skip
    resumed = False
    if args.work is not None:
        work = args.work
        state_file = work / "state.json"
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            if state["settings"] != settings:
                sys.exit(f"{work} holds a run with other settings: {state['settings']}")
            resumed = True
        else:
            if work.exists() and any(work.iterdir()):
                sys.exit(f"--work {work} exists and holds no run of this bench")
            work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="edit_scale.", dir=args.workdir))
    model = work / "model"
    if not resumed:
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns("ledger.db*"))
    reqs = load_records(args.edits or (args.model / "edits.jsonl"))
    if args.min_answer_tokens:
        from knowedit.checkpoint import load_checkpoint

        codec = load_checkpoint(model).codec
        reqs = [r for r in reqs if len(codec.encode_answer(r.target_new, eos=False)) >= args.min_answer_tokens]
    reqs = reqs[: args.n]
    if len(reqs) < args.n:
        sys.exit(f"only {len(reqs)} records for --n {args.n}")
    if args.background_extra and not resumed:
        docs = read_docs(model / CORPUS_FILE) + extra_background(args.background_extra, seed=args.seed + 1)
        write_jsonl(model / CORPUS_FILE, [{"prompt": d.prompt, "answer": d.answer} for d in docs])
        for name in (STATS_FILE, STATS_DOCS_FILE):
            (model / name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    ed = Editor.open(model)
    n_background = len(ed.docs)  # builds the statistics if they are missing
    stats_s = time.perf_counter() - t0
    scorer = ModelScorer(ed.model, ed.codec)

    loc_prompts = [p for r in reqs for p in r.locality_prompt]
    edited = {q.strip() for r in reqs for q in (r.prompt, *r.rephrase_prompt)}
    loc_prompts = [p for p in loc_prompts if p.strip() not in edited]  # the rule before 2026-12-05 ("loc_all")
    if resumed:  # the answers before any edit, from the first run
        sample_prompts, bg_before, loc_before = state["sample"], state["bg_before"], state["loc_before"]
    else:
        # Background sample for Loc-bg: sentences that name no edited subject.
        subjects = [r.subject or "" for r in reqs]
        rng = random.Random(args.seed)
        pool = [d for d in ed.docs if not any(s and s in d.prompt for s in subjects)]
        sample_prompts = [d.prompt for d in rng.sample(pool, min(args.loc_sample, len(pool)))]
        bg_before = scorer.greedy(sample_prompts)
        loc_before = scorer.greedy(loc_prompts)
        if args.work is not None:
            state = {"settings": settings, "sample": sample_prompts, "bg_before": bg_before, "loc_before": loc_before}
            (work / "state.json").write_text(json.dumps(state) + "\n")

    marks = sorted({int(c) for c in args.checkpoints.split(",") if c} | {args.n})

    def kept(prompts: list[str], before: list[str]) -> tuple[float | None, float | None]:
        if not prompts:
            return None, None
        tf = scorer.teacher_forced([Example(p, b) for p, b in zip(prompts, before) if b])
        tf = [x for x in tf if x == x]
        after = scorer.greedy(prompts)
        return (round(sum(tf) / len(tf), 4) if tf else None), round(sum(a == b for a, b in zip(after, before)) / len(prompts), 4)

    # Loc leaves out the locality prompts that state a fact one of the T edits changes
    # (knowedit.evaluate.edited_fact_statements, as `knowedit eval` does); "loc_all" keeps them.
    states = edited_fact_statements(reqs)
    loc_keep = [(p, b) for p, b in zip(loc_prompts, loc_before) if not states(p, b)]

    def quality(done: list) -> dict:
        """Rel/Gen over the ``done`` requests, and both localities, on the model as it is now."""
        rel, gen = reliability(scorer, done), generalization(scorer, done)
        loc_tf, loc_g = kept([p for p, _ in loc_keep], [b for _, b in loc_keep])
        all_tf, all_g = kept(loc_prompts, loc_before)
        bg_tf, bg_g = kept(sample_prompts, bg_before)
        return {
            "rel_tf": rel["teacher_forced"], "rel_greedy": rel["greedy"],
            "gen_tf": gen["teacher_forced"], "gen_greedy": gen["greedy"],
            "loc_tf": loc_tf, "loc_greedy": loc_g, "loc_prompts": len(loc_keep),
            "loc_all_tf": all_tf, "loc_all_greedy": all_g, "loc_all_prompts": len(loc_prompts),
            "loc_bg_tf": bg_tf, "loc_bg_greedy": bg_g, "loc_bg_prompts": len(sample_prompts),
        }  # fmt: skip

    out: dict = {
        "model": str(args.model),
        "edits": str(args.edits or (args.model / "edits.jsonl")),
        "T": args.n,
        "options": options,
        "batch": max(1, args.batch),
        "min_answer_tokens": args.min_answer_tokens,
        "background_docs": n_background,
        "background_extra": args.background_extra,
        "open_s": round(stats_s, 2),
        "threads": args.threads, "seed": args.seed,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "checkpoints": [],
    }  # fmt: skip

    def write() -> None:
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(out, indent=2) + "\n")

    times, guards, steps, ok, rss = [], [], [], 0, {}
    size = max(1, args.batch)
    first = 0
    progress = work / "progress.jsonl"
    warm = {0}  # edits whose time is left out of the medians: each process's first builds the indexes
    if resumed:
        rows_done = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()] if progress.is_file() else []
        n_live = len(ed.live_edits())
        if len(rows_done) > n_live:
            sys.exit(f"{work}: progress.jsonl has {len(rows_done)} edits, the ledger only {n_live} live")
        first = n_live * size  # the ledger is the truth; a line lost to a kill only loses that edit's time
        for row in rows_done:
            if row.get("warm"):
                warm.add(len(times))
            times.append(row["ms"])
            guards.append(row["guards"])
            steps.append(row["steps"])
            ok += row["ok"]
        warm.add(len(times))
        previous = json.loads(args.json_out.read_text()) if args.json_out and args.json_out.is_file() else {}
        out["checkpoints"] = previous.get("checkpoints", [])
        out["continued_at"] = [*previous.get("continued_at", []), first]
        out["times_lost"] = previous.get("times_lost", 0) + (n_live - len(rows_done))
        if first >= args.n:
            sys.exit(f"{work} already holds {first} edits (--n {args.n}); --json-out has its results")
        print(f"continuing at {first}/{args.n} edits", file=sys.stderr)

    def steady() -> list[float]:
        return [x for k, x in enumerate(times) if k not in warm]

    for start in range(first, len(reqs), size):
        chunk = reqs[start : start + size]
        i = start + len(chunk)
        t = time.perf_counter()
        if len(chunk) == 1:  # a batch of one is an edit (its record lists no requests)
            rec = ed.apply(chunk[0], allow_failed=True, **options)
            k_ok = int(bool(rec.metrics["success"]))
        else:
            rec = ed.edit_batch(chunk, allow_failed=True, **options)
            k_ok = sum(bool(q["success"]) for q in rec.metrics["requests"])
        ok += k_ok
        times.append((time.perf_counter() - t) * 1000)
        guards.append(rec.metrics["guards"])
        steps.append(rec.metrics["steps"])
        if args.work is not None:  # after the commit: a line here means its edit is in the ledger
            with progress.open("a") as f:
                line = {"ms": round(times[-1], 1), "guards": guards[-1], "steps": steps[-1], "ok": k_ok, "warm": len(times) - 1 in warm}
                f.write(json.dumps(line) + "\n")
        if i % 50 < size:
            print(f"{i}/{args.n} edits, median {statistics.median(steady() or times):.1f} ms, peak RSS {peak_rss_mb():.0f} MB", file=sys.stderr)
        reached = [m for m in marks if start < m <= i]
        if not reached:
            continue
        for m in reached:
            rss[m] = round(peak_rss_mb(), 1)
        t = time.perf_counter()
        row = {"T": i, "peak_rss_mb": rss[reached[-1]], **quality(reqs[:i])}
        rest = steady() or times
        row.update(
            edit_ms_median=round(statistics.median(rest), 1), edit_ms_p95=round(pct(rest, 0.95), 1),
            success=round(ok / max(1, len(times) * size), 4), score_s=round(time.perf_counter() - t, 1),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        )  # fmt: skip
        out["checkpoints"].append(row)
        print(f"{i}/{args.n} edits scored: Rel {row['rel_tf']} Gen {row['gen_tf']} Loc {row['loc_tf']} "
              f"(all {row['loc_all_tf']}) Loc-bg {row['loc_bg_tf']} peak RSS {row['peak_rss_mb']} MB", file=sys.stderr)  # fmt: skip
        write()

    rest = steady() or times
    final = out["checkpoints"][-1]
    out.update(
        first_edit_ms=round(times[0], 1),
        edit_ms_median=round(statistics.median(rest), 1),
        edit_ms_p95=round(pct(rest, 0.95), 1),
        guards_median=statistics.median(guards),
        steps_median=statistics.median(steps),
        success=round(ok / max(1, len(times) * size), 4),
        peak_rss_mb=rss,
        **{k: final[k] for k in final if k.startswith(("rel_", "gen_", "loc_"))},
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    ed.close()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    write()


if __name__ == "__main__":
    main()
