"""Batched greedy decoding with a KV cache, under jit, with a shared prompt prefix computed once.

Every sequence follows the layout of `spt_jax.tokens`:

    [BOS]? [soft prompt: P vectors]? [prefix text]? [input text] [generated tokens]

The prefix (BOS, soft prompt and e.g. few-shot demonstrations) is the same for every example, so
`prefix_cache` runs it once at batch 1; each batch then starts from that KV broadcast to the batch.
The batch's texts are left-padded into a length bucket right after the prefix (padding slots hold
position -1, which attention ignores), prefilled in one call, and decoded by a `jax.lax.while_loop`
that stops early once every row has hit EOS or a stop token. Shapes depend only on (prefix bucket,
input bucket, batch size, rounded max_new_tokens), so a run compiles a handful of times;
`compile_counts` exposes the number of traces for tests and benchmarks. The prefix text's trailing
whitespace is tokenized with each input rather than cached (see `PrefixCache`), so with BPE
tokenizers that split at whitespace (SmolLM2's, Gemma 3's) a cached prefix gives the same tokens
as the prefix text prepended to every input.

Stop sequences: a precomputed ``[V]`` mask of tokens whose text contains a stop sequence ends a row
inside the loop (this catches newline tokens); the decoded text is then cut at the first stop
sequence on the host, which also handles stop sequences spread over several tokens (those end a
row only at ``max_new_tokens``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spt_jax import tokens as tok
from spt_jax.errors import ConfigError, DataError
from spt_jax.models.transformer import KVCache, positions_from_mask

# From 24 tokens on, neighbouring buckets differ by at most 4/3, so an input pads by at most a third
# (powers of two would double it). On CPU, prefill dominates generation time and scales with the
# padded length; one task's prompts differ by a few dozen tokens and touch two or three of these
# buckets, so compiles stay few.
DEFAULT_BUCKETS: tuple[int, ...] = (
    16, 24, 32, 40, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 1024,
    1280, 1536, 2048, 2560, 3072, 4096,
)  # fmt: skip
_NEW_TOKEN_ROUNDING = 16  # max_new_tokens is rounded up to this for shapes, so 10 and 16 share a compile

TRACE_COUNTS: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
    """How many times each jitted function of generation and scoring was traced (= compiled)."""
    return dict(TRACE_COUNTS)


def compile_count() -> int:
    """Total compilations of generation and scoring functions in this process."""
    return sum(TRACE_COUNTS.values())


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding settings. ``length_buckets`` are the padded input lengths (one compile each)."""

    max_new_tokens: int = 16
    stop_sequences: tuple[str, ...] = ("\n",)
    batch_size: int = 8
    length_buckets: tuple[int, ...] = DEFAULT_BUCKETS

    def __post_init__(self):
        object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        object.__setattr__(self, "length_buckets", tuple(sorted(self.length_buckets)))
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_buckets(self.length_buckets)
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise ConfigError(f"stop_sequences must be non-empty strings, got {self.stop_sequences!r}")


