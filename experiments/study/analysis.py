"""From the models' scores to claim (d)'s answer: rank correlations, plots and the markdown summary.

Each base-model mode's scores are correlated with the post-trained twins' accuracy through the
library's `spt_jax.evaluate.mode_correlations`, three ways: over every model (recipe x seed), over
the recipes (scores averaged over seeds: the ranking a lab choosing a recipe cares about) and within
each seed (how much one seed's verdict can be trusted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spt_jax import evaluate as ev

BASE_MODES = ("zero_shot", "few_shot", "soft_prompt")
LABELS = {"zero_shot": "zero-shot", "few_shot": "few-shot", "soft_prompt": "soft prompt"}
TARGET = ("post", "zero_shot", "accuracy")  # the post-trained model's zero-shot accuracy
METRICS = ("format_validity", "accuracy", "knowledge_accuracy")


def _target(record: dict) -> float:
    stage, mode, metric = TARGET
    return record[stage][mode][metric]


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def recipe_means(records: Sequence[dict]) -> dict[str, dict]:
    """Per recipe (in first-seen order): every base mode's and the post-trained model's metrics
    averaged over its seeds."""
    out: dict[str, dict] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in records):
        group = [r for r in records if r["recipe"] == recipe]
        entry = {"n_seeds": len(group), "n_params": group[0]["n_params"]}
        for mode in BASE_MODES:
            entry[mode] = {m: _mean(r["base"][mode][m] for r in group) for m in METRICS}
        entry["post_trained"] = {m: _mean(r["post"]["zero_shot"][m] for r in group) for m in METRICS}
        out[recipe] = entry
    return out


def correlations(records: Sequence[dict], metric: str = "accuracy", seed: int = 0) -> dict:
    """Each base mode's ``metric`` against the post-trained accuracy: over models, recipes, seeds."""
    scores = {r["model"]: {m: r["base"][m][metric] for m in BASE_MODES} for r in records}
    target = {r["model"]: _target(r) for r in records}
    means = recipe_means(records)
    out = {
        "metric": metric,
        "target": ".".join(TARGET),
        "over_models": ev.mode_correlations(scores, target, modes=BASE_MODES, seed=seed),
        "over_recipes": ev.mode_correlations({name: {m: e[m][metric] for m in BASE_MODES} for name, e in means.items()},
                                             {name: e["post_trained"]["accuracy"] for name, e in means.items()},
                                             modes=BASE_MODES, seed=seed),
    }
    per_seed = {}
    for s in sorted({r["seed"] for r in records}):
        group = [r for r in records if r["seed"] == s]
        if len(group) >= 2:
            per_seed[str(s)] = ev.mode_correlations({r["model"]: scores[r["model"]] for r in group},
                                                    {r["model"]: target[r["model"]] for r in group},
                                                    modes=BASE_MODES, seed=seed)
    out["per_seed"] = per_seed
    out["per_seed_summary"] = {
        mode: {stat: _spread([runs[mode][stat]["value"] for runs in per_seed.values()
                              if runs[mode].get(stat) is not None]) for stat in ("kendall_tau_b", "spearman")}
        for mode in BASE_MODES}
    return out


def _spread(values: list[float]) -> dict:
    defined = [v for v in values if math.isfinite(v)]
    if not defined:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "n_defined": 0, "n": len(values)}
    return {"mean": float(np.mean(defined)), "min": float(min(defined)), "max": float(max(defined)),
            "n_defined": len(defined), "n": len(values)}


# --------------------------------------------------------------------------------------------------
# verdict


def _tau(entry: dict) -> float:
    value = (entry.get("kendall_tau_b") or {}).get("value")
    return value if value is not None and math.isfinite(value) else -math.inf


