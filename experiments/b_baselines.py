"""(b) Soft prompt vs zero- and few-shot prompting, with intervals, paired tests and format-free references.

For every model x task, on one seeded sample of test items: zero-shot, few-shot with k = 1, 3, 5
(the shared form: the instruction and k seeded train demonstrations) and a soft prompt tuned for
80 steps at batch 8, each scored by generation (format validity, accuracy, knowledge accuracy with
95% Wilson intervals), beside the format-free references the task has: MCF (the letter after the
lettered list) on multiple-choice tasks, CF (each choice's text as the continuation) where the task
has a cloze form. McNemar tests pair every two generation modes on the same items (the soft prompt
against each baseline, and each k-shot against zero-shot), on accuracy and on format validity.

Each evaluation is a library `evaluate.evaluate` run in its own folder under ``runs/`` (results.json,
predictions.jsonl, plots); the paired tests across runs read their predictions.

    python experiments/b_baselines.py            # both embedded models x 4 built-in tasks
    python experiments/b_baselines.py --quick    # CI-sized
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "b_baselines"
FULL = dict(models=common.EMBEDDED, tasks=("capital_of", "capitals_mc", "element_symbols", "yes_no"), ks=(1, 3, 5),
            n_test=60, steps=80)
QUICK = dict(models=("smollm2-135m-instruct",), tasks=("capital_of",), ks=(1, 3, 5), n_test=8, steps=6)


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", type=common.names, help=f"comma-separated (default {','.join(FULL['models'])})")
    p.add_argument("--tasks", type=common.names, help=f"comma-separated (default {','.join(FULL['tasks'])}; "
                                                      "'builtin' for every built-in task)")
    p.add_argument("--ks", type=common.ints, help="few-shot k values (default 1,3,5)")
    p.add_argument("--n-test", type=common.positive, help=f"seeded sample of test items (default {FULL['n_test']})")
    p.add_argument("--steps", type=common.positive, help=f"soft-prompt tuning steps (default {FULL['steps']})")
    p.add_argument("--seed", type=common.nonnegative, default=0,
                   help="the test sample, demonstrations and prompt seed (default 0)")
    args = common.settings(p.parse_args(argv), FULL, QUICK)
    if args.tasks == ("builtin",):
        from spt_jax import tasks

        args.tasks = tuple(tasks.builtin_task_names())
    if 0 in args.ks or len(set(args.ks)) != len(args.ks):
        p.error(f"--ks must be distinct k >= 1 (zero-shot always runs), got {args.ks}")
    args.ks = tuple(sorted(args.ks))
    common.check_names(p, models=args.models, tasks=args.tasks)
    return args


# --------------------------------------------------------------------------------------------------
# measuring


def evaluate_cell(lm, task, args, runs_dir: Path, root: Path) -> dict:
    """Every mode of one model x task: the main run (zero-shot, the largest k, soft prompt and the
    references), then one few-shot run per smaller k on the same items; rows and paired tests."""
    from spt_jax import evaluate, tune

    base = evaluate.EvalConfig(modes=("zero_shot", "few_shot", "soft_prompt"), k=args.ks[-1], n_test=args.n_test,
                               seed=args.seed, eval_every=0, tune=tune.TuneConfig(steps=args.steps, seed=args.seed))
    folders = {"main": runs_dir / "main"}
    common.log(f"  zero-shot, {args.ks[-1]}-shot, soft prompt ({args.steps} steps) and references")
    results = [evaluate.evaluate(lm, task, base, folders["main"], progress=False)]
    for k in args.ks[:-1]:
        common.log(f"  {k}-shot")
        folders[f"{k}-shot"] = runs_dir / f"{k}-shot"
        config = base.replace(modes=("few_shot",), k=k, loglik=False, cloze=False)
        results.append(evaluate.evaluate(lm, task, config, folders[f"{k}-shot"], progress=False))

    rows, per_item = [], {}
    for result, folder in zip(results, folders.values()):
        predictions = common.read_predictions(folder)
        for row in result["results"]:
            label = evaluate.mode_label(row)
            rows.append({"label": label, "mode": row["mode"], "k": row.get("k") if row["mode"] == "few_shot" else None,
                         "reference": row["reference"], "n": row["n"],
                         **{m: row[m] for m in ("format_validity", "accuracy", "knowledge_accuracy")},
                         "wall_time_s": row["wall_time_s"], "run": str(folder.relative_to(root))})
            per_item[label] = predictions[row["mode"]]
    order = {"zero_shot": 0, "few_shot": 1, "soft_prompt": 2}
    rows.sort(key=lambda r: (r["reference"], order.get(r["mode"], 3), r["k"] or 0))  # zero, k = 1, 3, 5, soft, refs
    indices = {label: [r["index"] for r in items] for label, items in per_item.items()}
    first = next(iter(indices.values()))
    if any(ix != first for ix in indices.values()):  # the paired tests need the same items in every run
        raise AssertionError(f"{task.name}: the runs evaluated different test items")
    return {"task": task.name, "n": len(first), "rows": rows, "tests": paired_tests(rows, per_item),
            "runs": {name: str(f.relative_to(root)) for name, f in folders.items()}}


def paired_tests(rows, per_item) -> list[dict]:
    """McNemar on accuracy and validity: the soft prompt against every baseline, each k-shot against zero-shot."""
    from spt_jax import metrics

    generation = [r["label"] for r in rows if not r["reference"]]
    soft = next(r["label"] for r in rows if r["mode"] == "soft_prompt")
    zero = next(r["label"] for r in rows if r["mode"] == "zero_shot")
    pairs = [(soft, other) for other in generation if other != soft]
    pairs += [(few, zero) for few in generation if few not in (soft, zero)]
    out = []
    for a, b in pairs:
        for metric, key in (("accuracy", common.hits), ("format_validity", lambda rs: [bool(r["valid"]) for r in rs])):
            out.append({"mode_a": a, "mode_b": b, "metric": metric,  # mcnemar's own "b", "c": discordant counts
                        **metrics.mcnemar(key(per_item[a]), key(per_item[b]))})
    return out


# --------------------------------------------------------------------------------------------------
# writing


def plot(model: str, cells: list[dict], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, len(cells), figsize=(max(6.0, 4.4 * len(cells)), 6.2), squeeze=False)
    for col, cell in enumerate(cells):
        for row_i, metric in enumerate(("format_validity", "accuracy")):
            ax = axes[row_i][col]
            shown = [r for r in cell["rows"] if metric == "accuracy" or not r["reference"]]
            values = [r[metric]["value"] for r in shown]
            low = [v - r[metric]["low"] for v, r in zip(values, shown)]
            high = [r[metric]["high"] - v for v, r in zip(values, shown)]
            colors = ["tab:gray" if r["reference"] else "tab:green" if r["mode"] == "soft_prompt" else "tab:blue"
                      for r in shown]
            ax.bar(range(len(shown)), values, yerr=[low, high], color=colors, capsize=3)
            ax.set_xticks(range(len(shown)), [r["label"].replace(" (ref.)", "\n(ref.)") for r in shown],
                          rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(metric.replace("_", " "))
            if row_i == 0:
                ax.set_title(f"{cell['task']} (n = {cell['n']})", fontsize=10)
    fig.suptitle(f"{model}: zero-/few-shot vs soft prompt (95% Wilson intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overview(cells: list[dict]) -> str:
    """One row per model x task: validity / accuracy per generation mode, the references' accuracy,
    and the soft prompt's McNemar p (accuracy) against zero-shot and the largest k."""
    labels = list(dict.fromkeys(r["label"] for c in cells for r in c["rows"] if not r["reference"]))
    refs = list(dict.fromkeys(r["label"] for c in cells for r in c["rows"] if r["reference"]))
    header = ["model", "task", *[f"{label}: validity / acc." for label in labels], *refs,
              "p soft vs zero-shot", "p soft vs largest k"]
    rows = []
    for cell in cells:
        by = {r["label"]: r for r in cell["rows"]}
        soft = next(r["label"] for r in cell["rows"] if r["mode"] == "soft_prompt")
        top_k = max((r for r in cell["rows"] if r["mode"] == "few_shot"), key=lambda r: r["k"])["label"]
        p = {t["mode_b"]: t["p_value"] for t in cell["tests"] if t["mode_a"] == soft and t["metric"] == "accuracy"}
        rows.append([cell["model"], cell["task"],
                     *[f"{common.fmt(by[l]['format_validity']['value'], 2)} / {common.fmt(by[l]['accuracy']['value'], 2)}"
                       if l in by else "-" for l in labels],
                     *[common.fmt(by[l]["accuracy"]["value"], 2) if l in by else "-" for l in refs],
                     common.fmt_p(p.get("zero-shot")), common.fmt_p(p.get(top_k))])
    return common.md_table(header, rows)


