"""lm-evaluation-harness's own prompt forms, so few-shot and reference numbers compare with published ones.

Two things are lm-eval's here, transcribed from its task YAMLs (the tests hold them to those texts):

* `fewshot_context`: how lm-eval builds a k-shot context -- the task's description (MMLU only), then
  k demonstrations ``doc_to_text + target_delimiter + target`` joined by ``fewshot_delimiter``, then
  the test document. Demonstrations are drawn *per test item* by `FewShotSampler`: lm-eval's default
  sampler (one ``random.Random(1234)`` per task, ``sample(k)`` per item, ``k + 1`` and the item itself
  dropped when the few-shot split is the test split) or ``first_n`` (MMLU: the first k dev items).
* the cloze forms (`ClozeSpec`) of the multiple-choice benchmarks: ARC, PIQA and MMLU's
  continuation variant ``"Question: {q}\\nAnswer:" + " {choice}"``, HellaSwag's ``"{query}" + " {ending}"``,
  OpenBookQA's ``"{question_stem}" + " {choice}"``, and Winogrande's partial scoring (`winogrande_pairs`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from spt_jax.errors import ConfigError
from spt_jax.tasks.task import ClozeSpec, FewShotForm

LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed default


class FewShotSampler:
    """lm-eval's demonstration sampler for one task: call it once per test item, in order."""

    def __init__(self, docs: Sequence[Mapping], form: FewShotForm, *, same_split_as_test: bool = False,
                 seed: int = LM_EVAL_FEWSHOT_SEED):
        self.docs, self.form, self.same_split = list(docs), form, same_split_as_test
        self.rnd = random.Random(seed)

    def __call__(self, doc: Mapping, k: int) -> list[Mapping]:
        if k > len(self.docs):
            raise ConfigError(f"{k}-shot needs {k} few-shot documents, the few-shot split has {len(self.docs)}")
        n = k + 1 if self.same_split else k
        drawn = self.docs[:n] if self.form.sampler == "first_n" else self.rnd.sample(self.docs, n)
        return [d for d in drawn if d != doc][:k]


def fewshot_context(form: FewShotForm, demos: Sequence[str], text: str) -> str:
    """description + each demonstration (its text and target, the target delimiter included) +
    the few-shot delimiter, then the test item's text: lm-eval's ``fewshot_context``."""
    return form.description + "".join(demo + form.fewshot_delimiter for demo in demos) + text


# --------------------------------------------------------------------------------------------------
# the cloze forms of the multiple-choice benchmarks

QUESTION_ANSWER = ClozeSpec(context_template="Question: {question}\nAnswer:")  # ARC, PIQA, MMLU continuation
BARE_QUESTION = ClozeSpec(context_template="{question}")  # HellaSwag's query, OpenBookQA's question_stem


def winogrande_pairs(record: Mapping) -> list[tuple[str, str]]:
    """lm-eval's partial scoring: each option fills the blank, only the text after it is scored."""
    sentence = record["question"]
    blank = sentence.index("_")
    target = " " + sentence[blank + 1 :].strip()
    return [(sentence[:blank] + option, target) for option in record["choices"]]


WINOGRANDE = ClozeSpec(pairs=winogrande_pairs)
