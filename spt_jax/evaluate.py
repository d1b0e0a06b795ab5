"""The evaluation protocol: one model x one task in zero-shot, k-shot and soft-prompt modes.

Every mode generates greedily on the same test items and scores the outputs with the task's parser,
so the three rows of the result differ only in what precedes the question:

* ``zero_shot``   -- ``task.zero_shot_prompt(record)`` (the instruction describes the format in words);
* ``few_shot``    -- ``task.fewshot_prefix(k, seed)`` (shared and KV-cached once) + ``task.render_input``;
* ``soft_prompt`` -- a prompt tuned on ``task.examples("train")`` + ``task.render_input`` (the tuned prompt
  replaces the instruction). While tuning, a fixed validation subset is evaluated every
  ``eval_every`` steps, which gives the format-validity-vs-step curve.

Multiple-choice tasks can add a log-likelihood choice accuracy (``loglik``): a knowledge reference that
needs no output format at all. ``evaluate`` writes results.json (schema: docs/results_schema.md),
predictions.jsonl, results.md, PNG plots and the tuned prompt into ``out_dir``; ``compare`` runs it over
models x tasks from a config file and correlates the modes' rankings of the models.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spt_jax import metrics
from spt_jax.errors import ConfigError, DataError, close_names
from spt_jax.tasks.files import read_mapping_file
from spt_jax.tune.config import TuneConfig

MODES = ("zero_shot", "few_shot", "soft_prompt")
LOGLIK_MODE = "loglik"  # reference row for multiple-choice tasks; not a generation mode
SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "results.md"
PROMPT_FILE = "soft_prompt.safetensors"
TUNING_FILE = "tuning.json"
COMPARE_FILE = "compare.json"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What one evaluation runs. Defaults follow the method: k=5, 80 tuning steps at batch 8.

    ``n_test=None`` evaluates the whole test split; an integer takes a seeded sample of that many
    items (the same items for every mode, so paired comparisons hold). ``eval_every`` tuning steps
    between evaluations of ``n_curve`` fixed validation items (0 disables the curve). ``prompt_file``
    evaluates a saved soft prompt instead of tuning one. ``dtype`` is used by the callers that load
    the model (CLI, ``compare``). ``seed`` picks the test sample, the demonstrations and the curve
    items; the prompt's initialization and data order follow ``tune.seed``.
    """

    modes: tuple[str, ...] = MODES
    k: int = 5
    seed: int = 0
    n_test: int | None = None
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    eval_every: int = 20
    n_curve: int = 64
    batch_size: int = 16
    dtype: str = "float32"
    loglik: bool = True
    max_new_tokens: int | None = None  # None: the task's own budget
    confidence: float = 0.95
    prompt_file: str | None = None

    def __post_init__(self):
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes:
            raise ConfigError(f"modes must name at least one of {', '.join(MODES)}")
        for mode in modes:
            if mode not in MODES:
                raise ConfigError(f"unknown mode {mode!r}{close_names(str(mode), MODES)}; "
                                  f"modes are {', '.join(MODES)}")
        if len(set(modes)) != len(modes):
            raise ConfigError(f"modes {modes!r} name a mode twice")
        object.__setattr__(self, "modes", modes)
        _check_int("k", self.k, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if self.n_test is not None:
            _check_int("n_test", self.n_test, minimum=1)
        _check_int("eval_every", self.eval_every, minimum=0)
        _check_int("n_curve", self.n_curve, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        if self.max_new_tokens is not None:
            _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not (isinstance(self.confidence, float) and 0.0 < self.confidence < 1.0):
            raise ConfigError(f"confidence must be a float strictly between 0 and 1, got {self.confidence!r}")

    def replace(self, **changes) -> EvalConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tune"}
        out["modes"] = list(self.modes)
        out["tune"] = _jsonable(self.tune)
        return out


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# output directories


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False, marker: str = RESULTS_FILE) -> Path:
    """The results directory, created; refuses one that already holds results (``marker``) unless
    ``overwrite``, so a finished run is never replaced by accident."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if (out / marker).exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds results ({marker}); choose another directory or "
                              "pass overwrite=True (--overwrite) to replace them")
        for name in _OUTPUT_FILES:  # only our own files, so no stale plot or prompt survives
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


_OUTPUT_FILES = (RESULTS_FILE, PREDICTIONS_FILE, REPORT_FILE, PROMPT_FILE, TUNING_FILE, COMPARE_FILE,
                 "compare.md", "metrics_by_mode.png", "tuning_curve.png")


def timestamped_dir(parent: str | os.PathLike, label: str) -> Path:
    """A fresh ``parent/YYYYmmdd-HHMMSS_label`` directory (suffixed -2, -3... if that exists)."""
    parent = Path(parent).expanduser()
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"output path {parent} exists and is not a directory")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-") or "run"
    for n in itertools.count(1):
        candidate = parent / (f"{stamp}_{safe}" if n == 1 else f"{stamp}_{safe}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# small helpers


def versions() -> dict:
    """Versions that decide whether two results files are comparable."""
    import spt_jax

    out = {"spt_jax": spt_jax.__version__, "python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "transformers", "tokenizers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    try:
        import jax

        out["backend"] = jax.default_backend()
        out["devices"] = len(jax.devices())
    except Exception:  # a broken backend must not lose the results
        out["backend"] = None
    return out


def _jsonable(value):
    """Dataclasses, numpy scalars/arrays, tuples and paths as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("jax"):
        array = np.asarray(value)
        return array.tolist() if array.size <= 64 else f"<array {array.shape} {array.dtype}>"
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _json_default(value):
    return _jsonable(value)


def write_json(path: Path, data) -> None:
    """JSON with NaN written as null, so every reader (not only Python's) can load it."""
    text = json.dumps(_nan_to_none(_jsonable(data)), indent=2, allow_nan=False, default=_json_default)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _nan_to_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def model_info(lm) -> dict:
    config = lm.config
    return {
        "name": str(lm.name),
        "model_type": config.model_type,
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "vocab_size": config.vocab_size,
        "n_params": int(lm.n_params),
        "dtype": np.dtype(lm.dtype).name,
    }


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


def _generation_config(task, config: EvalConfig):
    from spt_jax.generate import GenerationConfig

    return GenerationConfig(
        max_new_tokens=config.max_new_tokens or task.max_new_tokens,
        stop_sequences=tuple(task.stop_sequences),
        batch_size=config.batch_size,
    )


def score_outputs(task, records: Sequence[Mapping], outputs: Sequence[str]) -> list[dict]:
    """Per item: parsed answer, gold, valid, correct (the task's parser and judge, nothing else)."""
    rows = []
    for record, output in zip(records, outputs, strict=True):
        parsed, correct = task.score(output, record)
        rows.append({"parsed": parsed.answer, "gold": task.gold(record), "valid": bool(parsed.valid),
                     "correct": bool(correct and parsed.valid)})
    return rows


def _summary(rows: Sequence[Mapping], confidence: float, seed: int) -> dict:
    valid = np.array([r["valid"] for r in rows], bool)
    correct = np.array([r["correct"] for r in rows], bool)
    return metrics.summarize(valid, correct, confidence=confidence, seed=seed)


# --------------------------------------------------------------------------------------------------
# the modes


@dataclasses.dataclass
class _ModeRun:
    inputs: list[str]
    outputs: list[str]
    prefix_text: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    wall_time_s: float = 0.0


def _run_generation(lm, task, inputs, config, *, soft_prompt=None, prefix_text="", progress=False):
    from spt_jax.generate import generate

    return generate(lm, inputs, soft_prompt=soft_prompt, prefix_text=prefix_text,
                    config=_generation_config(task, config), progress=progress)


def tune_soft_prompt(lm, task, config: EvalConfig, *, out_dir: Path | None = None, progress: bool = True,
                     checkpoint_dir=None, mesh=None):
    """Tune a soft prompt on the task's train split, tracking format validity on a validation subset.

    Returns ``(TuneResult, curve)`` where ``curve`` is a list of ``{"step", "format_validity",
    "accuracy", "n"}`` dicts, one per evaluation (step 0, every ``eval_every`` steps, the end).
    """
    from spt_jax.tune import tune

    examples = task.examples("train")
    on_eval = None
    tune_config = config.tune
    curve_split = None
    if config.eval_every > 0:
        curve_split, curve_items = curve_records(task, config.n_curve, config.seed)
        curve_inputs = [task.render_input(r) for r in curve_items]

        def on_eval(step, prompt):
            outputs = _run_generation(lm, task, curve_inputs, config, soft_prompt=prompt)
            rows = score_outputs(task, curve_items, outputs)
            return {"format_validity": float(np.mean([r["valid"] for r in rows])),
                    "accuracy": float(np.mean([r["correct"] for r in rows])), "eval_n": len(rows)}

        tune_config = dataclasses.replace(tune_config, eval_every=config.eval_every)
    result = tune(lm, examples, tune_config, mesh=mesh, checkpoint_dir=checkpoint_dir, on_eval=on_eval,
                  progress=progress)
    # From the history (not a local list) so a run resumed from a checkpoint keeps its early points.
    curve = [{"step": int(h["step"]), "split": curve_split, "n": int(h["eval_n"]),
              "format_validity": float(h["format_validity"]), "accuracy": float(h["accuracy"])}
             for h in (result.history or []) if isinstance(h, Mapping) and "eval_n" in h]
    return result, curve


def tune_outputs(lm, task, config: EvalConfig, out_dir, *, overwrite: bool = False, checkpoint_dir=None,
                 mesh=None, progress: bool = True) -> dict:
    """Tune only (``spt-jax tune``): write the prompt file, tuning.json and the validity-curve plot."""
    from spt_jax import report
    from spt_jax.tune import save_prompt

    out = check_out_dir(out_dir, overwrite, marker=TUNING_FILE)
    check_inputs(task, config.replace(modes=("soft_prompt",), prompt_file=None, loglik=False))
    t0 = time.perf_counter()
    result, curve = tune_soft_prompt(lm, task, config, progress=progress, checkpoint_dir=checkpoint_dir,
                                     mesh=mesh)
    history = [_jsonable(h) for h in (result.history or [])]
    steps = _steps_done(result, config)
    save_prompt(out / PROMPT_FILE, result.prompt, _prompt_metadata(lm, task, config, steps))
    summary = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_info(lm),
        "task": {"name": task.name, "description": task.description},
        "seed": config.seed,
        "config": config.to_dict(),
        "versions": versions(),
        "steps": steps,
        "curve": curve,
        "history": history,
        "final_loss": _last(history, "loss"),
        "tune_time_s": time.perf_counter() - t0,
        "files": {"prompt": PROMPT_FILE, "tuning": TUNING_FILE},
    }
    if curve:
        title = f"{lm.name} on {task.name}: soft-prompt tuning"
        summary["files"]["curve_plot"] = report.plot_tuning_curve(curve, out / report.CURVE_PLOT, title,
                                                                  history).name
    write_json(out / TUNING_FILE, summary)
    return summary


