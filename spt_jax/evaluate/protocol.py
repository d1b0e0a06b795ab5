"""The protocol: every configured mode on the same test items, then the references, then results.

`evaluate` runs one model x one task. The collaborators that touch the model (generation, choice
scoring, tuning) come in as `Backends`, so tests and other runtimes pass their own instead of
patching modules. Tuning knows nothing about evaluation: the validity-vs-step curve is a
`ValidityCurve` handed to `spt_jax.tune.tune` as its `PromptEvaluator`, and its points come back as
the typed `TuneResult.evaluations`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from spt_jax.evaluate import results as res
from spt_jax.evaluate.config import EvalConfig
from spt_jax.evaluate.folders import Staging, output_folder, writes_results
from spt_jax.evaluate.modes import ModeRun, get_mode, reference_modes, score_outputs
from spt_jax.models.compiled import CompileClock
from spt_jax.tune.stopping import saturation_step


def _default_generate(*args, **kwargs):
    from spt_jax.generate import generate

    return generate(*args, **kwargs)


def _default_score(*args, **kwargs):
    from spt_jax.scoring import choice_loglikelihoods

    return choice_loglikelihoods(*args, **kwargs)


def _default_score_items(*args, **kwargs):
    from spt_jax.scoring import item_choice_loglikelihoods

    return item_choice_loglikelihoods(*args, **kwargs)


def _default_tune(*args, **kwargs):
    from spt_jax.tune import tune

    return tune(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Backends:
    """What the protocol calls to run the model; each has the signature of the library function.

    generate: `spt_jax.generate.generate`; score: `spt_jax.scoring.choice_loglikelihoods`;
    score_items: `spt_jax.scoring.item_choice_loglikelihoods`; tune: `spt_jax.tune.tune`.
    """

    generate: Callable[..., list[str]] = _default_generate
    score: Callable[..., list] = _default_score
    score_items: Callable[..., list] = _default_score_items
    tune: Callable[..., Any] = _default_tune


# --------------------------------------------------------------------------------------------------
# items


def select_test(task, n_test: int | None, seed: int) -> list[tuple[int, dict]]:
    """(index in the test split, record) for the evaluated items: all, or a seeded sample, in order."""
    records = task.records("test")
    if n_test is None or n_test >= len(records):
        return list(enumerate(records))
    picks = np.sort(np.random.default_rng(seed).choice(len(records), size=n_test, replace=False))
    return [(int(i), records[int(i)]) for i in picks]


def curve_records(task, n: int, seed: int) -> tuple[str, list[dict]]:
    """The fixed items of the validity-vs-step curve: the validation split, else a train sample."""
    split = "validation"
    source_split = task.split_names.get("validation")
    if source_split is None or source_split not in tuple(task.source.splits):
        split = "train"
    records = task.records(split)
    if n < len(records):
        picks = np.sort(np.random.default_rng(seed + 1).choice(len(records), size=n, replace=False))
        records = [records[int(i)] for i in picks]
    return split, records


def generation_config(task, config: EvalConfig):
    from spt_jax.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=config.max_new_tokens or task.max_new_tokens,
                            stop_sequences=tuple(task.stop_sequences), batch_size=config.batch_size)


# --------------------------------------------------------------------------------------------------
# the validity curve and tuning


def input_wrapper(lm, config: EvalConfig) -> Callable[[str], str]:
    """How each input reaches the model: as is, or as one user turn of its chat template."""
    if not config.chat_template:
        return lambda text: text
    from spt_jax.sequence import chat_format

    return chat_format(lm).wrap


@dataclasses.dataclass
class ValidityCurve:
    """A `spt_jax.tune.PromptEvaluator`: format validity and accuracy on fixed validation items."""

    lm: Any
    task: Any
    split: str
    records: list
    config: Any  # GenerationConfig
    generate: Callable[..., list[str]]
    wrap: Callable[[str], str] = lambda text: text
    mesh: Any = None  # where generation runs (a jax.sharding.Mesh), None: one device

    @classmethod
    def for_task(cls, lm, task, config: EvalConfig, backends: Backends, mesh=None) -> ValidityCurve:
        split, records = curve_records(task, config.n_curve, config.seed)
        return cls(lm, task, split, records, generation_config(task, config), backends.generate,
                   input_wrapper(lm, config), mesh)

    def __call__(self, step: int, prompt) -> dict[str, float]:
        inputs = [self.wrap(self.task.render_input(r)) for r in self.records]
        rows = score_outputs(self.task, self.records, self.generate(self.lm, inputs, soft_prompt=prompt,
                                                                    config=self.config, mesh=self.mesh))
        return {"format_validity": float(np.mean([r["valid"] for r in rows])),
                "accuracy": float(np.mean([r["correct"] for r in rows])), "n": float(len(rows))}

    def points(self, evaluations) -> list[dict]:
        """The curve as results.json stores it, from `TuneResult.evaluations`."""
        return [{"step": int(e.step), "split": self.split, "n": int(e.metrics["n"]),
                 "format_validity": float(e.metrics["format_validity"]), "accuracy": float(e.metrics["accuracy"])}
                for e in evaluations]


def tune_soft_prompt(lm, task, config: EvalConfig, *, backends: Backends = Backends(), progress: bool = True,
                     checkpoint_dir=None, mesh=None):
    """Tune a soft prompt on the task's train split, tracking format validity on a validation subset.

    Returns ``(TuneResult, curve)``; ``curve`` has one ``{"step", "split", "n", "format_validity",
    "accuracy"}`` point per evaluation (step 0, every ``eval_every`` steps, the end). Tuning and the
    curve's generation run on ``mesh`` (default: ``config.device_mesh()``).
    """
    mesh = mesh if mesh is not None else config.device_mesh()
    curve = ValidityCurve.for_task(lm, task, config, backends, mesh) if config.eval_every > 0 else None
    tune_config = config.tune.replace(eval_every=config.eval_every) if curve is not None else config.tune
    wrap = input_wrapper(lm, config)
    examples = [(wrap(text), target) for text, target in task.examples("train")]
    result = backends.tune(lm, examples, tune_config, mesh=mesh, checkpoint_dir=checkpoint_dir,
                           evaluator=curve, progress=progress)
    return result, (curve.points(result.evaluations) if curve is not None else [])


def steps_done(result) -> int:
    steps = [int(h["step"]) for h in (result.history or []) if isinstance(h, Mapping) and "step" in h]
    return max(steps) if steps else int(result.config.steps)


def last_loss(history: Sequence[Mapping]):
    for entry in reversed(history):
        if isinstance(entry, Mapping) and isinstance(entry.get("loss"), (int, float)):
            return float(entry["loss"])
    return None


def tuning_record(result, curve: list[dict], tune_time: float) -> dict:
    """What results.json's ``tuning`` (and tuning.json) say about a tuning run."""
    history = res.jsonable(result.history or [])
    config = result.config  # every run reports where validity saturated, stopped there or not
    saturated = saturation_step([(p["step"], p["format_validity"]) for p in curve], config.stop_threshold,
                                config.stop_patience)
    return {"source": "tuned", "steps": steps_done(result), "saturated_at_step": saturated,
            "tune_config": res.jsonable(result.config),
            "metadata": res.jsonable(result.metadata or {}), "curve": curve, "history": history,
            "final_loss": last_loss(history), "tune_time_s": tune_time}


