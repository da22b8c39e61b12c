"""Checks of the ledger shared by its tests, independent of ``Editor.verify``."""

from __future__ import annotations

import torch

from knowedit.ledger import Event


def replay(base: dict[str, torch.Tensor], events: list[Event]) -> dict[str, torch.Tensor]:
    """Base + the ledger, replayed independently of the Editor: after rows of each
    apply (or learn), the apply's before rows for each revert, in seq order."""
    state = {name: v.clone() for name, v in base.items()}
    applies: dict[str, Event] = {}
    for ev in events:
        if ev.kind in ("apply", "learn"):
            applies[ev.edit_id] = ev
            for r in ev.rows:
                state[r.pool][r.slot] = r.after
        else:
            assert ev.kind == "revert", ev.kind
            for r in applies[ev.edit_id].rows:
                state[r.pool][r.slot] = r.before
    return state


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def assert_same_pools(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> None:
    """Bitwise equality of two pool dicts (dtype, shape and every byte)."""
    assert a.keys() == b.keys(), what
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name}"
        same = (as_bytes(x) == as_bytes(y)).all(-1)
        bad = (~same).nonzero().flatten()
        assert bad.numel() == 0, f"{what}: {name} differs in {bad.numel()} row(s), e.g. {bad[:5].tolist()}"
