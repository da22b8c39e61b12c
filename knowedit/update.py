"""Update only the located value rows until the model gives the new target.

Every parameter stays frozen; the chosen rows are copied into a small tensor
that the memory layers read through a :class:`RowPatch`, so the optimiser
cannot touch anything else. A locality guard keeps the output distribution of
unrelated facts that read the same slots (KL to their pre-edit distribution).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from knowedit.data.records import Example
from knowedit.inference import encode_examples
from knowedit.memory import RowPatch
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec


@dataclass
class EditOptions:
    """How an edit is located and optimised (recorded with every edit)."""

    top_t: int = 64
    """Value rows to update."""
    widen: int = 1
    """Search ``widen x k`` slots per head when locating."""
    use_subject: bool = True
    """Also choose slots at the subject's last token."""
    idf_source: str = "any"
    """Background usage for ranking: documents reading a slot at ``any`` position
    (Lin et al. 2025) or only where they predict their ``answer``."""
    lr: float = 0.05
    """Adam step size for the rows."""
    max_steps: int = 60
    min_prob: float = 0.6
    """Stop once every target token is the argmax with at least this probability..."""
    kl_tol: float = 0.01
    """...and the guarded facts' mean KL to their pre-edit distribution is at most this."""
    locality_weight: float = 1.0
    """Weight of the KL guard on unrelated facts that read the chosen slots."""
    guard_facts: int = 32
    """At most this many background facts are guarded."""
    conflict: str = "avoid"
    """Slots of live edits: ``avoid`` (choose other slots) or ``joint`` (share them;
    the earlier edits are guarded so they keep working)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UpdateResult:
    rows: dict[str, torch.Tensor]
    """pool -> (t, d_v) new rows, aligned with the sorted slot ids."""
    prob_before: float
    prob_after: float
    steps: int
    success: bool
    guard_kl: float


def _target_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[bool, float, float]:
    """Edit row only: (all argmax, min prob, mean prob) over scored positions."""
    m = targets != -100
    probs = logits.float().softmax(-1)[m]  # (n, V)
    tgt = targets[m]
    p = probs.gather(1, tgt[:, None]).squeeze(1)
    return bool((probs.argmax(-1) == tgt).all()), float(p.min()), float(p[:-1].mean() if p.numel() > 1 else p.mean())


def optimise_rows(
    model: MemoryLM,
    codec: TextCodec,
    edit: Example,
    slots: dict[str, torch.Tensor],
    guards: Sequence[Example],
    opts: EditOptions,
) -> UpdateResult:
    """Optimise the rows ``slots`` so that ``edit.prompt`` is answered ``edit.answer``.

    Args:
        model: the live model (left untouched; results are returned, not written).
        codec: its tokenizer.
        edit: the prompt and its new answer.
        slots: pool -> sorted unique slot ids to optimise.
        guards: facts whose answer distribution must not move.
        opts: step budget, learning rate, stopping rule, guard weight.
    """
    device = next(model.parameters()).device
    pools = {p.name: p for p in model.pools.values()}
    rows = {
        name: pools[name].values.detach()[ids.to(device)].clone().float().requires_grad_(True)
        for name, ids in slots.items()
    }
    patches = {name: RowPatch(slots[name].to(device), rows[name]) for name in rows}
    batch = encode_examples(codec, [edit, *guards], model.cfg.max_seq_len).to(device)
    scored = batch.targets != -100
    g_mask = scored[1:]  # (G, T) answer positions of the guards
    with torch.no_grad():
        base_logits = model(batch.ids)
        base_logp = base_logits[1:].float().log_softmax(-1)[g_mask] if guards else None
    _, _, prob_before = _target_stats(base_logits[:1], batch.targets[:1])
    opt = torch.optim.Adam(list(rows.values()), lr=opts.lr)
    model.requires_grad_(False)
    steps, success, kl_val = 0, False, 0.0
    try:
        for steps in range(opts.max_steps + 1):
            logits = model(batch.ids, patches=patches)
            loss = F.cross_entropy(logits[0], batch.targets[0], ignore_index=-100)
            if guards:
                logp = logits[1:].float().log_softmax(-1)[g_mask]
                kl = F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")
                kl_val = kl.item()
                loss = loss + opts.locality_weight * kl
            ok, pmin, _ = _target_stats(logits[:1].detach(), batch.targets[:1])
            success = ok and pmin >= opts.min_prob
            if success and (kl_val <= opts.kl_tol or opts.locality_weight == 0):
                break
            if steps == opts.max_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.requires_grad_(True)
    with torch.no_grad():
        _, _, prob_after = _target_stats(logits[:1], batch.targets[:1])
    dtype = next(iter(pools.values())).values.dtype
    return UpdateResult(
        rows={k: v.detach().to(dtype) for k, v in rows.items()},
        prob_before=prob_before,
        prob_after=prob_after,
        steps=steps,
        success=success,
        guard_kl=kl_val,
    )


def now_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)
