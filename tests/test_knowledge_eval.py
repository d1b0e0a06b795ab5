"""Evaluation that shows knowledge: free-form fact tasks, the cloze (CF) references, and the fixes a
review of the judges and the tuning loop asked for."""

from __future__ import annotations

import numpy as np
import pytest
from test_builtin_tasks import CAPITALS
from test_evaluate import make_tiny_lm, scripted_generate, toy_task

from spt_jax import evaluate as ev
from spt_jax import report, scoring
from spt_jax.errors import ConfigError
from spt_jax.tasks import get_task
from spt_jax.tasks.answers import AnswerSpec, parse_number

# --------------------------------------------------------------------------------------------------
# free-form capital tasks


@pytest.mark.parametrize("name", ["capital_of", "country_of_capital", "capital_of_options"])
def test_free_form_capital_tasks_are_true_facts_split_like_capitals_mc(name):
    task, mc = get_task(name), get_task("capitals_mc")
    for split in ("train", "validation", "test"):
        records = task.records(split)
        mc_ids = {r["id"] for r in mc.records(split)}
        assert records and {r["id"] for r in records} <= mc_ids  # the same facts in the same split
        for r in records:
            group, place, direction = r["id"].split(":")
            want = place if name == "country_of_capital" else CAPITALS[group, place]
            assert r["answer"] == want and task.gold(r) == want
            parsed, correct = task.score(task.render_target(r), r)
            assert parsed.valid and correct
            pairs, gold = task.cloze_pairs(r)
            assert pairs[gold][1] == " " + want and len({c for c, _ in pairs}) == 1
            assert pairs[0][0] == f"Question: {r['question']}\nAnswer:"


def test_capital_answers_accept_other_spellings_but_not_other_cities():
    task = get_task("capital_of")
    by_answer = {r["answer"]: r for s in ("train", "validation", "test") for r in task.records(s)}
    for gold, other in [("Kyiv", "Kiev"), ("Bogotá", "Bogota"), ("Washington, D.C.", "Washington"),
                        ("Port-au-Prince", "Port au Prince"), ("Reykjavík", "reykjavik")]:
        record = by_answer[gold]
        assert task.score(f"Answer: {other}", record)[1], (gold, other)
        assert task.score(f"Answer: {gold}", record)[1]
    assert not task.score("Answer: Odesa", by_answer["Kyiv"])[1]
    assert not task.score("Answer: Medellin", by_answer["Bogotá"])[1]
    assert by_answer["Paris"]["aliases"] == []  # nothing to add where the name has no accent or alias


def test_capital_of_options_shows_capital_of_items_with_their_cloze_options():
    task, free = get_task("capital_of_options"), get_task("capital_of")
    for split in ("train", "validation", "test"):
        for r, f in zip(task.records(split), free.records(split), strict=True):
            assert {k: v for k, v in r.items() if k != "options"} == f
            options = task.render_input(r).removeprefix(f"Question: {r['question']}\nOptions: ")
            assert options.endswith("\n") and options[:-1].split("; ") == r["choices"]  # "Washington, D.C." is one
            assert r["answer"] in r["choices"]
            for choice in r["choices"]:  # no other spelling of the gold makes a distractor right
                assert task.score(f"Answer: {choice}", r)[1] == (choice == r["answer"]), (r["id"], choice)
    assert "one of the options" in task.instruction


def test_other_spellings_stay_with_their_own_name():
    capitals = set(CAPITALS.values()) | {"Kiev", "Washington", "Tarawa"}
    for r in (r for s in ("train", "validation", "test") for r in get_task("country_of_capital").records(s)):
        assert not set(r["aliases"]) & capitals  # a capital's spellings never answer for its country
        assert all(a.isascii() and a != r["answer"] for a in r["aliases"])  # only the accent-free place name


def test_capitals_mc_cloze_scores_the_choice_text_without_the_list():
    task = get_task("capitals_mc")
    r = task.records("test")[0]
    pairs, gold = task.cloze_pairs(r)
    assert [x for _, x in pairs] == [" " + c for c in r["choices"]]
    assert "A." not in pairs[0][0] and gold == "ABCD".index(task.gold(r))


