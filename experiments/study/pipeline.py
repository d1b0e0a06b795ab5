"""One model's life in the study, resumable stage by stage: pre-train, evaluate the base model in
every mode, post-train (SFT), evaluate the post-trained model.

Each stage leaves a file in the model's folder (``base.safetensors``, ``eval_base/results.json``,
``post.safetensors``, ``eval_post/results.json``); a stage whose file exists is loaded, not redone,
so an interrupted study resumes at the first missing one. Evaluation goes through the library's
public `spt_jax.evaluate.evaluate`, which writes each evaluation folder whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from spt_jax import evaluate as ev
from spt_jax.tune import TuneConfig

from . import data, train
from .recipes import Recipe, Scale
from .world import World

BASE_MODES = ("zero_shot", "few_shot", "soft_prompt")
POST_MODES = ("zero_shot",)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every model of one study shares: the world, its tokenizer, the benchmark, the scale."""

    world: World
    tokenizer: object
    task: object
    scale: Scale


def model_id(recipe: Recipe, seed: int) -> str:
    return f"{recipe.name}-s{seed}"


def eval_config(scale: Scale, modes: tuple[str, ...], seed: int) -> ev.EvalConfig:
    """The benchmark protocol at this scale; the test items (``seed=0``) are the same for every model."""
    tune = TuneConfig(steps=scale.tune_steps, batch_size=scale.tune_batch_size, prompt_length=scale.prompt_length,
                      seed=seed, max_length=128, remat=False, checkpoint_every=0)
    return ev.EvalConfig(modes=modes, k=scale.k, seed=0, n_test=scale.n_test, tune=tune, eval_every=0,
                         batch_size=scale.eval_batch_size, dtype="float32", mesh=None)


def pretrain_rows(setting: Setting, recipe: Recipe, seed: int):
    """``rng -> one epoch's packed rows``: the corpus is tokenized once, re-shuffled each epoch."""
    docs = data.pretraining_documents(setting.world, recipe.style, recipe.qa_share, seed, recipe.general_share)
    ids = data.encode_all(setting.tokenizer, docs)
    eos, seq_len = setting.tokenizer.eos_token_id, setting.scale.seq_len

    def make_rows(rng):
        tokens, valid = data.pack_documents(ids, seq_len, eos, rng)
        return tokens, valid, valid

    return make_rows, {"documents": len(docs), "tokens": int(sum(len(d) + 1 for d in ids))}


def sft_pairs(setting: Setting) -> list[tuple[str, str]]:
    """Post-training data: every QA pair about the post-training half, prompted as zero-shot is."""
    task = setting.task
    return [(task.zero_shot_prompt(r), task.render_target(r)) for r in task.records("train")]


def run_model(setting: Setting, recipe: Recipe, seed: int, folder: Path, log: Callable[[str], None] = print) -> dict:
    """Every stage of one (recipe, seed) model; returns its record (scores, train logs, times)."""
    folder.mkdir(parents=True, exist_ok=True)
    scale = setting.scale
    name = model_id(recipe, seed)
    config = train.model_config(scale.recipe_model(recipe), setting.tokenizer)
    record_path = folder / "model.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"model": name, "recipe": recipe.name, "seed": seed, "n_params": config.n_params,
                   "d_model": config.d_model, "n_layers": config.n_layers})
    times = record.setdefault("wall_time_s", {})

    def save_record():
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(record_path)

    # 1. pre-train from scratch
    base_path = folder / "base.safetensors"
    if base_path.is_file():
        graphdef, base_params = train.load_params(base_path, config)
        log(f"  {name}: base model loaded from {base_path.name}")
    else:
        t0 = time.perf_counter()
        make_rows, corpus = pretrain_rows(setting, recipe, seed)
        graphdef, params = train.init_params(config, seed)
        steps = scale.recipe_steps(recipe)
        log(f"  {name}: pre-training {config.n_params:,} parameters for {steps} steps "
            f"({corpus['documents']} documents, {corpus['tokens']} tokens per epoch)")
        base_params, train_log = train.train(graphdef, params, train.epoch_batches(make_rows, scale.batch_size, seed),
                                             steps=steps, learning_rate=scale.learning_rate,
                                             warmup=max(1, steps // 20), log_every=max(1, steps // 4), log=log)
        record["pretrain"] = {**train_log.to_dict(), "corpus": corpus,
                              "epochs": train_log.examples_seen / max(1, len(make_rows(_rng(seed))[0]))}
        train.save_params(base_path, base_params, config, {"model": name, "stage": "base"})
        times["pretrain"] = time.perf_counter() - t0
        save_record()
    base_lm = train.as_lm(f"{name}-base", config, graphdef, base_params, setting.tokenizer)

    # 2. the base model in every mode
    record["base"] = _evaluated(base_lm, setting, eval_config(scale, BASE_MODES, seed), folder / "eval_base",
                                times, "eval_base", log)
    save_record()

    # 3. post-train: full SFT on QA pairs about the other half, in the benchmark's format
    post_path = folder / "post.safetensors"
    if post_path.is_file():
        _, post_params = train.load_params(post_path, config)
    else:
        t0 = time.perf_counter()
        tokens, valid, loss_mask = data.sft_rows(setting.tokenizer, sft_pairs(setting))
        log(f"  {name}: SFT for {scale.sft_steps} steps on {len(tokens)} QA pairs")
        post_params, sft_log = train.train(
            graphdef, _copy(base_params), train.epoch_batches(lambda rng: (tokens, valid, loss_mask),
                                                              scale.sft_batch_size, seed + 1000),
            steps=scale.sft_steps, learning_rate=scale.sft_learning_rate, warmup=max(1, scale.sft_steps // 10))
        record["sft"] = sft_log.to_dict()
        train.save_params(post_path, post_params, config, {"model": name, "stage": "post_trained"})
        times["sft"] = time.perf_counter() - t0
        save_record()
    post_lm = train.as_lm(f"{name}-post", config, graphdef, post_params, setting.tokenizer)

    # 4. the post-trained model as it would be used: zero-shot
    record["post"] = _evaluated(post_lm, setting, eval_config(scale, POST_MODES, seed), folder / "eval_post",
                                times, "eval_post", log)
    save_record()
    return record


def _rng(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


def _copy(params):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(jnp.copy, params)  # SFT donates its params; the base model keeps its own


def _evaluated(lm, setting: Setting, config: ev.EvalConfig, out: Path, times: dict, stage: str, log) -> dict:
    """Per mode: every metric's value (from ``out/results.json``, evaluating first if absent)."""
    if (out / ev.RESULTS_FILE).is_file():
        results = ev.load_results(out)
    else:
        t0 = time.perf_counter()
        results = ev.evaluate(lm, setting.task, config, out, progress=False)
        times[stage] = time.perf_counter() - t0
        log(f"  {lm.name}: " + ", ".join(f"{row['mode']} validity {row['format_validity']['value']:.2f} "
                                         f"accuracy {row['accuracy']['value']:.2f}" for row in results["results"]))
    return {row["mode"]: {m: row[m]["value"] for m in ("format_validity", "accuracy", "knowledge_accuracy")}
            for row in results["results"]}
