"""Background slot statistics: which memory slots the training corpus reads.

Sparse memory finetuning (Lin et al. 2025) ranks a new fact's slots by
``tf(i) * log((|B| + 1) / (df(i) + 1))``: ``df`` counts the background
documents (here: corpus facts) that read slot ``i``. The same pass records,
per slot, which corpus facts read it where they predict their answer, at
which position and with what weight: the editor keeps those reads' outputs
fixed while it edits (the locality constraint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from knowedit.data.records import Example
from knowedit.inference import encode_examples
from knowedit.memory import MemoryTrace, usage_metrics
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec


@dataclass
class SlotStats:
    """Per pool: document frequency, access mass and a slot -> docs inverted index.

    Attributes:
        n_docs: background documents scanned (|B|).
        df: pool -> (N,) int32 documents that read each slot anywhere.
        mass: pool -> (N,) float32 summed access weight.
        inv_ptr: pool -> (N + 1,) int64 CSR offsets into the ``inv_*`` arrays.
        inv_doc: pool -> (nnz,) int32 documents that read the slot at an
            answer-predicting position...
        inv_pos: pool -> (nnz,) int32 ...at this token position...
        inv_w: pool -> (nnz,) float32 ...with this weight (summed over heads).
    """

    n_docs: int
    df: dict[str, torch.Tensor]
    mass: dict[str, torch.Tensor]
    inv_ptr: dict[str, torch.Tensor]
    inv_doc: dict[str, torch.Tensor]
    inv_pos: dict[str, torch.Tensor]
    inv_w: dict[str, torch.Tensor]

    def idf(self, pool: str, source: str = "any") -> torch.Tensor:
        """(N,) ``log((|B| + 1) / (df + 1))``: rarely used slots score high.

        Args:
            pool: value pool name.
            source: ``any`` counts documents reading the slot at any position
                (Lin et al. 2025); ``answer`` counts only those reading it where
                they predict their answer, the reads an edit could break.
        """
        if source == "any":
            df = self.df[pool].double()
        elif source == "answer":
            df = (self.inv_ptr[pool][1:] - self.inv_ptr[pool][:-1]).double()
        else:
            raise ValueError(f"idf source must be 'any' or 'answer', not {source!r}")
        return torch.log((self.n_docs + 1) / (df + 1)).float()

    def readers(self, pool: str, slots: torch.Tensor) -> torch.Tensor:
        """Documents that read any of ``slots`` (int64 1-D) at answer positions, with repeats."""
        return self.reads(pool, slots)[1]

    def reads(self, pool: str, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every answer-position read of ``slots``.

        Returns:
            column (index into ``slots``), doc, position and weight, each (R,).
        """
        ptr = self.inv_ptr[pool]
        starts, ends = ptr[slots], ptr[slots + 1]
        counts = ends - starts
        if int(counts.sum()) == 0:
            e = torch.empty(0, dtype=torch.long)
            return e, e, e, torch.empty(0)
        col = torch.repeat_interleave(torch.arange(slots.numel()), counts)
        # index of each read: start of its slot's run + offset within the run
        offs = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        idx = torch.repeat_interleave(starts, counts) + offs
        return col, self.inv_doc[pool][idx].long(), self.inv_pos[pool][idx].long(), self.inv_w[pool][idx]

    def usage(self, pool: str) -> dict[str, float]:
        return usage_metrics(self.mass[pool])

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write the statistics as safetensors (with string ``metadata`` in its header)."""
        tensors = {"n_docs": torch.tensor([self.n_docs], dtype=torch.int64)}
        for pool in self.df:
            tensors[f"{pool}.df"] = self.df[pool]
            tensors[f"{pool}.mass"] = self.mass[pool]
            tensors[f"{pool}.inv_ptr"] = self.inv_ptr[pool]
            tensors[f"{pool}.inv_doc"] = self.inv_doc[pool]
            tensors[f"{pool}.inv_pos"] = self.inv_pos[pool]
            tensors[f"{pool}.inv_w"] = self.inv_w[pool]
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load_with_metadata(cls, path: str | Path) -> tuple[SlotStats, dict[str, str]]:
        """The statistics and the header metadata they were saved with."""
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return cls.load(path), meta

    @classmethod
    def load(cls, path: str | Path) -> SlotStats:
        t = load_file(str(path))
        pools = sorted({k.rsplit(".", 1)[0] for k in t if k != "n_docs"})
        return cls(
            n_docs=int(t["n_docs"][0]),
            df={p: t[f"{p}.df"] for p in pools},
            mass={p: t[f"{p}.mass"] for p in pools},
            inv_ptr={p: t[f"{p}.inv_ptr"] for p in pools},
            inv_doc={p: t[f"{p}.inv_doc"] for p in pools},
            inv_pos={p: t[f"{p}.inv_pos"] for p in pools},
            inv_w={p: t[f"{p}.inv_w"] for p in pools},
        )


def answer_position_mask(ids: torch.Tensor, answer_start: torch.Tensor, answer_len: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose next token is an answer token (or the eos)."""
    t = torch.arange(ids.shape[1])[None]
    return (t >= answer_start[:, None]) & (t < (answer_start + answer_len)[:, None])


