"""EasyEdit-format edit records: loading, validation and the example type.

Fields follow EasyEdit: ``prompt, subject, target_new, ground_truth,
rephrase_prompt, locality_prompt, locality_ground_truth`` (a JSON list or JSONL).
``rephrase_prompt`` and ``locality_prompt`` may be a string or a list of strings.
Optional ``portability`` prompts (multi-hop or aliased questions whose answer
follows from the edit) come as EasyEdit writes them (see :func:`_portability`).

Two raw data sets load as they are distributed, told apart by their fields
(:func:`request_from_dict`):

- zsRE (MEND's ``zsre_mend_eval.json``): ``src, alt, answers, rephrase, loc,
  loc_ans`` (and ``subject``); ``loc`` is ``"nq question: ..."``, whose question
  becomes the locality prompt, with ``loc_ans`` its answer. Records with an
  empty ``alt`` are skipped, as EasyEdit does.
- CounterFact (ROME's ``counterfact.json``): ``requested_rewrite`` with a
  ``prompt`` holding ``{}`` for the ``subject``, ``target_new.str`` and
  ``target_true.str``, plus ``paraphrase_prompts`` (generalization) and
  ``neighborhood_prompts`` (locality, answered by the true target).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knowedit.errors import KnoweditError
from knowedit.tokenizer import text_problem


class RecordError(KnoweditError, ValueError):
    """A malformed edit request or records file."""


@dataclass(frozen=True)
class Example:
    """One fact rendered for training or scoring: the prompt and its answer."""

    prompt: str
    answer: str


@dataclass
class EditRequest:
    """One edit in EasyEdit's record format."""

    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrase_prompt: list[str] = field(default_factory=list)
    locality_prompt: list[str] = field(default_factory=list)
    locality_ground_truth: list[str] = field(default_factory=list)
    case_id: str | None = None
    portability_prompt: list[str] = field(default_factory=list)
    """Prompts whose answer follows from the edit (EasyEdit's portability)."""
    portability_ground_truth: list[str] = field(default_factory=list)
    """The answer of each portability prompt once the edit is made."""

    def to_dict(self) -> dict:
        return asdict(self)


def _as_list(value: object, name: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise RecordError(f"{where}: field {name!r} must be a string or a list of strings")


def _check_text(value: str, name: str, where: str) -> None:
    """Refuse surrogates (a JSON ``"\\ud800"``): no tokenizer can encode them."""
    problem = text_problem(value)
    if problem is not None:
        raise RecordError(f"{where}: field {name!r} is not valid text: {problem}")


def record_format(raw: Mapping) -> str:
    """``counterfact`` (raw CounterFact), ``zsre`` (raw zsRE) or ``easyedit`` (flat), by the fields."""
    if "requested_rewrite" in raw:
        return "counterfact"
    if "src" in raw and "alt" in raw and "prompt" not in raw:
        return "zsre"
    return "easyedit"


def request_from_dict(raw: Mapping, where: str = "record") -> EditRequest:
    """Validate one record into an :class:`EditRequest`: EasyEdit's flat format,
    or a raw zsRE or CounterFact record (:func:`record_format`).

    Raises:
        RecordError: naming the record and the missing or malformed field.
    """
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(raw).__name__}")
    kind = record_format(raw)
    if kind == "counterfact":
        raw = _from_counterfact(raw, where)
    elif kind == "zsre":
        raw = _from_zsre(raw, where)
    for name in ("prompt", "target_new"):
        if name not in raw:
            raise RecordError(f"{where}: missing required field {name!r}")
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise RecordError(f"{where}: field {name!r} must be a non-empty string")
    for name in ("subject", "ground_truth"):
        if raw.get(name) is not None and not isinstance(raw[name], str):
            raise RecordError(f"{where}: field {name!r} must be a string")
    for name in ("prompt", "target_new", "subject", "ground_truth"):
        if raw.get(name) is not None:
            _check_text(raw[name], name, where)
    subject = raw.get("subject")
    if subject and subject not in raw["prompt"]:
        raise RecordError(f"{where}: subject {subject!r} does not occur in the prompt")
    rephrase = _as_list(raw.get("rephrase_prompt"), "rephrase_prompt", where)
    loc_p = _as_list(raw.get("locality_prompt"), "locality_prompt", where)
    loc_a = _as_list(raw.get("locality_ground_truth"), "locality_ground_truth", where)
    if not loc_p and raw.get("locality") is not None:  # KnowEdit's nested locality
        loc_p, loc_a = _prompt_groups(raw["locality"], "locality", where)
    for name, values in (("rephrase_prompt", rephrase), ("locality_prompt", loc_p), ("locality_ground_truth", loc_a)):
        for i, v in enumerate(values):
            _check_text(v, name if len(values) == 1 else f"{name}[{i}]", where)
    if len(loc_p) != len(loc_a):
        if len(loc_a) == 1:
            loc_a = loc_a * len(loc_p)
        else:
            raise RecordError(f"{where}: locality_prompt and locality_ground_truth differ in length")
    case_id = raw.get("case_id")
    if isinstance(case_id, str):
        _check_text(case_id, "case_id", where)
    port_p, port_a = _portability(raw, where)
    return EditRequest(
        prompt=raw["prompt"],
        target_new=raw["target_new"],
        subject=subject,
        ground_truth=raw.get("ground_truth"),
        rephrase_prompt=rephrase,
        locality_prompt=loc_p,
        locality_ground_truth=loc_a,
        case_id=None if case_id is None else str(case_id),
        portability_prompt=port_p,
        portability_ground_truth=port_a,
    )


