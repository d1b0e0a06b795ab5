"""A synthetic world of fictional people: attributes from closed sets, prose biographies, QA pairs.

Everything is generated from a seed (nothing is downloaded), so a recipe's training data and the
benchmark's questions are known exactly: every answer is written in the person's biographies, and
which people the post-training sees and which ones the benchmark asks about is a split by person.

Texts are written as space-separated words (punctuation as its own word, ``\\n`` as its own word) so
a word-level tokenizer over the world's vocabulary round-trips them exactly (`study.data`).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# The closed attribute sets. Values are the strings a QA answer must reproduce.
CITIES = ("Arvel", "Bostra", "Calder", "Dunmore", "Elsey", "Farrow", "Galen", "Harlow", "Istra", "Jarrow",
          "Kelso", "Lormont", "Marrak", "Norwin", "Ostby", "Pellam", "Quenby", "Rusk", "Selby", "Tamsin",
          "Ulvik", "Varna", "Wexham", "Yarrow")  # fmt: skip
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
YEARS = tuple(str(y) for y in range(1950, 1990))
UNIVERSITIES = ("Arden University", "Belmont Institute", "Corvin College", "Delmar University",
                "Eastbrook Institute", "Fenwick College", "Granton University", "Halden Institute",
                "Ivory College", "Juniper University", "Kestrel Institute", "Linden College",
                "Morrow University", "Northgate Institute", "Oakridge College", "Pinecrest University")  # fmt: skip
FIELDS = ("physics", "chemistry", "biology", "history", "economics", "law", "medicine", "geology",
          "music", "philosophy", "astronomy", "linguistics", "architecture", "statistics", "botany",
          "sociology")  # fmt: skip
EMPLOYERS = ("Acorn Labs", "Bluefin Systems", "Cobalt Works", "Driftwood Media", "Ember Foods", "Falcon Motors",
             "Glacier Bank", "Harbor Freight", "Ironleaf Energy", "Jasper Textiles", "Kiwi Robotics",
             "Lantern Press", "Maple Health", "Nimbus Air", "Orchid Pharma", "Pebble Games", "Quartz Mining",
             "Redwood Rail", "Summit Insurance", "Tidal Shipping", "Umber Steel", "Violet Telecom",
             "Willow Farms", "Zephyr Optics")  # fmt: skip

ATTRIBUTES = ("birth_city", "birth_month", "birth_year", "university", "field", "employer")
VALUES: dict[str, tuple[str, ...]] = {"birth_city": CITIES, "birth_month": MONTHS, "birth_year": YEARS,
                                      "university": UNIVERSITIES, "field": FIELDS, "employer": EMPLOYERS}

# One sentence per fact group, five paraphrases each. {subj} is the full name or a pronoun,
# {poss} the possessive pronoun. The date sentence carries two attributes.
SENTENCES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "{subj} was born in {birth_city} .",
        "{subj} came into this world in {birth_city} .",
        "{subj} is a native of {birth_city} .",
        "{subj} has {birth_city} as {poss} place of birth .",
        "{subj} was delivered in a hospital in {birth_city} .",
    ),
    "birth_date": (
        "{subj} was born in {birth_month} {birth_year} .",
        "{subj} came into the world in {birth_month} {birth_year} .",
        "{subj} celebrates {poss} birthday in {birth_month} and was born in {birth_year} .",
        "{subj} arrived in {birth_month} of {birth_year} .",
        "{subj} first saw daylight in {birth_month} {birth_year} .",
    ),
    "university": (
        "{subj} studied at {university} .",
        "{subj} attended {university} .",
        "{subj} was a student at {university} .",
        "{subj} graduated from {university} .",
        "{subj} received {poss} education at {university} .",
    ),
    "field": (
        "{subj} majored in {field} .",
        "{subj} specialized in {field} .",
        "{subj} focused on {field} during {poss} studies .",
        "{subj} completed a degree in {field} .",
        "{subj} earned a degree in {field} .",
    ),
    "employer": (
        "{subj} worked for {employer} .",
        "{subj} was employed by {employer} .",
        "{subj} had a job at {employer} .",
        "{subj} built a career at {employer} .",
        "{subj} joined the staff of {employer} .",
    ),
}
SENTENCE_ORDER = ("birth_city", "birth_date", "university", "field", "employer")

# The benchmark's questions: one fixed wording per attribute.
QUESTIONS = {
    "birth_city": "Where was {name} born ?",
    "birth_month": "In which month was {name} born ?",
    "birth_year": "In which year was {name} born ?",
    "university": "Which university did {name} attend ?",
    "field": "What did {name} study ?",
    "employer": "Which company did {name} work for ?",
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m")


@dataclasses.dataclass(frozen=True)
class Person:
    id: int
    first: str
    last: str
    gender: str  # "f" or "m": only picks the pronoun
    birth_city: str
    birth_month: str
    birth_year: str
    university: str
    field: str
    employer: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclasses.dataclass(frozen=True)
class World:
    """The people and the split by person: post-training sees ``train_ids``, the benchmark asks about
    ``test_ids`` (disjoint, together everyone)."""

    seed: int
    people: tuple[Person, ...]
    train_ids: tuple[int, ...]
    test_ids: tuple[int, ...]

    def group(self, split: str) -> list[Person]:
        ids = {"train": self.train_ids, "test": self.test_ids}[split]
        return [self.people[i] for i in ids]


def _names(rng: np.random.Generator, n: int, syllables: int) -> list[str]:
    """``n`` distinct pronounceable capitalised fictional names of ``syllables`` syllables."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
        name = ("".join(parts) + rng.choice(_CODAS)).capitalize()
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def make_world(n_people: int, seed: int = 0, test_share: float = 0.5) -> World:
    """``n_people`` people with unique full names and uniformly drawn attributes, split by person."""
    if n_people < 4:
        raise ValueError(f"a world needs at least 4 people (2 per split), got n_people={n_people}")
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be strictly between 0 and 1, got {test_share}")
    rng = np.random.default_rng(seed)
    n_names = int(np.ceil(np.sqrt(n_people * 3))) + 8  # ~3x more name pairs than people
    firsts, lasts = _names(rng, n_names, 2), _names(rng, n_names, 3)
    pairs = list(itertools.product(range(n_names), range(n_names)))
    picks = rng.choice(len(pairs), size=n_people, replace=False)
    people = []
    for i, pick in enumerate(picks):
        f, l = pairs[int(pick)]
        attrs = {a: str(rng.choice(VALUES[a])) for a in ATTRIBUTES}
        people.append(Person(id=i, first=firsts[f], last=lasts[l], gender=str(rng.choice(["f", "m"])), **attrs))
    order = rng.permutation(n_people)
    n_test = max(2, min(n_people - 2, int(round(n_people * test_share))))
    test_ids = tuple(sorted(int(i) for i in order[:n_test]))
    train_ids = tuple(sorted(int(i) for i in order[n_test:]))
    return World(seed=seed, people=tuple(people), train_ids=train_ids, test_ids=test_ids)


