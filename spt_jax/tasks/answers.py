"""A task's required output format and its judge: parse an output, compare the answer with the gold.

`FormatSpec` is a pure parser (format validity: did the output follow the format?) and `AnswerSpec`
compares a parsed answer with the gold one (correctness), so the two facts never mix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from spt_jax.errors import ConfigError, DataError
from spt_jax.sequence import cut_at_stop

LETTERS = string.ascii_uppercase


# --------------------------------------------------------------------------------------------------
# Output format
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    valid: bool  # did the output follow the required format?
    answer: str | None  # the extracted answer text (None when invalid)


INVALID = ParsedAnswer(valid=False, answer=None)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """The required output format as a pure parser: a regex with a named group ``answer``.

    ``strict`` demands the whole stop-cut, stripped output match, so chatter around the answer counts
    as a format failure; ``first`` takes the first match anywhere in the stop-cut output.
    """

    pattern: str
    mode: Literal["strict", "first"] = "strict"
    stop_sequences: tuple[str, ...] = ("\n",)
    ignore_case: bool = False
    _regex: re.Pattern = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"format pattern must be a non-empty regex string, got {self.pattern!r}")
        if self.mode not in ("strict", "first"):
            raise ConfigError(f"format mode must be 'strict' or 'first', got {self.mode!r}")
        stops = (self.stop_sequences,) if isinstance(self.stop_sequences, str) else self.stop_sequences
        try:
            stops = tuple(stops)
        except TypeError:
            raise ConfigError(f"stop_sequences must be a list of strings, got {self.stop_sequences!r}") from None
        if not all(isinstance(s, str) and s for s in stops):
            raise ConfigError(f"stop_sequences must be non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_sequences", stops)
        try:
            regex = re.compile(self.pattern, re.IGNORECASE if self.ignore_case else 0)
        except re.error as e:
            raise ConfigError(f"format pattern {self.pattern!r} does not compile: {e}") from None
        if "answer" not in regex.groupindex:
            raise ConfigError(
                f"format pattern {self.pattern!r} lacks the named group 'answer', "
                "e.g. r'Answer: (?P<answer>[A-D])'"
            )
        object.__setattr__(self, "_regex", regex)

    def cut(self, text: str) -> str:
        return cut_at_stop(text, self.stop_sequences)

    def parse(self, text: str) -> ParsedAnswer:
        cut = self.cut(text)
        match = self._regex.fullmatch(cut.strip()) if self.mode == "strict" else self._regex.search(cut)
        if match is None:
            return INVALID
        answer = match.group("answer")
        if answer is None or not answer.strip():
            return INVALID  # an empty answer is no answer
        return ParsedAnswer(valid=True, answer=answer.strip())


# --------------------------------------------------------------------------------------------------
# Answer comparison
# --------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD/TriviaQA normalization: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")


def parse_number(text: Any) -> float | None:
    """A number from text like '$1,234.', '-7' or '3.5'; None when it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float, np.integer, np.floating)):
        value = float(text)
        return value if math.isfinite(value) else None
    if not isinstance(text, str):
        return None
    cleaned = text.strip().replace("$", "").strip()
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if "," in cleaned:  # thousands separators only in valid groups: "1,234" yes, "4,2" no
        if not _THOUSANDS.fullmatch(cleaned):
            return None
        cleaned = cleaned.replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def format_number(value: float) -> str:
    """Integers without a trailing '.0' (gold '42', not '42.0')."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_YES = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def choice_letter(value: Any, n_choices: int | None) -> str | None:
    """The gold letter from an index (int) or a letter; None when it is neither or out of range."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    elif isinstance(value, str) and value.strip().isdigit():  # an index read from a CSV cell
        index = int(value.strip())
    else:
        return None
    limit = n_choices if n_choices is not None else len(LETTERS)
    return LETTERS[index] if 0 <= index < limit else None


@dataclasses.dataclass(frozen=True)
class AnswerSpec:
    """How a parsed answer is compared with the gold one."""

    kind: Literal["choice", "string", "number", "yesno"]
    aliases_field: str | None = None  # record field with extra accepted gold strings (string kind)
    # string kind: a record field that, when true, makes that item's comparison exact (case and
    # punctuation matter: "Co" is cobalt, "CO" is not)
    exact_field: str | None = None
    tolerance: float = 1e-6  # number kind: absolute tolerance; commas/`$` stripped

    def __post_init__(self):
        if self.kind not in ("choice", "string", "number", "yesno"):
            raise ConfigError(
                f"answer kind must be one of 'choice', 'string', 'number', 'yesno', got {self.kind!r}"
            )
        if self.aliases_field is not None and self.kind != "string":
            raise ConfigError(f"aliases_field is only used by the 'string' answer kind, not {self.kind!r}")
        if not isinstance(self.tolerance, (int, float)) or self.tolerance < 0:
            raise ConfigError(f"answer tolerance must be a number >= 0, got {self.tolerance!r}")

    def canonical_gold(self, value: Any, *, field: str, choices: Sequence[str] | None = None,
                       where: str = "") -> str:
        """The gold answer as text (letter / string / number / 'yes'|'no'); DataError if of the wrong type."""
        at = f" in {where}" if where else ""
        if self.kind == "choice":
            if choices is not None and isinstance(value, str) and value in choices:
                letter = LETTERS[list(choices).index(value)]  # the choice text wins: "2" among 1,2,3,4 is B
            else:
                letter = choice_letter(value, len(choices) if choices is not None else None)
            if letter is None:
                span = f"A-{LETTERS[len(choices) - 1]} or 0-{len(choices) - 1}" if choices else "a letter or index"
                raise DataError(f"gold field {field!r}{at} is {value!r}, expected a choice ({span})")
            return letter
        if self.kind == "number":
            number = parse_number(value)
            if number is None:
                raise DataError(f"gold field {field!r}{at} is {value!r}, expected a number")
            return value.strip() if isinstance(value, str) else format_number(number)
        if self.kind == "yesno":
            key = (("true" if value else "false") if isinstance(value, bool)
                   else value.strip().lower() if isinstance(value, str) else None)
            if key not in _YES:
                raise DataError(f"gold field {field!r}{at} is {value!r}, expected yes/no (or true/false)")
            return _YES[key]
        # string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"gold field {field!r}{at} is {value!r}, expected a non-empty string")
        return value.strip()

    def aliases(self, record: Mapping, where: str = "") -> list[str]:
        """Extra accepted gold strings from ``aliases_field`` (a string or a list of strings)."""
        if self.aliases_field is None:
            return []
        at = f" in {where}" if where else ""
        if self.aliases_field not in record:
            raise DataError(f"aliases field {self.aliases_field!r} is missing{at}")
        value = record[self.aliases_field]
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise DataError(f"aliases field {self.aliases_field!r}{at} is {value!r}, expected a list of strings")

    def is_correct(self, answer: str, record: Mapping, gold: str) -> bool:
        if answer is None:
            return False
        if self.kind == "choice":
            return answer.strip().upper() == gold.strip().upper()
        if self.kind == "yesno":
            return answer.strip().lower() == gold.strip().lower()
        if self.kind == "number":
            got, want = parse_number(answer), parse_number(gold)
            return got is not None and want is not None and abs(got - want) <= self.tolerance
        if self.exact_field is not None and record.get(self.exact_field):
            return answer.strip() in {g.strip() for g in [gold, *self.aliases(record)]}
        accepted = {normalize_text(g) for g in [gold, *self.aliases(record)]}
        return normalize_text(answer) in accepted
