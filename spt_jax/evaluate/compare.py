"""Models x tasks: the compare config, the runs, and rank correlations between modes' scores.

Claim (d) lives here: over a set of models, do the scores of one mode rank the models as another
mode's do? A side "base:soft_prompt" against "post_trained:zero_shot" pairs every post-trained model
with its base, so a tuned base model's score is compared with its post-trained twin's. From your own
pre-training code, `mode_scores` reads one evaluation's scores per mode and `mode_correlations`
correlates each mode's scores across checkpoints with any target score.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spt_jax import metrics
from spt_jax.errors import ConfigError, DataError, close_names
from spt_jax.evaluate import results as res
from spt_jax.evaluate.config import EvalConfig, eval_config_from_dict
from spt_jax.evaluate.folders import Staging, output_folder, writes_results
from spt_jax.evaluate.modes import SoftPrompt, ZeroShot, reference_modes
from spt_jax.evaluate.protocol import Backends, check_inputs, evaluate
from spt_jax.system import check_interrupted
from spt_jax.tasks.files import read_mapping_file

_COMPARE_KEYS = {"models", "tasks", "eval", "out", "pairs", "correlate", "metric"}
_MODEL_KEYS = {"name", "path", "role", "base", "dtype"}


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
    if metric not in metrics.metric_names():
        raise ConfigError(f"{origin}: metric must be one of {', '.join(metrics.metric_names())}, got {metric!r}")
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
        if any(m.role == "post_trained" for m in models) and SoftPrompt.name in eval_config.modes:
            # claim (d): a tuned base model ranks like its post-trained twin evaluated plainly
            plain = ZeroShot.name if ZeroShot.name in eval_config.modes else SoftPrompt.name
            pairs.append((f"base:{SoftPrompt.name}", f"post_trained:{plain}"))
        return tuple(pairs)
    if not isinstance(value, list):
        raise ConfigError(f"{origin}: field 'correlate' must be a list of [mode, mode] pairs")
    reference_names = {m.name for m in reference_modes()}
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ConfigError(f"{origin}: correlate[{i}] must be a pair like [soft_prompt, zero_shot] or "
                              f"[base:soft_prompt, post_trained:zero_shot], got {pair!r}")
        for side in pair:
            role, _, mode = side.rpartition(":")
            if role not in ("", "base", "post_trained"):
                raise ConfigError(f"{origin}: correlate[{i}]: role {role!r} must be 'base' or 'post_trained'")
            if mode not in eval_config.modes and mode not in reference_names:
                raise ConfigError(f"{origin}: correlate[{i}]: mode {mode!r} is not evaluated; modes: "
                                  f"{', '.join(eval_config.modes)}{close_names(mode, eval_config.modes)}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
    return compare_config_from_dict(read_mapping_file(path, "config file"), origin=f"config file {path}")


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
        entry.update(_correlation(xs, ys, "no model has scores for both sides", seed=seed))
        out.append(entry)
    return out


def _correlation(xs: Sequence[float], ys: Sequence[float], empty_note: str, **options) -> dict:
    """`metrics.rank_correlation` of xs and ys, an undefined correlation's reason as ``note``."""
    if not xs:
        return {"n": 0, "kendall_tau_b": None, "spearman": None, "note": empty_note}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", metrics.UndefinedCorrelationWarning)
        entry = metrics.rank_correlation(xs, ys, **options)
    notes = [str(w.message) for w in caught if issubclass(w.category, metrics.UndefinedCorrelationWarning)]
    if notes:
        entry["note"] = notes[0]
    return entry