# --------------------------------------------------------------------------------------------------
# one evaluation


@dataclasses.dataclass
class EvalContext:
    """What a mode sees: the model, the task, the settings, the items and the backends."""

    lm: Any
    task: Any
    config: EvalConfig
    items: list[tuple[int, dict]]
    backends: Backends = Backends()
    progress: bool = False
    saved_prompt: Any = None
    shared: dict = dataclasses.field(default_factory=dict)  # work several modes of this run reuse
    seed_offset: int = 0  # which of config.seeds prompts the soft-prompt mode is tuning (set by replace)
    mesh: Any = None  # the jax.sharding.Mesh generation, scoring and tuning run on (None: one device)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per evaluation (e.g. the cloze scores both CF rows read)."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    @property
    def records(self) -> list[dict]:
        return [record for _, record in self.items]

    @property
    def chat(self):
        """The model's `ChatFormat` when ``config.chat_template``, else None."""
        if not self.config.chat_template:
            return None
        from spt_jax.sequence import chat_format

        return self.memo("chat_format", lambda: chat_format(self.lm))

    def wrap(self, text: str) -> str:
        return text if self.chat is None else self.chat.wrap(text)

    def lm_eval_demos(self, purpose: str):
        """``record -> k demonstration records`` drawn as lm-eval draws them (one sampler per purpose,
        called once per item in item order, so each mode's draws equal lm-eval's)."""
        from spt_jax.tasks.lm_eval_forms import FewShotSampler

        form = self.task.lm_eval

        def build():
            split = form.fewshot_split
            same = self.task.split_names.get(split) == self.task.split_names.get("test")
            return FewShotSampler(self.task.records(split), form, same_split_as_test=same)

        sampler = self.memo(f"lm_eval_sampler:{purpose}", build)
        return lambda record: sampler(record, self.config.k)

    @property
    def generation_config(self):
        return generation_config(self.task, self.config)

    def curve_records(self):
        return curve_records(self.task, self.config.n_curve, self.config.seed)

    def tune_prompt(self):
        """Tune a prompt now, with ``tune.seed + seed_offset``: ``(prompt, tuning record)``."""
        t0 = time.perf_counter()
        seed = self.config.tune.seed + self.seed_offset
        config = self.config.replace(tune=self.config.tune.replace(seed=seed))
        result, curve = tune_soft_prompt(self.lm, self.task, config, backends=self.backends,
                                         progress=self.progress, mesh=self.mesh)
        return result.prompt, {**tuning_record(result, curve, time.perf_counter() - t0), "tune_seed": seed}