def _field(raw: Mapping, path: str, where: str) -> object:
    """``raw[a][b]`` for ``path="a.b"``, or a RecordError naming the path."""
    cur: object = raw
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise RecordError(f"{where}: missing required field {path!r}")
        cur = cur[part]
    return cur


def _string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _from_counterfact(raw: Mapping, where: str) -> dict:
    """A raw CounterFact record as EasyEdit's flat fields."""
    subject = _string(_field(raw, "requested_rewrite.subject", where), "requested_rewrite.subject", where)
    template = _string(_field(raw, "requested_rewrite.prompt", where), "requested_rewrite.prompt", where)
    if "{}" not in template:
        raise RecordError(f"{where}: field 'requested_rewrite.prompt' must hold {{}} where the subject goes")
    new = _string(_field(raw, "requested_rewrite.target_new.str", where), "requested_rewrite.target_new.str", where)
    true = _string(_field(raw, "requested_rewrite.target_true.str", where), "requested_rewrite.target_true.str", where)
    neighbours = _as_list(raw.get("neighborhood_prompts"), "neighborhood_prompts", where)
    out = {
        "prompt": template.replace("{}", subject),
        "subject": subject,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": _as_list(raw.get("paraphrase_prompts"), "paraphrase_prompts", where),
        "locality_prompt": neighbours,
        "locality_ground_truth": [true] * len(neighbours),
        "case_id": raw.get("case_id"),
    }
    if "portability" in raw:
        out["portability"] = raw["portability"]
    return out


NQ_PREFIX = "nq question: "
"""How raw zsRE marks its locality question (Natural Questions)."""


def _from_zsre(raw: Mapping, where: str) -> dict:
    """A raw zsRE record as EasyEdit's flat fields (an empty ``alt`` is skipped by the loader)."""
    src = _string(raw["src"], "src", where)
    alt = _string(raw["alt"], "alt", where)
    answers = _as_list(raw.get("answers"), "answers", where)
    loc = raw.get("loc")
    out: dict = {
        "prompt": src,
        "target_new": alt,
        "ground_truth": answers[0] if answers else None,
        "rephrase_prompt": _as_list(raw.get("rephrase"), "rephrase", where),
        "case_id": raw.get("case_id"),
    }
    subject = raw.get("subject")
    if isinstance(subject, str) and subject and subject in src:
        out["subject"] = subject  # zsRE's subject is not always written as in src: kept only when it is
    if loc is not None:
        question = _string(loc, "loc", where)
        question = question[len(NQ_PREFIX):] if question.startswith(NQ_PREFIX) else question
        out["locality_prompt"] = [question.strip()]
        out["locality_ground_truth"] = [_string(raw.get("loc_ans"), "loc_ans", where)]
    if "portability" in raw:
        out["portability"] = raw["portability"]
    return out


def _answer(value: object, name: str, where: str) -> str:
    """A ground truth as EasyEdit writes it: a string, or a list of aliases
    (possibly nested, as in KnowEdit); the first alias is the answer."""
    while isinstance(value, list) and value:
        value = value[0]
    return _string(value, name, where)


def _portability(raw: Mapping, where: str) -> tuple[list[str], list[str]]:
    """Portability prompts and answers: flat ``portability_prompt`` /
    ``portability_ground_truth`` (as the locality fields) and/or ``portability``
    in any of EasyEdit's shapes (:func:`_prompt_groups`). Every group is scored
    together as one ``portability`` (the group names are not kept)."""
    prompts = _as_list(raw.get("portability_prompt"), "portability_prompt", where)
    answers = [_answer(a, "portability_ground_truth", where) for a in _list_of(raw.get("portability_ground_truth"))]
    if len(prompts) != len(answers):
        raise RecordError(f"{where}: portability_prompt and portability_ground_truth differ in length")
    more_p, more_a = _prompt_groups(raw.get("portability"), "portability", where)
    prompts, answers = prompts + more_p, answers + more_a
    for i, (p, a) in enumerate(zip(prompts, answers)):
        _check_text(p, f"portability prompt {i}", where)
        _check_text(a, f"portability ground truth {i}", where)
    return prompts, answers


