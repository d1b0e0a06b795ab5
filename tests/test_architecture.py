"""The structure the code promises (docs/architecture.md): imports run one way, each concept has
one owner, no module-level caches, and a new mode or metric is one declaration."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import spt_jax
from spt_jax import cli, metrics, report
from spt_jax import evaluate as ev
from spt_jax.evaluate.config import TUNE_SHORTCUTS, EvalConfig, default_of
from spt_jax.tune import TuneConfig

PACKAGE = Path(spt_jax.__file__).parent

# The data flow, lowest layer first: a module imports only from its own layer or below it.
LAYERS = {
    "spt_jax.errors": 0,
    "spt_jax.sequence": 1,
    "spt_jax.metrics": 1,
    "spt_jax.system": 1,
    "spt_jax.models": 2,
    "spt_jax.tasks": 2,
    "spt_jax.prefix": 3,
    "spt_jax.generate": 4,
    "spt_jax.scoring": 4,
    "spt_jax.tune": 4,
    "spt_jax.evaluate.modes": 5,
    "spt_jax.report": 6,
    "spt_jax.evaluate": 7,
    "spt_jax.cli": 8,
    "spt_jax.cli_parser": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int | None:
    matches = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _imports(path: Path) -> set[str]:
    """Every spt_jax module a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from spt_jax import report`
    return {name for name in found if name.startswith("spt_jax.") and _layer(name) is not None}


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_imports_run_one_way():
    upward = []
    for path in _sources():
        module = _module_name(path)
        own = _layer(module)
        assert own is not None, f"{module} has no layer in LAYERS; add it where it belongs in the data flow"
        for imported in _imports(path):
            if _layer(imported) > own:
                upward.append(f"{module} (layer {own}) imports {imported} (layer {_layer(imported)})")
    assert not upward, "lower modules import upper ones:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from spt_jax.generate import generate\n")
    assert _layer("spt_jax.models.lm") < max(_layer(m) for m in _imports(bad))


# Each rule of the sequence layout is defined in spt_jax/sequence.py and nowhere else.
SEQUENCE_RULES = ("cut_at_stop", "bucket_length", "left_pad", "truncate_left", "encode", "bos_ids", "eos_ids",
                  "pad_id", "split_pair", "place_prompt", "pow2_width")


def test_each_sequence_rule_has_one_owner():
    owners: dict[str, list[str]] = {name: [] for name in SEQUENCE_RULES}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in owners:
                owners[node.name].append(_module_name(path))
    assert owners == {name: ["spt_jax.sequence"] for name in SEQUENCE_RULES}


def test_no_module_level_caches_or_id_keys():
    """State belongs to an object the caller holds (``lm.compiled``), never to a module."""
    offenders = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                value = node.value
                call = isinstance(value, ast.Call) and getattr(value.func, "attr", getattr(value.func, "id", ""))
                if isinstance(value, ast.Dict) and not value.keys or call in ("Counter", "defaultdict", "dict"):
                    target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                    name = getattr(target, "id", "?")
                    if name not in ("_MODES", "_REGISTRY"):  # the registries, filled at import by declarations
                        offenders.append(f"{_module_name(path)}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "id":
                offenders.append(f"{_module_name(path)}: id(...) at line {node.lineno}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------
# one source of truth for settings


def test_cli_defaults_are_the_config_defaults():
    parser = cli.build_parser()
    for command in ("run", "tune", "eval"):
        args = vars(parser.parse_args([command]))
        shared = {f.name for f in dataclasses.fields(EvalConfig)} & set(args)
        assert shared, command
        for name in shared:
            if name == "modes" and command == "eval":
                continue  # eval picks its modes from --prompt
            assert args[name] == default_of(EvalConfig, name), (command, name)
        if command != "eval":
            for flag in TUNE_SHORTCUTS:
                assert args[flag] is None  # unset: the TuneConfig default applies
    args = parser.parse_args(["run"])
    assert cli._tune_config(args) == TuneConfig(seed=args.seed)
    assert cli._eval_config(args, tune=cli._tune_config(args)) == EvalConfig()


def test_config_files_and_cli_spell_tuning_knobs_alike():
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--steps", "7", "--tune-batch-size", "4", "--prompt-length", "3", "--lr", "0.1"])
    from_cli = cli._tune_config(args)
    from_file = ev.eval_config_from_dict({"steps": 7, "tune_batch_size": 4, "prompt_length": 3,
                                          "learning_rate": 0.1}, "test").tune
    assert from_cli == from_file == TuneConfig(steps=7, batch_size=4, prompt_length=3, learning_rate=0.1)


# --------------------------------------------------------------------------------------------------
# a mode is one registered class


@pytest.fixture
def echo_mode():
    @ev.register_mode
    class Echo(ev.GenerationMode):
        """Zero-shot with an "Echo:" line before the input (a trivial mode, registered in one place)."""

        name, label, aliases = "echo", "echo test", ("echo-test",)

        def prepare(self, ctx):
            return ev.Prepared(inputs=["Echo:\n" + ctx.task.render_input(r) for r in ctx.records])

    yield Echo
    ev.unregister_mode("echo")


def test_a_registered_mode_runs_everywhere(echo_mode, tmp_path):
    from test_evaluate import make_tiny_lm, scripted_generate, toy_task

    seen = []

    def answer(lm, text, prefix, soft):
        seen.append(text)
        return "A: A"

    config = EvalConfig(modes=("zero_shot", "echo"), n_test=4, loglik=False, eval_every=0)
    results = ev.evaluate(make_tiny_lm(), toy_task(), config, tmp_path, progress=False,
                          backends=ev.Backends(generate=scripted_generate(answer)))
    assert [r["mode"] for r in results["results"]] == ["zero_shot", "echo"]
    assert sum(t.startswith("Echo:\n") for t in seen) == 4
    assert "| echo test |" in report.results_table(results)  # the report reads the registry
    assert {(c["mode_a"], c["mode_b"]) for c in results["comparisons"]} == {("zero_shot", "echo")}
    assert cli._modes("zero,echo-test") == ("zero_shot", "echo")  # and so does the CLI
    assert "echo" in cli._modes("all")
    assert ev.compare_config_from_dict({"models": ["m"], "tasks": ["t"], "eval": {"modes": ["echo", "zero_shot"]},
                                        "correlate": [["echo", "zero_shot"]]}).correlate == (("echo", "zero_shot"),)


def test_an_unregistered_mode_is_refused():
    with pytest.raises(Exception, match="unknown mode 'echo'"):
        EvalConfig(modes=("echo",))


# --------------------------------------------------------------------------------------------------
# a metric is one declaration


def test_a_declared_metric_reaches_results_table_plot_and_compare(monkeypatch, tmp_path):
    from test_evaluate import make_tiny_lm, scripted_generate, toy_task

    def invalid_rate(valid, hits, confidence, n_resamples, seed):
        share = 1.0 - float(valid.mean())
        return {"value": share, "low": share, "high": share}

    extra = metrics.Metric("invalid_rate", "invalid rate", "1 - format validity", invalid_rate, reference=False)
    monkeypatch.setattr(metrics, "METRICS", (*metrics.METRICS, extra))
    monkeypatch.setattr(report, "METRICS", metrics.METRICS)
    config = EvalConfig(modes=("zero_shot",), n_test=4, loglik=False, eval_every=0)
    results = ev.evaluate(make_tiny_lm(), toy_task(), config, tmp_path, progress=False,
                          backends=ev.Backends(generate=scripted_generate(lambda *a: "nonsense")))
    assert results["results"][0]["invalid_rate"]["value"] == 1.0
    assert "invalid rate" in report.results_table(results).splitlines()[0]
    assert "invalid_rate" in metrics.metric_names()
    assert ev.compare_config_from_dict({"models": ["m"], "tasks": ["t"], "metric": "invalid_rate"}).metric == "invalid_rate"


def test_schema_doc_describes_every_metric():
    doc = (PACKAGE.parent / "docs" / "results_schema.md").read_text()
    rows = [f"| `{m.name}` | {m.label} | {m.description} |" for m in metrics.METRICS]
    missing = [row for row in rows if row not in doc]
    assert not missing, "docs/results_schema.md's metric table lacks these rows:\n" + "\n".join(missing)