def summary_markdown(data: dict) -> str:
    lines = [common.summary_head("(b) Soft prompt vs zero- and few-shot prompting", data, data["wall_time_s"]),
             f"{data['settings']['n_test']} seeded test items per task (the same items in every mode); "
             f"soft prompt P = 10, {data['settings']['steps']} steps at batch 8; intervals: 95% Wilson; "
             "knowledge accuracy = correct among valid. References need no output format.", "",
             overview(data["cells"]), ""]
    for cell in data["cells"]:
        lines += [f"## {cell['model']} on {cell['task']} ({cell['n']} test items)", ""]
        lines.append(common.md_table(
            ["mode", "format validity", "accuracy", "knowledge accuracy", "time"],
            [[r["label"], "-" if r["reference"] else common.fmt_estimate(r["format_validity"]),
              common.fmt_estimate(r["accuracy"]), "-" if r["reference"] else common.fmt_estimate(r["knowledge_accuracy"]),
              common.fmt_seconds(r["wall_time_s"])] for r in cell["rows"]]))
        lines += ["", common.mcnemar_table(cell["tests"]), ""]
    lines += [f"![{p}]({p})" for p in data["plots"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from spt_jax import tasks

    clock = common.Stopwatch()
    cells = []
    with common.results_folder(args.out, NAME + ("_quick" if args.quick else "")) as out:
        for model in args.models:
            lm = common.load(model)
            for task_name in args.tasks:
                task = tasks.get_task(task_name)
                common.log(f"{model} / {task.name}")
                runs_dir = out / "runs" / common.safe_name(model) / common.safe_name(task.name)
                cell = evaluate_cell(lm, task, args, runs_dir, out)
                cells.append({"model": model, **cell})
            del lm
        data = {**common.run_header(NAME, args), "cells": cells, "wall_time_s": clock.seconds, "plots": []}
        for model in args.models:
            name = f"baselines_{common.safe_name(model)}.png"
            plot(model, [c for c in cells if c["model"] == model], out / name)
            data["plots"].append(name)
        return common.finish(out, NAME, data, summary_markdown(data))


if __name__ == "__main__":
    common.main(lambda: run(parse_args()), NAME)
