"""Results: the files of a results folder, assembly of results.json's rows, writing and loading.

One place decides what a results folder holds (schema: docs/results_schema.md) and writes it:
predictions.jsonl, the tuned prompt (through `spt_jax.tune.save_prompt`, the one prompt-file format),
the plots, results.md and, last, results.json, whose presence marks a complete folder. Where and how
atomically a folder is written is `spt_jax.evaluate.folders`' job.
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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from spt_jax import metrics
from spt_jax.errors import ConfigError, DataError, environment_fault
from spt_jax.evaluate.modes import FewShot, ModeRun, ZeroShot, get_mode
from spt_jax.system import read_text

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "results.md"
PROMPT_FILE = "soft_prompt.safetensors"
TUNING_FILE = "tuning.json"
COMPARE_FILE = "compare.json"
COMPARE_REPORT_FILE = "compare.md"
# Every file a command writes besides the plots (report.PLOT_FILES): what marks a folder as ours.
OUTPUT_FILES = (RESULTS_FILE, PREDICTIONS_FILE, REPORT_FILE, PROMPT_FILE, TUNING_FILE, COMPARE_FILE,
                COMPARE_REPORT_FILE)


def safe_name(name: str) -> str:
    """A folder name from a label (a model or task name, which may be a path)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


# --------------------------------------------------------------------------------------------------
# JSON


