"""Tuning checkpoints with Orbax: the prompt, optimizer state, step, data order, config, history
and evaluations so far (so a resumed run reports the same evaluations as an uninterrupted one).

Never the frozen weights: a checkpoint is a few kilobytes whatever the model size. Orbax writes each
step to a temporary directory and renames it when complete (atomic), and in a multi-host run the
primary host writes replicated arrays and the JSON once. If the newest step cannot be read, the
previous one is used with a warning; nothing here ever deletes a checkpoint it could not read.

A directory is held under an OS-level lock (`spt_jax.system.FolderLock`) while a manager is open, so
a second run resuming into it is refused instead of racing the first. Orbax reports a full disk or a
read-only folder from its background threads as logged tracebacks and a ValueError carrying the
errno; here that becomes one `EnvironmentFault` naming the directory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from spt_jax.errors import DataError, environment_fault
from spt_jax.system import FolderLock

STATE, META = "state", "meta"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_OS_ERROR_TEXT = {os.strerror(code): code for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                         errno.EPERM, errno.ENOTDIR, errno.EIO)}


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind an Orbax/TensorStore error, which wrap it in a ValueError with the errno."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        text = str(err)
        match = _OS_ERROR_CODE.search(text)
        code = int(match.group(1)) if match else next((c for t, c in _OS_ERROR_TEXT.items() if t in text), None)
        if code is not None:
            return OSError(code, os.strerror(code))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _os_faults(doing: str, directory: Path, hint=lambda: "", on_fault=lambda: None):
    """Re-raise an operating-system refusal inside Orbax as one `EnvironmentFault` line (``hint()``
    says what is still intact; ``on_fault()`` runs first)."""
    try:
        yield
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None:
            raise
        on_fault()
        raise environment_fault(os_error, doing, directory, hint=hint()) from None


class _OrbaxThreadTracebacks(logging.Filter):
    """Drops the tracebacks Orbax logs when a background write fails: the same error reaches the
    caller (at the next save or at close) and is reported there, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _closed_loop_noise(previous):
    """An unraisable hook dropping the "Event loop is closed" errors TensorStore's callbacks raise
    after Orbax gave up on a failed write (reported once, by `_os_faults`); others pass on."""

    def hook(info):
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            previous(info)

    return hook


class TuneCheckpoints:
    """An Orbax `CheckpointManager` over ``directory`` holding ``{prompt, opt_state}`` + JSON meta."""

    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise DataError(f"checkpoint directory {self.directory} is a file; name a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise environment_fault(e, "cannot create the checkpoint directory", self.directory) from None
        self.lock = FolderLock(self.directory, what="checkpoint directory",
                               hint="choose another --checkpoint-dir (checkpoint_dir)")
        if jax.process_index() == 0:  # one lock per run: the other hosts of a multi-host job share it
            self.lock.acquire()
        self._quiet, self._unraisable, self._faulted = _OrbaxThreadTracebacks(), sys.unraisablehook, False
        logging.getLogger("absl").addFilter(self._quiet)
        sys.unraisablehook = _closed_loop_noise(self._unraisable)
        try:
            with _os_faults("cannot open the checkpoint directory", self.directory):
                self.manager = ocp.CheckpointManager(
                    self.directory,
                    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                    item_names=(STATE, META),
                )
        except BaseException:
            self._release()
            raise

    def save(self, step: int, prompt, opt_state, meta: dict) -> None:
        """Start writing step ``step`` (asynchronously; `close` waits for it)."""
        # Copies: the train step donates prompt and opt_state, and the write may still be running.
        state = jax.tree.map(jnp.copy, {"prompt": prompt, "opt_state": opt_state})
        with _os_faults("cannot write a checkpoint into", self.directory, self._kept, self._fault):
            self.manager.save(
                step,
                args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
            )

    def _kept(self) -> str:
        try:  # asked while a write has failed: Orbax may raise that failure again from here
            steps = self.steps()
        except Exception:
            return ""
        return f"the finished checkpoints (steps {', '.join(map(str, steps))}) are intact" if steps else ""

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, check=None) -> tuple[int, dict, dict] | None:
        """``(step, {prompt, opt_state}, meta)`` of the newest readable step, or None when empty.

        ``abstract_state`` is ``{prompt, opt_state}`` of `jax.ShapeDtypeStruct` with shardings.
        ``check(meta)`` runs on a step's JSON before its arrays are read, so a checkpoint made for
        another model or other settings is refused as such (not as an unreadable one).
        """
        failures, unreadable = [], []
        for step in reversed(self.steps()):
            try:
                meta = self._restore(step, **{META: ocp.args.JsonRestore()})[META]
            except Exception as e:  # Orbax/TensorStore raise many types for a damaged step
                failures.append(_failure(step, e))
                unreadable.append(str(step))
                continue
            if check is not None:
                check(meta)
            try:
                state = self._restore(step, **{STATE: ocp.args.StandardRestore(abstract_state)})[STATE]
            except Exception as e:
                failures.append(_failure(step, e))
                unreadable.append(str(step))
                continue
            if failures:
                which = (f"step {unreadable[0]} is" if len(unreadable) == 1 else f"steps {', '.join(unreadable)} are")
                warnings.warn(f"{self.directory}: checkpoint {which} unreadable ({'; '.join(failures)}); "
                              f"resuming from step {step}", stacklevel=2)
            return step, state, meta
        if failures:
            raise DataError(
                f"{self.directory}: no checkpoint in it can be read ({'; '.join(failures)}); nothing was "
                "deleted. To start over, point --checkpoint-dir (checkpoint_dir) at a new directory"
            )
        return None

    def _restore(self, step: int, **items):
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def close(self) -> None:
        """Wait for pending writes, release the manager and the directory's lock."""
        try:
            with _os_faults("cannot finish writing a checkpoint into", self.directory, self._kept, self._fault):
                try:
                    self.manager.wait_until_finished()
                finally:
                    self.manager.close()
        finally:
            if self._faulted:
                _join_background_threads()  # what they log or raise late is still filtered
                self._remove_unfinished()
            self._release()

    def _fault(self) -> None:
        self._faulted = True

    def _remove_unfinished(self) -> None:
        """Delete the unfinished steps Orbax leaves after a failed write (clearly named, and only
        ever this run's: it holds the directory's lock); finished steps are never touched."""
        for path in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)

    def _release(self) -> None:
        logging.getLogger("absl").removeFilter(self._quiet)
        sys.unraisablehook = self._unraisable
        self.lock.release()

    def __enter__(self) -> TuneCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _join_background_threads(timeout_s: float = 20.0) -> None:
    """Wait (bounded) for Orbax's background write threads, which a failed write leaves finishing."""
    import threading
    import time

    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if type(thread).__name__ == "_SignalingThread" and thread is not threading.current_thread():
            try:  # Orbax's thread re-raises its write's failure on join: already reported, once
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass


def _failure(step: int, err: Exception) -> str:
    return f"step {step}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"

