"""`tune()`: the soft-prompt tuning run, with checkpoints, periodic evaluation and resumption.

Every host runs this same loop (multi-controller JAX): each builds the same global batch from the
seeded data order and hands its own rows to `jax.make_array_from_process_local_data`; Orbax writes
checkpoints once. Only the prompt and optimizer state change; ``lm.params`` is read, never written.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spt_jax.errors import ConfigError, SptError
from spt_jax.sequence import Layout
from spt_jax.system import check_interrupted
from spt_jax.tune.checkpoint import TuneCheckpoints
from spt_jax.tune.config import RESUMABLE_CHANGES, TuneConfig
from spt_jax.tune.data import DataOrder, ExampleEncoder, as_pairs, tuning_layout
from spt_jax.tune.mesh import (
    DATA,
    MODEL,
    as_mesh,
    check_batch_divides,
    default_mesh,
    global_batch,
    placed_params,
    replicated,
)
from spt_jax.tune.prompt import init_prompt, model_metadata, save_prompt
from spt_jax.tune.step import make_train_step
from spt_jax.tune.stopping import saturation_step


class NonFiniteLossError(SptError, FloatingPointError):
    """The loss or gradient stopped being finite; the run stopped at ``step``.

    ``last_good_prompt`` is the prompt before that step; ``history`` the records up to it; the
    checkpoint directory (if any) still holds the last good checkpoint.
    """

    def __init__(self, message: str, *, step: int, last_good_prompt, history: list[dict]):
        super().__init__(message)
        self.step, self.last_good_prompt, self.history = step, last_good_prompt, history


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a `PromptEvaluator` measured on the prompt after ``step`` optimizer steps."""

    step: int
    metrics: Mapping[str, float]  # named by the evaluator; the loop never reads them

    def to_dict(self) -> dict:
        return {"step": self.step, "metrics": dict(self.metrics)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Evaluation:
        return cls(step=int(data["step"]), metrics=dict(data["metrics"]))


class PromptEvaluator(Protocol):
    """Measures a prompt during tuning: called with the step and a host copy of the prompt ``[P, D]``.

    Called at step 0, every ``TuneConfig.eval_every`` steps and at the last step; returns named real
    numbers (str keys), which `tune` records as an `Evaluation` without reading them.
    """

    def __call__(self, step: int, prompt: jax.Array) -> Mapping[str, float]: ...


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """A tuned prompt ``[P, D]`` float32, per-step history, the config, run metadata and evaluations.

    ``history`` has one record per optimizer step; ``evaluations`` what the evaluator measured, in
    step order (those of an interrupted run included, when it was resumed from a checkpoint).
    """

    prompt: jax.Array
    history: list[dict]
    config: TuneConfig
    metadata: dict
    evaluations: tuple[Evaluation, ...] = ()

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
    evaluator: PromptEvaluator | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune a soft prompt on ``examples`` ((input, target) pairs or objects with .input/.target).

    Args:
      lm: a frozen `spt_jax.models.LM` (load it with ``shardings=`` for a multi-device mesh).
      config: the run's `TuneConfig`.
      mesh: a `jax.sharding.Mesh` with ``data`` and ``model`` axes (`make_mesh`, or ``jax.make_mesh``
        with explicit or auto axes); default: all devices, data axis first. Weights not yet on it are
        placed by the family's rules (`placed_params`).
      checkpoint_dir: save here every ``config.checkpoint_every`` steps and resume from the newest.
      evaluator: a `PromptEvaluator`, called at step 0, every ``config.eval_every`` steps and at
        the end; what it returns lands in ``TuneResult.evaluations``, never in the history.
      progress: show a progress bar (on the first host).
    Raises:
      NonFiniteLossError: a step's loss or gradient was not finite.
    """
    if not isinstance(config, TuneConfig):
        raise ConfigError(f"config must be a spt_jax.tune.TuneConfig, got {type(config).__name__}")
    pairs = as_pairs(examples)
    mesh = as_mesh(mesh) if mesh is not None else default_mesh(config.batch_size)
    check_batch_divides(config.batch_size, mesh)
    layout = tuning_layout(lm, config)
    encoder = ExampleEncoder(lm.tokenizer, pairs, layout)
    params = placed_params(lm, mesh)
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
        if config.length_buckets is None:  # exact lengths for this run's own batches
            encoder.fit_buckets_to(run.order, config.steps - run.step, config.batch_size)
        if run.step == 0 and evaluator is not None:
            run.evaluations.append(_evaluate(evaluator, 0, run.prompt))

        run.saturated_at = _saturated(run.evaluations, config)  # a resumed run may have stopped already
        with _progress_bar(config.steps, run.step, progress) as bar:
            while run.step < config.steps and run.saturated_at is None:
                check_interrupted()  # a Ctrl-C some callback swallowed still stops here
                step = run.step + 1
                host_batch = encoder.batch(run.order.take(config.batch_size))
                record = _train_one_step(run, train_step, params, global_batch(host_batch, mesh), step)
                if not record.pop("finite"):
                    raise _non_finite(run, record, checkpoints)
                if evaluator is not None and _due(step, config.eval_every, config.steps):
                    run.evaluations.append(_evaluate(evaluator, step, run.prompt))
                    run.saturated_at = _saturated(run.evaluations, config)
                run.history.append(record)
                run.step = step
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                stopping = run.saturated_at is not None
                if checkpoints is not None and (stopping or _due(step, config.checkpoint_every, config.steps)):
                    # copies: Orbax writes the JSON in the background, while the next steps append
                    meta = {"step": step, "data_state": run.order.state(), "config": config.to_dict(),
                            "model": model_meta, "history": list(run.history),
                            "evaluations": [e.to_dict() for e in run.evaluations]}
                    checkpoints.save(step, run.prompt, run.opt_state, meta)
                    run.last_saved = step
                if stopping:
                    break
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
        "saturated_at_step": run.saturated_at,
        "stopped_at_step": run.step,
        "mesh": {DATA: int(mesh.shape[DATA]), MODEL: int(mesh.shape[MODEL])},
        "process_count": jax.process_count(),
        "train_time_s": time.perf_counter() - run_start,
    }
    return TuneResult(prompt=_host_copy(run.prompt), history=run.history, config=config, metadata=metadata,
                      evaluations=tuple(run.evaluations))


@dataclasses.dataclass
class _Run:
    """The mutable state of one run: what a checkpoint restores."""

    prompt: jax.Array
    opt_state: object
    order: DataOrder
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    evaluations: list = dataclasses.field(default_factory=list)  # of Evaluation
    resumed_from: int | None = None
    last_saved: int | None = None
    saturated_at: int | None = None  # the step the stopping rule's metric saturated at
    shapes_used: set = dataclasses.field(default_factory=set)  # (length bucket, head rows) this call


def _saturated(evaluations, config: TuneConfig) -> int | None:
    """The step at which ``config.stop_metric`` saturated (None: not yet, or no stopping rule)."""
    if config.stop_metric is None:
        return None
    points = []
    for e in evaluations:
        if config.stop_metric not in e.metrics:
            raise ConfigError(f"TuneConfig.stop_metric={config.stop_metric!r} is not among the evaluator's "
                              f"metrics ({', '.join(sorted(e.metrics))}) at step {e.step}")
        points.append((e.step, float(e.metrics[config.stop_metric])))
    return saturation_step(points, config.stop_threshold, config.stop_patience)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or bool(every and step % every == 0)


def _train_one_step(run: _Run, train_step, params, batch: dict, step: int) -> dict:
    """One optimizer step (updates ``run``'s prompt and optimizer state) -> its history record."""
    T, N = Layout.row_length_of(batch), batch["target_ids"].shape[0]
    run.shapes_used.add((int(T), int(N)))
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
        "head_rows": int(N),
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
    restored = checkpoints.restore_latest(abstract, check=_resume_check(config, model_meta, checkpoints.directory))
    if restored is None:
        return
    step, state, meta = restored
    if step > config.steps:
        raise ConfigError(
            f"{checkpoints.directory}: the newest checkpoint is step {step}, past "
            f"TuneConfig.steps={config.steps}; ask for at least {step} steps or use a new checkpoint_dir"
        )
    run.prompt, run.opt_state = state["prompt"], state["opt_state"]
    run.order = DataOrder.from_state(meta["data_state"], n_examples)
    run.history = list(meta["history"])
    run.evaluations = [Evaluation.from_dict(e) for e in meta.get("evaluations", [])]
    run.step = run.resumed_from = run.last_saved = step


def _resume_check(config: TuneConfig, model_meta: dict, directory):
    """The check a checkpoint's JSON passes before its arrays are read (`restore_latest`): one made for
    another model or other settings is refused as exactly that, and nothing is deleted."""

    def check(meta) -> None:
        needed = {"config", "model", "data_state", "history"}
        if not isinstance(meta, Mapping) or not needed <= set(meta):
            raise ConfigError(f"{directory}: its checkpoints were not written by spt_jax.tune (their metadata "
                              f"lacks {', '.join(sorted(needed - set(meta or ())))}); use a new checkpoint_dir")
        _check_resumable(meta, config, model_meta, directory)

    return check


def _evaluate(evaluator: PromptEvaluator, step: int, prompt) -> Evaluation:
    """Call the evaluator on a host copy of the prompt and check what it returned."""
    metrics = evaluator(step, _host_copy(prompt))
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"the evaluator must return a mapping of metric names to numbers, got "
                          f"{type(metrics).__name__} at step {step}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ConfigError(f"the evaluator returned a metric named {name!r} at step {step}; "
                              "metric names must be strings")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"the evaluator returned {name}={value!r} at step {step}; "
                              "metric values must be real numbers")
    return Evaluation(step=step, metrics={name: float(value) for name, value in metrics.items()})