def verdict(corr: dict, means: dict) -> list[str]:
    """What the numbers say, in sentences built from them (no claim the numbers do not carry)."""
    lines = []
    for scope, what in (("over_models", "every model"), ("over_recipes", "the recipes (seed means)")):
        entries = corr[scope]
        ranked = sorted(BASE_MODES, key=lambda m: _tau(entries[m]), reverse=True)
        best = ranked[0]
        if _tau(entries[best]) == -math.inf:
            lines.append(f"Over {what}: no mode's correlation is defined ({entries[best].get('note', '')}).")
            continue
        b = entries[best]["kendall_tau_b"]
        tied = [m for m in ranked if _tau(entries[m]) == _tau(entries[best])]
        if len(tied) > 1:
            lines.append(f"Over {what} (n = {entries[best]['n']}): no mode ranks better than another: "
                         f"{', '.join(LABELS[m] for m in tied)} tie at Kendall tau-b {b['value']:.2f} "
                         f"[{b['low']:.2f}, {b['high']:.2f}]" + (f"; the rest: {', '.join(LABELS[m] for m in ranked if m not in tied)} "
                         "lower or undefined." if len(tied) < len(ranked) else "."))
            continue
        text = (f"Over {what} (n = {entries[best]['n']}): **{LABELS[best]}** scores rank the post-trained models "
                f"best, Kendall tau-b {b['value']:.2f} [{b['low']:.2f}, {b['high']:.2f}]")
        others = []
        for mode in ranked[1:]:
            e = entries[mode]
            if _tau(e) == -math.inf:
                others.append(f"{LABELS[mode]} undefined ({e.get('note', 'no scores')})")
            else:
                t = e["kendall_tau_b"]
                if not (math.isfinite(t["high"]) and math.isfinite(b["low"])):
                    overlap = "intervals undefined"
                else:
                    overlap = "intervals overlap" if t["high"] >= b["low"] else "its interval lies below"
                others.append(f"{LABELS[mode]} {t['value']:.2f} [{t['low']:.2f}, {t['high']:.2f}] ({overlap})")
        lines.append(text + "; " + "; ".join(others) + ".")
    validity = {m: _mean(e[m]["format_validity"] for e in means.values()) for m in BASE_MODES}
    lines.append("Mean base-model format validity over recipes: "
                 + ", ".join(f"{LABELS[m]} {validity[m]:.2f}" for m in BASE_MODES)
                 + ". Where a mode rarely writes the format, its accuracy measures format exposure "
                   "(e.g. QA text in pre-training), not knowledge.")
    return lines


# --------------------------------------------------------------------------------------------------
# plots and summary


def _interval(estimate: dict | None) -> tuple[float, float, float]:
    if not estimate:
        return math.nan, math.nan, math.nan
    return estimate["value"], estimate["low"], estimate["high"]


