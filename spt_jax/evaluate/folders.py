"""Output folders that appear whole or not at all: the one owner of where a command writes.

Every command (run, eval, tune, compare) writes through `output_folder`:

1. the target is checked (`check_out_dir`): a folder holding spt_jax outputs of *any* command is
   refused unless ``overwrite``; files spt_jax did not write are kept;
2. an OS-level lock (`spt_jax.system.FolderLock`) on the target refuses a second writer at once;
3. the run writes into a sibling ``<name>.partial-<pid>`` (results.json / tuning.json last);
4. only when the block ends without error (and without Ctrl-C) is the staging folder renamed into
   place; with ``overwrite`` the old folder is swapped out after the new one is complete, and other
   files in it move across first.

A failed or interrupted run removes its staging folder and leaves the previous results untouched;
a killed one leaves a ``.partial-`` folder beside them, never a half-written target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from spt_jax.errors import ConfigError, environment_fault
from spt_jax.system import FolderLock, check_interrupted

PARTIAL, REPLACED = ".partial-", ".replaced-"
# Errors that can only come from writing, wherever they are raised (a plot library may not say where).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def output_names() -> frozenset[str]:
    """Every file name a command writes into its folder (results.py and report.py name them)."""
    from spt_jax import report
    from spt_jax.evaluate import results as res

    return frozenset({*res.OUTPUT_FILES, *report.PLOT_FILES})


@dataclasses.dataclass(frozen=True)
class Staging:
    """An open output folder: write into ``path`` now; it becomes ``target`` when complete."""

    path: Path
    target: Path


@dataclasses.dataclass(frozen=True)
class Survey:
    """A folder's top-level entries: spt_jax outputs, other files, and sub-folders mixing both."""

    ours: tuple[str, ...]
    foreign: tuple[str, ...]
    mixed: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# what a folder holds


def survey(folder: Path, names: frozenset[str] | None = None) -> Survey:
    """Classify ``folder``'s entries (a sub-folder, as compare writes, by everything inside it)."""
    names = output_names() if names is None else names
    ours, foreign, mixed = [], [], []
    for entry in sorted(folder.iterdir()):
        kind = _kind(entry, names)
        {"ours": ours, "foreign": foreign, "mixed": mixed}[kind].append(entry.name)
    return Survey(tuple(ours), tuple(foreign), tuple(mixed))


def _kind(entry: Path, names: frozenset[str]) -> str:
    if _is_leftover(entry.name):
        return "ours"
    if not entry.is_dir() or entry.is_symlink():
        return "ours" if entry.name in names else "foreign"
    files = [p for p in entry.rglob("*") if not p.is_dir()]
    mine = [p for p in files if p.name in names or _is_leftover(p.name)]
    if not mine:
        return "foreign"
    return "ours" if len(mine) == len(files) else "mixed"


def _is_leftover(name: str) -> bool:
    """A lock file or the staging/swap folder of an earlier (perhaps killed) run."""
    return (name.startswith(".") and name.endswith(".lock")) or PARTIAL in name or REPLACED in name


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    """The target as a Path, if a command may write it: absent, empty, holding only files spt_jax did
    not write (they are kept), or holding spt_jax outputs and ``overwrite`` (they are replaced)."""
    out = Path(out_dir).expanduser()
    if not out.exists():
        return out
    if not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory; choose another path")
    found = survey(out)
    if found.ours and not overwrite:
        raise ConfigError(f"{out} already holds {_describe(found.ours)}; choose another directory or pass "
                          "overwrite=True (--overwrite) to replace them (the old folder is kept until the "
                          "new run completes)")
    if found.mixed:
        raise ConfigError(f"{out}/{found.mixed[0]} holds both spt_jax outputs and other files, which an "
                          "overwrite would have to split; move those files out or choose another directory")
    return out


def _describe(ours: tuple[str, ...]) -> str:
    """What kind of outputs a folder holds, by the marker file each command writes last."""
    from spt_jax.evaluate import results as res

    for marker, what in ((res.RESULTS_FILE, "results"), (res.TUNING_FILE, "a tuned prompt"),
                         (res.COMPARE_FILE, "compare results")):
        if marker in ours:
            return f"{what} ({marker})"
    return f"partial spt_jax outputs ({', '.join(ours[:3])}{' ...' if len(ours) > 3 else ''})"