def _prompt_groups(value: object, name: str, where: str) -> tuple[list[str], list[str]]:
    """Prompts and answers of EasyEdit's nested ``portability`` / ``locality`` fields:

    - ``{group: [{"prompt", "ground_truth"}, ...]}`` (KnowEdit),
    - ``{group: {"prompt": [...], "ground_truth": [...]}}`` (``BaseEditor.edit``'s
      ``portability_inputs`` / ``locality_inputs``),
    - ``[{"prompt", "ground_truth"}, ...]``.

    A ground truth may be a list of aliases (nested, in KnowEdit): the first is the answer.
    """
    groups: list[tuple[str, object]] = []
    if value is None:
        return [], []
    if isinstance(value, Mapping):
        groups = [(f"{name}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        groups = [(name, value)]
    else:
        raise RecordError(f"{where}: field {name!r} must be an object or a list")
    prompts: list[str] = []
    answers: list[str] = []
    for label, group in groups:
        items: list = []
        if isinstance(group, Mapping):
            ps = _as_list(group.get("prompt"), f"{label}.prompt", where)
            gt = group.get("ground_truth")
            gts = [gt] if isinstance(gt, str) else _list_of(gt)
            if len(gts) != len(ps):
                raise RecordError(f"{where}: {label}.prompt and {label}.ground_truth differ in length")
            items = [{"prompt": p, "ground_truth": a} for p, a in zip(ps, gts)]
        elif isinstance(group, list):
            items = group
        else:
            raise RecordError(f"{where}: field {label!r} must be a list of {{prompt, ground_truth}} objects")
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "prompt" not in item or "ground_truth" not in item:
                raise RecordError(f"{where}: {label}[{i}] must be an object with 'prompt' and 'ground_truth'")
            prompts.append(_answer(item["prompt"], f"{label}[{i}].prompt", where))
            answers.append(_answer(item["ground_truth"], f"{label}[{i}].ground_truth", where))
    return prompts, answers


def _list_of(value: object) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def load_records(path: str | Path, limit: int = 0) -> list[EditRequest]:
    """Read EasyEdit records from a JSON list or a JSONL file.

    Args:
        path: the file.
        limit: keep the first ``limit`` records (0: all).

    Raises:
        RecordError: unreadable file, bad JSON (with its line) or a bad record.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise RecordError(f"cannot read {p}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RecordError(f"{p} is not UTF-8 text") from None
    raw: list
    stripped = text.lstrip()
    if not stripped:
        raise RecordError(f"{p} is empty")
    if stripped.startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{p}: invalid JSON at line {err.lineno}: {err.msg}") from None
    else:
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecordError(f"{p}: invalid JSON on line {n}: {err.msg}") from None
    if not isinstance(raw, list):
        raise RecordError(f"{p}: expected a JSON list of records or one record per line")
    # Raw zsRE records without a new target are not edits (EasyEdit skips them too).
    kept = [(i, r) for i, r in enumerate(raw) if not _empty_zsre(r)]
    if limit:
        kept = kept[:limit]
    return [request_from_dict(r, where=f"{p.name} record {i}") for i, r in kept]


def _empty_zsre(r: object) -> bool:
    return isinstance(r, Mapping) and record_format(r) == "zsre" and r.get("alt") == ""


def requests_from(source: str | Path | Iterable[Mapping | EditRequest]) -> list[EditRequest]:
    """Accept a path, or an iterable of dicts / :class:`EditRequest`, and return requests."""
    if isinstance(source, (str, Path)):
        return load_records(source)
    out = []
    for i, r in enumerate(source):
        out.append(r if isinstance(r, EditRequest) else request_from_dict(r, where=f"request {i}"))
    return out


def true_fact_examples(records: Iterable[EditRequest]) -> list[Example]:
    """The CounterFact world's training text: every record's true facts.

    Renders prompt + ground_truth, each rephrase + ground_truth and each
    locality prompt + its answer, without duplicates, in a stable order.
    """
    seen: set[Example] = set()
    out: list[Example] = []

    def add(prompt: str, answer: str | None) -> None:
        if answer is None:
            return
        ex = Example(prompt.strip(), answer.strip())
        if ex not in seen:
            seen.add(ex)
            out.append(ex)

    for r in records:
        add(r.prompt, r.ground_truth)
        for p in r.rephrase_prompt:
            add(p, r.ground_truth)
        for p, a in zip(r.locality_prompt, r.locality_ground_truth):
            add(p, a)
    return out


def read_examples(path: str | Path) -> list[Example]:
    """A JSONL file of ``{"prompt", "answer"}`` objects with string values (a checkpoint's
    corpus and its other example files; :func:`knowedit.side_files.read_docs` too).

    Raises:
        RecordError: unreadable file, or a line that is not a ``{prompt, answer}`` object (named).
    """
    out: list[Example] = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}: invalid JSON on line {n}: {err.msg}") from None
                if not (isinstance(raw, dict) and set(raw) == {"prompt", "answer"}
                        and isinstance(raw["prompt"], str) and isinstance(raw["answer"], str)):
                    raise RecordError(f"{path}: line {n} is not a {{prompt, answer}} object of strings")
                out.append(Example(**raw))
    except OSError as err:
        raise RecordError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path} is not UTF-8 text") from None
    return out


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
