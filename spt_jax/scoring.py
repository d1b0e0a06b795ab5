"""Log-likelihood of continuations, the knowledge reference for multiple-choice tasks.

As in lm-evaluation-harness's ``loglikelihood``: the score of a continuation is the sum of its
tokens' log-probabilities given the context, and ``is_greedy`` says whether greedy decoding would
have produced it. The context/continuation split follows the harness too: trailing spaces of the
context move to the continuation, the pair is tokenized whole and the continuation is what follows
the context's tokens. Sequences use generation's layout and shared prefix
(``[BOS]? [soft prompt]? [prefix text]? [context + continuation]``, left-padded into length buckets)
and the vocabulary projection runs only at the continuation positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from spt_jax import sequence as seq
from spt_jax.errors import ConfigError, DataError
from spt_jax.models.transformer import positions_from_mask
from spt_jax.prefix import PrefixCache, PrefixKV, batch_cache, prefix_cache, progress_bar, resolve_prefix
from spt_jax.tune.mesh import DATA, OnMesh, as_mesh, on_mesh, placed_params


@dataclasses.dataclass(frozen=True)
class LoglikelihoodResult:
    """Per pair: summed continuation log-probability (float64), greedy match and token count."""

    loglikelihood: np.ndarray  # [N] float64
    is_greedy: np.ndarray  # [N] bool
    n_tokens: np.ndarray  # [N] int, continuation tokens scored


def score_continuations(
    lm,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    batch_size: int = 8,
    length_buckets: Sequence[int] = seq.GENERATION_BUCKETS,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> LoglikelihoodResult:
    """Log-likelihood and greedy match of each continuation after ``[prefix] + context``.

    Contexts too long for the largest bucket or the model's context are cut from the left with a
    warning; a continuation that alone does not fit is an error. ``mesh``: as in
    `spt_jax.generate.generate` (rows over ``data``, which ``batch_size`` must divide; weights over
    ``model``); the scores equal a single-device run's within float tolerance.
    """
    if len(contexts) != len(continuations):
        raise DataError(f"got {len(contexts)} contexts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    on = None
    if mesh is not None:
        on = on_mesh(lm, mesh, batch_size, "batch_size")
    prefix = resolve_prefix(lm, soft_prompt, prefix_text, prefix, length_buckets,
                            mesh=None if on is None else on.mesh, params=None if on is None else on.params)
    n = len(contexts)
    if not n:
        return LoglikelihoodResult(np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64))
    limit = min(lm.config.max_position_embeddings - prefix.length, max(length_buckets))
    pairs = [seq.split_pair(lm.tokenizer, prefix.join(c), x) for c, x in zip(contexts, continuations)]
    for i, (context_ids, cont_ids) in enumerate(pairs):
        if len(cont_ids) > limit - (1 if prefix.length == 0 else 0):
            raise DataError(
                f"continuation {i} has {len(cont_ids)} tokens, more than fit after the prefix "
                f"({limit} slots: largest length bucket or model context)"
            )
        if prefix.length == 0 and not context_ids and cont_ids:
            raise DataError(
                f"context {i} tokenizes to nothing and there is no BOS, soft prompt or prefix text, "
                "so the continuation's first token has nothing to be predicted from"
            )
    seqs = seq.truncate_all_left([c + x for c, x in pairs], limit, what="context + continuation pairs")
    n_cont = np.array([len(x) for _, x in pairs])

    logprob = np.zeros(n, np.float64)
    greedy = np.ones(n, bool)
    order = sorted(range(n), key=lambda i: -len(seqs[i]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    pad = seq.pad_id(lm)
    run = _batch_runner(lm, on, prefix.kv)
    for batch in progress_bar(batches, progress, "score"):
        rows = [seqs[i] for i in batch] + [[]] * (batch_size - len(batch))
        conts = np.zeros(batch_size, np.int32)
        conts[: len(batch)] = n_cont[batch]
        ids, valid = seq.left_pad(rows, seq.bucket_length(max(map(len, rows)), length_buckets), pad)
        width = seq.pow2_width(int(conts.max()), seq.MIN_CONTINUATION_WIDTH)
        token_logprobs, token_greedy = run(ids, valid, conts, width)
        token_logprobs = np.asarray(token_logprobs, np.float64)[: len(batch)]
        logprob[batch] = token_logprobs.sum(axis=1)
        greedy[batch] = np.asarray(token_greedy)[: len(batch)].all(axis=1)
    return LoglikelihoodResult(loglikelihood=logprob, is_greedy=greedy, n_tokens=n_cont)


def _batch_runner(lm, on, kv: PrefixKV):
    """``run(ids, valid, n_cont, width)`` for one batch, on one device or on ``on``'s mesh."""
    if on is None:
        jitted = lm.compiled.jit("score", _score_batch, static_argnames=("graphdef", "width"))
        return lambda ids, valid, conts, width: jitted(
            lm.graphdef, lm.params, kv, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(conts), width=width
        )
    kv = on.replicate(kv)

    def build(width: int):
        fn = functools.partial(_score_batch, lm.graphdef, width=width, cache_shardings=on.kv_shardings(lm.config))
        repl, rows = on.replicated, on.rows
        return jax.jit(lm.compiled.counted("score", fn),
                       in_shardings=(on.param_shardings(lm), repl, rows, rows, rows),
                       out_shardings=(repl, repl))  # every process gets every row's scores

    def run(ids, valid, conts, width):
        jitted = lm.compiled.memo(("score", on.mesh, width), lambda: build(width))
        rows = on.batch({"ids": ids, "valid": valid, "conts": conts})
        with on.context():
            return jitted(on.params, kv, rows["ids"], rows["valid"], rows["conts"])

    return run


