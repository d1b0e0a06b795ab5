"""The shared-prefix KV cache, below both generation and scoring.

``[BOS]? [soft prompt]? [prefix text]?`` is the same for every item of a mode (few-shot
demonstrations, a tuned prompt), so `prefix_cache` runs it once at batch 1 and every batch starts
from its keys and values broadcast to the batch (`batch_cache`). The prefix text's trailing
whitespace is not cached but carried into every input, as lm-evaluation-harness moves a context's
trailing spaces into the continuation: BPE tokenizers merge a whitespace run with what follows, so
"demos\\n\\n" + "Question" tokenized apart would differ from the two tokenized together.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spt_jax import sequence as seq
from spt_jax.errors import ConfigError
from spt_jax.models.transformer import KVCache


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
    """A computed prefix reusable across calls and batches (see the module docstring for ``carry``)."""

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
    length_buckets: Sequence[int] = seq.GENERATION_BUCKETS,
    mesh: Mesh | None = None,
    params=None,
) -> PrefixCache:
    """Run ``[BOS]? [soft prompt]? [prefix_text]?`` once (batch 1) and keep its KV for reuse.

    With ``mesh`` (an Auto-axis mesh, see `spt_jax.tune.mesh.as_mesh`) it runs there on ``params``,
    the weights already placed on it (`spt_jax.tune.mesh.placed_params`; default ``lm.params``), and
    the KV comes back replicated on every device, ready for sharded generation and scoring.
    """
    seq.check_buckets(length_buckets)
    config = lm.config
    soft = check_soft_prompt(soft_prompt, config.d_model)
    n_soft = 0 if soft is None else int(soft.shape[0])
    layout = seq.Layout.for_model(lm, prompt_length=n_soft, max_length=config.max_position_embeddings,
                                  append_eos=False, buckets=(config.max_position_embeddings,))
    cached_text = prefix_text.rstrip()
    text_ids = seq.encode(lm.tokenizer, cached_text) if cached_text else []
    length = layout.n_fixed + len(text_ids)
    if length >= config.max_position_embeddings:
        raise ConfigError(
            f"the prefix (BOS + {n_soft} soft-prompt vectors + {len(text_ids)} prefix-text tokens = "
            f"{length}) leaves no room in {lm.name}'s context of {config.max_position_embeddings} tokens"
        )
    if length == 0:
        shape = (config.n_layers, 1, 0, config.n_kv_heads, config.head_dim)
        kv = PrefixKV(k=jnp.zeros(shape, lm.dtype), v=jnp.zeros(shape, lm.dtype), pos=jnp.zeros((1, 0), jnp.int32),
                      last_hidden=jnp.zeros((config.d_model,), lm.dtype), length=jnp.zeros((), jnp.int32))
    else:
        bucket = seq.bucket_length(length, seq.closed_buckets(length_buckets, config.max_position_embeddings))
        ids, prompt_index = layout.prefix_row(text_ids, bucket)
        soft = jnp.zeros((0, config.d_model), lm.dtype) if soft is None else soft
        if mesh is None:
            run = lm.compiled.jit("prefix", _run_prefix, static_argnames=("graphdef",))
            kv = run(lm.graphdef, lm.params, jnp.asarray(ids), jnp.asarray(prompt_index), soft, jnp.int32(length))
        else:
            params = lm.params if params is None else params
            with jax.set_mesh(mesh):
                kv = _prefix_on_mesh(lm, mesh, params)(
                    params, np.asarray(ids), np.asarray(prompt_index), np.asarray(soft), np.int32(length)
                )
    return PrefixCache(kv=kv, length=length, n_soft=n_soft, text=cached_text,
                       carry=prefix_text[len(cached_text) :], model_name=lm.name)


def _prefix_on_mesh(lm, mesh: Mesh, params):
    """The prefix function jitted for ``mesh``: weights as placed, small inputs and the KV replicated."""

    def build():
        repl = NamedSharding(mesh, PartitionSpec())
        fn = lm.compiled.counted("prefix", functools.partial(_run_prefix, lm.graphdef))
        weights = jax.tree.map(lambda x: x.sharding, params)
        return jax.jit(fn, in_shardings=(weights, repl, repl, repl, repl), out_shardings=repl)

    return lm.compiled.memo(("prefix", mesh), build)


def check_soft_prompt(soft_prompt, d_model: int):
    if soft_prompt is None:
        return None
    soft = jnp.asarray(soft_prompt)
    if soft.ndim != 2 or soft.shape[1] != d_model:
        raise ConfigError(f"soft_prompt must have shape [P, d_model={d_model}], got {tuple(soft.shape)}")
    return soft


def resolve_prefix(lm, soft_prompt, prefix_text, prefix, length_buckets, *, mesh=None, params=None) -> PrefixCache:
    """The caller's ready prefix cache, or one computed from ``soft_prompt`` and ``prefix_text``
    (on ``mesh`` with the placed ``params``, as `prefix_cache`)."""
    if prefix is None:
        return prefix_cache(lm, soft_prompt, prefix_text, length_buckets=length_buckets, mesh=mesh, params=params)
    if soft_prompt is not None or prefix_text:
        raise ConfigError("pass either prefix= or soft_prompt=/prefix_text=, not both")
    if prefix.kv.k.shape[0] != lm.config.n_layers or prefix.kv.last_hidden.shape[0] != lm.config.d_model:
        raise ConfigError(f"the prefix cache was built for {prefix.model_name!r}, not {lm.name!r}")
    return prefix


def _run_prefix(graphdef, params, ids, prompt_index, soft, length) -> PrefixKV:
    model = nnx.merge(graphdef, params)
    bucket = ids.shape[1]
    embeds = seq.place_prompt(model.embed(ids), soft, prompt_index)  # [1, Pb, D]
    slots = jnp.arange(bucket)[None]  # [1, Pb]
    cache = KVCache.init(model.config, 1, bucket, model.dtype)
    hidden, cache = model(embeds, slots, slots < length, cache)
    return PrefixKV(k=cache.k, v=cache.v, pos=cache.pos, last_hidden=hidden[0, length - 1], length=length)


def batch_cache(config, prefix: PrefixKV, batch: int, extra_slots: int, dtype, shardings=None) -> KVCache:
    """A cache of ``Pb + extra_slots`` slots whose first ``Pb`` hold the prefix for every row.

    ``shardings``: ``(kv, pos)`` shardings the cache is constrained to inside a sharded function
    (`spt_jax.tune.mesh.kv_cache_shardings`: rows over ``data``, kv heads over ``model``).
    """
    L, _, Pb, K, d = prefix.k.shape
    empty = KVCache.init(config, batch, extra_slots, dtype)
    kv = [
        jnp.concatenate([jnp.broadcast_to(p.astype(dtype), (L, batch, Pb, K, d)), e], axis=2)
        for p, e in ((prefix.k, empty.k), (prefix.v, empty.v))
    ]
    pos = jnp.concatenate([jnp.broadcast_to(prefix.pos, (batch, Pb)), empty.pos], axis=1)
    if shardings is not None:
        kv_sharding, pos_sharding = shardings
        kv = [jax.lax.with_sharding_constraint(x, kv_sharding) for x in kv]
        pos = jax.lax.with_sharding_constraint(pos, pos_sharding)
    return KVCache(k=kv[0], v=kv[1], pos=pos, index=jnp.asarray(Pb, jnp.int32))


def progress_bar(items, enabled: bool, desc: str):
    """A tqdm bar over batches when ``enabled`` (generation and scoring share it)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch")


__all__ = ["PrefixCache", "PrefixKV", "batch_cache", "check_soft_prompt", "prefix_cache", "resolve_prefix"]
