"""`tune()`: the soft-prompt tuning run, with checkpoints, evaluation hooks and resumption.

Every host runs this same loop (multi-controller JAX): each builds the same global batch from the
seeded data order and hands its own rows to `jax.make_array_from_process_local_data`; Orbax writes
checkpoints once. Only the prompt and optimizer state change; ``lm.params`` is read, never written.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spt_jax.errors import ConfigError, SptError
from spt_jax.tune.checkpoint import TuneCheckpoints
from spt_jax.tune.config import RESUMABLE_CHANGES, TuneConfig
from spt_jax.tune.data import DataOrder, ExampleEncoder, Layout, as_pairs, collate
from spt_jax.tune.mesh import (
    DATA,
    MODEL,
    check_batch_divides,
    default_mesh,
    global_batch,
    place_params,
    replicated,
)
from spt_jax.tune.prompt import init_prompt, model_metadata, save_prompt
from spt_jax.tune.step import make_train_step


class NonFiniteLossError(SptError, FloatingPointError):
    """The loss or gradient stopped being finite; the run stopped at ``step``.

    ``last_good_prompt`` is the prompt before that step; ``history`` the records up to it; the
    checkpoint directory (if any) still holds the last good checkpoint.
    """

    def __init__(self, message: str, *, step: int, last_good_prompt, history: list[dict]):
        super().__init__(message)
        self.step, self.last_good_prompt, self.history = step, last_good_prompt, history


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """A tuned prompt ``[P, D]`` float32, per-step history, the config and run metadata."""

    prompt: jax.Array
    history: list[dict]
    config: TuneConfig
    metadata: dict

    def save(self, path):
        """Write the prompt file (with metadata and config) via `save_prompt`."""
        return save_prompt(path, self.prompt, {**self.metadata, "config": self.config.to_dict()})


def _host_copy(prompt) -> jax.Array:
    """A plain single-device copy (never a donated buffer) for callers and results."""
    return jnp.asarray(np.asarray(prompt, np.float32))


def tune(
    lm,
    examples: Sequence,
    config: TuneConfig = TuneConfig(),
    *,
    mesh: Mesh | None = None,
    checkpoint_dir=None,
    on_eval: Callable[[int, jax.Array], dict] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune a soft prompt on ``examples`` ((input, target) pairs or objects with .input/.target).

    Args:
      lm: a frozen `spt_jax.models.LM` (load it with ``shardings=`` for a multi-device mesh).
      config: the run's `TuneConfig`.
      mesh: a ``(data, model)`` mesh from `make_mesh`; default: all devices, data axis first.
      checkpoint_dir: save here every ``config.checkpoint_every`` steps and resume from the newest.
      on_eval: ``on_eval(step, prompt) -> dict`` at step 0, every ``config.eval_every`` steps and
        at the end; its dict is merged into that step's history record.
      progress: show a progress bar (on the first host).
    Raises:
      NonFiniteLossError: a step's loss or gradient was not finite.
    """
    if not isinstance(config, TuneConfig):
        raise ConfigError(f"config must be a spt_jax.tune.TuneConfig, got {type(config).__name__}")
    pairs = as_pairs(examples)
    mesh = mesh if mesh is not None else default_mesh(config.batch_size)
    check_batch_divides(config.batch_size, mesh)
    layout = Layout.for_model(lm, config)
    encoder = ExampleEncoder(lm.tokenizer, pairs, layout)
    params = place_params(lm.params, mesh)
    train_step = make_train_step(lm, config, mesh)
    compiles_at_start = train_step.compilations
    repl = replicated(mesh)
    model_meta = model_metadata(lm)

    prompt = jax.device_put(np.asarray(init_prompt(lm, config), np.float32), repl)
    opt_state = jax.jit(train_step.init, out_shardings=repl)(prompt)
    run = _Run(prompt, opt_state, DataOrder(len(pairs), config.seed))
    checkpoints = TuneCheckpoints(checkpoint_dir, config.keep_checkpoints) if checkpoint_dir else None
    run_start = time.perf_counter()
    try:
        if checkpoints is not None:
            _resume(run, checkpoints, config, model_meta, len(pairs), repl)
        if run.step == 0 and on_eval is not None:
            run.history.append({"step": 0, **_evaluate(on_eval, 0, run.prompt)})

        with _progress_bar(config.steps, run.step, progress) as bar:
            while run.step < config.steps:
                step = run.step + 1
                host_batch = collate([encoder(i) for i in run.order.take(config.batch_size)], layout)
                record = _train_one_step(run, train_step, params, global_batch(host_batch, mesh), step)
                if not record.pop("finite"):
                    raise _non_finite(run, record, checkpoints)
                if on_eval is not None and _due(step, config.eval_every, config.steps):
                    record.update(_evaluate(on_eval, step, run.prompt))
                run.history.append(record)
                run.step = step
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if checkpoints is not None and _due(step, config.checkpoint_every, config.steps):
                    meta = {"step": step, "data_state": run.order.state(), "config": config.to_dict(),
                            "model": model_meta, "history": run.history}
                    checkpoints.save(step, run.prompt, run.opt_state, meta)
                    run.last_saved = step
    finally:
        if checkpoints is not None:
            checkpoints.close()

    shapes = sorted(run.shapes_used)
    metadata = {
        **model_meta,
        "prompt_length": config.prompt_length,
        "placement": "after_bos" if layout.bos else "start",
        "steps": config.steps,
        "n_examples": len(pairs),
        "compilations": train_step.compilations - compiles_at_start,
        "length_buckets_used": sorted({t for t, _ in shapes}),
        "batch_shapes_used": shapes,
        "truncated_inputs": encoder.n_truncated,
        "data_state": run.order.state(),
        "resumed_from_step": run.resumed_from,
        "mesh": {DATA: int(mesh.shape[DATA]), MODEL: int(mesh.shape[MODEL])},
        "process_count": jax.process_count(),
        "train_time_s": time.perf_counter() - run_start,
    }
    return TuneResult(prompt=_host_copy(run.prompt), history=run.history, config=config, metadata=metadata)