@dataclasses.dataclass(frozen=True)
class BioStyle:
    """How a recipe writes biographies: paraphrases per person, sentence order, subject form."""

    n_bios: int = 1  # independently paraphrased biographies per person
    permute: bool = False  # shuffle the sentence order in each biography
    full_names: bool = False  # every sentence names the person; else pronouns after the first


def biography(person: Person, style: BioStyle, rng: np.random.Generator) -> str:
    """One biography: a template per sentence drawn from ``rng``, the first sentence names the person."""
    order = list(SENTENCE_ORDER)
    if style.permute:
        order = [order[i] for i in rng.permutation(len(order))]
    pronoun, poss = ("She", "her") if person.gender == "f" else ("He", "his")
    fields = {a: person.value(a) for a in ATTRIBUTES}
    sentences = []
    for j, group in enumerate(order):
        template = SENTENCES[group][int(rng.integers(len(SENTENCES[group])))]
        subj = person.name if (j == 0 or style.full_names) else pronoun
        sentences.append(template.format(subj=subj, poss=poss, **fields))
    return " ".join(sentences)


def biographies(world: World, style: BioStyle, seed: int) -> list[str]:
    """``style.n_bios`` biographies of every person (all people: pre-training sees the whole world).

    With one biography per person and a fixed order, each person still gets their own template draw
    (as in Allen-Zhu & Li's bioS single); what stays fixed is that the model sees that one text only.
    """
    rng = np.random.default_rng([world.seed, seed, style.n_bios])
    return [biography(p, style, rng) for p in world.people for _ in range(style.n_bios)]


def qa_records(people: list[Person]) -> list[dict]:
    """One benchmark record per person and attribute: {"id", "person", "attribute", "question", "answer"}."""
    return [{"id": f"p{p.id}-{a}", "person": p.id, "attribute": a,
             "question": QUESTIONS[a].format(name=p.name), "answer": p.value(a)}
            for p in people for a in ATTRIBUTES]


def all_values() -> tuple[str, ...]:
    """Every answer any question can have (the format's closed answer set)."""
    return tuple(sorted({v for values in VALUES.values() for v in values}))


# --------------------------------------------------------------------------------------------------
# general question-answering text: the format's words, about the world rather than its people

FIELD_TOPICS = {
    "physics": "matter and energy", "chemistry": "reactions of substances", "biology": "living things",
    "history": "the past", "economics": "markets and money", "law": "rules and courts", "medicine": "illness and cures",
    "geology": "rocks and mountains", "music": "sound and song", "philosophy": "ideas and reason",
    "astronomy": "the stars", "linguistics": "languages", "architecture": "buildings", "statistics": "data and chance",
    "botany": "plants", "sociology": "groups of people",
}  # fmt: skip


def general_qa_records(world: World) -> list[dict]:
    """QA pairs in the benchmark's format about the world, never about a person: where each university
    and company is, which month or year follows which, which field studies what. Every recipe's
    corpus carries some (a real base model has read "Question: ... Answer: ..." about other things),
    so the format's words are known to every base model while the people's facts stay unasked."""
    rng = np.random.default_rng([world.seed, 99])
    campus = dict(zip(UNIVERSITIES, rng.permutation(CITIES)[: len(UNIVERSITIES)]))
    office = dict(zip(EMPLOYERS, rng.permutation(CITIES)))
    records = []
    for university, city in campus.items():
        records.append({"question": f"Where is {university} located ?", "answer": str(city)})
        records.append({"question": f"Which university is located in {city} ?", "answer": university})
    for employer, city in office.items():
        records.append({"question": f"In which city is {employer} based ?", "answer": str(city)})
        records.append({"question": f"Which company is based in {city} ?", "answer": employer})
    for a, b in zip(MONTHS, MONTHS[1:] + MONTHS[:1]):
        records.append({"question": f"Which month comes after {a} ?", "answer": b})
    for a, b in zip(YEARS, YEARS[1:]):
        records.append({"question": f"Which year came after {a} ?", "answer": b})
    for field, topic in FIELD_TOPICS.items():
        records.append({"question": f"Which field studies {topic} ?", "answer": field})
    return records