def modes_to_run(task, config: EvalConfig) -> list:
    """The configured generation modes in order, then every reference scorer that applies."""
    return [get_mode(m) for m in config.modes] + [m for m in reference_modes() if m.applies(task, config)]


def check_inputs(task, config: EvalConfig) -> None:
    """Raise the DataError/ConfigError that ``evaluate`` would hit on this task's data, cheaply.

    Loads (and checks) every split the configured modes read: test; train for k-shot demos and for
    tuning; the curve's validation items. An empty split, k larger than the train split, a template
    placeholder with no data or a gold answer of the wrong type all surface here.
    """
    ctx = EvalContext(lm=None, task=task, config=config, items=select_test(task, config.n_test, config.seed))
    for mode in modes_to_run(task, config):
        mode.check(ctx)


def evaluate(
    lm,
    task,
    config: EvalConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    backends: Backends = Backends(),
) -> dict:
    """Run the configured modes of ``task`` on ``lm`` and write the results into ``out_dir``.

    Returns the results dict (the content of results.json, see docs/results_schema.md). ``out_dir`` (a
    path, or an open `Staging` from `output_folder`) is refused when it already holds spt_jax outputs
    unless ``overwrite``, and appears only when the run is complete; ``None`` writes nothing. Bad input
    (an empty split, k larger than the train split, a missing field) raises before any model work.

    Generation, scoring and tuning run on ``config.device_mesh()``. On several JAX processes
    (multi-host) every process calls this with the same arguments and gets the same results; only
    process 0 writes ``out_dir`` (`writes_results`).
    """
    from spt_jax.tasks import get_task

    config = config or EvalConfig()
    task = get_task(task)
    log = log or (lambda message: None)
    if not writes_results():
        out_dir = None  # process 0 writes this run's folder
    if out_dir is not None and not isinstance(out_dir, Staging):  # staged: the folder appears only when complete
        with output_folder(out_dir, overwrite) as staging:
            return evaluate(lm, task, config, staging, progress=progress, log=log, backends=backends)
    out = out_dir.path if out_dir is not None else None
    started = time.perf_counter()

    check_inputs(task, config)  # bad data fails here, before minutes of model work
    mesh = config.device_mesh()  # a mesh that does not fit the batch sizes fails here too
    saved_prompt = None
    if "soft_prompt" in config.modes and config.prompt_file is not None:
        from spt_jax.tune import load_prompt

        saved_prompt, _ = load_prompt(config.prompt_file, lm)  # a prompt for another model fails now
    ctx = EvalContext(lm=lm, task=task, config=config, items=select_test(task, config.n_test, config.seed),
                      backends=backends, progress=progress, saved_prompt=saved_prompt, mesh=mesh)

    runs: dict[str, ModeRun] = {}
    for mode in modes_to_run(task, config):
        log(mode.announce(ctx))
        t0 = time.perf_counter()
        with CompileClock() as compiling:
            runs[mode.name] = mode.run(ctx)
        runs[mode.name].wall_time_s = time.perf_counter() - t0
        runs[mode.name].compile_time_s = compiling.seconds

    results = res.assemble(lm, task, config, ctx.items, runs, time.perf_counter() - started)
    if out is not None:
        res.write_outputs(out, results, res.predictions(ctx.items, runs), lm=lm, task=task, runs=runs)
    return results


