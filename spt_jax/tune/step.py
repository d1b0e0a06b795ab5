"""The loss and the jitted train step: gradients for the prompt alone.

``prompt_loss(prompt, params, batch)`` is differentiated with respect to its first argument only;
the frozen weights enter as an ordinary, never-differentiated argument, so JAX computes no weight
gradients (the backward pass runs to the inputs only), and they are never copied or donated. The
vocabulary projection runs only at the slots that predict target tokens, packed into ``N`` rows
(`spt_jax.sequence.Layout.training_batch`): ``[N, D] -> [N, V]`` instead of ``[B, T, V]`` (which
matters at Gemma 3's V = 262144).
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

from spt_jax.models.compiled import CompileCache
from spt_jax.sequence import Layout, place_prompt
from spt_jax.tune.config import TuneConfig
from spt_jax.tune.mesh import DATA, as_mesh, batch_sharding, mesh_context, param_shardings, replicated


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


def prefix_embeddings(model, prompt: jax.Array, batch: dict) -> jax.Array:
    """The rows' shared prefix, BOS and the prompt's vectors in its slots: ``[H, D]`` (from row 0;
    every row holds the same)."""
    ids, prompt_index = batch["prefix_tokens"][:1], batch["prefix_prompt_index"][:1]
    return place_prompt(model.embed(ids), prompt, prompt_index)[0]


# Activations a step may keep for the backward pass before "auto" recomputes more of them.
REMAT_BUDGET_BYTES = 3 * 2**29  # 1.5 GiB


def activation_bytes(config, batch: int, length: int, remat: str = "none", itemsize: int = 4) -> int:
    """What one step stores for its backward pass: ``B * T * (L - 1)`` token-layers times what a layer
    keeps per token under ``remat`` ("none": residual and norm inputs, q/k/v before and after rotary
    embedding, attention scores and probabilities, the MLP's hidden activations; "dots": the
    weight projections' outputs; "full": the layer input), plus the attention working set of the
    one layer whose backward runs. The last layer is left out: with the prefix packed it runs at
    the target slots alone (`DecoderLM.prefixed_rows`' ``at``); with whole rows (a data-split mesh)
    it is one layer of L.

    Checked against XLA's memory analysis of the compiled step (tests/test_tune.py). At 8 x 83 slots
    it is 1.36x / 1.02x XLA's temp bytes for "none" / "dots" on SmolLM2-135M, 0.94x / 0.71x on
    Gemma-3-270M (whose vocabulary head adds ~150 MiB that does not grow with the length); it
    counts every row's prefix slots, which the step runs once.
    """
    c = config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    if remat == "full":
        per_token = c.d_model
    elif remat == "dots":
        per_token = qkv + 2 * c.d_model + (2 if c.gated_mlp else 1) * c.d_ff
    else:
        per_token = (
            (6 + 2 * c.sandwich_norm) * c.d_model
            + 3 * qkv + c.n_heads * c.head_dim
            + (c.n_heads + c.n_kv_heads) * c.head_dim * c.qk_norm
            + 2 * c.n_heads * length
            + 4 * c.d_ff
        )
    working = 2 * batch * c.n_heads * length * length  # one layer's scores and probabilities in the backward
    return (batch * length * (c.n_layers - 1) * per_token + working) * itemsize


def resolve_remat(remat: str, config, batch: int, length: int, itemsize: int = 4) -> str:
    """``remat`` for one batch shape: "auto" is "dots" within `REMAT_BUDGET_BYTES`, else "full".

    Measured on SmolLM2-135M (8 x 83 slots, AMD EPYC, one process, interleaved): "dots" 2.51 s a
    step, storing everything ("none") 2.93 s, "full" 3.26 s. Storing everything is slower as well
    as larger: XLA:CPU maps its temp buffer afresh on every call, and its first-touch page faults
    (235k a step for 918 MiB) cost more than recomputing the elementwise work.
    """
    if remat != "auto":
        return remat
    fits = activation_bytes(config, batch, length, "dots", itemsize) <= REMAT_BUDGET_BYTES
    return "dots" if fits else "full"


def prompt_loss(prompt, params, batch, *, graphdef, remat: str = "none", pack: bool = True):
    """Mean cross-entropy over target tokens (EOS included) and the target-token count.

    The mean is over every target token in the batch, as Hugging Face's causal-LM loss (and so
    PEFT's) computes it. ``remat="auto"`` is decided here, at trace time, from the batch's shape.
    ``pack``: the rows' shared prefix runs once (`DecoderLM.prefixed_rows`); False where a mesh's
    data axis splits the rows (`packs_prefix`).
    """
    model = nnx.merge(graphdef, params)
    valid = batch["valid"]
    B = valid.shape[0]
    remat = resolve_remat(remat, model.config, B, Layout.row_length_of(batch), jnp.dtype(model.dtype).itemsize)
    prefix = prefix_embeddings(model, prompt, batch)  # [H, D]
    at = (batch["target_row"], batch["target_index"])  # the slots that predict the targets
    picked = model.prefixed_rows(prefix, model.embed(batch["tokens"]), valid, remat=remat, at=at, pack=pack)  # [N, D]
    logits = model.logits(picked)  # [N, V] float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])  # [N]
    mask = batch["target_mask"].astype(jnp.float32)
    count = mask.sum()
    return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), count


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """``step(prompt, opt_state, params, batch) -> (prompt, opt_state, metrics)``, jitted once per shape.

    ``prompt`` and ``opt_state`` are donated (their buffers are reused for the outputs). A step whose
    loss or gradient is not finite returns the *incoming* prompt and optimizer state unchanged, with
    ``metrics["finite"]`` False, so the caller still holds the last good values. ``compilations``
    counts this step's traces in its model's `CompileCache` (under ``name``), i.e. its XLA
    compilations: one per new batch shape.
    """

    jitted: Callable
    optimizer: optax.GradientTransformation
    name: str
    cache: CompileCache = dataclasses.field(repr=False)
    mesh: Mesh | None = None

    def __call__(self, prompt, opt_state, params, batch):
        with mesh_context(self.mesh):  # our Auto mesh, whatever mesh context the caller is in
            return self.jitted(prompt, opt_state, params, batch)

    @property
    def compilations(self) -> int:
        return self.cache.compilations(self.name)

    def init(self, prompt) -> optax.OptState:
        return self.optimizer.init(prompt)


# Settings the compiled step depends on; a run that differs only elsewhere reuses the compilation.
_STEP_FIELDS = (
    "learning_rate", "optimizer", "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "remat",
)


def make_train_step(lm, config: TuneConfig, mesh: Mesh | None = None) -> TrainStep:
    """The prompt-only train step for ``lm`` under ``config``, with explicit shardings on ``mesh``.

    Without a mesh the step is jitted with the shardings its arguments arrive in. The step lives in
    ``lm.compiled``, keyed by (mesh, step settings), so repeated runs on the model (resumption,
    sweeps over seeds or data) reuse its compilations; ``compilations`` keeps counting across them.
    """
    mesh = as_mesh(mesh) if mesh is not None else None
    settings = _step_settings(config)
    name = _step_name(mesh, settings)
    return lm.compiled.memo(("train_step", mesh, settings), lambda: _build_train_step(lm, config, mesh, name))


def _step_settings(config: TuneConfig) -> tuple[tuple[str, object], ...]:
    """The (field, value) pairs the compiled step depends on: the schedule's length only if it decays."""
    fields = _STEP_FIELDS if config.schedule == "constant" else (*_STEP_FIELDS, "steps")
    return tuple((f, getattr(config, f)) for f in fields)


def _step_name(mesh: Mesh | None, settings) -> str:
    """A name for the step's trace counter, distinct for each distinct (mesh, settings) key."""
    where = "no mesh" if mesh is None else f"{mesh!r} on devices {mesh.device_ids.ravel().tolist()}"
    return f"train_step[{where}; {', '.join(f'{k}={v!r}' for k, v in settings)}]"


def packs_prefix(mesh: Mesh | None) -> bool:
    """Whether a step on ``mesh`` runs the rows' shared prefix once, packed in front of their text:
    on one device, or a mesh whose data axis is 1. Where the data axis splits the rows, each device
    runs its rows whole: the packed sequence would be split along its slots and resharded into rows
    around every layer's attention (a 4-layer model's step on data=8: 166 collectives, 6 otherwise)."""
    return mesh is None or mesh.shape[DATA] == 1


def _build_train_step(lm, config: TuneConfig, mesh: Mesh | None, name: str) -> TrainStep:
    optimizer = make_optimizer(config)
    loss_fn = functools.partial(prompt_loss, graphdef=lm.graphdef, remat=config.remat, pack=packs_prefix(mesh))

    def step(prompt, opt_state, params, batch):
        (loss, count), grad = jax.value_and_grad(loss_fn, has_aux=True)(prompt, params, batch)
        updates, new_opt_state = optimizer.update(grad, opt_state, prompt)
        new_prompt = optax.apply_updates(prompt, updates)
        finite = jnp.isfinite(loss) & _all_finite(grad)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_prompt = keep(new_prompt, prompt)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grad), "n_targets": count, "finite": finite}
        return new_prompt, new_opt_state, metrics

    counted = lm.compiled.counted(name, step)  # counts once per trace = per compilation
    if mesh is None:
        jitted = jax.jit(counted, donate_argnums=(0, 1))
    else:
        repl = replicated(mesh)
        jitted = jax.jit(
            counted,
            donate_argnums=(0, 1),
            in_shardings=(repl, repl, param_shardings(lm.params, mesh, lm.config), batch_sharding(mesh)),
            out_shardings=(repl, repl, repl),
        )
    return TrainStep(jitted=jitted, optimizer=optimizer, name=name, cache=lm.compiled, mesh=mesh)
