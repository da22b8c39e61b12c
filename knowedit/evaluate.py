"""Sequential-editing evaluation: apply T edits one after another, then score
the final model on all T of them (EasyEdit's metrics, as in the WISE paper).

- Reliability: the edit prompt gives ``target_new``.
- Generalization: each rephrased prompt gives ``target_new``.
- Locality: each locality prompt gives the same answer as before any edit
  (locality prompts that are themselves among the T edits' prompts or
  rephrases are meant to change; they are left out and counted).
- Portability (when the records have portability prompts): each portability
  prompt gives its ``ground_truth``, the answer that follows from the edit.

The result also carries EasyEdit's names for the teacher-forced scores
(:func:`easyedit_names`): ``rewrite_acc``, ``rephrase_acc``, ``locality`` and
``portability``.

Every metric is reported in two modes side by side: teacher-forced token
accuracy (EasyEdit's convention) and greedy exact match without teacher
forcing (stricter; "The Mirage of Model Editing", 2025, saw single-edit
success fall from 96.8% to 38.5% without teacher forcing). For locality the
teacher-forced score is the share of the pre-edit greedy answer's tokens that
stay the argmax; the greedy score is whether the completion is unchanged.

The metric functions take a :class:`Scorer` (greedy completions and
teacher-forced token accuracies), so they can be checked on hand-made fakes;
:class:`ModelScorer` is the real one and :func:`evaluate` wires a model
directory, an edit method (:mod:`knowedit.baselines`) and the scorer together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from knowedit.data.records import EditRequest, Example, RecordError, requests_from
from knowedit.errors import OptionError
from knowedit.inference import PromptError, encode_pair, greedy, teacher_forced
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec

#: Modes of every score, in report order.
MODES = ("teacher_forced", "greedy")


class Scorer(Protocol):
    """What the metrics need from a model."""

    def greedy(self, prompts: Sequence[str]) -> list[str]:
        """Greedy completion of each prompt (stripped text, without the eos)."""
        ...

    def teacher_forced(self, examples: Sequence[Example]) -> list[float]:
        """Per example: share of the answer's tokens that are the argmax under
        teacher forcing (nan where it cannot be scored)."""
        ...


class EditMethod(Protocol):
    """An edit method under evaluation (see :mod:`knowedit.baselines`)."""

    name: str
    settings: dict

    def apply(self, req: EditRequest) -> Mapping[str, object]:
        """Apply one edit to the live model. Returns at least ``success`` (bool),
        ``steps``, ``seconds``, ``slots_touched`` and ``params_touched``."""
        ...

    # Optional: ``warm_up(req)`` runs once before the first edit and must leave
    # the model as it was (one-time costs are then not timed as edit 1's).


class ModelScorer:
    """A :class:`Scorer` over a live model (it sees every in-place edit).

    Args:
        model: the model.
        codec: its tokenizer.
        max_new_tokens: greedy budget; give every answer room for its eos, so
            that a completion that runs on past the answer counts as wrong.
        batch_size: teacher-forcing batch size.
    """

    def __init__(self, model: MemoryLM, codec: TextCodec, max_new_tokens: int = 8, batch_size: int = 256) -> None:
        self.model, self.codec = model, codec
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def greedy(self, prompts: Sequence[str]) -> list[str]:
        out: list[str] = []
        for s in range(0, len(prompts), self.batch_size):
            out += greedy(self.model, self.codec, prompts[s : s + self.batch_size], self.max_new_tokens)
        return out

    @torch.no_grad()
    def teacher_forced(self, examples: Sequence[Example]) -> list[float]:
        max_len = self.model.cfg.max_seq_len
        ok: list[int] = []
        for i, ex in enumerate(examples):
            try:
                encode_pair(self.codec, ex.prompt, ex.answer, max_len)
                ok.append(i)
            except PromptError:
                # e.g. a greedy answer that ran to the end of the context: no room
                # left for its eos. Left out rather than guessed.
                pass
        out = [math.nan] * len(examples)
        scored = teacher_forced(self.model, self.codec, [examples[i] for i in ok], self.batch_size)["token_acc"]
        for i, acc in zip(ok, scored):  # answer tokens, eos left out
            out[i] = acc
        return out


# ------------------------------------------------------------------ metrics
def _mean(xs: Iterable[float]) -> float | None:
    """Mean of the non-nan values; None when there are none (JSON-friendly)."""
    vals = [float(x) for x in xs if not math.isnan(float(x))]
    return sum(vals) / len(vals) if vals else None


def _per_edit(values: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Split a flat list into per-edit groups and average each (nan for an empty group)."""
    out, s = [], 0
    for n in sizes:
        m = _mean(values[s : s + n])
        out.append(math.nan if m is None else m)
        s += n
    return out


