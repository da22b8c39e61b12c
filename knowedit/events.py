"""Ledger events as users read them: their edit requests, and the rows of
``knowedit ledger list/show --json`` and the server's ``/ledger`` endpoints
(one definition for both). Imports nothing heavy."""

from __future__ import annotations

from typing import Any


def event_requests(ev: Any) -> list[dict]:
    """The edit requests of an event: one for an edit, each of a batch's
    (``{"batch": n, "requests": [...]}``), none for a learning run or a revert."""
    if ev.kind != "apply":
        return []
    reqs = ev.request.get("requests")
    return list(reqs) if isinstance(reqs, list) else [ev.request]


def _prompt(ev: Any) -> str | None:
    if ev.kind == "learn":
        return f"learning run on {ev.request.get('data', '?')}"
    reqs = ev.request.get("requests")
    if isinstance(reqs, list) and reqs:
        return f"{reqs[0].get('prompt')} (batch of {len(reqs)})"
    return ev.request.get("prompt")


def event_summary(ev: Any, live: set[str]) -> dict[str, Any]:
    """One ledger event as a row of ``knowedit ledger list --json``."""
    reqs = event_requests(ev)
    return {
        "seq": ev.seq, "kind": ev.kind, "id": ev.edit_id, "created_at": ev.created_at, "author": ev.author,
        "prompt": _prompt(ev),
        "target_new": reqs[0].get("target_new") if reqs else ev.request.get("target_new"),
        "slots": len(ev.rows), "live": ev.kind != "revert" and ev.edit_id in live,
    }


def event_detail(ev: Any, live: bool) -> dict[str, Any]:
    """One edit as ``knowedit ledger show --json`` prints it."""
    return {
        "id": ev.edit_id, "seq": ev.seq, "created_at": ev.created_at, "author": ev.author, "note": ev.note,
        "live": live, "method": ev.method, "request": ev.request, "settings": ev.settings,
        "metrics": ev.metrics, "hash": ev.hash,
        "rows": [
            {"pool": r.pool, "slot": r.slot, "dtype": str(r.after.dtype).removeprefix("torch."),
             "change_l2": float((r.after.float() - r.before.float()).norm())}
            for r in ev.rows
        ],
    }
