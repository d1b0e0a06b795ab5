"""Results as people read them: markdown tables and matplotlib PNG plots.

Everything here reads the plain results dicts that `spt_jax.evaluate` writes (results.json,
compare.json), so a table or plot can be redrawn later from the files alone. Columns and labels come
from the registries: metrics from `spt_jax.metrics.METRICS`, modes from `spt_jax.evaluate.modes`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from spt_jax.errors import ConfigError
from spt_jax.evaluate.modes import get_mode, mode_label
from spt_jax.metrics import METRICS

METRIC_LABELS = {m.name: m.label for m in METRICS}
METRICS_PLOT = "metrics_by_mode.png"
CURVE_PLOT = "tuning_curve.png"
PLOT_FILES = (METRICS_PLOT, CURVE_PLOT)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_estimate(estimate: Mapping | None, digits: int = 3) -> str:
    """``0.953 [0.921, 0.972]``; ``n/a`` for an undefined value."""
    if not estimate or not _is_number(estimate.get("value")):
        return "n/a"
    text = f"{estimate['value']:.{digits}f}"
    low, high = estimate.get("low"), estimate.get("high")
    if _is_number(low) and _is_number(high):
        text += f" [{low:.{digits - 1}f}, {high:.{digits - 1}f}]"
    return text


def fmt_seconds(seconds) -> str:
    if not _is_number(seconds):
        return ""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _mode_name_label(name: str) -> str:
    try:
        return get_mode(name).label
    except ConfigError:  # a mode no longer registered shows its name
        return name


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def results_table(results: Mapping) -> str:
    """One row per mode: n, each shown metric (with intervals), time. References show "-" for the
    metrics that mean nothing without a format (format validity, knowledge accuracy)."""
    shown = [m for m in METRICS if m.shown]
    confidence = None
    rows = []
    for row in results["results"]:
        confidence = row.get("confidence", confidence)
        reference = row.get("reference", False)
        cells = ["-" if reference and not m.reference else fmt_estimate(row.get(m.name)) for m in shown]
        rows.append([mode_label(row), str(row["n"]), *cells, fmt_seconds(row.get("wall_time_s"))])
    level = f"{round(100 * confidence)}% " if _is_number(confidence) else ""
    header = ["mode", "n", *[m.label + (f" [{level}CI]" if i == 0 else "") for i, m in enumerate(shown)], "time"]
    return _table(header, rows)


def comparisons_table(results: Mapping) -> str:
    rows = []
    for c in results.get("comparisons", []):
        rows.append([_mode_name_label(c["mode_a"]), _mode_name_label(c["mode_b"]),
                     METRIC_LABELS.get(c["metric"], c["metric"]), f"{c['difference']:+.3f}",
                     f"{c['b']} / {c['c']}", f"{c['p_value']:.3g}", c["method"]])
    if not rows:
        return ""
    header = ["mode a", "mode b", "metric", "a - b", "discordant (a only / b only)", "McNemar p", "test"]
    return _table(header, rows)


def headline_lines(results: Mapping) -> list[str]:
    """The lines under the table: each generation mode's accuracy against every earlier one (McNemar
    on the same items: the soft prompt against zero-shot *and* few-shot), and where format validity
    saturated."""
    lines = []
    for c in results.get("comparisons", []):
        if c["metric"] == "accuracy":
            mode, baseline = _mode_name_label(c["mode_b"]), _mode_name_label(c["mode_a"])
            gain = 0.0 - c["difference"]  # 0.0 - x: no "-0.000" for a tie
            lines.append(f"{mode} vs {baseline}: accuracy {gain:+.3f}, McNemar p = {c['p_value']:.3g} "
                         f"(right only with {mode}: {c['c']} items, only {baseline}: {c['b']})")
    tuning = results.get("tuning") or {}
    if tuning.get("curve"):
        saturated = tuning.get("saturated_at_step")
        stopped = (tuning.get("metadata") or {}).get("saturated_at_step") is not None
        if saturated is None:
            lines.append(f"format validity did not saturate within {tuning['steps']} steps")
        else:
            lines.append(f"format validity saturated at step {saturated}"
                         + (f" (tuning stopped at step {tuning['steps']})" if stopped else
                            f" of {tuning['steps']}"))
    return lines


def timing_line(results: Mapping) -> str:
    """``time: load 3.2 s, zero-shot 41.3 s (compile 6.1 s), ...; total 8.7 min`` from results["timing"]."""
    timing = results.get("timing")
    if not timing:
        return ""
    parts = [f"load {fmt_seconds(timing['load_s'])}"] if _is_number(timing.get("load_s")) else []
    for name, entry in timing["modes"].items():
        inner = [f"tuning {fmt_seconds(entry['tune_s'])}"] if _is_number(entry.get("tune_s")) else []
        inner.append(f"compile {fmt_seconds(entry['compile_s'])}")
        parts.append(f"{_mode_name_label(name)} {fmt_seconds(entry['wall_s'])} ({', '.join(inner)})")
    return f"time: {', '.join(parts)}; total {fmt_seconds(timing['total_s'])}"


def seeds_table(results: Mapping) -> str:
    """One row per independently tuned prompt, then the mean and range over seeds."""
    block = results.get("seeds")
    if not block:
        return ""
    shown = [m for m in METRICS if m.shown]
    tests = {}  # each paired test a seed carries (``vs_<mode>``, results.seeds_summary): key -> mode label
    for entry in block["per_seed"]:
        tests.update({key: _mode_name_label(key.removeprefix("vs_")) for key in entry if key.startswith("vs_")})
    rows = []
    for entry in block["per_seed"]:
        rows.append([str(entry["tune_seed"]), str(entry.get("tuning_steps")),
                     *[fmt_estimate(entry[m.name]) for m in shown],
                     *[f"{entry[key]['p_value']:.3g}" if key in entry else "" for key in tests]])
    summary = []
    for m in shown:
        s = block[m.name]
        summary.append(f"{s['mean']:.3f} [{s['min']:.2f}, {s['max']:.2f}]" if _is_number(s["mean"]) else "n/a")
    rows.append([f"mean [min, max] of {block['n_seeds']}", "", *summary, *[""] * len(tests)])
    header = ["tune seed", "steps", *[m.label for m in shown],
              *[f"McNemar p vs {label} (accuracy)" for label in tests.values()]]
    return _table(header, rows)


def curve_table(curve: Sequence[Mapping]) -> str:
    if not curve:
        return ""
    rows = [[str(p["step"]), f"{p['format_validity']:.3f}", f"{p['accuracy']:.3f}"] for p in curve]
    return _table(["step", "format validity", "accuracy"], rows)


def results_markdown(results: Mapping) -> str:
    """The whole results.md: headline table, paired tests, tuning curve, settings."""
    model, task = results["model"], results["task"]
    parts = [f"# {model['name']} on {task['name']}\n",
             f"{results['n']} test items, seed {results['seed']}. Accuracy counts an unparsable answer as "
             "wrong; knowledge accuracy is the share correct among valid (parsable) answers.\n\n",
             results_table(results)]
    headline = headline_lines(results)
    if headline:
        parts.append("\n" + "\n".join(f"- {line}" for line in headline) + "\n")
    seeds = seeds_table(results)
    if seeds:
        parts += [f"\n## {results['seeds']['n_seeds']} independently tuned soft prompts\n\n", seeds]
    comparisons = comparisons_table(results)
    if comparisons:
        parts += ["\n## Paired comparisons (same items, McNemar)\n\n", comparisons]
    tuning = results.get("tuning") or {}
    if tuning.get("curve"):
        split = tuning["curve"][0].get("split", "validation")
        parts += [f"\n## Tuning curve ({tuning['curve'][0]['n']} fixed {split} items)\n\n",
                  curve_table(tuning["curve"])]
    if tuning:
        detail = [f"source: {tuning.get('source')}"]
        if tuning.get("steps") is not None:
            detail.append(f"steps: {tuning['steps']}")
        if _is_number(tuning.get("final_loss")):
            detail.append(f"final loss: {tuning['final_loss']:.4f}")
        if _is_number(tuning.get("tune_time_s")):
            detail.append(f"tuning time: {fmt_seconds(tuning['tune_time_s'])}")
        parts.append("\nSoft prompt -- " + ", ".join(detail) + "\n")
    if results.get("timing"):
        parts.append("\n" + timing_line(results) + "\n")
    versions = results.get("versions", {})
    parts.append("\nVersions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None) + "\n")
    return "".join(parts)


def compare_markdown(summary: Mapping) -> str:
    """A table per task (models x modes, the chosen metric) and the rank correlations."""
    metric = summary["metric"]
    parts = [f"# Comparison: {METRIC_LABELS.get(metric, metric)} by model and mode\n"]
    roles = {m["name"]: m for m in summary["models"]}
    for task_name, block in summary["per_task"].items():
        scores = block["scores"]
        modes = []
        for model_scores in scores.values():
            modes += [m for m in model_scores if m not in modes]
        rows = []
        for model_name, model_scores in scores.items():
            role = roles.get(model_name, {}).get("role", "")
            cells = []
            for mode in modes:
                value = model_scores.get(mode, {}).get(metric)
                cells.append(f"{value:.3f}" if _is_number(value) else "n/a")
            rows.append([model_name, role, *cells])
        parts += [f"\n## {task_name}\n\n", _table(["model", "role", *[_mode_name_label(m) for m in modes]], rows)]
        correlations = block.get("rank_correlations", [])
        if correlations:
            corr_rows = []
            for c in correlations:
                corr_rows.append([c["x"], c["y"], str(c.get("n", 0)), fmt_estimate(c.get("kendall_tau_b")),
                                  fmt_estimate(c.get("spearman")), c.get("note", "")])
            parts += ["\nRank correlations over models (bootstrap 95% intervals):\n\n",
                      _table(["x", "y", "n models", "Kendall tau-b", "Spearman", "note"], corr_rows)]
        else:
            parts.append("\nNo rank correlations: the config evaluates a single mode.\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_metrics_by_mode(results: Mapping, path: str | Path) -> Path:
    """Grouped bars: format validity, accuracy, knowledge accuracy per mode, with interval whiskers."""
    plt = _pyplot()
    rows = list(results["results"])
    shown = [m for m in METRICS if m.shown]
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(rows) + 2), 4.0))
    for j, metric in enumerate(shown):
        xs, values, lows, highs = [], [], [], []
        for i, row in enumerate(rows):
            estimate = row.get(metric.name) or {}
            value = estimate.get("value")
            if not _is_number(value) or (row.get("reference") and not metric.reference):
                continue
            low = estimate.get("low") if _is_number(estimate.get("low")) else value
            high = estimate.get("high") if _is_number(estimate.get("high")) else value
            xs.append(i + (j - (len(shown) - 1) / 2) * width)
            values.append(value)
            lows.append(max(value - low, 0.0))
            highs.append(max(high - value, 0.0))
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=metric.label)
    ax.set_xticks(range(len(rows)), [mode_label(r) for r in rows], rotation=0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title(f"{results['model']['name']} on {results['task']['name']} (n={results['n']})")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tuning_curve(curve: Sequence[Mapping], path: str | Path, title: str = "",
                      history: Sequence[Mapping] = ()) -> Path:
    """Format validity and accuracy on the fixed validation items against tuning step (+ loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    steps = [p["step"] for p in curve]
    ax.plot(steps, [p["format_validity"] for p in curve], "o-", label="format validity")
    ax.plot(steps, [p["accuracy"] for p in curve], "s-", label="accuracy")
    ax.set_xlabel("tuning step")
    ax.set_ylabel("rate (validation subset)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    losses = [(h["step"], h["loss"]) for h in history
              if isinstance(h, Mapping) and _is_number(h.get("step")) and _is_number(h.get("loss"))]
    handles, labels = ax.get_legend_handles_labels()
    if losses:
        twin = ax.twinx()
        (line,) = twin.plot([s for s, _ in losses], [v for _, v in losses], color="gray", alpha=0.6,
                            linewidth=1, label="train loss")
        twin.set_ylabel("train loss")
        handles.append(line)
        labels.append("train loss")
    ax.legend(handles, labels, loc="center right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(results: Mapping, out_dir: str | Path) -> dict:
    """Every plot the results support; returns {"kind": file name} for results.json's ``files``."""
    out_dir = Path(out_dir)
    files = {"metrics_plot": plot_metrics_by_mode(results, out_dir / METRICS_PLOT).name}
    tuning = results.get("tuning") or {}
    if tuning.get("curve"):
        title = f"{results['model']['name']} on {results['task']['name']}: soft-prompt tuning"
        files["curve_plot"] = plot_tuning_curve(tuning["curve"], out_dir / CURVE_PLOT, title,
                                                tuning.get("history") or ()).name
    return files


__all__ = [
    "CURVE_PLOT",
    "PLOT_FILES",
    "METRICS_PLOT",
    "compare_markdown",
    "comparisons_table",
    "curve_table",
    "headline_lines",
    "seeds_table",
    "fmt_estimate",
    "plot_metrics_by_mode",
    "plot_tuning_curve",
    "results_markdown",
    "results_table",
    "write_plots",
]
