"""Batches for teacher forcing, prompt checks, and greedy decoding vs teacher forcing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knowedit.checkpoint import Checkpoint, load_checkpoint
from knowedit.config import WorldConfig
from knowedit.data import Example, make_world
from knowedit.inference import (
    PromptError,
    encode_examples,
    encode_pair,
    greedy,
    greedy_exact,
    teacher_forced,
)
from knowedit.tokenizer import TextCodec, corpus_texts

EXAMPLES = [
    Example("Kalo Miren was born in", "Paris"),
    Example("The mother tongue of Tor Velsa is", "French"),
    Example("Dun plays the", "violin"),
    Example("Zyxwv Qorblatt, a name never seen, is a native of", "Ouagadougou"),
]


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    world = make_world(WorldConfig(entities=20, relations=2, phrasings=3, objects_per_relation=8))
    return TextCodec.train(corpus_texts(world.train_examples()), vocab_size=400)


@pytest.mark.parametrize("answer_only", [True, False])
def test_encode_examples_targets(codec: TextCodec, answer_only: bool) -> None:
    b = encode_examples(codec, EXAMPLES, max_len=64, answer_only=answer_only)
    B, T = b.ids.shape
    assert b.targets.shape == (B, T) and B == len(EXAMPLES)
    for i, ex in enumerate(EXAMPLES):
        p, a = codec.encode_prompt(ex.prompt), codec.encode_answer(ex.answer)
        seq = p + a
        n = len(seq) - 1  # input positions that predict something
        assert a[-1] == codec.eos_id
        assert b.ids[i, :n].tolist() == seq[:-1]
        assert b.ids[i, n:].eq(codec.pad_id).all()  # right padding
        assert b.targets[i, n:].eq(-100).all()  # padding is never scored
        scored_from = len(p) - 1 if answer_only else 0
        assert b.targets[i, :scored_from].eq(-100).all()  # prompt tokens when answer_only
        assert b.targets[i, scored_from:n].tolist() == seq[scored_from + 1 :]  # the next token
        assert int(b.answer_start[i]) == len(p) - 1
        assert int(b.answer_len[i]) == len(a)
        st, k = int(b.answer_start[i]), int(b.answer_len[i])
        assert b.targets[i, st : st + k].tolist() == a
    assert T == max(
        len(codec.encode_prompt(e.prompt)) + len(codec.encode_answer(e.answer)) - 1
        for e in EXAMPLES
    )


def test_batch_to_device(codec: TextCodec) -> None:
    b = encode_examples(codec, EXAMPLES[:2], max_len=40).to("cpu")
    assert b.ids.device.type == "cpu" and b.answer_len.shape == (2,)


@pytest.mark.parametrize(
    ("prompt", "target", "match"),
    [
        ("", "Paris", "prompt is empty"),
        ("   \n", "Paris", "prompt is empty"),
        ("Kalo Miren was born in", "", "target is empty"),
        ("Kalo Miren was born in", "  ", "target is empty"),
        ("Kalo Miren was born in " * 20, "Paris", "context is 16"),
    ],
)
def test_encode_pair_rejects(codec: TextCodec, prompt: str, target: str, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        encode_pair(codec, prompt, target, max_len=16)


def test_encode_pair_length_limit_is_exact(codec: TextCodec) -> None:
    p, a = encode_pair(codec, "Kalo Miren was born in", "Paris", max_len=64)
    need = len(p) + len(a) - 1
    encode_pair(codec, "Kalo Miren was born in", "Paris", max_len=need)
    with pytest.raises(PromptError):
        encode_pair(codec, "Kalo Miren was born in", "Paris", max_len=need - 1)
    assert encode_pair(codec, "Kalo", "Paris", 64, eos=False)[1][-1] != codec.eos_id
    assert issubclass(PromptError, ValueError)


def test_encode_examples_propagates_prompt_errors(codec: TextCodec) -> None:
    with pytest.raises(PromptError):
        encode_examples(codec, [EXAMPLES[0], Example("", "x")], max_len=40)


# --- with the trained debug model -----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(debug_ckpt: Path) -> Checkpoint:
    return load_checkpoint(debug_ckpt)


@pytest.fixture(scope="module")
def facts(debug_ckpt: Path) -> list[Example]:
    rows = []
    for name in ("corpus.jsonl", "heldout.jsonl"):
        with open(debug_ckpt / name, encoding="utf-8") as f:
            rows += [Example(**json.loads(line)) for line in f if line.strip()]
    return rows


def test_greedy_agrees_with_teacher_forced_exact(trained: Checkpoint, facts: list[Example]) -> None:
    exact = teacher_forced(trained.model, trained.codec, facts)["exact"]
    n_new = max(len(trained.codec.encode_answer(e.answer)) for e in facts) + 1
    answers = greedy(trained.model, trained.codec, [e.prompt for e in facts], max_new_tokens=n_new)
    assert [a == e.answer for a, e in zip(answers, facts, strict=True)] == exact
    assert greedy_exact(trained.model, trained.codec, facts) == exact
    # the model knows some facts and not others: the agreement is not vacuous
    assert 0 < sum(exact) < len(exact)


def test_teacher_forced_scores(trained: Checkpoint, facts: list[Example]) -> None:
    full = teacher_forced(trained.model, trained.codec, facts)
    small = teacher_forced(trained.model, trained.codec, facts, batch_size=7)
    assert full["exact"] == small["exact"]
    assert full["token_acc"] == pytest.approx(small["token_acc"])
    assert full["prob"] == pytest.approx(small["prob"], rel=1e-4)
    for acc, ex, p in zip(full["token_acc"], full["exact"], full["prob"], strict=True):
        assert 0.0 <= acc <= 1.0 and 0.0 < p <= 1.0
        if ex:
            assert acc == 1.0


def test_greedy_batching_matches_one_at_a_time(trained: Checkpoint, facts: list[Example]) -> None:
    prompts = [e.prompt for e in facts[:12]]
    batched = greedy(trained.model, trained.codec, prompts)
    single = [greedy(trained.model, trained.codec, [p])[0] for p in prompts]
    assert batched == single


def test_greedy_rejects_bad_prompts(trained: Checkpoint) -> None:
    with pytest.raises(PromptError, match="empty"):
        greedy(trained.model, trained.codec, ["Kalo", "  "])
    with pytest.raises(PromptError, match="context"):
        greedy(trained.model, trained.codec, ["word " * 200])


def test_greedy_stops_at_context(trained: Checkpoint) -> None:
    """A prompt one token short of the context still decodes (no over-long forward)."""
    limit = trained.model.cfg.max_seq_len
    words = ["Kalo"] * 200
    while len(trained.codec.encode_prompt(" ".join(words))) >= limit:
        words.pop()
    out = greedy(trained.model, trained.codec, [" ".join(words)], max_new_tokens=20)
    assert isinstance(out[0], str)


def test_cached_decoding_equals_the_full_forward(trained: Checkpoint, facts: list[Example]) -> None:
    """One token at a time against cached keys and values gives the logits of
    the whole sequence at once, and the same greedy answers as rerunning it."""
    import torch

    model, codec = trained.model, trained.codec
    ids = torch.tensor([codec.encode_prompt(facts[0].prompt) + codec.encode_answer(facts[0].answer)])
    with torch.no_grad():
        full = model(ids)
        cache: list = []
        steps = [model(ids[:, :3], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(3, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)

    def rerun(prompt: str, n: int = 8) -> str:  # greedy without a cache: the whole sequence every step
        x = torch.tensor([codec.encode_prompt(prompt)])
        out: list[int] = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(x)[0, -1].argmax())
                if nxt == codec.eos_id:
                    break
                out.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        return codec.decode(out)

    prompts = [e.prompt for e in facts[:40]]
    assert greedy(model, codec, prompts) == [rerun(p) for p in prompts]
