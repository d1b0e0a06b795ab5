"""(a) Format-following saturates early: format validity and accuracy against tuning step.

For every model x task x seed, a soft prompt (P = 10, batch 8) is tuned for --steps steps and
evaluated on fixed validation items every --every steps: the library's own validity curve
(`evaluate.tune_soft_prompt` with `EvalConfig.eval_every` / `n_curve`). The step where validity
saturated is the library's rule too (`tune.stopping.saturation_step` with `TuneConfig`'s
`stop_threshold` 0.95 and `stop_patience` 2: the first check at >= 0.95 that the next two checks do
not beat), so the finding is one number per run and its spread over seeds.

Step 0 is the untrained prompt (embeddings of random vocabulary tokens, no instruction), not the
zero-shot baseline: `b_baselines.py` has that.

The full run is 18 tuning runs of 160 steps (77.8 min on a 2-core Zen 4), so each finished run is
kept under ``<out>/.a_saturation-runs/`` (keyed by its settings) and a later call with the same
settings and ``--out`` reuses it: an interrupted run, started again, resumes at the first
unfinished tuning run.

    python experiments/a_saturation.py            # both embedded models, 3 tasks, 3 seeds, 0..160 every 10
    python experiments/a_saturation.py --quick    # CI-sized
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "a_saturation"
FULL = dict(models=common.EMBEDDED, tasks=("capital_of", "element_symbols", "yes_no"), seeds=(0, 1, 2),
            steps=160, every=10, n_curve=32)
QUICK = dict(models=("smollm2-135m-instruct",), tasks=("capital_of",), seeds=(0, 1), steps=10, every=5, n_curve=8)
MARK_STEPS = (0, 10, 20, 40, 80, 160)  # validity at these steps in the summary (those the curve has)
RUNS_DIR = ".a_saturation-runs"  # finished tuning runs under --out, reused by a later call


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", type=common.names, help=f"comma-separated (default {','.join(FULL['models'])})")
    p.add_argument("--tasks", type=common.names, help=f"comma-separated (default {','.join(FULL['tasks'])})")
    p.add_argument("--seeds", type=common.ints, help="tuning seeds: prompt init and data order (default 0,1,2)")
    p.add_argument("--steps", type=common.positive, help=f"tuning steps (default {FULL['steps']})")
    p.add_argument("--every", type=common.positive, help=f"steps between validity checks (default {FULL['every']})")
    p.add_argument("--n-curve", type=common.positive, help=f"validation items per check (default {FULL['n_curve']})")
    p.add_argument("--no-reuse", action="store_true",
                   help=f"tune every run anew instead of reusing the finished ones kept in <out>/{RUNS_DIR}")
    args = common.settings(p.parse_args(argv), FULL, QUICK)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds names a seed twice: {args.seeds}")
    common.check_names(p, models=args.models, tasks=args.tasks)
    return args


# --------------------------------------------------------------------------------------------------
# measuring


def tune_run(lm, task, args, seed: int) -> dict:
    """One tuning run's curve and the step its validity saturated at (None: not within the run)."""
    from spt_jax import evaluate, tune

    config = evaluate.EvalConfig(eval_every=args.every, n_curve=args.n_curve, seed=0,  # same curve items
                                 tune=tune.TuneConfig(steps=args.steps, seed=seed))
    clock = common.Stopwatch()
    result, curve = evaluate.tune_soft_prompt(lm, task, config, progress=False)
    rule = result.config
    saturated = tune.stopping.saturation_step([(p["step"], p["format_validity"]) for p in curve],
                                              rule.stop_threshold, rule.stop_patience)
    steps = [h["step_time_s"] for h in result.history if not h["compiled"]]
    return {"seed": seed, "saturated_at_step": saturated, "curve": curve,
            "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
            "median_step_time_s": statistics.median(steps) if steps else None, "wall_time_s": clock.seconds,
            "rule": {"threshold": rule.stop_threshold, "patience": rule.stop_patience}}


def run_key(args, model: str, task: str, seed: int) -> dict:
    """Everything that decides one tuning run's numbers: a kept run is reused only if all of it matches."""
    from spt_jax import evaluate

    return {"model": model, "task": task, "seed": seed, "steps": args.steps, "every": args.every,
            "n_curve": args.n_curve, "spt_jax": evaluate.versions().get("spt_jax")}


def kept_run_path(args, key: dict) -> Path:
    name = f"{common.safe_name(key['model'])}__{common.safe_name(key['task'])}__s{key['seed']}.json"
    return Path(args.out) / RUNS_DIR / f"steps{key['steps']}-every{key['every']}-n{key['n_curve']}" / name


def kept_run(path: Path, key: dict) -> dict | None:
    """A finished run kept by an earlier call with the same settings, or None (absent, other settings,
    unreadable: the run is tuned again and the file replaced)."""
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return kept["run"] if isinstance(kept, dict) and kept.get("key") == key and "run" in kept else None


