"""What every experiment script shares: its command line, its results folder, JSON, tables, the machine.

Each script (``a_saturation.py``, ``b_baselines.py``, ...) is a CLI with ``--quick`` (CI-sized) and
``--out``; it writes one new timestamped folder under ``--out`` through the library's own folder
machinery (`spt_jax.evaluate.timestamped_dir` + `output_folder`: staged, renamed into place only when
complete, never overwriting a folder), holding ``<name>.json``, PNG plots and ``summary.md``. Only
the public API is used (``from spt_jax import evaluate, models, tasks, tune, metrics``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "benchmarks"))  # the MACHINE line every benchmark prints, one definition
from machine import machine, machine_line  # noqa: E402

EMBEDDED = ("gemma3-270m", "smollm2-135m-instruct")
DEFAULT_OUT = "results/experiments"
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------------
# the command line


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment has: ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized settings: few items, few steps, one model")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"parent folder; each run writes a new timestamped folder in it (default {DEFAULT_OUT})")
    return p


def names(value: str) -> tuple[str, ...]:
    """A comma-separated list flag (``--tasks capital_of,yes_no``)."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return items


def ints(value: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in names(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if any(i < 0 for i in items):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {value!r}")
    return items


def nonnegative(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return n


def positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def check_names(p: argparse.ArgumentParser, *, models: Sequence[str] = (), tasks: Sequence[str] = ()) -> None:
    """Unknown models or tasks are usage errors (exit 2), found before any model loads."""
    from spt_jax import tasks as spt_tasks
    from spt_jax.errors import SptError

    for model in models:
        if model not in EMBEDDED and not Path(model).expanduser().exists():
            p.error(f"model {model!r} is neither an embedded model ({', '.join(EMBEDDED)}) nor an existing "
                    "checkpoint directory or .gguf file")
    for task in tasks:
        try:
            spt_tasks.get_task(task)
        except SptError as e:
            p.error(str(e))


def settings(args: argparse.Namespace, full: Mapping, quick: Mapping) -> argparse.Namespace:
    """Fill every flag left at None from the full or the quick settings."""
    chosen = quick if args.quick else full
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(run: Callable[[], int], prog: str) -> None:
    """Run an experiment as a command: a user mistake is one line and its exit code (2 bad input,
    3 the machine refused), Ctrl-C is 130; anything else is a bug and keeps its traceback."""
    from spt_jax.errors import SptError

    try:
        sys.exit(run())
    except SptError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing of this run was kept", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def log(message: str) -> None:
    print(f"[{_dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# the results folder


@contextlib.contextmanager
def results_folder(out: str | os.PathLike, label: str) -> Iterator[Path]:
    """A new ``out/YYYYmmdd-HHMMSS_label`` folder: write into the yielded path; it appears at its
    name only when the block succeeds (the library's `output_folder`), so no run overwrites another."""
    from spt_jax import evaluate

    target = evaluate.timestamped_dir(out, label)
    try:
        with evaluate.output_folder(target) as staging:
            yield staging.path
    except BaseException:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # the empty folder reserved for this run
        raise
    log(f"results: {target}")
    print(f"results: {target}", flush=True)


def run_header(name: str, args: argparse.Namespace) -> dict:
    """What every experiment's JSON starts with: what ran, where, with which settings and versions."""
    from spt_jax import evaluate

    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if not k.startswith("_")}
    return {"experiment": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": bool(args.quick),
            "settings": flags, "machine": machine(), "machine_line": machine_line(),
            "versions": evaluate.versions(), "platform": platform.platform()}


def write_json(path: Path, data) -> None:
    """JSON with NaN and infinities as null, so every reader can load it."""
    Path(path).write_text(json.dumps(_plain(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _plain(value):
    import numpy as np

    if isinstance(value, np.ndarray) or type(value).__module__.startswith(("numpy", "jax")):
        value = np.asarray(value).tolist()  # numpy/jax scalars and arrays as Python values
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return str(value)


def read_predictions(run_dir: Path) -> dict[str, list[dict]]:
    """predictions.jsonl of an `evaluate` folder, by mode, in item order."""
    from spt_jax import evaluate

    by_mode: dict[str, list[dict]] = {}
    for line in (Path(run_dir) / evaluate.PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_mode.setdefault(row["mode"], []).append(row)
    return by_mode


def hits(rows: Sequence[Mapping]) -> list[bool]:
    """Per item: right answer in the right format (what accuracy counts)."""
    return [bool(r["valid"] and r["correct"]) for r in rows]


# --------------------------------------------------------------------------------------------------
# tables and plots


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def safe_name(name: str) -> str:
    """A file-name part from a model or task name, which may be a path."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(name).rstrip("/")).name) or "x"


def fmt(value, digits: int = 3) -> str:
    """A number, or '-' when undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_estimate(estimate: Mapping | None) -> str:
    """``{"value", "low", "high"}`` as '0.500 [0.30, 0.70]'."""
    if not estimate or fmt(estimate.get("value")) == "-":  # undefined (no valid output): null or NaN
        return "-"
    return f"{fmt(estimate['value'])} [{fmt(estimate.get('low'), 2)}, {fmt(estimate.get('high'), 2)}]"


def mcnemar_table(tests: Sequence[dict]) -> str:
    """One row per paired test (`spt_jax.metrics.mcnemar` fields plus mode_a, mode_b and metric)."""
    return md_table(["McNemar", "metric", "difference", "only a right", "only b right", "p"],
                    [[f"{t['mode_a']} vs {t['mode_b']}", t["metric"].replace("_", " "), f"{t['difference']:+.3f}",
                      t["b"], t["c"], fmt_p(t["p_value"])] for t in tests])


def finish(out: Path, name: str, data: dict, summary: str) -> int:
    """Write ``summary.md`` and ``<name>.json`` into the results folder and print the summary."""
    (out / "summary.md").write_text(summary, encoding="utf-8")
    write_json(out / f"{name}.json", data)
    print(summary)
    return 0


def fmt_p(p) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.01 else f"{p:.3f}")


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def summary_head(title: str, header: Mapping, wall_time_s: float) -> str:
    """The top of every summary.md: what ran, on which machine, how long it took."""
    return (f"# {title}\n\n`{header['command']}`{' (quick: CI-sized, not a result)' if header['quick'] else ''}\n\n"
            f"{header['machine_line']}\n\nwall time {fmt_seconds(wall_time_s)}; spt_jax "
            f"{header['versions'].get('spt_jax')}, jax {header['versions'].get('jax')}\n")


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def load(name: str):
    """A model in float32 (the CPU dtype), logged with its load time."""
    from spt_jax import models

    clock = Stopwatch()
    lm = models.load(name, dtype="float32")
    log(f"loaded {name} ({lm.n_params / 1e6:.0f}M parameters) in {clock.seconds:.1f} s")
    return lm


# --------------------------------------------------------------------------------------------------
# memory


def rss_mib() -> dict:
    """This process's resident memory now (VmRSS) and its peak (VmHWM), in MiB, from /proc."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss_mib": fields.get("VmRSS"), "peak_mib": fields.get("VmHWM")}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs), so a later peak is
    the peak of what ran after this call; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
