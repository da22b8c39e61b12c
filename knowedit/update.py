"""Update only the located value rows until the model gives the new target.

Every parameter stays frozen; the chosen rows are copied into a small tensor
that the memory layers read through a :class:`RowPatch`, so the optimiser
cannot touch anything else. A locality guard keeps the output distribution of
unrelated facts that read the same slots (KL to their pre-edit distribution).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from knowedit.data.records import Example
from knowedit.edit_options import EditOptions
from knowedit.inference import encode_examples
from knowedit.memory import ProductKeyMemory, RowPatch, lookup
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec


@dataclass
class UpdateResult:
    rows: dict[str, torch.Tensor]
    """pool -> (t, d_v) new rows, aligned with the sorted slot ids."""
    prob_before: float
    prob_after: float
    steps: int
    success: bool
    guard_kl: float
    free_dims: int = -1
    """Final-layer editing: dimensions of the search space (-1: not used)."""
    edits_passed: int = 1
    guard_flips: int = 0
    """Guarded positions whose greedy token changed (final-layer editing)."""
    scale: float = 1.0
    """Share of the optimised change kept (below 1 when guards forced a backtrack)."""
    passed: list[bool] | None = None
    """Final-layer editing: whether each of the edits (requested, then co-phrasings) passes."""


def margins(logits: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """(R,) logit of ``tok`` minus the best other logit, per row of (R, V) ``logits``."""
    own = logits.gather(1, tok[:, None]).squeeze(1)
    top = logits.topk(min(2, logits.shape[1]), dim=1)  # no (R, V) copy with ``tok`` masked out
    if top.values.shape[1] < 2:
        return own - float("-inf")
    other = torch.where(top.indices[:, 0] == tok, top.values[:, 1], top.values[:, 0])
    return own - other


HEAD_CHUNK = 1024
"""Rows whose whole-vocabulary logits are computed at a time (bounds the (rows, V) buffer:
32 MiB at CounterFact's 8,192 tokens)."""


def head_chunks(model: MemoryLM, hid: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """The head's whole-vocabulary logits (fp32) at final hidden states ``hid`` (R, C),
    ``HEAD_CHUNK`` rows at a time: (rows, their logits)."""
    for s in range(0, hid.shape[0], HEAD_CHUNK):
        rows = slice(s, s + HEAD_CHUNK)
        yield rows, model.head(hid[rows]).float()


def _target_stats(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[bool, float, float]:
    """Over the edit's scored positions (n, V) / (n,): (all argmax, min prob, mean answer prob)."""
    probs = logits.detach().float().softmax(-1)
    p = probs.gather(1, tgt[:, None]).squeeze(1)
    answer = p[:-1] if p.numel() > 1 else p  # the last target is the eos
    return bool((probs.argmax(-1) == tgt).all()), float(p.min()), float(answer.mean())


def uses_final_pool_only(model: MemoryLM, pools: set[str]) -> bool:
    """True when every pool in ``pools`` is read by the last block's memory layer alone."""
    final = model.final_memory()
    if final is None or pools != {final.pool.name}:
        return False
    return sum(m.pool is final.pool for m in model.memory_layers()) == 1


def optimise_rows(
    model: MemoryLM,
    codec: TextCodec,
    edit: Example,
    slots: dict[str, torch.Tensor],
    guards: Sequence[Example],
    opts: EditOptions,
) -> UpdateResult:
    """Optimise the rows ``slots`` so that ``edit.prompt`` is answered ``edit.answer``.

    When the rows belong to a pool that only the last block's memory layer
    reads, everything before that layer is frozen and position-wise, so the
    prefix runs once and each step recomputes only the memory read and the
    head at the scored positions; otherwise each step is a full forward.

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
    scored = batch.targets != -100  # (B, T)
    owner = torch.nonzero(scored)[:, 0]  # (M,) which example each scored position belongs to
    tgt = batch.targets[scored]  # (M,)
    is_edit = owner == 0
    if uses_final_pool_only(model, set(slots)):
        with torch.no_grad():
            x_mid = model.residual_before_final_ffn(batch.ids)[scored]  # (M, C)

        def run(p: dict[str, RowPatch] | None) -> torch.Tensor:
            return model.logits_from_final_ffn(x_mid, p)  # (M, V)
    else:

        def run(p: dict[str, RowPatch] | None) -> torch.Tensor:
            return model(batch.ids, patches=p)[scored]  # (M, V)

    with torch.no_grad():
        base = run(None)
        base_logp = base[~is_edit].float().log_softmax(-1)
    _, _, prob_before = _target_stats(base[is_edit], tgt[is_edit])
    opt = torch.optim.Adam(list(rows.values()), lr=opts.lr, betas=(opts.beta1, 0.999))
    model.requires_grad_(False)
    steps, success, kl_val = 0, False, 0.0
    try:
        for steps in range(opts.max_steps + 1):
            logits = run(patches)
            loss = F.cross_entropy(logits[is_edit], tgt[is_edit])
            if guards:
                logp = logits[~is_edit].float().log_softmax(-1)
                kl = F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")
                kl_val = kl.item()
                loss = loss + opts.locality_weight * kl
            ok, pmin, prob_after = _target_stats(logits[is_edit], tgt[is_edit])
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
    dtype = next(iter(pools.values())).values.dtype
    return UpdateResult(
        rows={k: v.detach().to(dtype) for k, v in rows.items()},
        prob_before=prob_before,
        prob_after=prob_after,
        steps=steps,
        success=success,
        guard_kl=kl_val,
    )


def null_space(constraints: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (t, t - rank) of ``{d : constraints @ d = 0}`` for a (G, t) matrix."""
    t = constraints.shape[1]
    if constraints.shape[0] == 0:
        return torch.eye(t, dtype=torch.float64)
    _, sv, vh = torch.linalg.svd(constraints.double(), full_matrices=True)
    rank = int((sv > sv[0] * rtol).sum()) if sv.numel() and sv[0] > 0 else 0
    return vh[rank:].T.contiguous()


Selection = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""The last memory layer's choice at some positions: slot ids (R, H*k), their
weights (R, H*k) and the value gate (R, d_v), or None for an ungated layer."""


@torch.no_grad()
def final_selection(model: MemoryLM, x_mid: torch.Tensor, chunk: int = 8192) -> Selection:
    """What the last block's memory layer reads at positions whose residual stream
    before it is ``x_mid`` (R, C) (:meth:`MemoryLM.final_select`), ``chunk`` rows at
    a time (the product-key search's scratch grows with the rows). Fixed while
    only that layer's values change."""
    parts = [model.final_select(x_mid[s : s + chunk]) for s in range(0, max(1, x_mid.shape[0]), chunk)]
    if len(parts) == 1:
        return parts[0]
    ids, w, gate = zip(*parts)
    return torch.cat(ids), torch.cat(w), None if gate[0] is None else torch.cat(gate)


class _FinalLayer:
    """The last block's memory read + head at fixed positions, as a function of the
    change ``D`` (t, d_v) to the rows of ``slots``.

    Selections, the unedited read and the gate are computed once; a row's read
    then changes by ``sum_i wt[r, i] * D[pos[r, i]]``: each row keeps only its reads
    of the edited slots (``pos``, their index among ``slots``; padding points at an
    extra zero row), so a step costs what the rows read of them, not ``rows x t``
    (a batch edit's ``t`` runs into thousands).
    """

    def __init__(self, model: MemoryLM, x_mid: torch.Tensor, slots: torch.Tensor, selection: Selection | None = None) -> None:
        mem = model.blocks[-1].ffn
        assert isinstance(mem, ProductKeyMemory)
        self.model, self.mem, self.x = model, mem, x_mid
        with torch.no_grad():
            ids, w, gate = selection if selection is not None else final_selection(model, x_mid)
            self.gate = gate
            self.resid = model.final_residual(x_mid)  # what the rows do not change: computed once
            self.read = lookup(mem.pool.values, ids, w.to(mem.pool.values.dtype), mem.cfg.backend).float()
            t = slots.numel()
            pos = torch.searchsorted(slots, ids).clamp_(max=max(t - 1, 0))
            hit = slots[pos] == ids if t else torch.zeros_like(ids, dtype=torch.bool)
            order = torch.argsort((~hit).to(torch.uint8), dim=1, stable=True)  # hits first
            width = max(1, int(hit.sum(1).max())) if hit.numel() else 1
            hit = hit.gather(1, order)[:, :width]
            self.pos = torch.where(hit, pos.gather(1, order)[:, :width], t)  # (R, width)
            self.wt = torch.where(hit, w.gather(1, order)[:, :width].float(), 0.0)  # (R, width)
            self.t = t

    def take(self, rows: torch.Tensor) -> _FinalLayer:
        """The same layer at rows ``rows`` only (nothing recomputed)."""
        out = _FinalLayer.__new__(_FinalLayer)
        out.model, out.mem, out.t = self.model, self.mem, self.t
        out.x, out.resid, out.read = self.x[rows], self.resid[rows], self.read[rows]
        out.gate = None if self.gate is None else self.gate[rows]
        out.pos, out.wt = self.pos[rows], self.wt[rows]
        return out

    def change(self, delta: torch.Tensor, sel: torch.Tensor | slice) -> torch.Tensor:
        """(R', d_v) change of the read at rows ``sel`` for a row change ``delta`` (t, d_v)."""
        ext = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])  # row t: the padding
        return F.embedding_bag(self.pos[sel], ext, per_sample_weights=self.wt[sel], mode="sum")

    def hidden(self, delta: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Final normed hidden states (R', C) at ``rows`` (an index tensor or a slice;
        default all) for a row change ``delta`` (t, d_v)."""
        sel = slice(None) if rows is None else rows
        read = self.read[sel] + self.change(delta, sel)
        return self.model.final_readout(self.x[sel], read, None if self.gate is None else self.gate[sel], self.resid[sel])

    def __call__(self, delta: torch.Tensor, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Logits (R', V) at ``rows`` (default all) for a row change ``delta`` (t, d_v)."""
        return self.model.head(self.hidden(delta, rows)).float()


MARGIN_ROWS = 8192
"""Guards whose margins are scored at a time when every guard is checked."""
GATHER_ROWS = 2048
"""Rows per chunk of :func:`candidate_logits` (its gathered head rows stay in cache)."""


def candidate_logits(hid: torch.Tensor, head_w: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(R, c) logits of tokens ``tokens`` (R, c) at hidden states ``hid`` (R, C).

    The (R, c, C) head rows are gathered a chunk of rows at a time: memory stays
    bounded whatever R is, and on one CPU thread this measured faster than
    multiplying by a gather of every row kept from one call to the next.
    """
    out = hid.new_empty(tokens.shape)
    for s in range(0, hid.shape[0], GATHER_ROWS):
        e = min(s + GATHER_ROWS, hid.shape[0])
        out[s:e] = torch.einsum("rd,rcd->rc", hid[s:e], F.embedding(tokens[s:e], head_w))
    return out


class _GuardCheck:
    """Margins of the guarded positions (rows ``offset..`` of a :class:`_FinalLayer`).

    Each guard is scored on a few candidate tokens (its top ones before the
    edit and the edit's targets); rivals found later by a full-vocabulary check
    are kept as (guard, token) pairs. Each guard has an *anchor*, a final hidden
    state at which every token outside its candidates was at or below ``floor``
    (first: its state before the edit and its ``n_top``-th logit); such a token
    has moved since by at most ``w_max * |hidden - anchor|``. A full check scores
    the whole vocabulary only at guards whose own logit is not above that bound,
    and there it also moves their anchor to the present state, with the best
    token outside the candidates as one more rival and the next one's logit as
    the floor: the next full check, after a few more steps, then finds few
    guards at risk instead of the same ones again.
    """

    @torch.no_grad()
    def __init__(self, run: _FinalLayer, offset: int, targets: torch.Tensor) -> None:
        self.run, self.offset = run, offset
        self.head_w = head_w = run.model.head.weight.detach()
        zero = torch.zeros(run.t, run.read.shape[1], device=run.read.device)
        self.hid0 = run.hidden(zero, slice(offset, None))  # (G, C) before the edit
        self.G = self.hid0.shape[0]
        n_top = min(8, head_w.shape[0])
        # The whole vocabulary's logits a chunk of guards at a time: only their top ones are kept.
        tops = []
        for _rows, logits in head_chunks(run.model, self.hid0):
            tops.append(logits.topk(max(2, n_top), dim=-1))
            del logits  # before the next chunk is computed
        top_v = torch.cat([t.values for t in tops]) if tops else self.hid0.new_zeros(0, max(2, n_top))
        top_i = torch.cat([t.indices for t in tops]) if tops else torch.zeros(0, max(2, n_top), dtype=torch.long, device=self.hid0.device)
        self.tok = top_i[:, 0]  # (G,) greedy tokens before the edit
        self.m0 = top_v[:, 0] - top_v[:, 1]  # full-vocabulary margins before the edit
        self.floor = top_v[:, -1]  # no token outside the candidates was above this...
        self.anchor = self.hid0  # ...at these hidden states
        cand = top_i[:, 1:n_top]  # (G, c) each guard's own rivals
        # Column 0 is the guard's own token: own and rival logits come from one
        # product, so a tie reads as a zero margin, never as a flip. Their head
        # rows are gathered a chunk at a time when scored, never kept per guard.
        self.scored = torch.cat([self.tok[:, None], cand], dim=1)  # (G, 1 + c)
        self.ignore = torch.zeros(cand.shape, device=cand.device).masked_fill_(cand == self.tok[:, None], float("-inf"))
        # The edits' targets are every guard's rivals: one (U, C) table scored by a
        # product, not copied per guard (a batch edit has hundreds of targets).
        tgt_tok = targets.unique()
        self.w_tgt = head_w[tgt_tok]  # (U, C)
        self.tgt_ignore = torch.zeros(self.G, tgt_tok.numel(), device=cand.device).masked_fill_(
            tgt_tok[None, :] == self.tok[:, None], float("-inf")
        )
        self.ex_row = torch.zeros(0, dtype=torch.long, device=cand.device)
        self.ex_tok = torch.zeros(0, dtype=torch.long, device=cand.device)
        self.w_max = float(head_w.norm(dim=1).max())

    def take(self, rows: torch.Tensor) -> _GuardCheck:
        """The check of guards ``rows`` alone, gathered once: margins on a fixed
        subset (the optimiser's active guards) then cost what that subset does."""
        out = _GuardCheck.__new__(_GuardCheck)
        out.run, out.offset, out.G = self.run.take(self.offset + rows), 0, rows.numel()
        out.head_w, out.w_max, out.w_tgt = self.head_w, self.w_max, self.w_tgt
        for name in ("hid0", "tok", "m0", "floor", "anchor", "scored", "ignore", "tgt_ignore"):
            setattr(out, name, getattr(self, name)[rows])
        where = torch.full((self.G,), -1, dtype=torch.long, device=rows.device)
        where[rows] = torch.arange(rows.numel(), device=rows.device)
        pos = where[self.ex_row]
        keep = pos >= 0
        out.ex_row, out.ex_tok = pos[keep], self.ex_tok[keep]
        return out

    def add_rivals(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Score guards ``rows`` on one more rival token each from now on."""
        self.ex_row = torch.cat([self.ex_row, rows])
        self.ex_tok = torch.cat([self.ex_tok, tokens])

    def margins(self, delta: torch.Tensor, rows: torch.Tensor | None = None, full: bool = False) -> torch.Tensor:
        """Margins at guards ``rows`` (default all) on their candidates; with
        ``full``, exact in sign for every guard (exact in value where it flipped).

        Without gradients, all guards are scored ``MARGIN_ROWS`` at a time, so the
        check's temporaries stay bounded however many guards an edit has."""
        if rows is not None:
            return self.take(rows).margins(delta, full=full)
        if torch.is_grad_enabled() or self.G <= MARGIN_ROWS:
            return self._margins(delta, 0, self.G, full)
        return torch.cat([self._margins(delta, s, min(s + MARGIN_ROWS, self.G), full) for s in range(0, self.G, MARGIN_ROWS)])

    def _margins(self, delta: torch.Tensor, lo: int, hi: int, full: bool) -> torch.Tensor:
        """:meth:`margins` of guards ``lo..hi``."""
        part = slice(lo, hi)
        hid = self.run.hidden(delta, slice(self.offset + lo, self.offset + hi))
        lg = candidate_logits(hid, self.head_w, self.scored[part])
        own = lg[:, 0]
        rival = (lg[:, 1:] + self.ignore[part]).amax(1)
        if self.w_tgt.shape[0]:
            rival = torch.maximum(rival, (hid @ self.w_tgt.T + self.tgt_ignore[part]).amax(1))
        if self.ex_row.numel():
            mine = (self.ex_row >= lo) & (self.ex_row < hi)
            if bool(mine.any()):
                r = self.ex_row[mine] - lo
                val = (hid[r] * self.head_w[self.ex_tok[mine]]).sum(-1)
                rival = rival.scatter_reduce(0, r, val, "amax", include_self=True)
        m = own - rival
        if full:
            outside = self.floor[part] + self.w_max * (hid - self.anchor[part]).norm(dim=1)
            risky = torch.nonzero(~(own - outside > 0)).flatten()  # NaN counts as risky
            if risky.numel():
                m = m.clone()
                m[risky] = self._full_margins(hid, risky, lo)
        return m

    def _full_margins(self, hid: torch.Tensor, risky: torch.Tensor, lo: int = 0) -> torch.Tensor:
        """Whole-vocabulary margins of guards ``lo + risky`` at hidden states ``hid``
        (rows of guards ``lo..``); each of them is re-anchored there (see the class)."""
        out, new_rival = [], []
        for rows, logits in head_chunks(self.run.model, hid[risky]):
            g = lo + risky[rows]
            out.append(margins(logits, self.tok[g]))
            scored = self.scored[g]
            n_out = logits.shape[1] - scored.shape[1]  # tokens outside the candidates
            if n_out <= 0:
                self.floor[g] = float("-inf")
                del logits
                continue
            best = logits.scatter_(1, scored, float("-inf")).topk(min(2, n_out), dim=1)  # in place: no second buffer
            new_rival.append((g, best.indices[:, 0]))
            # every token outside the candidates and the new rival is at or below this
            self.floor[g] = best.values[:, 1] if n_out >= 2 else float("-inf")
            del logits, best  # before the next chunk is computed
        if self.anchor is self.hid0:  # the pre-edit states stay as they are
            self.anchor = self.anchor.clone()
        self.anchor[lo + risky] = hid[risky]
        for g, tok in new_rival:
            self.add_rivals(g, tok)
        return torch.cat(out)


@torch.no_grad()
def guard_flips(
    model: MemoryLM, codec: TextCodec, edits: Sequence[Example], slots: torch.Tensor, guards: Guards, delta: torch.Tensor
) -> torch.Tensor:
    """(G,) bool: the ``guards`` whose greedy token a change ``delta`` (t, d_v) of the
    rows ``slots`` would flip, exact on the whole vocabulary (the edits' targets
    are scored as rivals first)."""
    device = next(model.parameters()).device
    batch = encode_examples(codec, list(edits), model.cfg.max_seq_len)
    tgt = batch.targets[batch.targets != -100].to(device)
    run = _FinalLayer(model, guards.x_mid.to(device), slots.to(device), guards.selection)
    check = _GuardCheck(run, 0, tgt)
    return ~(check.margins(delta.to(device), full=True) >= 0)


@dataclass
class Guards:
    """Positions whose greedy token an edit must keep, in the last memory layer.

    Attributes:
        x_mid: (G, C) residual stream after the last block's attention at each position.
        weights: (G, t) their read weights on the slots being edited (for ``exact``).
    """

    x_mid: torch.Tensor
    weights: torch.Tensor
    selection: Selection | None = None
    """What the last memory layer reads at each guard (:func:`final_selection`), if known."""

    def __len__(self) -> int:
        return self.x_mid.shape[0]

    def take(self, rows: torch.Tensor) -> Guards:
        """The guards at ``rows`` (an index or a bool mask)."""
        sel = None if self.selection is None else tuple(None if t is None else t[rows] for t in self.selection)
        return Guards(self.x_mid[rows], self.weights[rows], sel)  # type: ignore[arg-type]

    def __add__(self, other: Guards) -> Guards:
        sel = None
        if self.selection is not None and other.selection is not None:
            sel = tuple(None if a is None else torch.cat([a, b]) for a, b in zip(self.selection, other.selection))
        return Guards(torch.cat([self.x_mid, other.x_mid]), torch.cat([self.weights, other.weights]), sel)  # type: ignore[arg-type]


def final_layer_rows(
    model: MemoryLM,
    codec: TextCodec,
    edits: Sequence[Example],
    slots: torch.Tensor,
    guards: Guards,
    opts: EditOptions,
    n_primary: int = 1,
    init: torch.Tensor | None = None,
) -> UpdateResult:
    """Edit the last block's memory rows ``slots``, keeping every guarded position.

    Only the last memory layer's values change, so everything upstream is
    frozen and position-wise: the prefix runs once and each step recomputes
    only the memory read and the head at the edit's positions and at the
    guards (every background position that reads the slots, and every live
    edit's). With ``constraint="margin"`` a hinge keeps each guard's current
    greedy token ahead by ``guard_margin`` (or its present margin, if less);
    with ``constraint="exact"`` the update is searched in the null space of the
    guards' read weights, so their memory reads do not change at all (the
    memory-layer analogue of AlphaEdit's null-space projection; less room).

    Args:
        model: the live model (left untouched).
        codec: its tokenizer.
        edits: prompts with their new answers: the first ``n_primary`` are the
            requested edits (all must pass), the rest their co-phrasings.
        slots: (t,) sorted slot ids of the final memory layer's pool.
        guards: positions to keep.
        opts: step budget, learning rate, stopping rule, constraint mode.
        n_primary: requested edits at the head of ``edits`` (a batch edit has several).
        init: (t, d_v) change of the rows to start from (default none): an edit
            optimised again with more guards starts where it ended.

    Returns:
        The rows; ``success`` when every requested edit passes, ``prob_before``
        and ``prob_after`` the mean answer probability over the requested edits.
    """
    final = model.final_memory()
    if final is None:
        raise ValueError("final-layer editing needs a memory layer in the last block")
    device = next(model.parameters()).device
    values = final.pool.values.detach()
    slots = slots.to(device)
    base_rows = values[slots].float()
    if opts.constraint == "exact":
        basis = null_space(guards.weights, opts.null_rtol).to(device=device, dtype=torch.float32)  # (t, f)
    else:
        basis = torch.eye(slots.numel(), device=device)
    z0 = torch.zeros(basis.shape[1], values.shape[1], device=device)
    if init is not None:
        z0 = basis.T @ init.to(device=device, dtype=torch.float32)  # the basis is orthonormal
    z = z0.requires_grad_(True)
    batch = encode_examples(codec, list(edits), model.cfg.max_seq_len).to(device)
    scored = batch.targets != -100
    owner = torch.nonzero(scored)[:, 0]
    tgt = batch.targets[scored]
    with torch.no_grad():
        x_edit = model.residual_before_final_ffn(batch.ids)[scored]  # (M, C)
    x = torch.cat([x_edit, guards.x_mid.to(device)])  # (M + G, C)
    M, G = x_edit.shape[0], guards.x_mid.shape[0]
    selection = None
    if guards.selection is not None:
        own = final_selection(model, x_edit)
        selection = tuple(
            None if a is None else torch.cat([a, b.to(device)]) for a, b in zip(own, guards.selection)
        )
    run = _FinalLayer(model, x, slots, selection)  # type: ignore[arg-type]

    def passed(logits: torch.Tensor) -> torch.Tensor:
        """(n_edits,) whether each edit's every target is the argmax with p >= min_prob."""
        probs = logits.detach().softmax(-1)
        p = probs.gather(1, tgt[:, None]).squeeze(1)
        ok = (probs.argmax(-1) == tgt) & (p >= opts.min_prob)
        return torch.zeros(len(edits), dtype=torch.long, device=device).index_add_(0, owner, (~ok).long()) == 0

    zero = torch.zeros(slots.numel(), values.shape[1], device=device)
    edit_rows = slice(0, M)
    with torch.no_grad():
        base_logits = run(zero, edit_rows)
        check = _GuardCheck(run, M, tgt)
    g_keep = check.m0.clamp(max=opts.guard_margin)  # (G,) margin each guard must keep

    def prob(logits: torch.Tensor) -> float:
        """Mean answer probability of the requested edits (each its own mean)."""
        return sum(_target_stats(logits[owner == i], tgt[owner == i])[2] for i in range(n_primary)) / n_primary

    prob_before = prob(base_logits)
    # The requested prompts' answer tokens count ``prompt_weight`` times a co-phrasing's:
    # co-phrasings are many and pass first, and an unweighted mean then barely pushes the prompt.
    weight = torch.where(owner < n_primary, opts.prompt_weight, 1.0).to(torch.float32)

    # Active set: only guards that lost margin enter the loss; all of them are
    # re-checked (forward only) every few steps and whenever the edit looks done;
    # the check when done scores the whole vocabulary where a guard could flip.
    active = torch.zeros(G, dtype=torch.bool, device=device)
    a_check: _GuardCheck | None = None  # the active guards' own check (gathered when the set changes)
    a_keep = g_keep[:0]
    n_rivals = 0
    steps, flips, done = 0, 0, False
    logits = base_logits
    if basis.shape[1] > 0:
        opt = torch.optim.Adam([z], lr=opts.lr, betas=(opts.beta1, 0.999))
        model.requires_grad_(False)
        try:
            for steps in range(opts.max_steps + 1):
                delta = basis @ z
                logits = run(delta, edit_rows)
                ok_now = passed(logits)
                # Co-phrasings get up to ``cophrase_steps``; the prompt itself the whole budget.
                done = bool(ok_now.all()) or (bool(ok_now[:n_primary].all()) and steps >= opts.cophrase_steps)
                last = steps == opts.max_steps
                # (At step 0 nothing has moved: every guard keeps its own margin.)
                if G and (done or (steps % 8 == 0 and steps > 0) or last):
                    with torch.no_grad():
                        g_m = check.margins(delta)
                        lost = torch.nonzero(~(g_m >= 0)).flatten()  # NaN counts as flipped
                        if done and not lost.numel():  # confirm on the whole vocabulary
                            g_m = check.margins(delta, full=True)
                            lost = torch.nonzero(~(g_m >= 0)).flatten()
                            # (a token outside the candidates that took over is now a rival: the full check adds it)
                    flips = int(lost.numel())
                    if (done and flips == 0) or last:
                        break
                    grown = active | ~(g_m >= g_keep)  # guards that lost margin join the loss
                    if not torch.equal(grown, active) or check.ex_row.numel() != n_rivals:
                        active, n_rivals = grown, check.ex_row.numel()
                        a_idx = torch.nonzero(active).flatten()
                        a_check, a_keep = check.take(a_idx), g_keep[a_idx]
                elif (done and not G) or last:
                    break
                loss = (F.cross_entropy(logits, tgt, reduction="none") * weight).sum() / weight.sum()
                if opts.locality_weight > 0 and a_check is not None and a_check.G:
                    g_now = a_check.margins(delta)
                    loss = loss + opts.locality_weight * F.relu(a_keep - g_now).sum() / M
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            model.requires_grad_(True)
    delta = (basis @ z).detach()
    scale = 1.0
    if G and not (done and flips == 0):  # the loop's last check was not a full one
        with torch.no_grad():
            flips = int((~(check.margins(delta, full=True) >= 0)).sum())
    if G and flips:
        # Out of budget with guards still flipped: shrink the change until no
        # guard flips (scale 0 is the unedited rows). Locality is never traded.
        with torch.no_grad():
            for scale in (0.5, 0.25, 0.125, 0.0625, 0.0):
                if bool((check.margins(scale * delta, full=True) >= 0).all()):
                    break
        delta = scale * delta
        with torch.no_grad():
            logits = run(delta, edit_rows)
        flips = 0
    ok = passed(logits)
    prob_after = prob(logits)
    rows = (base_rows + delta).to(values.dtype)
    return UpdateResult(
        rows={final.pool.name: rows},
        prob_before=prob_before,
        prob_after=prob_after,
        steps=steps,
        success=bool(ok[:n_primary].all()),
        guard_kl=0.0,
        free_dims=basis.shape[1],
        edits_passed=int(ok.sum()),
        passed=ok.tolist(),
        guard_flips=flips,
        scale=scale,
    )