def keep_run(path: Path, key: dict, run: dict) -> None:
    """Write atomically (temporary file, then rename), so an interrupted write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    common.write_json(tmp, {"key": key, "run": run})
    tmp.replace(path)


def spread(values) -> dict:
    """Mean, min and max of the saturation steps of the seeds that saturated, and how many did."""
    done = [v for v in values if v is not None]
    return {"n_seeds": len(values), "n_saturated": len(done), "steps": list(values),
            "mean": statistics.fmean(done) if done else None, "min": min(done, default=None),
            "max": max(done, default=None), "stdev": statistics.stdev(done) if len(done) > 1 else None}


def mean_curve(runs) -> list[dict]:
    """Per step: validity and accuracy averaged over seeds, with their min and max."""
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    out = []
    for step in steps:
        points = [p for r in runs for p in r["curve"] if p["step"] == step]
        entry = {"step": step, "n_seeds": len(points)}
        for metric in ("format_validity", "accuracy"):
            values = [p[metric] for p in points]
            entry[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# writing


def plot(model: str, cells: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(max(6.0, 4.2 * len(cells)), 3.8), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for run in cell["runs"]:
            xs = [p["step"] for p in run["curve"]]
            ax.plot(xs, [p["format_validity"] for p in run["curve"]], color="tab:blue", alpha=0.35, lw=1)
            if run["saturated_at_step"] is not None:
                ax.axvline(run["saturated_at_step"], color="tab:green", ls=":", lw=1)
        xs = [p["step"] for p in cell["mean_curve"]]
        for metric, color, style in (("format_validity", "tab:blue", "-"), ("accuracy", "tab:orange", "--")):
            mean = [p[metric]["mean"] for p in cell["mean_curve"]]
            ax.plot(xs, mean, color=color, ls=style, lw=2, label=f"{metric.replace('_', ' ')} (mean)")
            ax.fill_between(xs, [p[metric]["min"] for p in cell["mean_curve"]],
                            [p[metric]["max"] for p in cell["mean_curve"]], color=color, alpha=0.12)
        ax.set_title(f"{cell['task']}", fontsize=10)
        ax.set_xlabel("tuning step (batch 8)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("on validation items")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{model}: format validity saturation (thin: each seed; dotted: its saturation step)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def at_step(cell: dict, step: int, metric: str) -> str:
    point = next((p for p in cell["mean_curve"] if p["step"] == step), None)
    return "-" if point is None else common.fmt(point[metric]["mean"], 2)


def summary_markdown(data: dict) -> str:
    marks = [s for s in MARK_STEPS if s <= data["settings"]["steps"]]
    last = data["settings"]["steps"]
    if last not in marks:
        marks.append(last)
    header = ["model", "task", "saturated at step (per seed)", "mean [min, max]",
              *[f"validity @{s}" for s in marks], f"accuracy @{last}"]
    rows = []
    for cell in data["cells"]:
        s = cell["saturation"]
        per_seed = ", ".join("-" if v is None else str(v) for v in s["steps"])
        span = ("not saturated" if s["mean"] is None else
                f"{s['mean']:.1f} [{s['min']}, {s['max']}] ({s['n_saturated']}/{s['n_seeds']} seeds)")
        rows.append([cell["model"], cell["task"], per_seed, span,
                     *[at_step(cell, m, "format_validity") for m in marks], at_step(cell, last, "accuracy")])
    rule = data["cells"][0]["runs"][0]["rule"] if data["cells"] else {"threshold": 0.95, "patience": 2}
    lines = [common.summary_head("(a) Format validity saturates early", data, data["wall_time_s"]),
             f"Soft prompt P = 10, batch 8, {last} steps, validity checked every {data['settings']['every']} "
             f"steps on {data['settings']['n_curve']} fixed validation items (all of them where the split is smaller); seeds "
             f"{', '.join(map(str, data['settings']['seeds']))}. Saturated: the first check with validity >= "
             f"{rule['threshold']} that the next {rule['patience']} checks do not beat (`tune.stopping`); "
             "'-' means it had not saturated by the last step. Validity and accuracy: mean over seeds. "
             "Step 0 is the untrained prompt (random vocabulary embeddings, no instruction).", "",
             common.md_table(header, rows), "", *[f"![{p}]({p})" for p in data["plots"]]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from spt_jax import tasks

    clock = common.Stopwatch()
    cells, reused = [], 0
    with common.results_folder(args.out, NAME + ("_quick" if args.quick else "")) as out:
        for model in args.models:
            lm = None  # loaded at its first run to tune, not at all when every run is kept
            for task_name in args.tasks:
                task = tasks.get_task(task_name)
                runs = []
                for seed in args.seeds:
                    key = run_key(args, model, task.name, seed)
                    path = kept_run_path(args, key)
                    tuned = None if args.no_reuse else kept_run(path, key)
                    if tuned is not None:
                        reused += 1
                        common.log(f"{model} / {task.name} / seed {seed}: reused the finished run in {path}")
                    else:
                        common.log(f"{model} / {task.name} / seed {seed}: tuning {args.steps} steps")
                        if lm is None:
                            lm = common.load(model)
                        tuned = tune_run(lm, task, args, seed)
                        keep_run(path, key, tuned)
                        common.log(f"  saturated at step {tuned['saturated_at_step']}, last validity "
                                   f"{tuned['curve'][-1]['format_validity']:.2f} ({tuned['wall_time_s']:.0f} s)")
                    runs.append(tuned)
                cells.append({"model": model, "task": task.name, "runs": runs, "mean_curve": mean_curve(runs),
                              "saturation": spread([r["saturated_at_step"] for r in runs])})
            del lm
        data = {**common.run_header(NAME, args), "cells": cells, "wall_time_s": clock.seconds,
                "reused_runs": reused}  # wall_time_s is this call's; each run keeps its own
        data["plots"] = []
        for model in args.models:
            name = f"saturation_{common.safe_name(model)}.png"
            plot(model, [c for c in cells if c["model"] == model], out / name)
            data["plots"].append(name)
        return common.finish(out, NAME, data, summary_markdown(data))


if __name__ == "__main__":
    common.main(lambda: run(parse_args()), NAME)
