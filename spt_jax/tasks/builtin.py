"""Built-in offline tasks: seeded, deterministic, several hundred test items each, no downloads.

They cover the answer formats a small pretrained model may partly know -- multiple-choice letters
(``capitals_mc``), a short free-form word (``element_symbols``), a GSM8K-style number
(``arithmetic_gsm``) and yes/no (``yes_no``) -- so the protocol can be run end to end anywhere.
Knowledge items are split by fact: every question about one fact lands in one split, so a soft prompt
tuned on train cannot have seen a test fact. Facts live in ``data/capitals.csv``,
``data/continents.csv`` and ``data/elements.csv``; countries with several or disputed capitals, or a
capital named like the country, are left out of the capitals on purpose, as countries across two
continents are of the continents.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import unicodedata
from collections.abc import Callable, Sequence
from importlib import resources

import numpy as np

from spt_jax.errors import DataError
from spt_jax.tasks.answers import LETTERS, AnswerSpec, FormatSpec
from spt_jax.tasks.task import SPLITS, ClozeSpec, Task

Splits = dict[str, list[dict]]


@dataclasses.dataclass(frozen=True, eq=False)
class GeneratedSource:
    """Records built once by a seeded function; every load returns fresh copies of the same records."""

    build: Callable[[], Splits]
    splits: tuple[str, ...] = SPLITS
    _built: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def load(self, split: str) -> list[dict]:
        if not self._built:
            self._built.update(self.build())
        if split not in self._built:
            raise DataError(f"generated data has no split {split!r}; available: {', '.join(self._built)}")
        return [{k: list(v) if isinstance(v, list) else v for k, v in r.items()} for r in self._built[split]]


def read_data_csv(name: str) -> list[dict[str, str]]:
    """Rows of a CSV file shipped in ``spt_jax/tasks/data``."""
    text = resources.files("spt_jax.tasks").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def split_by_fact(groups: dict[str, list], fractions: tuple[float, float], seed: int) -> dict[str, list]:
    """Each group's facts shuffled and cut into test/validation/train by (test, validation) fractions,
    so every split holds every group in proportion."""
    rng = np.random.default_rng(seed)
    out = {s: [] for s in SPLITS}
    for key in sorted(groups):
        facts = groups[key]
        order = rng.permutation(len(facts))
        n_test = round(len(facts) * fractions[0])
        n_val = max(1, round(len(facts) * fractions[1]))
        out["test"] += [facts[i] for i in order[:n_test]]
        out["validation"] += [facts[i] for i in order[n_test:n_test + n_val]]
        out["train"] += [facts[i] for i in order[n_test + n_val:]]
    return out


def shuffled(records: list[dict], rng: np.random.Generator) -> list[dict]:
    return [records[i] for i in rng.permutation(len(records))]


# --------------------------------------------------------------------------------------------------
# capitals_mc
# --------------------------------------------------------------------------------------------------

_PLACE = {  # group -> (forward phrase for a place, "which ..." phrase)
    "country": ("{place}", "country"),
    "us_state": ("the U.S. state of {name}", "U.S. state"),
    "ca_province": ("{place} in Canada", "Canadian province or territory"),
    "au_state": ("{place} in Australia", "Australian state or territory"),
}


def capital_facts() -> list[dict]:
    rows = read_data_csv("capitals.csv")
    names = [r["name"] for r in rows]
    facts = []
    for r in rows:
        place = f"{r['article']} {r['name']}".strip()
        if r["group"] == "country" and names.count(r["name"]) > 1:
            place = f"the country of {r['name']}"  # Georgia the country, not the U.S. state
        facts.append({"group": r["group"], "name": r["name"], "capital": r["capital"],
                      "capital_aliases": [a for a in r["capital_aliases"].split("|") if a],
                      "place": _PLACE[r["group"]][0].format(place=place, name=r["name"])})
    return facts


def other_spellings(name: str, aliases: Sequence[str] = ()) -> list[str]:
    """Other accepted spellings of a name: its aliases and, where it has combining accents, the name
    without them ("Bogota" for "Bogotá", "Asuncion" for "Asunción")."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return [*aliases, *([plain] if plain != name else [])]