@dataclasses.dataclass
class _Run:
    """The mutable state of one run: what a checkpoint restores."""

    prompt: jax.Array
    opt_state: object
    order: DataOrder
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    resumed_from: int | None = None
    last_saved: int | None = None
    shapes_used: set = dataclasses.field(default_factory=set)  # (length bucket, answer width) this call


def _due(step: int, every: int, last: int) -> bool:
    return step == last or bool(every and step % every == 0)


def _train_one_step(run: _Run, train_step, params, batch: dict, step: int) -> dict:
    """One optimizer step (updates ``run``'s prompt and optimizer state) -> its history record."""
    T, A = batch["tokens"].shape[1], batch["target_ids"].shape[1]
    run.shapes_used.add((int(T), int(A)))
    compiles_before = train_step.compilations
    t0 = time.perf_counter()
    run.prompt, run.opt_state, metrics = train_step(run.prompt, run.opt_state, params, batch)
    metrics = jax.device_get(metrics)
    return {
        "step": step,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "n_targets": int(metrics["n_targets"]),
        "seq_len": int(T),
        "answer_width": int(A),
        "epoch": run.order.epoch,
        "step_time_s": time.perf_counter() - t0,
        "compiled": train_step.compilations > compiles_before,
        "finite": bool(metrics["finite"]),
    }


def _non_finite(run: _Run, record: dict, checkpoints) -> NonFiniteLossError:
    where = (
        f"the last good checkpoint is step {run.last_saved} in {checkpoints.directory}"
        if checkpoints is not None and run.last_saved is not None
        else "no checkpoint was written"
    )
    return NonFiniteLossError(
        f"non-finite loss or gradient at step {record['step']} (loss={record['loss']}); tuning "
        f"stopped and {where}. Lower TuneConfig.learning_rate or check the examples.",
        step=record["step"],
        last_good_prompt=_host_copy(run.prompt),  # the step kept the incoming values
        history=run.history,
    )


def _resume(run: _Run, checkpoints: TuneCheckpoints, config: TuneConfig, model_meta: dict,
            n_examples: int, repl) -> None:
    """Load the newest readable checkpoint into ``run`` (nothing when the directory is empty)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
        {"prompt": run.prompt, "opt_state": run.opt_state},
    )
    restored = checkpoints.restore_latest(abstract)
    if restored is None:
        return
    step, state, meta = restored
    _check_resumable(meta, config, model_meta, checkpoints.directory)
    if step > config.steps:
        raise ConfigError(
            f"{checkpoints.directory}: the newest checkpoint is step {step}, past "
            f"TuneConfig.steps={config.steps}; ask for at least {step} steps or use a new checkpoint_dir"
        )
    run.prompt, run.opt_state = state["prompt"], state["opt_state"]
    run.order = DataOrder.from_state(meta["data_state"], n_examples)
    run.history = list(meta["history"])
    run.step = run.resumed_from = run.last_saved = step


def _evaluate(on_eval, step: int, prompt) -> dict:
    out = on_eval(step, _host_copy(prompt))
    if out is None:
        return {}
    if not isinstance(out, dict):
        raise ConfigError(f"on_eval must return a dict (or None), got {type(out).__name__} at step {step}")
    return dict(out)


def _check_resumable(meta: dict, config: TuneConfig, model_meta: dict, directory) -> None:
    saved = TuneConfig.from_dict(meta["config"])
    changed = [f for f in saved.differences(config) if f not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"{directory}: the checkpoint was made with different settings ({', '.join(changed)}); "
            "resume with the same TuneConfig (only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change) or use a new checkpoint_dir"
        )
    if meta["model"] != model_meta:
        raise ConfigError(
            f"{directory}: the checkpoint was made for model {meta['model'].get('model')!r}, "
            f"not {model_meta['model']!r}; use a new checkpoint_dir"
        )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="tuning prompt",
        disable=not enabled or jax.process_index() != 0,
        leave=False,
    )
