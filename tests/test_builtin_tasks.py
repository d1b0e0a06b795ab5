"""Built-in offline tasks: sizes, determinism, fact-disjoint splits, and gold targets that parse back
to the gold answer through each task's own parser (over every item, so format and template agree)."""

import collections
import csv
import re
from pathlib import Path

import pytest

import spt_jax.tasks as tasks_module
from spt_jax.cli_parser import DEFAULT_TASK
from spt_jax.tasks import get_task
from spt_jax.tasks.builtin import (
    ARITHMETIC_TEMPLATES,
    BUILTIN_TASKS,
    CONTINENTS,
    build_arithmetic_gsm,
    build_capitals_mc,
    builtin_tasks,
)

SPLITS = ("train", "validation", "test")
DATA = Path(tasks_module.__file__).parent / "data"
SIZES = {
    "capitals_mc": {"train": 138, "validation": 50, "test": 304},
    "capital_of": {"train": 69, "validation": 25, "test": 152},
    "country_of_capital": {"train": 69, "validation": 25, "test": 152},
    "capital_of_options": {"train": 69, "validation": 25, "test": 152},
    "continent_of": {"train": 57, "validation": 17, "test": 108},
    "element_symbols": {"train": 116, "validation": 52, "test": 304},
    "arithmetic_gsm": {"train": 200, "validation": 60, "test": 400},
    "yes_no": {"train": 260, "validation": 66, "test": 402},
}


