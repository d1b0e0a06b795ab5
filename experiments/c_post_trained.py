"""(c) A post-trained model gains format compliance too: SmolLM2-135M-Instruct with and without its chat template.

For each task, the post-trained model is evaluated twice on the same seeded test items: with every
input as plain text, and with every input as one user turn of its own chat template
(`EvalConfig.chat_template`, the CLI's ``--chat-template``; the soft prompt precedes the turn and is
tuned on inputs in the same form). Each form runs zero-shot, k-shot and a soft prompt tuned for 80
steps at batch 8; the table puts the two forms side by side, with McNemar tests of the soft prompt
against each baseline within a form and of each mode across the forms. The format-free CF reference
(the knowledge a format cannot hide) runs once, on plain inputs.

    python experiments/c_post_trained.py            # SmolLM2-135M-Instruct, 3 tasks
    python experiments/c_post_trained.py --quick    # CI-sized
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "c_post_trained"
FORMS = ("plain", "chat")
FULL = dict(model="smollm2-135m-instruct", tasks=("capital_of", "element_symbols", "yes_no"), k=5, n_test=100, steps=80)
QUICK = dict(model="smollm2-135m-instruct", tasks=("capital_of",), k=5, n_test=8, steps=6)


def parse_args(argv=None):
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"a post-trained model with a chat template (default {FULL['model']})")
    p.add_argument("--tasks", type=common.names, help=f"comma-separated (default {','.join(FULL['tasks'])})")
    p.add_argument("--k", type=common.positive, help=f"few-shot demonstrations (default {FULL['k']})")
    p.add_argument("--n-test", type=common.positive, help=f"seeded sample of test items (default {FULL['n_test']})")
    p.add_argument("--steps", type=common.positive, help=f"soft-prompt tuning steps (default {FULL['steps']})")
    p.add_argument("--seed", type=common.nonnegative, default=0,
                   help="the test sample, demonstrations and prompt seed (default 0)")
    args = common.settings(p.parse_args(argv), FULL, QUICK)
    common.check_names(p, models=[args.model], tasks=args.tasks)
    return args


# --------------------------------------------------------------------------------------------------
# measuring


def evaluate_task(lm, task, args, runs_dir: Path, root: Path) -> dict:
    """Both forms of one task: the rows by form and mode, and the paired tests."""
    from spt_jax import evaluate, metrics, tune

    base = evaluate.EvalConfig(modes=("zero_shot", "few_shot", "soft_prompt"), k=args.k, n_test=args.n_test,
                               seed=args.seed, eval_every=0, tune=tune.TuneConfig(steps=args.steps, seed=args.seed))
    rows, items, runs = [], {}, {}
    for form in FORMS:
        common.log(f"  {form} inputs: zero-shot, {args.k}-shot, soft prompt ({args.steps} steps)")
        config = base.replace(chat_template=form == "chat", loglik=form == "plain", cloze=form == "plain")
        folder = runs_dir / form
        result = evaluate.evaluate(lm, task, config, folder, progress=False)
        predictions = common.read_predictions(folder)
        runs[form] = str(folder.relative_to(root))
        for row in result["results"]:
            rows.append({"form": form, "mode": row["mode"], "label": evaluate.mode_label(row),
                         "reference": row["reference"], "n": row["n"],
                         **{m: row[m] for m in ("format_validity", "accuracy", "knowledge_accuracy")},
                         "wall_time_s": row["wall_time_s"]})
            items[(form, row["mode"])] = predictions[row["mode"]]
    if len({tuple(r["index"] for r in v) for v in items.values()}) != 1:
        raise AssertionError(f"{task.name}: the forms evaluated different test items")

    valid = lambda rs: [bool(r["valid"]) for r in rs]  # noqa: E731
    tests = []
    pairs = [((f, "soft_prompt"), (f, other)) for f in FORMS for other in ("zero_shot", "few_shot")]
    pairs += [(("chat", m), ("plain", m)) for m in ("zero_shot", "few_shot", "soft_prompt")]
    for a, b in pairs:
        for metric, key in (("accuracy", common.hits), ("format_validity", valid)):
            tests.append({"mode_a": f"{a[0]}:{a[1]}", "mode_b": f"{b[0]}:{b[1]}", "metric": metric,
                          **metrics.mcnemar(key(items[a]), key(items[b]))})
    return {"task": task.name, "n": len(next(iter(items.values()))), "rows": rows, "tests": tests, "runs": runs}


# --------------------------------------------------------------------------------------------------
# writing


def side_by_side(cell: dict) -> list[list[str]]:
    """One line per mode: validity and accuracy plain, then in the chat template."""
    by = {(r["form"], r["mode"]): r for r in cell["rows"]}
    out = []
    for mode in dict.fromkeys(r["mode"] for r in cell["rows"]):
        line = [next(r["label"] for r in cell["rows"] if r["mode"] == mode)]
        for form in FORMS:
            r = by.get((form, mode))
            if r is None:
                line += ["-", "-", "-"]
            else:
                line += ["-" if r["reference"] else common.fmt_estimate(r["format_validity"]),
                         common.fmt_estimate(r["accuracy"]),
                         "-" if r["reference"] else common.fmt_estimate(r["knowledge_accuracy"])]
        out.append(line)
    return out


def plot(model: str, cells: list[dict], path: Path) -> None:
    plt = common.pyplot()
    modes = ("zero_shot", "few_shot", "soft_prompt")
    fig, axes = plt.subplots(2, len(cells), figsize=(max(6.0, 4.2 * len(cells)), 5.6), squeeze=False)
    for col, cell in enumerate(cells):
        by = {(r["form"], r["mode"]): r for r in cell["rows"]}
        labels = [next(r["label"] for r in cell["rows"] if r["mode"] == m) for m in modes]
        for row_i, metric in enumerate(("format_validity", "accuracy")):
            ax = axes[row_i][col]
            for j, (form, color) in enumerate(zip(FORMS, ("tab:blue", "tab:purple"))):
                est = [by[(form, m)][metric] for m in modes]
                xs = [i + (j - 0.5) * 0.38 for i in range(len(modes))]
                ax.bar(xs, [e["value"] for e in est], width=0.38, color=color, label=f"{form} input",
                       yerr=[[e["value"] - e["low"] for e in est], [e["high"] - e["value"] for e in est]], capsize=3)
            ax.set_xticks(range(len(modes)), labels, fontsize=8)
            ax.set_ylim(0, 1.05)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(metric.replace("_", " "))
            if row_i == 0:
                ax.set_title(f"{cell['task']} (n = {cell['n']})", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model}: plain input vs its chat template (95% Wilson intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_markdown(data: dict) -> str:
    s = data["settings"]
    lines = [common.summary_head("(c) A post-trained model with and without its chat template", data,
                                 data["wall_time_s"]),
             f"{s['model']}; {s['n_test']} seeded test items per task, the same in both forms; {s['k']}-shot; soft "
             f"prompt P = 10, {s['steps']} steps at batch 8 (tuned on inputs in the same form); 95% Wilson "
             "intervals. The CF reference runs on plain inputs only.", ""]
    for cell in data["cells"]:
        lines += [f"## {cell['task']} ({cell['n']} test items)", "",
                  common.md_table(["mode", "plain: validity", "plain: accuracy", "plain: knowledge acc.",
                                   "chat: validity", "chat: accuracy", "chat: knowledge acc."], side_by_side(cell)),
                  "", common.mcnemar_table(cell["tests"]), ""]
    lines += [f"![{p}]({p})" for p in data["plots"]]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from spt_jax import tasks

    clock = common.Stopwatch()
    cells = []
    with common.results_folder(args.out, NAME + ("_quick" if args.quick else "")) as out:
        lm = common.load(args.model)
        for task_name in args.tasks:
            task = tasks.get_task(task_name)
            common.log(f"{args.model} / {task.name}")
            cells.append(evaluate_task(lm, task, args, out / "runs" / common.safe_name(task.name), out))
        data = {**common.run_header(NAME, args), "cells": cells, "wall_time_s": clock.seconds,
                "plots": [f"post_trained_{common.safe_name(args.model)}.png"]}
        plot(args.model, cells, out / data["plots"][0])
        return common.finish(out, NAME, data, summary_markdown(data))


if __name__ == "__main__":
    common.main(lambda: run(parse_args()), NAME)