def loglikelihoods(
    lm,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    batch_size: int = 8,
    length_buckets: Sequence[int] = seq.GENERATION_BUCKETS,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Summed log-probability ``[N]`` (float64) of each continuation given its context."""
    return score_continuations(
        lm, contexts, continuations, soft_prompt=soft_prompt, prefix_text=prefix_text, prefix=prefix,
        batch_size=batch_size, length_buckets=length_buckets, progress=progress, mesh=mesh,
    ).loglikelihood  # fmt: skip


def _score_batch(graphdef, params, prefix: PrefixKV, ids, valid, n_cont, *, width: int, cache_shardings=None):
    """Per continuation token ``[B, width]``: log-probability and whether it is the argmax, every
    row continuing the one shared ``prefix``."""
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    cache = batch_cache(model.config, prefix, B, T, model.dtype, cache_shardings)
    last_hidden = jnp.broadcast_to(prefix.last_hidden, (B, prefix.last_hidden.shape[-1]))
    return _score_rows(model, cache, last_hidden, prefix.length, ids, valid, n_cont, width)


def _score_rows(model, cache, last_hidden, offset, ids, valid, n_cont, width: int, n_scored: int | None = None):
    """`_score_batch` from a ready ``cache``: row b continues a context of ``offset`` (``[]`` or
    ``[B]``) positions whose last token's hidden state is ``last_hidden[b]``. ``n_scored`` (static,
    at least ``n_cont.sum()``): project only that many slots onto the vocabulary, not ``B * width``.

    The continuation fills the last ``n_cont`` slots of each left-padded row. Its first token is
    predicted by the slot before it, or by the context's last token when the row holds nothing else.
    """
    B, T = ids.shape
    positions = positions_from_mask(valid, jnp.reshape(offset, (-1, 1)))
    hidden, _ = model(model.embed(ids), positions, valid, cache)
    # Slot 0 is the context's last token, slot s + 1 the input's slot s.
    with_prefix = jnp.concatenate([last_hidden[:, None].astype(hidden.dtype), hidden], 1)
    n_input = valid.sum(axis=1)
    c = jnp.arange(width)[None]  # [1, C]
    in_range = c < n_cont[:, None]  # [B, C]
    target_slot = jnp.clip(T - n_cont[:, None] + c, 0, T - 1)  # input slot of each continuation token
    predictor = jnp.where(target_slot - 1 >= T - n_input[:, None], target_slot, 0)  # in with_prefix
    predictor = jnp.where(in_range, predictor, 0)
    picked = jnp.take_along_axis(with_prefix, predictor[..., None], axis=1)  # [B, C, D]
    targets = jnp.take_along_axis(ids, target_slot, axis=1)  # [B, C]
    if n_scored is None or n_scored >= B * width:
        target_logprob, is_greedy = _head_scores(model, picked, targets)
    else:  # the vocabulary projection only at the first n_scored slots in range (all of them)
        at = jnp.argsort(~in_range.reshape(-1), stable=True)[:n_scored]
        flat_logprob, flat_greedy = _head_scores(model, picked.reshape(B * width, -1)[at], targets.reshape(-1)[at])
        target_logprob = jnp.zeros(B * width, flat_logprob.dtype).at[at].set(flat_logprob).reshape(B, width)
        is_greedy = jnp.zeros(B * width, bool).at[at].set(flat_greedy).reshape(B, width)
    return jnp.where(in_range, target_logprob, 0.0), jnp.where(in_range, is_greedy, True)


def _head_scores(model, hidden, targets):
    """Log-probability of each target under the logits of ``hidden`` ``[..., D]``, and whether it is
    the argmax."""
    logits = model.logits(hidden)  # [..., V]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return target_logprob, jnp.argmax(logits, axis=-1) == targets


def _score_shared_contexts(graphdef, params, base: PrefixKV, ctx_ids, ctx_valid, row_item, ids, valid, n_cont, *,
                           width: int, n_scored: int):
    """`_score_batch` for rows that continue one of several contexts: ``ctx_ids`` ``[I, Tc]`` (left
    padded, after ``base``) run once each, then row r continues context ``row_item[r]``."""
    model = nnx.merge(graphdef, params)
    n_items, ctx_len = ctx_ids.shape
    cache = batch_cache(model.config, base, n_items, ctx_len + ids.shape[1], model.dtype)
    hidden, cache = model(model.embed(ctx_ids), positions_from_mask(ctx_valid, base.length), ctx_valid, cache)
    n_ctx = ctx_valid.sum(axis=1)
    last_hidden = jnp.where((n_ctx > 0)[:, None], hidden[:, -1], base.last_hidden.astype(hidden.dtype))
    rows = lambda x, axis: jnp.take(x, row_item, axis=axis)  # noqa: E731
    cache = cache.replace(k=rows(cache.k, 1), v=rows(cache.v, 1), pos=rows(cache.pos, 0))
    return _score_rows(model, cache, rows(last_hidden, 0), base.length + rows(n_ctx, 0), ids, valid, n_cont, width,
                       n_scored)


# --------------------------------------------------------------------------------------------------
# Multiple choice


def choice_loglikelihoods(
    lm,
    context_and_choices: Sequence[tuple[str, Sequence[str]]],
    *,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    batch_size: int = 8,
    length_buckets: Sequence[int] = seq.GENERATION_BUCKETS,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
    """Per item, the log-likelihood ``[n_choices]`` of each choice continuing the item's context."""
    for i, (_, choices) in enumerate(context_and_choices):
        if not len(choices):
            raise DataError(f"item {i} has no answer choices")
    contexts = [context for context, choices in context_and_choices for _ in choices]
    continuations = [choice for _, choices in context_and_choices for choice in choices]
    flat = loglikelihoods(
        lm, contexts, continuations, soft_prompt=soft_prompt, prefix_text=prefix_text, prefix=prefix,
        batch_size=batch_size, length_buckets=length_buckets, progress=progress, mesh=mesh,
    )  # fmt: skip
    bounds = np.cumsum([0] + [len(choices) for _, choices in context_and_choices])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def predictions_from_loglikelihoods(
    scores: Sequence[np.ndarray],
    choices: Sequence[Sequence[str]],
    *,
    length_normalized: bool = False,
) -> np.ndarray:
    """Argmax choice per item; ``length_normalized`` divides by the choice's character count, as
    lm-evaluation-harness's ``acc_norm`` does (so long choices are not penalized for their length)."""
    picks = []
    for item_scores, item_choices in zip(scores, choices):
        item_scores = np.asarray(item_scores, np.float64)
        if length_normalized:
            item_scores = item_scores / np.array([max(len(c), 1) for c in item_choices], np.float64)
        picks.append(int(np.argmax(item_scores)))
    return np.array(picks, np.int64)