def plot_correlations(corr: dict, path: Path) -> Path:
    """Kendall tau-b and Spearman per base mode (over models and over recipe means), 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    scopes = (("over_models", "all models"), ("over_recipes", "recipe means"))
    x = np.arange(len(BASE_MODES))
    for ax, stat in zip(axes, ("kendall_tau_b", "spearman")):
        for j, (scope, label) in enumerate(scopes):
            vals = [_interval(corr[scope][m].get(stat)) for m in BASE_MODES]
            v = np.array([t[0] for t in vals])
            err = np.array([[t[0] - t[1] for t in vals], [t[2] - t[0] for t in vals]])
            ax.bar(x + (j - 0.5) * 0.38, np.nan_to_num(v), 0.36, yerr=np.nan_to_num(err), capsize=3, label=label)
            for xi, value in zip(x, v):
                if not math.isfinite(value):
                    ax.text(xi + (j - 0.5) * 0.38, 0.02, "undef.", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [LABELS[m] for m in BASE_MODES])
        ax.set_title(f"{'Kendall tau-b' if stat == 'kendall_tau_b' else 'Spearman'} vs post-trained accuracy")
        ax.set_ylim(-1.05, 1.05)
    axes[0].set_ylabel(f"rank correlation (base {corr['metric']})")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter(records: Sequence[dict], corr: dict, path: Path) -> Path:
    """Post-trained accuracy against each base mode's score, one colour per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r["recipe"] for r in records))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(BASE_MODES), figsize=(4 * len(BASE_MODES), 4), sharey=True)
    metric = corr["metric"]
    for ax, mode in zip(axes, BASE_MODES):
        for i, recipe in enumerate(recipes):
            group = [r for r in records if r["recipe"] == recipe]
            ax.scatter([r["base"][mode][metric] for r in group], [_target(r) for r in group],
                       color=colours(i % 10), label=recipe, s=28)
        tau = _interval(corr["over_models"][mode].get("kendall_tau_b"))[0]
        ax.set_title(f"{LABELS[mode]}: tau-b {tau:.2f}" if math.isfinite(tau) else f"{LABELS[mode]}: tau-b undefined")
        ax.set_xlabel(f"base model {metric.replace('_', ' ')}")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("post-trained accuracy (zero-shot)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(estimate: dict | None) -> str:
    value, low, high = _interval(estimate)
    return "undefined" if not math.isfinite(value) else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def recipe_table(means: dict) -> list[str]:
    head = "| recipe | params | " + " | ".join(f"{LABELS[m]} valid / acc" for m in BASE_MODES) + " | post-trained valid / acc |"
    lines = [head, "|" + "---|" * (3 + len(BASE_MODES))]
    for name, e in means.items():
        cells = [f"{e[m]['format_validity']:.2f} / {e[m]['accuracy']:.2f}" for m in BASE_MODES]
        post = e["post_trained"]
        lines.append(f"| {name} | {e['n_params']:,} | " + " | ".join(cells)
                     + f" | {post['format_validity']:.2f} / {post['accuracy']:.2f} |")
    return lines


def correlation_table(corr: dict) -> list[str]:
    lines = ["| base mode | Kendall tau-b, all models | Spearman, all models | Kendall tau-b, recipe means | "
             "Spearman, recipe means | tau-b per seed: mean (min, max) |", "|---|---|---|---|---|---|"]
    for mode in BASE_MODES:
        m, r = corr["over_models"][mode], corr["over_recipes"][mode]
        s = corr["per_seed_summary"][mode]["kendall_tau_b"]
        seeds = (f"{s['mean']:.2f} ({s['min']:.2f}, {s['max']:.2f}), {s['n_defined']}/{s['n']} defined"
                 if s["n_defined"] else f"undefined ({s['n']} seeds)")
        lines.append(f"| {LABELS[mode]} | {_fmt(m.get('kendall_tau_b'))} | {_fmt(m.get('spearman'))} | "
                     f"{_fmt(r.get('kendall_tau_b'))} | {_fmt(r.get('spearman'))} | {seeds} |")
    return lines


def summary_markdown(study: dict) -> str:
    corr, means = study["correlations"]["accuracy"], study["recipe_means"]
    settings = study["settings"]
    lines = [
        "# Claim (d): do base-model scores predict the post-trained ranking?",
        "",
        f"Command: `{study['command']}`  ",
        f"Scale `{settings['scale']['name']}`: {settings['scale']['n_people']} fictional people "
        f"(world seed {settings['world_seed']}), {len(means)} recipes x seeds {study['seeds']}, "
        f"{settings['scale']['n_test']} benchmark questions about people post-training never saw.  ",
        f"Wall time {study['wall_time_s'] / 60:.1f} min this run; machine: {study['machine']}.",
        "",
        "Each base model is pre-trained from scratch on its recipe's biographies, evaluated zero-shot, "
        f"{settings['scale']['k']}-shot and with a soft prompt ({settings['scale']['prompt_length']} vectors, "
        f"{settings['scale']['tune_steps']} steps at batch {settings['scale']['tune_batch_size']}), then "
        "post-trained by full SFT on QA pairs about the other half of the people and evaluated zero-shot. "
        "Scores are accuracy (a correct answer in the required `Answer: <value>` format).",
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in verdict(corr, means)],
        "",
        "## Scores by recipe (means over seeds)",
        "",
        *recipe_table(means),
        "",
        "## Rank correlations with the post-trained accuracy (95% bootstrap intervals)",
        "",
        "Base-model accuracy in each mode:",
        "",
        *correlation_table(corr),
        "",
    ]
    if "knowledge_accuracy" in study["correlations"]:
        lines += ["Base-model knowledge accuracy (correct among valid) in each mode, a format-free view:", "",
                  *correlation_table(study["correlations"]["knowledge_accuracy"]), ""]
    lines += ["![correlations](correlations.png)", "", "![scatter](scatter.png)", ""]
    return "\n".join(lines)
