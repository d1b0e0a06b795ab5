"""The loaded-model bundle: config, frozen parameters, tokenizer and the model definition."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spt_jax.models.compiled import CompileCache
from spt_jax.models.config import ModelConfig
from spt_jax.models.transformer import DecoderLM, positions_from_mask


@dataclasses.dataclass(frozen=True)
class LM:
    """A frozen language model. ``params`` is a pure pytree; ``graphdef`` rebuilds the module.

    Library code calls ``nnx.merge(lm.graphdef, params)`` inside its own jitted functions, so the
    frozen weights enter jit as ordinary (sharded, never differentiated) arguments. ``compiled``
    holds those functions for this model alone (see `CompileCache`).
    """

    name: str
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    dtype: jnp.dtype = jnp.float32
    load_time_s: float | None = dataclasses.field(default=None, compare=False)  # set by `models.load`
    # Not an init field: `dataclasses.replace(lm, ...)` gives the new model a fresh cache of its own.
    compiled: CompileCache = dataclasses.field(default_factory=CompileCache, init=False, compare=False, repr=False)

    @property
    def model(self) -> DecoderLM:
        return nnx.merge(self.graphdef, self.params)

    @property
    def n_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def logits(self, token_ids, attention_mask=None) -> jax.Array:
        """float32 logits ``[B, T, V]`` for token ids ``[B, T]`` (left or right padded)."""
        tokens = jnp.asarray(np.asarray(token_ids), jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        return _logits(self.graphdef, self.params, tokens, mask)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, mask):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(model.embed(tokens), positions_from_mask(mask), mask)
    return model.logits(hidden)
