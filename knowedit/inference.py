"""Encoding facts into batches, teacher-forced scoring and greedy decoding."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from knowedit.data.records import Example
from knowedit.errors import KnoweditError
from knowedit.model import MemoryLM
from knowedit.tokenizer import TextCodec, text_problem


class PromptError(KnoweditError, ValueError):
    """A prompt or answer the model cannot take (empty, not valid text, too long, no tokens)."""


def check_prompt_text(text: str, what: str = "prompt") -> None:
    """Raise :class:`PromptError` if ``text`` holds surrogates (invalid UTF-8 from argv, or a
    JSON ``"\\ud800"``), which the tokenizer cannot take."""
    problem = text_problem(text)
    if problem is not None:
        raise PromptError(f"the {what} is not valid text: {problem}")


@dataclass
class Batch:
    """Right-padded prompt+answer sequences.

    Attributes:
        ids: (B, T) input token ids (sequence without its last token).
        targets: (B, T) next-token targets; -100 where not scored.
        answer_start: (B,) index in ``ids`` of the position predicting the first answer token.
        answer_len: (B,) scored target tokens (answer + eos).
    """

    ids: torch.Tensor
    targets: torch.Tensor
    answer_start: torch.Tensor
    answer_len: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.ids, self.targets, self.answer_start, self.answer_len)))


def encode_pair(codec: TextCodec, prompt: str, answer: str, max_len: int, eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a prompt and its answer, checked against the context length.

    Raises:
        PromptError: empty prompt/answer, not valid text, an answer with no tokens, or too long.
    """
    if not prompt or not prompt.strip():
        raise PromptError("the prompt is empty")
    if not answer or not answer.strip():
        raise PromptError("the target is empty")
    check_prompt_text(prompt, "prompt")
    check_prompt_text(answer, "target")
    p = codec.encode_prompt(prompt)
    a = codec.encode_answer(answer, eos=eos)
    if len(a) - int(eos) == 0:
        raise PromptError(f"the target {answer!r} tokenizes to nothing")
    if len(p) + len(a) - 1 > max_len:
        raise PromptError(
            f"prompt + target is {len(p) + len(a) - 1} tokens; the model's context is {max_len}"
        )
    return p, a


def encode_examples(
    codec: TextCodec, examples: Sequence[Example], max_len: int, answer_only: bool = True
) -> Batch:
    """Encode examples as one right-padded batch for teacher forcing."""
    rows = []
    for ex in examples:
        p, a = encode_pair(codec, ex.prompt, ex.answer, max_len)
        rows.append((p, a))
    T = max(len(p) + len(a) - 1 for p, a in rows)
    B = len(rows)
    ids = torch.full((B, T), codec.pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    start = torch.empty(B, dtype=torch.long)
    length = torch.empty(B, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.tensor(p + a)
        n = len(seq) - 1
        ids[i, :n] = seq[:-1]
        targets[i, :n] = seq[1:]
        if answer_only:
            targets[i, : len(p) - 1] = -100
        start[i], length[i] = len(p) - 1, len(a)
    return Batch(ids, targets, start, length)


@torch.no_grad()
def teacher_forced(model: MemoryLM, codec: TextCodec, examples: Sequence[Example], batch_size: int = 256) -> dict[str, list]:
    """Teacher-forced scores per example over the answer tokens (eos excluded).

    Returns:
        ``token_acc`` (EasyEdit's convention: share of answer tokens that are
        the argmax), ``exact`` (every answer token and the eos are the argmax,
        which is what greedy decoding would produce) and ``prob`` (mean answer
        token probability), each a list over examples.
    """
    n = len(examples)
    out: dict[str, list] = {"token_acc": [0.0] * n, "exact": [False] * n, "prob": [0.0] * n}
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    for idx, b in length_sorted_batches(codec, examples, max_len, batch_size):
        b = b.to(device)
        logits, tgt = model.target_logits(b.ids, b.targets)  # (N, V): the answer positions alone
        hit = logits.argmax(-1) == tgt
        prob = logits.float().softmax(-1).gather(1, tgt[:, None]).squeeze(1)
        counts = b.answer_len.tolist()
        for i, h, p in zip(idx, hit.split(counts), prob.split(counts)):
            out["token_acc"][i] = float(h[:-1].float().mean())
            out["exact"][i] = bool(h.all())
            out["prob"][i] = float(p[:-1].mean())
    return out


def length_sorted_batches(
    codec: TextCodec, examples: Sequence[Example], max_len: int, batch_size: int
) -> Iterator[tuple[list[int], Batch]]:
    """The examples encoded (:func:`encode_examples`) in batches of like length, so a
    batch pads little: (the examples' indices, their batch) per batch. Raises what
    :func:`encode_pair` raises, for the first bad example."""
    lengths = []
    for ex in examples:
        p, a = encode_pair(codec, ex.prompt, ex.answer, max_len)
        lengths.append(len(p) + len(a))
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield idx, encode_examples(codec, [examples[i] for i in idx], max_len)


@torch.no_grad()
def greedy(model: MemoryLM, codec: TextCodec, prompts: Sequence[str], max_new_tokens: int = 8) -> list[str]:
    """Greedy completions, batched by prompt length (no padding needed), stopping at eos.

    The prompt runs once; each new token then runs alone against the cached
    attention keys and values (the memory layers and the rest are position-wise).
    """
    device = next(model.parameters()).device
    encoded = []
    for p in prompts:
        if not p or not p.strip():
            raise PromptError("the prompt is empty")
        check_prompt_text(p, "prompt")
        ids = codec.encode_prompt(p)
        if len(ids) >= model.cfg.max_seq_len:
            raise PromptError(f"the prompt is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}")
        encoded.append(ids)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    results: list[str] = [""] * len(prompts)
    for _, members in groups.items():
        x = torch.tensor([encoded[i] for i in members], device=device)
        done = torch.zeros(len(members), dtype=torch.bool, device=device)
        new: list[torch.Tensor] = []
        cache: list[dict[str, torch.Tensor]] = []  # attention keys/values: each step runs one token
        length = x.shape[1]
        for _ in range(max_new_tokens):
            if length >= model.cfg.max_seq_len:
                break
            nxt = model(x, cache=cache)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, codec.eos_id), nxt)
            new.append(nxt)
            done |= nxt == codec.eos_id
            x, length = nxt[:, None], length + 1
            if bool(done.all()):
                break
        gen = torch.stack(new, 1).tolist() if new else [[] for _ in members]
        for j, i in enumerate(members):
            toks = gen[j]
            if codec.eos_id in toks:
                toks = toks[: toks.index(codec.eos_id)]
            results[i] = codec.decode(toks)
    return results


def greedy_exact(model: MemoryLM, codec: TextCodec, examples: Sequence[Example]) -> list[bool]:
    """Greedy exact match without teacher forcing: the completion equals the answer."""
    n_new = max(len(codec.encode_answer(e.answer)) for e in examples) + 1 if examples else 1
    got = greedy(model, codec, [e.prompt for e in examples], max_new_tokens=n_new)
    return [g == e.answer.strip() for g, e in zip(got, examples)]
