"""The Task contract: records in, prompts and required-format targets out, a pure parser back.

A task keeps three things apart that evaluation must not mix up: how a question is shown
(``input_template``), the exact output format the model must produce (``target_template`` and
``FormatSpec``, which must agree), and how a parsed answer is judged (``AnswerSpec``). Format validity
(did the output parse?) and correctness (was the parsed answer right?) are therefore separate facts.

Template fields are the record's fields plus two derived ones:
``{answer}`` (target template only) is the canonical gold answer -- the letter for multiple choice --
and ``{choices_text}`` is the lettered choice list ("A. ...\\nB. ...") when ``choices_field`` is set.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from spt_jax.errors import ConfigError, DataError
from spt_jax.tasks.answers import INVALID, LETTERS, AnswerSpec, FormatSpec, ParsedAnswer, normalize_text

SPLITS = ("train", "validation", "test")

# --------------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class DataSource(Protocol):
    """Anything that yields flat-dict records per split (files, TFDS, generated data)."""

    splits: tuple[str, ...]

    def load(self, split: str) -> list[dict]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class InMemorySource:
    """Records already in memory, one list per split (tests, generated tasks, adapters)."""

    data: Mapping[str, Sequence[dict]] = dataclasses.field(repr=False)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.data)

    def load(self, split: str) -> list[dict]:
        if split not in self.data:
            raise DataError(f"no split {split!r} in memory; available: {', '.join(self.data) or 'none'}")
        return [dict(r) for r in self.data[split]]


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------

_FORMATTER = string.Formatter()


def template_fields(template: str, *, what: str = "template") -> set[str]:
    """Root field names a str.format template uses; DataError if it does not parse."""
    if not isinstance(template, str):
        raise DataError(f"{what} must be a string, got {type(template).__name__}")
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as e:
        raise DataError(f"{what} {template!r} does not parse as a str.format template: {e}") from None
    fields = set()
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root == "" or root.isdigit():
            raise DataError(f"{what} {template!r} has a positional placeholder {{{name}}}; use named fields")
        fields.add(root)
        if spec and "{" in spec:
            fields |= template_fields(spec, what=what)
    return fields


def render_template(template: str, fields: Mapping, *, what: str, where: str) -> str:
    """str.format over a record; a missing placeholder names itself, the task and the record."""
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise DataError(f"{what} placeholder {{{e.args[0]}}} has no field in {where}; "
                        f"record fields: {', '.join(sorted(map(str, fields))) or 'none'}") from None
    except (IndexError, AttributeError, ValueError, TypeError) as e:
        raise DataError(f"{what} {template!r} cannot render {where}: {e}") from None


def choices_text(choices: Sequence[str]) -> str:
    """'A. first\\nB. second...' (no trailing newline)."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClozeSpec:
    """The cloze formulation (OLMES's CF): each choice's own text scored as the continuation of the
    question without the lettered list, so a model that knows the answer but not the letters shows it.

    ``context_template`` renders the question (e.g. ``"Question: {question}\nAnswer:"``) and
    ``continuation_template`` each choice (``" {choice}"``). ``pairs``, when given, replaces both
    with a benchmark's own construction, ``record -> [(context, continuation), ...]`` (Winogrande's
    partial scoring: the option fills the blank in the context, only the text after it is scored).
    """

    context_template: str = "Question: {question}\nAnswer:"
    continuation_template: str = " {choice}"
    choices_field: str = "choices"
    pairs: Callable[[Mapping], list[tuple[str, str]]] | None = None


@dataclasses.dataclass(frozen=True)
class FewShotForm:
    """lm-evaluation-harness's k-shot settings of a task (`spt_jax.tasks.lm_eval_forms`): its
    description (MMLU's subject sentence, ending in its own blank line), its sampler ("default":
    seeded random per item; "first_n"), the split demonstrations come from, the demo delimiter. The
    target delimiter is part of each task's target and continuation templates (" {answer}")."""

    description: str = ""
    sampler: Literal["default", "first_n"] = "default"
    fewshot_split: str = "train"
    fewshot_delimiter: str = "\n\n"

    def __post_init__(self):
        if self.sampler not in ("default", "first_n"):
            raise ConfigError(f"few-shot sampler must be 'default' or 'first_n', got {self.sampler!r}")