def _prompt_metadata(lm, task, config: EvalConfig, steps: int) -> dict:
    """What the prompt file records: the model identity `load_prompt` checks, plus how it was made."""
    import spt_jax
    from spt_jax.tune.prompt import model_metadata

    return {**model_metadata(lm), "task": task.name, "steps": int(steps), "seed": int(config.seed),
            "spt_jax": spt_jax.__version__}


def _loglik_reference(lm, task, items, config: EvalConfig, progress: bool) -> _ModeRun:
    """Choice accuracy by log-likelihood of each choice's target after the zero-shot prompt."""
    from spt_jax.scoring import choice_predictions

    contexts, continuations, golds = [], [], []
    for _, record in items:
        targets, gold_index = task.choice_continuations(record)
        contexts.append(task.zero_shot_prompt(record))
        continuations.append(targets)
        golds.append(gold_index)
    chosen = choice_predictions(lm, list(zip(contexts, continuations)), batch_size=config.batch_size,
                                progress=progress)
    chosen = [int(c) for c in np.asarray(chosen).reshape(-1)]
    outputs = [continuations[i][c] for i, c in enumerate(chosen)]
    return _ModeRun(inputs=contexts, outputs=outputs, extra={"chosen": chosen, "gold_index": golds})


# --------------------------------------------------------------------------------------------------
# the protocol


