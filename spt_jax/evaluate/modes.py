"""Evaluation modes as objects: what precedes each test item, and how its rows are made.

A *generation mode* builds a prefix and the inputs (an instruction, k demonstrations, a soft prompt),
generates greedily and scores the outputs with the task's parser. A *reference scorer* needs no
output format at all (log-likelihood of the choices) and makes its rows directly: its answers are
valid by construction and it reports no format validity. A new mode is one class registered with
`register_mode`; `EvalConfig`, the CLI, the report and compare read this registry.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from spt_jax.errors import ConfigError, close_names
from spt_jax.tasks.answers import LETTERS


@dataclasses.dataclass
class ModeRun:
    """One mode's outcome on the evaluated items, in item order."""

    inputs: list[str]  # what the model saw after the shared prefix
    outputs: list[str]  # what it said (a reference: the chosen continuation)
    scored: list[dict]  # per item: parsed, gold, valid, correct
    prefix_text: str = ""
    fields: dict = dataclasses.field(default_factory=dict)  # extra row fields (k, tuning_steps)
    tuning: dict | None = None  # how the soft prompt was obtained, for results["tuning"]
    soft_prompt: Any = None  # a prompt tuned in this run, written to the results folder
    wall_time_s: float = 0.0
    compile_time_s: float = 0.0  # of wall_time_s, the part JAX spent compiling
    seed_runs: list = dataclasses.field(default_factory=list)  # further independently tuned prompts


class Mode(abc.ABC):
    """A way of evaluating the test items. Subclasses set the class attributes and `run`."""

    name: ClassVar[str]
    label: ClassVar[str]  # how tables and plots name it
    aliases: ClassVar[tuple[str, ...]] = ()  # other spellings accepted on the command line
    reference: ClassVar[bool] = False  # a format-free reference (no format validity)
    row_fields: ClassVar[tuple[str, ...]] = ()  # extra fields its result rows carry

    def applies(self, task, config) -> bool:
        """Whether this mode runs for ``task`` under ``config`` (generation modes: when configured)."""
        return self.name in config.modes

    def check(self, ctx) -> None:
        """Raise the DataError/ConfigError this mode would hit on the task's data, cheaply."""

    @abc.abstractmethod
    def run(self, ctx) -> ModeRun:
        """Evaluate ``ctx.records`` (see `spt_jax.evaluate.protocol.EvalContext`)."""

    def label_for(self, row: Mapping) -> str:
        """The label of one result row (a mode may show its settings, e.g. "5-shot")."""
        return self.label

    def announce(self, ctx) -> str:
        """The log line before the mode runs."""
        return f"{self.name}: {len(ctx.items)} test items"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a generation mode puts before the items: the shared prefix and each item's input."""

    inputs: list[str]
    prefix_text: str = ""
    soft_prompt: Any = None
    fields: dict = dataclasses.field(default_factory=dict)
    tuning: dict | None = None
    tuned: bool = False  # the soft prompt was tuned in this run (and belongs in the results folder)


class GenerationMode(Mode):
    """Greedy generation after a prefix, scored by the task's parser."""

    @abc.abstractmethod
    def prepare(self, ctx) -> Prepared:
        """The prefix and inputs for ``ctx.records``."""

    def run(self, ctx) -> ModeRun:
        prepared = self.prepare(ctx)
        t0 = time.perf_counter()
        outputs = ctx.backends.generate(ctx.lm, prepared.inputs, soft_prompt=prepared.soft_prompt,
                                        prefix_text=prepared.prefix_text, config=ctx.generation_config,
                                        progress=ctx.progress, mesh=ctx.mesh)
        if prepared.tuning is not None:
            prepared.tuning["eval_time_s"] = time.perf_counter() - t0
        return ModeRun(inputs=list(prepared.inputs), outputs=list(outputs),
                       scored=score_outputs(ctx.task, ctx.records, outputs), prefix_text=prepared.prefix_text,
                       fields=dict(prepared.fields), tuning=prepared.tuning,
                       soft_prompt=prepared.soft_prompt if prepared.tuned else None)


def score_outputs(task, records: Sequence[Mapping], outputs: Sequence[str]) -> list[dict]:
    """Per item: parsed answer, gold, valid, correct (the task's parser and judge, nothing else)."""
    rows = []
    for record, output in zip(records, outputs, strict=True):
        parsed, correct = task.score(output, record)
        rows.append({"parsed": parsed.answer, "gold": task.gold(record), "valid": bool(parsed.valid),
                     "correct": bool(correct and parsed.valid)})
    return rows


# --------------------------------------------------------------------------------------------------
# the registry

_MODES: dict[str, Mode] = {}


def register_mode(cls: type[Mode]) -> type[Mode]:
    """Class decorator: make a mode available by its name (and aliases) everywhere."""
    if not getattr(cls, "name", None) or not getattr(cls, "label", None):
        raise ConfigError(f"mode class {cls.__name__} needs a name and a label")
    _MODES[cls.name] = cls()
    return cls


def unregister_mode(name: str) -> None:
    """Remove a registered mode (for tests and notebooks that add one)."""
    _MODES.pop(name, None)