class Record(dict):
    """A task record: a plain dict of its fields, plus a read-only ``label`` saying where it came from.

    The label ("test[3] (id 'q7')") lets error messages name the record; it travels with the record
    through copies and pickles (never through ``dict(record)``), so no table keyed by object id is needed.
    """

    __slots__ = ("_label",)

    def __init__(self, fields: Mapping, label: str):
        super().__init__(fields)
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    def __reduce__(self):
        return (Record, (dict(self), self._label))


# --------------------------------------------------------------------------------------------------
# Task
# --------------------------------------------------------------------------------------------------

_DEFAULT_SPLIT_NAMES = {s: s for s in SPLITS}


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One benchmark: its records, how they are shown, the required answer format and its judge.

    Compared by identity (``eq=False``): a task holds a data source and a record cache.
    """

    name: str
    source: DataSource
    input_template: str
    target_template: str
    format: FormatSpec
    answer: AnswerSpec
    instruction: str = ""
    answer_field: str = "answer"
    choices_field: str | None = None
    max_new_tokens: int = 16
    fewshot_separator: str = "\n\n"
    split_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(_DEFAULT_SPLIT_NAMES))
    description: str = ""
    cloze: ClozeSpec | None = None  # how the format-free cloze reference reads this task (None: no CF)
    lm_eval: FewShotForm = FewShotForm()  # lm-eval's k-shot form of this task
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"task name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.format, FormatSpec):
            raise ConfigError(f"task {self.name!r}: format must be a FormatSpec, got {type(self.format).__name__}")
        if not isinstance(self.answer, AnswerSpec):
            raise ConfigError(f"task {self.name!r}: answer must be an AnswerSpec, got {type(self.answer).__name__}")
        if not (callable(getattr(self.source, "load", None)) and hasattr(self.source, "splits")):
            raise ConfigError(f"task {self.name!r}: source must have load(split) and splits, got {self.source!r}")
        for attr in ("instruction", "answer_field", "fewshot_separator", "description"):
            if not isinstance(getattr(self, attr), str):
                raise ConfigError(f"task {self.name!r}: {attr} must be a string, got {getattr(self, attr)!r}")
        if not self.answer_field:
            raise ConfigError(f"task {self.name!r}: answer_field must be a non-empty field name")
        if self.choices_field is not None and not isinstance(self.choices_field, str):
            raise ConfigError(f"task {self.name!r}: choices_field must be a field name, got {self.choices_field!r}")
        if self.choices_field is not None and self.answer.kind != "choice":
            raise ConfigError(f"task {self.name!r}: choices_field is set but the answer kind is {self.answer.kind!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"task {self.name!r}: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.split_names, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.split_names.items()
        ):
            raise ConfigError(f"task {self.name!r}: split_names must map split names to source split names")
        object.__setattr__(self, "split_names", dict(self.split_names))  # a private copy (picklable, unlike a proxy)
        template_fields(self.input_template, what=f"task {self.name!r} input_template")
        target_fields = template_fields(self.target_template, what=f"task {self.name!r} target_template")
        if not target_fields & {"answer", self.answer_field}:
            raise DataError(f"task {self.name!r} target_template {self.target_template!r} never uses "
                            f"{{answer}}, so every target would be the same")

    # --- records -----------------------------------------------------------------------------------

    def records(self, split: str) -> list[Record]:
        """The split's records (loaded once, each checked to render; shared, do not mutate).

        Each is a `Record`: its fields, labelled with its place in the split for error messages.
        DataError if the split is unknown, absent from the data or empty, or a record cannot render.
        """
        if split not in self._cache:
            self._cache[split] = [self._checked(record) for record in self._labelled(split)]
        return list(self._cache[split])

    def _labelled(self, split: str) -> list[Record]:
        """The source's records of ``split`` as `Record`s labelled ``split[i]`` (and their id)."""
        if split not in self.split_names:
            raise DataError(f"task {self.name!r} has no split {split!r}; "
                            f"splits: {', '.join(self.split_names)}")
        source_split = self.split_names[split]
        splits = tuple(self.source.splits)
        if source_split not in splits:
            raise DataError(f"task {self.name!r}: split {split!r} (source split {source_split!r}) is not "
                            f"in its data; available: {', '.join(splits) or 'none'}")
        loaded = self.source.load(source_split)
        if not loaded:
            raise DataError(f"task {self.name!r}: split {split!r} is empty")
        for i, record in enumerate(loaded):
            if not isinstance(record, Mapping):
                raise DataError(f"task {self.name!r}: {split} record {i} is a {type(record).__name__}, "
                                "expected a dict of fields")
        return [Record(record, _record_label(record, f"{split}[{i}]")) for i, record in enumerate(loaded)]

    def _checked(self, record: Record) -> Record:
        """``record`` after checking that it renders and that its own target is judged a correct
        answer (DataError naming it if not: a task its format rejects could never score)."""
        self.render_input(record)
        self.answer.aliases(record, where=self._describe(record))
        self._check_target_scores(record)
        return record

    def _check_target_scores(self, record: Record) -> None:
        target = self.render_target(record)
        parsed, correct = self.score(target, record)
        if not correct:
            why = "does not match" if not parsed.valid else f"parses as {parsed.answer!r}, not the gold {self.gold(record)!r}, under"
            raise DataError(
                f"{self._describe(record)}: its target {target!r} (target_template {self.target_template!r}) "
                f"{why} the task's format (pattern {self.format.pattern!r}, {self.format.mode}); fix "
                "target_template or format.pattern so that every gold target is a valid, correct answer")

    def _describe(self, record: Mapping) -> str:
        label = record.label if isinstance(record, Record) else _record_label(record, None)
        return f"task {self.name!r}, record {label}"

    def _choices(self, record: Mapping) -> list[str] | None:
        if self.choices_field is None:
            return None
        if self.choices_field not in record:
            raise DataError(f"choices field {self.choices_field!r} is missing in {self._describe(record)}")
        choices = record[self.choices_field]
        if (not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS)
                or not all(isinstance(c, str) for c in choices)):
            raise DataError(f"choices field {self.choices_field!r} in {self._describe(record)} is {choices!r}, "
                            f"expected a list of 2-{len(LETTERS)} strings")
        return list(choices)

    def _input_fields(self, record: Mapping) -> dict:
        fields = dict(record)
        choices = self._choices(record)
        if choices is not None and "choices_text" not in fields:
            fields["choices_text"] = choices_text(choices)
        return fields

    # --- rendering ---------------------------------------------------------------------------------

    def render_input(self, record: Mapping) -> str:
        return render_template(self.input_template, self._input_fields(record),
                               what="input_template", where=self._describe(record))

    def gold(self, record: Mapping) -> str:
        if self.answer_field not in record:
            raise DataError(f"gold field {self.answer_field!r} is missing in {self._describe(record)}")
        return self.answer.canonical_gold(record[self.answer_field], field=self.answer_field,
                                          choices=self._choices(record), where=self._describe(record))

    def _render_target_with(self, record: Mapping, answer: str) -> str:
        fields = self._input_fields(record)
        fields["answer"] = answer
        fields[self.answer_field] = answer
        return render_template(self.target_template, fields, what="target_template",
                               where=self._describe(record))

    def render_target(self, record: Mapping) -> str:
        return self._render_target_with(record, self.gold(record))

    def examples(self, split: str) -> list[tuple[str, str]]:
        return [(self.render_input(r), self.render_target(r)) for r in self.records(split)]

    # --- prompts -----------------------------------------------------------------------------------

    def _instruction_block(self) -> str:
        return self.instruction + self.fewshot_separator if self.instruction else ""

    def zero_shot_prompt(self, record: Mapping) -> str:
        return self._instruction_block() + self.render_input(record)

    def fewshot_prefix(self, k: int, seed: int) -> str:
        """Instruction + k seeded train demos + separator: one prefix shared by every test item."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ConfigError(f"few-shot k must be an integer >= 0, got {k!r}")
        if k == 0:
            return self._instruction_block()
        train = self.records("train")
        if k > len(train):
            raise DataError(f"task {self.name!r}: {k}-shot needs {k} train records but the train split "
                            f"has only {len(train)}")
        picks = np.random.default_rng(seed).choice(len(train), size=int(k), replace=False)
        demos = [self.render_input(train[i]) + self.render_target(train[i]) for i in picks]
        return self._instruction_block() + self.fewshot_separator.join(demos) + self.fewshot_separator

    # --- judging -----------------------------------------------------------------------------------

    def parse(self, output: str) -> ParsedAnswer:
        return self.format.parse(output)

    def score(self, output: str, record: Mapping) -> tuple[ParsedAnswer, bool]:
        parsed = self.parse(output)
        if parsed.valid and self.is_multiple_choice:
            letters = LETTERS[: len(self._choices(record))]  # "E" is no answer to a four-choice item
            if parsed.answer.strip().upper() not in letters:
                parsed = INVALID
        correct = parsed.valid and self.answer.is_correct(parsed.answer, record, self.gold(record))
        return parsed, bool(correct)

    def cloze_pairs(self, record: Mapping) -> tuple[list[tuple[str, str]], int]:
        """The cloze reference's (context, continuation) per choice, and the gold choice's index."""
        if self.cloze is None:
            raise DataError(f"task {self.name!r} has no cloze formulation (Task.cloze)")
        spec = self.cloze
        choices = record.get(spec.choices_field)
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"cloze choices field {spec.choices_field!r} in {self._describe(record)} is "
                            f"{choices!r}, expected a list of at least 2 strings")
        if spec.pairs is not None:
            pairs = list(spec.pairs(record))
        else:
            fields = self._input_fields(record)
            context = render_template(spec.context_template, fields, what="cloze context_template",
                                      where=self._describe(record))
            pairs = [(context, render_template(spec.continuation_template, {**fields, "choice": c},
                                               what="cloze continuation_template", where=self._describe(record)))
                     for c in choices]
        gold = self.gold(record)
        if self.answer.kind == "choice":
            index = LETTERS.index(gold)
        else:
            accepted = {normalize_text(g) for g in [gold, *self.answer.aliases(record)]}
            matches = [i for i, c in enumerate(choices) if normalize_text(c) in accepted]
            if len(matches) != 1:
                raise DataError(f"{self._describe(record)}: the gold answer {gold!r} must be exactly one of the "
                                f"cloze choices {list(choices)!r}")
            index = matches[0]
        return pairs, index

    def choice_continuations(self, record: Mapping) -> tuple[list[str], int]:
        """Each choice's target string (render_target with that letter) and the gold index."""
        if self.answer.kind != "choice" or self.choices_field is None:
            raise DataError(f"task {self.name!r} is not multiple choice (needs answer kind 'choice' "
                            "and a choices_field)")
        choices = self._choices(record)
        letters = [LETTERS[i] for i in range(len(choices))]
        gold = self.gold(record)
        return [self._render_target_with(record, letter) for letter in letters], letters.index(gold)

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return self.format.stop_sequences

    @property
    def is_multiple_choice(self) -> bool:
        return self.answer.kind == "choice" and self.choices_field is not None


def _record_label(record: Mapping, position: str | None) -> str:
    rid = record.get("id") if isinstance(record, Mapping) else None
    if position and rid is not None:
        return f"{position} (id {rid!r})"
    if position:
        return position
    if rid is not None:
        return f"id {rid!r}"
    text = repr(dict(record)) if isinstance(record, Mapping) else repr(record)
    return text if len(text) <= 80 else text[:77] + "..."
