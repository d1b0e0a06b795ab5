"""The decoder-only LM every family shares, as Flax NNX modules.

The model takes *input embeddings* rather than token ids, with explicit positions and a validity mask,
so a soft prompt joins in embedding space and left or right padding never shifts a position. Layers
are stacked along a leading axis and run with `jax.lax.scan`, so a 30-layer model compiles one layer.
A one-token decode step instead runs them one after another on per-layer weight buffers
(`unstack_layers`): on CPU a scan copies each layer's weights out of the stack before its GEMMs, and
for a single token that copy costs more than the GEMMs. Those buffers can also hold each kernel
output-major (``out_major``), for XLA:CPU's faster form of a GEMM with a few rows (`_out_major_matmul`).

Shapes: B batch, T new tokens, S cache slots, D d_model, H query heads, K kv heads, G = H // K,
d head_dim, F d_ff, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spt_jax.models.config import ModelConfig, RopeConfig

_NO_WINDOW = 2**30  # a window wider than any context: global attention
_MASKED = -1e30  # finite, so a fully masked (padding) query row softmaxes to uniform, not NaN
# What a rematerialized layer keeps for the backward pass (the rest it recomputes): "full" keeps only
# its input; "dots" also keeps every weight projection's output (q/k/v/o, gate/up/down) and
# recomputes norms, rotary embeddings, attention and activations, which are cheap next to the GEMMs.
# "none" keeps everything but the slices of the stacked weights (the scan's dynamic slices, their
# squeezes and dtype casts), which the backward pass takes again rather than store a second set.
_WEIGHT_SLICING = (jax.lax.dynamic_slice_p, jax.lax.squeeze_p, jax.lax.convert_element_type_p)
REMAT_POLICIES = {
    "none": lambda prim, *_, **__: prim not in _WEIGHT_SLICING,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for S slots; ``pos`` is -1 where a slot holds nothing.

    ``k`` and ``v`` are stacked ``[L, B, S, K, d]`` for the layer scan, or tuples of L arrays
    ``[B, S, K, d]`` (`per_layer`) for layers run one by one on `unstack_layers`' weights.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    pos: jax.Array  # [B, S] int32 position of the token in each slot, -1 when empty or padding
    index: jax.Array  # [] int32, the next slot to write

    @classmethod
    def init(cls, config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full((batch, length), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    def per_layer(self) -> KVCache:
        """This cache with ``k`` and ``v`` split into one array per layer."""
        if isinstance(self.k, tuple):
            return self
        split = lambda x: tuple(x[i] for i in range(x.shape[0]))  # noqa: E731
        return self.replace(k=split(self.k), v=split(self.v))


@flax.struct.dataclass
class PrefixedRows:
    """B rows that all begin with the same H-slot prefix, packed as one sequence of ``H + B*T`` slots:
    ``[prefix, row 0's T slots, ..., row B-1's]`` (`DecoderLM.prefixed_rows`).

    The prefix's slots sit at positions ``0..H-1``; each row's slots continue at ``positions``.
    """

    positions: jax.Array  # [B, T] int32, positions of the rows' slots
    kv_pos: jax.Array  # [B, T] int32, those positions where a slot is valid, -1 on padding
    prefix_length: int = flax.struct.field(pytree_node=False)
    # The slots the last layer's output projection and MLP compute (`DecoderLM.prefixed_rows`'
    # ``at``): [N] int32 indices in the packed sequence, or None for all.
    read_slot: jax.Array | None = None

    def flat_positions(self) -> jax.Array:
        """``[1, H + B*T]``: the packed sequence's positions (for its rotary tables)."""
        head = jnp.arange(self.prefix_length, dtype=jnp.int32)
        return jnp.concatenate([head, self.positions.reshape(-1)])[None]

    def split(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A packed ``[1, H + B*T, ...]`` array as the prefix's ``[1, H, ...]`` and the rows' ``[B, T, ...]``."""
        B, T = self.positions.shape
        return x[:, : self.prefix_length], x[0, self.prefix_length :].reshape(B, T, *x.shape[2:])


def _behind_prefix(prefix: jax.Array, rows: jax.Array) -> jax.Array:
    """Each row of ``rows [B, T, ...]`` after the prefix ``[1, H, ...]``: ``[B, H + T, ...]`` (a whole row)."""
    return jnp.concatenate([jnp.broadcast_to(prefix, (rows.shape[0], *prefix.shape[1:])), rows], 1)


# Each weight kernel's number of input axes: its layout is ``[*in, *out]`` (``o_proj``: [H, d, D]).
_KERNEL_INPUT_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def unstack_layers(params: nnx.State, *, out_major: bool = False) -> tuple[nnx.State, ...]:
    """A `DecoderLM`'s stacked layer weights ``[L, ...]`` as L states of their own (jit it: separate buffers).

    ``out_major``: each kernel stored ``[*out, *in]`` instead, for `DecoderLM.__call__`'s
    ``out_major`` (a decode step's few rows).
    """
    layers = params["layers"]

    def layer_leaf(i, path, x):  # layer i's slice, transposed per slice (no transposed stack in memory)
        n_in = _KERNEL_INPUT_AXES.get(path[-2].key) if out_major else None
        return x[i] if n_in is None else jnp.moveaxis(x[i], range(n_in), range(x.ndim - 1 - n_in, x.ndim - 1))

    n_layers = jax.tree.leaves(layers)[0].shape[0]
    return tuple(jax.tree_util.tree_map_with_path(functools.partial(layer_leaf, i), layers) for i in range(n_layers))


def _matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """``x [..., *in]`` times a kernel stored ``[*in, *out]``, as one 2-D ``x @ W`` over flattened axes.

    A dot contracting two axes (q/k/v/o's heads: ``BTHd,HdD->BTD``) made XLA:CPU copy each layer's
    kernel transposed for the backward pass (27.6 ms a tuning step for Gemma-3-270M's q_proj); the
    2-D form's gradient reads the kernel as stored (BUILD_NOTES.md, issue 11).
    """
    lead, n_inputs = x.shape[: x.ndim - n_in], math.prod(kernel.shape[:n_in])
    return (x.reshape(*lead, n_inputs) @ kernel.reshape(n_inputs, -1)).reshape(*lead, *kernel.shape[n_in:])


def _out_major_matmul(x: jax.Array, kernel: jax.Array, n_in: int, preferred_element_type=None) -> jax.Array:
    """``x [..., *in]`` times a kernel stored output-major ``[*out, *in]``, as ``kernel @ x^T``.

    For a few rows (a decode step) XLA:CPU runs ``W[N, K] @ x^T[K, rows]`` about twice as fast as
    ``x @ W`` (BUILD_NOTES.md, issue 11). The barriers keep XLA from folding the two transposes
    back into an ``x @ W^T`` dot, which is no faster than ``x @ W``.
    """
    lead, out = x.shape[: x.ndim - n_in], kernel.shape[: kernel.ndim - n_in]
    rows = jax.lax.optimization_barrier(x.reshape(-1, math.prod(x.shape[x.ndim - n_in :])).T)
    y = jnp.matmul(kernel.reshape(math.prod(out), -1), rows, preferred_element_type=preferred_element_type)
    y = jax.lax.optimization_barrier(y)
    return y.T.reshape(*lead, *out)


def _linear(x: jax.Array, kernel: nnx.Param, bias: nnx.Param | None, out_major: bool, dtype) -> jax.Array:
    """``x [B, T, *in]`` times ``kernel [*in, *out]`` (stored ``[*out, *in]`` if ``out_major``), plus
    ``bias``, in ``dtype``: every weight projection of a layer."""
    kernel = kernel[...].astype(dtype)
    y = (_out_major_matmul if out_major else _matmul)(x, kernel, n_in=x.ndim - 2)
    return y + bias[...].astype(dtype) if bias is not None else y


def _param(rngs: nnx.Rngs, shape, param_dtype, std: float = 0.02) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))


class Norm(nnx.Module):
    """RMSNorm (with Gemma's optional 1 + w) or LayerNorm, always computed in float32."""

    def __init__(self, dim: int, config: ModelConfig, param_dtype):
        self.kind, self.eps, self.offset = config.norm, config.norm_eps, config.norm_offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - self.offset, param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if self.kind == "layer" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Over rows [N, D]: XLA:CPU's YNNPACK runs the backward pass's row sums over the packed tuning
        # sequence's [1, N, D] about 5x slower than over [N, D] (BUILD_NOTES.md, issue 11).
        x32 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if self.kind == "layer":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        y = y * (self.offset + self.scale[...].astype(jnp.float32))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype).reshape(x.shape)


def rope_tables(rope: RopeConfig, head_dim: int, positions: jax.Array):
    """cos and sin ``[B, T, d // 2]`` for rotate-half rotary embeddings at the given positions."""
    inv_freq = jnp.asarray(rope.inv_freq(head_dim), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, N, d]`` (Hugging Face's rotate-half layout: element i pairs with i + d/2).

    On x viewed as halves ``[..., 2, d/2]``: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``.
    The same numbers as splitting the last axis and concatenating the halves back, which XLA:CPU
    left as a copy of its own in the tuning step; forward and backward on Gemma-3-270M's q this form
    takes 0.27 ms, that one 0.87-1.1 ms (BUILD_NOTES.md, issue 11).
    """
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    swapped = jnp.concatenate([halves[..., 1:, :], halves[..., :1, :]], -2)  # (x2, x1); jnp.flip ran 4x slower
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]
    cos, sin = cos[:, :, None, None], sin[:, :, None, None]
    return (halves * cos + swapped * (sin * sign)).reshape(x.shape).astype(x.dtype)


def attention_mask(q_pos: jax.Array, kv_pos: jax.Array, window: jax.Array) -> jax.Array:
    """``[B, T, S]``: causal by *position* (so padding anywhere is harmless) within a window."""
    q, kv = q_pos[:, :, None], kv_pos[:, None, :]
    return (kv >= 0) & (kv <= q) & (q - kv < window)


def _attend(q, k, v, mask, c: ModelConfig, dtype):
    """Grouped-query attention: q ``[B, T, H, d]`` over k, v ``[B, S, K, d]`` where ``mask [B, T, S]``.

    Heads-major, as XLA:CPU wants its batched dots: each kv head's G query heads are one ``[G*T, d]``
    block against ``[S, d]`` keys, so the scores come out in the layout the softmax and the value
    product read (the ``[B, T, K, G, d]`` einsums made XLA transpose them around both dots), and
    the softmax divides after the value product (``[G*T, d]`` divisions instead of ``[G*T, S]``).
    About three times faster on CPU (BUILD_NOTES.md, issue 11).
    """
    B, T, H, d = q.shape
    S, K = k.shape[1:3]
    G = H // K
    q = q.reshape(B, T, K, G, d).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, d)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, d]
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * c.scale
    if c.attn_softcap:
        scores = jnp.tanh(scores / c.attn_softcap) * c.attn_softcap
    mask = jnp.broadcast_to(mask[:, None, None], (B, 1, G, T, S)).reshape(B, 1, G * T, S)
    scores = jnp.where(mask, scores, _MASKED)
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("bkqs,bksd->bkqd", weights.astype(dtype), v, preferred_element_type=jnp.float32)
    out = (out / weights.sum(-1, keepdims=True)).astype(dtype)
    return out.reshape(B, K, G, T, d).transpose(0, 3, 1, 2, 4).reshape(B, T, H, d)


def _attend_prefixed(q, k, v, rows: PrefixedRows, window, c: ModelConfig, dtype):
    """`_attend` over `PrefixedRows`' packed sequence (q, k, v ``[1, H + B*T, heads, d]``): the
    prefix attends to itself, each row to the prefix and to its own slots, never to another row's
    (no score matrix over the whole packed sequence)."""
    (k_pre, k_rows), (v_pre, v_rows) = rows.split(k), rows.split(v)
    pre_pos = jnp.arange(rows.prefix_length, dtype=jnp.int32)[None]  # [1, H]
    keys, values = _behind_prefix(k_pre, k_rows), _behind_prefix(v_pre, v_rows)  # [B, H + T, K, d]
    kv_pos = _behind_prefix(pre_pos, rows.kv_pos)  # [B, H + T]
    q_pre, q_rows = rows.split(q)
    out_pre = _attend(q_pre, k_pre, v_pre, attention_mask(pre_pos, pre_pos, window), c, dtype)
    out_rows = _attend(q_rows, keys, values, attention_mask(rows.positions, kv_pos, window), c, dtype)
    return jnp.concatenate([out_pre, out_rows.reshape(1, -1, *out_rows.shape[2:])], 1)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, self.config, self.dtype = config, config, dtype
        D, H, K, d = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = _param(rngs, (D, H, d), param_dtype)
        self.k_proj = _param(rngs, (D, K, d), param_dtype)
        self.v_proj = _param(rngs, (D, K, d), param_dtype)
        self.o_proj = _param(rngs, (H, d, D), param_dtype)
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, param_dtype))  # noqa: E731
        self.q_bias = zeros(H, d) if c.attn_bias else None
        self.k_bias = zeros(K, d) if c.attn_bias else None
        self.v_bias = zeros(K, d) if c.attn_bias else None
        self.o_bias = zeros(D) if c.attn_out_bias else None
        self.q_norm = Norm(d, c, param_dtype) if c.qk_norm else None
        self.k_norm = Norm(d, c, param_dtype) if c.qk_norm else None

    def __call__(self, x, rope, positions, window, kv_pos, layer_cache, cache_index, out_major=False, rows=None):
        """x [B, T, D] -> ([B, T, D], (k, v) of this layer's cache or None).

        ``rows`` (`PrefixedRows`): x is their packed sequence ``[1, H + B*T, D]``, with no cache; the
        output is ``[1, N, D]`` at the rows' read-out slots if they name any."""
        c = self.config
        q = _linear(x, self.q_proj, self.q_bias, out_major, self.dtype)
        k = _linear(x, self.k_proj, self.k_bias, out_major, self.dtype)
        v = _linear(x, self.v_proj, self.v_bias, out_major, self.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if layer_cache is not None:  # write the new keys/values, then attend over every slot
            k_all, v_all = (
                jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, cache_index, 0, 0))
                for buf, new in zip(layer_cache, (k, v))
            )
            layer_cache = (k_all, v_all)
            k_all, v_all = k_all.astype(self.dtype), v_all.astype(self.dtype)
        else:
            k_all, v_all = k, v
        if rows is not None:
            out = _attend_prefixed(q, k_all, v_all, rows, window, c, self.dtype)
            if rows.read_slot is not None:  # the rest of the layer at the read-out slots alone
                out = out[:, rows.read_slot]
        else:
            out = _attend(q, k_all, v_all, attention_mask(positions, kv_pos, window), c, self.dtype)
        return _linear(out, self.o_proj, self.o_bias, out_major, self.dtype), layer_cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, self.dtype = config, dtype
        self.gate_proj = _param(rngs, (c.d_model, c.d_ff), param_dtype) if c.gated_mlp else None
        self.up_proj = _param(rngs, (c.d_model, c.d_ff), param_dtype)
        self.down_proj = _param(rngs, (c.d_ff, c.d_model), param_dtype)
        bias = lambda n: nnx.Param(jnp.zeros((n,), param_dtype)) if c.mlp_bias else None  # noqa: E731
        self.gate_bias = bias(c.d_ff) if c.gated_mlp else None
        self.up_bias, self.down_bias = bias(c.d_ff), bias(c.d_model)
        self.activation = c.activation

    def __call__(self, x, out_major=False):  # [B, T, D]
        act = _ACTIVATIONS[self.activation]
        h = _linear(x, self.up_proj, self.up_bias, out_major, self.dtype)  # [B, T, F]
        if self.gate_proj is not None:  # GLU: act(gate) * up
            h = act(_linear(x, self.gate_proj, self.gate_bias, out_major, self.dtype)) * h
        else:  # GPT-2: act(up)
            h = act(h)
        return _linear(h, self.down_proj, self.down_bias, out_major, self.dtype)


class Block(nnx.Module):
    """One pre-norm decoder layer (with Gemma 2/3's extra post-norms when configured)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, D = config, config.d_model
        self.attn_norm = Norm(D, c, param_dtype)
        self.attn = Attention(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_post_norm = Norm(D, c, param_dtype) if c.sandwich_norm else None
        self.mlp_norm = Norm(D, c, param_dtype)
        self.mlp = MLP(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_post_norm = Norm(D, c, param_dtype) if c.sandwich_norm else None

    def __call__(self, x, rope, positions, window, kv_pos, layer_cache, cache_index, out_major=False, rows=None):
        h, layer_cache = self.attn(
            self.attn_norm(x), rope, positions, window, kv_pos, layer_cache, cache_index, out_major, rows
        )
        if rows is not None and rows.read_slot is not None:  # from here on, only the read-out slots
            x = x[:, rows.read_slot]
        x = x + (self.attn_post_norm(h) if self.attn_post_norm is not None else h)
        h = self.mlp(self.mlp_norm(x), out_major)
        return x + (self.mlp_post_norm(h) if self.mlp_post_norm is not None else h), layer_cache


class DecoderLM(nnx.Module):
    """A frozen decoder-only LM: `embed` tokens, run `__call__` on embeddings, then `logits`."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        c = self.config = config
        self.dtype = dtype
        param_dtype = param_dtype or dtype
        self.embed_tokens = _param(rngs, (c.vocab_size, c.d_model), param_dtype)
        self.pos_embed = (
            _param(rngs, (c.max_position_embeddings, c.d_model), param_dtype)
            if c.position == "learned"
            else None
        )

        @nnx.split_rngs(splits=c.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.final_norm = Norm(c.d_model, c, param_dtype)
        self.lm_head = None if c.tie_embeddings else _param(rngs, (c.d_model, c.vocab_size), param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids ``[...]`` -> input embeddings ``[..., D]`` (Gemma's sqrt(D) scale included)."""
        table = self.embed_tokens[...]
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        if self.config.embed_scale != 1.0:
            x = x * jnp.asarray(self.config.embed_scale, table.dtype).astype(self.dtype)
        return x

    def __call__(
        self,
        embeds: jax.Array,  # [B, T, D]
        positions: jax.Array,  # [B, T] int
        valid: jax.Array,  # [B, T] bool, False on padding
        cache: KVCache | None = None,
        *,
        remat: str = "none",
        layer_weights: tuple[nnx.State, ...] | None = None,
        out_major: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states ``[B, T, D]`` and the cache with these T tokens appended.

        ``layer_weights`` (`unstack_layers` of this model's params, e.g. for a decode step): run the
        layers one by one on those buffers instead of scanning the stacked weights; the cache, if
        any, must then be `KVCache.per_layer`. Same numbers, L compiled layers instead of one.
        ``out_major``: those buffers came from ``unstack_layers(..., out_major=True)``.
        """
        if out_major and layer_weights is None:
            raise ValueError("out_major needs layer_weights from unstack_layers(..., out_major=True)")
        positions = positions.astype(jnp.int32)
        new_pos = jnp.where(valid, positions, -1)
        if cache is not None:
            if (layer_weights is not None) != isinstance(cache.k, tuple):
                raise ValueError("layer_weights need a per-layer cache (KVCache.per_layer), the scan a stacked one")
            kv_pos = jax.lax.dynamic_update_slice(cache.pos, new_pos, (0, cache.index))
            layer_caches, cache_index = (cache.k, cache.v), cache.index
        else:
            kv_pos, layer_caches, cache_index = new_pos, None, None
        x, new_caches = self._layers(embeds, positions, kv_pos, layer_caches, cache_index, remat=remat,
                                     layer_weights=layer_weights, out_major=out_major)
        if cache is not None:
            cache = KVCache(
                k=new_caches[0], v=new_caches[1], pos=kv_pos, index=cache.index + embeds.shape[1]
            )
        return x, cache

    def prefixed_rows(self, prefix: jax.Array, embeds: jax.Array, valid: jax.Array, *, remat: str = "none",
                      at: tuple[jax.Array, jax.Array] | None = None, pack: bool = True) -> jax.Array:
        """Final-normed hidden states ``[B, H + T, D]`` of B rows that all begin with the same H slots.

        ``prefix [H, D]`` (BOS and a soft prompt) sits at positions ``0..H-1``; each row's slots
        ``embeds [B, T, D]`` follow, counting only ``valid [B, T]`` ones, so left padding is harmless.
        The same numbers as ``self`` on the rows ``[prefix | embeds]``, but the prefix runs once:
        its slots and the rows' are packed into one sequence of ``H + B*T`` (`PrefixedRows`), so
        each projection and MLP is one GEMM over them and attention shows each row the prefix's
        keys and its own. A tuning batch with a 10-vector prompt after BOS thus runs 11 + B*T slots
        instead of B*(11 + T).

        ``at = (row [N], slot [N])``: only the hidden states at those slots of the rows
        ``[prefix | embeds]``, ``[N, D]`` (the tuning loss reads N target slots); the last layer
        then runs its attention as every layer does and its output projection and MLP there alone.

        ``pack=False`` runs each row whole instead, the prefix in every row: where a mesh's data axis
        splits the rows, each device then keeps its own rows, where the packed sequence would be
        resharded into rows around every layer's attention (collectives for every layer).
        """
        Hp, (B, T) = prefix.shape[0], valid.shape
        if Hp == 0 or not pack:  # each row whole
            rows = _behind_prefix(prefix[None].astype(embeds.dtype), embeds)
            valid = _behind_prefix(jnp.ones((1, Hp), bool), valid)
            hidden, _ = self(rows, positions_from_mask(valid), valid, remat=remat)
            return hidden if at is None else hidden[at]
        positions = positions_from_mask(valid, Hp)
        rows = PrefixedRows(positions=positions, kv_pos=jnp.where(valid, positions, -1), prefix_length=Hp)
        if at is not None:
            row, slot = at
            rows = rows.replace(read_slot=jnp.where(slot < Hp, slot, slot + row * T))
        packed = jnp.concatenate([prefix.astype(embeds.dtype), embeds.reshape(B * T, -1)])[None]
        x, _ = self._layers(packed, rows.flat_positions(), None, None, None, remat=remat, rows=rows)
        if at is not None:
            return x[0]
        prefix_hidden, row_hidden = rows.split(x)
        return _behind_prefix(prefix_hidden, row_hidden)

    def _layers(self, embeds, positions, kv_pos, layer_caches, cache_index, *, remat, layer_weights=None,
                out_major=False, rows=None):
        """The decoder layers and the final norm over ``embeds [B, T, D]`` -> (hidden, new layer caches)."""
        c = self.config
        x = embeds.astype(self.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)

        global_rope = local_rope = None
        if c.position == "rope":
            global_rope = rope_tables(c.rope, c.head_dim, positions)
            local_rope = rope_tables(c.rope_local, c.head_dim, positions) if c.rope_local else global_rope
        is_local = np.array([k == "sliding" for k in c.kinds])
        windows = np.where(is_local, c.sliding_window or _NO_WINDOW, _NO_WINDOW).astype(np.int32)

        graphdef, layer_states = nnx.split(self.layers)

        # With read-out slots, every layer but the last runs on all of them (`PrefixedRows.read_slot`).
        reading = rows is not None and rows.read_slot is not None
        all_rows = rows.replace(read_slot=None) if reading else rows

        def layer(x, state, window, rope, layer_cache, rows=all_rows):
            block = nnx.merge(graphdef, state)
            return block(x, rope, positions, window, kv_pos, layer_cache, cache_index, out_major, rows)

        # Remat wraps the whole per-layer function, the rope selection included, so under "dots" and
        # "full" the backward pass recomputes the selected tables instead of keeping L copies of them.
        rematted = lambda f: jax.checkpoint(f, prevent_cse=False, policy=REMAT_POLICIES[remat])  # noqa: E731
        if layer_weights is None:  # one compiled layer, scanned over the stacked weights
            of_layer = lambda i: jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False),  # noqa: E731
                                              layer_states)
            scanned_layers = c.n_layers - reading

            @rematted
            def scanned(x, xs):
                i, window, local, layer_cache = xs
                rope = None if global_rope is None else jax.tree.map(
                    lambda g, l: jnp.where(local, l, g), global_rope, local_rope)  # fmt: skip
                return layer(x, of_layer(i), window, rope, layer_cache)

            xs = (jnp.arange(scanned_layers), jnp.asarray(windows[:scanned_layers]),
                  jnp.asarray(is_local[:scanned_layers]), layer_caches)
            x, new_caches = jax.lax.scan(scanned, x, xs)
            if reading:  # the last layer: output projection and MLP at the read-out slots only
                last = c.n_layers - 1
                rope = local_rope if is_local[last] else global_rope
                x, _ = rematted(layer)(x, of_layer(last), jnp.int32(windows[last]), rope, None, rows)
        else:  # layer by layer on separate buffers: nothing is copied out of a stack
            if len(layer_weights) != c.n_layers:
                raise ValueError(f"layer_weights holds {len(layer_weights)} layers, the model {c.n_layers}")
            layer = rematted(layer)
            outs = []
            for i, state in enumerate(layer_weights):
                rope = local_rope if is_local[i] else global_rope
                layer_cache = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
                x, layer_cache = layer(x, state, jnp.int32(windows[i]), rope, layer_cache)
                outs.append(layer_cache)
            new_caches = None if layer_caches is None else tuple(map(tuple, zip(*outs)))
        return self.final_norm(x), new_caches

    def logits(self, hidden: jax.Array, *, out_major: bool = False) -> jax.Array:
        """Hidden states ``[..., D]`` -> float32 logits ``[..., V]`` (final soft-cap included).

        ``out_major`` (a decode step's few rows): a tied head as ``embed_tokens @ hidden^T``, the
        table being output-major already (`_out_major_matmul`)."""
        if self.lm_head is not None:
            out = jnp.einsum("...D,DV->...V", hidden, self.lm_head[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        elif out_major:
            out = _out_major_matmul(hidden, self.embed_tokens[...].astype(self.dtype), n_in=1,
                                    preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("...D,VD->...V", hidden, self.embed_tokens[...].astype(self.dtype),
                             preferred_element_type=jnp.float32)
        if self.config.final_softcap:
            out = jnp.tanh(out / self.config.final_softcap) * self.config.final_softcap
        return out


def positions_from_mask(valid: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Positions ``[B, T]`` that count only valid tokens, so left padding starts text at ``offset``."""
    valid = valid.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0) + offset
