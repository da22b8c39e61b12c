"""EasyEdit-format edit records: loading, validation and the example type.

Fields follow EasyEdit: ``prompt, subject, target_new, ground_truth,
rephrase_prompt, locality_prompt, locality_ground_truth`` (a JSON list or JSONL).
``rephrase_prompt`` and ``locality_prompt`` may be a string or a list of strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from knowedit.tokenizer import text_problem


class RecordError(ValueError):
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


def request_from_dict(raw: Mapping, where: str = "record") -> EditRequest:
    """Validate one EasyEdit-format dict into an :class:`EditRequest`.

    Raises:
        RecordError: naming the record and the missing or malformed field.
    """
    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected an object, got {type(raw).__name__}")
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
    return EditRequest(
        prompt=raw["prompt"],
        target_new=raw["target_new"],
        subject=subject,
        ground_truth=raw.get("ground_truth"),
        rephrase_prompt=rephrase,
        locality_prompt=loc_p,
        locality_ground_truth=loc_a,
        case_id=None if case_id is None else str(case_id),
    )


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
    if limit:
        raw = raw[:limit]
    return [request_from_dict(r, where=f"{p.name} record {i}") for i, r in enumerate(raw)]


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
    """A JSONL file of ``{"prompt", "answer"}`` objects (a checkpoint's corpus)."""
    with open(path, encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