def _check_resumable(meta: dict, config: TuneConfig, model_meta: dict, directory) -> None:
    saved = TuneConfig.from_dict(meta["config"])
    changed = [f for f in saved.differences(config) if f not in RESUMABLE_CHANGES]
    if saved.schedule != "constant" and saved.steps != config.steps:
        # the schedule's horizon is `steps`: resuming 3 steps of a cosine run as 6 would restart it
        raise ConfigError(
            f"{directory}: the checkpoint's {saved.schedule} learning-rate schedule spans "
            f"steps={saved.steps}; resume with steps={saved.steps} (a longer run needs a new "
            "checkpoint_dir, or schedule='constant')"
        )
    if changed:
        raise ConfigError(
            f"{directory}: the checkpoint was made with different settings ({', '.join(changed)}); "
            "resume with the same TuneConfig (only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change) or use a new checkpoint_dir"
        )
    if meta["model"] != model_meta:
        saved_model = meta["model"] if isinstance(meta["model"], Mapping) else {}
        differ = ", ".join(f"{k} {saved_model.get(k)!r} there, {v!r} here" for k, v in model_meta.items()
                           if saved_model.get(k) != v)
        raise ConfigError(
            f"{directory}: the checkpoint was made for another model ({differ}); it is kept as it is: "
            "resume with that model, or use a new checkpoint_dir (--checkpoint-dir)"
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
