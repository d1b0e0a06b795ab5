"""The ``spt-jax`` command line's grammar: flags, their types and defaults, the parser.

Only the model, the task and the output folder of the main job are decided here; every other
default is read from the config dataclasses (`EvalConfig`, `TuneConfig`), so the CLI, compare
config files and the library agree by construction (checked by tests/test_architecture.py).
"""

from __future__ import annotations

import argparse

from spt_jax import errors
from spt_jax.errors import ConfigError, SptError

PROG = "spt-jax"
# Exit codes (README.md, "Exit codes"): 0 done; 2 bad input; 3 the machine refused (disk full,
# read-only, permission denied, a folder in use by another run); 130 interrupted (Ctrl-C).
EXIT_USAGE = errors.EXIT_BAD_INPUT
EXIT_ENVIRONMENT = errors.EXIT_ENVIRONMENT
EXIT_INTERRUPTED = 130

# What only the command line decides: the model, task and folder of the main job. Every other
# default comes from the config dataclasses (`EvalConfig`, `TuneConfig`), so the CLI, compare
# configs and the library agree by construction.
DEFAULT_MODEL = "gemma3-270m"
DEFAULT_TASK = "country_of_capital"
DEFAULT_OUT = "results"


class UsageError(SptError):
    """A command-line usage mistake found by argparse."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() prints one line."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------------
# argument types


def _number(kind, accept, expected: str):
    """An argparse ``type`` that parses ``kind`` and keeps values for which ``accept`` holds."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number")


