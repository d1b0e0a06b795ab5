"""`make benchmarks`: run every benchmark alone, one after another, and write one JSON summary.

Each script prints its own machine line (CPU model, BF16/AMX flags, XLA flags, load) and a
``SUMMARY`` line with its ratios; this runner keeps both, plus the load average before and after
each script, in ``benchmarks/results/<cpu>-<date>.json``. Run it on a quiet machine: ratios come
from each script's interleaved runs, never from numbers taken at different times.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from machine import machine

HERE = Path(__file__).parent
SCRIPTS = (("forward_throughput",), ("generate_throughput",), ("tune_step",), ("tune_step", "--model", "gemma3-270m"),
           ("profile_step",), ("fewshot_prefix_cache",), ("load_memory",), ("tune_memory",))


def run(name: str, *args: str) -> dict:
    before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], capture_output=True, text=True)
    lines = done.stdout.splitlines()
    return {"script": " ".join((name, *args)), "exit_code": done.returncode, "load_before": round(before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "machine": next((line for line in lines if line.startswith("MACHINE")), None),
            "summary": [line for line in lines if line.startswith("SUMMARY")] or lines[-6:],
            "stderr_tail": done.stderr.splitlines()[-5:] if done.returncode else []}


def main() -> int:
    info = machine()
    results = []
    for script in SCRIPTS:
        print(f"== {' '.join(script)}", flush=True)
        results.append(run(*script))
        print("\n".join(results[-1]["summary"]), flush=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", info["cpu"]).strip("-") or "cpu"
    out = HERE / "results" / f"{cpu}-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": info, "created": stamp, "benchmarks": results}, indent=2) + "\n")
    print(f"summary: {out}")
    return max(r["exit_code"] for r in results)


if __name__ == "__main__":
    sys.exit(main())
