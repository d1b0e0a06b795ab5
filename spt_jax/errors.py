"""User-facing errors.

Everything a user can get wrong (a path, a field, a model name, a config value) raises a subclass of
`SptError` whose message names the problem and says what was expected. The CLI prints such an error
as one line on stderr and exits with its ``exit_code``: 2 for bad input, 3 for an `EnvironmentFault`
(the machine refused: disk full, read-only, permission denied, a folder in use by another run).
Anything else is a bug and keeps its traceback.
"""

import errno
import os


EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class SptError(Exception):
    """A problem with the user's input, explained in the message."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(SptError, ValueError):
    """A configuration value, config file or model architecture that spt_jax cannot use."""


class WeightsError(SptError, ValueError):
    """A checkpoint that is missing, truncated, of the wrong shape or in a refused format."""


class DataError(SptError, ValueError):
    """A dataset, split, record or template that cannot produce examples."""


class MissingPackageError(SptError, ImportError):
    """An optional package (an embedded model, a benchmark backend) that is not installed."""


class EnvironmentFault(SptError):
    """The operating system refused what a correct run needs (space, a writable folder, a lock)."""

    exit_code = EXIT_ENVIRONMENT


class FolderBusyError(EnvironmentFault):
    """Another spt_jax process holds the lock of a results folder or checkpoint directory."""


# What to do about each refusal; the message names the path and the operation too.
_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is exhausted: free space or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere writable",
    errno.EACCES: "permission denied: write somewhere you may, or fix the folder's permissions",
    errno.EPERM: "operation not permitted: write somewhere you may, or fix the folder's permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "the path is a folder where a file was expected: name the file",
    errno.ENOENT: "a folder on the path does not exist",
    errno.ENAMETOOLONG: "the path or a name in it is too long: choose a shorter one",
    errno.EEXIST: "something already exists at that path: choose another",
    errno.ENOTEMPTY: "the folder is not empty: choose another",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or run fewer jobs at once",
    errno.ENFILE: "too many open files on this machine: run fewer jobs at once",
    errno.EIO: "the device reported an I/O error: check the disk",
    errno.EXDEV: "the paths are on different file systems: keep them on one",
}


def environment_fault(err: OSError, doing: str, path=None, *, hint: str = "") -> EnvironmentFault:
    """One line for an OSError: what was being done, the path, the cause and what to do about it."""
    where = path if path is not None else (err.filename or "")
    cause = (err.strerror or os.strerror(err.errno)) if err.errno else str(err)
    advice = _ADVICE.get(err.errno, "")
    text = f"{doing}{f' {where}' if where else ''}: {cause}" + (f"; {advice}" if advice else "")
    return EnvironmentFault(text + (f"; {hint}" if hint else ""))


def decode_fault(path, data: bytes, offset: int, what: str = "file") -> "DataError":
    """A DataError naming the file, line and byte offset of the first byte of ``data`` (the file's
    bytes) that is not UTF-8, so the user can find it in an editor."""
    line = data[:offset].count(b"\n") + 1
    return DataError(f"{what} {path}, line {line} (byte offset {offset}): not UTF-8 text (byte "
                     f"{data[offset:offset + 1]!r}); save the file as UTF-8")


def close_names(name: str, choices, n: int = 3) -> str:
    """A ' (did you mean ...?)' hint listing the choices closest to a misspelled name."""
    import difflib

    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.5)  # any value: it is a hint
    return f" (did you mean {', '.join(repr(m) for m in matches)}?)" if matches else ""
