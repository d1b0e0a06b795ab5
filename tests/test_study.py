"""The claim-(d) study (experiments/study/, experiments/d_ranking_study.py) and the library API it uses.

Fast tests: the world generator (determinism, the split by person, every answer written in the
biographies), the tokenizer and rows, the benchmark task, training and checkpoints on a tiny model,
and `spt_jax.evaluate.mode_scores` / `mode_correlations`. Slow: one end-to-end ``--quick`` study
(then a resume that retrains nothing) and the study notebook executed on its folder.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spt_jax import evaluate as ev
from spt_jax.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from study import benchmark, data, train  # noqa: E402
from study import world as w  # noqa: E402
from study.recipes import QUICK_RECIPES, RECIPES, SCALES, ModelShape  # noqa: E402

STYLES = [w.BioStyle(n_bios=n, permute=p, full_names=f) for n in (1, 3) for p in (False, True) for f in (False, True)]


@pytest.fixture(scope="module")
def small_world():
    return w.make_world(120, seed=3)


# --------------------------------------------------------------------------------------------------
# the world


def test_world_is_determined_by_its_seed():
    a, b, c = w.make_world(150, seed=1), w.make_world(150, seed=1), w.make_world(150, seed=2)
    assert a == b
    assert a.people != c.people
    style = w.BioStyle(n_bios=2, permute=True)
    assert w.biographies(a, style, seed=5) == w.biographies(b, style, seed=5)
    assert w.biographies(a, style, seed=5) != w.biographies(a, style, seed=6)


def test_people_have_unique_names_and_attributes_from_the_closed_sets(small_world):
    names = [p.name for p in small_world.people]
    assert len(set(names)) == len(names)
    for p in small_world.people:
        for attribute in w.ATTRIBUTES:
            assert p.value(attribute) in w.VALUES[attribute]


def test_the_split_is_by_person_disjoint_and_complete(small_world):
    train_ids, test_ids = set(small_world.train_ids), set(small_world.test_ids)
    assert train_ids and test_ids and not train_ids & test_ids
    assert train_ids | test_ids == set(range(len(small_world.people)))
    task = benchmark.make_task(small_world)
    train_people = {r["person"] for r in task.records("train")}
    test_people = {r["person"] for r in task.records("test")}
    assert train_people == train_ids and test_people == test_ids
    test_names = {small_world.people[i].name for i in test_ids}
    assert not any(f" {name} " in r["question"] for r in task.records("train") for name in test_names)


@pytest.mark.parametrize("style", STYLES, ids=lambda s: f"bios{s.n_bios}-perm{int(s.permute)}-names{int(s.full_names)}")
def test_every_answer_is_written_in_every_biography_of_the_person(small_world, style):
    bios = w.biographies(small_world, style, seed=0)
    assert len(bios) == style.n_bios * len(small_world.people)
    by_person = {p.id: bios[i * style.n_bios:(i + 1) * style.n_bios] for i, p in enumerate(small_world.people)}
    for record in w.qa_records(list(small_world.people)):
        person = small_world.people[record["person"]]
        assert person.name in record["question"]
        for bio in by_person[person.id]:
            assert re.search(rf"(^| ){re.escape(record['answer'])}( |$)", bio), (record, bio)
            assert bio.startswith(person.name + " ") or f" {person.name} " in bio
            assert bio.count(person.name) == (len(w.SENTENCE_ORDER) if style.full_names else 1)


def test_permutation_and_paraphrase_change_the_text(small_world):
    person = small_world.people[0]
    fixed = [w.biography(person, w.BioStyle(), np.random.default_rng(i)) for i in range(20)]
    permuted = [w.biography(person, w.BioStyle(permute=True), np.random.default_rng(i)) for i in range(20)]
    first_fact = lambda bio: bio.split(" . ")[0]  # noqa: E731
    assert all(person.birth_city in first_fact(b) for b in fixed)  # fixed order: birth city first
    assert not all(person.birth_city in first_fact(b) for b in permuted)
    assert len(set(fixed)) > 1  # paraphrases differ even in a fixed order


# --------------------------------------------------------------------------------------------------
# tokenizer, rows, task


@pytest.fixture(scope="module")
def tokenizer(small_world):
    return data.build_tokenizer(data.world_words(small_world, (benchmark.INSTRUCTION,)))


def test_the_tokenizer_covers_every_text_and_round_trips_answers(small_world, tokenizer):
    task = benchmark.make_task(small_world)
    texts = [b for s in STYLES for b in w.biographies(small_world, s, seed=1)]
    texts += [task.zero_shot_prompt(r) + task.render_target(r) for r in task.records("test")]
    texts.append(task.fewshot_prefix(3, 0))
    data.encode_all(tokenizer, texts)  # raises on a word outside the vocabulary
    for record in task.records("test")[:50]:
        target = task.render_target(record)
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == target
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and tokenizer.decode(newline) == "\n"  # the stop sequence is one token
    with pytest.raises(ValueError, match="outside the world's vocabulary"):
        data.encode_all(tokenizer, ["Zzyzx was born in Arvel ."])


def test_gold_targets_parse_and_the_format_is_strict(small_world):
    task = benchmark.make_task(small_world)
    for record in task.records("train") + task.records("test"):
        parsed, correct = task.score(task.render_target(record), record)
        assert parsed.valid and correct and parsed.answer == record["answer"]
    record = task.records("test")[0]
    assert not task.parse("Answer: Paris").valid  # not a value of the closed sets
    assert not task.parse(f"Answer: {record['answer']} Question: Where").valid  # chatter after the answer
    assert not task.parse(record["answer"]).valid
    assert task.parse(f"Answer: {record['answer']} \n Question:").valid  # cut at the stop sequence


def test_packing_keeps_every_document_whole_and_once(tokenizer):
    docs = [[5 + i] * (3 + i % 7) for i in range(40)]
    eos = tokenizer.eos_token_id
    tokens, valid = data.pack_documents(docs, 16, eos, np.random.default_rng(0))
    found = []
    for row, mask in zip(tokens, valid):
        assert mask[: mask.sum()].all()  # valid tokens first, padding after
        kept = row[mask].tolist()
        assert kept[-1] == eos  # each row ends with a document's EOS
        doc: list[int] = []
        for t in kept:
            if t == eos:
                found.append(tuple(doc))
                doc = []
            else:
                doc.append(t)
    assert sorted(found) == sorted(tuple(d) for d in docs)
    with pytest.raises(ValueError, match="does not fit"):
        data.pack_documents([[5] * 20], 16, eos, np.random.default_rng(0))


def test_sft_rows_score_only_the_target_and_eos(small_world, tokenizer):
    task = benchmark.make_task(small_world)
    record = task.records("train")[0]
    prompt, target = task.zero_shot_prompt(record), task.render_target(record)
    tokens, valid, loss_mask = data.sft_rows(tokenizer, [(prompt, target)])
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    scored = tokens[0][loss_mask[0]].tolist()
    assert scored == tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert not loss_mask[0][:n_prompt].any() and valid[0].sum() == n_prompt + len(scored)


def test_qa_share_sets_the_share_of_qa_words(small_world):
    style = w.BioStyle(n_bios=2)
    docs = data.pretraining_documents(small_world, style, 0.25, seed=0)
    qa_words = sum(len(data.split_words(d)) for d in docs if d.startswith("Question:"))
    all_words = sum(len(data.split_words(d)) for d in docs)
    assert abs(qa_words / all_words - 0.25) < 0.02
    test_names = {small_world.people[i].name for i in small_world.test_ids}
    assert not any(f" {n} " in d for d in docs if d.startswith("Question:") for n in test_names)  # never the benchmark half
    assert data.pretraining_documents(small_world, style, 0.0, seed=0) == w.biographies(small_world, style, 0)


def test_general_qa_teaches_the_format_but_no_person(small_world):
    task = benchmark.make_task(small_world)
    general = w.general_qa_records(small_world)
    assert len(general) > 50
    for record in general:
        assert task.parse(f"Answer: {record['answer']}").answer == record["answer"]  # a valid answer
        assert not any(f" {p.name} " in f" {record['question']} " for p in small_world.people)
    docs = data.pretraining_documents(small_world, w.BioStyle(), 0.0, seed=0, general_share=0.1)
    qa_words = sum(len(data.split_words(d)) for d in docs if d.startswith("Question:"))
    assert abs(qa_words / sum(len(data.split_words(d)) for d in docs) - 0.1) < 0.02


def test_recipes_spread_over_the_knobs_the_issue_names():
    assert len(RECIPES) >= 6
    assert {r.style.n_bios for r in RECIPES} >= {1, 5}
    assert {r.style.permute for r in RECIPES} == {False, True}
    assert {r.style.full_names for r in RECIPES} == {False, True}
    assert any(r.qa_share > 0 for r in RECIPES) and any(r.qa_share == 0 for r in RECIPES)
    scale = SCALES["full"]
    assert len({scale.recipe_model(r) for r in RECIPES}) > 1 and len({scale.recipe_steps(r) for r in RECIPES}) > 1


# --------------------------------------------------------------------------------------------------
# training and checkpoints on a tiny model


def test_training_lowers_the_loss_and_checkpoints_round_trip(small_world, tokenizer, tmp_path):
    import jax.numpy as jnp

    config = train.model_config(ModelShape(d_model=32, n_layers=1, n_heads=2, d_ff=64), tokenizer)
    ids = data.encode_all(tokenizer, w.biographies(small_world, w.BioStyle(), seed=0)[:40])

    def make_rows(rng):
        tokens, valid = data.pack_documents(ids, 64, tokenizer.eos_token_id, rng)
        return tokens, valid, valid

    graphdef, params = train.init_params(config, seed=0)
    params, log = train.train(graphdef, params, train.epoch_batches(make_rows, 4, 0), steps=40,
                              learning_rate=1e-2, warmup=2)
    assert log.final_loss < log.first_loss - 1.0, log
    path = tmp_path / "m.safetensors"
    train.save_params(path, params, config, {"stage": "test"})
    graphdef2, loaded = train.load_params(path, config)
    lm, lm2 = (train.as_lm("m", config, g, p, tokenizer) for g, p in ((graphdef, params), (graphdef2, loaded)))
    tokens = jnp.asarray(ids[0][:20])[None]
    np.testing.assert_array_equal(np.asarray(lm.logits(tokens)), np.asarray(lm2.logits(tokens)))
    other = train.model_config(ModelShape(d_model=16, n_layers=1, n_heads=2, d_ff=64), tokenizer)
    with pytest.raises(ValueError, match="shape"):
        train.load_params(path, other)


# --------------------------------------------------------------------------------------------------
# the library API: mode_scores, mode_correlations


def test_mode_scores_reads_one_value_per_mode():
    results = {"results": [{"mode": "zero_shot", "accuracy": {"value": 0.25}, "format_validity": {"value": 0.5}},
                           {"mode": "soft_prompt", "accuracy": {"value": 0.75}, "format_validity": {"value": 1.0}}]}
    assert ev.mode_scores(results) == {"zero_shot": 0.25, "soft_prompt": 0.75}
    assert ev.mode_scores(results, "format_validity") == {"zero_shot": 0.5, "soft_prompt": 1.0}
    with pytest.raises(ConfigError, match="metric must be one of"):
        ev.mode_scores(results, "acc")
    with pytest.raises(DataError, match="'results' list"):
        ev.mode_scores({"rows": []})


def test_mode_correlations_ranks_each_mode_against_the_target():
    target = {"a": 0.1, "b": 0.4, "c": 0.5, "d": 0.9}
    scores = {"a": {"good": 0.2, "bad": 0.9, "flat": 0.0}, "b": {"good": 0.3, "bad": 0.6, "flat": 0.0},
              "c": {"good": 0.6, "bad": 0.5, "flat": 0.0}, "d": {"good": 0.7, "bad": 0.1, "flat": 0.0}}
    out = ev.mode_correlations(scores, target, n_resamples=200)
    assert list(out) == ["good", "bad", "flat"]
    assert out["good"]["kendall_tau_b"]["value"] == pytest.approx(1.0)
    assert out["good"]["spearman"]["value"] == pytest.approx(1.0)
    assert out["bad"]["kendall_tau_b"]["value"] == pytest.approx(-1.0)
    assert out["good"]["n"] == 4 and out["good"]["checkpoints"] == ["a", "b", "c", "d"]
    low, high = out["good"]["kendall_tau_b"]["low"], out["good"]["kendall_tau_b"]["high"]
    assert low <= 1.0 <= high + 1e-12
    assert math.isnan(out["flat"]["kendall_tau_b"]["value"]) and "note" in out["flat"]  # all tied: undefined
    partial = ev.mode_correlations({**scores, "e": {"good": float("nan")}}, {**target, "e": 0.3}, modes=["good"])
    assert partial["good"]["left_out"] == ["e"] and partial["good"]["n"] == 4


def test_mode_correlations_refuses_a_checkpoint_without_a_target():
    with pytest.raises(DataError, match="no target score for 'b'"):
        ev.mode_correlations({"a": {"m": 0.1}, "b": {"m": 0.2}}, {"a": 0.3})


def test_mode_correlations_is_what_rank_correlation_says():
    from spt_jax import metrics

    rng = np.random.default_rng(0)
    x, y = rng.random(9), rng.random(9)
    names = [f"m{i}" for i in range(9)]
    out = ev.mode_correlations({n: {"m": float(v)} for n, v in zip(names, x)}, dict(zip(names, map(float, y))),
                               seed=3)
    direct = metrics.rank_correlation(x, y, seed=3)
    assert out["m"]["kendall_tau_b"] == direct["kendall_tau_b"] and out["m"]["spearman"] == direct["spearman"]


# --------------------------------------------------------------------------------------------------
# end to end: the --quick study, its resume, the notebook


def _run_quick(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "d_ranking_study.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "quick"
    proc = _run_quick(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_quick_study_writes_its_results(quick_study):
    out, proc = quick_study
    for name in ("study.json", "summary.md", "correlations.png", "scatter.png", "study_config.json"):
        assert (out / name).is_file(), name
    for png in ("correlations.png", "scatter.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "study.json").read_text())
    assert [r["recipe"] for r in study["models"]] == list(QUICK_RECIPES) and len(QUICK_RECIPES) >= 6
    for record in study["models"]:
        assert set(record["base"]) == {"zero_shot", "few_shot", "soft_prompt"} and set(record["post"]) == {"zero_shot"}
        folder = out / "models" / record["model"]
        for name in ("base.safetensors", "post.safetensors", "eval_base/results.json", "eval_post/results.json"):
            assert (folder / name).is_file(), (record["model"], name)
        assert record["pretrain"]["final_loss"] < record["pretrain"]["first_loss"]
    for scope in ("over_models", "over_recipes"):
        assert set(study["correlations"]["accuracy"][scope]) == {"zero_shot", "few_shot", "soft_prompt"}
    summary = (out / "summary.md").read_text()
    assert "## Verdict" in summary and "Kendall tau-b" in summary and "bio1_fixed_pronoun" in summary


@pytest.mark.slow
def test_quick_study_resumes_where_it_stopped(quick_study):
    """An interrupted study (here: one model lost its post-training) redoes only what is missing."""
    import shutil

    out, first = quick_study
    assert re.search(r"pre-training [\d,]+ parameters", first.stdout) and "SFT for" in first.stdout
    victim = sorted((out / "models").iterdir())[0]
    shutil.rmtree(victim / "eval_post")
    (victim / "post.safetensors").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*.safetensors")}
    proc = _run_quick(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"pre-training [\d,]+ parameters", proc.stdout)
    assert proc.stdout.count("SFT for") == 1 and proc.stdout.count("base model loaded") == len(QUICK_RECIPES)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing else was retrained
    assert (victim / "post.safetensors").is_file() and (victim / "eval_post" / "results.json").is_file()


@pytest.mark.slow
def test_a_study_folder_refuses_other_settings(quick_study):
    out, _ = quick_study
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "d_ranking_study.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode != 0 and "other settings" in proc.stderr


@pytest.mark.slow
def test_the_study_notebook_runs_on_a_study_folder(quick_study):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out, _ = quick_study
    nb = nbformat.read(ROOT / "notebooks" / "study_results.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored with outputs"
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    params[0].source = f"STUDY_DIR = {str(out)!r}"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "soft prompt" in text and "Kendall" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook showed no plot"
