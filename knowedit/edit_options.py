"""Edit options: how an edit is located and optimised (recorded with every edit).

A module of its own, without torch, so that the command line can show the
library's defaults in ``--help`` without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields


@dataclass
class EditOptions:
    """How an edit is located and optimised (recorded with every edit)."""

    top_t: int = 64
    """Value rows to update."""
    retry_top_t: int = 128
    """An edit (or batch) that does not pass with ``top_t`` rows is computed once more
    with this many, located afresh (0, or not above ``top_t``: no second try). Long
    answers read more rows than one-token ones; the second try costs only where needed."""
    layers: str = "last"
    """Memory layers whose slots may change: ``last`` (the last block's memory layer;
    fast, since everything before it is frozen) or ``all``. On a model whose last block
    has no memory layer, left unset it means ``all``."""
    widen: int = 1
    """Search ``widen x k`` slots per head when locating."""
    use_subject: bool = True
    """Also choose slots at the subject's last token."""
    idf_source: str = "any"
    """Background usage for ranking: documents reading a slot at ``any`` position
    (Lin et al. 2025) or only where they predict their ``answer``."""
    max_df: float = 1.0
    """Slots read by more than this share of the background documents (hubs) are not
    edited. Every background reader of an edited slot is guarded, so hubs make an
    edit slow; fewer, rarer rows also generalise less (docs/benchmarks.md). 1: no limit."""
    lr: float = 1.0
    """Adam step size for the rows."""
    beta1: float = 0.5
    """Adam's first-moment decay (momentum) for the rows, in [0, 1): lower overshoots
    less where guards push back."""
    prompt_weight: float = 1.0
    """Weight of the requested prompt's answer tokens in the loss, relative to a
    co-phrasing's (final-layer edits). Above 1 the prompt passes in fewer steps
    and the fact's other phrasings follow less (generalization falls)."""
    max_steps: int = 300
    min_prob: float = 0.6
    """Stop once every target token is the argmax with at least this probability..."""
    kl_tol: float = 0.01
    """...and the guarded facts' mean KL to their pre-edit distribution is at most this."""
    locality_weight: float = 1.0
    """Weight of the KL guard on unrelated facts that read the chosen slots."""
    guard_facts: int = 256
    """At most this many background facts are guarded (``layers=all``)."""
    guard_reads: int = 0
    """Final-layer edits: 0 guards every background reader of the chosen slots (exact
    locality on the background; cost grows with it). N > 0 (experimental) guards at
    most ``top_t x N`` positions: beyond that budget each slot's N strongest readers,
    its next 4N are checked once the rows are found, weaker ones are not kept."""
    conflict: str = "joint"
    """Slots of live edits: ``joint`` (share them; the earlier edits' reads are kept
    exactly, or guarded with ``layers=all``) or ``avoid`` (choose other slots)."""
    constraint: str = "margin"
    """Final-layer edits: ``margin`` (every background and live-edit position that
    reads the slots keeps its greedy token by a margin) or ``exact`` (their memory
    reads do not change at all: null-space projection; leaves less room)."""
    guard_margin: float = 0.5
    """Logit margin the guards keep (or their present one, if smaller)."""
    cophrase_steps: int = 30
    """Once the prompt itself passes, stop after this many steps even if some
    co-phrasings do not pass yet."""
    null_rtol: float = 1e-6
    """Null-space editing: read directions whose singular value is below this
    fraction of the largest count as free (0 < x < 1; larger trades locality for room)."""
    cophrase: bool = True
    """Also move the fact's other phrasings known to the model (training-corpus
    documents with the subject and the model's current answer) to the new target."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, options: Mapping[str, object]) -> EditOptions:
        """Validated options; ``ValueError`` names an unknown option or a bad value."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown edit option(s) {unknown}; known: {sorted(known)}")
        for name, value in options.items():
            kind = type(known[name].default)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ValueError(f"edit option {name} must be {kind.__name__}, not {value!r}")
        opts = cls(**options)  # type: ignore[arg-type]
        checks = [
            (opts.top_t >= 1, "top_t must be >= 1"),
            (opts.retry_top_t >= 0, "retry_top_t must be >= 0"),
            (opts.widen >= 1, "widen must be >= 1"),
            (opts.max_steps >= 0, "max_steps must be >= 0"),
            (opts.cophrase_steps >= 0, "cophrase_steps must be >= 0"),
            (math.isfinite(opts.lr) and opts.lr > 0, "lr must be a positive number"),
            (0 <= opts.beta1 < 1, "beta1 must be in [0, 1)"),
            (math.isfinite(opts.prompt_weight) and opts.prompt_weight > 0, "prompt_weight must be a positive number"),
            (0 < opts.min_prob <= 1, "min_prob must be in (0, 1]"),
            (math.isfinite(opts.kl_tol) and opts.kl_tol >= 0, "kl_tol must be >= 0"),
            (math.isfinite(opts.locality_weight) and opts.locality_weight >= 0, "locality_weight must be >= 0"),
            (math.isfinite(opts.guard_margin) and opts.guard_margin >= 0, "guard_margin must be >= 0"),
            (opts.guard_facts >= 0, "guard_facts must be >= 0"),
            (opts.guard_reads >= 0, "guard_reads must be >= 0"),
            (0 < opts.max_df <= 1, "max_df must be in (0, 1]"),
            (0 < opts.null_rtol < 1, "null_rtol must be in (0, 1)"),
            (opts.layers in ("last", "all"), "layers must be 'last' or 'all'"),
            (opts.idf_source in ("any", "answer"), "idf_source must be 'any' or 'answer'"),
            (opts.constraint in ("margin", "exact"), "constraint must be 'margin' or 'exact'"),
            (opts.conflict in ("joint", "avoid"), "conflict must be 'joint' or 'avoid'"),
        ]
        for good, message in checks:
            if not good:
                raise ValueError(message)
        return opts