def _n_test(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    return _positive_int(text)


def _modes(text: str) -> tuple[str, ...]:
    """Comma-separated mode names or aliases (from the mode registry); "all" for every mode."""
    from spt_jax.evaluate.modes import generation_mode_names, mode_by_spelling

    modes = []
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            modes += generation_mode_names()
            continue
        try:
            modes.append(mode_by_spelling(part).name)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(dict.fromkeys(modes))


def _eval_default(name: str):
    from spt_jax.evaluate.config import EvalConfig, default_of

    return default_of(EvalConfig, name)


def _tune_default(name: str):
    from spt_jax.evaluate.config import default_of
    from spt_jax.tune import TuneConfig

    return default_of(TuneConfig, name)


# EvalConfig fields set by a flag of the same name: (argparse type, help). Defaults come from EvalConfig.
_EVAL_FLAGS = {
    "n_test": (_n_test, "test items, a seeded sample ('all' for the whole split)"),
    "k": (_non_negative_int, "few-shot demonstrations"),
    "batch_size": (_positive_int, "generation batch size"),
    "max_new_tokens": (_positive_int, "generation budget (default: the task's)"),
    "seeds": (_positive_int, "independently tuned soft prompts (init and data order); reports mean, range, each"),
}
_CURVE_FLAGS = {
    "eval_every": (_non_negative_int, "tuning steps between validation checks of the validity curve; 0: none"),
    "n_curve": (_positive_int, "validation items in the validity curve"),
}
# The TuneConfig knobs with a flag: the same names compare configs use (`TUNE_SHORTCUTS`).
_TUNE_TYPES = {int: _positive_int, float: _positive_float}


DEFAULT_N_TEST = _eval_default("n_test")


# --------------------------------------------------------------------------------------------------
# the parser


def _add_model_task(p, *, defaults: bool) -> None:
    from spt_jax.evaluate.config import DTYPES

    p.add_argument("--model", default=DEFAULT_MODEL if defaults else None, required=not defaults,
                   help="embedded model name, checkpoint directory or .gguf file"
                        + (f" (default: {DEFAULT_MODEL})" if defaults else ""))
    p.add_argument("--task", default=DEFAULT_TASK if defaults else None, required=not defaults,
                   help="task name (see 'spt-jax tasks') or a .yaml/.json task file"
                        + (f" (default: {DEFAULT_TASK})" if defaults else ""))
    p.add_argument("--dtype", default=_eval_default("dtype"), choices=DTYPES,
                   help=f"compute dtype (default: {_eval_default('dtype')}: bfloat16 on TPU/GPU, float32 on CPU)")
    _add_devices(p, mesh_default=_eval_default("mesh"))
    p.add_argument("--seed", type=_non_negative_int, default=_eval_default("seed"),
                   help="seed for sampling, demos, tuning")
    p.add_argument("--chat-template", dest="chat_template", action="store_true",
                   default=_eval_default("chat_template"),
                   help="wrap each input in the model's chat template as one user turn (post-trained models)")


def _mesh(text: str):
    """A --mesh value: 'data=N,model=M' (either may be left out), 'auto' or 'none'."""
    from spt_jax.tune.mesh import parse_mesh_spec

    try:
        return parse_mesh_spec(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _distributed(text: str):
    """A --distributed value: 'auto' (the cluster says: Cloud TPU, Slurm, Open MPI) or
    'HOST:PORT,NUM_PROCESSES,PROCESS_ID'."""
    if text == "auto":
        return {}
    parts = text.split(",")
    if len(parts) == 3 and ":" in parts[0] and parts[1].isdigit() and parts[2].isdigit():
        if int(parts[2]) < int(parts[1]):
            return {"coordinator_address": parts[0], "num_processes": int(parts[1]), "process_id": int(parts[2])}
    raise argparse.ArgumentTypeError(f"expected 'auto' or HOST:PORT,NUM_PROCESSES,PROCESS_ID (process id below "
                                     f"the count), got {text!r}")


def _add_devices(p, *, mesh_default) -> None:
    shown = "the config file's 'eval.mesh'" if mesh_default is None else mesh_default
    p.add_argument("--mesh", type=_mesh, default=mesh_default,
                   help="devices to run on: 'data=N,model=M' (batch rows over N, weights over M; N x M = all "
                        "devices), 'auto' (all devices, as many on data as divide the batch sizes) or 'none' "
                        f"(one device) (default: {shown})")
    p.add_argument("--distributed", type=_distributed, nargs="?", const={}, default=None, metavar="SPEC",
                   help="run as one process of a multi-host job (jax.distributed): 'auto' (the default when "
                        "given alone) or HOST:PORT,NUM_PROCESSES,PROCESS_ID; start the same command on every "
                        "host; process 0 writes the results")


def _add_config_flags(p, table: dict) -> None:
    for name, (kind, text) in table.items():
        default = _eval_default(name)
        shown = "" if "(default" in text else f" (default: {'all' if default is None else default})"
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default, help=text + shown)


def _add_output(p) -> None:
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"parent directory of results; each run gets a new timestamped folder "
                        f"(default: {DEFAULT_OUT})")
    p.add_argument("--name", default=None,
                   help="a fixed folder name under --out instead of a timestamped one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results in --out/--name if it already holds some")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _add_tuning(p) -> None:
    from spt_jax.evaluate.config import TUNE_SHORTCUTS

    for flag_name, field in TUNE_SHORTCUTS.items():
        default = _tune_default(field)
        flags = ["--" + flag_name.replace("_", "-")] + (["--lr"] if field == "learning_rate" else [])
        p.add_argument(*flags, dest=flag_name, type=_TUNE_TYPES[type(default)], default=None,
                       help=f"TuneConfig.{field} (default: {default})")
    p.add_argument("--until-saturated", action="store_true",
                   help=f"stop tuning once validation format validity has saturated (>= "
                        f"{_tune_default('stop_threshold')} and no gain over {_tune_default('stop_patience')} "
                        "checks; --steps is the cap)")
    _add_config_flags(p, _CURVE_FLAGS)


