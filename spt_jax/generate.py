"""Batched greedy decoding with a KV cache, under jit, after a shared prefix computed once.

Every sequence follows `spt_jax.sequence`'s layout:

    [BOS]? [soft prompt: P vectors]? [prefix text]? [input text] [generated tokens]

The prefix (BOS, soft prompt and e.g. few-shot demonstrations) is computed once by
`spt_jax.prefix.prefix_cache`; each batch starts from that KV broadcast to the batch. The batch's
texts are left-padded into a length bucket right after the prefix (padding slots hold position -1,
which attention ignores), prefilled in one call, and decoded by a `jax.lax.while_loop` that stops
early once every row has hit EOS or a stop token. Shapes depend only on (prefix bucket, input bucket,
batch size, rounded max_new_tokens), so a run compiles a handful of times; the compilations are
counted in ``lm.compiled`` under "prefix" and "generate". The prefill scans the stacked layers (one
compiled layer). On CPU the decode steps run the layers one by one on per-layer copies of their
weights, made once per `generate` call or `Generator` (`unstack_layers`, counted under
"unstack_layers"), because a scan copies every layer's weights out of the stack on every step,
which costs a one-token step more than its GEMMs there; elsewhere (measured on CPU only, and
accelerator memory is dearer) decode scans too.
On one device those copies hold each kernel output-major and a decode step computes its
projections (and a tied head) as ``W @ x^T``, which XLA:CPU runs about twice as fast for 8 rows
(BUILD_NOTES.md, issue 11); on a mesh they keep the stacked layout its per-layer shardings describe.

Stop sequences: a ``[V]`` mask of tokens whose text contains a stop sequence (computed once per
model and stop set, kept in ``lm.compiled``) ends a row inside the loop; the decoded text is then
cut at the first stop sequence on the host, which also handles stop sequences spread over several
tokens (those end a row only at ``max_new_tokens``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from spt_jax import sequence as seq
from spt_jax.errors import ConfigError, DataError
from spt_jax.models.transformer import positions_from_mask, unstack_layers
from spt_jax.prefix import PrefixCache, PrefixKV, batch_cache, progress_bar, resolve_prefix
from spt_jax.system import release_freed_memory


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding settings. ``length_buckets`` are the padded input lengths (one compile each)."""

    max_new_tokens: int = 16
    stop_sequences: tuple[str, ...] = ("\n",)
    batch_size: int = 8
    length_buckets: tuple[int, ...] = seq.GENERATION_BUCKETS

    def __post_init__(self):
        object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        object.__setattr__(self, "length_buckets", tuple(sorted(self.length_buckets)))
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        seq.check_buckets(self.length_buckets)
        if any(not isinstance(s, str) or not s for s in self.stop_sequences):
            raise ConfigError(f"stop_sequences must be non-empty strings, got {self.stop_sequences!r}")