def _multiple_choice(gold: str, pool: Sequence[str], position: int, rng: np.random.Generator) -> list[str]:
    """Three distractors from the pool (never the gold) around the gold at ``position``."""
    others = sorted(set(pool) - {gold})
    distractors = [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    return distractors[:position] + [gold] + distractors[position:]


def build_capitals_mc(seed: int = 1234) -> Splits:
    facts = capital_facts()
    by_group: dict[str, list] = {}
    for f in facts:
        by_group.setdefault(f["group"], []).append(f)
    split_facts = split_by_fact(by_group, (0.62, 0.105), seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for split in SPLITS:
        items = []
        for f in split_facts[split]:
            group = by_group[f["group"]]
            which = _PLACE[f["group"]][1]
            items.append(dict(f, direction="capital_of", question=f"What is the capital of {f['place']}?",
                              gold_text=f["capital"], pool=[g["capital"] for g in group]))
            items.append(dict(f, direction="place_of", question=f"{f['capital']} is the capital of which {which}?",
                              gold_text=f["name"], pool=[g["name"] for g in group]))
        positions = rng.permutation(np.arange(len(items)) % 4)  # gold letters balanced within the split
        records = []
        for item, pos in zip(items, positions):
            choices = _multiple_choice(item["gold_text"], item["pool"], int(pos), rng)
            records.append({"id": f"{item['group']}:{item['name']}:{item['direction']}",
                            "question": item["question"], "choices": choices, "answer": LETTERS[int(pos)],
                            "group": item["group"], "direction": item["direction"]})
        out[split] = shuffled(records, rng)
    return out


def capitals_mc() -> Task:
    return Task(
        name="capitals_mc",
        source=GeneratedSource(build_capitals_mc),
        input_template="Question: {question}\n{choices_text}\n",
        target_template="Answer: {answer}",
        format=FormatSpec(pattern=r"Answer: (?P<answer>[A-D])", mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="choice"),
        instruction="Answer the multiple-choice question. Reply with one line: 'Answer: ' followed by the "
                    "letter of the correct choice (A, B, C or D).",
        choices_field="choices",
        max_new_tokens=8,
        description="World, U.S. state, Canadian and Australian capitals, both directions, 4-way multiple "
                    "choice; split by fact.",
        cloze=ClozeSpec(context_template="Question: {question}\nAnswer:"),
    )


# --------------------------------------------------------------------------------------------------
# capital_of, country_of_capital, capital_of_options: the same facts as free-form answers
# --------------------------------------------------------------------------------------------------

_CAPITAL_SEED = 1234  # capitals_mc's: every capital task splits the facts alike
OPTION_SEPARATOR = "; "  # capital_of_options' list: no capital name has a semicolon
_NAME_ANSWER = r"Answer: (?P<answer>\S+(?: \S+){0,4}?)\.?"


def build_capital_questions(direction: str, seed: int = _CAPITAL_SEED) -> Splits:
    """One free-form question per fact (``capital_of``: the capital of a place; ``place_of``: the place
    of a capital), with the multiple-choice options of ``capitals_mc`` kept as the cloze reference's
    choices. Facts are split exactly as in ``capitals_mc``."""
    mc = build_capitals_mc(seed)
    facts = {f"{f['group']}:{f['name']}": f for f in capital_facts()}
    out = {}
    for split, records in mc.items():
        items = []
        for r in records:
            if r["direction"] != direction:
                continue
            fact = facts[r["id"].rsplit(":", 1)[0]]
            if direction == "capital_of":
                answer, aliases = fact["capital"], other_spellings(fact["capital"], fact["capital_aliases"])
            else:
                answer, aliases = fact["name"], other_spellings(fact["name"])
            items.append({"id": r["id"], "question": r["question"], "answer": answer, "aliases": aliases,
                          "choices": list(r["choices"]), "group": r["group"]})
        out[split] = items
    return out


def build_capital_options(seed: int = _CAPITAL_SEED) -> Splits:
    """``capital_of``'s questions with their four options written out ("Lima; Paris; Oslo; Hanoi"),
    separated by semicolons because one capital has a comma ("Washington, D.C.")."""
    out = build_capital_questions("capital_of", seed)
    for records in out.values():
        for r in records:
            r["options"] = OPTION_SEPARATOR.join(r["choices"])
    return out


def _free_form_name_task(name: str, build: Callable[[], Splits], instruction: str, description: str,
                         input_template: str = "Question: {question}\n", pattern: str = _NAME_ANSWER,
                         max_new_tokens: int = 12) -> Task:
    """A question answered by a name ("Answer: Paris"), aliases accepted, with a cloze reference over
    the record's ``choices``. The default pattern allows at most five words (the longest name in the
    data is "Saint Vincent and the Grenadines"): the answer is a name, not a sentence, so "Answer:
    Malta is the capital of Malta." is a format failure."""
    return Task(
        name=name,
        source=GeneratedSource(build),
        input_template=input_template,
        target_template="Answer: {answer}",
        format=FormatSpec(pattern=pattern, mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="string", aliases_field="aliases"),
        instruction=instruction,
        max_new_tokens=max_new_tokens,
        description=description,
        cloze=ClozeSpec(context_template="Question: {question}\nAnswer:"),
    )


def _name_instruction(what: str) -> str:
    return f"Answer the question. Reply with one line: 'Answer: ' followed by only the name of the {what}."


def capital_of() -> Task:
    return _free_form_name_task(
        "capital_of", lambda: build_capital_questions("capital_of"), _name_instruction("city"),
        "The capital of a country, U.S. state, Canadian province or Australian state, free-form "
        "('Answer: Paris'); split by fact as capitals_mc, whose options serve the cloze reference.")


def country_of_capital() -> Task:
    """The default ``spt-jax run`` task: on Gemma-3-270M its free-form answers (recall) read as much
    as its CF reference's choice among four (recognition), so the table compares like with like."""
    return _free_form_name_task(
        "country_of_capital", lambda: build_capital_questions("place_of"), _name_instruction("place"),
        "Which country, U.S. state, Canadian province or Australian state a capital belongs to, free-form "
        "('Answer: France'); split by fact as capitals_mc.")


def capital_of_options() -> Task:
    """Recognition in generation: the four names the CF reference chooses among are in view
    (``capital_of`` asks for recall). The format does not force an option: a name outside them is a
    well-formed, wrong answer."""
    return _free_form_name_task(
        "capital_of_options", build_capital_options,
        "Answer the question with one of the options. Reply with one line: 'Answer: ' followed by only the option.",
        "capital_of with its four options listed after the question ('Options: Lima; Paris; Oslo; Hanoi'), "
        "answered by the option's name ('Answer: Paris'); split by fact as capitals_mc.",
        input_template="Question: {question}\nOptions: {options}\n")


# --------------------------------------------------------------------------------------------------
# continent_of: a closed answer set, so generation and the cloze reference answer the same question
# --------------------------------------------------------------------------------------------------

CONTINENTS = ("Africa", "Asia", "Europe", "North America", "South America", "Oceania")
_CONTINENT_ALIASES = {"Oceania": ["Australia", "Australasia"]}  # the other name of that continent
_CONTINENT_ANSWER = r"Answer: (?P<answer>\S+(?: \S+)?)\.?"  # a continent's name is one or two words


def continent_facts() -> list[dict]:
    rows = read_data_csv("continents.csv")
    unknown = sorted({r["continent"] for r in rows} - set(CONTINENTS))
    if unknown:
        raise DataError(f"data/continents.csv: unknown continent(s) {unknown}; expected one of {list(CONTINENTS)}")
    return [{"name": r["country"], "place": f"{r['article']} {r['country']}".strip(), "continent": r["continent"]}
            for r in rows]


def build_continent_of(seed: int = 5678) -> Splits:
    """One question per country; split by fact within each continent, so every split holds every
    continent in proportion. The cloze choices are all six continents, in one fixed order: the CF
    reference picks among exactly the answers the generation modes may give."""
    by_continent: dict[str, list] = {}
    for f in continent_facts():
        by_continent.setdefault(f["continent"], []).append(f)
    split_facts = split_by_fact(by_continent, (0.6, 0.1), seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for split in SPLITS:
        records = [{"id": f"continent:{f['name']}", "question": f"On which continent is {f['place']}?",
                    "answer": f["continent"], "aliases": list(_CONTINENT_ALIASES.get(f["continent"], [])),
                    "choices": list(CONTINENTS), "group": f["continent"]} for f in split_facts[split]]
        out[split] = shuffled(records, rng)
    return out


def continent_of() -> Task:
    """The continent of a country, free-form ('Answer: Africa'). Recall and recognition coincide here:
    the answer set is six names, which the CF reference scores in full, so soft-prompt knowledge
    accuracy and the reference measure the same knowledge (on ``capital_of`` CF recognizes one of four
    capitals where generation must recall one of hundreds)."""
    return _free_form_name_task(
        "continent_of", build_continent_of, _name_instruction("continent"),
        "The continent of a country (Africa, Asia, Europe, North America, South America, Oceania), "
        "free-form ('Answer: Africa'); countries across two continents left out; split by fact "
        "within each continent; the cloze reference scores all six.",
        pattern=_CONTINENT_ANSWER, max_new_tokens=8)


# --------------------------------------------------------------------------------------------------
# element_symbols
# --------------------------------------------------------------------------------------------------


def element_facts() -> list[dict]:
    return [{"number": int(r["number"]), "symbol": r["symbol"], "name": r["name"],
             "aliases": [a for a in r["name_aliases"].split("|") if a]} for r in read_data_csv("elements.csv")]


def build_element_symbols(seed: int = 2345) -> Splits:
    split_facts = split_by_fact({"element": element_facts()}, (0.645, 0.11), seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for split in SPLITS:
        records = []
        for e in split_facts[split]:
            key = f"element:{e['number']}"
            records += [
                {"id": f"{key}:symbol", "question": f"What is the chemical symbol of {e['name']}?",
                 "answer": e["symbol"], "aliases": [], "exact": True},
                {"id": f"{key}:name_from_symbol", "question": f"Which chemical element has the symbol {e['symbol']}?",
                 "answer": e["name"], "aliases": list(e["aliases"])},
                {"id": f"{key}:name_from_number", "question": f"Which chemical element has atomic number {e['number']}?",
                 "answer": e["name"], "aliases": list(e["aliases"])},
                {"id": f"{key}:number", "question": f"What is the atomic number of {e['name']}?",
                 "answer": str(e["number"]), "aliases": []},
            ]
        out[split] = shuffled(records, rng)
    return out


def element_symbols() -> Task:
    return Task(
        name="element_symbols",
        source=GeneratedSource(build_element_symbols),
        input_template="Question: {question}\n",
        target_template="Answer: {answer}",
        format=FormatSpec(pattern=r"Answer: (?P<answer>[A-Za-z]+|[0-9]+)", mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="string", aliases_field="aliases", exact_field="exact"),
        instruction="Answer the question about chemical elements. Reply with one line: 'Answer: ' followed by "
                    "a single word or number (a chemical symbol, an element name or an atomic number).",
        max_new_tokens=10,  # long names ('rutherfordium') take several tokens
        description="Chemical elements: symbol from name, name from symbol or atomic number, atomic number "
                    "from name; short free-form answers; split by element.",
    )


# --------------------------------------------------------------------------------------------------
# arithmetic_gsm
# --------------------------------------------------------------------------------------------------

_NAMES = ("Ava", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kate", "Liam",
          "Maya", "Noah", "Olivia", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe")
_ITEMS = ("apples", "pencils", "stickers", "notebooks", "oranges", "candles", "markers", "cupcakes")
_THINGS = ("marbles", "cookies", "cards", "beads", "stamps", "grapes", "crayons", "shells")
_VEHICLES = ("car", "bus", "train", "truck", "cyclist")
_GIFTS = ("book", "game", "scarf", "kite", "puzzle", "lamp")
_PLANTS = ("tomatoes", "roses", "carrots", "tulips", "peppers", "sunflowers")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _two_names(rng) -> tuple[str, str]:
    a, b = rng.choice(len(_NAMES), size=2, replace=False)
    return _NAMES[int(a)], _NAMES[int(b)]


def _shopping(rng):
    name, item = _pick(rng, _NAMES), _pick(rng, _ITEMS)
    n, price = int(rng.integers(2, 10)), int(rng.integers(1, 9))
    bill = next(b for b in (10, 20, 50, 100) if b > n * price)
    return (f"{name} buys {n} {item} at ${price} each and pays with a ${bill} bill. "
            f"How much change, in dollars, does {name} get?", bill - n * price)


def _sharing(rng):
    name, thing = _pick(rng, _NAMES), _pick(rng, _THINGS)
    k, each = int(rng.integers(2, 9)), int(rng.integers(2, 13))
    return (f"{name} has {k * each} {thing} and shares them equally among {k} friends. "
            f"How many {thing} does each friend get?", each)


def _ages(rng):
    a, b = _two_names(rng)
    x, d, y = int(rng.integers(5, 40)), int(rng.integers(2, 15)), int(rng.integers(2, 11))
    return (f"{a} is {x} years old. {b} is {d} years older than {a}. How old will {b} be in {y} years?",
            x + d + y)


def _speed(rng):
    vehicle = _pick(rng, _VEHICLES)
    speed, hours = int(rng.integers(2, 13)) * 5, int(rng.integers(2, 7))
    return (f"A {vehicle} travels at {speed} miles per hour for {hours} hours. "
            f"How many miles does it travel?", speed * hours)


def _savings(rng):
    name, gift = _pick(rng, _NAMES), _pick(rng, _GIFTS)
    weekly, weeks = int(rng.integers(3, 16)), int(rng.integers(2, 9))
    spent = int(rng.integers(1, weekly * weeks))
    return (f"{name} saves ${weekly} every week for {weeks} weeks, then spends ${spent} on a {gift}. "
            f"How many dollars does {name} have left?", weekly * weeks - spent)


def _reading(rng):
    name = _pick(rng, _NAMES)
    per_day, days = int(rng.integers(5, 31)), int(rng.integers(2, 8))
    pages = per_day * days + int(rng.integers(10, 200))
    return (f"A book has {pages} pages. {name} reads {per_day} pages a day for {days} days. "
            f"How many pages are left to read?", pages - per_day * days)


def _baking(rng):
    name = _pick(rng, _NAMES)
    trays, per_tray = int(rng.integers(2, 7)), int(rng.integers(6, 16))
    eaten = int(rng.integers(1, 10))
    return (f"{name} bakes {trays} trays of cookies with {per_tray} cookies on each tray, and eats {eaten} "
            f"of them. How many cookies are left?", trays * per_tray - eaten)


def _garden(rng):
    name, plant = _pick(rng, _NAMES), _pick(rng, _PLANTS)
    rows, per_row, added = int(rng.integers(2, 10)), int(rng.integers(3, 13)), int(rng.integers(2, 20))
    return (f"A garden has {rows} rows of {plant} with {per_row} plants in each row. {name} plants {added} more. "
            f"How many plants are in the garden now?", rows * per_row + added)


def _stationery(rng):
    name = _pick(rng, _NAMES)
    pens, pen_price, books, book_price = (int(rng.integers(2, 8)), int(rng.integers(1, 5)),
                                          int(rng.integers(1, 6)), int(rng.integers(2, 9)))
    return (f"{name} buys {pens} pens for ${pen_price} each and {books} notebooks for ${book_price} each. "
            f"How many dollars does {name} spend in total?", pens * pen_price + books * book_price)


def _groups(rng):
    k, size = int(rng.integers(2, 7)), int(rng.integers(3, 9))
    joined = int(rng.integers(1, k * size // 2 + 1))  # most students were there from the start
    return (f"There are {k * size - joined} students in a class. {joined} more students join, and then the "
            f"class is split into {k} equal groups. How many students are in each group?", size)


ARITHMETIC_TEMPLATES = {"shopping": _shopping, "sharing": _sharing, "ages": _ages, "speed": _speed,
                        "savings": _savings, "reading": _reading, "baking": _baking, "garden": _garden,
                        "stationery": _stationery, "groups": _groups}
ARITHMETIC_SIZES = {"train": 200, "validation": 60, "test": 400}


def build_arithmetic_gsm(seed: int = 3456) -> Splits:
    """Unique problems, templates in turn; a question text never appears in two splits."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out = {}
    kinds = sorted(ARITHMETIC_TEMPLATES)
    for split in SPLITS:
        records = []
        while len(records) < ARITHMETIC_SIZES[split]:
            kind = kinds[len(records) % len(kinds)]
            question, answer = ARITHMETIC_TEMPLATES[kind](rng)
            if question in seen:
                continue
            seen.add(question)
            records.append({"id": f"{split}:{len(records)}:{kind}", "question": question,
                            "answer": str(answer), "template": kind})
        out[split] = shuffled(records, rng)
    return out


def arithmetic_gsm() -> Task:
    return Task(
        name="arithmetic_gsm",
        source=GeneratedSource(build_arithmetic_gsm),
        input_template="Question: {question}\n",
        target_template="#### {answer}",
        format=FormatSpec(pattern=r"#### (?P<answer>-?[0-9][0-9,]*)", mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="number"),
        instruction="Solve the math word problem. Reply with one line: '#### ' followed by the final answer "
                    "as a whole number, with no other text.",
        max_new_tokens=12,
        description="GSM8K-style one- and two-step word problems from ten seeded templates (shopping, "
                    "sharing, ages, speed, ...); answer '#### <number>'.",
    )


# --------------------------------------------------------------------------------------------------
# yes_no
# --------------------------------------------------------------------------------------------------


def build_yes_no(seed: int = 4567) -> Splits:
    """One true and one false question per fact, so every split is exactly balanced."""
    capitals, elements = capital_facts(), element_facts()
    groups: dict[str, list] = {}
    for f in capitals:
        groups.setdefault(f["group"], []).append(("capital", f))
    groups["element"] = [("element", e) for e in elements]
    split_facts = split_by_fact(groups, (0.55, 0.09), seed)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for split in SPLITS:
        records = []
        for kind, f in split_facts[split]:
            if kind == "capital":
                others = sorted({g["capital"] for _, g in groups[f["group"]]} - {f["capital"]})
                wrong = others[int(rng.integers(len(others)))]
                ask = f"Is {{}} the capital of {f['place']}?"
                true_value, key = f["capital"], f"{f['group']}:{f['name']}"
            else:
                others = sorted({e["symbol"] for e in elements} - {f["symbol"]})
                wrong = others[int(rng.integers(len(others)))]
                ask = f"Is {{}} the chemical symbol of {f['name']}?"
                true_value, key = f["symbol"], f"element:{f['number']}"
            records.append({"id": f"{key}:yes", "question": ask.format(true_value), "answer": "yes", "fact": key})
            records.append({"id": f"{key}:no", "question": ask.format(wrong), "answer": "no", "fact": key})
        out[split] = shuffled(records, rng)
    return out


def yes_no() -> Task:
    return Task(
        name="yes_no",
        source=GeneratedSource(build_yes_no),
        input_template="Question: {question}\n",
        target_template="Answer: {answer}",
        format=FormatSpec(pattern=r"Answer: (?P<answer>yes|no)", mode="strict", stop_sequences=("\n",),
                          ignore_case=True),
        answer=AnswerSpec(kind="yesno"),
        instruction="Answer the yes/no question. Reply with one line: 'Answer: yes' or 'Answer: no'.",
        max_new_tokens=8,
        description="Yes/no questions about capitals and chemical symbols, half true and half false; split by fact.",
    )


BUILTIN_TASKS = {"capitals_mc": capitals_mc, "capital_of": capital_of, "country_of_capital": country_of_capital,
                 "capital_of_options": capital_of_options, "continent_of": continent_of,
                 "element_symbols": element_symbols,
                 "arithmetic_gsm": arithmetic_gsm, "yes_no": yes_no}


def builtin_tasks() -> list[Task]:
    """Fresh Task objects for every built-in task (records are generated on first use)."""
    return [make() for make in BUILTIN_TASKS.values()]
