"""Facts in, text out: the synthetic world, EasyEdit records and the tokenizer."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knowedit.config import WorldConfig
from knowedit.data import (
    EditRequest,
    Example,
    RecordError,
    load_records,
    make_world,
    request_from_dict,
    requests_from,
    true_fact_examples,
)
from knowedit.data.world import RELATIONS
from knowedit.tokenizer import EOS, PAD, TextCodec, corpus_texts

WORLD = WorldConfig(
    entities=40, relations=3, phrasings=4, held_out=1, objects_per_relation=10, seed=5
)

# --- the synthetic world ---------------------------------------------------------------


def test_world_is_deterministic_from_seed() -> None:
    a, b = make_world(WORLD), make_world(WORLD)
    assert a.facts == b.facts and a.objects == b.objects
    assert a.edit_requests(10) == b.edit_requests(10)
    c = make_world(WorldConfig(**{**WORLD.__dict__, "seed": 6}))
    assert c.facts != a.facts
    assert {f.subject for f in c.facts} != {f.subject for f in a.facts}


def test_world_sizes() -> None:
    w = make_world(WORLD)
    assert len(w.facts) == WORLD.entities * WORLD.relations
    assert len({f.subject for f in w.facts}) == WORLD.entities
    assert len(w.train_examples()) == len(w.facts) * (WORLD.phrasings - WORLD.held_out)
    assert len(w.held_out_examples()) == len(w.facts) * WORLD.held_out
    for f in w.facts:
        assert f.object in w.objects[f.relation]
        assert len(w.objects[f.relation]) == WORLD.objects_per_relation


@pytest.mark.parametrize("held_out", [1, 2])
def test_held_out_phrasings_are_never_trained_for_their_fact(held_out: int) -> None:
    cfg = WorldConfig(**{**WORLD.__dict__, "held_out": held_out})
    w = make_world(cfg)
    phrasings = {rel: set(p[: cfg.phrasings]) for rel, p, _ in RELATIONS}
    trained: dict[str, set[str]] = {rel: set() for rel in w.objects}
    for f in w.facts:
        assert len(f.held_out_phrasings) == held_out
        assert not set(f.held_out_phrasings) & set(f.train_phrasings)
        assert set(f.held_out_phrasings) | set(f.train_phrasings) == phrasings[f.relation]
        trained[f.relation] |= set(f.train_phrasings)
    # every phrasing is used for training by some fact
    assert all(trained[rel] == phrasings[rel] for rel in trained)
    # and a held-out prompt (phrasing + subject) is never a training prompt
    train_prompts = {e.prompt for e in w.train_examples()}
    assert not {e.prompt for e in w.held_out_examples()} & train_prompts


@pytest.mark.parametrize(
    "change",
    [
        {"relations": 0},
        {"relations": 99},
        {"phrasings": 0},
        {"held_out": 4},
        {"objects_per_relation": 1},
        {"objects_per_relation": 31},
        {"answers": "names", "objects_per_relation": 501},
        {"answers": "sentences"},
    ],
)
def test_world_rejects_bad_sizes(change: dict) -> None:
    with pytest.raises(ValueError):
        make_world(WorldConfig(**{**WORLD.__dict__, **change}))


def test_named_answers_world_keeps_the_subjects_and_has_multiword_objects() -> None:
    words = make_world(WORLD)
    names = make_world(WorldConfig(**{**WORLD.__dict__, "answers": "names", "objects_per_relation": 100}))
    assert [f.subject for f in names.facts] == [f.subject for f in words.facts]
    subjects = {f.subject for f in names.facts}
    objects = [o for objs in names.objects.values() for o in objs]
    assert len(objects) == len(set(objects)) == 100 * len(names.objects)  # distinct across relations
    assert not subjects & set(objects)
    assert all(len(o.split()) == 2 for o in objects)
    assert all(f.object in names.objects[f.relation] for f in names.facts)
    again = make_world(WorldConfig(**{**WORLD.__dict__, "answers": "names", "objects_per_relation": 100}))
    assert again.facts == names.facts  # deterministic from the seed
    reqs = names.edit_requests(20)
    assert all(r.target_new in names.objects[r.case_id and names.facts[int(r.case_id)].relation] for r in reqs)


def test_edit_requests_are_valid_edits() -> None:
    w = make_world(WORLD)
    reqs = w.edit_requests()
    assert len(reqs) == len(w.facts)
    assert len({r.case_id for r in reqs}) == len(reqs)  # distinct facts
    for r in reqs:
        assert r.target_new != r.ground_truth
        assert r.subject in r.prompt
        assert request_from_dict(r.to_dict()) == r  # validates as an EasyEdit record
        fact = w.facts[int(r.case_id)]
        assert r.ground_truth == fact.object and r.target_new in w.objects[fact.relation]
        assert r.rephrase_prompt == [p.format(s=fact.subject) for p in fact.held_out_phrasings]
        assert len(r.locality_prompt) == len(r.locality_ground_truth) == 1
        assert fact.subject not in r.locality_prompt[0]
    assert w.edit_requests(5, seed=1) == w.edit_requests(5, seed=1)
    assert w.edit_requests(5, seed=1) != w.edit_requests(5, seed=2)


# --- EasyEdit records ------------------------------------------------------------------

RECORDS = [
    {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux grew up speaking",
        "locality_prompt": ["The mother tongue of Lionel Jospin is"],
        "locality_ground_truth": ["French"],
    },
    {"prompt": "Kalo Miren plays the", "target_new": "harp"},
]


def _json(tmp_path: Path, records: list, name: str = "edits.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records, indent=2))
    return p


def _jsonl(tmp_path: Path, records: list, name: str = "edits.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def test_load_json_list_and_jsonl_agree(tmp_path: Path) -> None:
    a = load_records(_json(tmp_path, RECORDS))
    b = load_records(_jsonl(tmp_path, RECORDS))
    assert a == b
    r0, r1 = a
    assert r0.rephrase_prompt == ["Danielle Darrieux grew up speaking"]  # a string becomes a list
    assert r0.case_id == "0" and r0.ground_truth == "French"
    assert r1 == EditRequest(prompt="Kalo Miren plays the", target_new="harp")
    assert load_records(_json(tmp_path, RECORDS), limit=1) == [r0]
    assert requests_from(str(tmp_path / "edits.json")) == a
    assert requests_from([RECORDS[1], r0]) == [r1, r0]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    p.write_text("\n" + json.dumps(RECORDS[1]) + "\n\n   \n")
    assert len(load_records(p)) == 1


@pytest.mark.parametrize("writer", [_json, _jsonl])
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_new": None}, "target_new"),  # None: delete the field
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"target_new": 3}, "target_new"),
        ({"rephrase_prompt": 5}, "rephrase_prompt"),
        ({"rephrase_prompt": {"a": "b"}}, "rephrase_prompt"),
        ({"rephrase_prompt": ["ok", 2]}, "rephrase_prompt"),
        ({"locality_prompt": ["a", "b"], "locality_ground_truth": ["x", "y", "z"]}, "locality"),
        ({"subject": "Nobody"}, "subject"),
        ({"ground_truth": ["x"]}, "ground_truth"),
    ],
)
def test_bad_record_names_record_and_field(
    tmp_path: Path, writer: object, change: dict, field: str
) -> None:
    bad = dict(RECORDS[0])
    for k, v in change.items():
        if v is None:
            del bad[k]
        else:
            bad[k] = v
    path = writer(tmp_path, [RECORDS[1], bad])  # type: ignore[operator]
    with pytest.raises(RecordError, match=rf"{path.name} record 1.*{field}"):
        load_records(path)


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "e.jsonl"
    p.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n{oops\n")
    with pytest.raises(RecordError, match="line 3"):
        load_records(p)
    q = tmp_path / "e.json"
    q.write_text('[\n  {"prompt": "a", "target_new": "b"},\n  {"prompt": "c",,}\n]\n')
    with pytest.raises(RecordError, match="line 3"):
        load_records(q)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("", "empty"),
        ("   \n", "empty"),
        ('["just a string"]', "record 0"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_unreadable_files_raise(tmp_path: Path, content: str | bytes | None, match: str) -> None:
    p = tmp_path / "r.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(RecordError, match=match):
        load_records(p)


def test_record_error_is_a_value_error() -> None:
    assert issubclass(RecordError, ValueError)
    with pytest.raises(RecordError, match="request 0.*expected an object"):
        requests_from(["nope"])  # type: ignore[list-item]


def test_true_fact_examples() -> None:
    recs = [
        request_from_dict(RECORDS[0]),
        request_from_dict({**RECORDS[0], "case_id": 1}),  # same facts again
        request_from_dict(
            {
                "prompt": " Kalo Miren plays the ",
                "target_new": "harp",
                "ground_truth": " violin",
                "rephrase_prompt": ["Kalo Miren performs on the", "Kalo Miren plays the"],
                "locality_prompt": ["The mother tongue of Lionel Jospin is", "Tor Vel plays the"],
                "locality_ground_truth": ["French", "drums"],
            }
        ),
        request_from_dict({"prompt": "No truth known for", "target_new": "x"}),  # no ground truth
    ]
    assert true_fact_examples(recs) == [
        Example("The mother tongue of Danielle Darrieux is", "French"),
        Example("Danielle Darrieux grew up speaking", "French"),
        Example("The mother tongue of Lionel Jospin is", "French"),
        Example("Kalo Miren plays the", "violin"),
        Example("Kalo Miren performs on the", "violin"),
        Example("Tor Vel plays the", "drums"),
    ]


# --- the tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.train(corpus_texts(make_world(WORLD).train_examples()), vocab_size=500)


def _check_ids(codec: TextCodec, ids: list[int]) -> None:
    """No unknown (unmapped) ids and no special tokens inside ordinary text."""
    assert all(0 <= i < codec.vocab_size for i in ids)
    assert all(codec.tok.id_to_token(i) not in (None, PAD, EOS) for i in ids)


def test_codec_basics(codec: TextCodec) -> None:
    assert 256 < codec.vocab_size <= 500
    assert codec.tok.token_to_id(PAD) == codec.pad_id
    assert codec.tok.token_to_id(EOS) == codec.eos_id
    assert codec.tok.get_vocab_size() == codec.vocab_size


@pytest.mark.parametrize(
    "text",
    [
        "Zyxwv Qorblatt was born in Xanadu",
        "Ærøskøbing 東京 naïve — “quotes” 😀",
        "tabs\tand\nnewlines",
        "a  b",
    ],
)
def test_unseen_names_round_trip(codec: TextCodec, text: str) -> None:
    ids = codec.encode_prompt(text)
    _check_ids(codec, ids)
    assert codec.decode(ids) == text.strip()
    answer = codec.encode_answer(text)
    assert answer[-1] == codec.eos_id
    _check_ids(codec, answer[:-1])
    assert codec.decode(answer) == text.strip()
    assert codec.encode_answer(text, eos=False) == answer[:-1]


@settings(max_examples=60, deadline=None, database=None)
@given(text=st.text(alphabet=string.printable, max_size=40))
def test_printable_text_round_trips(codec: TextCodec, text: str) -> None:
    ids = codec.encode_prompt(text)
    _check_ids(codec, ids)
    assert codec.decode(ids) == text.strip()


@settings(max_examples=40, deadline=None, database=None)
@given(text=st.text(max_size=20))
def test_any_unicode_round_trips(codec: TextCodec, text: str) -> None:
    ids = codec.encode_prompt(text)
    _check_ids(codec, ids)
    assert codec.decode(ids) == text.strip()


def test_save_load_round_trip(codec: TextCodec, tmp_path: Path) -> None:
    codec.save(tmp_path / "tok.json")
    again = TextCodec.load(tmp_path / "tok.json")
    assert again.vocab_size == codec.vocab_size
    assert (again.pad_id, again.eos_id) == (codec.pad_id, codec.eos_id)
    for text in ["Zyxwv Qorblatt was born in", "The mother tongue of Ærø is", "x"]:
        assert again.encode_prompt(text) == codec.encode_prompt(text)
        assert again.encode_answer(text) == codec.encode_answer(text)


def test_training_is_deterministic() -> None:
    texts = corpus_texts(make_world(WORLD).train_examples())
    a, b = TextCodec.train(texts, vocab_size=400), TextCodec.train(texts, vocab_size=400)
    assert a.tok.get_vocab() == b.tok.get_vocab()
    assert a.encode_prompt(texts[3]) == b.encode_prompt(texts[3])


def test_tokenizer_without_special_tokens_is_rejected() -> None:
    from tokenizers import Tokenizer, models

    with pytest.raises(ValueError, match="special"):
        TextCodec(Tokenizer(models.BPE()))
