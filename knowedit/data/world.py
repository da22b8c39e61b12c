"""A synthetic fact world: entities x relations, several phrasings each.

Each fact is (subject, relation, object). Every relation has several
phrasings; per fact, ``held_out`` phrasings are kept out of training (a
different one for each fact, so every phrasing is still seen with other
subjects) and serve to measure paraphrase generalization. Deterministic from
its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from knowedit.config import ConfigError, WorldConfig
from knowedit.data.records import EditRequest, Example

RELATIONS: list[tuple[str, list[str], list[str]]] = [
    (
        "birthplace",
        ["{s} was born in", "The birthplace of {s} is", "{s} is a native of", "{s} came into the world in",
         "The city where {s} was born is"],
        ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Warsaw",
         "Athens", "Cairo", "Lima", "Tokyo", "Seoul", "Boston", "Chicago", "Toronto", "Sydney", "Mumbai",
         "Nairobi", "Havana", "Bergen", "Geneva", "Kyoto", "Quito", "Riga", "Tunis", "Porto", "Turin"],
    ),
    (
        "language",
        ["The mother tongue of {s} is", "{s} speaks natively", "{s} grew up speaking",
         "The native language of {s} is", "The first language of {s} is"],
        ["English", "French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish", "Finnish",
         "Danish", "Czech", "Turkish", "Arabic", "Hindi", "Bengali", "Korean", "Japanese", "Russian", "Latvian",
         "Irish", "Welsh", "Basque", "Catalan", "Hungarian", "Romanian", "Serbian", "Thai", "Malay", "Swahili"],
    ),
    (
        "instrument",
        ["{s} plays the", "The instrument of {s} is the", "{s} performs on the", "{s} is known for playing the",
         "On stage, {s} plays the"],
        ["piano", "guitar", "violin", "cello", "flute", "trumpet", "drums", "harp", "organ", "clarinet",
         "oboe", "banjo", "saxophone", "trombone", "viola", "bass", "mandolin", "accordion", "tuba", "lute",
         "sitar", "ukulele", "harmonica", "bassoon", "bagpipes", "xylophone", "zither", "horn", "fiddle", "lyre"],
    ),
    (
        "profession",
        ["{s} works as a", "By profession, {s} is a", "The job of {s} is", "{s} earns a living as a",
         "Professionally, {s} is a"],
        ["lawyer", "doctor", "teacher", "farmer", "pilot", "chef", "painter", "writer", "nurse", "baker",
         "banker", "sailor", "soldier", "dentist", "plumber", "architect", "journalist", "engineer", "actor",
         "singer", "poet", "judge", "priest", "tailor", "miner", "carpenter", "butcher", "gardener", "clerk",
         "surgeon"],
    ),
    (
        "sport",
        ["The sport {s} plays is", "{s} competes in", "{s} is a professional player of", "The game of {s} is",
         "On weekends {s} plays"],
        ["football", "tennis", "cricket", "rugby", "hockey", "golf", "baseball", "basketball", "volleyball",
         "handball", "badminton", "squash", "polo", "chess", "curling", "lacrosse", "softball", "snooker",
         "netball", "bowling", "fencing", "rowing", "boxing", "judo", "karate", "archery", "cycling", "skiing",
         "surfing", "wrestling"],
    ),
    (
        "colour",
        ["The favourite colour of {s} is", "{s} likes the colour", "The colour {s} prefers is",
         "{s} always dresses in", "The colour loved by {s} is"],
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey",
         "violet", "indigo", "crimson", "scarlet", "teal", "amber", "olive", "maroon", "navy", "beige", "ivory",
         "gold", "silver", "cyan", "magenta", "lime", "coral", "turquoise", "lavender"],
    ),
]

_SYLLABLES = [
    "ka", "lo", "mi", "ren", "tor", "vel", "sa", "dun", "bri", "mo", "el", "an", "zor", "qui", "fa", "ne",
    "ru", "tha", "gon", "li", "per", "os", "cal", "dra", "ven", "ix", "mar", "tu", "bel", "ko", "sil", "ar",
]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    train_phrasings: tuple[str, ...]
    held_out_phrasings: tuple[str, ...]


def _name(rng: random.Random) -> str:
    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return f"{word()} {word()}"


@dataclass
class FactWorld:
    """A generated world of facts; see :func:`make_world`."""

    facts: list[Fact]
    objects: dict[str, list[str]]
    seed: int

    def train_examples(self) -> list[Example]:
        """Every fact in each of its training phrasings."""
        return [Example(p.format(s=f.subject), f.object) for f in self.facts for p in f.train_phrasings]

    def held_out_examples(self) -> list[Example]:
        """Every fact in its held-out phrasings (never trained on)."""
        return [Example(p.format(s=f.subject), f.object) for f in self.facts for p in f.held_out_phrasings]

    def edit_requests(self, n: int | None = None, seed: int | None = None) -> list[EditRequest]:
        """EasyEdit-format edits that move ``n`` distinct facts to a new object.

        The rephrase prompts are the fact's held-out phrasings; the locality
        prompt is another subject's fact of the same relation (as in CounterFact).
        """
        rng = random.Random(self.seed + 1 if seed is None else seed)
        order = list(range(len(self.facts)))
        rng.shuffle(order)
        out = []
        for i in order[: n if n is not None else len(order)]:
            f = self.facts[i]
            new = rng.choice([o for o in self.objects[f.relation] if o != f.object])
            same_rel = [g for g in self.facts if g.relation == f.relation and g.subject != f.subject]
            g = rng.choice(same_rel)
            out.append(
                EditRequest(
                    prompt=f.train_phrasings[0].format(s=f.subject),
                    target_new=new,
                    subject=f.subject,
                    ground_truth=f.object,
                    rephrase_prompt=[p.format(s=f.subject) for p in f.held_out_phrasings],
                    locality_prompt=[g.train_phrasings[0].format(s=g.subject)],
                    locality_ground_truth=[g.object],
                    case_id=str(i),
                )
            )
        return out


MAX_NAMED_OBJECTS = 500
"""Most generated objects per relation (``answers="names"``)."""


def _named_objects(cfg: WorldConfig, subjects: set[str]) -> dict[str, list[str]]:
    """Per relation, ``objects_per_relation`` distinct generated names, none of them
    a subject's (their own random stream, so the subjects are the ``words`` world's)."""
    rng = random.Random(f"objects-{cfg.seed}")
    taken = set(subjects)
    return {rel: _new_names(rng, cfg.objects_per_relation, taken) for rel, _phr, _pool in RELATIONS[: cfg.relations]}


def _new_names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """``n`` generated names not in ``taken`` (added to it), in the order drawn."""
    out: list[str] = []
    while len(out) < n:
        name = _name(rng)
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_world(cfg: WorldConfig | None = None) -> FactWorld:
    """Generate a world of ``entities x relations`` facts, deterministic from ``cfg.seed``.

    Raises:
        ConfigError: for sizes the built-in relations cannot serve.
    """
    cfg = cfg or WorldConfig()
    if not 1 <= cfg.relations <= len(RELATIONS):
        raise ConfigError(f"world.relations must be 1..{len(RELATIONS)}")
    max_phr = min(len(r[1]) for r in RELATIONS)
    if not 1 <= cfg.phrasings <= max_phr or not 0 <= cfg.held_out < cfg.phrasings:
        raise ConfigError(f"world.phrasings must be 1..{max_phr} and held_out below it")
    if cfg.answers not in ("words", "names"):
        raise ConfigError(f"world.answers must be 'words' or 'names', not {cfg.answers!r}")
    most = MAX_NAMED_OBJECTS if cfg.answers == "names" else min(len(r[2]) for r in RELATIONS)
    if not 2 <= cfg.objects_per_relation <= most:
        raise ConfigError(f"world.objects_per_relation must be 2..{most} with answers={cfg.answers}")
    rng = random.Random(cfg.seed)
    names: set[str] = set()
    subjects = _new_names(rng, cfg.entities, names)
    facts = []
    objects = {}
    named = _named_objects(cfg, names) if cfg.answers == "names" else {}
    for rel, phrasings, pool in RELATIONS[: cfg.relations]:
        phr = phrasings[: cfg.phrasings]
        objs = named[rel] if named else pool[: cfg.objects_per_relation]
        objects[rel] = objs
        for s in subjects:
            held = set(rng.sample(range(len(phr)), cfg.held_out))
            facts.append(
                Fact(
                    subject=s,
                    relation=rel,
                    object=rng.choice(objs),
                    train_phrasings=tuple(p for i, p in enumerate(phr) if i not in held),
                    held_out_phrasings=tuple(p for i, p in enumerate(phr) if i in held),
                )
            )
    return FactWorld(facts=facts, objects=objects, seed=cfg.seed)
