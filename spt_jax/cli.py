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

import contextlib
import dataclasses
import sys
from pathlib import Path

from spt_jax.errors import ConfigError, SptError
from spt_jax.cli_parser import (  # noqa: F401  (the defaults and types tests and embedders read here)
    DEFAULT_MODEL,
    DEFAULT_N_TEST,
    DEFAULT_OUT,
    DEFAULT_TASK,
    EXIT_INTERRUPTED,
    PROG,
    UsageError,
    _modes,
    build_parser,
)



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
    from spt_jax.report import headline_lines, results_table, seeds_table, timing_line
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
    print(timing_line(results))
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
    from spt_jax.system import enable_compilation_cache

    try:
        args = build_parser().parse_args(argv or ["run"])  # no arguments: the main job
        if args.command is None:
            raise UsageError(f"{PROG}: name a command: {', '.join(COMMANDS)} (see '{PROG} --help')")
        if getattr(args, "distributed", None) is not None:
            _start_distributed(args.distributed)
        enable_compilation_cache()  # reruns with the same shapes skip XLA's compiles
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