# --------------------------------------------------------------------------------------------------
# the CF references


def test_item_scoring_from_a_shared_context_equals_scoring_each_pair():
    lm = make_tiny_lm()
    items = [[("Q: 1+2?\nA:", " 3"), ("Q: 1+2?\nA:", " 4"), ("Q: 1+2?\nA:", " 12")],
             [("ab c", " d"), ("ab e", " f")]]  # the second item: one context per choice
    got = scoring.item_choice_loglikelihoods(lm, items)
    for item, scores in zip(items, got):
        want = scoring.loglikelihoods(lm, [c for c, _ in item], [x for _, x in item])
        np.testing.assert_allclose(scores, want, atol=1e-4)


def test_items_batched_by_shared_context_score_as_each_pair_alone(monkeypatch):
    """Items of different context lengths and choice counts, split over several calls (a small slot
    budget), a context with a trailing space, and a soft prompt: each score equals the pair's own."""
    import jax.numpy as jnp

    monkeypatch.setattr(scoring, "SHARED_CONTEXT_SLOTS", 160)
    lm = make_tiny_lm()
    items = [[(f"Q: {'x' * (3 * i)} {i}?\nA:", f" {c}") for c in ("yes", "no", "maybe")[: 2 + i % 2]]
             for i in range(11)]
    items[4] = [("Trailing space ", "A"), ("Trailing space ", "BB")]
    items[7] = [("ab c", " d"), ("ab e", " f")]  # one context per choice: scored pair by pair
    soft = jnp.asarray(np.random.default_rng(0).normal(size=(3, lm.config.d_model)), jnp.float32)
    for soft_prompt in (None, soft):
        got = scoring.item_choice_loglikelihoods(lm, items, soft_prompt=soft_prompt)
        assert [len(g) for g in got] == [len(item) for item in items]
        for item, scores in zip(items, got):
            want = [scoring.score_continuations(lm, [""], [x], soft_prompt=soft_prompt, prefix_text=c).loglikelihood[0]
                    for c, x in item] if len({c for c, _ in item}) == 1 else scoring.loglikelihoods(
                        lm, [c for c, _ in item], [x for _, x in item], soft_prompt=soft_prompt)
            np.testing.assert_allclose(scores, want, atol=1e-4)


def test_cloze_references_run_as_two_labelled_rows(tmp_path):
    task = toy_task()
    import dataclasses

    from spt_jax.tasks.task import ClozeSpec

    task = dataclasses.replace(task, cloze=ClozeSpec(context_template="Q: {question}\nA:"))
    calls = []

    def score_items(lm, items, **_):
        calls.append(len(items))
        # the longest continuation wins by total, the shortest per byte
        return [np.array([-1.0 * len(x) if i else -0.1 for i, (_, x) in enumerate(pairs)]) for pairs in items]

    config = ev.EvalConfig(modes=("zero_shot",), n_test=5, loglik=True, eval_every=0)
    results = ev.evaluate(make_tiny_lm(), task, config, tmp_path, progress=False,
                          backends=ev.Backends(generate=scripted_generate(lambda *a: "A: A"), score_items=score_items))
    modes = [r["mode"] for r in results["results"]]
    assert modes == ["zero_shot", "loglik", "cloze", "cloze_norm"]
    assert calls == [5]  # both CF rows from one scoring pass
    assert all(r["reference"] for r in results["results"][1:])
    table = report.results_table(results)
    assert "CF log-lik. text (ref.)" in table and "CF log-lik. per byte (ref.)" in table and "MCF" in table
    assert {(c["mode_a"], c["mode_b"]) for c in results["comparisons"]} == set()  # references are not paired
    off = ev.evaluate(make_tiny_lm(), task, config.replace(cloze=False), None, progress=False,
                      backends=ev.Backends(generate=scripted_generate(lambda *a: "A: A"), score_items=score_items))
    assert [r["mode"] for r in off["results"]] == ["zero_shot", "loglik"]


# --------------------------------------------------------------------------------------------------
# judges


