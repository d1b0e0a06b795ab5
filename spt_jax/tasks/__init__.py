"""Tasks: benchmark records -> prompts, required-format targets, and a pure parser + answer judge.

Built-in offline tasks register on import. The TFDS benchmarks (``spt_jax.tasks.benchmarks``) register
the first time a name is not found or the list is asked for, so importing this package never touches
tensorflow-datasets; their names are listed even when their data is not prepared.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

from spt_jax.errors import DataError, close_names
from spt_jax.tasks.files import CsvSource, JsonlSource, TfdsSource, load_task_file, task_from_dict
from spt_jax.tasks.answers import AnswerSpec, FormatSpec, ParsedAnswer, normalize_text, parse_number
from spt_jax.tasks.task import DataSource, InMemorySource, Record, Task

_REGISTRY: dict[str, Task] = {}
_TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_benchmarks_loaded = False


def register_task(task: Task) -> Task:
    """Make a task reachable by name (a later registration under the same name replaces it)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}")
    _REGISTRY[task.name] = task
    return task


def _load_benchmarks() -> None:
    """Register the TFDS benchmarks once, if that module exists (it is optional)."""
    global _benchmarks_loaded
    if _benchmarks_loaded:
        return
    _benchmarks_loaded = True
    name = f"{__name__}.benchmarks"
    if importlib.util.find_spec(name) is None:
        return
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # a missing optional backend must not hide the built-in tasks
        warnings.warn(f"benchmark tasks unavailable: {e}", stacklevel=3)
        return
    register = getattr(module, "register_benchmarks", None)
    if callable(register):
        register()


def get_task(name_or_path: str | os.PathLike | Task) -> Task:
    """A registered task by name, or a task defined in a .yaml/.yml/.json file."""
    if isinstance(name_or_path, Task):
        return name_or_path
    name = os.fspath(name_or_path)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.lower().endswith(_TASK_FILE_SUFFIXES):
        return load_task_file(name)
    _load_benchmarks()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if Path(name).is_file():
        return load_task_file(name)  # explains which suffixes a task file needs
    raise DataError(f"unknown task {name!r}{close_names(name, _REGISTRY)}; known tasks: "
                    f"{_summary(_REGISTRY)} (or pass a .yaml/.json task file)")


def _summary(names) -> str:
    """Task names for one error line: 'family:<subject>' variants counted, not listed."""
    plain = sorted(n for n in names if ":" not in n)
    families: dict[str, int] = {}
    for n in names:
        if ":" in n:
            family = n.split(":", 1)[0]
            families[family] = families.get(family, 0) + 1
    return ", ".join(plain + [f"{f}:<subject> ({count} tasks)" for f, count in sorted(families.items())])


def list_tasks() -> list[str]:
    """Names of every registered task, built-in and benchmark, sorted."""
    _load_benchmarks()
    return sorted(_REGISTRY)


def builtin_task_names() -> list[str]:
    """Names of the built-in offline tasks (no benchmark data needed), in `BUILTIN_TASKS` order."""
    from spt_jax.tasks.builtin import BUILTIN_TASKS

    return list(BUILTIN_TASKS)


def _register_builtins() -> None:
    from spt_jax.tasks.builtin import builtin_tasks

    for task in builtin_tasks():
        register_task(task)


_register_builtins()

__all__ = [
    "AnswerSpec",
    "CsvSource",
    "DataSource",
    "FormatSpec",
    "InMemorySource",
    "JsonlSource",
    "ParsedAnswer",
    "Record",
    "Task",
    "TfdsSource",
    "builtin_task_names",
    "get_task",
    "list_tasks",
    "load_task_file",
    "normalize_text",
    "parse_number",
    "register_task",
    "task_from_dict",
]
