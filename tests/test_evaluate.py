"""The evaluation protocol on a tiny random model: files, schema, metric consistency, no overwrite.

The model is a 2-layer DecoderLM with random weights and a byte-level tokenizer built offline, so
its outputs are gibberish (format validity ~0). Where metrics need a real mix of valid, invalid,
correct and wrong answers, generation is replaced by a scripted fake; everything else is real.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spt_jax import evaluate as ev
from spt_jax import metrics, report
from spt_jax.errors import ConfigError, DataError
from spt_jax.models import LM, DecoderLM, ModelConfig
from spt_jax.tasks import AnswerSpec, FormatSpec, InMemorySource, Task
from spt_jax.tune import TuneConfig

# --------------------------------------------------------------------------------------------------
# a tiny model and a tiny task (shared with test_cli.py)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every text round-trips, 3 specials + 256 bytes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def make_tiny_lm(seed: int = 0, name: str = "tiny-random") -> LM:
    config = ModelConfig(model_type="llama", vocab_size=259, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=16, d_ff=64, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_ids=(2,), pad_token_id=0)
    model = DecoderLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    return LM(name=name, config=config, graphdef=graphdef, params=params, tokenizer=byte_tokenizer(),
              dtype=jnp.float32)


def toy_records(n: int, offset: int = 0) -> list[dict]:
    """Two-way multiple choice on small sums: 'Q: 3+4?' with choices ['7', '8'] (gold A or B)."""
    records = []
    for i in range(offset, offset + n):
        a, b = i % 7, (i * 3) % 5
        right, wrong = str(a + b), str(a + b + 1 + i % 2)
        gold = i % 2
        choices = [right, wrong] if gold == 0 else [wrong, right]
        records.append({"id": f"q{i}", "question": f"{a}+{b}?", "choices": choices, "answer": "AB"[gold]})
    return records


def toy_task(name: str = "toy_sums", n_train: int = 12, n_val: int = 6, n_test: int = 10) -> Task:
    return Task(
        name=name,
        source=InMemorySource({"train": toy_records(n_train), "validation": toy_records(n_val, 100),
                               "test": toy_records(n_test, 200)}),
        input_template="Q: {question}\n{choices_text}\n",
        target_template="A: {answer}",
        format=FormatSpec(pattern=r"A: (?P<answer>[AB])", mode="strict", stop_sequences=("\n",)),
        answer=AnswerSpec(kind="choice"),
        instruction="Say A: X.",
        choices_field="choices",
        max_new_tokens=4,
        description="tiny sums",
    )


TINY_TUNE = TuneConfig(steps=3, batch_size=4, prompt_length=2, checkpoint_every=0)


def tiny_config(**changes) -> ev.EvalConfig:
    base = ev.EvalConfig(k=2, seed=0, n_test=6, tune=TINY_TUNE, eval_every=2, n_curve=4, batch_size=4)
    return base.replace(**changes)


@pytest.fixture(scope="module")
def tiny_lm():
    return make_tiny_lm()


def read_predictions(path) -> list[dict]:
    return [json.loads(line) for line in (path / ev.PREDICTIONS_FILE).read_text().splitlines()]


def scripted_generate(answer_for):
    """A stand-in for spt_jax.generate.generate: output = answer_for(lm, input_text, prefix, soft)."""

    def generate(lm, texts, *, soft_prompt=None, prefix_text="", config=None, progress=False, **_):
        return [answer_for(lm, text, prefix_text, soft_prompt is not None) for text in texts]

    return generate


def _scripted_answer(lm, text, prefix_text, soft):
    """Soft prompt: always well formed; few-shot: well formed for odd sums; zero-shot: chatter."""
    question = text.split("Q: ")[-1].split("?")[0]
    a, b = (int(x) for x in question.split("+"))
    if soft:
        return "A: A" if (a + b) % 3 else "A: B"
    if "Q: " in prefix_text:  # demonstrations (zero-shot's prefix is the instruction alone)
        return "A: B\nmore" if (a + b) % 2 else "the answer is B"
    return "I think A"


# --------------------------------------------------------------------------------------------------
# the full protocol on a real (tiny) model


@pytest.fixture(scope="module")
def full_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    results = ev.evaluate(tiny_lm, toy_task(), tiny_config(), out, progress=False)
    return out, results


def test_writes_every_file(full_run):
    out, results = full_run
    for name in (ev.RESULTS_FILE, ev.PREDICTIONS_FILE, ev.REPORT_FILE, ev.PROMPT_FILE,
                 report.METRICS_PLOT, report.CURVE_PLOT):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0
    for png in (report.METRICS_PLOT, report.CURVE_PLOT):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["files"].values()) >= {ev.RESULTS_FILE, ev.PREDICTIONS_FILE, ev.PROMPT_FILE}


def test_results_json_schema(full_run):
    out, results = full_run
    loaded = json.loads((out / ev.RESULTS_FILE).read_text())
    assert ev.load_results(out) == loaded == ev.load_results(out / ev.RESULTS_FILE)
    assert loaded["schema_version"] == ev.SCHEMA_VERSION
    for key in ("created", "model", "task", "n", "seed", "config", "versions", "results", "comparisons",
                "tuning", "wall_time_s", "files"):
        assert key in loaded, key
    assert loaded["model"]["name"] == "tiny-random" and loaded["model"]["d_model"] == 32
    assert loaded["task"]["name"] == "toy_sums" and loaded["task"]["multiple_choice"] is True
    assert {"spt_jax", "jax", "flax", "transformers"} <= set(loaded["versions"])
    assert all(loaded["versions"][k] for k in ("spt_jax", "jax", "flax", "transformers"))
    modes = [row["mode"] for row in loaded["results"]]
    assert modes == ["zero_shot", "few_shot", "soft_prompt", "loglik"]
    for row in loaded["results"]:
        assert row["model"] == "tiny-random" and row["task"] == "toy_sums" and row["n"] == 6
        for metric in ("format_validity", "accuracy", "knowledge_accuracy", "knowledge_accuracy_bootstrap"):
            assert set(row[metric]) == {"value", "low", "high"}
        assert row["wall_time_s"] > 0 and row["seed"] == 0
    by_mode = {row["mode"]: row for row in loaded["results"]}
    assert by_mode["few_shot"]["k"] == 2 and by_mode["few_shot"]["prefix_text"].count("Q: ") == 2
    assert by_mode["soft_prompt"]["tuning_steps"] == 3
    assert by_mode["loglik"]["reference"] is True
    timing = loaded["timing"]  # where the time went: every mode, its compilation, the tuning inside
    assert list(timing["modes"]) == modes
    for mode, entry in timing["modes"].items():
        assert entry["wall_s"] == by_mode[mode]["wall_time_s"] and 0 <= entry["compile_s"] <= entry["wall_s"]
    assert timing["modes"]["soft_prompt"]["tune_s"] == loaded["tuning"]["tune_time_s"]
    assert timing["compile_s"] > 0  # this run compiled its first generation, scoring and tuning steps
    assert timing["evaluate_s"] == loaded["wall_time_s"] and timing["total_s"] >= timing["evaluate_s"]
    assert report.timing_line(loaded).startswith("time: ") and "tuning" in report.timing_line(loaded)
    assert report.timing_line(loaded) in (out / ev.REPORT_FILE).read_text()
    tuning = loaded["tuning"]
    assert tuning["source"] == "tuned" and tuning["steps"] == 3 and tuning["tune_time_s"] > 0
    assert tuning["tune_config"]["steps"] == 3 and tuning["tune_config"]["eval_every"] == 2
    # the validity curve: step 0, every eval_every steps, the end, on the same 4 validation items
    assert [p["step"] for p in tuning["curve"]] == [0, 2, 3]
    assert all(p["n"] == 4 and p["split"] == "validation" for p in tuning["curve"])
    assert loaded["config"]["tune"]["steps"] == 3 and loaded["config"]["modes"] == list(ev.generation_mode_names())
    pairs = {(c["mode_a"], c["mode_b"], c["metric"]) for c in loaded["comparisons"]}
    assert ("zero_shot", "soft_prompt", "accuracy") in pairs and ("few_shot", "soft_prompt", "format_validity") in pairs


def test_schema_doc_names_every_field(full_run):
    from pathlib import Path

    out, results = full_run
    doc = (Path(__file__).parents[1] / "docs" / "results_schema.md").read_text()
    fields = set(results) | set(results["results"][1]) | set(results["tuning"]) | set(results["comparisons"][0])
    fields |= set(results["tuning"]["curve"][0]) | set(read_predictions(out)[0]) | set(results["files"])
    missing = sorted(f for f in fields if f'"{f}"' not in doc)
    assert not missing, f"docs/results_schema.md does not document {missing}"


def test_metrics_match_predictions_jsonl(full_run):
    out, results = full_run
    rows = read_predictions(out)
    assert len(rows) == 4 * 6
    for row in rows:
        assert set(row) >= {"mode", "index", "id", "input", "output", "parsed", "gold", "valid", "correct"}
        assert row["valid"] or not row["correct"]
        assert (row["parsed"] is None) == (not row["valid"])
    _check_consistent(results, rows)
    soft = [r for r in rows if r["mode"] == "soft_prompt"]
    zero = [r for r in rows if r["mode"] == "zero_shot"]
    assert [r["index"] for r in soft] == [r["index"] for r in zero]  # the same items in every mode
    assert zero[0]["input"].startswith("Q: ") and soft[0]["input"].startswith("Q: ")  # after the instruction
    by_mode = {row["mode"]: row for row in results["results"]}
    assert by_mode["zero_shot"]["prefix_text"] == "Say A: X.\n\n"  # zero-shot's cached prefix
    loglik = [r for r in rows if r["mode"] == "loglik"]
    assert all(r["valid"] and r["output"] in ("A: A", "A: B") for r in loglik)


def _check_consistent(results: dict, rows: list[dict]) -> None:
    for summary in results["results"]:
        mine = [r for r in rows if r["mode"] == summary["mode"]]
        valid = [r["valid"] for r in mine]
        correct = [r["correct"] for r in mine]
        assert summary["n"] == len(mine)
        assert summary["n_valid"] == sum(valid) and summary["n_correct"] == sum(correct)
        assert summary["format_validity"]["value"] == pytest.approx(metrics.format_validity(valid))
        assert summary["accuracy"]["value"] == pytest.approx(metrics.accuracy(correct, valid))
        expected = metrics.knowledge_accuracy(valid, correct)
        got = summary["knowledge_accuracy"]["value"]
        assert (got is None or math.isnan(got)) if math.isnan(expected) else got == pytest.approx(expected)
    for comparison in results["comparisons"]:
        a = [r for r in rows if r["mode"] == comparison["mode_a"]]
        b = [r for r in rows if r["mode"] == comparison["mode_b"]]
        key = "correct" if comparison["metric"] == "accuracy" else "valid"
        expected = metrics.mcnemar([r[key] for r in a], [r[key] for r in b])
        assert comparison["p_value"] == pytest.approx(expected["p_value"])
        assert (comparison["b"], comparison["c"]) == (expected["b"], expected["c"])


def test_prompt_file_loads_back_and_evaluates(full_run, tiny_lm, tmp_path):
    from spt_jax.tune import load_prompt

    out, _ = full_run
    prompt, metadata = load_prompt(out / ev.PROMPT_FILE, tiny_lm)
    assert prompt.shape == (2, 32)
    assert metadata["task"] == "toy_sums" and metadata["steps"] == 3
    config = tiny_config(modes=("soft_prompt",), prompt_file=str(out / ev.PROMPT_FILE), loglik=False)
    again = ev.evaluate(tiny_lm, toy_task(), config, tmp_path / "again", progress=False)
    assert again["tuning"]["source"] == str(out / ev.PROMPT_FILE)
    first = [r for r in read_predictions(out) if r["mode"] == "soft_prompt"]
    second = read_predictions(tmp_path / "again")
    assert [r["output"] for r in second] == [r["output"] for r in first]  # greedy + same prompt


def test_results_markdown_table(full_run):
    out, results = full_run
    text = (out / ev.REPORT_FILE).read_text()
    assert text == report.results_markdown(results)
    table = report.results_table(results)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| mode | n | format validity")
    assert len(lines) == 2 + 4
    assert "2-shot" in table and "soft prompt (3 steps)" in table and "zero-shot" in table
    assert "McNemar" in text and "Tuning curve" in text
    # under the table: every generation mode against every earlier one -- the soft prompt against
    # zero-shot and few-shot both (claim b) -- with the discordant counts of the paired test
    pairs = {(c["mode_a"], c["mode_b"]): c for c in results["comparisons"] if c["metric"] == "accuracy"}
    headline = [line for line in report.headline_lines(results) if "McNemar" in line]
    assert [line.split(":")[0] for line in headline] == [
        "few-shot vs zero-shot", "soft prompt vs zero-shot", "soft prompt vs few-shot"]
    few_vs_soft = pairs["few_shot", "soft_prompt"]
    assert headline[2].endswith(f"McNemar p = {few_vs_soft['p_value']:.3g} (right only with soft prompt: "
                                f"{few_vs_soft['c']} items, only few-shot: {few_vs_soft['b']})")


def test_existing_results_are_not_overwritten(full_run, tiny_lm):
    out, _ = full_run
    before = (out / ev.RESULTS_FILE).read_text()
    with pytest.raises(ConfigError, match="already holds results"):
        ev.evaluate(tiny_lm, toy_task(), tiny_config(modes=("zero_shot",)), out, progress=False)
    assert (out / ev.RESULTS_FILE).read_text() == before


def test_overwrite_replaces_results(tiny_lm, tmp_path):
    config = tiny_config(modes=("zero_shot",), loglik=False, n_test=3)
    ev.evaluate(tiny_lm, toy_task(), config, tmp_path, progress=False)
    (tmp_path / report.CURVE_PLOT).write_bytes(b"from an older run")
    (tmp_path / "notes.txt").write_text("the user's own file")
    results = ev.evaluate(tiny_lm, toy_task(), config.replace(n_test=4), tmp_path, overwrite=True,
                          progress=False)
    assert json.loads((tmp_path / ev.RESULTS_FILE).read_text())["n"] == 4 == results["n"]
    assert len(read_predictions(tmp_path)) == 4
    assert not (tmp_path / report.CURVE_PLOT).exists()  # no stale output survives an overwrite
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # nothing else is touched


# --------------------------------------------------------------------------------------------------
# metrics with a scripted generator (a real mix of valid / invalid / right / wrong)


def test_scripted_outputs_give_the_expected_metrics(tiny_lm, tmp_path):
    backends = ev.Backends(generate=scripted_generate(_scripted_answer))
    task = toy_task(n_test=10)
    config = tiny_config(n_test=None, modes=("zero_shot", "few_shot"), loglik=False)
    results = ev.evaluate(tiny_lm, task, config, tmp_path, progress=False, backends=backends)
    rows = read_predictions(tmp_path)
    _check_consistent(results, rows)
    by_mode = {row["mode"]: row for row in results["results"]}
    assert by_mode["zero_shot"]["format_validity"]["value"] == 0.0
    assert by_mode["zero_shot"]["accuracy"]["value"] == 0.0
    test = task.records("test")
    odd = [r for r in test if sum(map(int, r["question"][:-1].split("+"))) % 2]
    assert by_mode["few_shot"]["n_valid"] == len(odd) and 0 < len(odd) < len(test)
    # "A: B\nmore" is cut at the stop sequence and parses; correct exactly when gold is B
    assert by_mode["few_shot"]["n_correct"] == sum(r["answer"] == "B" for r in odd)
    few = [r for r in rows if r["mode"] == "few_shot"]
    assert all(r["parsed"] == "B" for r in few if r["valid"])
    assert by_mode["few_shot"]["knowledge_accuracy"]["value"] == pytest.approx(
        by_mode["few_shot"]["n_correct"] / len(odd))


def test_n_test_is_a_seeded_sample_shared_by_modes(tiny_lm):
    task = toy_task(n_test=10)
    first = ev.select_test(task, 4, seed=3)
    assert first == ev.select_test(task, 4, seed=3)
    assert [i for i, _ in first] == sorted(i for i, _ in first)
    assert [i for i, _ in ev.select_test(task, 4, seed=4)] != [i for i, _ in first]
    assert len(ev.select_test(task, None, 0)) == 10 == len(ev.select_test(task, 50, 0))


# --------------------------------------------------------------------------------------------------
# bad input fails before any model work (lm=None proves it)


def test_bad_data_fails_before_touching_the_model(tmp_path):
    with pytest.raises(DataError, match="5-shot needs 5 train records"):
        ev.evaluate(None, toy_task(n_train=3), tiny_config(k=5), tmp_path / "a", progress=False)
    empty = Task(name="empty_test", source=InMemorySource({"train": toy_records(3), "test": []}),
                 input_template="Q: {question}\n{choices_text}\n", target_template="A: {answer}",
                 format=FormatSpec(pattern=r"A: (?P<answer>[AB])"), answer=AnswerSpec(kind="choice"),
                 choices_field="choices")
    with pytest.raises(DataError, match="split 'test' is empty"):
        ev.evaluate(None, empty, tiny_config(), tmp_path / "b", progress=False)
    missing = Task(name="missing_field", source=InMemorySource({"train": toy_records(3), "test": [{"q": 1}]}),
                   input_template="Q: {question}\n", target_template="A: {answer}",
                   format=FormatSpec(pattern=r"A: (?P<answer>\w+)"), answer=AnswerSpec(kind="string"))
    with pytest.raises(DataError, match=r"\{question\}"):
        ev.evaluate(None, missing, tiny_config(loglik=False), tmp_path / "c", progress=False)


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="did you mean 'soft_prompt'"):
        ev.EvalConfig(modes=("zero_shot", "soft_promt"), tune=TINY_TUNE)
    with pytest.raises(ConfigError, match="n_test must be an integer >= 1"):
        ev.EvalConfig(n_test=0, tune=TINY_TUNE)
    with pytest.raises(ConfigError, match="name a mode twice"):
        ev.EvalConfig(modes=("zero_shot", "zero_shot"), tune=TINY_TUNE)
    assert ev.EvalConfig(modes="few_shot", tune=TINY_TUNE).modes == ("few_shot",)
    assert ev.EvalConfig().tune == TuneConfig()  # the method's defaults: 80 steps at batch 8
    assert (ev.EvalConfig().tune.steps, ev.EvalConfig().tune.batch_size, ev.EvalConfig().k) == (80, 8, 5)
    as_dict = tiny_config().to_dict()
    assert json.loads(json.dumps(as_dict))["tune"]["steps"] == 3


def test_eval_config_from_dict():
    config = ev.eval_config_from_dict({"n_test": 7, "steps": 5, "modes": ["zero_shot"]}, "cfg")
    assert (config.n_test, config.tune.steps, config.modes) == (7, 5, ("zero_shot",))
    with pytest.raises(ConfigError, match=r"cfg: unknown field 'eval.n_tset'.*did you mean 'n_test'"):
        ev.eval_config_from_dict({"n_tset": 7}, "cfg")
    with pytest.raises(ConfigError, match="cfg: .*steps"):
        ev.eval_config_from_dict({"steps": 0}, "cfg")


# --------------------------------------------------------------------------------------------------
# compare: models x tasks -> tables and rank correlations


def _skill_answer(lm, text, prefix_text, soft):
    """Models differ in skill: 'tiny-k' answers the first k-ish items right (soft prompt adds one)."""
    skill = int(lm.name.split("-")[-1]) + (1 if soft else 0)
    question = text.split("Q: ")[-1].split("?")[0]
    a, b = (int(x) for x in question.split("+"))
    return "A: A" if (a + 2 * b) % 6 < skill else "A: C"


def test_compare_tables_and_rank_correlations(monkeypatch, tmp_path):
    import spt_jax.tasks

    backends = ev.Backends(generate=scripted_generate(_skill_answer))
    # registered for this test only (monkeypatch restores the registry)
    monkeypatch.setitem(spt_jax.tasks._REGISTRY, "toy_sums_compare", toy_task("toy_sums_compare"))
    loaded = []

    def load_model(path, dtype="float32"):
        loaded.append(path)
        lm = make_tiny_lm()
        return dataclasses.replace(lm, name=path)

    spec = {
        "tasks": ["toy_sums_compare"],
        "models": ["tiny-1", {"name": "tiny-3"}, {"name": "tiny-5", "path": "tiny-5"},
                   {"name": "tiny-4", "base": "tiny-1"}, {"name": "tiny-2", "base": "tiny-3"},
                   {"name": "tiny-6", "base": "tiny-5", "role": "post_trained"}],
        "eval": {"modes": ["zero_shot", "soft_prompt"], "n_test": 8, "steps": 1, "eval_every": 0,
                 "loglik": False, "tune_batch_size": 2, "prompt_length": 2},
    }
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps(spec))
    summary = ev.compare(path, tmp_path / "out", progress=False, load_model=load_model, backends=backends)
    assert loaded == ["tiny-1", "tiny-3", "tiny-5", "tiny-4", "tiny-2", "tiny-6"]
    assert (tmp_path / "out" / ev.COMPARE_FILE).is_file() and (tmp_path / "out" / "compare.md").is_file()
    assert (tmp_path / "out" / "tiny-4" / "toy_sums_compare" / ev.RESULTS_FILE).is_file()
    block = summary["per_task"]["toy_sums_compare"]
    scores = block["scores"]
    assert set(scores) == {"tiny-1", "tiny-2", "tiny-3", "tiny-4", "tiny-5", "tiny-6"}
    correlations = {(c["x"], c["y"]): c for c in block["rank_correlations"]}
    assert set(correlations) == {("zero_shot", "soft_prompt"), ("base:soft_prompt", "post_trained:zero_shot")}
    paired = correlations[("base:soft_prompt", "post_trained:zero_shot")]
    assert paired["pairs"] == [["tiny-1", "tiny-4"], ["tiny-3", "tiny-2"], ["tiny-5", "tiny-6"]]
    x = [scores[b]["soft_prompt"]["accuracy"] for b, _ in paired["pairs"]]
    y = [scores[p]["zero_shot"]["accuracy"] for _, p in paired["pairs"]]
    assert paired["x_scores"] == x and paired["y_scores"] == y
    expected = metrics.rank_correlation(x, y, seed=0)
    assert paired["kendall_tau_b"]["value"] == pytest.approx(expected["kendall_tau_b"]["value"])
    assert paired["spearman"]["value"] == pytest.approx(expected["spearman"]["value"])
    # skill grows with the number in the name, so the two modes rank all six models alike
    everyone = correlations[("zero_shot", "soft_prompt")]
    assert everyone["n"] == 6 and everyone["kendall_tau_b"]["value"] > 0.5
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "## toy_sums_compare" in markdown and "Kendall tau-b" in markdown and "post_trained" in markdown
    with pytest.raises(ConfigError, match="already holds compare results"):
        ev.compare(path, tmp_path / "out", progress=False, load_model=load_model)


def test_rank_correlations_note_undefined_cases():
    models = [ev.ModelSpec("a", "a"), ev.ModelSpec("b", "b")]
    scores = {"a": {"zero_shot": {"accuracy": 0.5}, "soft_prompt": {"accuracy": 0.2}},
              "b": {"zero_shot": {"accuracy": 0.5}, "soft_prompt": {"accuracy": 0.9}}}
    (entry,) = ev.rank_correlations(scores, models, [("zero_shot", "soft_prompt")], "accuracy")
    assert entry["n"] == 2 and entry["kendall_tau_b"]["value"] is not None
    assert math.isnan(entry["kendall_tau_b"]["value"]) and "constant" in entry["note"]


@pytest.mark.parametrize("spec, expected", [
    ({"tasks": ["yes_no"]}, "'models' must be a non-empty list"),
    ({"models": ["m"], "tasks": []}, "'tasks' must be a non-empty list"),
    ({"models": ["m"], "tasks": ["yes_no"], "modles": 1}, "unknown field 'modles'.*did you mean 'models'"),
    ({"models": [{"name": "m", "base": "x"}], "tasks": ["yes_no"]}, "names base 'x'"),
    ({"models": ["m", "m"], "tasks": ["yes_no"]}, "must be unique"),
    ({"models": ["m"], "tasks": ["yes_no"], "correlate": [["zero_shot", "sof"]]}, "mode 'sof' is not evaluated"),
    ({"models": ["m"], "tasks": ["yes_no"], "metric": "f1"}, "metric must be one of"),
])
def test_bad_compare_configs(spec, expected, tmp_path):
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=expected):
        ev.load_compare_config(path)


def test_compare_config_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models: [a\ntasks: b\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line \d+: malformed YAML"):
        ev.load_compare_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        ev.load_compare_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        ev.load_compare_config(tmp_path / "c.txt")


def test_load_results_errors(tmp_path):
    with pytest.raises(ConfigError, match="no results file"):
        ev.load_results(tmp_path)
    (tmp_path / ev.RESULTS_FILE).write_text('{"n": 1,\n oops}')
    with pytest.raises(DataError, match=r"results\.json, line 2: malformed JSON"):
        ev.load_results(tmp_path)


def test_timestamped_dirs_never_collide(tmp_path):
    first = ev.timestamped_dir(tmp_path, "m_t")
    second = ev.timestamped_dir(tmp_path, "m_t")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("_m_t") and second.name.endswith("_m_t-2")


def test_plots_handle_undefined_values(tmp_path):
    results = {"model": {"name": "m"}, "task": {"name": "t"}, "n": 3, "results": [
        {"mode": "zero_shot", "n": 3, "format_validity": {"value": 0.0, "low": 0.0, "high": 0.5},
         "accuracy": {"value": 0.0, "low": 0.0, "high": 0.5},
         "knowledge_accuracy": {"value": None, "low": None, "high": None}}]}
    path = report.plot_metrics_by_mode(results, tmp_path / "m.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "n/a" in report.results_table(results)
    assert report.fmt_estimate({"value": float("nan")}) == "n/a"
    assert report.fmt_estimate({"value": 0.5, "low": 0.25, "high": 0.75}) == "0.500 [0.25, 0.75]"


def test_jsonable_results_have_no_nan(full_run):
    out, _ = full_run
    text = (out / ev.RESULTS_FILE).read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
    for line in (out / ev.PREDICTIONS_FILE).read_text().splitlines():
        json.loads(line)
    assert np.isfinite(json.loads(text)["wall_time_s"])


def test_shipped_experiment_config_and_notebook_are_valid():
    from pathlib import Path

    root = Path(__file__).parents[1]
    config = ev.load_compare_config(root / "experiments" / "compare_embedded.yaml")
    assert [m.name for m in config.models] == ["gemma3-270m", "smollm2-135m-instruct"]
    assert config.eval.tune.steps == 80 and config.eval.k == 5
    notebook = json.loads((root / "notebooks" / "quickstart.ipynb").read_text())
    assert notebook["nbformat"] == 4
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert any("evaluate.evaluate(" in source for source in code)
    for source in code:
        compile(source, "quickstart.ipynb", "exec")  # valid Python; not executed here
