"""Batched cached greedy generation against a naive full-forward reference, on a tiny random model."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spt_jax import generate as gen
from spt_jax import sequence as seq
from spt_jax.prefix import prefix_cache
from spt_jax.errors import ConfigError, DataError
from spt_jax.models import LM, DecoderLM, ModelConfig

CHARS = "abcdefghijklmnopqrstuvwxyz .,:?\n"
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
TEXTS = ["the cat sat", "a", "hello there, friend: how are you?", "xyz", "q: why not\n", "ok then"]


def char_tokenizer(with_bos: bool = True):
    """One token per character, with <bos> prepended by the post-processor (offline, no hub)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(CHARS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@functools.lru_cache(maxsize=None)  # an LM is immutable: tests share it (and its compiled functions)
def tiny_lm(*, with_bos: bool = True, eos_token_ids: tuple[int, ...] = (), seed: int = 0, **overrides) -> LM:
    """A 2-layer random model whose weights are scaled up so attention and greedy choices are sharp."""
    tokenizer = char_tokenizer(with_bos)
    fields = dict(
        model_type="llama", vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=8, d_ff=64, max_position_embeddings=512, eos_token_ids=eos_token_ids,
    )  # fmt: skip
    config = ModelConfig(**{**fields, **overrides})
    graphdef, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(seed)))
    params = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, params)
    return LM(name="tiny", config=config, graphdef=graphdef, params=params, tokenizer=tokenizer)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, params, embeds, n):
    """Logits after the first ``n`` of ``embeds [1, N, D]``; the rest is right padding (masked)."""
    model = nnx.merge(graphdef, params)
    slots = jnp.arange(embeds.shape[1])[None]
    hidden, _ = model(embeds, slots, slots < n)
    return model.logits(hidden[0, n - 1])


def naive_generate(lm, text, *, soft_prompt=None, prefix_text="", max_new_tokens=16, stops=("\n",)):
    """Reference: the whole unpadded sequence re-run for every new token, no cache, argmax."""
    model, tokenizer = lm.model, lm.tokenizer
    head = jnp.asarray(seq.bos_ids(tokenizer), jnp.int32)
    tail = seq.encode(tokenizer, prefix_text) + seq.encode(tokenizer, text)
    soft = jnp.zeros((0, lm.config.d_model)) if soft_prompt is None else jnp.asarray(soft_prompt)
    stop_ids = {i for i in range(len(tokenizer)) if any(s in tokenizer.decode([i]) for s in stops)}
    generated = []
    for _ in range(max_new_tokens):
        ids = jnp.asarray(tail + generated, jnp.int32)
        embeds = jnp.concatenate([model.embed(head), soft, model.embed(ids)])
        n = embeds.shape[0]
        padded = jnp.zeros((128, embeds.shape[1]), embeds.dtype).at[:n].set(embeds)[None]
        token = int(jnp.argmax(_last_logits(lm.graphdef, lm.params, padded, n)))
        if token in seq.eos_ids(lm):
            break
        generated.append(token)
        if token in stop_ids:
            break
    return seq.cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), stops)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def soft(lm, n=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, lm.config.d_model))


NO_STOP = gen.GenerationConfig(max_new_tokens=12, stop_sequences=(), batch_size=4, length_buckets=(8, 16, 64))


def test_model_is_context_sensitive(lm):
    """The check below is only meaningful if outputs depend on the whole input."""
    outs = gen.generate(lm, TEXTS, config=NO_STOP)
    assert len(set(outs)) >= 4, outs


@pytest.mark.parametrize(
    "use_soft, prefix_text, with_bos",
    [(False, "", True), (True, "", True), (False, "a: b\nc: d\n", True), (True, "q: ", False)],
)
def test_matches_naive_reference(use_soft, prefix_text, with_bos):
    lm = tiny_lm(with_bos=with_bos)
    prompt = soft(lm) if use_soft else None
    config = dataclasses.replace(NO_STOP, max_new_tokens=10)
    got = gen.generate(lm, TEXTS, soft_prompt=prompt, prefix_text=prefix_text, config=config)
    want = [naive_generate(lm, t, soft_prompt=prompt, prefix_text=prefix_text, max_new_tokens=10, stops=())
            for t in TEXTS]  # fmt: skip
    assert got == want


def test_cached_prefix_equals_prefix_prepended(lm):
    prefix_text = "q: two\na: 2\n\nq: five\na: 5\n\nq: "
    config = NO_STOP
    cached = gen.generate(lm, TEXTS, prefix_text=prefix_text, config=config)
    prefix = prefix_cache(lm, None, prefix_text, length_buckets=config.length_buckets)
    reused = gen.generate(lm, TEXTS, prefix=prefix, config=config)
    uncached = gen.generate(lm, [prefix_text + t for t in TEXTS], config=config)
    assert cached == reused == uncached
    # Trailing whitespace is carried into each input, so BPE sees the boundary as in the joint text.
    assert (prefix.text, prefix.carry, prefix.join("x")) == (prefix_text[:-1], " ", " x")
    assert prefix.length == 1 + len(prefix_text) - 1  # BOS + the cached characters