def tune_outputs(lm, task, config: EvalConfig, out_dir, *, overwrite: bool = False, checkpoint_dir=None,
                 mesh=None, progress: bool = True, backends: Backends = Backends()) -> dict:
    """Tune only (``spt-jax tune``): write the prompt file, tuning.json and the validity-curve plot.

    ``out_dir`` None (and every process but the first on several JAX processes) writes nothing and
    only returns the summary."""
    from spt_jax import report
    from spt_jax.tune import save_prompt

    if not writes_results():
        out_dir = None  # process 0 writes this run's folder
    if out_dir is not None and not isinstance(out_dir, Staging):  # staged: the folder appears only when complete
        with output_folder(out_dir, overwrite) as staging:
            return tune_outputs(lm, task, config, staging, checkpoint_dir=checkpoint_dir, mesh=mesh,
                                progress=progress, backends=backends)
    out = out_dir.path if out_dir is not None else None
    check_inputs(task, config.replace(modes=("soft_prompt",), prompt_file=None, loglik=False))
    t0 = time.perf_counter()
    result, curve = tune_soft_prompt(lm, task, config, backends=backends, progress=progress,
                                     checkpoint_dir=checkpoint_dir, mesh=mesh)
    record = tuning_record(result, curve, time.perf_counter() - t0)
    summary = {
        "schema_version": res.SCHEMA_VERSION,
        "created": res.now_utc(),
        "model": res.model_info(lm),
        "task": {"name": task.name, "description": task.description},
        "seed": config.seed,
        "config": config.to_dict(),
        "versions": res.versions(),
        "steps": record["steps"],
        "curve": curve,
        "history": record["history"],
        "final_loss": record["final_loss"],
        "tune_time_s": record["tune_time_s"],
        "files": {"prompt": res.PROMPT_FILE, "tuning": res.TUNING_FILE},
    }
    if out is None:
        return summary
    save_prompt(out / res.PROMPT_FILE, result.prompt, res.prompt_metadata(lm, task, config.seed, record["steps"]))
    if curve:
        title = f"{lm.name} on {task.name}: soft-prompt tuning"
        summary["files"]["curve_plot"] = report.plot_tuning_curve(curve, out / report.CURVE_PLOT, title,
                                                                  record["history"]).name
    res.write_json(out / res.TUNING_FILE, summary)
    return summary