def read_csv(name):
    with open(DATA / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


CAPITALS = {(r["group"], r["name"]): r["capital"] for r in read_csv("capitals.csv")}
ELEMENTS = {int(r["number"]): r for r in read_csv("elements.csv")}


@pytest.fixture(scope="module", params=sorted(BUILTIN_TASKS))
def task(request):
    return get_task(request.param)


def test_all_builtins_are_registered():
    assert set(BUILTIN_TASKS) <= set(tasks_module.list_tasks())


def test_split_sizes(task):
    sizes = {s: len(task.records(s)) for s in SPLITS}
    assert sizes == SIZES[task.name]
    one_per_fact = ("capital_of", "country_of_capital", "capital_of_options")  # half of capitals_mc
    if task.name in one_per_fact:
        assert sizes["test"] >= 150 and sizes["train"] >= 60 and sizes["validation"] >= 25
    elif task.name == "continent_of":  # one question per country
        assert sizes["test"] >= 100 and sizes["train"] >= 50 and sizes["validation"] >= 15
    else:
        assert sizes["test"] >= 300 and sizes["train"] >= 100 and sizes["validation"] >= 50


def test_generation_settings_and_instruction(task):
    assert task.stop_sequences == ("\n",)
    assert 8 <= task.max_new_tokens <= 16
    assert task.max_new_tokens == {"arithmetic_gsm": 12, "element_symbols": 10, "capital_of": 12,
                                   "country_of_capital": 12, "capital_of_options": 12}.get(task.name, 8)
    assert "Reply with one line" in task.instruction
    assert ("'#### '" if task.name == "arithmetic_gsm" else "'Answer: ") in task.instruction
    assert task.description


def test_deterministic_across_fresh_tasks(task):
    fresh = {t.name: t for t in builtin_tasks()}[task.name]
    assert fresh is not task
    for split in SPLITS:
        assert fresh.records(split) == task.records(split)
    assert fresh.fewshot_prefix(5, seed=3) == task.fewshot_prefix(5, seed=3)


def test_seed_changes_the_data():
    assert build_capitals_mc(seed=1)["test"] != build_capitals_mc()["test"]
    assert build_arithmetic_gsm(seed=1)["test"] != build_arithmetic_gsm()["test"]


def test_ids_are_unique_across_splits(task):
    ids = [r["id"] for s in SPLITS for r in task.records(s)]
    assert len(ids) == len(set(ids))


def test_gold_targets_round_trip_through_the_parser_for_every_item(task):
    for split in SPLITS:
        for record in task.records(split):
            target = task.render_target(record)
            parsed = task.parse(target)
            assert parsed.valid, (split, record["id"], target)
            assert task.answer.is_correct(parsed.answer, record, task.gold(record)), (record["id"], target)
            assert task.score(target + "\nQuestion: next one", record) == (parsed, True)
            assert task.score(" " + target + " ", record)[1]


def test_wrong_answers_are_scored_wrong(task):
    alternatives = {"capitals_mc": "ABCD", "yes_no": ("yes", "no")}
    for record in task.records("test")[:50]:
        gold = task.gold(record)
        if task.name in alternatives:
            wrong = next(a for a in alternatives[task.name] if a != gold)
            output = task.target_template.format(answer=wrong)
        elif task.name == "arithmetic_gsm":
            output = f"#### {int(gold) + 1}"
        else:
            output = "Answer: Xx" if gold.lower() != "xx" else "Answer: Yy"
        parsed, correct = task.score(output, record)
        assert parsed.valid and not correct, (record["id"], output)


def test_fewshot_prefix_demonstrates_the_format(task):
    prefix = task.fewshot_prefix(5, seed=0)
    assert prefix.startswith(task.instruction + "\n\n")
    assert prefix.count("Question: ") == 5 and prefix.endswith("\n\n")
    demos = prefix[len(task.instruction) + 2:-2].split("\n\n")
    assert len(demos) == 5 and all(task.parse(d.rsplit("\n", 1)[1]).valid for d in demos)


# --- capitals_mc -----------------------------------------------------------------------------------


def fact_of(record_id):
    return record_id.rsplit(":", 1)[0]


def test_capitals_facts_are_disjoint_between_splits():
    task = get_task("capitals_mc")
    facts = {s: {fact_of(r["id"]) for r in task.records(s)} for s in SPLITS}
    assert not facts["train"] & facts["test"] and not facts["validation"] & facts["test"]
    assert not facts["train"] & facts["validation"]
    assert sum(map(len, facts.values())) == len(CAPITALS)
    for split in SPLITS:  # every group is represented in every split
        assert {f.split(":")[0] for f in facts[split]} == {"country", "us_state", "ca_province", "au_state"}


def test_capitals_mc_gold_choice_is_the_true_fact():
    task = get_task("capitals_mc")
    for split in SPLITS:
        letters = collections.Counter()
        for r in task.records(split):
            group, name, direction = r["id"].split(":")
            choices, gold = r["choices"], task.gold(r)
            letters[gold] += 1
            assert len(choices) == 4 == len(set(choices))
            right = choices["ABCD".index(gold)]
            same_group_capitals = {c for (g, _), c in CAPITALS.items() if g == group}
            same_group_names = {n for (g, n) in CAPITALS if g == group}
            if direction == "capital_of":
                assert right == CAPITALS[group, name] and name in r["question"]
                assert set(choices) <= same_group_capitals
            else:
                assert right == name and r["question"].startswith(CAPITALS[group, name] + " is the capital of")
                assert set(choices) <= same_group_names
                assert [c for c in choices if CAPITALS[group, c] == CAPITALS[group, name]] == [name]
            continuations, index = task.choice_continuations(r)
            assert continuations[index] == task.render_target(r)
        assert max(letters.values()) - min(letters.values()) <= 1, (split, letters)


def test_well_known_capitals():
    for place, capital in [(("country", "France"), "Paris"), (("country", "Japan"), "Tokyo"),
                           (("country", "Australia"), "Canberra"), (("country", "Canada"), "Ottawa"),
                           (("country", "Brazil"), "Brasília"), (("country", "Egypt"), "Cairo"),
                           (("us_state", "Texas"), "Austin"), (("us_state", "California"), "Sacramento"),
                           (("ca_province", "Ontario"), "Toronto"), (("au_state", "Victoria"), "Melbourne")]:
        assert CAPITALS[place] == capital
    assert len([k for k in CAPITALS if k[0] == "country"]) >= 170


def test_georgia_the_country_is_not_confused_with_the_state():
    task = get_task("capitals_mc")
    questions = [r["question"] for s in SPLITS for r in task.records(s) if r["id"].startswith("country:Georgia:")]
    assert sorted(questions) == ["Tbilisi is the capital of which country?",
                                 "What is the capital of the country of Georgia?"]


def test_the_default_task_reference_chooses_among_places_of_the_kind_asked():
    """The default run's CF reference picks among four places of the group the question names, the
    gold one of them, after the bare question -- what its generation modes answer."""
    task = get_task(DEFAULT_TASK)
    assert task.name == "country_of_capital"
    for r in task.records("test"):
        pairs, gold = task.cloze_pairs(r)
        assert pairs[gold][1] == " " + task.gold(r) and len({x for _, x in pairs}) == 4
        assert all((r["group"], x.strip()) in CAPITALS for _, x in pairs)
        assert {c for c, _ in pairs} == {f"Question: {r['question']}\nAnswer:"}


# --- continent_of ----------------------------------------------------------------------------------

CONTINENT_OF = {r["country"]: r["continent"] for r in read_csv("continents.csv")}


def test_continents_data_is_right():
    assert set(CONTINENT_OF.values()) == set(CONTINENTS) and len(CONTINENT_OF) >= 180
    for country, continent in [("Kenya", "Africa"), ("South Africa", "Africa"), ("Morocco", "Africa"),
                               ("Japan", "Asia"), ("India", "Asia"), ("Saudi Arabia", "Asia"), ("France", "Europe"),
                               ("Iceland", "Europe"), ("Ukraine", "Europe"), ("Mexico", "North America"),
                               ("Jamaica", "North America"), ("Panama", "North America"), ("Brazil", "South America"),
                               ("Chile", "South America"), ("Australia", "Oceania"), ("Fiji", "Oceania")]:
        assert CONTINENT_OF[country] == continent
    # countries across two continents are left out rather than given one of them
    assert not {"Russia", "Turkey", "Egypt", "Kazakhstan", "Georgia", "Azerbaijan", "Indonesia"} & set(CONTINENT_OF)


def test_continent_questions_ask_every_country_once_with_all_six_choices():
    task = get_task("continent_of")
    asked = collections.Counter()
    for split in SPLITS:
        golds = set()
        for r in task.records(split):
            country = r["id"].split(":", 1)[1]
            asked[country] += 1
            assert task.gold(r) == CONTINENT_OF[country] and country in r["question"]
            assert r["choices"] == list(CONTINENTS)  # the CF reference scores every possible answer
            pairs, gold = task.cloze_pairs(r)
            assert pairs[gold][1] == " " + CONTINENT_OF[country]
            golds.add(task.gold(r))
        assert golds == set(CONTINENTS), split  # every continent in every split
    assert set(asked) == set(CONTINENT_OF) and set(asked.values()) == {1}


def test_continent_answers_are_names_not_sentences():
    task = get_task("continent_of")
    fiji = next(r for s in SPLITS for r in task.records(s) if r["id"] == "continent:Fiji")
    gambia = next(r for s in SPLITS for r in task.records(s) if r["id"] == "continent:Gambia")
    assert gambia["question"] == "On which continent is the Gambia?"
    assert task.score("Answer: Oceania.", fiji)[1] and task.score("Answer: Australia", fiji)[1]
    assert task.score("Answer: Africa", gambia)[1] and not task.score("Answer: Asia", gambia)[1]
    assert not task.score("Answer: The Gambia is in Africa.", gambia)[0].valid


# --- element_symbols -------------------------------------------------------------------------------


def test_elements_data_is_right():
    assert sorted(ELEMENTS) == list(range(1, 119))
    assert len({e["symbol"] for e in ELEMENTS.values()}) == 118
    for number, symbol, name in [(1, "H", "hydrogen"), (6, "C", "carbon"), (11, "Na", "sodium"), (19, "K", "potassium"),
                                 (26, "Fe", "iron"), (29, "Cu", "copper"), (47, "Ag", "silver"), (50, "Sn", "tin"),
                                 (74, "W", "tungsten"), (79, "Au", "gold"), (80, "Hg", "mercury"), (82, "Pb", "lead"),
                                 (92, "U", "uranium"), (118, "Og", "oganesson")]:
        assert (ELEMENTS[number]["symbol"], ELEMENTS[number]["name"]) == (symbol, name)


def test_element_questions_are_correct_and_split_by_element():
    task = get_task("element_symbols")
    seen = {}
    for split in SPLITS:
        kinds = collections.Counter()
        for r in task.records(split):
            _, number, kind = r["id"].split(":")
            e = ELEMENTS[int(number)]
            assert seen.setdefault(number, split) == split  # one element, one split
            kinds[kind] += 1
            expected = {"symbol": e["symbol"], "name_from_symbol": e["name"], "name_from_number": e["name"],
                        "number": number}[kind]
            assert task.gold(r) == expected
            assert (e["name"] in r["question"]) or (e["symbol"] in r["question"]) or (number in r["question"])
        assert len(set(kinds.values())) == 1 and len(kinds) == 4
    assert len(seen) == 118


def test_element_aliases_are_accepted():
    task = get_task("element_symbols")
    record = next(r for s in SPLITS for r in task.records(s) if r["id"] == "element:13:name_from_symbol")
    assert task.score("Answer: aluminium", record)[1] and task.score("Answer: Aluminum", record)[1]
    assert not task.score("Answer: Al", record)[1]


# --- arithmetic_gsm --------------------------------------------------------------------------------

SOLVERS = {
    "shopping": (r"buys (\d+) \w+ at \$(\d+) each and pays with a \$(\d+) bill", lambda a, b, c: c - a * b),
    "sharing": (r"has (\d+) \w+ and shares them equally among (\d+) friends", lambda a, b: a / b),
    "ages": (r"is (\d+) years old\. \w+ is (\d+) years older than \w+\. How old will \w+ be in (\d+) years",
             lambda a, b, c: a + b + c),
    "speed": (r"at (\d+) miles per hour for (\d+) hours", lambda a, b: a * b),
    "savings": (r"saves \$(\d+) every week for (\d+) weeks, then spends \$(\d+)", lambda a, b, c: a * b - c),
    "reading": (r"has (\d+) pages\. \w+ reads (\d+) pages a day for (\d+) days", lambda a, b, c: a - b * c),
    "baking": (r"bakes (\d+) trays of cookies with (\d+) cookies on each tray, and eats (\d+)",
               lambda a, b, c: a * b - c),
    "garden": (r"has (\d+) rows of \w+ with (\d+) plants in each row\. \w+ plants (\d+) more",
               lambda a, b, c: a * b + c),
    "stationery": (r"buys (\d+) pens for \$(\d+) each and (\d+) notebooks for \$(\d+) each",
                   lambda a, b, c, d: a * b + c * d),
    "groups": (r"There are (\d+) students in a class\. (\d+) more students join, and then the class is split "
               r"into (\d+) equal groups", lambda a, b, c: (a + b) / c),
}


def test_arithmetic_answers_are_right():
    assert set(SOLVERS) == set(ARITHMETIC_TEMPLATES)
    task = get_task("arithmetic_gsm")
    questions = {}
    for split in SPLITS:
        templates = collections.Counter()
        for r in task.records(split):
            pattern, solve = SOLVERS[r["template"]]
            match = re.search(pattern, r["question"])
            assert match, r["question"]
            expected = solve(*map(int, match.groups()))
            assert expected == int(expected) and 0 < expected < 1000, r["question"]
            assert task.gold(r) == str(int(expected))
            assert r["question"].endswith("?")
            templates[r["template"]] += 1
            questions[r["question"]] = questions.get(r["question"], 0) + 1
        assert set(templates) == set(SOLVERS) and max(templates.values()) - min(templates.values()) <= 1
    assert max(questions.values()) == 1  # no question twice, within or across splits


def test_arithmetic_number_comparison():
    task = get_task("arithmetic_gsm")
    record = next(r for r in task.records("test") if int(r["answer"]) >= 10)
    gold = int(record["answer"])
    assert task.score(f"#### {gold:,}", record)[1]
    assert not task.score(f"The answer is {gold}", record)[0].valid
    assert not task.score(f"#### {gold} dollars", record)[0].valid


# --- yes_no ----------------------------------------------------------------------------------------


def test_yes_no_is_balanced_true_and_split_by_fact():
    task = get_task("yes_no")
    owner = {}
    for split in SPLITS:
        records = task.records(split)
        answers = collections.Counter(task.gold(r) for r in records)
        assert answers["yes"] == answers["no"] == len(records) // 2
        for r in records:
            assert owner.setdefault(r["fact"], split) == split
            kind, key = r["fact"].split(":", 1)
            if kind == "element":
                e = ELEMENTS[int(key)]
                truth = r["question"] == f"Is {e['symbol']} the chemical symbol of {e['name']}?"
                assert r["question"].endswith(f"the chemical symbol of {e['name']}?")
            else:
                capital = CAPITALS[kind, key]
                truth = r["question"].startswith(f"Is {capital} the capital of ")
                assert key in r["question"]
            assert task.gold(r) == ("yes" if truth else "no"), r
    assert len(owner) == len(CAPITALS) + len(ELEMENTS)


def test_yes_no_parser_is_case_insensitive():
    task = get_task("yes_no")
    record = next(r for r in task.records("test") if r["answer"] == "yes")
    assert task.score("Answer: Yes", record)[1] and task.score("ANSWER: YES", record)[1]
    assert not task.score("Yes", record)[0].valid