def test_soft_prompt_changes_outputs(lm):
    zeros = gen.generate(lm, TEXTS, soft_prompt=jnp.zeros((3, lm.config.d_model)), config=NO_STOP)
    rand = gen.generate(lm, TEXTS, soft_prompt=soft(lm), config=NO_STOP)
    assert zeros != rand


def test_stop_sequences_and_eos_cut_outputs(lm):
    raw = gen.generate(lm, TEXTS, config=NO_STOP)
    row = next(r for r in raw if len(set(r[1:])) >= 2)  # an output with at least two later characters
    i = TEXTS[raw.index(row)]
    stop_char = row[3] if len(row) > 3 else row[1]
    one = gen.generate(lm, [i], config=dataclasses.replace(NO_STOP, stop_sequences=(stop_char,)))
    assert one == [row[: row.index(stop_char)]]
    # A stop sequence spanning two tokens is honoured exactly, by cutting the decoded text.
    pair = row[1:3]
    two = gen.generate(lm, [i], config=dataclasses.replace(NO_STOP, stop_sequences=("zzzz", pair)))
    assert two == [row[: row.index(pair)]]
    # EOS: make the third generated character the model's end-of-sequence token.
    eos_id = lm.tokenizer.convert_tokens_to_ids(row[2])
    eos_lm = dataclasses.replace(lm, config=lm.config.replace(eos_token_ids=(eos_id,)))
    assert gen.generate(eos_lm, [i], config=NO_STOP) == [row[: row.index(row[2])]]
    assert naive_generate(eos_lm, i, max_new_tokens=12, stops=()) == row[: row.index(row[2])]


def test_stop_rows_end_early_and_match_reference(lm):
    """With newline stops, rows stop at different steps; the others keep decoding correctly."""
    config = dataclasses.replace(NO_STOP, max_new_tokens=16, stop_sequences=("\n",))
    texts = ["a\nb", "zz", "what is it?\n", "a.b\nc", "hello"]
    got = gen.generate(lm, texts, soft_prompt=soft(lm, 2), config=config)
    want = [naive_generate(lm, t, soft_prompt=soft(lm, 2), max_new_tokens=16) for t in texts]
    assert got == want
    assert all("\n" not in g for g in got)


def test_stop_mask_marks_tokens_containing_stops(lm):
    mask = gen.token_text_mask(lm.tokenizer, lm.config.vocab_size, ("\n", "ab", "."))
    marked = {lm.tokenizer.convert_ids_to_tokens(int(i)) for i in np.flatnonzero(mask)}
    assert marked == {"\n", "."}


