"""What spt_jax needs from the operating system, made safe to fail.

* `read_text` -- a UTF-8 file whose bad byte is reported by file, line and byte offset (not as a
  bare UnicodeDecodeError);
* `FolderLock` -- an OS-level lock (``fcntl.flock``) on a results folder or checkpoint directory, so
  a second writer is refused with one line, and a lock left by a killed process is free again
  (the kernel drops a dead process's flocks);
* `interrupt_guard` / `check_interrupted` -- Ctrl-C that always ends the run: the SIGINT handler
  remembers it fired, so an interrupt swallowed where Python cannot raise it (a garbage-collector
  callback, such as JAX's) still stops the run at the next check;
* `enable_compilation_cache` -- XLA's compiled programs kept on disk, so a second run with the same
  shapes skips compiling.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
from pathlib import Path

from spt_jax.errors import FolderBusyError, environment_fault

# --------------------------------------------------------------------------------------------------
# UTF-8 text


def read_text(path, what: str = "file") -> str:
    """The UTF-8 text of ``path`` (a leading BOM dropped); `decode_fault` names the first bad byte.

    OSErrors (a missing file, permission denied) propagate for the caller to name.
    """
    return decode_text(path, Path(path).read_bytes(), what)


def decode_text(path, data: bytes, what: str = "file") -> str:
    """``data`` (the bytes of file ``path``) as UTF-8 text, a leading BOM dropped."""
    from spt_jax.errors import decode_fault

    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise decode_fault(path, data, bom + e.start, what) from None


def decode_lines(path, data: bytes, what: str = "data file"):
    """``(line number, text)`` for each line of ``data`` (a file's bytes), checked line by line."""
    from spt_jax.errors import decode_fault

    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    for number, raw in enumerate(data[offset:].splitlines(keepends=True), start=1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise decode_fault(path, data, offset + e.start, what) from None
        offset += len(raw)


# --------------------------------------------------------------------------------------------------
# folder locks


def lock_file_for(folder) -> Path:
    """The lock file of ``folder``: a hidden sibling, so the folder itself can be renamed or absent."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


class FolderLock:
    """An exclusive, non-blocking ``flock`` on `lock_file_for(folder)`; a second holder is refused.

    The lock file records the holder's pid (for the message) and is removed on release. A process
    that dies holds nothing: the kernel releases its flock, and the next run takes the stale file.
    """

    def __init__(self, folder, *, what: str, hint: str):
        self.folder = Path(folder)
        self.path = lock_file_for(self.folder)
        self.what, self.hint = what, hint
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise environment_fault(e, f"cannot create the lock file of {self.what}", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise environment_fault(e, f"cannot lock {self.what}", self.path) from None
                raise FolderBusyError(
                    f"{self.what} {self.folder} is in use by another spt-jax run"
                    f"{f' (pid {holder})' if holder else ''}; wait for it to finish or {self.hint}"
                ) from None
            if _same_file(fd, self.path):  # not a file a releasing holder unlinked meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: a waiting opener then sees another inode and retries
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------
# memory


DEFAULT_COMPILATION_CACHE = "~/.cache/spt_jax/xla"


def enable_compilation_cache(directory: str | os.PathLike = DEFAULT_COMPILATION_CACHE) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory``; the directory in use, or None.

    Each evaluation mode compiles its shapes afresh in every process (~10 s a mode on a 2-core CPU,
    ~50 s of the default run); cached, a rerun loads them in a fraction of that (BUILD_NOTES). The
    user's own JAX setting wins: with ``JAX_COMPILATION_CACHE_DIR`` set, or the cache turned off
    (``JAX_ENABLE_COMPILATION_CACHE=false``), nothing changes. A directory that cannot be made (a
    read-only home) leaves the cache off: programs compile every time, as without it.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not jax.config.jax_enable_compilation_cache:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``); a no-op elsewhere.

    XLA:CPU takes its buffers from malloc. What a generation call frees stays in glibc's arenas,
    fragmented, so the tuning steps after a validity check grew the process by 0.3-0.4 GB per check
    (Gemma-3-270M: 3.40 GB peak over three checks, 2.60 GB with a trim after each; BUILD_NOTES).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # musl has none
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# Ctrl-C


class InterruptFlag:
    """A SIGINT handler that raises KeyboardInterrupt and remembers that it fired."""

    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame):
        self.fired = True
        raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed under `interrupt_guard`, even when the first
    KeyboardInterrupt was swallowed (Python drops exceptions raised in gc callbacks)."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, InterruptFlag) and handler.fired:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_guard():
    """Install an `InterruptFlag` for SIGINT (main thread only) and keep swallowed interrupts quiet.

    Yields the flag (or None off the main thread); the previous handler and unraisable hook return
    on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    flag, previous, previous_hook = InterruptFlag(), signal.getsignal(signal.SIGINT), sys.unraisablehook

    def unraisable(info):
        if not isinstance(info.exc_value, KeyboardInterrupt):  # the flag remembers those
            previous_hook(info)

    signal.signal(signal.SIGINT, flag)
    sys.unraisablehook = unraisable
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