def _same(a: str, b: str) -> float:
    return float(a.strip() == b.strip())


def _score(scorer: Scorer, groups: Sequence[Sequence[Example]]) -> dict:
    """Score prompt -> answer groups (one group per edit) in both modes, batched.

    Each edit's prompts are averaged first, then the edits (edits without
    prompts are left out), so an edit with many rephrases weighs as much as
    one with a single rephrase.

    An empty answer has no tokens to force: it counts in the greedy mode only.

    Args:
        scorer: the model.
        groups: per edit, the examples to score (greedy must produce ``answer``).
    """
    flat = [e for g in groups for e in g]
    sizes = [len(g) for g in groups]
    forced = [e for e in flat if e.answer.strip()]
    tf_vals = iter(scorer.teacher_forced(forced) if forced else [])
    tf = [next(tf_vals) if e.answer.strip() else math.nan for e in flat]
    got = scorer.greedy([e.prompt for e in flat]) if flat else []
    gr = [_same(g, e.answer) for g, e in zip(got, flat)]
    per_tf, per_gr = _per_edit(tf, sizes), _per_edit(gr, sizes)
    return {
        "teacher_forced": _mean(per_tf),
        "greedy": _mean(per_gr),
        "edits": sum(1 for x in per_gr if not math.isnan(x)),
        "prompts": len(flat),
    }


def reliability(scorer: Scorer, requests: Sequence[EditRequest]) -> dict:
    """Edit prompt -> ``target_new``, in both modes."""
    return _score(scorer, [[Example(r.prompt, r.target_new)] for r in requests])


def generalization(scorer: Scorer, requests: Sequence[EditRequest]) -> dict:
    """Every rephrase prompt -> ``target_new`` (per-edit mean, then over edits)."""
    return _score(scorer, [[Example(p, r.target_new) for p in r.rephrase_prompt] for r in requests])


def portability(scorer: Scorer, requests: Sequence[EditRequest]) -> dict:
    """Every portability prompt -> its ground truth (per-edit mean, then over edits);
    edits without portability prompts are left out."""
    return _score(
        scorer,
        [[Example(p, a) for p, a in zip(r.portability_prompt, r.portability_ground_truth)] for r in requests],
    )


def easyedit_names(result: Mapping[str, object]) -> dict[str, float | None]:
    """The teacher-forced scores under EasyEdit's names (its convention is teacher-forced
    token accuracy): ``rewrite_acc`` (reliability), ``rephrase_acc`` (generalization),
    ``locality`` and ``portability`` (None when no record has portability prompts)."""

    def tf(key: str) -> float | None:
        m = result.get(key)
        return m.get("teacher_forced") if isinstance(m, Mapping) else None

    return {
        "rewrite_acc": tf("reliability"),
        "rephrase_acc": tf("generalization"),
        "locality": tf("locality"),
        "portability": tf("portability"),
    }


def true_fact_accuracy(scorer: Scorer, requests: Sequence[EditRequest]) -> dict:
    """Edit prompt -> ``ground_truth`` (the fact before the edit); records without one are left out."""
    return _score(scorer, [[Example(r.prompt, r.ground_truth)] if r.ground_truth else [] for r in requests])


def locality_answers(scorer: Scorer, requests: Sequence[EditRequest]) -> list[list[str]]:
    """The model's greedy answer to each locality prompt, per edit (take it before editing)."""
    flat = [p for r in requests for p in r.locality_prompt]
    got = scorer.greedy(flat) if flat else []
    out, s = [], 0
    for r in requests:
        out.append(got[s : s + len(r.locality_prompt)])
        s += len(r.locality_prompt)
    return out


def edited_fact_statements(requests: Sequence[EditRequest]) -> Callable[[str, str], bool]:
    """A test of whether a prompt with its pre-edit answer states a fact that one of
    ``requests`` changes: the prompt is an edit's prompt or rephrase, or it names an
    edit's subject and was answered with that edit's old answer (``ground_truth``),
    as a co-phrasing is. Such a prompt is meant to change with the edit."""
    edited = {q.strip() for r in requests for q in (r.prompt, *r.rephrase_prompt)}
    old: dict[str, set[str]] = {}
    for r in requests:
        if r.subject and r.ground_truth:
            old.setdefault(r.ground_truth.strip(), set()).add(r.subject.strip())

    def states(prompt: str, answer: str) -> bool:
        if prompt.strip() in edited:
            return True
        return any(s in prompt for s in old.get(answer.strip(), ()))

    return states


