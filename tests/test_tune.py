"""Tests for spt_jax.tune on tiny random models: rows, data order, prompt files, the tuning loop.

Every tuning run on the module's ``lm`` shares one step configuration, so its jitted step compiles
once per batch shape for the whole module (the step lives in ``lm.compiled``, keyed by the settings
that change the program); a test that counts compilations exactly tunes a fresh model of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tune_support import arithmetic_examples, tiny_lm

from spt_jax import tune
from spt_jax.errors import ConfigError, DataError, SptError
from spt_jax.sequence import (
    MIN_ANSWER_WIDTH, Encoded, bucket_length, encode, fit_buckets, pow2_width, round_up, tuning_buckets,
)
from spt_jax.tune.checkpoint import TuneCheckpoints
from spt_jax.tune.data import DataOrder, ExampleEncoder, as_pairs, tuning_layout
from spt_jax.tune.mesh import spec_for

P = 4
CONFIG = tune.TuneConfig(
    prompt_length=P,
    batch_size=4,
    steps=6,
    learning_rate=0.05,
    init="text",
    init_text="calc",
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(tie_embeddings=False)  # untied: poisoning an input embedding leaves the head finite


def host_params(lm):
    return [np.array(x) for x in jax.tree.leaves(lm.params)]


# ---------------------------------------------------------------- rows and buckets


def test_collate_follows_the_token_layout(lm):
    tok = lm.tokenizer
    layout = tuning_layout(lm, CONFIG)
    pairs = [("12+3=", " 15"), ("1+1=", " 2")]
    encoder = ExampleEncoder(tok, pairs, layout)
    batch = layout.training_batch([encoder(0), encoder(1)])
    H, T = batch["prefix_tokens"].shape[1], batch["tokens"].shape[1]
    assert H + T == 32 and H == 1 + P and batch["target_ids"].shape == (16,)  # no head rows planned: 2 x 8
    for key in ("prefix_tokens", "prefix_prompt_index"):  # the prefix: BOS, then the prompt, in every row
        assert (batch[key] == batch[key][:1]).all()
    assert batch["prefix_tokens"][0, 0] == tok.bos_token_id
    np.testing.assert_array_equal(batch["prefix_prompt_index"][0], [-1, *range(P)])
    at = 0
    for b, (inp, tgt) in enumerate(pairs):
        text = encode(tok, inp) + encode(tok, tgt) + [tok.eos_token_id]
        start = T - len(text)
        assert not batch["valid"][b, :start].any() and batch["valid"][b, start:].all()  # left padding
        np.testing.assert_array_equal(batch["tokens"][b, start:], text)  # then the text
        n_tgt = len(encode(tok, tgt)) + 1  # packed row after row
        mine = slice(at, at + n_tgt)
        assert batch["target_mask"][mine].all() and (batch["target_row"][mine] == b).all()
        targets = batch["target_ids"][mine]
        np.testing.assert_array_equal(targets, text[-n_tgt:])
        # each target token is predicted by the slot right before it, in the row [prefix | text]
        row = np.concatenate([batch["prefix_tokens"][b], batch["tokens"][b]])
        np.testing.assert_array_equal(row[batch["target_index"][mine] + 1], targets)
        at += n_tgt
    assert not batch["target_mask"][at:].any() and not batch["target_ids"][at:].any()


def test_the_head_runs_on_the_packed_target_tokens_with_the_grids_loss(lm):
    """Planned head rows pack the batch's targets into fewer rows than a B x answer-width grid (at
    Gemma 3's vocabulary the head is a large part of a step); loss and gradient are the grid's.
    Too few planned rows for a batch fall back to the grid rather than dropping targets."""
    layout = tuning_layout(lm, CONFIG)
    pairs = [("12+3=", " 15"), ("1+1=", " 2"), ("7+7=", " 14"), ("2+2=", " 4")]
    encoder = ExampleEncoder(lm.tokenizer, pairs, layout)
    rows = [encoder(i) for i in range(len(pairs))]
    n_targets = sum(len(r.target_ids) for r in rows)
    grid = layout.training_batch(rows)
    packed = dataclasses.replace(layout, head_rows=round_up(n_targets, len(rows))).training_batch(rows)
    assert grid["target_ids"].shape == (len(rows) * MIN_ANSWER_WIDTH,)
    assert packed["target_ids"].shape == (round_up(n_targets, len(rows)),) and packed["target_mask"].sum() == n_targets
    too_few = dataclasses.replace(layout, head_rows=n_targets - 1).training_batch(rows)
    assert too_few["target_ids"].shape == grid["target_ids"].shape
    prompt = tune.init_prompt(lm, CONFIG)
    loss = jax.jit(jax.value_and_grad(functools.partial(tune.step.prompt_loss, graphdef=lm.graphdef), has_aux=True))
    (grid_loss, grid_count), grid_grad = loss(prompt, lm.params, grid)
    (packed_loss, packed_count), packed_grad = loss(prompt, lm.params, packed)
    assert grid_count == packed_count == n_targets
    np.testing.assert_allclose(packed_loss, grid_loss, rtol=1e-6)
    np.testing.assert_allclose(packed_grad, grid_grad, rtol=1e-5, atol=1e-7)


def test_collate_without_bos_puts_the_prompt_first():
    lm = tiny_lm(bos=False)
    layout = tuning_layout(lm, CONFIG)
    assert layout.bos == ()
    batch = layout.training_batch([ExampleEncoder(lm.tokenizer, [("ab", "c")], layout)(0)])
    np.testing.assert_array_equal(batch["prefix_prompt_index"][0], np.arange(P))


def test_over_long_input_loses_its_left_end_with_one_warning(lm):
    config = CONFIG.replace(max_length=32, length_buckets=(16, 32))
    layout = tuning_layout(lm, config)
    long_input = "".join(str(i % 10) for i in range(60))
    pairs = [(long_input, " 7"), ("x" + long_input, " 8"), ("1+1=", " 2")]
    encoder = ExampleEncoder(lm.tokenizer, pairs, layout)
    with pytest.warns(UserWarning, match=r"example 0: input of 60 tokens cut from the left"):
        first = encoder(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second cut is counted, not warned again
        encoder(1)
        encoder(2)
    assert encoder.n_truncated == 2
    room = 32 - 1 - P - 3  # BOS, prompt, " 7" + EOS
    assert first.input_ids == tuple(encode(lm.tokenizer, long_input[-room:])) and first.truncated == 60 - room
    assert first.target_ids == (*encode(lm.tokenizer, " 7"), lm.tokenizer.eos_token_id)
    assert layout.row_length(first) == 32
    batch = layout.training_batch([first, encoder(2)])
    assert batch["tokens"].shape == (2, 32 - 1 - P)  # the row's text slots, after BOS and the prompt

    with pytest.raises(DataError, match="example 0: the target alone takes"):
        ExampleEncoder(lm.tokenizer, [("a", "y" * 40)], layout)(0)


def test_buckets_and_answer_widths():
    assert tuning_buckets(512) == (32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert tuning_buckets(100) == (32, 48, 64, 96, 100)
    assert bucket_length(33, (32, 48, 64)) == 48 and bucket_length(32, (32, 48)) == 32
    with pytest.raises(ConfigError):
        bucket_length(65, (32, 64))
    assert [pow2_width(n, MIN_ANSWER_WIDTH) for n in (1, 8, 9, 17)] == [8, 8, 16, 32]


def test_data_order_is_seeded_reshuffled_and_resumable():
    order = DataOrder(10, seed=3)
    stream = order.take(25)
    for epoch in range(2):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new order every epoch
    assert DataOrder(10, seed=4).take(10) != stream[:10]
    resumed = DataOrder(10, seed=3)
    head = resumed.take(12)
    state = json.loads(json.dumps(resumed.state()))  # survives the JSON checkpoint
    assert state == {"seed": 3, "next_index": 12, "epoch": 1, "n_examples": 10}
    assert head + DataOrder.from_state(state, 10).take(13) == stream
    with pytest.raises(ConfigError, match="covers 10 examples but 11"):
        DataOrder.from_state(state, 11)


def test_examples_are_validated():
    class Ex:
        def __init__(self, input, target):
            self.input, self.target = input, target

    assert as_pairs([("a", "b"), Ex("c", "d")]) == [("a", "b"), ("c", "d")]
    with pytest.raises(DataError, match="no tuning examples"):
        as_pairs([])
    with pytest.raises(DataError, match="example 1: expected an"):
        as_pairs([("a", "b"), "c"])
    with pytest.raises(DataError, match="example 0: empty target"):
        as_pairs([("a", "")])


def test_config_validation_and_json_round_trip():
    config = CONFIG.replace(length_buckets=(64, 32))
    assert config.length_buckets == (32, 64)
    assert tune.TuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="init='text' needs init_text"):
        tune.TuneConfig(init="text")
    with pytest.raises(ConfigError, match="optimizer='adamm'"):
        tune.TuneConfig(optimizer="adamm")
    with pytest.raises(ConfigError, match="unknown TuneConfig field"):
        tune.TuneConfig.from_dict({"prompt_lenght": 3})
    with pytest.raises(ConfigError, match="length_buckets has 600 > max_length"):
        tune.TuneConfig(length_buckets=(600,))


def test_sharding_rules_split_by_name_and_fall_back_to_replicated():
    from jax.sharding import PartitionSpec as Spec

    assert spec_for("layers.attn.q_proj", (2, 32, 4, 8), 2) == Spec(None, None, "model", None)
    assert spec_for("layers.attn.k_proj", (2, 32, 3, 8), 2) == Spec()  # 3 kv heads: replicated
    assert spec_for("layers.attn.o_proj", (2, 4, 8, 32), 2) == Spec(None, "model", None, None)
    assert spec_for("layers.mlp.up_proj", (2, 32, 64), 4) == Spec(None, None, "model")
    assert spec_for("layers.mlp.down_proj", (2, 64, 32), 4) == Spec(None, "model", None)
    assert spec_for("embed_tokens", (104, 32), 8) == Spec("model", None)  # vocab
    assert spec_for("embed_tokens", (105, 32), 8) == Spec(None, "model")  # else d_model
    assert spec_for("layers.attn_norm.scale", (2, 32), 2) == Spec()
    assert spec_for("layers.attn.q_proj", (2, 32, 4, 8), 1) == Spec()


# ---------------------------------------------------------------- prompts and files


def test_initializers(lm):
    table = np.asarray(lm.params["embed_tokens"][...])
    vocab = np.asarray(tune.init_prompt(lm, "vocab", length=6, seed=1))
    assert vocab.shape == (6, 32) and vocab.dtype == np.float32
    rows = [int(np.argmin(np.abs(table - v).sum(1))) for v in vocab]
    np.testing.assert_array_equal(vocab, table[rows])  # each vector is a real token's embedding
    assert len(set(rows)) == 6 and not set(rows) & set(lm.tokenizer.all_special_ids)
    np.testing.assert_array_equal(vocab, tune.init_prompt(lm, "vocab", length=6, seed=1))
    assert not np.array_equal(vocab, tune.init_prompt(lm, "vocab", length=6, seed=2))

    text = np.asarray(tune.init_prompt(lm, CONFIG.replace(prompt_length=6)))
    ids = encode(lm.tokenizer, "calc")
    np.testing.assert_array_equal(text, table[(ids * 2)[:6]])

    noise = np.asarray(tune.init_prompt(lm, "random", length=200))
    assert noise.shape == (200, 32) and abs(noise.std() - table[4:].std()) < 0.1 * table.std()
    with pytest.raises(ConfigError, match="unknown prompt init"):
        tune.init_prompt(lm, "zeros")


def test_prompt_file_round_trip_and_mismatch_errors(lm, tmp_path):
    prompt = np.arange(4 * 32, dtype=np.float32).reshape(4, 32)
    path = tune.save_prompt(tmp_path / "p.safetensors", prompt, {**tune.model_metadata(lm), "note": "x"})
    loaded, meta = tune.load_prompt(path, lm)
    np.testing.assert_array_equal(loaded, prompt)
    assert loaded.dtype == jnp.float32 and meta["model"] == "tiny" and meta["note"] == "x"

    other = tiny_lm(name="other")
    with pytest.raises(ConfigError, match="tuned on model 'tiny', not 'other'"):
        tune.load_prompt(path, other)
    assert tune.load_prompt(path, other, check_model=False)[0].shape == (4, 32)
    wide = tiny_lm(name="tiny", d_model=48, n_heads=6, n_kv_heads=2)
    with pytest.raises(ConfigError, match="d_model=32 .* d_model=48"):
        tune.load_prompt(path, wide, check_model=False)
    with pytest.raises(ConfigError, match="no such prompt file"):
        tune.load_prompt(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SptError, match="junk.safetensors"):
        tune.load_prompt(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- the tuning loop


def mixed_length_examples():
    short = arithmetic_examples(24)
    long = [(f"Please add {a} and {b} now: {a}+{b}=", f" {a + b}") for a, b in [(1, 2), (3, 4), (5, 6)]]
    return short + long


def test_tune_trains_only_the_prompt_and_compiles_once_per_bucket(tmp_path):
    lm = tiny_lm(tie_embeddings=False)  # a fresh model: its compile cache has seen no batch shape
    before = host_params(lm)
    calls, norms = [], []

    def evaluator(step, prompt):
        calls.append(step)
        assert prompt.shape == (P, 32) and prompt.dtype == jnp.float32
        norms.append(float(jnp.linalg.norm(prompt)))
        return {"prompt_norm": norms[-1], "step_parity": np.int64(step % 2)}

    config = CONFIG.replace(steps=12, eval_every=5, checkpoint_every=5)
    result = tune.tune(
        lm, mixed_length_examples(), config, checkpoint_dir=tmp_path, evaluator=evaluator, progress=False
    )

    assert calls == [0, 5, 10, 12]
    assert result.evaluations == tuple(
        tune.Evaluation(step, {"prompt_norm": norm, "step_parity": float(step % 2)})
        for step, norm in zip(calls, norms)
    )
    assert all(type(v) is float for e in result.evaluations for v in e.metrics.values())
    assert [h["step"] for h in result.history] == list(range(1, 13))  # training steps only
    assert not any("prompt_norm" in h for h in result.history)
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4])

    initial = tune.init_prompt(lm, config)
    assert result.prompt.shape == (P, 32) and result.prompt.dtype == jnp.float32
    assert not np.allclose(result.prompt, initial)
    for a, b in zip(before, host_params(lm)):  # frozen weights: bit-identical
        np.testing.assert_array_equal(a, b)

    meta = result.metadata
    shapes = meta["batch_shapes_used"]
    assert len(shapes) >= 2 and meta["length_buckets_used"] == sorted({t for t, _ in shapes})
    most = max(h["n_targets"] for h in result.history)  # the head rows planned for every batch
    assert {h["head_rows"] for h in result.history} == {round_up(most, config.batch_size)}
    assert meta["compilations"] == len(shapes)  # exactly one compilation per batch shape
    assert sum(h["compiled"] for h in result.history) == meta["compilations"]
    assert lm.compiled.compilations() == len(shapes)  # and nothing else compiled for this model
    assert meta["model"] == "tiny" and meta["placement"] == "after_bos" and meta["truncated_inputs"] == 0
    assert meta["data_state"]["next_index"] == 12 * config.batch_size

    steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert steps == [5, 10, 12]
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 100_000  # prompt + optimizer state only, never the frozen weights
    saved = json.loads((tmp_path / "12" / "meta" / "metadata").read_text())
    assert saved["step"] == 12 and saved["config"] == config.to_dict()
    assert saved["evaluations"] == [e.to_dict() for e in result.evaluations]
    assert saved["data_state"] == meta["data_state"]

    file = result.save(tmp_path / "prompt.safetensors")
    np.testing.assert_array_equal(tune.load_prompt(file, lm)[0], result.prompt)


class Crash(Exception):
    pass


def _prompt_norm(step, prompt):
    return {"prompt_norm": float(jnp.linalg.norm(prompt))}


def _crash_at(step, calls):
    def evaluator(s, prompt):
        calls.append(s)
        if s == step:
            raise Crash(f"simulated crash at step {s}")
        return _prompt_norm(s, prompt)

    return evaluator


# Orbax's async reads of the deliberately damaged step can finish after their event loop closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_after_a_crash_matches_an_uninterrupted_run(lm, tmp_path):
    examples = arithmetic_examples(20)
    config = CONFIG.replace(eval_every=1)
    reference = tune.tune(lm, examples, config, evaluator=_prompt_norm, progress=False)
    assert [e.step for e in reference.evaluations] == list(range(0, 7))

    crashed, calls = [], []
    with pytest.raises(Crash):  # dies after step 5, before saving it
        tune.tune(lm, examples, config, checkpoint_dir=tmp_path, evaluator=_crash_at(5, crashed),
                  progress=False)
    assert crashed == [0, 1, 2, 3, 4, 5]
    with TuneCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.steps() == [2, 4]

    resumed = tune.tune(lm, examples, config, checkpoint_dir=tmp_path, evaluator=_crash_at(-1, calls),
                        progress=False)
    assert resumed.metadata["resumed_from_step"] == 4
    assert resumed.metadata["compilations"] == 0  # the reference run compiled every shape already
    np.testing.assert_allclose(resumed.prompt, reference.prompt, rtol=0, atol=1e-6)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    np.testing.assert_allclose(
        [h["loss"] for h in resumed.history], [h["loss"] for h in reference.history], rtol=1e-6
    )
    # Steps 0-4 were measured before the crash (restored from checkpoint 4), 5-6 after the resume.
    assert calls == [5, 6]
    assert [e.step for e in resumed.evaluations] == [e.step for e in reference.evaluations]
    np.testing.assert_allclose(
        [e.metrics["prompt_norm"] for e in resumed.evaluations],
        [e.metrics["prompt_norm"] for e in reference.evaluations], rtol=1e-6,
    )

    with pytest.raises(ConfigError, match=r"different settings \(learning_rate\)"):
        tune.tune(lm, examples, config.replace(learning_rate=0.5), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="newest checkpoint is step 6, past TuneConfig.steps=5"):
        tune.tune(lm, examples, config.replace(steps=5), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="covers 20 examples but 21"):
        tune.tune(lm, examples + [("1+1=", " 2")], config, checkpoint_dir=tmp_path, progress=False)

    # A damaged newest checkpoint: warn, fall back to the previous one, and finish from there.
    for f in (tmp_path / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage")
    longer = config.replace(steps=8)
    with pytest.warns(UserWarning, match="checkpoint step 6 is unreadable"):
        again = tune.tune(lm, examples, longer, checkpoint_dir=tmp_path, progress=False)
    assert again.metadata["resumed_from_step"] == 4
    assert [h["step"] for h in again.history] == list(range(1, 9))
    np.testing.assert_allclose(
        [h["loss"] for h in again.history[:6]], [h["loss"] for h in reference.history], rtol=1e-6
    )
    assert [e.step for e in again.evaluations] == [0, 1, 2, 3, 4]  # those checkpoint 4 holds


def test_evaluator_must_return_named_real_numbers(lm):
    examples, config = arithmetic_examples(20), CONFIG.replace(steps=2, eval_every=1)
    bad = {
        "must return a mapping of metric names to numbers, got list at step 0": [0.5],
        "must return a mapping of metric names to numbers, got NoneType at step 0": None,
        "metric named 1 at step 0; metric names must be strings": {1: 0.5},
        "accuracy='high' at step 0; metric values must be real numbers": {"accuracy": "high"},
        "valid=True at step 0; metric values must be real numbers": {"valid": True},
    }
    for message, returned in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            tune.tune(lm, examples, config, evaluator=lambda step, prompt, r=returned: r, progress=False)
    late = lambda step, prompt: {"loss": 1.0} if step < 2 else {"loss": [1.0]}  # noqa: E731
    with pytest.raises(ConfigError, match=re.escape("loss=[1.0] at step 2")):
        tune.tune(lm, examples, config, evaluator=late, progress=False)
    with pytest.raises(TypeError, match="on_eval"):
        tune.tune(lm, examples, config, on_eval=_prompt_norm, progress=False)


def test_non_finite_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(lm, tmp_path):
    bad_id = encode(lm.tokenizer, "!")[0]
    table = lm.params["embed_tokens"][...]
    params = jax.tree.map(lambda x: x, lm.params)
    params["embed_tokens"] = params["embed_tokens"].replace(table.at[bad_id].set(jnp.nan))
    poisoned = type(lm)(lm.name, lm.config, lm.graphdef, params, lm.tokenizer)

    examples = arithmetic_examples(20)
    bad_step = 3  # poison the first example the data order draws at step 3 (epoch 0: all new)
    bad_index = DataOrder(len(examples), CONFIG.seed).take(3 * CONFIG.batch_size)[-1]
    examples[bad_index] = (examples[bad_index][0] + "!", examples[bad_index][1])

    config = CONFIG.replace(steps=20, checkpoint_every=1)
    with pytest.raises(tune.NonFiniteLossError, match=f"at step {bad_step}") as err:
        tune.tune(poisoned, examples, config, checkpoint_dir=tmp_path, progress=False)
    assert isinstance(err.value, SptError) and err.value.step == bad_step
    assert f"last good checkpoint is step {bad_step - 1}" in str(err.value)
    good = np.asarray(err.value.last_good_prompt)
    assert np.isfinite(good).all() and [h["step"] for h in err.value.history] == [1, 2]
    with TuneCheckpoints(tmp_path) as checkpoints:
        assert checkpoints.steps()[-1] == bad_step - 1
        _, state, _ = checkpoints.restore_latest(
            {
                "prompt": jax.ShapeDtypeStruct((P, 32), jnp.float32),
                "opt_state": jax.eval_shape(tune.make_optimizer(config).init, jnp.zeros((P, 32))),
            }
        )
    np.testing.assert_array_equal(state["prompt"], good)


def test_training_rows_and_generation_agree_on_the_layout(lm):
    """Greedy generation with a prompt picks, token by token, the argmax of our training forward."""
    from flax import nnx

    from spt_jax.generate import GenerationConfig, generate
    from spt_jax.tune.step import prefix_embeddings

    prompt = tune.init_prompt(lm, "random", length=P, seed=5)
    inputs = ["12+3=", "7+1=", "40+2=", "9+9+9="]
    never = ("\x07",)  # a stop sequence outside the vocabulary: rows run to max_new_tokens or EOS
    outputs = generate(lm, inputs, soft_prompt=prompt,
                       config=GenerationConfig(max_new_tokens=6, stop_sequences=never))
    assert any(outputs)
    tok, eos = lm.tokenizer, lm.tokenizer.eos_token_id
    layout = tuning_layout(lm, CONFIG.replace(append_eos=False))
    rows = []
    for text, out in zip(inputs, outputs):  # teacher-force what was generated (+ EOS if it stopped)
        generated = encode(tok, out) + ([eos] if len(encode(tok, out)) < 6 else [])
        rows.append(Encoded(tuple(encode(tok, text)), tuple(generated), 0))
    batch = layout.training_batch(rows)

    @jax.jit
    def greedy(prompt, params, batch):
        model = nnx.merge(lm.graphdef, params)
        hidden = model.prefixed_rows(prefix_embeddings(model, prompt, batch), model.embed(batch["tokens"]),
                                     batch["valid"])
        return jnp.argmax(model.logits(hidden[batch["target_row"], batch["target_index"]]), -1)

    predicted = np.asarray(greedy(prompt, lm.params, batch))
    mask = batch["target_mask"]
    np.testing.assert_array_equal(predicted[mask], batch["target_ids"][mask])


def test_tune_rejects_bad_arguments(lm):
    with pytest.raises(ConfigError, match="must be a spt_jax.tune.TuneConfig"):
        tune.tune(lm, arithmetic_examples(4), {"steps": 3})
    with pytest.raises(DataError, match="no tuning examples"):
        tune.tune(lm, [], CONFIG)


def test_public_api_is_reachable_from_the_package():
    import spt_jax

    assert spt_jax.tune.tune is tune.tune and spt_jax.tune.TuneConfig is tune.TuneConfig
    for name in ("init_prompt", "make_train_step", "make_mesh", "param_shardings", "save_prompt",
                 "load_prompt", "export_peft", "import_peft", "TuneResult"):
        assert callable(getattr(tune, name))
    assert Path(tune.__file__).parent.name == "tune"


def test_neighbouring_seeds_see_unrelated_example_streams():
    """grain reshuffles epoch e with seed + e; the raw seed would make seed 1 replay seed 0 one epoch late."""
    n = 50
    streams = {s: DataOrder(n, s).take(4 * n) for s in (0, 1)}
    epochs = {s: [streams[s][e * n:(e + 1) * n] for e in range(4)] for s in streams}
    assert all(sorted(epoch) == list(range(n)) for s in epochs for epoch in epochs[s])
    assert not any(a == b for a in epochs[0] for b in epochs[1])
    assert DataOrder(n, 7).take(n) == DataOrder(n, 7).take(n)  # still a pure function of the seed


# ---------------------------------------------------------------- fitted buckets and remat


def _plan_cost(lengths, buckets, penalty):
    return sum(bucket_length(n, buckets) for n in lengths) + penalty * len(buckets)


def test_fitted_buckets_are_the_cheapest_plan():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = rng.integers(20, 40, rng.integers(1, 25)).tolist()
        fitted = fit_buckets(lengths, compile_steps=1.5)
        assert max(fitted) == max(lengths) and set(fitted) <= set(lengths)
        penalty = 1.5 * np.mean(lengths)
        values = sorted(set(lengths))
        best = min(  # brute force over every subset that holds the longest row
            _plan_cost(lengths, (*subset, values[-1]), penalty)
            for r in range(len(values))
            for subset in itertools.combinations(values[:-1], r)
        )
        assert _plan_cost(lengths, fitted, penalty) == pytest.approx(best)
    assert fit_buckets([83] * 10) == (83,)  # one length: no padding at all
    assert len(fit_buckets(list(range(30, 200)), compile_steps=1e9)) == 1  # compiling dearer than padding
    with pytest.raises(ConfigError, match="at least one step"):
        fit_buckets([])


def test_tuning_pads_each_step_only_to_a_fitted_bucket(lm):
    pairs = [("1+1=", " 2"), ("12+3=", " 15"), ("123+45=", " 168")] * 8
    result = tune.tune(lm, pairs, CONFIG.replace(steps=4), progress=False)
    layout = tuning_layout(lm, CONFIG)
    encoder = ExampleEncoder(lm.tokenizer, pairs, layout)
    order = DataOrder(len(pairs), CONFIG.seed)
    longest = [max(layout.row_length(encoder(i)) for i in order.take(CONFIG.batch_size)) for _ in range(4)]
    used = result.metadata["length_buckets_used"]
    assert set(used) <= set(longest) and max(used) == max(longest)  # exact lengths, never a table's
    fixed = tune.tune(lm, pairs, CONFIG.replace(steps=4, length_buckets=(32, 64)), progress=False)
    assert fixed.metadata["length_buckets_used"] == [32]
    np.testing.assert_allclose(result.prompt, fixed.prompt, rtol=2e-5, atol=2e-6)  # padding is inert


def test_activation_estimate_tracks_xla_and_decides_remat():
    from spt_jax.tune import step as step_module
    from tune_support import tiny_config

    lm = tiny_lm(tie_embeddings=False)
    def xla_temp_bytes(remat, T):
        config = CONFIG.replace(remat=remat)
        train_step = tune.make_train_step(lm, config)
        rows = [Encoded(tuple(range(5, T - P - 5)), (7, 8, 9), 0)] * CONFIG.batch_size
        batch = tuning_layout(lm, config.replace(length_buckets=(T,))).training_batch(rows)
        prompt = tune.init_prompt(lm, config)
        compiled = train_step.jitted.lower(prompt, train_step.init(prompt), lm.params, batch).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    for remat in ("none", "dots"):  # what grows with the length (the rest is the head's, the optimizer's)
        grown = xla_temp_bytes(remat, 192) - xla_temp_bytes(remat, 64)
        estimate = (step_module.activation_bytes(lm.config, CONFIG.batch_size, 192, remat)
                    - step_module.activation_bytes(lm.config, CONFIG.batch_size, 64, remat))
        assert 0.5 < estimate / grown < 2.0, (remat, estimate, grown)
    stored = [step_module.activation_bytes(lm.config, 8, 64, r) for r in ("none", "dots", "full")]
    assert stored == sorted(stored, reverse=True)
    big = tiny_config(d_model=2048, d_ff=8192, n_layers=24)
    assert step_module.resolve_remat("auto", big, 8, 512) == "full"  # ~3 GiB even of projections
    assert step_module.resolve_remat("auto", lm.config, 8, 64) == "dots"
    assert step_module.resolve_remat("none", big, 8, 512) == "none"
    assert tune.TuneConfig(remat=True).remat == "full" and tune.TuneConfig(remat=False).remat == "none"
    with pytest.raises(ConfigError, match="remat"):
        tune.TuneConfig(remat="sometimes")


def test_every_remat_policy_gives_the_same_gradient(lm):
    pairs = arithmetic_examples(8)
    prompts = [tune.tune(lm, pairs, CONFIG.replace(steps=2, remat=r), progress=False).prompt
               for r in ("none", "dots", "full")]
    for other in prompts[1:]:
        np.testing.assert_allclose(prompts[0], other, rtol=1e-5, atol=1e-6)
