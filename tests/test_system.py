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