def locality(scorer: Scorer, requests: Sequence[EditRequest], before: Sequence[Sequence[str]]) -> dict:
    """Locality prompts keep their pre-edit answers.

    A locality prompt that states a fact one of the ``requests`` changes
    (:func:`edited_fact_statements`: it is an edit's prompt or rephrase, or it
    names an edit's subject and the model answered it with that edit's old
    answer) is meant to change: it is left out, and counted in ``excluded`` (in
    a small world, e.g. T = every fact, that can be most of them). In a run of
    many CounterFact edits, one record's neighbourhood prompt is sometimes
    another edited record's fact in other words.

    Teacher-forced: share of the pre-edit greedy answer's tokens that stay the
    argmax. Greedy: the completion equals the pre-edit one. A pre-edit answer
    that is empty (the model stopped at once) has no tokens to force: it counts
    in the greedy mode only.

    Args:
        scorer: the edited model.
        requests: the edits.
        before: :func:`locality_answers` of the unedited model.
    """
    if len(before) != len(requests) or any(len(b) != len(r.locality_prompt) for b, r in zip(before, requests)):
        raise ValueError("before must hold one answer per locality prompt of every request")
    states = edited_fact_statements(requests)
    groups = [[Example(p, a) for p, a in zip(r.locality_prompt, b) if not states(p, a)] for r, b in zip(requests, before)]
    out = _score(scorer, groups)
    out["excluded"] = sum(len(r.locality_prompt) for r in requests) - out["prompts"]
    return out


def retention_points(T: int, k: int = 10) -> list[int]:
    """Edit counts for the retention curve: 1, about ``k`` evenly spaced ones, and T."""
    if T < 1:
        return []
    k = max(1, min(k, T))
    return sorted({1, T} | {max(1, round(T * i / k)) for i in range(1, k + 1)})


def retention(scorer: Scorer, requests: Sequence[EditRequest], t: int) -> float | None:
    """Teacher-forced reliability on the first ``t`` edits (one batched call)."""
    vals = scorer.teacher_forced([Example(r.prompt, r.target_new) for r in requests[:t]])
    return _mean(vals)


def _summary(xs: Sequence[float]) -> dict:
    if not xs:
        return {"median": None, "p95": None, "mean": None, "total": 0.0}
    a = np.asarray(xs, dtype=float)
    return {
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "mean": float(a.mean()),
        "total": float(a.sum()),
    }


def run_edits(
    method: EditMethod,
    scorer: Scorer,
    requests: Sequence[EditRequest],
    checkpoints: int | Sequence[int] = 10,
    on_edit: Callable[[int, Mapping[str, object]], None] | None = None,
    batch: int = 1,
) -> dict:
    """Apply ``requests`` one after another with ``method``, then score the final model.

    The scorer must see the model ``method`` edits (it is scored before the
    first edit, at the retention points and after the last edit).

    Args:
        method: applies one edit to the live model.
        scorer: scores the live model.
        requests: the T edits, in order.
        checkpoints: number of retention points (evenly spaced, plus T) or the
            edit counts themselves.
        on_edit: called after each edit with (t, outcome).
        batch: apply the requests ``batch`` at a time, each group as one batch
            edit (the method's ``apply_batch``); retention points fall at group ends.

    Returns:
        A JSON-serialisable dict: ``T``, ``reliability``, ``generalization``,
        ``locality``, ``portability`` (None when no request has portability
        prompts), ``easyedit`` (:func:`easyedit_names`), ``base_accuracy`` (true facts before editing),
        ``targets_before`` (reliability of the unedited model), ``success_rate``,
        ``edit_seconds`` (``warmup_seconds`` apart), ``steps``, ``slots_touched``, ``params_touched``,
        ``retention`` and per-edit ``edits``.
    """
    reqs = list(requests)
    T = len(reqs)
    if T == 0:
        raise RecordError("no edit requests to evaluate")
    points = retention_points(T, checkpoints) if isinstance(checkpoints, int) else sorted(
        {int(t) for t in checkpoints if 1 <= int(t) <= T}
    )
    warm = getattr(method, "warm_up", None)
    t_warm = time.perf_counter()
    if warm is not None:
        warm(reqs[0])
    warmup_seconds = time.perf_counter() - t_warm
    base = true_fact_accuracy(scorer, reqs)
    targets_before = reliability(scorer, reqs)
    loc_before = locality_answers(scorer, reqs)
    outcomes: list[dict] = []
    curve: list[dict] = []
    if batch > 1 and not hasattr(method, "apply_batch"):
        raise OptionError(f"method {getattr(method, 'name', method)!r} has no batch editing (batch must be 1)")
    t = 0
    for s in range(0, T, batch):
        group = reqs[s : s + batch]
        outs = [dict(method.apply(group[0]))] if batch == 1 else [dict(o) for o in method.apply_batch(group)]  # type: ignore[attr-defined]
        for out in outs:
            t += 1
            outcomes.append(out)
            if on_edit is not None:
                on_edit(t, out)
        if any(s < p <= t for p in points):
            curve.append({"t": t, "reliability": retention(scorer, reqs, t)})
    per_batch = [float(o["batch_seconds"]) for o in outcomes[::batch] if "batch_seconds" in o]  # each group's first
    scores = {
        "reliability": reliability(scorer, reqs),
        "generalization": generalization(scorer, reqs),
        "locality": locality(scorer, reqs, loc_before),
        "portability": portability(scorer, reqs) if any(r.portability_prompt for r in reqs) else None,
    }
    return {
        "T": T,
        **scores,
        "easyedit": easyedit_names(scores),
        "base_accuracy": base,
        "targets_before": targets_before,
        "success_rate": sum(bool(o.get("success")) for o in outcomes) / T,
        "edit_seconds": _summary([float(o.get("seconds", 0.0)) for o in outcomes]),
        "batch": batch,
        "batch_seconds": _summary(per_batch) if batch > 1 and per_batch else None,
        "warmup_seconds": warmup_seconds,
        "steps": _summary([float(o.get("steps", 0)) for o in outcomes]),
        "slots_touched": _summary([float(o.get("slots_touched", 0)) for o in outcomes]),
        "params_touched": _summary([float(o.get("params_touched", 0)) for o in outcomes]),
        "retention": curve,
        "edits": [
            {"prompt": r.prompt, "target_new": r.target_new, **{k: v for k, v in o.items() if _is_json_scalar(v)}}
            for r, o in zip(reqs, outcomes)
        ],
    }