def token_text_mask(tokenizer, vocab_size: int, stop_sequences: Sequence[str]) -> np.ndarray:
    """``[V]`` bool: tokens whose decoded text contains any stop sequence."""
    mask = np.zeros(vocab_size, bool)
    if stop_sequences:
        n = min(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        mask[:n] = [any(s in t for s in stop_sequences) for t in texts]
    return mask


def stop_masks(lm, stop_sequences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(is_eos, is_stop)`` ``[V]`` masks for ``lm``, built once per stop set and kept in ``lm.compiled``."""

    def build():
        vocab = lm.config.vocab_size
        eos = np.zeros(vocab, bool)
        eos[[i for i in seq.eos_ids(lm) if 0 <= i < vocab]] = True
        return eos, token_text_mask(lm.tokenizer, vocab, stop_sequences) & ~eos

    return lm.compiled.memo(("stop_masks", tuple(stop_sequences)), build)


class Generator:
    """`generate` for many calls with one prefix and config: builds once what each call would.

    The prefix's KV and the stop masks are made here, so a prefix that leaves no room for
    ``max_new_tokens`` fails here too; the compiled batch function and, on CPU, the decode steps'
    per-layer weight copies (`_batch_runner`: they double the layers' memory while they live) on the
    first call with texts. All are kept until `close` (or the ``with`` block's end), so calling it
    batch by batch costs what one `generate` over all the texts does. One caller at a time: it is not
    thread-safe. Arguments as `generate`'s.
    """

    def __init__(self, lm, *, soft_prompt: jax.Array | None = None, prefix_text: str = "",
                 prefix: PrefixCache | None = None, config: GenerationConfig = GenerationConfig(),
                 mesh: Mesh | None = None):  # fmt: skip
        placed = None  # `spt_jax.tune.mesh.OnMesh`: the mesh and the weights placed on it
        if mesh is not None:
            from spt_jax.tune.mesh import on_mesh

            placed = on_mesh(lm, mesh, config.batch_size, "GenerationConfig.batch_size")
        self.lm, self.config, self._placed = lm, config, placed
        self.prefix = resolve_prefix(lm, soft_prompt, prefix_text, prefix, config.length_buckets,
                                     mesh=None if placed is None else placed.mesh,
                                     params=None if placed is None else placed.params)
        self._max_input = _max_input_length(lm, self.prefix, config.max_new_tokens, config.length_buckets)
        self._stop_masks = stop_masks(lm, config.stop_sequences)
        self._run, self._closed = None, False

    def _runner(self):
        if self._run is None:
            config = self.config
            new_slots = seq.round_up(config.max_new_tokens, seq.NEW_TOKEN_ROUNDING)
            self._run = _batch_runner(self.lm, self._placed, self.prefix.kv, *self._stop_masks,
                                      config.max_new_tokens, new_slots)
        return self._run

    def __call__(self, texts: Sequence[str], *, progress: bool = False) -> list[str]:
        """Greedy completions of ``texts`` after the prefix (see `generate`)."""
        if self._closed:
            raise RuntimeError("this Generator is closed")
        lm, config, prefix = self.lm, self.config, self.prefix
        if not len(texts):
            return []
        encoded = [seq.encode(lm.tokenizer, prefix.join(t)) for t in texts]
        encoded = seq.truncate_all_left(encoded, self._max_input, what="generation inputs")
        if prefix.length == 0 and any(len(e) == 0 for e in encoded):
            raise DataError(
                "an input text tokenizes to nothing and there is no BOS, soft prompt or prefix text "
                "to condition on; give every example some text"
            )
        pad = seq.pad_id(lm)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))  # similar lengths share a bucket
        outputs: list[str] = [""] * len(texts)
        batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for batch in progress_bar(batches, progress, "generate"):
            rows = [encoded[i] for i in batch]
            rows += [[]] * (config.batch_size - len(rows))  # dummy rows keep the batch shape static
            ids, valid = seq.left_pad(rows, seq.bucket_length(max(map(len, rows)), config.length_buckets), pad)
            active = np.arange(config.batch_size) < len(batch)
            out, n_kept = self._runner()(ids, valid, active)  # not in a local, which a traceback would keep
            out, n_kept = np.asarray(out), np.asarray(n_kept)
            decoded = lm.tokenizer.batch_decode(
                [out[row, : n_kept[row]].tolist() for row in range(len(batch))], skip_special_tokens=True
            )
            for i, text in zip(batch, decoded):
                outputs[i] = seq.cut_at_stop(text, config.stop_sequences)
        return outputs

    def close(self) -> None:
        """Drop the per-layer weight copies and give their pages back to the OS."""
        self._run, self._closed = None, True
        release_freed_memory()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate(
    lm,
    texts: Sequence[str],
    *,
    soft_prompt: jax.Array | None = None,
    prefix_text: str = "",
    prefix: PrefixCache | None = None,
    config: GenerationConfig = GenerationConfig(),
    progress: bool = False,
    mesh: Mesh | None = None,
) -> list[str]:
    """Greedy completions of ``texts`` after ``[BOS]? [soft_prompt]? [prefix_text]?``.

    The prefix is computed once (or pass a ready ``prefix=prefix_cache(...)`` to share it between
    calls). Outputs skip special tokens, stop before EOS and are cut at the first stop sequence.
    Inputs longer than the largest bucket or the model's context are cut from the left, with a warning.
    To generate batch by batch, keep one `Generator` instead: each call here builds its own.

    ``mesh``: a `jax.sharding.Mesh` with ``data`` and ``model`` axes (explicit or auto axis types):
    each batch's rows over ``data`` (``config.batch_size`` must divide it), weights over ``model`` by
    the family's rules (placed once if the model was not loaded onto the mesh), the prefix's KV
    replicated, the batch's KV cache over rows and kv heads. The outputs equal a single-device run's.
    On several processes every process runs this same call and gets every output.
    """
    with Generator(lm, soft_prompt=soft_prompt, prefix_text=prefix_text, prefix=prefix, config=config,
                   mesh=mesh) as generator:  # fmt: skip
        return generator(texts, progress=progress)


def _batch_runner(lm, on, kv: PrefixKV, eos, stop, max_new: int, new_slots: int):
    """``run(ids, valid, active) -> (out, n_kept)`` for one batch, on one device or on ``on``'s mesh.

    The decode steps' per-layer weight buffers are made here, once for all of a `Generator`'s
    batches, and dropped with it (they double the layers' memory while generation runs).
    """
    per_layer = jax.default_backend() == "cpu"  # see the module docstring
    if on is None:
        unstack = lm.compiled.jit("unstack_layers", functools.partial(unstack_layers, out_major=True))
        layers = unstack(lm.params) if per_layer else None
        jitted = lm.compiled.jit("generate", _generate_batch, static_argnames=("graphdef", "new_slots", "out_major"))
        masks = (jnp.asarray(eos), jnp.asarray(stop), jnp.int32(max_new))
        return lambda ids, valid, active: jitted(
            lm.graphdef, lm.params, layers, kv, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(active), *masks,
            new_slots=new_slots, out_major=per_layer,
        )  # fmt: skip

    def build():
        fn = functools.partial(_generate_batch, lm.graphdef, new_slots=new_slots,
                               cache_shardings=on.kv_shardings(lm.config))
        repl, rows = on.replicated, on.rows
        return jax.jit(lm.compiled.counted("generate", fn),
                       in_shardings=(on.param_shardings(lm), on.layer_shardings(lm) if per_layer else None,
                                     repl, rows, rows, rows, repl, repl, repl),
                       out_shardings=(repl, repl))  # every process gets every row's output

    jitted = lm.compiled.memo(("generate", on.mesh, new_slots), build)
    layers = None
    if per_layer:
        unstack = lm.compiled.memo(("unstack_layers", on.mesh), lambda: jax.jit(
            lm.compiled.counted("unstack_layers", unstack_layers), out_shardings=on.layer_shardings(lm)))
        with on.context():
            layers = unstack(on.params)
    kv, masks = on.replicate(kv), on.replicate((eos, stop, np.int32(max_new)))

    def run(ids, valid, active):
        rows = on.batch({"ids": ids, "valid": valid, "active": active})
        with on.context():
            return jitted(on.params, layers, kv, rows["ids"], rows["valid"], rows["active"], *masks)

    return run


def generate_text(lm, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy completion of one prompt until EOS, for notebooks and quick checks."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_sequences=(), batch_size=1)
    return generate(lm, [prompt], config=config)[0]


def _generate_batch(graphdef, params, layers, prefix: PrefixKV, ids, valid, active, is_eos, is_stop, max_new, *, new_slots,
                    cache_shardings=None, out_major=False):
    """Prefill a left-padded batch after the prefix, then decode greedily until all rows stop.

    ``layers``: `unstack_layers`' per-layer weights for the decode steps (output-major if
    ``out_major``), or None to scan the stacked ones.

    Returns the generated ids ``[B, new_slots]`` and, per row, how many to keep (EOS excluded).
    """
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    cache = batch_cache(model.config, prefix, B, T + new_slots, model.dtype, cache_shardings)
    n_input = valid.sum(axis=1).astype(jnp.int32)  # [B]
    hidden, cache = model(model.embed(ids), positions_from_mask(valid, prefix.length), valid, cache)
    last = jnp.where(valid[:, -1:], hidden[:, -1], prefix.last_hidden[None])  # [B, D]
    first = jnp.argmax(model.logits(last), axis=-1).astype(jnp.int32)  # [B]
    if layers is not None:
        cache = cache.per_layer()  # decode runs the layers one by one on `layers`

    out = jnp.zeros((B, new_slots), jnp.int32).at[:, 0].set(first)
    n_kept = (active & ~is_eos[first]).astype(jnp.int32)
    done = ~active | is_eos[first] | is_stop[first]

    def keep_going(state):
        step, _, _, _, _, done = state
        return (step < max_new) & ~jnp.all(done)

    def decode_one(state):
        step, token, cache, out, n_kept, done = state
        positions = (prefix.length + n_input + step - 1)[:, None]  # where `token` sits
        hidden, cache = model(model.embed(token[:, None]), positions, ~done[:, None], cache, layer_weights=layers,
                              out_major=out_major)
        token = jnp.argmax(model.logits(hidden[:, 0], out_major=out_major), axis=-1).astype(jnp.int32)
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
