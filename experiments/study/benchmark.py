"""The study's benchmark as a library `Task` built in memory: questions about the world's people.

train: every question about the post-training half (the few-shot demonstrations and the soft
prompt's tuning data come from it, as SFT's do); test: every question about the other half. The
required output is ``Answer: <value>`` and nothing else, with the value from the closed attribute
sets, so format validity means "wrote exactly one answer in the format", apart from correctness.
"""

from __future__ import annotations

import re

from spt_jax.tasks import AnswerSpec, FormatSpec, InMemorySource, Task

from . import world as w

INSTRUCTION = "Answer the question about the person . Reply with Answer: followed by the fact ."
TASK_NAME = "people_qa"


def answer_pattern() -> str:
    """``Answer: (?P<answer>v1|v2|...)``: exactly one value of the closed sets (longest first)."""
    values = sorted(w.all_values(), key=len, reverse=True)
    return r"Answer: (?P<answer>" + "|".join(re.escape(v) for v in values) + ")"


def make_task(world: w.World) -> Task:
    return Task(
        name=TASK_NAME,
        source=InMemorySource({"train": w.qa_records(world.group("train")),
                               "test": w.qa_records(world.group("test"))}),
        input_template="Question: {question}\n",
        target_template="Answer: {answer}",
        format=FormatSpec(pattern=answer_pattern(), mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="string"),
        instruction=INSTRUCTION,
        max_new_tokens=6,
        split_names={"train": "train", "test": "test"},
        description=f"questions about {len(world.test_ids)} fictional people (world seed {world.seed}) "
                    "whom post-training never saw",
    )
