"""The experiment scripts' ``--quick`` runs and the quickstart notebook, end to end.

Each script runs as a subprocess into ``tmp_path``, as a user runs it (real embedded model, so these
are ``slow``); the checks read what it wrote: one complete timestamped folder, the JSON fields, real
PNG plots, and one summary table row per measured cell. The notebook runs in a kernel through
nbclient with its tiny settings (``SPT_QUICKSTART_TINY=1``). The cheap tests check the command-line
contract (bad names exit 2 with one line and write nothing) and that only the public API is used.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
SCRIPTS = ("a_saturation.py", "b_baselines.py", "c_post_trained.py", "e_cost.py")
PUBLIC = {"evaluate", "models", "tasks", "tune", "metrics", "errors"}
PNG = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 900


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=os.environ.copy())


def quick_run(script: str, tmp_path: Path) -> tuple[Path, dict, str]:
    """Run ``script --quick`` into tmp_path: its one results folder, its JSON and its summary."""
    done = run_script(script, "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-6000:]
    folders = list(tmp_path.iterdir())
    visible = [p for p in folders if not p.name.startswith(".")]
    assert len(visible) == 1 and visible[0].is_dir(), folders
    folder = visible[0]
    assert re.fullmatch(r"\d{8}-\d{6}_" + re.escape(script[:-3]) + "_quick", folder.name), folder.name
    assert f"results: {folder}" in done.stdout
    data = json.loads((folder / f"{script[:-3]}.json").read_text(encoding="utf-8"))
    assert data["experiment"] == script[:-3] and data["quick"] is True
    assert data["machine_line"].startswith("MACHINE cpu=") and data["wall_time_s"] > 0
    assert data["plots"]
    for name in data["plots"]:
        assert (folder / name).read_bytes()[:8] == PNG, name
    summary = (folder / "summary.md").read_text(encoding="utf-8")
    assert data["machine_line"] in summary
    return folder, data, summary


def table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """The body rows of every markdown table whose first header cell is ``first_header``."""
    rows, inside = [], False
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
        elif cells[0] == first_header:
            inside = True
        elif inside and not set(line) <= set("|-"):
            rows.append(cells)
    return rows


def check_estimate(estimate: dict) -> None:
    assert 0.0 <= estimate["low"] <= estimate["value"] <= estimate["high"] <= 1.0, estimate


# --------------------------------------------------------------------------------------------------
# cheap: the command-line contract and the public API


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("bad", ["task", "model"])
def test_bad_names_exit_2_with_one_line_and_write_nothing(script, bad, tmp_path):
    task_flag = "--task" if script == "e_cost.py" else "--tasks"
    model_flag = "--model" if script == "c_post_trained.py" else "--models"
    flag, value = (task_flag, "no_such_task") if bad == "task" else (model_flag, "no-such-model")
    done = run_script(script, "--quick", "--out", str(tmp_path / "out"), flag, value)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert value in lines[-1] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_scripts_and_notebook_use_only_the_public_api():
    sources = {name: (EXPERIMENTS / name).read_text(encoding="utf-8") for name in (*SCRIPTS, "common.py")}
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    sources["quickstart.ipynb"] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for name, text in sources.items():
        deep = re.findall(r"(?:from|import) spt_jax\.(\w+)", text)
        assert set(deep) <= {"errors"}, f"{name} imports spt_jax internals: {deep}"
        for imported in re.findall(r"from spt_jax import ([\w, ]+)", text):
            names = {n.split(" as ")[0].strip() for n in imported.split(",")}
            assert names <= PUBLIC | ({"generate", "report"} if name.endswith(".ipynb") else set()), (name, names)


def test_notebook_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:1]


def import_experiment(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXPERIMENTS))


def test_a_saturation_reuses_a_kept_run_only_with_the_same_settings(tmp_path):
    a = import_experiment("a_saturation")
    args = a.parse_args(["--quick", "--out", str(tmp_path)])
    key = a.run_key(args, "smollm2-135m-instruct", "capital_of", 1)
    path = a.kept_run_path(args, key)
    assert a.kept_run(path, key) is None  # nothing kept yet
    run = {"seed": 1, "saturated_at_step": None, "curve": [{"step": 0, "format_validity": 0.5}]}
    a.keep_run(path, key, run)
    assert path.parent.parent.name == a.RUNS_DIR and [p.name for p in path.parent.iterdir()] == [path.name]
    assert a.kept_run(path, key) == run
    assert a.kept_run(path, {**key, "steps": key["steps"] + 1}) is None  # other settings: tuned anew
    path.write_text("{not json", encoding="utf-8")
    assert a.kept_run(path, key) is None  # a damaged file is tuned anew, not an error


def test_the_full_a_run_kept_in_the_repository_is_complete_and_reused_by_the_default_settings():
    a = import_experiment("a_saturation")
    args = a.parse_args(["--out", str(EXPERIMENTS / "full-runs")])
    for model in args.models:
        for task in args.tasks:
            for seed in args.seeds:  # a changed default or version would make the kept runs stale
                key = a.run_key(args, model, task, seed)
                run = a.kept_run(a.kept_run_path(args, key), key)
                assert run is not None and run["seed"] == seed, key
                assert [p["step"] for p in run["curve"]] == list(range(0, args.steps + 1, args.every))


def test_b_baselines_builtin_means_every_built_in_task():
    from spt_jax import tasks

    b = import_experiment("b_baselines")
    names = b.parse_args(["--tasks", "builtin"]).tasks
    assert sorted(names) == sorted(["capitals_mc", "capital_of", "country_of_capital", "capital_of_options", "continent_of",
                                    "element_symbols", "arithmetic_gsm", "yes_no"])  # no benchmark
    assert names == tuple(tasks.builtin_task_names())


# --------------------------------------------------------------------------------------------------
# slow: the quick runs


@pytest.mark.slow
def test_a_saturation_quick(tmp_path):
    _, data, summary = quick_run("a_saturation.py", tmp_path)
    s = data["settings"]
    assert (s["models"], s["tasks"], s["seeds"], s["steps"], s["every"]) == (
        ["smollm2-135m-instruct"], ["capital_of"], [0, 1], 10, 5)
    assert len(data["cells"]) == 1
    cell = data["cells"][0]
    assert [r["seed"] for r in cell["runs"]] == [0, 1]
    for run in cell["runs"]:
        assert [p["step"] for p in run["curve"]] == [0, 5, 10]
        assert all(p["n"] == s["n_curve"] and 0 <= p["format_validity"] <= 1 and 0 <= p["accuracy"] <= p["format_validity"]
                   for p in run["curve"])
        assert run["saturated_at_step"] in (None, 0, 5, 10)
    spread = cell["saturation"]
    assert spread["steps"] == [r["saturated_at_step"] for r in cell["runs"]] and spread["n_seeds"] == 2
    assert [p["step"] for p in cell["mean_curve"]] == [0, 5, 10]
    rows = table_rows(summary, "model")
    assert len(rows) == 1 and rows[0][:2] == ["smollm2-135m-instruct", "capital_of"]
    assert rows[0][2] == ", ".join("-" if v is None else str(v) for v in spread["steps"])
    assert data["reused_runs"] == 0

    # Started again into the same --out, it reuses both finished runs (no model load, no tuning) and
    # writes a second folder with the same curves; --no-reuse would tune them anew.
    again = run_script("a_saturation.py", "--quick", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-6000:]
    assert again.stderr.count("reused the finished run") == 2 and "loaded smollm2" not in again.stderr
    second = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))[-1]
    redo = json.loads((second / "a_saturation.json").read_text(encoding="utf-8"))
    assert redo["reused_runs"] == 2 and redo["cells"][0]["runs"] == cell["runs"]


@pytest.mark.slow
def test_b_baselines_quick(tmp_path):
    folder, data, summary = quick_run("b_baselines.py", tmp_path)
    assert len(data["cells"]) == 1
    cell = data["cells"][0]
    labels = [r["label"] for r in cell["rows"]]
    generation = ["zero-shot", "1-shot", "3-shot", "5-shot", "soft prompt (6 steps)"]
    assert [r["label"] for r in cell["rows"] if not r["reference"]] == generation
    assert {r["mode"] for r in cell["rows"] if r["reference"]} == {"cloze", "cloze_norm"}  # capital_of's CF form
    for row in cell["rows"]:
        assert row["n"] == cell["n"] == 8
        check_estimate(row["accuracy"])
        if not row["reference"]:
            check_estimate(row["format_validity"])
    # the soft prompt against every baseline, each k-shot against zero-shot, on accuracy and validity
    pairs = {(t["mode_a"], t["mode_b"], t["metric"]) for t in cell["tests"]}
    expected = {("soft prompt (6 steps)", b) for b in ("zero-shot", "1-shot", "3-shot", "5-shot")}
    expected |= {(k, "zero-shot") for k in ("1-shot", "3-shot", "5-shot")}
    assert pairs == {(a, b, m) for a, b in expected for m in ("accuracy", "format_validity")}
    assert all(0.0 <= t["p_value"] <= 1.0 and t["n"] == 8 for t in cell["tests"])
    for run in cell["runs"].values():
        assert (folder / run / "results.json").is_file() and (folder / run / "predictions.jsonl").is_file()
    assert [r[0] for r in table_rows(summary, "mode")] == labels
    assert len(table_rows(summary, "McNemar")) == len(cell["tests"])


@pytest.mark.slow
def test_c_post_trained_quick(tmp_path):
    _, data, summary = quick_run("c_post_trained.py", tmp_path)
    cell = data["cells"][0]
    by_form = {form: [r["mode"] for r in cell["rows"] if r["form"] == form] for form in ("plain", "chat")}
    assert by_form == {"plain": ["zero_shot", "few_shot", "soft_prompt", "cloze", "cloze_norm"],
                       "chat": ["zero_shot", "few_shot", "soft_prompt"]}
    assert len(cell["tests"]) == 14 and all(t["n"] == cell["n"] == 8 for t in cell["tests"])
    assert {t["mode_a"] for t in cell["tests"]} >= {"plain:soft_prompt", "chat:soft_prompt", "chat:zero_shot"}
    rows = table_rows(summary, "mode")
    assert len(rows) == 5 and all(len(r) == 7 for r in rows)
    assert rows[3][4:] == ["-", "-", "-"]  # the CF reference runs on plain inputs only


@pytest.mark.slow
def test_e_cost_quick(tmp_path):
    _, data, summary = quick_run("e_cost.py", tmp_path)
    rows = {r["method"]: r for r in data["rows"]}
    spt, sft = rows["soft_prompt"], rows["full_sft"]
    assert spt["trained_params"] == 10 * spt["d_model"]
    assert sft["trained_params"] == sft["n_params"] == spt["n_params"]
    for r in (spt, sft):
        assert len(r["step_times_s"]) == 2 and r["timed_steps_compiled"] == 0 and r["median_step_s"] > 0
        assert r["losses"][-1] < r["losses"][0], r["losses"]  # both really train
        # the kernel's peak (getrusage) can trail /proc's RSS read after loading by a few pages when
        # training adds next to nothing (the soft prompt's packed head at this tiny size)
        assert r["peak_process_mib"] > r["rss_after_load_mib"] - 1 and r["rss_after_load_mib"] > 100
        B, T, R = r["batch"]
        f = r["flops_per_step"]  # the rows' shared prefix (BOS if any, then any prompt slots) runs once
        assert f["tokens"] == r["prefix_slots"] + B * (T - r["prefix_slots"]) and 0 < f["N"] < r["n_params"]
    assert spt["batch"][1] >= sft["batch"][1]  # the soft prompt's rows carry its P slots
    assert spt["prefix_slots"] == sft["prefix_slots"] + 10
    recompute = 2 if spt["remat_resolved"] == "full" else 0  # remat "full" runs each layer's forward twice
    for r, body, head in ((sft, 6, 6), (spt, 4 + recompute, 4)):  # the documented formulas
        S, R = r["flops_per_step"]["tokens"], r["batch"][2]  # R: the head's rows
        assert r["flops_per_step"]["flops"] == body * r["flops_per_step"]["N"] * S + head * r["d_model"] * r["vocab_size"] * R
    assert len(table_rows(summary, "model")) == 2 + 1  # the main table's two rows, then the ratio row


# --------------------------------------------------------------------------------------------------
# slow: the notebook


@pytest.mark.slow
def test_quickstart_notebook_runs_on_tiny_settings(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("SPT_QUICKSTART_TINY", "1")  # the kernel inherits the environment
    NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = {cell["id"]: "".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
            if cell["cell_type"] == "code"}
    assert "capital_of" in text["imports"]
    assert "required output: 'Answer: " in text["load"]
    for label in ("zero-shot", "5-shot", "soft prompt (4 steps)"):
        assert f"| {label} | 6 |" in text["evaluate"], text["evaluate"]
    images = [o for cell in notebook.cells if cell["id"] == "plots" for o in cell["outputs"]]
    assert len(images) == 2 and all("image/png" in o.get("data", {}) for o in images)
    assert "(10, 576) capital_of 4" in text["reuse"]  # the prompt file round-trips: P x d_model, task, steps
