"""`spt_jax.system`: operating-system helpers that must work, or do nothing, everywhere."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from spt_jax.system import release_freed_memory

BLOCK = 64 * 1024  # below glibc's mmap threshold: these blocks come from the heap's arena


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_os():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(4096)]  # 256 MiB, touched
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)
    for block in blocks[:-1]:  # the last block pins the heap's top, so free() trims nothing itself
        libc.free(block)
    held = _rss()
    release_freed_memory()
    released = held - _rss()
    libc.free(blocks[-1])
    assert released > 200 * 2**20, f"only {released / 2**20:.0f} MiB went back"



_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp
from spt_jax.system import enable_compilation_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
print(enable_compilation_cache(sys.argv[1]))
print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(4)).sum()))
"""


def _probe_cache(directory, **env):
    import subprocess

    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(directory)], capture_output=True, text=True,
                          env={**clean, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


def test_compiled_programs_are_kept_on_disk_unless_the_user_set_the_cache(tmp_path):
    assert _probe_cache(tmp_path / "xla") == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir())  # the jitted function's executable was written
    # the user's own JAX setting wins, and a directory that cannot be made leaves the cache off
    assert _probe_cache(tmp_path / "ours", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs")) == "None"
    assert not (tmp_path / "ours").exists()
    assert _probe_cache(tmp_path / "off", JAX_ENABLE_COMPILATION_CACHE="false") == "None"
    (tmp_path / "file").write_text("not a directory")
    assert _probe_cache(tmp_path / "file" / "xla") == "None"