@torch.no_grad()
def compute_slot_stats(
    model: MemoryLM,
    codec: TextCodec,
    docs: Sequence[Example],
    batch_size: int = 128,
    on_batch: Callable[[int], None] | None = None,
) -> SlotStats:
    """Scan ``docs`` once and collect :class:`SlotStats` for every value pool.

    Args:
        model: the model (any device).
        codec: its tokenizer.
        docs: background facts (usually the training corpus).
        batch_size: documents per forward pass.
        on_batch: called with the number of documents done after each batch.
    """
    device = next(model.parameters()).device
    pools = {p.name: p.n_slots for p in model.pools.values()}
    df = {p: torch.zeros(n, dtype=torch.int32) for p, n in pools.items()}
    mass = {p: torch.zeros(n, dtype=torch.float32) for p, n in pools.items()}
    reads: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    model.eval()
    for s in range(0, len(docs), batch_size):
        b = encode_examples(codec, docs[s : s + batch_size], model.cfg.max_seq_len)
        trace: list[MemoryTrace] = []
        model(b.ids.to(device), trace=trace)
        T = b.ids.shape[1]
        valid = torch.arange(T)[None] < (b.answer_start + b.answer_len)[:, None]  # (B, T) non-padding
        ans = answer_position_mask(b.ids, b.answer_start, b.answer_len)
        B = b.ids.shape[0]
        for tr in trace:
            slots, w = tr.slots.cpu(), tr.weights.cpu().float()  # (B, T, H, k)
            m = valid[:, :, None, None].expand_as(slots)
            mass[tr.pool].index_add_(0, slots[m], w[m])
            read = torch.zeros(B, pools[tr.pool], dtype=torch.bool)
            read[torch.arange(B)[:, None, None, None].expand_as(slots)[m], slots[m]] = True
            df[tr.pool] += read.sum(0, dtype=torch.int32)
            a = ans[:, :, None, None].expand_as(slots)
            doc = (torch.arange(s, s + B)[:, None, None, None].expand_as(slots))[a]
            pos = (torch.arange(T)[None, :, None, None].expand_as(slots))[a]
            reads[tr.pool].append(torch.stack([slots[a], doc, pos]).T)  # (R, 3)
            reads[tr.pool].append(w[a])  # kept alongside: (R,)
        if on_batch:
            on_batch(min(len(docs), s + batch_size))
    inv_ptr, inv_doc, inv_pos, inv_w = {}, {}, {}, {}
    for p, n in pools.items():
        keys = torch.cat(reads[p][0::2]) if reads[p] else torch.empty(0, 3, dtype=torch.long)
        ws = torch.cat(reads[p][1::2]) if reads[p] else torch.empty(0)
        # One entry per (slot, doc, position): sum the weights of the heads that read it.
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)  # sorted by slot, doc, pos
        wsum = torch.zeros(uniq.shape[0]).index_add_(0, inverse, ws)
        counts = torch.bincount(uniq[:, 0], minlength=n) if uniq.numel() else torch.zeros(n, dtype=torch.long)
        inv_ptr[p] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        inv_doc[p] = uniq[:, 1].to(torch.int32)
        inv_pos[p] = uniq[:, 2].to(torch.int32)
        inv_w[p] = wsum
    return SlotStats(len(docs), df, mass, inv_ptr, inv_doc, inv_pos, inv_w)
