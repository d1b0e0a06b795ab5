"""The Task contract: parsers, answer judging, templates, few-shot prefixes, task files, registry."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spt_jax.errors import ConfigError, DataError, SptError
from spt_jax.tasks import (
    AnswerSpec,
    CsvSource,
    DataSource,
    FormatSpec,
    InMemorySource,
    JsonlSource,
    ParsedAnswer,
    Task,
    get_task,
    list_tasks,
    load_task_file,
    register_task,
)
from spt_jax.tasks.files import TfdsSource, tfds_value
from spt_jax.tasks.answers import normalize_text, parse_number

MC_PATTERN = r"Answer: (?P<answer>[A-D])"


def mc_records(n, start=0):
    return [{"id": f"q{i}", "question": f"Q{i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(start, start + n)]


def mc_task(train=10, validation=3, test=5, **overrides):
    kwargs = dict(
        name="toy_mc",
        source=InMemorySource({"train": mc_records(train), "validation": mc_records(validation, 100),
                               "test": mc_records(test, 200)}),
        input_template="Question: {question}\n{choices_text}\n",
        target_template="Answer: {answer}",
        format=FormatSpec(MC_PATTERN),
        answer=AnswerSpec("choice"),
        instruction="Reply 'Answer: ' and a letter.",
        choices_field="choices",
    )
    kwargs.update(overrides)
    return Task(**kwargs)


def qa_task(records, kind="string", answer_pattern=r"Answer: (?P<answer>.+)", **overrides):
    kwargs = dict(name="toy_qa", source=InMemorySource({"train": records, "validation": records, "test": records}),
                  input_template="Q: {question}\n", target_template="Answer: {answer}",
                  format=FormatSpec(answer_pattern), answer=AnswerSpec(kind))
    kwargs.update(overrides)
    return Task(**kwargs)


# --- FormatSpec ------------------------------------------------------------------------------------


def test_strict_mode_needs_the_whole_stop_cut_output():
    spec = FormatSpec(MC_PATTERN)
    assert spec.parse("Answer: B") == ParsedAnswer(True, "B")
    assert spec.parse("  Answer: C  \nmore text") == ParsedAnswer(True, "C")  # cut at \n, then stripped
    assert spec.parse("Answer: B because") == ParsedAnswer(False, None)
    assert spec.parse("B") == ParsedAnswer(False, None)
    assert spec.parse("The Answer: B") == ParsedAnswer(False, None)
    assert spec.parse("Answer: E") == ParsedAnswer(False, None)
    assert spec.parse("\nAnswer: B") == ParsedAnswer(False, None)  # nothing before the first stop
    assert spec.parse("") == ParsedAnswer(False, None)


def test_first_mode_takes_the_first_match_before_the_stop():
    spec = FormatSpec(MC_PATTERN, mode="first")
    assert spec.parse("I think Answer: B, not Answer: C") == ParsedAnswer(True, "B")
    assert spec.parse("no answer here\nAnswer: A") == ParsedAnswer(False, None)


def test_stop_sequences_cut_at_the_earliest_one():
    spec = FormatSpec(r"#### (?P<answer>-?[0-9][0-9,]*)", stop_sequences=("Question:", "\n\n"))
    assert spec.parse("#### 42\n\nQuestion: next") == ParsedAnswer(True, "42")
    assert spec.parse("#### 4Question: 2") == ParsedAnswer(True, "4")
    assert FormatSpec(MC_PATTERN, stop_sequences="\n").stop_sequences == ("\n",)
    assert FormatSpec(MC_PATTERN, stop_sequences=["\n", "."]).stop_sequences == ("\n", ".")


def test_ignore_case():
    assert FormatSpec(r"Answer: (?P<answer>yes|no)").parse("answer: YES").valid is False
    assert FormatSpec(r"Answer: (?P<answer>yes|no)", ignore_case=True).parse("answer: YES") == ParsedAnswer(True, "YES")


def test_empty_answer_group_is_invalid():
    assert FormatSpec(r"Answer:(?P<answer>.*)").parse("Answer:   ") == ParsedAnswer(False, None)


@pytest.mark.parametrize("pattern, text", [
    ("Answer: (?P<answer>[A-D]", "does not compile"),
    ("Answer: ([A-D])", "lacks the named group 'answer'"),
    ("", "non-empty"),
])
def test_bad_patterns_are_config_errors_naming_the_pattern(pattern, text):
    with pytest.raises(ConfigError, match=re.escape(text)) as e:
        FormatSpec(pattern)
    if pattern:
        assert repr(pattern) in str(e.value)


def test_bad_mode_and_stop_sequences():
    with pytest.raises(ConfigError, match="'strict' or 'first'"):
        FormatSpec(MC_PATTERN, mode="loose")
    with pytest.raises(ConfigError, match="non-empty strings"):
        FormatSpec(MC_PATTERN, stop_sequences=("",))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parse_never_raises_and_valid_means_a_match(text):
    for mode in ("strict", "first"):
        parsed = FormatSpec(MC_PATTERN, mode=mode).parse(text)
        assert parsed.valid == (parsed.answer is not None)
        if parsed.valid:
            assert parsed.answer in "ABCD"


# --- AnswerSpec ------------------------------------------------------------------------------------


def test_choice_kind_is_case_insensitive_letters():
    spec = AnswerSpec("choice")
    assert spec.is_correct("b", {}, "B") and spec.is_correct(" B ", {}, "B")
    assert not spec.is_correct("C", {}, "B")


def test_string_kind_normalizes_and_accepts_aliases():
    spec = AnswerSpec("string", aliases_field="aliases")
    record = {"aliases": ["aluminium", "Al"]}
    assert spec.is_correct("The  Aluminum!", record, "aluminum")
    assert spec.is_correct("ALUMINIUM.", record, "aluminum")
    assert spec.is_correct("al", record, "aluminum")
    assert not spec.is_correct("iron", record, "aluminum")
    assert spec.is_correct("Paris", {"aliases": "Paris, France"}, "paris")
    assert normalize_text("  The Eiffel-Tower, a landmark ") == "eiffeltower landmark"


def test_number_kind_strips_commas_dollars_and_trailing_dot():
    spec = AnswerSpec("number")
    assert spec.is_correct("1,234", {}, "1234")
    assert spec.is_correct("$42.", {}, "42")
    assert spec.is_correct("-7", {}, "-7.0")
    assert not spec.is_correct("43", {}, "42")
    assert not spec.is_correct("forty-two", {}, "42")
    assert AnswerSpec("number", tolerance=0.5).is_correct("42.4", {}, "42")
    assert parse_number("$1,000.") == 1000.0 and parse_number("nan") is None and parse_number(True) is None


def test_yesno_kind():
    spec = AnswerSpec("yesno")
    assert spec.is_correct("Yes", {}, "yes") and spec.is_correct("NO", {}, "no")
    assert not spec.is_correct("yes", {}, "no")


def test_bad_answer_specs():
    with pytest.raises(ConfigError, match="answer kind"):
        AnswerSpec("letters")
    with pytest.raises(ConfigError, match="aliases_field"):
        AnswerSpec("number", aliases_field="aliases")
    with pytest.raises(ConfigError, match="tolerance"):
        AnswerSpec("number", tolerance=-1)


@pytest.mark.parametrize("kind, value, choices, canonical", [
    ("choice", 1, ["a", "b", "c"], "B"), ("choice", "c", ["a", "b", "c"], "C"), ("choice", "2", ["a", "b", "c"], "C"),
    ("choice", "b", ["x", "b", "c"], "B"), ("number", 42, None, "42"), ("number", 2.5, None, "2.5"),
    ("number", "1,234", None, "1,234"), ("yesno", True, None, "yes"), ("yesno", "No", None, "no"),
    ("string", " Paris ", None, "Paris"), ("string", 1999, None, "1999"),
])
def test_canonical_gold(kind, value, choices, canonical):
    assert AnswerSpec(kind).canonical_gold(value, field="answer", choices=choices) == canonical


@pytest.mark.parametrize("kind, value, choices, expected", [
    ("choice", 4, ["a", "b", "c", "d"], "A-D or 0-3"), ("choice", "E", ["a", "b", "c", "d"], "expected a choice"),
    ("number", "twelve", None, "expected a number"), ("number", None, None, "expected a number"),
    ("yesno", "maybe", None, "expected yes/no"), ("string", "", None, "non-empty string"),
    ("string", ["a"], None, "non-empty string"),
])
def test_canonical_gold_rejects_wrong_types(kind, value, choices, expected):
    with pytest.raises(DataError, match=re.escape(expected)) as e:
        AnswerSpec(kind).canonical_gold(value, field="label", choices=choices, where="record 3")
    assert "'label'" in str(e.value) and "record 3" in str(e.value)


# --- Task: templates, records, errors --------------------------------------------------------------


def test_task_renders_inputs_targets_and_continuations():
    task = mc_task()
    record = task.records("test")[1]
    assert task.render_input(record) == "Question: Q201?\nA. w\nB. x\nC. y\nD. z\n"
    assert task.render_target(record) == "Answer: B"
    assert task.gold(record) == "B"
    assert task.choice_continuations(record) == (["Answer: A", "Answer: B", "Answer: C", "Answer: D"], 1)
    assert task.zero_shot_prompt(record) == "Reply 'Answer: ' and a letter.\n\n" + task.render_input(record)
    assert task.examples("validation")[0] == ("Question: Q100?\nA. w\nB. x\nC. y\nD. z\n", "Answer: A")
    assert task.stop_sequences == ("\n",)
    assert isinstance(task.source, DataSource)


def test_score_separates_validity_from_correctness():
    task = mc_task()
    record = task.records("test")[2]  # gold C
    assert task.score("Answer: C", record) == (ParsedAnswer(True, "C"), True)
    assert task.score("Answer: A", record) == (ParsedAnswer(True, "A"), False)
    assert task.score("C", record) == (ParsedAnswer(False, None), False)


def test_answer_field_other_than_answer():
    records = [{"q": "2+2?", "label": "4"}]
    task = qa_task(records, kind="number", input_template="Q: {q}\n", target_template="#### {label}",
                   answer_field="label", answer_pattern=r"#### (?P<answer>[0-9]+)")
    assert task.render_target(task.records("test")[0]) == "#### 4"
    assert task.score("#### 4", records[0])[1]


def test_missing_placeholder_names_placeholder_task_and_record():
    task = qa_task([{"id": "a", "question": "x", "answer": "y"}, {"id": "b", "answer": "z"}])
    with pytest.raises(DataError) as e:
        task.records("test")
    message = str(e.value)
    assert "{question}" in message and "'toy_qa'" in message and "test[1]" in message and "'b'" in message


def test_missing_placeholder_outside_a_split_names_the_record_id():
    task = qa_task([{"question": "x", "answer": "y"}], input_template="Q: {question} {context}\n")
    with pytest.raises(DataError, match=r"\{context\}.*id 'r9'"):
        task.render_input({"id": "r9", "question": "x", "answer": "y"})


def test_wrong_gold_types_name_the_field_and_record():
    task = qa_task([{"question": "x", "answer": "12"}, {"question": "y", "answer": "a dozen"}], kind="number")
    with pytest.raises(DataError, match=r"gold field 'answer'.*test\[1\].*expected a number"):
        task.records("test")
    bad_choice = mc_task(test=0, source=InMemorySource({"train": mc_records(2), "validation": mc_records(2),
                         "test": [{"question": "q", "choices": ["a", "b"], "answer": "C"}]}))
    with pytest.raises(DataError, match=r"gold field 'answer'.*test\[0\].*A-B"):
        bad_choice.records("test")
    missing_gold = qa_task([{"question": "x"}])
    with pytest.raises(DataError, match="gold field 'answer' is missing"):
        missing_gold.records("test")


def test_bad_choices_and_aliases_fields():
    bad = mc_task(source=InMemorySource({"test": [{"question": "q", "choices": "abcd", "answer": 0}]}))
    with pytest.raises(DataError, match="choices field 'choices'.*list of 2-26 strings"):
        bad.records("test")
    aliased = qa_task([{"question": "q", "answer": "a", "aka": 3}], answer=AnswerSpec("string", aliases_field="aka"))
    with pytest.raises(DataError, match="aliases field 'aka'.*list of strings"):
        aliased.records("test")


def test_templates_are_validated_at_construction():
    with pytest.raises(DataError, match="does not parse"):
        qa_task([], input_template="Q: {question\n")
    with pytest.raises(DataError, match="positional placeholder"):
        qa_task([], input_template="Q: {}\n")
    with pytest.raises(DataError, match="never uses"):
        qa_task([], target_template="Answer: yes")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        qa_task([], max_new_tokens=0)
    with pytest.raises(ConfigError, match="choices_field"):
        qa_task([], choices_field="choices")


def test_split_errors():
    task = mc_task(source=InMemorySource({"train": mc_records(3), "validation": [], "test": mc_records(3)}))
    with pytest.raises(DataError, match="task 'toy_mc': split 'validation' is empty"):
        task.records("validation")
    with pytest.raises(DataError, match="no split 'dev'"):
        task.records("dev")
    renamed = mc_task(split_names={"train": "train", "validation": "dev", "test": "test"})
    with pytest.raises(DataError, match="source split 'dev'.*available: train, validation, test"):
        renamed.records("validation")


def test_records_are_cached_and_copies_of_the_list():
    calls = []

    class CountingSource:
        splits = ("train", "validation", "test")

        def load(self, split):
            calls.append(split)
            return mc_records(4)

    task = mc_task(source=CountingSource())
    first = task.records("test")
    first.clear()
    assert len(task.records("test")) == 4 and calls == ["test"]


# --- few-shot --------------------------------------------------------------------------------------


def test_fewshot_prefix_is_deterministic_and_shaped():
    task = mc_task(train=10)
    prefix = task.fewshot_prefix(3, seed=7)
    assert prefix == task.fewshot_prefix(3, seed=7) == mc_task(train=10).fewshot_prefix(3, seed=7)
    assert prefix.startswith("Reply 'Answer: ' and a letter.\n\nQuestion: Q")
    assert prefix.endswith("\nAnswer: " + prefix[-3] + "\n\n")
    assert prefix.count("Question:") == 3 and len(set(re.findall(r"Q\d+\?", prefix))) == 3
    assert any(task.fewshot_prefix(3, seed=s) != prefix for s in range(1, 6))
    record = task.records("test")[0]
    assert task.fewshot_prefix(0, seed=1) + task.render_input(record) == task.zero_shot_prompt(record)
    assert task.fewshot_prefix(10, seed=0).count("Question:") == 10


def test_fewshot_errors():
    task = mc_task(train=4)
    with pytest.raises(DataError, match="5-shot needs 5 train records but the train split has only 4"):
        task.fewshot_prefix(5, seed=0)
    with pytest.raises(ConfigError, match="k must be an integer >= 0"):
        task.fewshot_prefix(-1, seed=0)
    no_instruction = mc_task(instruction="")
    assert no_instruction.fewshot_prefix(0, seed=0) == ""


# --- task files and local sources ------------------------------------------------------------------

YAML_TASK = """\
name: file_mc
instruction: "Reply with 'Answer: ' and a letter."
input_template: "Question: {question}\\n{choices_text}\\n"
target_template: "Answer: {answer}"
choices_field: choices
max_new_tokens: 8
split_names: {train: train, validation: dev, test: test}
format:
  pattern: 'Answer: (?P<answer>[A-D])'
  mode: strict
  stop_sequences: ["\\n"]
