"""Continuation log-likelihoods against a naive full-forward log-softmax sum, on a tiny random model."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_generate import char_tokenizer, tiny_lm

from spt_jax import generate as gen
from spt_jax import scoring
from spt_jax.errors import DataError
from spt_jax.sequence import bos_ids, split_pair

CONTEXTS = ["the cat sat on the", "q: is it?\na:", "", "hello there", "ab", "x y z ", "why"]
CONTINUATIONS = [" mat", " yes", "start", ", friend", "c", "w", "?\nbecause it is."]
BUCKETS = (8, 16, 64)


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef, params, embeds, n):
    """Log-softmax ``[N, V]`` at every slot of ``embeds [1, N, D]`` whose first ``n`` are real."""
    model = nnx.merge(graphdef, params)
    slots = jnp.arange(embeds.shape[1])[None]
    hidden, _ = model(embeds, slots, slots < n)
    return jax.nn.log_softmax(model.logits(hidden[0]), axis=-1)


def naive_score(lm, context, continuation, *, soft_prompt=None, prefix_text=""):
    """Reference: one unbatched forward over the whole sequence, log-softmax sum over the continuation."""
    model, tokenizer = lm.model, lm.tokenizer
    context_ids, cont_ids = split_pair(tokenizer, prefix_text + context, continuation)
    head = jnp.asarray(bos_ids(tokenizer), jnp.int32)
    tail = jnp.asarray(context_ids + cont_ids, jnp.int32)
    soft = jnp.zeros((0, lm.config.d_model)) if soft_prompt is None else jnp.asarray(soft_prompt)
    embeds = jnp.concatenate([model.embed(head), soft, model.embed(tail)])
    n = embeds.shape[0]
    padded = jnp.zeros((128, embeds.shape[1]), embeds.dtype).at[:n].set(embeds)[None]
    logprobs = np.asarray(_token_logprobs(lm.graphdef, lm.params, padded, n), np.float64)
    first = n - len(cont_ids)
    rows = logprobs[first - 1 : n - 1]
    total = float(sum(rows[i, t] for i, t in enumerate(cont_ids)))
    greedy = all(int(np.argmax(rows[i])) == t for i, t in enumerate(cont_ids))
    return total, greedy


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def soft(lm, n=4, seed=2):
    return jax.random.normal(jax.random.key(seed), (n, lm.config.d_model))


@pytest.mark.parametrize("use_soft, prefix_text", [(False, ""), (True, ""), (True, "a: b\n\nq: ")])
def test_matches_naive_log_softmax_sum(lm, use_soft, prefix_text):
    prompt = soft(lm) if use_soft else None
    result = scoring.score_continuations(
        lm, CONTEXTS, CONTINUATIONS, soft_prompt=prompt, prefix_text=prefix_text, batch_size=4,
        length_buckets=BUCKETS,
    )  # fmt: skip
    want = [naive_score(lm, c, x, soft_prompt=prompt, prefix_text=prefix_text)
            for c, x in zip(CONTEXTS, CONTINUATIONS)]  # fmt: skip
    assert result.loglikelihood.dtype == np.float64
    np.testing.assert_allclose(result.loglikelihood, [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert result.is_greedy.tolist() == [w[1] for w in want]
    assert result.n_tokens.tolist() == [len(split_pair(lm.tokenizer, prefix_text + c, x)[1])
                                        for c, x in zip(CONTEXTS, CONTINUATIONS)]  # fmt: skip


def test_greedy_generation_is_greedy_under_scoring(lm):
    config = gen.GenerationConfig(max_new_tokens=4, stop_sequences=(), batch_size=4, length_buckets=BUCKETS)
    contexts = CONTEXTS + [c[::-1] + "." for c in CONTEXTS]
    outputs = gen.generate(lm, contexts, soft_prompt=soft(lm), config=config)
    # Keep outputs of 4 plain characters (no EOS, no dropped special token) so they round-trip.
    kept = [(c, o) for c, o in zip(contexts, outputs) if len(o) == 4]
    assert len(kept) >= 3, outputs
    contexts, outputs = zip(*kept)
    result = scoring.score_continuations(
        lm, contexts, outputs, soft_prompt=soft(lm), batch_size=4, length_buckets=BUCKETS
    )
    assert result.is_greedy.all()
    wrong = [o[:-1] + ("a" if o[-1] != "a" else "b") for o in outputs]
    assert not scoring.score_continuations(
        lm, contexts, wrong, soft_prompt=soft(lm), batch_size=4, length_buckets=BUCKETS
    ).is_greedy.any()


def test_cached_prefix_equals_prefix_prepended(lm):
    prefix_text = "q: one\na: 1\n\nq: "  # its trailing space joins each context, as when prepended
    cached = scoring.loglikelihoods(
        lm, CONTEXTS, CONTINUATIONS, prefix_text=prefix_text, batch_size=4, length_buckets=BUCKETS
    )
    prepended = scoring.loglikelihoods(
        lm, [prefix_text + c for c in CONTEXTS], CONTINUATIONS, batch_size=4, length_buckets=BUCKETS
    )
    np.testing.assert_allclose(cached, prepended, rtol=1e-5, atol=1e-4)


def test_soft_prompt_changes_scores(lm):
    zeros = scoring.loglikelihoods(lm, CONTEXTS, CONTINUATIONS, soft_prompt=jnp.zeros((4, lm.config.d_model)))
    rand = scoring.loglikelihoods(lm, CONTEXTS, CONTINUATIONS, soft_prompt=soft(lm))
    assert np.abs(zeros - rand).max() > 0.1


def test_choice_predictions_pick_the_most_likely_choice(lm):
    items = [("q: pick one\na:", [" yes", " no", " maybe so"]), ("ab", ["c", "d"]), ("", ["xyz", "x", "zz"])]
    scores = scoring.choice_loglikelihoods(lm, items, length_buckets=BUCKETS)
    for (context, choices), got in zip(items, scores):
        np.testing.assert_allclose(got, [naive_score(lm, context, c)[0] for c in choices], rtol=1e-5, atol=1e-4)
    assert scoring.choice_predictions(lm, items, length_buckets=BUCKETS).tolist() == [
        int(np.argmax(s)) for s in scores
    ]
    normalized = scoring.choice_predictions(lm, items, length_normalized=True, length_buckets=BUCKETS)
    assert normalized.tolist() == [
        int(np.argmax(s / np.array([len(c) for c in choices]))) for s, (_, choices) in zip(scores, items)
    ]


def test_length_normalization_by_characters():
    scores = [np.array([-4.0, -3.0]), np.array([-1.0, -6.0, -2.5])]
    choices = [["abcd", "a"], ["a", "abcdefghijkl", "ab"]]
    assert scoring.predictions_from_loglikelihoods(scores, choices).tolist() == [1, 0]
    # per character: [-1, -3] and [-1, -0.5, -1.25]
    assert scoring.predictions_from_loglikelihoods(scores, choices, length_normalized=True).tolist() == [0, 1]


def test_context_trailing_space_moves_to_the_continuation():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word tokenizer that keeps a leading space with its word, as GPT-2-style BPE does.
    vocab = {"<unk>": 0, "Answer": 1, ":": 2, " B": 3, " ": 4, "B": 5}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+|:| "), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    assert split_pair(tokenizer, "Answer: ", "B") == ([1, 2], [3])
    assert split_pair(tokenizer, "Answer:", " B") == ([1, 2], [3])
    assert split_pair(char_tokenizer(), "ab", "cd") == ([4, 5], [6, 7])


def test_compiles_once_per_shape(lm):
    contexts = ["abcdefghijklmnopqrstuvwxyz"[: 1 + i % 20] for i in range(30)]
    conts = [" " + "xyz"[: 1 + i % 3] for i in range(30)]
    lm = dataclasses.replace(lm)  # a compile cache of its own: exact counts
    scoring.loglikelihoods(lm, contexts, conts, batch_size=4, length_buckets=(16, 32))
    assert lm.compiled.compilations("score") == 2  # one per input bucket (every continuation fits width 4)
    scoring.loglikelihoods(lm, contexts[::-1], conts, batch_size=4, length_buckets=(16, 32))
    scoring.loglikelihoods(lm, contexts[:5], conts[:5], batch_size=4, length_buckets=(16, 32))
    assert lm.compiled.compilations("score") == 2


def test_bad_input_is_reported(lm):
    with pytest.raises(DataError, match="2 contexts but 1 continuations"):
        scoring.loglikelihoods(lm, ["a", "b"], ["c"])
    with pytest.raises(DataError, match="tokenizes to nothing"):
        scoring.loglikelihoods(tiny_lm(with_bos=False), [""], ["abc"])
    with pytest.raises(DataError, match="no answer choices"):
        scoring.choice_predictions(lm, [("a", [])])
    with pytest.raises(DataError, match="continuation 0 has 20 tokens"):
        scoring.loglikelihoods(lm, ["a"], ["b" * 20], length_buckets=(8, 16))
    with pytest.warns(UserWarning, match="longer than 16 tokens"):
        cut = scoring.loglikelihoods(lm, ["abcdefghijklmnopqrstuvwxyz"], ["ab"], length_buckets=(8, 16))
    np.testing.assert_allclose(
        cut, scoring.loglikelihoods(lm, ["abcdefghijklmnopqrstuvwxyz"[-14:]], ["ab"], length_buckets=(8, 16)), atol=1e-4
    )
