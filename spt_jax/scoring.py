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
        from spt_jax.tune.mesh import on_mesh

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
    """Per continuation token ``[B, width]``: log-probability and whether it is the argmax.

    The continuation fills the last ``n_cont`` slots of each left-padded row. Its first token is
    predicted by the slot before it, or by the prefix's last token when the context is empty.
    """
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    cache = batch_cache(model.config, prefix, B, T, model.dtype, cache_shardings)
    hidden, _ = model(model.embed(ids), positions_from_mask(valid, prefix.length), valid, cache)
    # Slot 0 is the prefix's last token, slot s + 1 the input's slot s.
    with_prefix = jnp.concatenate([jnp.broadcast_to(prefix.last_hidden, (B, 1, hidden.shape[-1])), hidden], 1)
    n_input = valid.sum(axis=1)
    c = jnp.arange(width)[None]  # [1, C]
    in_range = c < n_cont[:, None]  # [B, C]
    target_slot = jnp.clip(T - n_cont[:, None] + c, 0, T - 1)  # input slot of each continuation token
    predictor = jnp.where(target_slot - 1 >= T - n_input[:, None], target_slot, 0)  # in with_prefix
    predictor = jnp.where(in_range, predictor, 0)
    picked = jnp.take_along_axis(with_prefix, predictor[..., None], axis=1)  # [B, C, D]
    logits = model.logits(picked)  # [B, C, V]
    targets = jnp.take_along_axis(ids, target_slot, axis=1)  # [B, C]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    is_greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.where(in_range, target_logprob, 0.0), jnp.where(in_range, is_greedy, True)


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


def item_choice_loglikelihoods(
    lm,
    items: Sequence[Sequence[tuple[str, str]]],
    *,
    soft_prompt: jax.Array | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
) -> list[np.ndarray]:
    """Per item, the log-likelihood ``[n_choices]`` of each (context, continuation) pair.

    Pairs that share their context (a cloze item's choices) are scored in one pass from that
    context: its KV is computed once as the item's prefix and the choices continue it as one batch,
    instead of recomputing the context for every choice. Items whose choices have different
    contexts (Winogrande's partial scoring) are scored pair by pair. ``mesh``: as in
    `score_continuations` (an item's batch is padded to a multiple of the ``data`` axis).
    """
    data, params = 1, None
    if mesh is not None:
        from spt_jax.tune.mesh import DATA, as_mesh, placed_params

        mesh = as_mesh(mesh)
        data, params = int(mesh.shape[DATA]), placed_params(lm, mesh)
    out = []
    for pairs in progress_bar(list(items), progress, "score items"):
        if not pairs:
            raise DataError("an item has no answer choices")
        contexts = {context for context, _ in pairs}
        batch_size = math.lcm(seq.pow2_width(len(pairs), 1), data)
        if len(contexts) == 1:
            prefix = prefix_cache(lm, soft_prompt, pairs[0][0], mesh=mesh, params=params)
            scores = score_continuations(lm, [""] * len(pairs), [c for _, c in pairs], prefix=prefix,
                                         batch_size=batch_size, mesh=mesh).loglikelihood
        else:
            scores = score_continuations(lm, [c for c, _ in pairs], [x for _, x in pairs], soft_prompt=soft_prompt,
                                         batch_size=batch_size, mesh=mesh).loglikelihood
        out.append(np.asarray(scores, np.float64))
    return out