def get_mode(name: str) -> Mode:
    if name not in _MODES:
        raise ConfigError(f"unknown mode {name!r}{close_names(name, _MODES)}; modes are {', '.join(_MODES)}")
    return _MODES[name]


def all_modes() -> list[Mode]:
    return list(_MODES.values())


def generation_mode_names() -> tuple[str, ...]:
    return tuple(m.name for m in _MODES.values() if not m.reference)


def reference_modes() -> list[Mode]:
    return [m for m in _MODES.values() if m.reference]


def mode_by_spelling(text: str) -> Mode:
    """A generation mode by its name or one of its aliases (the CLI's spellings)."""
    for mode in _MODES.values():
        if not mode.reference and text in (mode.name, *mode.aliases):
            return mode
    names = generation_mode_names()
    raise ConfigError(f"unknown mode {text!r}{close_names(text, names)}; modes are {', '.join(names)}")


def mode_label(row: Mapping) -> str:
    """The label of a results row; modes no longer registered show their name."""
    mode = _MODES.get(row["mode"])
    return mode.label_for(row) if mode is not None else str(row["mode"])


# --------------------------------------------------------------------------------------------------
# the built-in modes


def shared_prefix(ctx, prefix: str, fields: Mapping | None = None) -> Prepared:
    """Every item after the same ``prefix`` text (instruction, demonstrations), KV-cached once.

    With a chat template the prefix and the item share one user turn; the turn's head is cached too.
    """
    inputs = [ctx.task.render_input(r) for r in ctx.records]
    if ctx.chat is not None:
        prefix, inputs = ctx.chat.head + prefix, [text + ctx.chat.tail for text in inputs]
    return Prepared(inputs=inputs, prefix_text=prefix, fields=dict(fields or {}))


@register_mode
class ZeroShot(GenerationMode):
    """The task's instruction describes the format in words; no demonstrations, no prompt.

    The instruction is the same for every item: it runs once, as a cached prefix (k = 0 few-shot).
    """

    name, label, aliases = "zero_shot", "zero-shot", ("zero-shot", "zero")

    def prepare(self, ctx) -> Prepared:
        return shared_prefix(ctx, ctx.task.fewshot_prefix(0, ctx.config.seed))  # the instruction alone


@register_mode
class FewShot(GenerationMode):
    """k seeded train demonstrations, shared by every item (and KV-cached once)."""

    name, label, aliases = "few_shot", "few-shot", ("few-shot", "few")
    row_fields = ("k", "fewshot_form")

    def check(self, ctx) -> None:
        ctx.task.fewshot_prefix(ctx.config.k, ctx.config.seed)

    def prepare(self, ctx) -> Prepared:
        if ctx.config.fewshot_form == "lm_eval":
            return self._lm_eval_form(ctx)
        return shared_prefix(ctx, ctx.task.fewshot_prefix(ctx.config.k, ctx.config.seed),
                             fields={"k": ctx.config.k, "fewshot_form": "shared"})

    @staticmethod
    def _lm_eval_form(ctx) -> Prepared:
        """lm-eval's k-shot context per item: demos drawn per item, the task's description only."""
        from spt_jax.tasks.lm_eval_forms import fewshot_context

        task, demos_for = ctx.task, ctx.lm_eval_demos("generation")
        inputs = []
        for record in ctx.records:
            demos = [task.render_input(d) + task.render_target(d) for d in demos_for(record)]
            inputs.append(ctx.wrap(fewshot_context(task.lm_eval, demos, task.render_input(record))))
        return Prepared(inputs=inputs, fields={"k": ctx.config.k, "fewshot_form": "lm_eval"})

    def label_for(self, row: Mapping) -> str:
        if row.get("k") is None:
            return self.label
        return f"{row['k']}-shot" + (" (lm-eval form)" if row.get("fewshot_form") == "lm_eval" else "")


@register_mode
class SoftPrompt(GenerationMode):
    """A prompt tuned on the train split (or loaded from a file) replaces the instruction."""

    name, label, aliases = "soft_prompt", "soft prompt", ("soft-prompt", "soft")
    row_fields = ("tuning_steps",)

    def check(self, ctx) -> None:
        if ctx.config.prompt_file is None:
            ctx.task.examples("train")
            if ctx.config.eval_every > 0:
                ctx.curve_records()

    def run(self, ctx) -> ModeRun:
        """The first prompt's run; with ``config.seeds > 1`` the other seeds' runs ride along."""
        first = super().run(ctx)
        if ctx.saved_prompt is None:  # each further seed sees the same context, its own offset
            first.seed_runs = [GenerationMode.run(self, dataclasses.replace(ctx, seed_offset=offset))
                               for offset in range(1, ctx.config.seeds)]
        return first

    def prepare(self, ctx) -> Prepared:
        if ctx.saved_prompt is not None:
            tuning = {"source": str(ctx.config.prompt_file), "steps": None, "curve": [], "history": [],
                      "tune_time_s": 0.0}
            prompt, tuned = ctx.saved_prompt, False
        else:
            prompt, tuning = ctx.tune_prompt()
            tuned = True
        return Prepared(inputs=[ctx.wrap(ctx.task.render_input(r)) for r in ctx.records], soft_prompt=prompt,
                        fields={"tuning_steps": tuning["steps"]}, tuning=tuning, tuned=tuned)

    def announce(self, ctx) -> str:
        if ctx.saved_prompt is not None:
            return super().announce(ctx)
        tune = ctx.config.tune
        return (f"{self.name}: tuning {tune.steps} steps at batch {tune.batch_size} on "
                f"{len(ctx.task.records('train'))} train examples, then {len(ctx.items)} test items")

    def label_for(self, row: Mapping) -> str:
        steps = row.get("tuning_steps")
        return f"soft prompt ({steps} steps)" if steps is not None else self.label