def jsonable(value):
    """Dataclasses, numpy scalars/arrays, tuples and paths as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None  # NaN is null: every reader can load it
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("jax"):
        array = np.asarray(value)
        return jsonable(array.tolist()) if array.size <= 64 else f"<array {array.shape} {array.dtype}>"
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json(path: Path, data) -> None:
    """JSON with NaN written as null, so every reader (not only Python's) can load it."""
    Path(path).write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def load_results(path: str | os.PathLike) -> dict:
    """A results.json (or the directory holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        return json.loads(read_text(path, "results file"))
    except FileNotFoundError:
        raise ConfigError(f"no results file at {path}") from None
    except OSError as e:
        raise environment_fault(e, "cannot read the results file", path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None


# --------------------------------------------------------------------------------------------------
# what a results file records


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


def model_info(lm) -> dict:
    config = lm.config
    return {"name": str(lm.name), "model_type": config.model_type, "d_model": config.d_model,
            "n_layers": config.n_layers, "vocab_size": config.vocab_size, "n_params": int(lm.n_params),
            "dtype": np.dtype(lm.dtype).name}


def prompt_metadata(lm, task, seed: int, steps: int) -> dict:
    """What a prompt file records: the model identity `load_prompt` checks, plus how it was made."""
    import spt_jax
    from spt_jax.tune.prompt import model_metadata

    return {**model_metadata(lm), "task": task.name, "steps": int(steps), "seed": int(seed),
            "spt_jax": spt_jax.__version__}


def predictions(items, runs: Mapping[str, ModeRun]) -> list[dict]:
    """One row per item per mode: what the model saw, said, and how it was scored."""
    return [{"mode": mode, "index": index, "id": record.get("id"), "input": text, "output": output, **row}
            for mode, run in runs.items()
            for (index, record), text, output, row in zip(items, run.inputs, run.outputs, run.scored)]


def result_rows(model_name: str, task, config, runs: Mapping[str, ModeRun]) -> list[dict]:
    """One row per mode: the metrics with intervals, the mode's own fields, its wall time."""
    extra_fields = sorted({f for mode in runs for f in get_mode(mode).row_fields}
                          | {"k", "tuning_steps"})  # schema v1 rows always carry these two
    rows = []
    for mode, run in runs.items():
        valid = np.array([r["valid"] for r in run.scored], bool)
        correct = np.array([r["correct"] for r in run.scored], bool)
        row = {"model": model_name, "task": task.name, "mode": mode,
               **metrics.summarize(valid, correct, confidence=config.confidence, seed=config.seed),
               "wall_time_s": run.wall_time_s, "seed": config.seed,
               **{f: run.fields.get(f) for f in extra_fields}, "reference": get_mode(mode).reference}
        if run.prefix_text:
            row["prefix_text"] = run.prefix_text
        rows.append(row)
    return rows


def _hit(record: Mapping) -> bool:
    """Right and well formed: what the paired accuracy tests compare, item by item."""
    return record["correct"] and record["valid"]


def paired_comparisons(runs: Mapping[str, ModeRun]) -> list[dict]:
    """McNemar tests between every two generation modes, on accuracy and on format validity."""
    generation = [m for m in runs if not get_mode(m).reference]
    out = []
    for a, b in itertools.combinations(generation, 2):
        for metric, key in (("accuracy", _hit), ("format_validity", lambda r: r["valid"])):
            # mcnemar's own "b" and "c" are the discordant counts (a only right, b only right)
            out.append({"mode_a": a, "mode_b": b, "metric": metric,
                        **metrics.mcnemar([key(r) for r in runs[a].scored], [key(r) for r in runs[b].scored])})
    return out


# Each tuned seed's accuracy is tested against these modes, where they ran: key ``vs_<mode name>``.
SEED_BASELINES = (ZeroShot.name, FewShot.name)




def seeds_summary(runs: Mapping[str, ModeRun], config) -> dict | None:
    """Every independently tuned prompt's metrics, their mean and range, and each seed's paired tests
    against zero-shot and few-shot, where they ran (``config.seeds > 1``); None with one seed."""
    mode = next((m for m, run in runs.items() if run.seed_runs), None)
    if mode is None:
        return None
    baselines = {f"vs_{name}": runs[name] for name in SEED_BASELINES if name in runs}
    per_seed = []
    for run in [runs[mode], *runs[mode].seed_runs]:
        valid = np.array([r["valid"] for r in run.scored], bool)
        correct = np.array([r["correct"] for r in run.scored], bool)
        entry = {"tune_seed": run.tuning.get("tune_seed"), "tuning_steps": run.tuning.get("steps"),
                 "saturated_at_step": run.tuning.get("saturated_at_step"),  # from the curve, stopped or not
                 **metrics.summarize(valid, correct, confidence=config.confidence, seed=config.seed)}
        for key, baseline in baselines.items():
            entry[key] = metrics.mcnemar(list(map(_hit, baseline.scored)), list(map(_hit, run.scored)))
        per_seed.append(entry)
    spread = {}
    for m in metrics.METRICS:
        values = [e[m.name]["value"] for e in per_seed if e[m.name]["value"] is not None
                  and math.isfinite(e[m.name]["value"])]
        spread[m.name] = ({"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
                          if values else {"mean": None, "min": None, "max": None})
    return {"mode": mode, "n_seeds": len(per_seed), "per_seed": per_seed, **spread}


def timing(lm, runs: Mapping[str, ModeRun], wall_time: float) -> dict:
    """Where the run's time went: loading the model, then each mode (its compilation and, for the
    soft prompt, its tuning apart: every seed's prompt with ``--seeds``), in seconds."""
    modes = {}
    for name, run in runs.items():
        entry = {"wall_s": run.wall_time_s, "compile_s": run.compile_time_s}
        tuned = [r.tuning["tune_time_s"] for r in (run, *run.seed_runs)
                 if r.tuning is not None and r.tuning.get("tune_time_s") is not None]
        if tuned:
            entry["tune_s"] = sum(tuned)
        modes[name] = entry
    load = getattr(lm, "load_time_s", None)
    return {"load_s": load, "modes": modes, "compile_s": sum(m["compile_s"] for m in modes.values()),
            "evaluate_s": wall_time, "total_s": wall_time + (load or 0.0)}


def assemble(lm, task, config, items, runs: Mapping[str, ModeRun], wall_time: float) -> dict:
    """The content of results.json (docs/results_schema.md)."""
    model = model_info(lm)
    tuning = next((run.tuning for run in runs.values() if run.tuning is not None), None)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now_utc(),
        "model": model,
        "task": {"name": task.name, "description": task.description, "answer_kind": task.answer.kind,
                 "multiple_choice": task.choices_field is not None, "n_test_split": len(task.records("test")),
                 "max_new_tokens": config.max_new_tokens or task.max_new_tokens},
        "n": len(items),
        "seed": config.seed,
        "config": config.to_dict(),
        "versions": versions(),
        "results": result_rows(model["name"], task, config, runs),
        "comparisons": paired_comparisons(runs),
        "tuning": tuning,
        "seeds": seeds_summary(runs, config),
        "wall_time_s": wall_time,
        "timing": timing(lm, runs, wall_time),
        "files": {},
    }


def write_outputs(out: Path, results: dict, rows: Sequence[Mapping], *, lm, task, runs: Mapping[str, ModeRun]) -> None:
    """predictions.jsonl, the tuned prompt, plots, results.md and (last) results.json into ``out``."""
    from spt_jax import report
    from spt_jax.tune import save_prompt

    files = results["files"]
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(jsonable(row), allow_nan=False) + "\n")
    files["predictions"] = PREDICTIONS_FILE
    for run in runs.values():
        if run.soft_prompt is not None:
            steps = run.tuning["steps"]
            save_prompt(out / PROMPT_FILE, run.soft_prompt, prompt_metadata(lm, task, results["seed"], steps))
            files["prompt"] = PROMPT_FILE
    files.update(report.write_plots(results, out))
    files["report"] = REPORT_FILE
    (out / REPORT_FILE).write_text(report.results_markdown(results), encoding="utf-8")
    files["results"] = RESULTS_FILE
    write_json(out / RESULTS_FILE, results)  # last: its presence marks a complete directory