def check_inputs(task, config: EvalConfig) -> None:
    """Raise the DataError/ConfigError that ``evaluate`` would hit on this task's data, cheaply.

    Loads (and checks) every split the configured modes read: test; train for k-shot demos and for
    tuning; the curve's validation items. An empty split, k larger than the train split, a template
    placeholder with no data or a gold answer of the wrong type all surface here.
    """
    select_test(task, config.n_test, config.seed)
    if "few_shot" in config.modes:
        task.fewshot_prefix(config.k, config.seed)
    if "soft_prompt" in config.modes and config.prompt_file is None:
        task.examples("train")
        if config.eval_every > 0:
            curve_records(task, config.n_curve, config.seed)
    if config.loglik and task.is_multiple_choice:
        for record in task.records("test")[:1]:
            task.choice_continuations(record)


def evaluate(
    lm,
    task,
    config: EvalConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run the configured modes of ``task`` on ``lm`` and write the results into ``out_dir``.

    Returns the results dict (the content of results.json, see docs/results_schema.md). ``out_dir`` is
    refused when it already holds results unless ``overwrite``; ``None`` writes nothing. Bad input
    (an empty split, k larger than the train split, a missing field) raises before any model work.
    """
    from spt_jax.tasks import get_task

    config = config or EvalConfig()
    task = get_task(task)
    log = log or (lambda message: None)
    out = check_out_dir(out_dir, overwrite) if out_dir is not None else None
    started = time.perf_counter()

    check_inputs(task, config)  # bad data fails here, before minutes of model work
    items = select_test(task, config.n_test, config.seed)
    fewshot_prefix = task.fewshot_prefix(config.k, config.seed) if "few_shot" in config.modes else ""
    loglik = bool(config.loglik and task.is_multiple_choice)
    saved_prompt = None
    if "soft_prompt" in config.modes and config.prompt_file is not None:
        from spt_jax.tune import load_prompt

        saved_prompt, _ = load_prompt(config.prompt_file, lm)  # a prompt for another model fails now

    records = [record for _, record in items]
    runs: dict[str, _ModeRun] = {}
    tuning: dict | None = None
    soft_prompt = None
    for mode in config.modes:
        if mode == "soft_prompt" and saved_prompt is None:
            log(f"{mode}: tuning {config.tune.steps} steps at batch {config.tune.batch_size} on "
                f"{len(task.records('train'))} train examples, then {len(items)} test items")
        else:
            log(f"{mode}: {len(items)} test items")
        t0 = time.perf_counter()
        if mode == "zero_shot":
            inputs = [task.zero_shot_prompt(r) for r in records]
            outputs = _run_generation(lm, task, inputs, config, progress=progress)
            runs[mode] = _ModeRun(inputs, outputs)
        elif mode == "few_shot":
            inputs = [task.render_input(r) for r in records]
            outputs = _run_generation(lm, task, inputs, config, prefix_text=fewshot_prefix,
                                      progress=progress)
            runs[mode] = _ModeRun(inputs, outputs, prefix_text=fewshot_prefix, extra={"k": config.k})
        else:
            soft_prompt, tuning = _soft_prompt_for(lm, task, config, saved_prompt, progress)
            t_eval = time.perf_counter()
            inputs = [task.render_input(r) for r in records]
            outputs = _run_generation(lm, task, inputs, config, soft_prompt=soft_prompt,
                                      progress=progress)
            tuning["eval_time_s"] = time.perf_counter() - t_eval
            runs[mode] = _ModeRun(inputs, outputs, extra={"tuning_steps": tuning["steps"]})
        runs[mode].wall_time_s = time.perf_counter() - t0
    if loglik:
        log(f"{LOGLIK_MODE}: choice log-likelihoods for {len(items)} test items")
        t0 = time.perf_counter()
        runs[LOGLIK_MODE] = _loglik_reference(lm, task, items, config, progress)
        runs[LOGLIK_MODE].wall_time_s = time.perf_counter() - t0

    predictions = _predictions(task, items, runs)
    results = _results(lm, task, config, items, runs, predictions, tuning, time.perf_counter() - started)
    if out is not None:
        write_outputs(out, results, predictions, soft_prompt=soft_prompt, lm=lm, task=task, config=config)
    return results


def _soft_prompt_for(lm, task, config: EvalConfig, saved_prompt, progress: bool):
    """The soft prompt to evaluate (the saved one, or tuned now) and what to record about its tuning."""
    if saved_prompt is not None:
        return saved_prompt, {"source": str(config.prompt_file), "steps": None, "curve": [], "history": [],
                              "tune_time_s": 0.0}
    t0 = time.perf_counter()
    result, curve = tune_soft_prompt(lm, task, config, progress=progress)
    tune_time = time.perf_counter() - t0
    history = [_jsonable(h) for h in (result.history or [])]
    steps = _steps_done(result, config)
    return result.prompt, {
        "source": "tuned",
        "steps": steps,
        "tune_config": _jsonable(result.config),
        "metadata": _jsonable(getattr(result, "metadata", {}) or {}),
        "curve": curve,
        "history": history,
        "final_loss": _last(history, "loss"),
        "tune_time_s": tune_time,
    }


def _steps_done(result, config: EvalConfig) -> int:
    steps = [h.get("step") for h in (result.history or []) if isinstance(h, Mapping) and "step" in h]
    steps = [int(s) for s in steps if isinstance(s, (int, np.integer))]
    if steps:
        return max(steps)
    return int(getattr(result.config, "steps", getattr(config.tune, "steps", 0)))


def _last(history: Sequence[Mapping], key: str):
    for entry in reversed(history):
        if isinstance(entry, Mapping) and isinstance(entry.get(key), (int, float)):
            return float(entry[key])
    return None


def _predictions(task, items, runs: Mapping[str, _ModeRun]) -> list[dict]:
    rows = []
    for mode, run in runs.items():
        scored = score_outputs(task, [r for _, r in items], run.outputs)
        if mode == LOGLIK_MODE:
            # The chosen continuation is the model's answer; it is valid by construction.
            for row, chosen, gold_index in zip(scored, run.extra["chosen"], run.extra["gold_index"]):
                row["valid"] = True
                row["correct"] = chosen == gold_index
        for (index, record), text, output, row in zip(items, run.inputs, run.outputs, scored):
            rows.append({"mode": mode, "index": index, "id": record.get("id"), "input": text, "output": output,
                         **row})
    return rows


def _results(lm, task, config: EvalConfig, items, runs, predictions, tuning, wall_time: float) -> dict:
    model = model_info(lm)
    by_mode: dict[str, list[dict]] = {}
    for row in predictions:
        by_mode.setdefault(row["mode"], []).append(row)
    rows = []
    for mode, run in runs.items():
        summary = _summary(by_mode[mode], config.confidence, config.seed)
        row = {"model": model["name"], "task": task.name, "mode": mode, **summary,
               "wall_time_s": run.wall_time_s, "seed": config.seed,
               "k": config.k if mode == "few_shot" else None,
               "tuning_steps": run.extra.get("tuning_steps") if mode == "soft_prompt" else None,
               "reference": mode == LOGLIK_MODE}
        if run.prefix_text:
            row["prefix_text"] = run.prefix_text
        rows.append(row)
    comparisons = []
    generation_modes = [m for m in runs if m != LOGLIK_MODE]
    for a, b in itertools.combinations(generation_modes, 2):
        hits_a = [r["correct"] and r["valid"] for r in by_mode[a]]
        hits_b = [r["correct"] and r["valid"] for r in by_mode[b]]
        valid_a = [r["valid"] for r in by_mode[a]]
        valid_b = [r["valid"] for r in by_mode[b]]
        # mcnemar's own "b" and "c" are the discordant counts (a only right, b only right)
        comparisons.append({"mode_a": a, "mode_b": b, "metric": "accuracy", **metrics.mcnemar(hits_a, hits_b)})
        comparisons.append({"mode_a": a, "mode_b": b, "metric": "format_validity",
                            **metrics.mcnemar(valid_a, valid_b)})
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "task": {"name": task.name, "description": task.description, "answer_kind": task.answer.kind,
                 "multiple_choice": task.choices_field is not None, "n_test_split": len(task.records("test")),
                 "max_new_tokens": config.max_new_tokens or task.max_new_tokens},
        "n": len(items),
        "seed": config.seed,
        "config": config.to_dict(),
        "versions": versions(),
        "results": rows,
        "comparisons": comparisons,
        "tuning": tuning,
        "wall_time_s": wall_time,
        "files": {},
    }


def write_outputs(out: Path, results: dict, predictions: Sequence[Mapping], *, soft_prompt=None, lm=None,
                  task=None, config: EvalConfig | None = None) -> None:
    """predictions.jsonl, the prompt file, plots, results.md and (last) results.json into ``out``."""
    from spt_jax import report

    files = results["files"]
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for row in predictions:
            f.write(json.dumps(_nan_to_none(_jsonable(row)), allow_nan=False) + "\n")
    files["predictions"] = PREDICTIONS_FILE
    tuning = results.get("tuning")
    if soft_prompt is not None and tuning is not None and tuning.get("source") == "tuned":
        from spt_jax.tune import save_prompt

        save_prompt(out / PROMPT_FILE, soft_prompt, _prompt_metadata(lm, task, config, tuning["steps"]))
        files["prompt"] = PROMPT_FILE
    files.update(report.write_plots(results, out))
    files["report"] = REPORT_FILE
    (out / REPORT_FILE).write_text(report.results_markdown(results), encoding="utf-8")
    files["results"] = RESULTS_FILE
    write_json(out / RESULTS_FILE, results)  # last: its presence marks a complete directory


def load_results(path: str | os.PathLike) -> dict:
    """A results.json (or the directory holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no results file at {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None


# --------------------------------------------------------------------------------------------------
# models x tasks


_COMPARE_KEYS = {"models", "tasks", "eval", "out", "pairs", "correlate", "metric"}
_MODEL_KEYS = {"name", "path", "role", "base", "dtype"}
_EVAL_KEYS = {f.name for f in dataclasses.fields(EvalConfig)} - {"tune", "prompt_file"} | {
    "steps", "tune_batch_size", "prompt_length", "learning_rate"}
_TUNE_ALIASES = {"steps": "steps", "tune_batch_size": "batch_size", "prompt_length": "prompt_length",
                 "learning_rate": "learning_rate"}
_METRICS = ("accuracy", "format_validity", "knowledge_accuracy")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a comparison: a label, what ``spt_jax.models.load`` takes, and its role."""

    name: str
    path: str
    role: str = "base"  # "base" or "post_trained"
    base: str | None = None  # post-trained models: the name of their base model
    dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    models: tuple[ModelSpec, ...]
    tasks: tuple[str, ...]
    eval: EvalConfig
    out: str | None = None
    metric: str = "accuracy"
    # Each (x, y) says: correlate the models' scores in mode x with their scores in mode y. A mode may
    # be qualified by role, e.g. "base:soft_prompt" vs "post_trained:zero_shot", which pairs every
    # post-trained model with its base (claim d: a tuned base model ranks like its post-trained twin).
    correlate: tuple[tuple[str, str], ...] = ()


def eval_config_from_dict(spec: Mapping | None, origin: str, base: EvalConfig | None = None) -> EvalConfig:
    """EvalConfig fields (plus tune shortcuts: steps, tune_batch_size, prompt_length, learning_rate)."""
    spec = dict(spec or {})
    for key in spec:
        if key not in _EVAL_KEYS:
            raise ConfigError(f"{origin}: unknown field 'eval.{key}'{close_names(str(key), _EVAL_KEYS)}")
    base = base or EvalConfig()
    tune_changes = {_TUNE_ALIASES[k]: spec.pop(k) for k in list(spec) if k in _TUNE_ALIASES}
    if "modes" in spec and isinstance(spec["modes"], list):
        spec["modes"] = tuple(spec["modes"])
    try:
        tune_config = tune_config_with(base.tune, tune_changes, origin)
        return dataclasses.replace(base, tune=tune_config, **spec)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{origin}: bad eval settings ({e})") from None


def tune_config_with(tune_config, changes: Mapping, origin: str = "tuning settings"):
    """``tune_config`` with ``changes``; unknown fields and bad values are ConfigErrors naming ``origin``."""
    if not changes:
        return tune_config
    names = {f.name for f in dataclasses.fields(tune_config)}
    for key in changes:
        if key not in names:
            raise ConfigError(f"{origin}: TuneConfig has no field {key!r}{close_names(key, names)}")
    try:
        return dataclasses.replace(tune_config, **changes)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{origin}: bad tuning settings ({e})") from None


def compare_config_from_dict(spec: Mapping, origin: str = "compare config") -> CompareConfig:
    for key in spec:
        if key not in _COMPARE_KEYS:
            raise ConfigError(f"{origin}: unknown field {key!r}{close_names(str(key), _COMPARE_KEYS)}; "
                              f"fields: {', '.join(sorted(_COMPARE_KEYS))}")
    models_spec = spec.get("models")
    if not isinstance(models_spec, list) or not models_spec:
        raise ConfigError(f"{origin}: field 'models' must be a non-empty list of model names or mappings "
                          "with 'name' (and optional 'path', 'role', 'base')")
    models = []
    for i, entry in enumerate(models_spec):
        where = f"{origin}: models[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ConfigError(f"{where} must be a model name or a mapping with a 'name', got {entry!r}")
        for key in entry:
            if key not in _MODEL_KEYS:
                raise ConfigError(f"{where}: unknown field {key!r}{close_names(str(key), _MODEL_KEYS)}")
        role = entry.get("role", "post_trained" if entry.get("base") else "base")
        if role not in ("base", "post_trained"):
            raise ConfigError(f"{where}: role must be 'base' or 'post_trained', got {role!r}")
        models.append(ModelSpec(name=entry["name"], path=str(entry.get("path", entry["name"])), role=role,
                                base=entry.get("base"), dtype=entry.get("dtype")))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"{origin}: model names must be unique, got {names}")
    for m in models:
        if m.base is not None and m.base not in names:
            raise ConfigError(f"{origin}: model {m.name!r} names base {m.base!r}, which is not among the "
                              f"models{close_names(m.base, names)}")
    tasks = spec.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"{origin}: field 'tasks' must be a non-empty list of task names or task files")
    metric = spec.get("metric", "accuracy")
    if metric not in _METRICS:
        raise ConfigError(f"{origin}: metric must be one of {', '.join(_METRICS)}, got {metric!r}")
    eval_config = eval_config_from_dict(spec.get("eval"), origin)
    correlate = _correlations_spec(spec.get("correlate"), eval_config, models, origin)
    out = spec.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"{origin}: field 'out' must be a directory path, got {out!r}")
    return CompareConfig(models=tuple(models), tasks=tuple(tasks), eval=eval_config, out=out, metric=metric,
                         correlate=correlate)


def _correlations_spec(value, eval_config: EvalConfig, models, origin) -> tuple[tuple[str, str], ...]:
    if value is None:
        pairs = [(a, b) for a, b in itertools.combinations(eval_config.modes, 2)]
        if any(m.role == "post_trained" for m in models) and "soft_prompt" in eval_config.modes:
            pairs.append(("base:soft_prompt", "post_trained:zero_shot" if "zero_shot" in eval_config.modes
                          else "post_trained:soft_prompt"))
        return tuple(pairs)
    if not isinstance(value, list):
        raise ConfigError(f"{origin}: field 'correlate' must be a list of [mode, mode] pairs")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ConfigError(f"{origin}: correlate[{i}] must be a pair like [soft_prompt, zero_shot] or "
                              f"[base:soft_prompt, post_trained:zero_shot], got {pair!r}")
        for side in pair:
            role, _, mode = side.rpartition(":")
            if role not in ("", "base", "post_trained"):
                raise ConfigError(f"{origin}: correlate[{i}]: role {role!r} must be 'base' or 'post_trained'")
            if mode not in eval_config.modes and mode != LOGLIK_MODE:
                raise ConfigError(f"{origin}: correlate[{i}]: mode {mode!r} is not evaluated; modes: "
                                  f"{', '.join(eval_config.modes)}{close_names(mode, eval_config.modes)}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
    return compare_config_from_dict(read_mapping_file(path, "config file"), origin=f"config file {path}")


def _score_of(results: Mapping, mode: str, metric: str) -> float | None:
    for row in results["results"]:
        if row["mode"] == mode:
            value = row[metric]["value"]
            return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return None


def rank_correlations(scores: Mapping[str, Mapping[str, dict]], models: Sequence[ModelSpec],
                      correlate: Sequence[tuple[str, str]], metric: str, seed: int = 0) -> list[dict]:
    """Kendall tau-b and Spearman between two modes' scores over models, per pair in ``correlate``.

    ``scores[model][mode]`` holds ``{metric: value}``. A side "base:soft_prompt" takes base models; a
    side "post_trained:zero_shot" then pairs each post-trained model with its base, so x[i] and y[i]
    belong to one base/post-trained pair.
    """
    by_name = {m.name: m for m in models}
    out = []
    for x_side, y_side in correlate:
        x_role, _, x_mode = x_side.rpartition(":")
        y_role, _, y_mode = y_side.rpartition(":")
        pairs: list[tuple[str, str]] = []
        if x_role and y_role and x_role != y_role:
            for m in models:
                if m.role == "post_trained" and m.base is not None:
                    base, post = by_name[m.base], m
                    pairs.append((base.name, post.name) if x_role == "base" else (post.name, base.name))
        else:
            role = x_role or y_role
            pairs = [(m.name, m.name) for m in models if not role or m.role == role]
        xs, ys, used = [], [], []
        for x_model, y_model in pairs:
            x = scores.get(x_model, {}).get(x_mode, {}).get(metric)
            y = scores.get(y_model, {}).get(y_mode, {}).get(metric)
            if x is None or y is None:
                continue
            xs.append(x)
            ys.append(y)
            used.append([x_model, y_model])
        entry = {"x": x_side, "y": y_side, "metric": metric, "pairs": used, "x_scores": xs, "y_scores": ys}
        if not xs:
            entry.update({"n": 0, "kendall_tau_b": None, "spearman": None,
                          "note": "no model has scores for both sides"})
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", metrics.UndefinedCorrelationWarning)
                entry.update(metrics.rank_correlation(xs, ys, seed=seed))
            notes = [str(w.message) for w in caught if issubclass(w.category, metrics.UndefinedCorrelationWarning)]
            if notes:
                entry["note"] = notes[0]
        out.append(entry)
    return out


def compare(
    config_file: str | os.PathLike | CompareConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    load_model: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate every model on every task (config file: docs/results_schema.md#compare), then tabulate.

    Writes ``out_dir/<model>/<task>/`` per evaluation plus ``compare.json`` and ``compare.md`` (a table
    per task and the rank correlations). Models load one at a time, so memory holds one model.
    """
    from spt_jax import report
    from spt_jax.tasks import get_task

    config = config_file if isinstance(config_file, CompareConfig) else load_compare_config(config_file)
    log = log or (lambda message: None)
    out_dir = out_dir if out_dir is not None else config.out
    if out_dir is None:
        raise ConfigError("compare needs an output directory (the config's 'out' field or --out)")
    out = Path(out_dir).expanduser()
    if (out / COMPARE_FILE).exists() and not overwrite:
        raise ConfigError(f"{out} already holds compare results ({COMPARE_FILE}); choose another directory "
                          "or pass --overwrite")
    tasks = [get_task(name) for name in config.tasks]
    for task in tasks:  # bad data fails now, not after the first model
        check_inputs(task, config.eval)
    if load_model is None:
        from spt_jax.models import load as load_model
    out.mkdir(parents=True, exist_ok=True)

    runs: list[dict] = []
    started = time.perf_counter()
    for spec in config.models:
        log(f"loading {spec.name} ({spec.path})")
        lm = load_model(spec.path, dtype=spec.dtype or config.eval.dtype)
        for task in tasks:
            log(f"evaluating {spec.name} on {task.name}")
            run_dir = out / _safe_name(spec.name) / _safe_name(task.name)
            results = evaluate(lm, task, config.eval, run_dir, overwrite=overwrite, progress=progress, log=log)
            runs.append({"model": spec.name, "role": spec.role, "base": spec.base, "task": task.name,
                         "dir": str(run_dir.relative_to(out)), "results": results["results"]})
        del lm

    per_task = {}
    for task in tasks:
        scores: dict[str, dict[str, dict]] = {}
        for run in runs:
            if run["task"] != task.name:
                continue
            scores[run["model"]] = {row["mode"]: {m: row[m]["value"] for m in _METRICS} for row in run["results"]}
        per_task[task.name] = {
            "scores": scores,
            "rank_correlations": rank_correlations(scores, config.models, config.correlate, config.metric,
                                                   seed=config.eval.seed),
        }
    summary = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metric": config.metric,
        "models": [dataclasses.asdict(m) for m in config.models],
        "tasks": [t.name for t in tasks],
        "config": {"eval": config.eval.to_dict(), "correlate": [list(p) for p in config.correlate]},
        "versions": versions(),
        "runs": runs,
        "per_task": per_task,
        "wall_time_s": time.perf_counter() - started,
    }
    (out / "compare.md").write_text(report.compare_markdown(summary), encoding="utf-8")
    write_json(out / COMPARE_FILE, summary)
    return summary


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name or name) or "model"


__all__ = [
    "EvalConfig",
    "CompareConfig",
    "ModelSpec",
    "MODES",
    "LOGLIK_MODE",
    "check_inputs",
    "check_out_dir",
    "compare",
    "compare_config_from_dict",
    "curve_records",
    "eval_config_from_dict",
    "evaluate",
    "load_compare_config",
    "load_results",
    "rank_correlations",
    "score_outputs",
    "select_test",
    "timestamped_dir",
    "tune_config_with",
    "tune_outputs",
    "tune_soft_prompt",
    "versions",
]