@register_mode
class LoglikChoice(Mode):
    """MCF: multiple choice by log-likelihood of each letter's target ("Answer: B") after the
    zero-shot prompt with the lettered list."""

    name, label = "loglik", "MCF log-lik. letter (ref.)"
    reference = True

    def applies(self, task, config) -> bool:
        return bool(config.loglik and task.is_multiple_choice)

    def check(self, ctx) -> None:
        for record in ctx.task.records("test")[:1]:
            ctx.task.choice_continuations(record)

    def run(self, ctx) -> ModeRun:
        contexts, continuations, golds = [], [], []
        for record in ctx.records:
            targets, gold_index = ctx.task.choice_continuations(record)
            contexts.append(ctx.task.zero_shot_prompt(record))
            continuations.append(targets)
            golds.append(gold_index)
        scores = ctx.backends.score(ctx.lm, list(zip(contexts, continuations)), batch_size=ctx.config.batch_size,
                                    progress=ctx.progress, mesh=ctx.mesh)
        chosen = [int(np.argmax(s)) for s in scores]
        scored = [{"parsed": LETTERS[c], "gold": ctx.task.gold(r), "valid": True,
                   "correct": c == g} for r, c, g in zip(ctx.records, chosen, golds)]
        outputs = [continuations[i][c] for i, c in enumerate(chosen)]
        return ModeRun(inputs=contexts, outputs=outputs, scored=scored)



class _ClozeReference(Mode):
    """CF: each choice's own text scored as the continuation of the question without the list
    (`Task.cloze`), all choices of an item from one computation of its context. Both CF rows come
    from one scoring pass, kept on the evaluation's context."""

    reference = True
    normalized: ClassVar[bool]
    row_fields = ("k", "fewshot_form")

    def applies(self, task, config) -> bool:
        return bool(config.cloze and task.cloze is not None)

    def check(self, ctx) -> None:
        for record in ctx.task.records("test")[:1]:
            ctx.task.cloze_pairs(record)

    def run(self, ctx) -> ModeRun:
        items, scores = ctx.memo("cloze_scores", lambda: _cloze_scores(ctx))
        chosen, scored = [], []
        for record, (pairs, gold), item_scores in zip(ctx.records, items, scores):
            if self.normalized:  # lm-eval's acc_norm: per UTF-8 byte of the continuation
                item_scores = item_scores / np.array([max(len(c.encode("utf-8")), 1) for _, c in pairs])
            pick = int(np.argmax(item_scores))
            chosen.append(pick)
            choices = record[ctx.task.cloze.choices_field]
            scored.append({"parsed": choices[pick], "gold": ctx.task.gold(record), "valid": True,
                           "correct": pick == gold})
        shots = ctx.config.fewshot_form == "lm_eval" and ctx.config.k > 0
        return ModeRun(inputs=[pairs[0][0] for pairs, _ in items],
                       outputs=[pairs[c][1] for (pairs, _), c in zip(items, chosen)], scored=scored,
                       fields={"k": ctx.config.k, "fewshot_form": "lm_eval"} if shots else {})

    def label_for(self, row: Mapping) -> str:
        if row.get("fewshot_form") == "lm_eval":
            return self.label.replace("(ref.)", f"{row['k']}-shot, lm-eval form (ref.)")
        return self.label


def _cloze_scores(ctx):
    items = [ctx.task.cloze_pairs(r) for r in ctx.records]
    if ctx.config.fewshot_form == "lm_eval" and ctx.config.k > 0:  # lm-eval's k-shot CF context
        from spt_jax.tasks.lm_eval_forms import fewshot_context

        demos_for, task = ctx.lm_eval_demos("cloze"), ctx.task
        shots = []
        for record in ctx.records:
            shots.append([pairs[gold][0] + pairs[gold][1] for pairs, gold in map(task.cloze_pairs, demos_for(record))])
        items = [([(fewshot_context(task.lm_eval, demos, c), x) for c, x in pairs], gold)
                 for (pairs, gold), demos in zip(items, shots)]
    scores = ctx.backends.score_items(ctx.lm, [pairs for pairs, _ in items], progress=ctx.progress, mesh=ctx.mesh)
    return items, scores


@register_mode
class Cloze(_ClozeReference):
    name, label = "cloze", "CF log-lik. text (ref.)"
    normalized = False


@register_mode
class ClozeNorm(_ClozeReference):
    name, label = "cloze_norm", "CF log-lik. per byte (ref.)"
    normalized = True
