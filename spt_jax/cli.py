"""The ``spt-jax`` command.

``spt-jax run`` is the main job: with no arguments it evaluates the embedded Gemma-3-270M base model on
a built-in task in all three modes (zero-shot, 5-shot, soft prompt) and prints the table. ``tune``,
``eval`` and ``compare`` run the parts; ``tasks`` and ``models`` list what is available.

Results go into a new timestamped directory under ``--out`` (or ``--out/--name`` with ``--overwrite``),
so nothing is overwritten silently; a folder appears only when its run is complete. A user mistake (an
unknown task, a malformed data file, a bad flag) prints ONE line on stderr and exits with status 2; a
fault of the machine (disk full, read-only, permission denied, a folder another run is writing) one
line and status 3; Ctrl-C status 130. A traceback means a bug in spt_jax.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

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
DEFAULT_TASK = "capital_of"
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


# --------------------------------------------------------------------------------------------------
# commands


def _log(args):
    if getattr(args, "quiet", False):
        return lambda message: None
    return lambda message: print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


def _out_dir(args, label: str) -> tuple[Path, bool]:
    """The folder this run writes and whether it was made just now: a fresh timestamped one, or --name."""
    from spt_jax.evaluate import timestamped_dir

    parent = Path(args.out if args.out is not None else DEFAULT_OUT).expanduser()
    if args.name is None:
        return timestamped_dir(parent, label), True
    if args.name in ("", ".", "..") or Path(args.name).name != args.name:
        raise ConfigError(f"--name must be a plain folder name, got {args.name!r}")
    return parent / args.name, False


def _label(*parts: str) -> str:
    """A folder label from model/task names, which may be paths (only their final stem is kept)."""
    return "_".join(Path(str(p).rstrip("/")).stem or str(p) for p in parts)


def _tune_config(args):
    from spt_jax.evaluate.config import TUNE_SHORTCUTS, tune_config_with
    from spt_jax.tune import TuneConfig

    changes = {"seed": args.seed}
    changes.update({field: getattr(args, flag) for flag, field in TUNE_SHORTCUTS.items()
                    if getattr(args, flag) is not None})
    if getattr(args, "checkpoint_every", None) is not None:  # tune only: the command with --checkpoint-dir
        changes["checkpoint_every"] = args.checkpoint_every
    if getattr(args, "until_saturated", False):
        if not args.eval_every:
            raise ConfigError("--until-saturated watches the validity checks; give --eval-every >= 1")
        changes.update(stop_metric="format_validity", eval_every=args.eval_every)
    return tune_config_with(TuneConfig(), changes, "command line")


def _eval_config(args, **fields):
    """The EvalConfig of a command: every EvalConfig field the command has a flag for, plus ``fields``."""
    from spt_jax.evaluate.config import EvalConfig

    from_flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)
                  if f.name != "tune" and hasattr(args, f.name)}
    return EvalConfig(**{**from_flags, **fields})


def load_model(name_or_path: str, *, dtype: str = "float32", log=None, shardings=None):
    """The LM for a --model value (module-level so tests and embedders can substitute it).

    ``shardings`` (passed only for a multi-device mesh) streams the weights onto it as they load.
    """
    from spt_jax.models import load
    from spt_jax.models.embedded import EMBEDDED_MODELS

    known = name_or_path in EMBEDDED_MODELS or Path(name_or_path).expanduser().exists()
    if known and log is not None:  # an unknown name fails at once, with one line and no log before it
        log(f"loading {name_or_path} ({dtype})")
    return load(name_or_path, dtype=dtype, shardings=shardings)


def _evaluate_command(args, config, label_mode: str) -> int:
    from spt_jax.evaluate import check_inputs, evaluate
    from spt_jax.report import headline_lines, results_table, seeds_table
    from spt_jax.tasks import get_task

    log = _log(args)
    task = get_task(args.task)
    check_inputs(task, config)  # bad data fails before the model loads
    mesh = config.device_mesh()  # and a mesh that does not fit the devices or batch sizes
    with _results_dir(args, _label(args.model, task.name, label_mode)) as out:
        lm = _load(args, log, mesh)
        if out is None:  # another process (0) of a multi-host job writes and prints the results
            evaluate(lm, task, config, None, progress=False, log=log)
            return 0
        log(f"writing results to {out.target}")
        results = evaluate(lm, task, config, out, progress=not args.quiet, log=log)
    form = ", chat template" if results["config"].get("chat_template") else ""
    print(f"\n{results['model']['name']} on {task.name} ({results['n']} test items{form})\n")
    print(results_table(results))
    if results.get("seeds"):
        print(seeds_table(results))
    for line in headline_lines(results):
        print(line)
    print(f"results: {out.target}")
    return 0


@contextlib.contextmanager
def _results_dir(args, label: str):
    """The run's staged folder (`output_folder`, entered before the model loads, so a used or locked
    folder fails at once); it appears at ``.target`` only if the run succeeds."""
    from spt_jax.evaluate import output_folder, writes_results

    if not writes_results():  # multi-host: only process 0 has a folder
        yield None
        return
    target, created = _out_dir(args, label)
    try:
        with output_folder(target, args.overwrite) as out:
            yield out
    except BaseException:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # the empty timestamped folder this run reserved
        raise


def _load(args, log, mesh=None):
    """The model (its weights streamed onto ``mesh`` when it has several devices), then a check for a
    Ctrl-C that a callback swallowed while it loaded."""
    from spt_jax.models import resolve_dtype_name
    from spt_jax.system import check_interrupted
    from spt_jax.tune.mesh import loading_shardings

    onto = loading_shardings(mesh)
    lm = load_model(args.model, dtype=resolve_dtype_name(args.dtype), log=log,
                    **({"shardings": onto} if onto is not None else {}))
    check_interrupted()
    return lm


def cmd_run(args) -> int:
    return _evaluate_command(args, _eval_config(args, tune=_tune_config(args)), "run")


def cmd_eval(args) -> int:
    modes = args.modes
    if modes is None:
        modes = ("zero_shot", "few_shot") + (("soft_prompt",) if args.prompt else ())
    if "soft_prompt" in modes and not args.prompt:
        raise ConfigError("soft_prompt mode in 'spt-jax eval' needs --prompt FILE (a saved soft prompt); "
                          "'spt-jax run' tunes one")
    if args.prompt and not Path(args.prompt).expanduser().exists():
        raise ConfigError(f"prompt file {args.prompt} does not exist")
    if args.prompt:
        from spt_jax.tune import load_prompt

        load_prompt(Path(args.prompt).expanduser())  # a broken prompt file fails before the model loads
    config = _eval_config(args, modes=modes, prompt_file=args.prompt, eval_every=0)
    return _evaluate_command(args, config, "eval")


def cmd_tune(args) -> int:
    from spt_jax.evaluate import PROMPT_FILE, check_inputs, tune_outputs
    from spt_jax.tasks import get_task

    log = _log(args)
    config = _eval_config(args, modes=("soft_prompt",), tune=_tune_config(args), loglik=False)
    task = get_task(args.task)
    check_inputs(task, config)
    mesh = config.device_mesh()
    with _results_dir(args, _label(args.model, task.name, "tune")) as out:
        lm = _load(args, log, mesh)
        if out is None:  # another process (0) of a multi-host job writes and prints the results
            tune_outputs(lm, task, config, None, checkpoint_dir=args.checkpoint_dir, progress=False)
            return 0
        log(f"tuning a soft prompt on {task.name}'s train split; writing to {out.target}")
        summary = tune_outputs(lm, task, config, out, checkpoint_dir=args.checkpoint_dir, progress=not args.quiet)
    curve = summary.get("curve") or []
    if curve:
        last = curve[-1]
        print(f"step {last['step']}: format validity {last['format_validity']:.3f}, accuracy "
              f"{last['accuracy']:.3f} on {last['n']} {last['split']} items")
    print(f"prompt: {out.target / PROMPT_FILE}")
    return 0


def cmd_compare(args) -> int:
    from spt_jax.evaluate import compare, load_compare_config
    from spt_jax.report import compare_markdown

    log = _log(args)
    config = load_compare_config(args.config)
    if args.mesh is not None:
        config = dataclasses.replace(config, eval=config.eval.replace(mesh=args.mesh))
    if args.out is None:
        args.out = config.out or DEFAULT_OUT
    with _results_dir(args, _label(Path(args.config).stem, "compare")) as out:
        if out is None:  # another process (0) of a multi-host job writes and prints the results
            compare(config, args.out, progress=False, load_model=load_model, log=log)
            return 0
        summary = compare(config, out, progress=not args.quiet, load_model=load_model, log=log)
    print(compare_markdown(summary))
    print(f"results: {out.target}")
    return 0


def cmd_tasks(args) -> int:
    from spt_jax.tasks import get_task, list_tasks

    names = list_tasks()
    width = max((len(n) for n in names), default=4)
    for name in names:
        try:
            description = get_task(name).description
        except SptError as e:  # a benchmark whose backend is missing still lists
            description = f"(unavailable: {e})"
        print(f"{name:<{width}}  {description}".rstrip())
    return 0


def cmd_models(args) -> int:
    from spt_jax.models.embedded import list_embedded

    entries = list_embedded()
    width = max((len(e["name"]) for e in entries), default=4)
    for entry in entries:
        state = "installed" if entry.get("installed") else "not installed"
        line = f"{entry['name']:<{width}}  {state:<13}  {entry.get('description', '')}"
        if not entry.get("installed") and entry.get("install_command"):
            line += f" -- install: {entry['install_command']}"
        print(line.rstrip())
    print("Any Hugging Face checkpoint directory (config.json + safetensors) or .gguf file works as --model too.")
    return 0


COMMANDS = {"run": cmd_run, "tune": cmd_tune, "eval": cmd_eval, "compare": cmd_compare,
            "tasks": cmd_tasks, "models": cmd_models}


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spt-jax`` console script; returns the exit status (README: exit codes)."""
    from spt_jax.system import interrupt_guard

    argv = list(sys.argv[1:] if argv is None else argv)
    with interrupt_guard() as flag:
        try:
            code = _run_command(argv)
        except KeyboardInterrupt:
            code = None
        if code is None or (flag is not None and flag.fired):  # fired: an interrupt some callback swallowed
            print(f"{PROG}: interrupted (only a finished run writes its results folder; earlier ones are "
                  "untouched)", file=sys.stderr)
            return EXIT_INTERRUPTED
        return code


def _run_command(argv: list[str]) -> int:
    """The command's status, or the exit code of the one-line error it ended with."""
    from spt_jax.errors import environment_fault

    try:
        args = build_parser().parse_args(argv or ["run"])  # no arguments: the main job
        if args.command is None:
            raise UsageError(f"{PROG}: name a command: {', '.join(COMMANDS)} (see '{PROG} --help')")
        if getattr(args, "distributed", None) is not None:
            _start_distributed(args.distributed)
        return COMMANDS[args.command](args)
    except SptError as e:
        return _fail(e)
    except OSError as e:  # the machine refused (disk full, read-only, permissions) where no one said why
        return _fail(environment_fault(e, "file system error at" if e.filename else "file system error"))


def _start_distributed(spec: dict) -> None:
    """Join the multi-host job (`jax.distributed.initialize`) before anything touches a device."""
    import jax

    try:
        jax.distributed.initialize(**spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--distributed: cannot join the multi-host job ({e})") from None


def _fail(error: SptError) -> int:
    print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