def _add_eval(p, *, modes_default) -> None:
    from spt_jax.evaluate.config import FEWSHOT_FORMS
    from spt_jax.evaluate.modes import generation_mode_names

    _add_config_flags(p, _EVAL_FLAGS)
    p.add_argument("--modes", type=_modes, default=modes_default,
                   help=f"comma-separated modes: {', '.join(generation_mode_names())}"
                        + (f" (default: {','.join(modes_default)})" if modes_default else ""))
    p.add_argument("--no-loglik", dest="loglik", action="store_false", default=_eval_default("loglik"),
                   help="skip the MCF reference (log-likelihood of the choice letters) of multiple-choice tasks")
    p.add_argument("--fewshot-form", dest="fewshot_form", choices=FEWSHOT_FORMS, default=_eval_default("fewshot_form"),
                   help="few-shot context: 'shared' (k seeded demos behind the instruction, one cached prefix) or "
                        "'lm_eval' (lm-eval's k-shot context per item, also for the CF references) "
                        f"(default: {_eval_default('fewshot_form')})")
    p.add_argument("--no-cloze", dest="cloze", action="store_false", default=_eval_default("cloze"),
                   help="skip the CF references (log-likelihood of each choice's text) where a task has them")


def build_parser() -> argparse.ArgumentParser:
    from spt_jax import __version__

    parser = _Parser(prog=PROG, description="Fair, cheap LLM benchmark evaluation by soft-prompt tuning.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="the full protocol: zero-shot, few-shot and soft prompt; prints the table",
                         description="Evaluate a model on a task in zero-shot, k-shot and soft-prompt modes "
                                     "(tuning the prompt on the train split), write results and print the table.")
    _add_model_task(run, defaults=True)
    _add_eval(run, modes_default=_eval_default("modes"))
    _add_tuning(run)
    _add_output(run)

    tune = sub.add_parser("tune", help="tune a soft prompt on a task's train split and save it",
                          description="Tune a soft prompt on the task's train split; writes the prompt file, "
                                      "the per-step history and the validity curve.")
    _add_model_task(tune, defaults=True)
    _add_tuning(tune)
    tune.add_argument("--batch-size", type=_positive_int, default=_eval_default("batch_size"),
                      help=f"generation batch size of the curve evaluations (default: {_eval_default('batch_size')})")
    tune.add_argument("--checkpoint-dir", default=None, help="resume from / save tuning checkpoints here")
    tune.add_argument("--checkpoint-every", type=_non_negative_int, default=None,
                      help="TuneConfig.checkpoint_every: steps between checkpoints in --checkpoint-dir, "
                           f"which also gets the last step; 0: only the last (default: "
                           f"{_tune_default('checkpoint_every')})")
    _add_output(tune)

    ev = sub.add_parser("eval", help="evaluate without tuning (zero-/few-shot, or a saved soft prompt)",
                        description="Evaluate a model on a task; soft_prompt mode needs --prompt (a file "
                                    "written by 'spt-jax tune' or 'spt-jax run').")
    _add_model_task(ev, defaults=True)
    _add_eval(ev, modes_default=None)
    ev.add_argument("--prompt", default=None, help="a saved soft-prompt file to evaluate (soft_prompt mode)")
    _add_output(ev)

    compare = sub.add_parser("compare", help="models x tasks from a YAML/JSON config; tables + rank correlations",
                             description="Evaluate every model of the config on every task, print a table per "
                                         "task and the rank correlations between the modes' scores.")
    compare.add_argument("config", help="a .yaml/.yml/.json config (see experiments/compare_embedded.yaml)")
    compare.add_argument("--out", default=None, help="parent directory (default: the config's 'out' or results)")
    compare.add_argument("--name", default=None, help="a fixed folder name instead of a timestamped one")
    compare.add_argument("--overwrite", action="store_true", help="replace results in --out/--name")
    compare.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    _add_devices(compare, mesh_default=None)

    sub.add_parser("tasks", help="list the available tasks", description="List every task with its description.")
    sub.add_parser("models", help="list the embedded models and whether they are installed",
                   description="List the embedded models and whether their weights are installed.")
    return parser