def choice_predictions(
    lm,
    context_and_choices: Sequence[tuple[str, Sequence[str]]],
    *,
    length_normalized: bool = False,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    batch_size: int = 8,
    length_buckets: Sequence[int] = seq.GENERATION_BUCKETS,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Index of the most likely choice per item (``length_normalized``: lm-eval's ``acc_norm``)."""
    scores = choice_loglikelihoods(
        lm, context_and_choices, soft_prompt=soft_prompt, prefix_text=prefix_text, prefix=prefix,
        batch_size=batch_size, length_buckets=length_buckets, progress=progress, mesh=mesh,
    )  # fmt: skip
    return predictions_from_loglikelihoods(
        scores, [choices for _, choices in context_and_choices], length_normalized=length_normalized
    )


# Rows x cache slots one shared-context call may hold: a choice row carries its own copy of its
# context's KV, so long contexts (5-shot MMLU) go one item a call and short ones (a question) eight.
SHARED_CONTEXT_SLOTS = 4096
SHARED_CONTEXT_ITEMS = 8
# The vocabulary projection runs on a chunk's real continuation tokens, their count rounded up to
# this (a static shape: coarser compiles fewer shapes, finer projects fewer padding slots).
SCORED_SLOTS_ROUNDING = 32


def item_choice_loglikelihoods(
    lm,
    items: Sequence[Sequence[tuple[str, str]]],
    *,
    soft_prompt: jax.Array | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
    """Per item, the log-likelihood ``[n_choices]`` of each (context, continuation) pair.

    Pairs that share their context (a cloze item's choices) are scored from one computation of that
    context: its KV is computed once and every choice continues it, instead of recomputing the
    context for every choice. Several such items go in one call, contexts batched first and choices
    after (up to `SHARED_CONTEXT_ITEMS`, within `SHARED_CONTEXT_SLOTS`). Items whose choices have
    different contexts (Winogrande's partial scoring) are scored pair by pair. ``mesh``: as in
    `score_continuations` (contexts and choice rows over ``data``, padded to a multiple of it).
    """
    items = [list(pairs) for pairs in items]
    for pairs in items:
        if not pairs:
            raise DataError("an item has no answer choices")
    shared = [len({context for context, _ in pairs}) == 1 for pairs in items]
    base = prefix_cache(lm, soft_prompt, mesh=None if mesh is None else as_mesh(mesh),
                        params=None if mesh is None else placed_params(lm, mesh))
    run, data = _shared_runner(lm, mesh, base.kv)
    out: list[np.ndarray | None] = [None] * len(items)
    for i in (i for i, is_shared in enumerate(shared) if not is_shared):
        pairs = items[i]
        out[i] = score_continuations(lm, [c for c, _ in pairs], [x for _, x in pairs], soft_prompt=soft_prompt,
                                     batch_size=math.lcm(seq.pow2_width(len(pairs), 1), data), mesh=mesh).loglikelihood
    encoded = {i: _encode_shared_item(lm, items[i], base) for i, is_shared in enumerate(shared) if is_shared}
    for chunk in progress_bar(_shared_chunks(encoded, base.bucket), progress, "score items"):
        for i, scores in zip(chunk, _score_chunk(lm, run, data, [encoded[i] for i in chunk])):
            out[i] = scores
    return [np.asarray(scores, np.float64) for scores in out]


def _shared_runner(lm, mesh, kv: PrefixKV):
    """``run(rows, width, n_scored)``: `_score_shared_contexts` after the prefix ``kv``, and the
    multiple of rows a call needs: one device, or ``mesh`` with every row array over ``data`` and
    the scores replicated (the prefix replicated once, here)."""
    static = ("graphdef", "width", "n_scored")
    if mesh is None:
        jitted = lm.compiled.jit("score_shared", _score_shared_contexts, static_argnames=static)
        return (lambda rows, width, n_scored: jitted(lm.graphdef, lm.params, kv, *map(jnp.asarray, rows.values()),
                                                         width=width, n_scored=n_scored)), 1  # fmt: skip
    on = OnMesh(mesh=as_mesh(mesh), params=placed_params(lm, mesh))
    kv = on.replicate(kv)

    def build(width: int, n_scored: int):
        fn = functools.partial(_score_shared_contexts, lm.graphdef, width=width, n_scored=n_scored)
        repl, rows = on.replicated, on.rows
        return jax.jit(lm.compiled.counted("score_shared", fn), in_shardings=(on.param_shardings(lm), repl) + (rows,) * 6,
                       out_shardings=(repl, repl))

    def run(rows, width, n_scored):
        jitted = lm.compiled.memo(("score_shared", on.mesh, width, n_scored), lambda: build(width, n_scored))
        with on.context():
            return jitted(on.params, kv, *on.batch(rows).values())

    return run, int(on.mesh.shape[DATA])


def _encode_shared_item(lm, pairs, base: PrefixCache) -> tuple[list[int], list[list[int]]]:
    """Context ids (cut from the left to fit) and each choice's ids, tokenized as `prefix_cache`
    and `score_continuations` would with the context as the prefix text: the context without its
    trailing whitespace, which goes to the front of every continuation."""
    context = pairs[0][0]
    stripped = context.rstrip()
    conts = [seq.encode(lm.tokenizer, context[len(stripped) :] + x) for _, x in pairs]
    context_ids = seq.encode(lm.tokenizer, stripped) if stripped else []
    if not context_ids and base.length == 0:
        raise DataError(f"context {context!r} tokenizes to nothing and there is no BOS or soft prompt, so a "
                        "continuation's first token has nothing to be predicted from")
    room = min(lm.config.max_position_embeddings, max(seq.GENERATION_BUCKETS)) - base.length
    room -= seq.pow2_width(max(map(len, conts)), seq.MIN_CONTINUATION_WIDTH)
    if room < 1:
        raise DataError(f"a continuation of {max(map(len, conts))} tokens leaves no room for its context "
                        f"in {lm.name}'s context of {lm.config.max_position_embeddings} tokens")
    return seq.truncate_all_left([context_ids], room, what="cloze contexts")[0], conts


def _shared_chunks(encoded: dict, prefix_bucket: int) -> list[list[int]]:
    """Items grouped by context length (fewer shapes, less padding), each call within the row-slot
    and item limits."""
    chunks, chunk = [], []
    for i in sorted(encoded, key=lambda i: len(encoded[i][0])):
        trial = chunk + [i]
        rows = seq.pow2_width(sum(len(encoded[j][1]) for j in trial), 1)
        context_slots = seq.bucket_length(max(len(encoded[j][0]) for j in trial), seq.GENERATION_BUCKETS)
        width = seq.pow2_width(max(len(x) for j in trial for x in encoded[j][1]), seq.MIN_CONTINUATION_WIDTH)
        slots = prefix_bucket + context_slots + width
        if chunk and (len(trial) > SHARED_CONTEXT_ITEMS or rows * slots > SHARED_CONTEXT_SLOTS):
            chunks.append(chunk)
            trial = [i]
        chunk = trial
    return chunks + ([chunk] if chunk else [])


def _score_chunk(lm, run, multiple: int, encoded) -> list[np.ndarray]:
    """Scores of a chunk's items: contexts padded to a length bucket, choices to a power of two
    (and both row counts to a multiple of ``multiple``, the mesh's ``data`` axis)."""
    pad = seq.pad_id(lm)
    n_rows = lambda n: math.lcm(seq.pow2_width(n, 1), multiple)  # noqa: E731
    contexts = [context_ids for context_ids, _ in encoded]
    contexts += [[]] * (n_rows(len(contexts)) - len(contexts))
    ctx_ids, ctx_valid = seq.left_pad(contexts, seq.bucket_length(max(map(len, contexts)), seq.GENERATION_BUCKETS), pad)
    conts = [x for _, item_conts in encoded for x in item_conts]
    row_item = [i for i, (_, item_conts) in enumerate(encoded) for _ in item_conts]
    empty = n_rows(len(conts)) - len(conts)
    width = seq.pow2_width(max(map(len, conts)), seq.MIN_CONTINUATION_WIDTH)
    ids, valid = seq.left_pad(conts + [[]] * empty, width, pad)
    n_cont = np.array([len(x) for x in conts] + [0] * empty, np.int32)
    rows = {"ctx_ids": ctx_ids, "ctx_valid": ctx_valid, "row_item": np.array(row_item + [0] * empty, np.int32),
            "ids": ids, "valid": valid, "n_cont": n_cont}
    token_logprobs, _ = run(rows, width, seq.round_up(int(n_cont.sum()), SCORED_SLOTS_ROUNDING))
    totals = np.asarray(token_logprobs, np.float64).sum(axis=1)
    bounds = np.cumsum([0] + [len(item_conts) for _, item_conts in encoded])
    return [totals[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
