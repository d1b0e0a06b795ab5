"""The loaded-model bundle: config, frozen parameters, tokenizer and the model definition."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spt_jax.models.config import ModelConfig
from spt_jax.models.transformer import DecoderLM, positions_from_mask


@dataclasses.dataclass(frozen=True)
class LM:
    """A frozen language model. ``params`` is a pure pytree; ``graphdef`` rebuilds the module.

    Library code calls ``nnx.merge(lm.graphdef, params)`` inside its own jitted functions, so the
    frozen weights enter jit as ordinary (sharded, never differentiated) arguments.
    """

    name: str
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    dtype: jnp.dtype = jnp.float32

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

    def generate_text(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy completion of one prompt; a quick check for notebooks (no cache, no batching)."""
        tokens = list(self.tokenizer(prompt)["input_ids"])
        eos = set(self.config.eos_token_ids) | {self.tokenizer.eos_token_id}
        start = len(tokens)
        for _ in range(max_new_tokens):
            next_id = int(jnp.argmax(self.logits([tokens])[0, -1]))
            if next_id in eos:
                break
            tokens.append(next_id)
        return self.tokenizer.decode(tokens[start:], skip_special_tokens=True)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, mask):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(model.embed(tokens), positions_from_mask(mask), mask)
    return model.logits(hidden)