def timestamped_dir(parent, label: str) -> Path:
    """A fresh, empty ``parent/YYYYmmdd-HHMMSS_label`` directory (suffixed -2, -3... if that exists).

    Created now so two runs started in the same second get different names; `output_folder` then
    renames the finished results over it.
    """
    from spt_jax.evaluate.results import safe_name

    parent = Path(parent).expanduser()
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"output path {parent} exists and is not a directory; choose another path")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = safe_name(label) or "run"
    names = (parent / (f"{stamp}_{safe}" if n == 1 else f"{stamp}_{safe}-{n}") for n in itertools.count(1))
    return _first_new_folder(names, "cannot create the results folder")


# --------------------------------------------------------------------------------------------------
# staging and commit


@contextlib.contextmanager
def output_folder(out_dir, overwrite: bool = False) -> Iterator[Staging]:
    """Stage a command's outputs and move them into ``out_dir`` only if the block succeeds.

    Refuses a folder holding spt_jax outputs unless ``overwrite`` and a folder another process is
    writing (`FolderBusyError`). On an error or Ctrl-C the staging folder is removed and ``out_dir``
    is as it was; if the final move itself fails, the complete results stay in the staging folder and
    the error says where.
    """
    target = check_out_dir(out_dir, overwrite).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise environment_fault(e, "cannot create the results folder's parent", target.parent) from None
    with FolderLock(target, what="results folder", hint="choose another --name"):
        check_out_dir(target, overwrite)  # again under the lock: another run may have finished meanwhile
        staging = _new_sibling(target, PARTIAL)
        try:
            yield Staging(staging, target)
            check_interrupted()  # a Ctrl-C that something swallowed still keeps this run out
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and _while_writing(e, staging):
                raise environment_fault(e, f"cannot write the results for {target}", "",
                                        hint=f"nothing of this run was kept; {target} is as it was") from None
            raise
        try:
            _commit(staging, target)
        except OSError as e:
            raise environment_fault(e, f"cannot move the finished results into {target}", "",
                                    hint=f"they are complete in {staging}") from None


def _free_sibling(target: Path, marker: str) -> Path:
    """A name beside ``target``, ``<name><marker><pid>[-n]``, that nothing uses yet."""
    return next(p for p in _siblings(target, marker) if not p.exists())


def _siblings(target: Path, marker: str) -> Iterator[Path]:
    for n in itertools.count():
        yield target.parent / f"{target.name}{marker}{os.getpid()}{f'-{n}' if n else ''}"


def _new_sibling(target: Path, marker: str) -> Path:
    """A new, empty folder beside ``target`` (`_siblings`' first free name; mode from the umask)."""
    return _first_new_folder(_siblings(target, marker), "cannot create a folder for the results")


def _first_new_folder(candidates: Iterator[Path], doing: str) -> Path:
    """Create the first of ``candidates`` that does not exist yet (atomic: mkdir fails on a taken name)."""
    for path in candidates:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise environment_fault(e, doing, path) from None
    raise AssertionError("unreachable")


def _while_writing(err: OSError, staging: Path) -> bool:
    paths = [p for p in (err.filename, getattr(err, "filename2", None)) if isinstance(p, (str, bytes, os.PathLike))]
    return err.errno in _WRITE_ERRNOS or any(Path(os.fsdecode(p)).is_relative_to(staging) for p in paths)


def _commit(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an existing target's other files move across first and
    its old outputs are deleted only after the new folder is in place."""
    if not target.exists():
        os.rename(staging, target)
        return
    carried = list(survey(target).foreign)
    moved: list[str] = []
    try:
        for name in carried:
            if (staging / name).exists():  # rename would merge into (or replace) the new entry
                raise FileExistsError(errno.EEXIST, f"both the old folder and the new results have {name!r}",
                                      str(target / name))
            os.rename(target / name, staging / name)
            moved.append(name)
        aside = _free_sibling(target, REPLACED)
        os.rename(target, aside)
    except OSError:
        _move_back(staging, target, moved)
        raise
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        _move_back(staging, target, moved)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _move_back(staging: Path, target: Path, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            os.rename(staging / name, target / name)


def writes_results() -> bool:
    """Whether this process writes output folders: on several JAX processes (multi-host), only
    process 0 does; the others run the same computation and write nothing."""
    import jax

    return jax.process_index() == 0