def test_compiles_once_per_bucket(lm):
    lm = dataclasses.replace(lm)  # the same weights with a compile cache of its own: exact counts
    config = gen.GenerationConfig(max_new_tokens=5, batch_size=4, length_buckets=(8, 16, 32))
    texts = ["abcdefghijklmnopqrstuvwxyz"[: 1 + n % 26] + " " * (n // 26) for n in range(40)]
    gen.generate(lm, texts[:3], config=config)  # the 8 bucket, with its prefix
    assert dict(lm.compiled.traces) == {"prefix": 1, "unstack_layers": 1, "generate": 1}
    gen.generate(lm, texts, config=config)
    gen.generate(lm, texts[::-1], config=dataclasses.replace(config, max_new_tokens=9))  # same rounding
    assert dict(lm.compiled.traces) == {"prefix": 1, "unstack_layers": 1, "generate": 3}  # + the 16, 32 buckets
    other = tiny_lm(seed=1)  # another model in the same process shares nothing
    assert other.compiled is not lm.compiled and "generate" not in dataclasses.replace(other).compiled.traces


def test_scanned_decode_off_cpu_gives_the_per_layer_decodes_outputs(lm, monkeypatch):
    """Off CPU, decode scans the stacked layers (no per-layer copies); the outputs are the same."""
    texts = ["abcdefghijklmnopqrstuvwxyz"[: 1 + n % 26] for n in range(6)]
    config = gen.GenerationConfig(max_new_tokens=6, batch_size=4, stop_sequences=("q",))
    per_layer = gen.generate(dataclasses.replace(lm), texts, config=config)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    scanned_lm = dataclasses.replace(lm)
    assert gen.generate(scanned_lm, texts, config=config) == per_layer
    assert "unstack_layers" not in scanned_lm.compiled.traces


def test_generation_drops_its_weight_copies_before_returning_freed_memory(lm, monkeypatch):
    """The per-layer copies are gone when the heap is trimmed, so their pages can go back."""
    layer_shapes = {x.shape[1:] for x in jax.tree.leaves(lm.params["layers"]) if x.ndim > 2}  # the matrices
    count = lambda: sum(a.shape in layer_shapes for a in jax.live_arrays())  # noqa: E731
    before, at_release = count(), []
    monkeypatch.setattr(gen, "release_freed_memory", lambda: at_release.append(count()))
    gen.generate(lm, TEXTS, config=NO_STOP)
    assert at_release == [before]


def test_a_generator_called_batch_by_batch_builds_its_weight_copies_once(lm, monkeypatch):
    """A `Generator` keeps what `generate` builds per call (the per-layer weights among it) until closed;
    called batch by batch it gives one call's outputs, and after `close` it refuses to run."""
    built = []
    real = gen._batch_runner
    monkeypatch.setattr(gen, "_batch_runner", lambda *a, **k: built.append(1) or real(*a, **k))
    config = dataclasses.replace(NO_STOP, batch_size=2)
    together = gen.generate(lm, TEXTS, prefix_text="q: ", config=config)
    assert len(built) == 1
    with gen.Generator(lm, prefix_text="q: ", config=config) as generator:
        assert generator([]) == [] and not built[1:]  # nothing built until there are texts
        batches = [generator(TEXTS[i : i + 2]) for i in range(0, len(TEXTS), 2)]
    assert sum(batches, []) == together
    assert len(built) == 2
    for texts in (TEXTS[:1], []):
        with pytest.raises(RuntimeError, match="closed"):
            generator(texts)


def test_a_batch_that_fails_still_leaves_its_weight_copies_dropped_and_the_error_raised(lm, monkeypatch):
    """An error in a batch's host work (here: cutting at the stop sequences) reaches the caller, and
    the heap trim on the way out finds no copy held by the failing call's frame."""
    layer_shapes = {x.shape[1:] for x in jax.tree.leaves(lm.params["layers"]) if x.ndim > 2}
    count = lambda: sum(a.shape in layer_shapes for a in jax.live_arrays())  # noqa: E731
    before, at_release = count(), []
    monkeypatch.setattr(gen, "release_freed_memory", lambda: at_release.append(count()))

    def fail(text, stops):
        raise RuntimeError("cut failed")

    monkeypatch.setattr(gen.seq, "cut_at_stop", fail)
    with pytest.raises(RuntimeError, match="cut failed"):
        gen.generate(lm, TEXTS, config=NO_STOP)
    assert at_release == [before]


def test_a_prefix_that_leaves_no_room_fails_when_the_generator_is_made(lm):
    """Before any text is given (an empty call would have hidden it), naming both sizes."""
    small_context = dataclasses.replace(lm, config=lm.config.replace(max_position_embeddings=12))
    config = gen.GenerationConfig(max_new_tokens=8, stop_sequences=(), batch_size=2)
    with pytest.raises(ConfigError, match=r"plus 8 new tokens fill .* context of 12 tokens"):
        gen.Generator(small_context, prefix_text="abcdefgh", config=config)


def test_long_inputs_are_cut_from_the_left_with_a_warning(lm):
    config = gen.GenerationConfig(max_new_tokens=4, stop_sequences=(), batch_size=2, length_buckets=(8, 16))
    long = "abcdefghijklmnopqrstuvwxyz"
    with pytest.warns(UserWarning, match="longer than 16 tokens"):
        got = gen.generate(lm, [long, "ab"], config=config)
    assert got[0] == gen.generate(lm, [long[-16:]], config=config)[0]
    small_context = dataclasses.replace(lm, config=lm.config.replace(max_position_embeddings=14))
    with pytest.warns(UserWarning, match="longer than 9 tokens"):  # 14 - BOS - 4 new tokens
        gen.generate(small_context, [long], config=config)


def test_more_texts_than_one_batch_keep_their_order(lm):
    config = NO_STOP  # 6 texts: a full batch and one with two dummy rows
    together = gen.generate(lm, TEXTS, config=config)
    alone = [gen.generate(lm, [t], config=config)[0] for t in TEXTS]
    assert together == alone


def test_bad_input_is_reported(lm):
    with pytest.raises(ConfigError, match="shape"):
        gen.generate(lm, ["a"], soft_prompt=jnp.zeros((2, 7)))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gen.GenerationConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="not both"):
        gen.generate(lm, ["a"], prefix=prefix_cache(lm), prefix_text="x")
    no_bos = tiny_lm(with_bos=False)
    with pytest.raises(DataError, match="tokenizes to nothing"):
        gen.generate(no_bos, [""])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gen.generate(lm, []) == []
