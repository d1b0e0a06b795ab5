"""Pre-training from scratch and full supervised fine-tuning, with optax, on the library's decoder.

Every parameter of `spt_jax.models.DecoderLM` trains here (unlike soft-prompt tuning, where the
model is frozen). One pure, jitted step per run: ``(params, opt_state, batch) -> (params, opt_state,
loss)`` with the graph definition static and params/optimizer state donated. The trained model is
handed to the library as a plain `spt_jax.models.LM` (config, graphdef, params, tokenizer), which is
all `spt_jax.evaluate.evaluate` needs. Checkpoints are safetensors files keyed by parameter path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spt_jax.models import LM, DecoderLM, ModelConfig, positions_from_mask

from .recipes import ModelShape


def model_config(shape: ModelShape, tokenizer, max_positions: int = 256) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=len(tokenizer), d_model=shape.d_model,
                       n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_heads,
                       head_dim=shape.d_model // shape.n_heads, d_ff=shape.d_ff,
                       max_position_embeddings=max_positions, norm_eps=1e-5, tie_embeddings=True,
                       eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)


def init_params(config: ModelConfig, seed: int):
    """(graphdef, params) of a freshly initialised decoder (normal(0, 0.02) weights, unit norms)."""
    return nnx.split(DecoderLM(config, dtype=jnp.float32, rngs=nnx.Rngs(seed)))


def as_lm(name: str, config: ModelConfig, graphdef, params, tokenizer) -> LM:
    """The trained weights as the library's frozen model: nothing more than the `LM` fields."""
    return LM(name=name, config=config, graphdef=graphdef, params=params, tokenizer=tokenizer, dtype=jnp.float32)


def lm_loss(params, graphdef, tokens, valid, loss_mask):
    """Mean next-token cross-entropy where ``loss_mask`` marks the predicted token; tokens ``[B, T]``."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model(model.embed(tokens), positions_from_mask(valid), valid)  # [B, T, D]
    logits = model.logits(hidden[:, :-1])  # [B, T-1, V]: slot t predicts token t+1
    mask = loss_mask[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_optimizer(learning_rate: float, steps: int, warmup: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, max(steps - 1, 1)),
                                                  max(steps, 2), end_value=learning_rate * 0.1)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731  no decay on norms
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=0.01, mask=decay_mask))


def make_step(graphdef, tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, valid, loss_mask):
        loss, grads = jax.value_and_grad(lm_loss)(params, graphdef, tokens, valid, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@dataclasses.dataclass(frozen=True)
class TrainLog:
    steps: int
    first_loss: float
    final_loss: float  # mean of the last 10 steps
    wall_time_s: float
    examples_seen: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train(graphdef, params, batches, *, steps: int, learning_rate: float, warmup: int,
          log_every: int = 0, log=print) -> tuple[object, TrainLog]:
    """``steps`` optimizer steps over ``batches`` (an iterator of (tokens, valid, loss_mask) arrays)."""
    tx = make_optimizer(learning_rate, steps, warmup)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx)
    losses, seen = [], 0
    t0 = time.perf_counter()
    for i in range(steps):
        tokens, valid, loss_mask = next(batches)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.asarray(valid),
                                       jnp.asarray(loss_mask))
        seen += len(tokens)
        if i == 0 or i == steps - 1 or (log_every and (i + 1) % log_every == 0) or i >= steps - 10:
            losses.append((i, float(loss)))
            if not np.isfinite(losses[-1][1]):
                raise FloatingPointError(f"training loss is {losses[-1][1]} at step {i}")
            if log_every and (i + 1) % log_every == 0:
                log(f"    step {i + 1}/{steps}: loss {losses[-1][1]:.3f}")
    jax.block_until_ready(params)
    tail = [l for s, l in losses if s >= steps - 10]
    return params, TrainLog(steps=steps, first_loss=losses[0][1], final_loss=float(np.mean(tail)),
                            wall_time_s=time.perf_counter() - t0, examples_seen=seen)


def epoch_batches(make_rows, batch_size: int, seed: int):
    """Endless batches: ``make_rows(rng)`` gives one epoch's rows (tokens, valid, loss_mask), shuffled
    anew each epoch; the last partial batch of an epoch is dropped."""
    rng = np.random.default_rng(seed)
    while True:
        tokens, valid, loss_mask = make_rows(rng)
        if len(tokens) < batch_size:
            raise ValueError(f"an epoch has {len(tokens)} rows, fewer than the batch size {batch_size}")
        order = rng.permutation(len(tokens))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield tokens[idx], valid[idx], loss_mask[idx]


# --------------------------------------------------------------------------------------------------
# checkpoints


def _flat(params) -> dict[str, object]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def save_params(path: Path, params, config: ModelConfig, info: dict) -> None:
    """Parameters as safetensors (written beside, then renamed: a killed run leaves no half file)."""
    from safetensors.numpy import save_file

    tensors = {key: np.asarray(leaf) for key, leaf in _flat(params).items()}
    meta = {"model_config": json.dumps(dataclasses.asdict(config), default=str), "info": json.dumps(info)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_params(path: Path, config: ModelConfig):
    """(graphdef, params) for ``config`` with the tensors of ``path``; ValueError on any mismatch."""
    from safetensors.numpy import load_file

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DecoderLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    tensors = load_file(str(path))
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing, unexpected = sorted(set(keys) - set(tensors)), sorted(set(tensors) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    values = []
    for key, (_, leaf) in zip(keys, leaves):
        if tensors[key].shape != tuple(leaf.shape):
            raise ValueError(f"{path}: {key} has shape {tensors[key].shape}, the model wants {tuple(leaf.shape)}")
        values.append(jnp.asarray(tensors[key], leaf.dtype))
    return graphdef, jax.tree_util.tree_unflatten(treedef, values)