def test_gold_given_as_choice_text_that_looks_like_an_index_is_the_text():
    spec = AnswerSpec(kind="choice")
    assert spec.canonical_gold("2", field="answer", choices=["1", "2", "3", "4"]) == "B"
    assert spec.canonical_gold("2", field="answer", choices=["x", "y", "z", "w"]) == "C"  # an index otherwise
    assert spec.canonical_gold("C", field="answer", choices=["A", "B", "C", "D"]) == "C"


def test_thousands_separators_only_in_valid_groups():
    assert parse_number("1,234") == 1234 and parse_number("$12,345,678.50") == 12345678.5
    assert parse_number("4,2") is None and parse_number("12,34") is None and parse_number("1,2345") is None
    assert parse_number("42") == 42


def test_chemical_symbols_are_case_sensitive():
    task = get_task("element_symbols")
    cobalt = next(r for s in ("train", "validation", "test") for r in task.records(s)
                  if r["id"].endswith(":symbol") and r["answer"] == "Co")
    assert task.score("Answer: Co", cobalt)[1]
    assert not task.score("Answer: CO", cobalt)[1] and not task.score("Answer: co", cobalt)[1]
    name = next(r for r in task.records("test") if r["id"].endswith(":name_from_symbol"))
    assert task.score("Answer: " + name["answer"].upper(), name)[1]  # names still compare loosely


def test_letters_beyond_the_items_choices_are_invalid():
    task = get_task("capitals_mc")
    r = task.records("test")[0]
    three = dict(r, choices=r["choices"][:3], answer="A")
    parsed, _ = task.score("Answer: D", three)
    assert not parsed.valid
    assert task.score("Answer: A", three) == (task.parse("Answer: A"), True)


def test_vocabulary_init_skips_added_tokens():
    from spt_jax.tune.prompt import regular_token_ids

    lm = make_tiny_lm()
    added = set(lm.tokenizer.added_tokens_decoder)
    assert added and not added & set(regular_token_ids(lm).tolist())


def test_resuming_a_decaying_schedule_with_other_steps_is_refused(tmp_path):
    from tune_support import arithmetic_examples, tiny_lm

    from spt_jax import tune

    lm = tiny_lm()
    config = tune.TuneConfig(prompt_length=2, batch_size=2, steps=2, schedule="cosine", checkpoint_every=1)
    tune.tune(lm, arithmetic_examples(8), config, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="cosine learning-rate schedule spans steps=2"):
        tune.tune(lm, arithmetic_examples(8), config.replace(steps=4), checkpoint_dir=tmp_path, progress=False)
    constant = config.replace(schedule="constant")
    tune.tune(lm, arithmetic_examples(8), constant, checkpoint_dir=tmp_path / "c", progress=False)
    tune.tune(lm, arithmetic_examples(8), constant.replace(steps=3), checkpoint_dir=tmp_path / "c", progress=False)


# --------------------------------------------------------------------------------------------------
# tuning that stops at saturation


def test_saturation_rule():
    from spt_jax.tune.stopping import saturation_step

    assert saturation_step([(0, 0.1), (10, 0.96), (20, 0.96), (30, 0.95)], 0.95, 2) == 10
    assert saturation_step([(0, 0.1), (10, 0.96), (20, 0.98)], 0.95, 2) is None  # still gaining
    assert saturation_step([(0, 0.1), (10, 0.96), (20, 0.98), (30, 0.98), (40, 0.97)], 0.95, 2) == 20
    assert saturation_step([(0, 0.5), (10, 0.9), (20, 0.9), (30, 0.9)], 0.95, 2) is None  # below threshold
    assert saturation_step([(0, 1.0), (10, 1.0)], 0.95, 2) is None  # not enough checks after it yet