def check_buckets(buckets: Sequence[int]) -> None:
    if not buckets or any(int(b) < 1 for b in buckets):
        raise ConfigError(f"length_buckets must be positive lengths, got {tuple(buckets)!r}")


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` slots; past the largest, the next multiple of the largest."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    largest = max(buckets)
    return int(math.ceil(n / largest) * largest)


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[B, length]`` right-aligned, and the validity mask ``[B, length]``."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    valid = np.zeros((len(seqs), length), bool)
    for row, seq in enumerate(seqs):
        if len(seq):
            ids[row, length - len(seq):] = seq
            valid[row, length - len(seq):] = True
    return ids, valid


# --------------------------------------------------------------------------------------------------
# The shared prefix


@flax.struct.dataclass
class PrefixKV:
    """The prefix's keys and values at batch 1, padded on the right to its bucket ``Pb``."""

    k: jax.Array  # [L, 1, Pb, K, d]
    v: jax.Array  # [L, 1, Pb, K, d]
    pos: jax.Array  # [1, Pb] int32, -1 on padding
    last_hidden: jax.Array  # [D] hidden state of the last prefix token (predicts the first input token)
    length: jax.Array  # [] int32 number of real prefix slots


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """A computed prefix ([BOS]? [soft prompt]? [prefix text]?) reusable across calls and batches.

    The prefix text's trailing whitespace is not cached but ``carry``-ed into every input, as
    lm-evaluation-harness moves a context's trailing spaces into the continuation: BPE tokenizers
    merge a whitespace run with what follows, so "demos\n\n" + "Question" tokenized apart would
    differ from the two tokenized together ("\n\n" vs "\n", "\n").
    """

    kv: PrefixKV
    length: int  # real slots: BOS + P + prefix-text tokens
    n_soft: int
    text: str  # the cached prefix text (trailing whitespace removed)
    carry: str  # that trailing whitespace, prepended to every input
    model_name: str

    @property
    def bucket(self) -> int:
        return int(self.kv.pos.shape[1])

    def join(self, text: str) -> str:
        """The input text as it is tokenized after this prefix."""
        return self.carry + text


def prefix_cache(
    lm,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    *,
    length_buckets: Sequence[int] = DEFAULT_BUCKETS,
) -> PrefixCache:
    """Run ``[BOS]? [soft prompt]? [prefix_text]?`` once (batch 1) and keep its KV for reuse."""
    check_buckets(length_buckets)
    config = lm.config
    bos = tok.bos_ids(lm.tokenizer)
    cached_text = prefix_text.rstrip()
    text_ids = tok.encode(lm.tokenizer, cached_text) if cached_text else []
    soft = _check_soft_prompt(soft_prompt, config.d_model)
    n_soft = 0 if soft is None else int(soft.shape[0])
    length = len(bos) + n_soft + len(text_ids)
    if length >= config.max_position_embeddings:
        raise ConfigError(
            f"the prefix (BOS + {n_soft} soft-prompt vectors + {len(text_ids)} prefix-text tokens = "
            f"{length}) leaves no room in {lm.name}'s context of {config.max_position_embeddings} tokens"
        )
    if length == 0:
        shape = (config.n_layers, 1, 0, config.n_kv_heads, config.head_dim)
        kv = PrefixKV(
            k=jnp.zeros(shape, lm.dtype),
            v=jnp.zeros(shape, lm.dtype),
            pos=jnp.zeros((1, 0), jnp.int32),
            last_hidden=jnp.zeros((config.d_model,), lm.dtype),
            length=jnp.zeros((), jnp.int32),
        )
    else:
        bucket = bucket_length(length, length_buckets)
        ids = np.zeros((1, bucket), np.int32)
        ids[0, : len(bos)] = bos
        ids[0, len(bos) + n_soft : length] = text_ids
        if soft is None:
            soft = jnp.zeros((0, config.d_model), lm.dtype)
        kv = _run_prefix(lm.graphdef, lm.params, jnp.asarray(ids), soft, jnp.int32(length), n_bos=len(bos))
    return PrefixCache(
        kv=kv, length=length, n_soft=n_soft, text=cached_text, carry=prefix_text[len(cached_text) :],
        model_name=lm.name,
    )  # fmt: skip


def _check_soft_prompt(soft_prompt, d_model: int):
    if soft_prompt is None:
        return None
    soft = jnp.asarray(soft_prompt)
    if soft.ndim != 2 or soft.shape[1] != d_model:
        raise ConfigError(
            f"soft_prompt must have shape [P, d_model={d_model}], got {tuple(soft.shape)}"
        )
    return soft


def resolve_prefix(lm, soft_prompt, prefix_text, prefix, length_buckets) -> PrefixCache:
    """The caller's ready prefix cache, or one computed from ``soft_prompt`` and ``prefix_text``."""
    if prefix is None:
        return prefix_cache(lm, soft_prompt, prefix_text, length_buckets=length_buckets)
    if soft_prompt is not None or prefix_text:
        raise ConfigError("pass either prefix= or soft_prompt=/prefix_text=, not both")
    if prefix.kv.k.shape[0] != lm.config.n_layers or prefix.kv.last_hidden.shape[0] != lm.config.d_model:
        raise ConfigError(f"the prefix cache was built for {prefix.model_name!r}, not {lm.name!r}")
    return prefix


@functools.partial(jax.jit, static_argnames=("graphdef", "n_bos"))
def _run_prefix(graphdef, params, ids, soft, length, *, n_bos: int) -> PrefixKV:
    TRACE_COUNTS["prefix"] += 1
    model = nnx.merge(graphdef, params)
    bucket = ids.shape[1]
    embeds = model.embed(ids)  # [1, Pb, D]
    if soft.shape[0]:
        embeds = jax.lax.dynamic_update_slice(embeds, soft[None].astype(embeds.dtype), (0, n_bos, 0))
    slots = jnp.arange(bucket)[None]  # [1, Pb]
    valid = slots < length
    cache = KVCache.init(model.config, 1, bucket, model.dtype)
    hidden, cache = model(embeds, slots, valid, cache)
    return PrefixKV(k=cache.k, v=cache.v, pos=cache.pos, last_hidden=hidden[0, length - 1], length=length)


def batch_cache(config, prefix: PrefixKV, batch: int, extra_slots: int, dtype) -> KVCache:
    """A cache of ``Pb + extra_slots`` slots whose first ``Pb`` hold the prefix for every row."""
    L, _, Pb, K, d = prefix.k.shape
    empty = KVCache.init(config, batch, extra_slots, dtype)
    kv = [
        jnp.concatenate([jnp.broadcast_to(p.astype(dtype), (L, batch, Pb, K, d)), e], axis=2)
        for p, e in ((prefix.k, empty.k), (prefix.v, empty.v))
    ]
    pos = jnp.concatenate([jnp.broadcast_to(prefix.pos, (batch, Pb)), empty.pos], axis=1)
    return KVCache(k=kv[0], v=kv[1], pos=pos, index=jnp.asarray(Pb, jnp.int32))


# --------------------------------------------------------------------------------------------------
# Generation


_STOP_MASKS: dict = {}


def token_text_mask(tokenizer, vocab_size: int, stop_sequences: Sequence[str]) -> np.ndarray:
    """``[V]`` bool: tokens whose decoded text contains any stop sequence (cached per tokenizer)."""
    key = (id(tokenizer), vocab_size, tuple(stop_sequences))
    cached = _STOP_MASKS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    mask = np.zeros(vocab_size, bool)
    if stop_sequences:
        n = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        mask[:n] = [any(s in t for s in stop_sequences) for t in texts]
    _STOP_MASKS[key] = (tokenizer, mask)
    return mask


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop_sequences:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def generate(
    lm,
    texts: Sequence[str],
    *,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    config: GenerationConfig = GenerationConfig(),
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``texts`` after ``[BOS]? [soft_prompt]? [prefix_text]?``.

    The prefix is computed once (or pass a ready ``prefix=prefix_cache(...)`` to share it between
    calls). Outputs skip special tokens, stop before EOS and are cut at the first stop sequence.
    Inputs longer than the largest bucket or the model's context are cut from the left, with a warning.
    """
    prefix = resolve_prefix(lm, soft_prompt, prefix_text, prefix, config.length_buckets)
    if not len(texts):
        return []
    max_input = _max_input_length(lm, prefix, config.max_new_tokens, config.length_buckets)
    encoded = [tok.encode(lm.tokenizer, prefix.join(t)) for t in texts]
    encoded = truncate_left(encoded, max_input, what="generation inputs")
    if prefix.length == 0 and any(len(e) == 0 for e in encoded):
        raise DataError(
            "an input text tokenizes to nothing and there is no BOS, soft prompt or prefix text "
            "to condition on; give every example some text"
        )

    vocab = lm.config.vocab_size
    eos = np.zeros(vocab, bool)
    eos[[i for i in tok.eos_ids(lm) if 0 <= i < vocab]] = True
    stop = token_text_mask(lm.tokenizer, vocab, config.stop_sequences) & ~eos
    new_slots = _round_up(config.max_new_tokens, _NEW_TOKEN_ROUNDING)
    pad_id = lm.tokenizer.pad_token_id or 0

    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))  # similar lengths share a bucket
    outputs: list[str] = [""] * len(texts)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    for batch in progress_bar(batches, progress, "generate"):
        seqs = [encoded[i] for i in batch]
        seqs += [[]] * (config.batch_size - len(seqs))  # dummy rows keep the batch shape static
        ids, valid = left_pad(seqs, bucket_length(max(map(len, seqs)), config.length_buckets), pad_id)
        active = np.arange(config.batch_size) < len(batch)
        out, n_kept = _generate_batch(
            lm.graphdef, lm.params, prefix.kv, jnp.asarray(ids), jnp.asarray(valid),
            jnp.asarray(active), jnp.asarray(eos), jnp.asarray(stop),
            jnp.int32(config.max_new_tokens), new_slots=new_slots,
        )  # fmt: skip
        out, n_kept = np.asarray(out), np.asarray(n_kept)
        decoded = lm.tokenizer.batch_decode(
            [out[row, : n_kept[row]].tolist() for row in range(len(batch))], skip_special_tokens=True
        )
        for i, text in zip(batch, decoded):
            outputs[i] = cut_at_stop(text, config.stop_sequences)
    return outputs


@functools.partial(jax.jit, static_argnames=("graphdef", "new_slots"))
def _generate_batch(graphdef, params, prefix: PrefixKV, ids, valid, active, is_eos, is_stop, max_new, *, new_slots):
    """Prefill a left-padded batch after the prefix, then decode greedily until all rows stop.

    Returns the generated ids ``[B, new_slots]`` and, per row, how many to keep (EOS excluded).
    """
    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    cache = batch_cache(model.config, prefix, B, T + new_slots, model.dtype)
    n_input = valid.sum(axis=1).astype(jnp.int32)  # [B]
    hidden, cache = model(model.embed(ids), positions_from_mask(valid, prefix.length), valid, cache)
    last = jnp.where(valid[:, -1:], hidden[:, -1], prefix.last_hidden[None])  # [B, D]
    first = jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32)  # [B]

    out = jnp.zeros((B, new_slots), jnp.int32).at[:, 0].set(first)
    n_kept = (active & ~is_eos[first]).astype(jnp.int32)
    done = ~active | is_eos[first] | is_stop[first]

    def keep_going(state):
        step, _, _, _, _, done = state
        return (step < max_new) & ~jnp.all(done)

    def decode_one(state):
        step, token, cache, out, n_kept, done = state
        positions = (prefix.length + n_input + step - 1)[:, None]  # where `token` sits
        hidden, cache = model(model.embed(token[:, None]), positions, ~done[:, None], cache)
        token = jnp.argmax(model.logits(hidden[:, 0]), axis=-1).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, 0, token)[:, None], (0, step))
        n_kept = n_kept + (~done & ~is_eos[token])
        done = done | is_eos[token] | is_stop[token]
        return step + 1, token, cache, out, n_kept, done

    state = (jnp.int32(1), first, cache, out, n_kept, done)
    _, _, _, out, n_kept, _ = jax.lax.while_loop(keep_going, decode_one, state)
    return out, n_kept


def _max_input_length(lm, prefix: PrefixCache, reserved: int, buckets: Sequence[int]) -> int:
    room = lm.config.max_position_embeddings - prefix.length - reserved
    if room < 1:
        raise ConfigError(
            f"the prefix ({prefix.length} slots) plus {reserved} new tokens fill {lm.name}'s "
            f"context of {lm.config.max_position_embeddings} tokens"
        )
    return min(room, max(buckets))


def truncate_left(encoded: list[list[int]], limit: int, *, what: str) -> list[list[int]]:
    """Keep the last ``limit`` tokens of each sequence, warning once when any was cut."""
    n_long = sum(len(e) > limit for e in encoded)
    if n_long:
        warnings.warn(
            f"{n_long} of {len(encoded)} {what} are longer than {limit} tokens (the largest length "
            f"bucket or the model's context after the prefix); kept their last {limit} tokens",
            stacklevel=3,
        )
        encoded = [e[-limit:] if len(e) > limit else e for e in encoded]
    return encoded


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def progress_bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")
