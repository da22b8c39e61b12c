"""New knowledge for a learning run (``knowedit learn --data FILE``).

Four formats, told apart by the file and its first record:

- ``.txt`` (or any file that is not JSON): one document per non-empty line;
- JSONL of ``{"text": ...}`` documents;
- JSONL of ``{"prompt": ..., "answer": ...}`` facts;
- EasyEdit records (JSON list or JSONL with ``prompt`` and ``target_new``):
  ``prompt + target_new`` and each ``rephrase_prompt + target_new`` are the
  new facts.

Everything becomes :class:`~knowedit.data.records.Example` pairs. A plain
document is split after its first word: the loss (and, for sparse memory
finetuning, the slot ranking) covers every token after that word, so a
document is learnt as a whole, as next-token prediction.
"""

from __future__ import annotations

import json
from pathlib import Path

from knowedit.data.records import Example, RecordError, load_records
from knowedit.errors import KnoweditError
from knowedit.tokenizer import text_problem

FORMATS = ("text", "documents", "facts", "easyedit")


class DataError(KnoweditError, ValueError):
    """A learning data file that cannot be read; the message names the file and line."""


def _first_record(text: str) -> object | None:
    """The first JSON value of a JSON list / JSONL text, or None if it is not JSON."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            return None
        return data[0] if isinstance(data, list) and data else None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if not first.lstrip().startswith("{"):
        return None
    try:
        return json.loads(first)
    except json.JSONDecodeError:
        return None


def detect_format(path: Path, text: str) -> str:
    """One of :data:`FORMATS` for the file at ``path`` holding ``text``."""
    if path.suffix.lower() == ".txt":
        return "text"
    first = _first_record(text)
    if not isinstance(first, dict):
        if text.lstrip().startswith(("{", "[")):
            raise DataError(f"{path} line 1: invalid JSON (expected JSONL records or a JSON list)")
        return "text"
    if "target_new" in first:
        return "easyedit"
    if "text" in first:
        return "documents"
    if "prompt" in first and "answer" in first:
        return "facts"
    raise DataError(
        f"{path} line 1: a record with fields {sorted(first)}; expected {{\"text\"}}, "
        "{\"prompt\", \"answer\"} or EasyEdit fields (prompt, target_new, ...)"
    )


def _split_document(doc: str) -> Example:
    first, _, rest = doc.strip().partition(" ")
    return Example(first, rest.strip())


def _check(value: object, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string")
    problem = text_problem(value)
    if problem is not None:
        raise DataError(f"{where}: field {field!r} is not valid text: {problem}")
    return value.strip()


def _jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    """(where, object) for each record of a JSONL file or a JSON list."""
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(o, dict) for o in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return [(f"{path} record {i}", o) for i, o in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        out.append((where, obj))
    return out


def load_learning_data(path: str | Path) -> tuple[list[Example], str]:
    """Read a learning data file.

    Args:
        path: a ``.txt`` file, JSONL of documents or facts, or EasyEdit records.

    Returns:
        ``(examples, format)``: the training pairs, in file order, and the
        detected format (one of :data:`FORMATS`).

    Raises:
        DataError: a missing, unreadable or empty file, or a malformed record
            (the message names the file and the line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no data file at {p}" if not p.exists() else f"{p} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{p} is not UTF-8 text (byte offset {err.start})") from None
    except OSError as err:
        raise DataError(f"cannot read {p}: {err.strerror or err}") from None
    if not text.strip():
        raise DataError(f"{p} is empty: no documents to learn")
    fmt = detect_format(p, text)
    examples: list[Example] = []
    if fmt == "text":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                doc = _check(line, "text", f"{p} line {n}")
                if " " not in doc:
                    raise DataError(f"{p} line {n}: a document needs at least two words")
                examples.append(_split_document(doc))
    elif fmt == "easyedit":
        try:
            records = load_records(p)
        except RecordError as err:
            raise DataError(str(err)) from None
        for r in records:
            examples.append(Example(r.prompt.strip(), r.target_new.strip()))
            examples.extend(Example(q.strip(), r.target_new.strip()) for q in r.rephrase_prompt)
    else:
        for where, obj in _jsonl(p, text):
            if fmt == "documents":
                doc = _check(obj.get("text"), "text", where)
                if " " not in doc:
                    raise DataError(f"{where}: a document needs at least two words")
                examples.append(_split_document(doc))
            else:
                examples.append(Example(_check(obj.get("prompt"), "prompt", where), _check(obj.get("answer"), "answer", where)))
    if not examples:
        raise DataError(f"{p} holds no documents")
    return examples, fmt