def test_tuning_stops_once_the_metric_saturates_and_resumes_stopped(tmp_path):
    from tune_support import arithmetic_examples, tiny_lm

    from spt_jax import tune

    values = iter([0.2, 0.97, 0.97, 0.96, 0.99, 0.99])
    calls = []

    def evaluator(step, prompt):
        calls.append(step)
        return {"format_validity": next(values)}

    config = tune.TuneConfig(prompt_length=2, batch_size=2, steps=20, eval_every=2, stop_metric="format_validity")
    result = tune.tune(tiny_lm(), arithmetic_examples(8), config, evaluator=evaluator, progress=False,
                       checkpoint_dir=tmp_path)
    assert calls == [0, 2, 4, 6] and [h["step"] for h in result.history] == list(range(1, 7))
    assert result.metadata["saturated_at_step"] == 2 and result.metadata["stopped_at_step"] == 6
    again = tune.tune(tiny_lm(), arithmetic_examples(8), config, evaluator=evaluator, progress=False,
                      checkpoint_dir=tmp_path)  # resumes a stopped run: nothing more to do
    assert calls == [0, 2, 4, 6] and again.metadata["stopped_at_step"] == 6
    with pytest.raises(ConfigError, match="needs eval_every"):
        tune.TuneConfig(stop_metric="format_validity")
    with pytest.raises(ConfigError, match="not among the evaluator's metrics"):
        tune.tune(tiny_lm(), arithmetic_examples(8), config.replace(stop_metric="accuracy"),
                  evaluator=lambda s, p: {"format_validity": 1.0}, progress=False)


# --------------------------------------------------------------------------------------------------
# chat templates


def _chat_lm():
    import copy
    import dataclasses

    lm = make_tiny_lm()
    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return dataclasses.replace(lm, tokenizer=tokenizer)


def test_chat_template_wraps_every_mode_as_one_user_turn(tmp_path):
    from spt_jax.sequence import chat_format

    lm = _chat_lm()
    assert chat_format(lm).wrap("hi") == "<|user|>hi<|end|><|assistant|>"
    seen = []

    def generate(lm, texts, *, prefix_text="", soft_prompt=None, **_):
        seen.extend((prefix_text, t, soft_prompt is not None) for t in texts)
        return ["A: 1"] * len(texts)

    def tune(lm, examples, config, **kwargs):
        seen.extend(("train", x, None) for x, _ in examples)
        from spt_jax.tune import tune as real_tune

        return real_tune(lm, examples, config, **kwargs)

    config = ev.EvalConfig(n_test=3, loglik=False, eval_every=0, chat_template=True, k=2,
                           tune=ev.EvalConfig().tune.replace(steps=1, batch_size=2, prompt_length=2))
    results = ev.evaluate(lm, toy_task(), config, tmp_path, progress=False,
                          backends=ev.Backends(generate=generate, tune=tune))
    assert results["config"]["chat_template"] is True
    prefixed = [(p, t) for p, t, soft in seen if p != "train" and not soft]  # zero-shot: the instruction alone
    zero, few = [x for x in prefixed if "Q: " not in x[0]], [x for x in prefixed if "Q: " in x[0]]
    assert zero and all(p.startswith("<|user|>") and t.endswith("<|end|><|assistant|>") for p, t in zero)
    assert few and all(p.startswith("<|user|>") and t.endswith("<|end|><|assistant|>") for p, t in few)
    train = [t for p, t, _ in seen if p == "train"]
    assert train and all(t.startswith("<|user|>") for t in train)


def test_chat_template_on_a_model_without_one_is_a_clear_error(tmp_path):
    config = ev.EvalConfig(modes=("zero_shot",), n_test=2, loglik=False, eval_every=0, chat_template=True)
    with pytest.raises(ConfigError, match="has no chat template"):
        ev.evaluate(make_tiny_lm(), toy_task(), config, None, progress=False)


# --------------------------------------------------------------------------------------------------
# seeds


