"""Our renderings of lm-evaluation-harness's prompts, character for character.

Expected strings are transcribed from lm-eval's task YAMLs (lm_eval/tasks/arc/arc_easy.yaml,
hellaswag/hellaswag.yaml, piqa/piqa.yaml, winogrande/preprocess_winogrande.py,
openbookqa/openbookqa.yaml, mmlu/default/_default_template_yaml) and its samplers: target delimiter
" ", few-shot delimiter "\\n\\n", one random.Random(1234) per task sampling k documents per test item
(first_n for MMLU's dev split).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_evaluate import make_tiny_lm, scripted_generate

from spt_jax import evaluate as ev
from spt_jax.tasks import benchmark_prompts as prompts
from spt_jax.tasks.lm_eval_forms import FewShotSampler, fewshot_context
from spt_jax.tasks.task import InMemorySource

SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def _arc_docs(n, tag):
    return [{"id": f"{tag}{i}", "question": f"Which {tag} gas number {i}?",
             "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "answer": "ABCD"[i % 4]} for i in range(n)]


def arc():
    data = {"train": _arc_docs(6, "train"), "validation": _arc_docs(2, "val"), "test": _arc_docs(3, "test")}
    return prompts.arc_task("arc_easy", InMemorySource(data), SPLITS, "ARC-Easy from small files")


def test_arc_cloze_is_lm_evals_question_answer_form():
    task = arc()
    doc = task.records("test")[1]
    pairs, gold = task.cloze_pairs(doc)
    assert pairs == [("Question: Which test gas number 1?\nAnswer:", " oxygen"),
                     ("Question: Which test gas number 1?\nAnswer:", " carbon dioxide"),
                     ("Question: Which test gas number 1?\nAnswer:", " helium"),
                     ("Question: Which test gas number 1?\nAnswer:", " neon")]
    assert gold == 1


def test_sampler_draws_as_lm_eval_per_item():
    task = arc()
    train, test = task.records("train"), task.records("test")
    sampler = FewShotSampler(train, task.lm_eval)
    rnd = random.Random(1234)  # lm-eval: one Random per task, rnd.sample(docs, k) per test document
    for doc in test:
        assert sampler(doc, 2) == rnd.sample(list(train), 2)
    same = FewShotSampler(test, task.lm_eval, same_split_as_test=True)  # k + 1 drawn, the item dropped
    rnd = random.Random(1234)
    for doc in test:
        assert same(doc, 1) == [d for d in rnd.sample(list(test), 2) if d != doc][:1]


def test_arc_two_shot_cf_context_character_for_character(tmp_path):
    task = arc()
    train = task.records("train")
    rnd = random.Random(1234)
    expected = []
    for doc in task.records("test"):
        demos = rnd.sample(list(train), 2)
        shots = "".join(f"Question: {d['question']}\nAnswer: {d['choices']['ABCD'.index(d['answer'])]}\n\n"
                        for d in demos)
        expected.append(shots + f"Question: {doc['question']}\nAnswer:")
    seen = []

    def score_items(lm, items, **_):
        seen.extend(items)
        return [np.zeros(len(pairs)) for pairs in items]

    config = ev.EvalConfig(modes=("few_shot",), k=2, n_test=None, eval_every=0, fewshot_form="lm_eval")
    results = ev.evaluate(make_tiny_lm(), task, config, tmp_path, progress=False,
                          backends=ev.Backends(generate=scripted_generate(lambda *a: " A"), score_items=score_items))
    assert [pairs[0][0] for pairs in seen] == expected  # the CF references' contexts
    assert [r["mode"] for r in results["results"]] == ["few_shot", "loglik", "cloze", "cloze_norm"]
    rows = {r["mode"]: r for r in results["results"]}
    assert rows["few_shot"]["fewshot_form"] == "lm_eval" and rows["cloze"]["k"] == 2
    import json

    few = [json.loads(line) for line in (tmp_path / ev.PREDICTIONS_FILE).read_text().splitlines()
           if json.loads(line)["mode"] == "few_shot"]
    rnd = random.Random(1234)
    for row, doc in zip(few, task.records("test")):  # the generation form: our lettered input + " B"
        demos = rnd.sample(list(train), 2)
        shots = "".join(task.render_input(d) + " " + d["answer"] + "\n\n" for d in demos)
        assert row["input"] == shots + task.render_input(doc)
        assert not row["input"].startswith("The following")  # no invented instruction


def test_mmlu_five_shot_is_lm_evals_first_n_dev_context():
    dev = [{"subject": "anatomy", "question": f"Dev question {i}?", "choices": ["a", "b", "c", "d"],
            "answer": "ABCD"[i % 4]} for i in range(6)]
    test = [{"subject": "anatomy", "question": "Which bone?", "choices": ["femur", "ulna", "rib", "skull"],
             "answer": "A"}]
    task = prompts.mmlu_task("mmlu:anatomy", InMemorySource({"dev": dev, "test": test}),
                         {"train": "dev", "test": "test"}, "MMLU anatomy", subject="anatomy")
    demos = FewShotSampler(task.records("train"), task.lm_eval)(task.records("test")[0], 5)
    assert [d["question"] for d in demos] == [f"Dev question {i}?" for i in range(5)]
    text = fewshot_context(task.lm_eval, [task.render_input(d) + task.render_target(d) for d in demos],
                           task.render_input(task.records("test")[0]))
    expected = "The following are multiple choice questions (with answers) about anatomy.\n\n" + "".join(
        f"Dev question {i}?\nA. a\nB. b\nC. c\nD. d\nAnswer: {'ABCD'[i % 4]}\n\n" for i in range(5)
    ) + "Which bone?\nA. femur\nB. ulna\nC. rib\nD. skull\nAnswer:"
    assert text == expected
    pairs, gold = task.cloze_pairs(task.records("test")[0])  # lm-eval's mmlu continuation variant
    assert pairs[0] == ("Question: Which bone?\nAnswer:", " femur") and gold == 0


@pytest.mark.parametrize("make, record, want", [
    (prompts.hellaswag_task, {"question": "Baking cookies: A woman mixes flour.", "choices": ["She bakes.", "He runs."],
                          "answer": "A"},
     [("Baking cookies: A woman mixes flour.", " She bakes."), ("Baking cookies: A woman mixes flour.", " He runs.")]),
    (prompts.piqa_task, {"question": "Open a jar", "choices": ["twist the lid", "kick it"], "answer": "A"},
     [("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " kick it")]),
    (prompts.openbookqa_task, {"question": "The sun is a", "choices": ["star", "planet", "moon", "comet"], "answer": "A"},
     [("The sun is a", " star"), ("The sun is a", " planet"), ("The sun is a", " moon"), ("The sun is a", " comet")]),
    (prompts.winogrande_task, {"question": "The trophy didn't fit in the suitcase because _ was too big.",
                           "choices": ["the trophy", "the suitcase"], "answer": "A"},
     [("The trophy didn't fit in the suitcase because the trophy", " was too big."),
      ("The trophy didn't fit in the suitcase because the suitcase", " was too big.")]),
])
def test_cloze_forms_of_the_other_benchmarks(make, record, want):
    task = make("b", InMemorySource({"train": [record], "test": [record]}), {"train": "train", "test": "test"}, "d")
    pairs, gold = task.cloze_pairs(task.records("test")[0])
    assert pairs == want and gold == 0