def _defined(value) -> bool:
    """A score to rank by: a finite number (None or NaN, e.g. knowledge accuracy with no valid output, is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def mode_scores(results: Mapping, metric: str = "accuracy") -> dict[str, float]:
    """``{mode: value of metric}`` from one `evaluate` results dict (or a loaded results.json); an
    undefined value (knowledge accuracy with no valid output) is NaN, or None as read from JSON."""
    if metric not in metrics.metric_names():
        raise ConfigError(f"metric must be one of {', '.join(metrics.metric_names())}, got {metric!r}")
    rows = results.get("results") if isinstance(results, Mapping) else None
    if not isinstance(rows, list):
        raise DataError("mode_scores needs the dict `evaluate` returns (or a results.json), with a 'results' list")
    return {row["mode"]: (None if row[metric]["value"] is None else float(row[metric]["value"])) for row in rows}


def mode_correlations(scores: Mapping[str, Mapping[str, float]], target: Mapping[str, float], *,
                      modes: Sequence[str] | None = None, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int | None = 0) -> dict[str, dict]:
    """How well each mode's scores rank checkpoints as a target score does (claim d, from your own code).

    ``scores[checkpoint][mode]`` is a checkpoint's score in a mode (e.g. `mode_scores` of its
    `evaluate` results); ``target[checkpoint]`` the score the ranking should predict (e.g. the
    post-trained twin's accuracy, or a downstream benchmark). Per mode (default: every mode any
    checkpoint has, in first-seen order): Kendall tau-b and Spearman with bootstrap intervals over
    checkpoints (`metrics.rank_correlation`), plus the checkpoints and scores used. A checkpoint
    without that mode is left out of that mode's correlation; one without a target is a DataError,
    since a ranking silently computed over fewer checkpoints than given misleads; a score that is
    None or NaN leaves its checkpoint out (``left_out``). An undefined
    correlation (fewer than 2 checkpoints, all scores tied) is NaN with the reason in ``note``.
    """
    absent = [name for name in scores if name not in target]
    if absent:
        raise DataError(f"mode_correlations: no target score for {', '.join(map(repr, absent))}; "
                        f"targets given for {', '.join(map(repr, target)) or 'none'}")
    seen: dict[str, None] = {}
    for name, by_mode in scores.items():
        if not isinstance(by_mode, Mapping):
            raise DataError(f"mode_correlations: scores[{name!r}] must map mode names to numbers, got {by_mode!r}")
        seen.update(dict.fromkeys(by_mode))
    out = {}
    for mode in (list(modes) if modes is not None else list(seen)):
        used = [name for name, by_mode in scores.items() if _defined(by_mode.get(mode))]
        xs = [float(scores[name][mode]) for name in used]
        ys = [float(target[name]) for name in used]
        left_out = [name for name in scores if name not in used]
        out[mode] = {"mode": mode, "checkpoints": used, "left_out": left_out, "x_scores": xs, "y_scores": ys,
                     **_correlation(xs, ys, f"no checkpoint has a {mode!r} score", n_resamples=n_resamples,
                                    confidence=confidence, seed=seed)}
    return out


def compare(
    config_file: str | os.PathLike | CompareConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    load_model: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
    backends: Backends = Backends(),
) -> dict:
    """Evaluate every model on every task (config file: docs/results_schema.md#compare), then tabulate.

    Writes ``out_dir/<model>/<task>/`` per evaluation plus ``compare.json`` and ``compare.md`` (a table
    per task and the rank correlations). Models load one at a time, so memory holds one model. The
    folder (a path or an open `Staging`) appears only when every evaluation is done (`output_folder`).
    """
    from spt_jax import report
    from spt_jax.tasks import get_task

    config = config_file if isinstance(config_file, CompareConfig) else load_compare_config(config_file)
    log = log or (lambda message: None)
    out_dir = out_dir if out_dir is not None else config.out
    if out_dir is None:
        raise ConfigError("compare needs an output directory (the config's 'out' field or --out)")
    writer = writes_results()  # on several JAX processes only process 0 writes
    if writer and not isinstance(out_dir, Staging):  # staged: the folder appears only when every run is complete
        with output_folder(out_dir, overwrite) as staging:
            return compare(config, staging, progress=progress, load_model=load_model, log=log, backends=backends)
    out = out_dir.path if writer else None
    tasks = [get_task(name) for name in config.tasks]
    for task in tasks:  # bad data fails now, not after the first model
        check_inputs(task, config.eval)
    from spt_jax.models import resolve_dtype_name
    from spt_jax.tune.mesh import loading_shardings

    onto = loading_shardings(config.eval.device_mesh())  # a mesh that does not fit fails before any load
    if load_model is None:
        from spt_jax.models import load as load_model

    runs: list[dict] = []
    started = time.perf_counter()
    for spec in config.models:
        log(f"loading {spec.name} ({spec.path})")
        dtype = resolve_dtype_name(spec.dtype or config.eval.dtype)
        lm = load_model(spec.path, dtype=dtype, **({"shardings": onto} if onto is not None else {}))
        check_interrupted()  # a Ctrl-C a callback swallowed while it loaded
        for task in tasks:
            log(f"evaluating {spec.name} on {task.name}")
            run_dir = Path(_folder(spec.name)) / _folder(task.name)
            results = evaluate(lm, task, config.eval, out / run_dir if out is not None else None, progress=progress,
                               log=log, backends=backends)
            runs.append({"model": spec.name, "role": spec.role, "base": spec.base, "task": task.name,
                         "dir": str(run_dir), "results": results["results"]})
        del lm

    per_task = {}
    for task in tasks:
        scores: dict[str, dict[str, dict]] = {}
        for run in runs:
            if run["task"] != task.name:
                continue
            scores[run["model"]] = {row["mode"]: {m: row[m]["value"] for m in metrics.metric_names()}
                                   for row in run["results"]}
        per_task[task.name] = {
            "scores": scores,
            "rank_correlations": rank_correlations(scores, config.models, config.correlate, config.metric,
                                                   seed=config.eval.seed),
        }
    summary = {
        "schema_version": res.SCHEMA_VERSION,
        "created": res.now_utc(),
        "metric": config.metric,
        "models": [dataclasses.asdict(m) for m in config.models],
        "tasks": [t.name for t in tasks],
        "config": {"eval": config.eval.to_dict(), "correlate": [list(p) for p in config.correlate]},
        "versions": res.versions(),
        "runs": runs,
        "per_task": per_task,
        "wall_time_s": time.perf_counter() - started,
    }
    if out is not None:
        (out / res.COMPARE_REPORT_FILE).write_text(report.compare_markdown(summary), encoding="utf-8")
        res.write_json(out / res.COMPARE_FILE, summary)
    return summary


def _folder(name: str) -> str:
    return res.safe_name(Path(name).name or name) or "model"