def _is_json_scalar(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


# ---------------------------------------------------------------- harness
def check_requests(requests: Sequence[EditRequest], codec: TextCodec, max_len: int) -> None:
    """Every prompt of every request must fit the model, before any edit is made.

    Raises:
        RecordError: naming the record and the prompt.
    """
    for i, r in enumerate(requests):
        where = f"record {i}" + (f" (case_id {r.case_id})" if r.case_id else "")
        try:
            encode_pair(codec, r.prompt, r.target_new, max_len)
            if r.ground_truth:
                encode_pair(codec, r.prompt, r.ground_truth, max_len)
            for p in r.rephrase_prompt:
                encode_pair(codec, p, r.target_new, max_len)
            for p, a in zip(r.portability_prompt, r.portability_ground_truth):
                encode_pair(codec, p, a, max_len)
            for p in r.locality_prompt:
                if not p.strip():
                    raise PromptError("a locality prompt is empty")
                if len(codec.encode_prompt(p)) >= max_len:
                    raise PromptError(f"locality prompt {p!r} leaves no room for an answer in {max_len} tokens")
        except PromptError as err:
            raise RecordError(f"{where}: {err}") from None


def answer_budget(requests: Sequence[EditRequest], codec: TextCodec) -> int:
    """Greedy tokens to generate: the longest known answer plus its eos, and at least 8."""
    answers = [
        a for r in requests
        for a in (r.target_new, r.ground_truth or "", *r.locality_ground_truth, *r.portability_ground_truth)
        if a.strip()
    ]
    longest = max((len(codec.encode_answer(a, eos=False)) for a in answers), default=0)
    return max(8, longest + 1)


def evaluate(
    model_dir: str | Path,
    requests: str | Path | Iterable[Mapping | EditRequest],
    n: int | None = None,
    method: str = "sparse",
    options: Mapping[str, object] | None = None,
    checkpoints: int | Sequence[int] = 10,
    device: str = "cpu",
    on_edit: Callable[[int, Mapping[str, object]], None] | None = None,
    batch: int = 1,
) -> dict:
    """Apply the first ``n`` requests sequentially with ``method`` and score the final model.

    The user's checkpoint directory and ledger are never written: the sparse
    method edits a temporary copy with a throwaway ledger, the baselines an
    in-memory model.

    Args:
        model_dir: a checkpoint directory (``knowedit train``).
        requests: EasyEdit-format records (a JSON/JSONL path, dicts or
            :class:`EditRequest`).
        n: edits to apply (T); default all; at most the number of records.
        method: a name in :data:`knowedit.baselines.METHODS`.
        options: the method's settings (see :func:`knowedit.baselines.open_method`).
        checkpoints: retention-curve points (a count, or the edit counts).
        device: where the model runs.
        on_edit: progress callback, called with (t, outcome) after each edit.
        batch: edits per batch edit (``sparse`` only; 1: one edit at a time).

    Returns:
        :func:`run_edits`' dict plus ``method``, ``settings``, ``model``,
        ``records``, ``device`` and ``eval_seconds``.

    Raises:
        ValueError: bad records, ``n < 1``, an unknown method or option.
    """
    from knowedit.baselines import open_method

    if n is not None and n < 1:
        raise OptionError(f"n must be at least 1, got {n}")
    reqs = requests_from(requests)
    if not reqs:
        raise RecordError("no edit requests to evaluate")
    available = len(reqs)
    reqs = reqs[:n] if n is not None else reqs
    t0 = time.perf_counter()
    with open_method(method, model_dir, options, device) as m:
        check_requests(reqs, m.codec, m.model.cfg.max_seq_len)
        scorer = ModelScorer(m.model, m.codec, max_new_tokens=answer_budget(reqs, m.codec))
        result = run_edits(m, scorer, reqs, checkpoints, on_edit, batch=batch)
        settings = dict(m.settings)
    return {
        "method": method,
        "settings": settings,
        "model": str(model_dir),
        "records": available,
        "device": device,
        **result,
        "eval_seconds": round(time.perf_counter() - t0, 3),
    }


__all__ = [
    "MODES",
    "EditMethod",
    "ModelScorer",
    "Scorer",
    "answer_budget",
    "check_requests",
    "easyedit_names",
    "evaluate",
    "generalization",
    "locality",
    "locality_answers",
    "new_plot_path",
    "plot_retention",
    "plot_run",
    "portability",
    "reliability",
    "retention",
    "retention_points",
    "run_edits",
    "true_fact_accuracy",
]


def plot_retention(results: list[dict], path: Path) -> Path:
    """Teacher-forced reliability on edits 1..t against t, one line per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for res in results:
        curve = [p for p in res["retention"] if p["reliability"] is not None]
        ax.plot([p["t"] for p in curve], [p["reliability"] for p in curve], marker="o", label=f"{res['method']} (T={res['T']})")
    ax.set_xlabel("edits applied (t)")
    ax.set_ylabel("reliability on edits 1..t (teacher-forced)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def new_plot_path(directory: Path, method: str, T: int) -> Path:
    """A file name in ``directory`` that no earlier run has: ``eval-METHOD-TT-YYYYmmdd-HHMMSS[-k].png``.

    The file is created (empty) here, so two runs in the same second get different names.
    """
    import os

    from knowedit.errors import FileAccessError, file_problem

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileAccessError(f"plot directory {directory} is a file, not a directory") from None
    except OSError as err:
        raise file_problem(directory, err, "write") from None
    stem = f"eval-{method}-T{T}-{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1, 10_000):
        path = directory / (f"{stem}.png" if k == 1 else f"{stem}-{k}.png")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        except OSError as err:
            raise file_problem(path, err, "write") from None
        return path
    raise FileAccessError(f"no free plot file name for {stem} in {directory}")


def plot_run(res: Mapping, path: Path) -> Path:
    """One evaluation (:func:`evaluate`'s result) as a PNG: reliability on edits 1..t
    against t (left), and the final reliability, generalization and locality
    (and portability, when scored) in both modes (right). The title names the
    model, the edits file and T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = Path(str(res.get("model", "?")))
    data = Path(str(res.get("edits_file", "records")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    curve = [p for p in res["retention"] if p["reliability"] is not None]
    left.plot([p["t"] for p in curve], [p["reliability"] for p in curve], marker="o")
    left.set_xlabel("edits applied (t)")
    left.set_ylabel("Rel on edits 1..t (teacher-forced)")
    left.set_ylim(-0.02, 1.02)
    left.grid(alpha=0.3)
    names = [("Rel", "reliability"), ("Gen", "generalization"), ("Loc", "locality"), ("Port", "portability")]
    names = [(label, key) for label, key in names if res.get(key) is not None]
    width = 0.38
    for j, mode in enumerate(MODES):
        vals = [res[key][mode] for _, key in names]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        bars = right.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=mode.replace("_", "-"))
        for b, v in zip(bars, vals):
            right.annotate("-" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                           ha="center", va="bottom", fontsize=8)
    right.set_xticks(range(len(names)), [label for label, _ in names])
    right.set_ylim(0, 1.12)
    right.set_ylabel(f"final model, all {res['T']} edits")
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{res['method']} on {model.name or model} | data: {data.name} | T = {res['T']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
