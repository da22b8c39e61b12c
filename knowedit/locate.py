"""Locate the memory slots a fact reads: FAISS search over the product keys,
ranked against background usage (Lin et al. 2025).

The prompt + target is run with teacher forcing; the memory-layer queries at
the positions that predict the target tokens (and, optionally, at the
subject's last token, where ROME found facts are recalled) are searched in
per-head FAISS indexes over the two half-key tables and combined into the
exact product top-k. Candidates are ranked by access weight x IDF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from knowedit.inference import PromptError, encode_pair
from knowedit.memory import MemoryTrace, ProductKeyMemory
from knowedit.model import MemoryLM
from knowedit.stats import SlotStats
from knowedit.tokenizer import TextCodec


def _gpu_resources() -> object | None:
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
        return faiss.StandardGpuResources()
    return None


class KeySearch:
    """FAISS inner-product indexes over every memory layer's half-key tables.

    Keys are frozen while editing, so the indexes are built once per model.
    """

    def __init__(self, model: MemoryLM) -> None:
        self.layers: dict[int, ProductKeyMemory] = {m.layer: m for m in model.memory_layers()}
        self.indexes: dict[int, list[tuple[faiss.Index, faiss.Index]]] = {}
        gpu = _gpu_resources() if next(model.parameters()).is_cuda else None
        for layer, mem in self.layers.items():
            tables = mem.half_keys().detach().float().cpu().numpy()  # (H, 2, n, half)
            per_head = []
            for h in range(tables.shape[0]):
                pair = []
                for half in range(2):
                    idx = faiss.IndexFlatIP(tables.shape[-1])
                    idx.add(np.ascontiguousarray(tables[h, half]))
                    if gpu is not None:
                        idx = faiss.index_cpu_to_gpu(gpu, 0, idx)
                    pair.append(idx)
                per_head.append((pair[0], pair[1]))
            self.indexes[layer] = per_head

    def search(self, layer: int, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact product top-k for queries of one memory layer.

        Args:
            layer: transformer layer index of a memory layer.
            queries: (M, H, key_dim) normalised queries (as in the trace).
            k: slots per head (``k`` >= the layer's top-k widens the candidates).

        Returns:
            scores (M, H, k) and slot ids (M, H, k), best first.
        """
        mem = self.layers[layer]
        n, half = mem.n_keys, mem.cfg.key_dim // 2
        kk = min(k, n)
        q = queries.detach().float().cpu().numpy()
        out_s, out_i = [], []
        for h, (i1, i2) in enumerate(self.indexes[layer]):
            s1, j1 = i1.search(np.ascontiguousarray(q[:, h, :half]), kk)  # (M, kk)
            s2, j2 = i2.search(np.ascontiguousarray(q[:, h, half:]), kk)
            s1, j1, s2, j2 = (torch.from_numpy(a) for a in (s1, j1, s2, j2))
            cand = (s1[:, :, None] + s2[:, None, :]).flatten(1)  # (M, kk*kk)
            sc, flat = cand.topk(min(k, kk * kk), dim=1)
            ids = j1.gather(1, flat // kk) * n + j2.gather(1, flat % kk)
            out_s.append(sc)
            out_i.append(ids)
        return torch.stack(out_s, 1), torch.stack(out_i, 1)


@dataclass
class SlotScore:
    pool: str
    slot: int
    score: float
    weight: float
    idf: float


@dataclass
class Location:
    """The ranked candidate slots of one fact.

    Attributes:
        ranked: every candidate slot, best first.
        positions: token positions whose queries were searched.
        reads: pool -> (U,) every slot the searched positions read (for conflict checks).
    """

    ranked: list[SlotScore]
    positions: list[int]
    reads: dict[str, torch.Tensor] = field(default_factory=dict)

    def top(self, t: int, exclude: dict[str, set[int]] | None = None) -> list[SlotScore]:
        """The best ``t`` candidates, skipping ``exclude`` (pool -> slots)."""
        if not exclude:
            return self.ranked[:t]
        return [s for s in self.ranked if s.slot not in exclude.get(s.pool, ())][:t]


def slots_by_pool(slots: list[SlotScore]) -> dict[str, torch.Tensor]:
    """pool -> sorted unique int64 slot ids."""
    out: dict[str, list[int]] = {}
    for s in slots:
        out.setdefault(s.pool, []).append(s.slot)
    return {p: torch.tensor(sorted(set(v)), dtype=torch.long) for p, v in out.items()}


def subject_last_token(codec: TextCodec, prompt: str, subject: str | None) -> int | None:
    """Token index of the last token of the subject's last occurrence in the prompt."""
    text = prompt.strip()
    if not subject or subject not in text:
        return None
    end = text.rindex(subject) + len(subject)
    offsets = codec.tok.encode(text, add_special_tokens=False).offsets
    last = None
    for i, (a, _b) in enumerate(offsets):
        if a < end:
            last = i
    return last


def trace_fact(
    model: MemoryLM, codec: TextCodec, prompt: str, target: str, subject: str | None, use_subject: bool
) -> tuple[list[MemoryTrace], list[int]]:
    """Teacher-forced forward of prompt + target; returns traces and the query positions."""
    return trace_facts(model, codec, [(prompt, target, subject)], use_subject)[0]


def trace_facts(
    model: MemoryLM, codec: TextCodec, facts: Sequence[tuple[str, str, str | None]], use_subject: bool
) -> list[tuple[list[MemoryTrace], list[int]]]:
    """:func:`trace_fact` for many (prompt, target, subject) facts in one forward.

    The sequences are right-padded: the model is causal and its memory layers
    are position-wise, so a position's trace does not depend on what follows it.
    Each result's traces hold that fact's row alone (batch dimension 1).
    """
    encoded = [encode_pair(codec, p, t, model.cfg.max_seq_len) for p, t, _s in facts]
    if not encoded:
        return []
    seqs = [p + a[:-1] for p, a in encoded]
    width = max(len(x) for x in seqs)
    device = next(model.parameters()).device
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, device=device)
    trace: list[MemoryTrace] = []
    with torch.no_grad():
        model(ids, trace=trace)
    out = []
    for i, ((p, a), (prompt, _t, subject)) in enumerate(zip(encoded, facts)):
        positions = list(range(len(p) - 1, len(p) - 1 + len(a)))
        if use_subject:
            s = subject_last_token(codec, prompt, subject)
            if s is not None and s not in positions:
                positions.insert(0, s)
        own = [
            MemoryTrace(tr.layer, tr.pool, tr.query[i : i + 1], tr.slots[i : i + 1], tr.weights[i : i + 1])
            for tr in trace
        ]
        out.append((own, positions))
    return out


