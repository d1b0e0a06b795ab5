"""The loss and the jitted train step: gradients for the prompt alone.

``prompt_loss(prompt, params, batch)`` is differentiated with respect to its first argument only;
the frozen weights enter as an ordinary, never-differentiated argument, so JAX computes no weight
gradients (the backward pass runs to the inputs only), and they are never copied or donated. The
vocabulary projection runs only at the slots that predict target tokens: ``[B, A, D] -> [B, A, V]``
instead of ``[B, T, V]`` (which matters at Gemma 3's V = 262144).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from spt_jax.models.transformer import positions_from_mask
from spt_jax.tune.config import TuneConfig
from spt_jax.tune.mesh import batch_sharding, param_shardings, replicated


def make_optimizer(config: TuneConfig) -> optax.GradientTransformation:
    """The optax chain named by the config: clip -> optimizer with a warmup + decay schedule."""
    warmup, total = config.warmup_steps, config.steps
    lr = config.learning_rate
    if config.schedule == "constant":
        decay = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    else:
        decay = optax.linear_schedule(lr, 0.0, max(total - warmup, 1))
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])
        if warmup
        else decay
    )
    optimizer = {
        "adamw": lambda: optax.adamw(schedule, weight_decay=config.weight_decay),
        "adam": lambda: optax.adam(schedule),
        "adafactor": lambda: optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None),
        "sgd": lambda: optax.sgd(schedule),
    }[config.optimizer]()
    clip = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
    return optax.chain(*clip, optimizer)


def prompt_embeddings(model, prompt: jax.Array, batch: dict) -> jax.Array:
    """Token embeddings with the prompt's vectors written into its slots: ``[B, T, D]``."""
    embeds = model.embed(batch["tokens"])  # [B, T, D]
    index = batch["prompt_index"]  # [B, T], -1 off the prompt
    from_prompt = jnp.take(prompt.astype(embeds.dtype), jnp.maximum(index, 0), axis=0)  # [B, T, D]
    return jnp.where((index >= 0)[..., None], from_prompt, embeds)


def prompt_loss(prompt, params, batch, *, graphdef, remat: bool = False):
    """Mean cross-entropy over target tokens (EOS included) and the target-token count.

    The mean is over every target token in the batch, as Hugging Face's causal-LM loss (and so
    PEFT's) computes it.
    """
    model = nnx.merge(graphdef, params)
    valid = batch["valid"]
    embeds = prompt_embeddings(model, prompt, batch)
    hidden, _ = model(embeds, positions_from_mask(valid), valid, remat=remat)  # [B, T, D]
    picked = jnp.take_along_axis(hidden, batch["target_index"][..., None], axis=1)  # [B, A, D]
    logits = model.logits(picked)  # [B, A, V] float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])  # [B, A]
    mask = batch["target_mask"].astype(jnp.float32)
    count = mask.sum()
    return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), count


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass
class TrainStep:
    """``step(prompt, opt_state, params, batch) -> (prompt, opt_state, metrics)``, jitted once per shape.

    ``prompt`` and ``opt_state`` are donated (their buffers are reused for the outputs). A step whose
    loss or gradient is not finite returns the *incoming* prompt and optimizer state unchanged, with
    ``metrics["finite"]`` False, so the caller still holds the last good values. ``compilations``
    counts traces, i.e. XLA compilations, one per new batch shape.
    """

    jitted: Callable
    optimizer: optax.GradientTransformation
    traces: list = dataclasses.field(default_factory=list)

    def __call__(self, prompt, opt_state, params, batch):
        return self.jitted(prompt, opt_state, params, batch)

    @property
    def compilations(self) -> int:
        return len(self.traces)

    def init(self, prompt) -> optax.OptState:
        return self.optimizer.init(prompt)


# Settings the compiled step depends on; a run that differs only elsewhere reuses the compilation.
_STEP_FIELDS = (
    "learning_rate", "optimizer", "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "remat",
)
_STEP_CACHE: dict = {}


def make_train_step(lm, config: TuneConfig, mesh: Mesh | None = None) -> TrainStep:
    """The prompt-only train step for ``lm`` under ``config``, with explicit shardings on ``mesh``.

    Without a mesh the step is jitted with the shardings its arguments arrive in. Steps are cached
    per (model definition, mesh, step settings), so repeated runs (resumption, sweeps over seeds or
    data) reuse compilations; ``compilations`` keeps counting across them.
    """
    fields = tuple(getattr(config, f) for f in _STEP_FIELDS)
    if config.schedule != "constant":
        fields += (config.steps,)
    key = (lm.graphdef, mesh, fields)
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 16:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = _build_train_step(lm, config, mesh)
    return _STEP_CACHE[key]


def _build_train_step(lm, config: TuneConfig, mesh: Mesh | None) -> TrainStep:
    optimizer = make_optimizer(config)
    graphdef = lm.graphdef
    loss_fn = functools.partial(prompt_loss, graphdef=graphdef, remat=config.remat)
    traces: list = []

    def step(prompt, opt_state, params, batch):
        traces.append(jax.tree.map(lambda x: x.shape, batch))  # runs once per trace = per compile
        (loss, count), grad = jax.value_and_grad(loss_fn, has_aux=True)(prompt, params, batch)
        updates, new_opt_state = optimizer.update(grad, opt_state, prompt)
        new_prompt = optax.apply_updates(prompt, updates)
        finite = jnp.isfinite(loss) & _all_finite(grad)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_prompt = keep(new_prompt, prompt)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grad), "n_targets": count, "finite": finite}
        return new_prompt, new_opt_state, metrics

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(0, 1))
    else:
        repl = replicated(mesh)
        jitted = jax.jit(
            step,
            donate_argnums=(0, 1),
            in_shardings=(repl, repl, param_shardings(lm.params, mesh), batch_sharding(mesh)),
            out_shardings=(repl, repl, repl),
        )
    return TrainStep(jitted=jitted, optimizer=optimizer, traces=traces)