def test_seeds_tune_independent_prompts_and_report_each_and_their_spread(tmp_path):
    prompts = []

    def generate(lm, texts, *, soft_prompt=None, **_):
        if soft_prompt is not None:
            prompts.append(np.asarray(soft_prompt))
        return ["A: 1"] * len(texts)

    tune = ev.EvalConfig().tune.replace(steps=1, batch_size=2, prompt_length=2, seed=5)
    config = ev.EvalConfig(modes=("zero_shot", "soft_prompt"), n_test=4, loglik=False, eval_every=0, seeds=3,
                           tune=tune)
    results = ev.evaluate(make_tiny_lm(), toy_task(), config, tmp_path, progress=False,
                          backends=ev.Backends(generate=generate))
    block = results["seeds"]
    assert block["n_seeds"] == 3 and [e["tune_seed"] for e in block["per_seed"]] == [5, 6, 7]
    assert all("vs_zero_shot" in e and "vs_few_shot" not in e for e in block["per_seed"])  # few-shot did not run
    assert len(prompts) == 3 and not np.allclose(prompts[0], prompts[1]) and not np.allclose(prompts[1], prompts[2])
    values = [e["accuracy"]["value"] for e in block["per_seed"]]
    assert block["accuracy"] == {"mean": pytest.approx(np.mean(values)), "min": min(values), "max": max(values)}
    assert [r["mode"] for r in results["results"]] == ["zero_shot", "soft_prompt"]  # the first seed's row
    assert "mean [min, max] of 3" in report.seeds_table(results)
    assert "McNemar p vs zero-shot" in report.seeds_table(results) and "vs few-shot" not in report.seeds_table(results)
    # with few-shot run too, each seed is also tested against it (claim b), in its own column
    both = ev.evaluate(make_tiny_lm(), toy_task(), config.replace(modes=("zero_shot", "few_shot", "soft_prompt"),
                                                                    seeds=2), None, progress=False,
                       backends=ev.Backends(generate=generate))
    few = next(r for r in both["results"] if r["mode"] == "few_shot")
    assert few["accuracy"]["value"] == 0.0  # the fake outputs are never right: every test is a tie
    for entry in both["seeds"]["per_seed"]:
        assert entry["vs_few_shot"]["p_value"] == entry["vs_zero_shot"]["p_value"] == 1.0
    lines = report.seeds_table(both).strip().splitlines()
    assert lines[0].endswith("| McNemar p vs zero-shot (accuracy) | McNemar p vs few-shot (accuracy) |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    # the time line counts every seed's tuning, not the first prompt's alone
    assert results["timing"]["modes"]["soft_prompt"]["tune_s"] > results["tuning"]["tune_time_s"] > 0
    assert ev.evaluate(make_tiny_lm(), toy_task(), config.replace(seeds=1), None, progress=False,
                       backends=ev.Backends(generate=generate))["seeds"] is None
    # every seed reports where its validity curve saturated, with no stopping rule set
    curved = config.replace(eval_every=1, n_curve=2, seeds=2, tune=tune.replace(steps=3))
    always_valid = lambda lm, texts, **_: ["A: B"] * len(texts)  # noqa: E731
    block = ev.evaluate(make_tiny_lm(), toy_task(), curved, None, progress=False,
                        backends=ev.Backends(generate=always_valid))["seeds"]
    assert [e["saturated_at_step"] for e in block["per_seed"]] == [0, 0]  # always valid: saturated at once


def test_task_files_declare_cloze_and_lm_eval_forms(tmp_path):
    import json

    from spt_jax.tasks.files import task_from_dict

    for split, rows in {"train": [{"q": "2+2", "choices": ["3", "4"], "answer": "4"}],
                        "test": [{"q": "1+1", "choices": ["2", "5"], "answer": "2"}]}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "tiny_cf", "source": {"type": "jsonl", "paths": {"train": "train.jsonl", "test": "test.jsonl"}},
            "input_template": "Q: {q}\n", "target_template": "A: {answer}",
            "format": {"pattern": "A: (?P<answer>\\d+)"}, "answer": {"kind": "string"},
            "cloze": {"context_template": "Q: {q}\nA:"}, "lm_eval": {"sampler": "first_n"}}
    task = task_from_dict(spec, base_dir=tmp_path, origin="tiny.yaml")
    pairs, gold = task.cloze_pairs(task.records("test")[0])
    assert pairs == [("Q: 1+1\nA:", " 2"), ("Q: 1+1\nA:", " 5")] and gold == 0
    assert task.lm_eval.sampler == "first_n"
    with pytest.raises(ConfigError, match="unknown field 'cloze.pairs'"):
        task_from_dict({**spec, "cloze": {"pairs": "x"}}, base_dir=tmp_path, origin="tiny.yaml")