def locate(
    model: MemoryLM,
    codec: TextCodec,
    search: KeySearch,
    stats: SlotStats | None,
    prompt: str,
    target: str,
    subject: str | None = None,
    widen: int = 1,
    use_subject: bool = True,
    idf_source: str = "any",
    layers: Sequence[int] | None = None,
    traced: tuple[list[MemoryTrace], list[int]] | None = None,
) -> Location:
    """Rank the slots that ``prompt`` reads while predicting ``target``.

    Args:
        model, codec: the model and its tokenizer.
        search: FAISS key search for this model.
        stats: background usage; without it slots rank by access weight alone.
        prompt, target, subject: the fact.
        widen: search ``widen x k`` slots per head instead of the layer's ``k``.
        use_subject: also search the query at the subject's last token.
        idf_source: background usage counted at ``any`` position or at ``answer`` positions.
        layers: memory layers (transformer layer indices) to search; None: all.
        traced: this fact's :func:`trace_facts` result, if already computed.

    Raises:
        PromptError: for an empty, too long or untokenisable prompt/target.
    """
    if widen < 1:
        raise PromptError("widen must be >= 1")
    if traced is None:
        traced = trace_fact(model, codec, prompt, target, subject, use_subject)
    trace, positions = traced
    weight: dict[str, torch.Tensor] = {}
    reads: dict[str, torch.Tensor] = {}
    for tr in trace:
        if layers is not None and tr.layer not in layers:
            continue
        mem = search.layers[tr.layer]
        q = tr.query[0, positions]  # (P, H, Dk)
        scores, ids = search.search(tr.layer, q, widen * mem.cfg.topk)
        w = scores.softmax(-1)  # (P, H, k')
        n = mem.pool.n_slots
        acc = weight.setdefault(tr.pool, torch.zeros(n, dtype=torch.float64))
        acc.index_add_(0, ids.flatten(), w.flatten().double())
        r = tr.slots[0, positions].flatten().cpu()
        reads[tr.pool] = torch.unique(torch.cat([reads.get(tr.pool, r), r]))
    scored: list[SlotScore] = []
    total = sum(float(w.sum()) for w in weight.values())
    for pool, w in weight.items():
        cand = torch.nonzero(w > 0).flatten()
        tf = (w[cand] / total).float()
        idf = stats.idf(pool, idf_source)[cand] if stats is not None and pool in stats.df else torch.ones_like(tf)
        sc = tf * idf
        scored.extend(
            SlotScore(pool, int(c), float(s), float(t), float(i)) for c, s, t, i in zip(cand, sc, tf, idf)
        )
    scored.sort(key=lambda s: (-s.score, s.pool, s.slot))
    return Location(scored, positions, reads)
