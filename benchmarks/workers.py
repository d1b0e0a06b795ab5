"""Two sides of a benchmark as worker processes that take turns call by call.

Each side loads and warms up in its own pinned process (its peak RSS and caches its own), then the
parent has them alternate one timed call at a time, so both meet the same background load on a
shared machine -- a ratio from two phases run one after the other would carry the load's drift.

A worker is this benchmark script run again with ``--side``; it calls `serve` with a setup function
returning ``(info, run)``: ``info`` a JSON-able dict sent once it is ready, ``run(i)`` the timed work
for item ``i``, returning a JSON-able value sent back with its wall time. `OtherProcessesCpu` says
how busy everything else kept the machine meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def pin(threads: int) -> None:
    """Use ``threads`` cores: XLA sizes its pool from the affinity mask, torch is told explicitly."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def peak_rss_mib() -> float:
    """This process's own peak RSS (/proc's high-water mark: getrusage's would carry the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise OSError("no VmHWM line in /proc/self/status")


def serve(threads: int, setup: Callable[[], tuple[dict, Callable[[int], object]]]) -> None:
    """The worker's loop: report readiness, then run the item named by each line read from stdin."""
    pin(threads)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    info, run = setup()
    print(json.dumps(info), file=protocol, flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        value = run(int(line))
        print(json.dumps(dict(seconds=time.perf_counter() - start, value=value)), file=protocol, flush=True)


class Worker:
    """One side, started as ``command`` (the script with its ``--side`` arguments); waits until ready."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen([sys.executable, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {' '.join(self.proc.args[1:4])} exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, item: int) -> dict:
        """``{"seconds": wall time of run(item) in the worker, "value": what it returned}``."""
        self.proc.stdin.write(f"{item}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class OtherProcessesCpu:
    """How many cores everything but ``ours`` (the live worker pids) kept busy since creation, from
    /proc/stat less the workers' own /proc/<pid>/stat times."""

    def __init__(self, ours: set[int]):
        self.ours = ours
        self.start = self._snapshot()

    def _snapshot(self):
        tick = os.sysconf("SC_CLK_TCK")
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # minus idle, iowait
        ours = 0.0
        for pid in self.ours:  # utime, stime: fields 14 and 15, after the ")" that ends the name
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += (int(stat[11]) + int(stat[12])) / tick
        return time.perf_counter(), busy, ours

    def cores(self) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._snapshot()
        return max((busy1 - busy0) - (ours1 - ours0), 0.0) / (t1 - t0)
