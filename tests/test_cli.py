"""The ``spt-jax`` command: in-process ``main([...])`` runs on a tiny model, and every kind of bad input
ending as ONE stderr line with exit status 2 (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spt_jax import cli
from spt_jax import evaluate as ev
from test_evaluate import make_tiny_lm, toy_records

# --------------------------------------------------------------------------------------------------
# a task file over JSONL data, the way a user adds a task


def write_task(directory: Path, *, name="toy_file", records=None, edit=None, n_train=12) -> Path:
    """toy_file.yaml + {train,validation,test}.jsonl in ``directory``; ``edit`` changes the spec."""
    records = records or {"train": toy_records(n_train), "validation": toy_records(6, 100),
                          "test": toy_records(10, 200)}
    for split, rows in records.items():
        text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
        (directory / f"{split}.jsonl").write_text(text)
    spec = {
        "name": name,
        "description": "tiny sums from a file",
        "instruction": "Say A: X.",
        "input_template": "Q: {question}\n{choices_text}\n",
        "target_template": "A: {answer}",
        "choices_field": "choices",
        "max_new_tokens": 4,
        "format": {"pattern": "A: (?P<answer>[AB])", "mode": "strict", "stop_sequences": ["\n"]},
        "answer": {"kind": "choice"},
        "source": {"type": "jsonl", "path": "{split}.jsonl"},
    }
    if edit:
        edit(spec)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def tiny_model():
    return make_tiny_lm()


@pytest.fixture
def fake_load(monkeypatch, tiny_model):
    """cli.load_model returns the tiny model for any name and records what was asked for."""
    asked = []

    def load_model(name, *, dtype="float32", log=None):
        asked.append((name, dtype))
        return tiny_model

    monkeypatch.setattr(cli, "load_model", load_model)
    return asked


TINY = ["--n-test", "4", "--k", "1", "--steps", "2", "--tune-batch-size", "2", "--prompt-length", "2",
        "--eval-every", "1", "--n-curve", "3", "--batch-size", "4", "--quiet"]


def only_dir(parent: Path) -> Path:
    (child,) = [p for p in parent.iterdir() if p.is_dir()]
    return child


# --------------------------------------------------------------------------------------------------
# commands that work


def test_run_writes_a_timestamped_dir_and_prints_the_table(tmp_path, fake_load, capsys):
    task = write_task(tmp_path)
    out = tmp_path / "results"
    assert cli.main(["run", "--model", "tiny", "--task", str(task), "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    assert fake_load == [("tiny", "float32")]
    run_dir = only_dir(out)
    assert run_dir.name.endswith("_tiny_toy_file_run")
    results = json.loads((run_dir / ev.RESULTS_FILE).read_text())
    assert [r["mode"] for r in results["results"]] == ["zero_shot", "few_shot", "soft_prompt", "loglik"]
    assert results["n"] == 4 and results["tuning"]["steps"] == 2
    assert [p["step"] for p in results["tuning"]["curve"]] == [0, 1, 2]
    assert "| mode | n | format validity" in captured.out and "1-shot" in captured.out
    assert str(run_dir) in captured.out
    assert captured.err == ""  # --quiet: no log lines, no progress bars
    # a second identical run goes to a new directory; the first is untouched
    before = (run_dir / ev.RESULTS_FILE).read_text()
    assert cli.main(["run", "--model", "tiny", "--task", str(task), "--out", str(out), *TINY,
                     "--modes", "zero_shot", "--no-loglik"]) == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 2
    assert (run_dir / ev.RESULTS_FILE).read_text() == before


def test_named_dir_needs_overwrite(tmp_path, fake_load, capsys):
    task = write_task(tmp_path)
    args = ["eval", "--model", "tiny", "--task", str(task), "--out", str(tmp_path / "r"), "--name", "fixed",
            "--modes", "zero_shot", "--n-test", "3", "--quiet", "--no-loglik"]
    assert cli.main(args) == 0
    first = (tmp_path / "r" / "fixed" / ev.RESULTS_FILE).read_text()
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds results" in err and "--overwrite" in err
    assert (tmp_path / "r" / "fixed" / ev.RESULTS_FILE).read_text() == first
    assert cli.main([*args, "--overwrite"]) == 0


def test_tune_then_eval_with_the_saved_prompt(tmp_path, fake_load, capsys):
    task = write_task(tmp_path)
    assert cli.main(["tune", "--model", "tiny", "--task", str(task), "--out", str(tmp_path / "t"), "--name", "p",
                     "--steps", "2", "--tune-batch-size", "2", "--prompt-length", "2", "--eval-every", "1",
                     "--n-curve", "3", "--quiet"]) == 0
    prompt = tmp_path / "t" / "p" / ev.PROMPT_FILE
    summary = json.loads((tmp_path / "t" / "p" / ev.TUNING_FILE).read_text())
    assert prompt.is_file() and summary["steps"] == 2 and [p["step"] for p in summary["curve"]] == [0, 1, 2]
    assert (tmp_path / "t" / "p" / "tuning_curve.png").is_file()
    assert str(prompt) in capsys.readouterr().out
    assert cli.main(["eval", "--model", "tiny", "--task", str(task), "--out", str(tmp_path / "e"),
                     "--prompt", str(prompt), "--n-test", "3", "--k", "1", "--quiet"]) == 0
    results = json.loads((only_dir(tmp_path / "e") / ev.RESULTS_FILE).read_text())
    assert [r["mode"] for r in results["results"]] == ["zero_shot", "few_shot", "soft_prompt", "loglik"]
    assert results["tuning"]["source"] == str(prompt)


def test_compare_command(tmp_path, fake_load, capsys):
    task = write_task(tmp_path)
    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump({
        "tasks": [str(task)],
        "models": ["a", {"name": "b", "base": "a"}],
        "eval": {"modes": ["zero_shot", "few_shot"], "k": 1, "n_test": 3, "loglik": False},
    }))
    assert cli.main(["compare", str(config), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "## toy_file" in out and "Rank correlations" in out
    assert (only_dir(tmp_path / "c") / ev.COMPARE_FILE).is_file()
    assert [name for name, _ in fake_load] == ["a", "b"]


def test_tasks_and_models_lists(capsys):
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("capitals_mc", "element_symbols", "arithmetic_gsm", "yes_no"):
        assert name in out
    assert "World, U.S. state" in out  # descriptions are shown
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "smollm2-135m-instruct" in out and "installed" in out


def test_tasks_as_a_subprocess():
    script = Path(sys.executable).with_name("spt-jax")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "spt_jax.cli"]
    done = subprocess.run([*command, "tasks"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "capitals_mc" in done.stdout and "yes_no" in done.stdout
    bad = subprocess.run([*command, "tasks", "--bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_no_arguments_means_run_with_the_defaults(monkeypatch):
    seen = {}

    def fake_run(args):
        seen.update(vars(args))
        return 0

    monkeypatch.setitem(cli.COMMANDS, "run", fake_run)
    assert cli.main([]) == 0
    assert seen["command"] == "run" and seen["model"] == cli.DEFAULT_MODEL == "gemma3-270m"
    assert seen["task"] == cli.DEFAULT_TASK and seen["modes"] == ("zero_shot", "few_shot", "soft_prompt")
    assert seen["n_test"] == cli.DEFAULT_N_TEST and seen["steps"] is None and seen["k"] == 5
    assert cli.main(["run", "--n-test", "all", "--modes", "soft-prompt,zero_shot"]) == 0
    assert seen["n_test"] is None and seen["modes"] == ("soft_prompt", "zero_shot")


# --------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 2


def _bad_task(edit=None, records=None, n_train=12):
    def make(directory):
        return write_task(directory, edit=edit, records=records, n_train=n_train)

    return make


def _good_records(**overrides):
    records = {"train": toy_records(12), "validation": toy_records(6, 100), "test": toy_records(10, 200)}
    records.update(overrides)
    return records


def _set(path, value):
    def edit(spec):
        *parents, last = path.split(".")
        target = spec
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


BAD_TASKS = {
    "malformed JSONL": (_bad_task(records=_good_records(test='{"id": "a"}\n{"id": "b"}\n{"id": oops\n')),
                        [r"test\.jsonl, line 3", "malformed JSON"]),
    "record missing a field": (
        _bad_task(records=_good_records(test=[{"id": "q1", "question": "1+1?", "choices": ["2", "3"]}])),
        ["gold field 'answer' is missing", "test[0]", "q1"]),
    "placeholder with no data": (_bad_task(edit=_set("input_template", "Q: {question} ({topic})\n")),
                                 ["{topic}"]),
    "empty split": (_bad_task(records=_good_records(test=[])), ["split 'test' is empty"]),
    "k larger than train": (_bad_task(n_train=3), ["5-shot needs 5 train records", "only 3"]),
    "bad regex": (_bad_task(edit=_set("format.pattern", "A: (?P<answer>[AB]")), ["does not compile"]),
    "unexpected answer type": (
        _bad_task(records=_good_records(test=[{"id": "q1", "question": "1+1?", "choices": ["2", "3"],
                                                "answer": 7}])),
        ["gold field 'answer'", "expected a choice"]),
    "unknown task field": (_bad_task(edit=_set("instructoin", "x")), ["unknown field 'instructoin'",
                                                                         "did you mean 'instruction'"]),
}


def _assert_one_line_exit_2(capsys, argv, *expected):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.count("\n") == 1 and captured.err.startswith("spt-jax: error: "), captured.err
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in captured.err, (text, captured.err)
    return captured.err


@pytest.mark.parametrize("case", list(BAD_TASKS))
def test_bad_task_data_is_one_line_and_exit_2(case, tmp_path, fake_load, capsys):
    import re

    make, patterns = BAD_TASKS[case]
    task = make(tmp_path)
    code = cli.main(["run", "--model", "tiny", "--task", str(task), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert re.search(pattern, err) or pattern in err, (pattern, err)
    assert fake_load == []  # the model is never loaded for bad data
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize("argv, expected", [
    (["run", "--task", "capitals_mx"], ["unknown task 'capitals_mx'", "did you mean 'capitals_mc'"]),
    (["eval", "--task", "yes_no", "--modes", "zero_shot", "--model", "gemma3-27m"],
     ["gemma3-27m", "did you mean 'gemma3-270m'"]),
    (["run", "--modes", "zero_shot,soft_promt"], ["unknown mode 'soft_promt'", "did you mean 'soft_prompt'"]),
    (["run", "--n-test", "-3"], ["--n-test", "positive integer"]),
    (["run", "--steps", "many"], ["--steps", "integer"]),
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["fly"], ["invalid choice: 'fly'"]),
    (["eval", "--task", "yes_no", "--modes", "soft_prompt"], ["needs --prompt"]),
    (["eval", "--task", "yes_no", "--prompt", "no/such/prompt.safetensors"], ["does not exist"]),
    (["compare", "no_such_config.yaml"], ["no_such_config.yaml does not exist"]),
    (["run", "--task", "no/such/task.yaml"], ["does not exist"]),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    _assert_one_line_exit_2(capsys, [*argv, *(["--out", str(tmp_path)] if argv[0] in ("run", "eval") else [])],
                            *expected)


def test_bad_compare_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": ["gemma3-270m"], "tasks": ["yes_no"], "eval": {"n_tset": 3}}))
    _assert_one_line_exit_2(capsys, ["compare", str(config), "--out", str(tmp_path)], "eval.n_tset",
                            "did you mean 'n_test'")
    config.write_text("models: [a\n")
    _assert_one_line_exit_2(capsys, ["compare", str(config), "--out", str(tmp_path)], "malformed YAML")


def test_prompt_for_another_model_is_refused(tmp_path, fake_load, capsys):
    from spt_jax.tune import save_prompt

    prompt = tmp_path / "p.safetensors"
    save_prompt(prompt, [[0.0] * 16] * 2, {"model": "other", "d_model": 16})
    task = write_task(tmp_path)
    _assert_one_line_exit_2(capsys, ["eval", "--model", "tiny", "--task", str(task), "--prompt", str(prompt),
                                     "--out", str(tmp_path / "e"), "--quiet", "--n-test", "2"], "d_model")


def test_usage_help_still_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "run" in capsys.readouterr().out