answer:
  kind: choice
source:
  type: csv
  path: "data/quiz_{split}.csv"
  fields:
    question: Question
    choices: [Opt1, Opt2, Opt3, Opt4]
    answer: Correct
"""


def write_csv_splits(folder, rows_per_split=3):
    data = folder / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "dev", "test"):
        lines = ["Question,Opt1,Opt2,Opt3,Opt4,Correct"]
        lines += [f'"{split} q{i}, really?",a,b,c,{"" if i == 0 else "d"},{"ABC"[i % 3]}'
                  for i in range(rows_per_split)]
        (data / f"quiz_{split}.csv").write_text("\n".join(lines) + "\n")


def test_yaml_task_file_over_csv(tmp_path):
    write_csv_splits(tmp_path)
    (tmp_path / "quiz.yaml").write_text(YAML_TASK)
    task = get_task(str(tmp_path / "quiz.yaml"))
    assert task.name == "file_mc" and task.max_new_tokens == 8
    records = task.records("validation")
    assert records[0]["choices"] == ["a", "b", "c"]  # the empty cell is dropped
    assert task.render_input(records[1]) == "Question: dev q1, really?\nA. a\nB. b\nC. c\nD. d\n"
    assert task.render_target(records[1]) == "Answer: B"
    assert task.score("Answer: B", records[1])[1]


def test_json_task_file_over_jsonl_with_nested_fields(tmp_path):
    rows = [{"q": {"text": f"capital {i}?"}, "a": "Paris", "more": ["Paris, France"]} for i in range(3)]
    for split in ("train", "validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    spec = {"name": "file_qa", "input_template": "Q: {question}\n", "target_template": "Answer: {answer}",
            "format": {"pattern": "Answer: (?P<answer>.+)"}, "answer": {"kind": "string", "aliases_field": "aliases"},
            "source": {"type": "jsonl", "paths": {s: f"{s}.jsonl" for s in ("train", "validation", "test")},
                       "fields": {"question": "q.text", "answer": "a", "aliases": "more"}}}
    (tmp_path / "qa.json").write_text(json.dumps(spec))
    task = load_task_file(tmp_path / "qa.json")
    record = task.records("test")[2]
    assert task.render_input(record) == "Q: capital 2?\n"
    assert task.score("Answer: paris, france.", record)[1] and not task.score("Answer: Lyon", record)[1]


def test_builtin_source_in_a_task_file(tmp_path):
    (tmp_path / "lenient.yaml").write_text(
        "name: capitals_lenient\ninput_template: \"Question: {question}\\n{choices_text}\\n\"\n"
        "target_template: 'Answer: {answer}'\nchoices_field: choices\n"
        "format: {pattern: '(?P<answer>[A-D])\\b', mode: first}\nanswer: {kind: choice}\n"
        "source: {type: builtin, name: capitals_mc}\n")
    task = load_task_file(tmp_path / "lenient.yaml")
    record = task.records("test")[0]
    assert task.score(f"I pick {task.gold(record)} here", record)[1]
    assert len(task.records("test")) == len(get_task("capitals_mc").records("test"))


def _write_task(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("edit, error, expected", [
    (lambda t: t.replace("max_new_tokens", "max_tokens"), ConfigError, "unknown field 'max_tokens' (did you mean 'max_new_tokens'?)"),
    (lambda t: t.replace("name: file_mc\n", ""), ConfigError, "missing required field 'name'"),
    (lambda t: t.replace("(?P<answer>[A-D])", "([A-D])"), ConfigError, "field 'format'"),
    (lambda t: t.replace("kind: choice", "kind: letters"), ConfigError, "field 'answer'"),
    (lambda t: t.replace("type: csv", "type: parquet"), ConfigError, "field 'source.type'"),
    (lambda t: t.replace("path: ", "pathz: "), ConfigError, "unknown field 'source.pathz'"),
    (lambda t: t.replace("data/quiz_{split}.csv", "data/quiz.csv"), ConfigError, "'source.path' must be a file name containing {split}"),
    (lambda t: t.replace("mode: strict", "mode: loose"), ConfigError, "'strict' or 'first'"),
    (lambda t: t.replace('"Question: {question}', '"Question: {question'), DataError, "does not parse"),
    (lambda t: re.sub(r"format:\n(  .*\n)+", "format: 3\n", t), ConfigError, "field 'format' must be a mapping"),
    (lambda t: t + "  bogus: [\n", ConfigError, "line "),
])
def test_bad_task_files_name_file_and_field(tmp_path, edit, error, expected):
    write_csv_splits(tmp_path)
    path = _write_task(tmp_path, edit(YAML_TASK))
    with pytest.raises(error) as e:
        load_task_file(path)
    assert expected in str(e.value) and str(path) in str(e.value)


def test_task_file_missing_or_wrong_suffix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task_file(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        load_task_file(_write_task(tmp_path, "name: x", "t.txt"))
    with pytest.raises(ConfigError, match=r"t\.json, line 2: malformed JSON"):
        load_task_file(_write_task(tmp_path, '{"name":\n ]', "t.json"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_task_file(_write_task(tmp_path, "- a\n- b\n"))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": \n')
    with pytest.raises(DataError, match=r"test\.jsonl, line 3: malformed JSON"):
        JsonlSource({"test": path}).load("test")
    path.write_text('{"question": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object"):
        JsonlSource({"test": path}).load("test")


def test_missing_mapped_field_names_field_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n{"a": "c"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl, line 2: field 'question' maps to column 'q'"):
        JsonlSource({"test": path}, fields={"question": "q"}).load("test")
    csv_path = tmp_path / "test.csv"
    csv_path.write_text("q,a\nx,y\n")
    with pytest.raises(DataError, match=r"test\.csv, line 2: field 'answer' maps to column 'gold'"):
        CsvSource({"test": csv_path}, fields={"answer": "gold"}).load("test")


def test_csv_source_errors_and_tsv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a\nx,y,z\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 2: more cells"):
        CsvSource({"test": bad}).load("test")
    bad.write_text("q,a\nx\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 2: fewer cells.*missing a"):
        CsvSource({"test": bad}).load("test")
    bad.write_text("")
    with pytest.raises(DataError, match="no header row"):
        CsvSource({"test": bad}).load("test")
    tsv = tmp_path / "data.tsv"
    tsv.write_text("q\ta\nx, y\tz\n")
    assert CsvSource({"test": tsv}).load("test") == [{"q": "x, y", "a": "z"}]
    with pytest.raises(DataError, match="does not exist"):
        CsvSource({"test": tmp_path / "none.csv"}).load("test")
    with pytest.raises(DataError, match="no data file for split 'train'"):
        CsvSource({"test": tsv}).load("train")


def test_tfds_source_converts_values_and_reports_unprepared_data(tmp_path):
    import numpy as np

    assert tfds_value({"q": b"caf\xc3\xa9", "n": np.int64(3), "c": np.array([b"a", b"b"]), "x": np.float32(0.5)}) == \
        {"q": "café", "n": 3, "c": ["a", "b"], "x": 0.5}
    with pytest.raises(DataError, match="TFDS dataset 'no_such_dataset_xyz' split 'test' is not readable"):
        TfdsSource("no_such_dataset_xyz", data_dir=str(tmp_path)).load("test")


# --- registry --------------------------------------------------------------------------------------


def test_registry_lookup_and_close_names(monkeypatch):
    import spt_jax.tasks as tasks_module

    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))  # leave no toy task behind
    # list_tasks() registers benchmarks into the copy; reset the flag so later tests register them again.
    monkeypatch.setattr(tasks_module, "_benchmarks_loaded", tasks_module._benchmarks_loaded)
    names = list_tasks()
    assert {"capitals_mc", "element_symbols", "arithmetic_gsm", "yes_no"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(DataError, match="unknown task 'capitals_m'.*did you mean 'capitals_mc'"):
        get_task("capitals_m")
    task = mc_task(name="test_registry_toy")
    assert register_task(task) is task and get_task("test_registry_toy") is task
    assert get_task(task) is task
    with pytest.raises(SptError):
        get_task("no_such_file.yaml")


def _fake_benchmarks(monkeypatch, **attrs):
    """Stand-in for spt_jax.tasks.benchmarks, so the lazy hook is tested whether or not the real one exists."""
    import importlib.machinery
    import sys
    import types

    import spt_jax.tasks as tasks_module

    name = "spt_jax.tasks.benchmarks"
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))
    monkeypatch.setattr(tasks_module, "_benchmarks_loaded", False)
    return tasks_module


def test_benchmarks_register_lazily_once(monkeypatch):
    calls = []

    def register_benchmarks():
        calls.append(1)
        register_task(mc_task(name="fake_bench"))

    tasks_module = _fake_benchmarks(monkeypatch, register_benchmarks=register_benchmarks)
    assert get_task("capitals_mc") and calls == []  # built-ins need no benchmark import
    assert get_task("fake_bench").name == "fake_bench" and calls == [1]
    assert "fake_bench" in tasks_module.list_tasks() and calls == [1]


def test_benchmarks_module_without_hook_or_absent(monkeypatch):
    tasks_module = _fake_benchmarks(monkeypatch)
    assert "fake_bench" not in tasks_module.list_tasks()
    monkeypatch.setattr(tasks_module, "_benchmarks_loaded", False)
    monkeypatch.setattr(tasks_module.importlib.util, "find_spec", lambda name: None)
    assert "capitals_mc" in tasks_module.list_tasks()


def test_task_file_examples_in_the_docs_build(tmp_path):
    from pathlib import Path

    import yaml

    from spt_jax.tasks import task_from_dict

    text = (Path(__file__).parents[1] / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    tasks = [task_from_dict(yaml.safe_load(b), base_dir=tmp_path, origin=f"docs block {i}") for i, b in enumerate(blocks)]
    assert [t.name for t in tasks[:3]] == ["my_quiz", "trivia_lite", "capitals_lenient"]
    assert tasks[0].split_names["validation"] == "dev" and tasks[0].max_new_tokens == 8
    lenient = tasks[2]
    record = lenient.records("test")[0]
    assert lenient.parse(f"({lenient.gold(record)}) is it").answer == lenient.gold(record)


def test_tasks_pickle_and_copy():
    import copy
    import pickle

    task = mc_task()
    task.records("test")
    for clone in (pickle.loads(pickle.dumps(task)), copy.deepcopy(task)):
        assert clone.records("test") == task.records("test")
        assert clone.fewshot_prefix(2, seed=4) == task.fewshot_prefix(2, seed=4)
        with pytest.raises(DataError, match="id 'zz'"):
            clone.render_input({"id": "zz", "choices": ["a", "b"]})


def test_records_carry_their_label_through_copies_and_pickles():
    import copy
    import pickle

    from spt_jax.tasks import Record

    task = mc_task()
    record = task.records("test")[3]
    assert isinstance(record, Record) and record.label == "test[3] (id 'q203')"
    assert record == mc_records(5, 200)[3] and record.get("id") == "q203"
    assert json.loads(json.dumps(dict(record))) == mc_records(5, 200)[3]
    with pytest.raises(AttributeError):
        record.label = "elsewhere"
    needs_context = mc_task(input_template="Question: {question} {context}\n")
    for clone in (pickle.loads(pickle.dumps(record)), copy.copy(record), copy.deepcopy(record),
                  pickle.loads(pickle.dumps(task)).records("test")[3]):
        assert clone == record and clone.label == record.label
        with pytest.raises(DataError, match=r"\{context\}.*record test\[3\] \(id 'q203'\)"):
            needs_context.render_input(clone)
    with pytest.raises(DataError, match=r"\{context\}.*record id 'q203';"):  # a plain dict: no position
        needs_context.render_input(dict(record))
