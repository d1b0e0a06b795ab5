"""Peak resident memory of loading a model, each measurement in a fresh process.

    python benchmarks/load_memory.py                 # Gemma-3-270M GGUF -> float32 tensor stream
    python benchmarks/load_memory.py --dtype bfloat16

`measure(fn, *args)` runs `fn` in a spawned interpreter and reports that process's peak RSS
(`ru_maxrss`), so nothing the parent has imported or allocated counts. A baseline run that only
imports and reads the config separates the libraries' own footprint from the load itself. Add new
load paths (e.g. the full `spt_jax.models.load`) as module-level functions and list them in `CASES`.
"""

from __future__ import annotations

from machine import machine_line  # benchmarks/ is sys.path[0] when a script runs

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout


def _child(conn, fn: Callable[..., Any], args: tuple, without_torch: bool) -> None:
    if without_torch:  # as if torch were not installed: transformers then never imports it
        sys.modules["torch"] = None
    start = time.perf_counter()
    try:
        result, error = fn(*args), None
    except Exception as err:  # reported to the parent, which re-raises it
        result, error = None, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send({"peak_rss_mib": peak_kib / 1024, "seconds": seconds, "result": result, "error": error})
    conn.close()


def measure(fn: Callable[..., Any], *args, without_torch: bool = False) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process: ``{"peak_rss_mib", "seconds", "result"}``.

    ``fn`` must be importable (defined at module level) and return something picklable.
    ``without_torch`` hides an installed torch, which spt_jax does not need at run time.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(send, fn, args, without_torch))
    process.start()
    send.close()
    report = receive.recv()
    process.join()
    if report.pop("error"):
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in the child: {report}")
    return report


def _dtype(name: str):
    import ml_dtypes
    import numpy as np

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[name]


def gemma_path() -> str:
    from spt_jax.models.embedded import embedded_gguf_path

    return str(embedded_gguf_path("gemma3-270m"))


def imports_and_config(path: str, dtype_name: str) -> dict[str, Any]:
    """Baseline: the libraries a load needs, plus the metadata, and no tensor data."""
    from spt_jax.models import gguf_io

    _dtype(dtype_name)
    config = gguf_io.read_gguf_config(path)
    return {"model_type": config.model_type}


def iterate_gguf_tensors(path: str, dtype_name: str) -> dict[str, Any]:
    """Stream every tensor (dequantized, HF layout) and drop it: the GGUF side of a load."""
    from spt_jax.models import gguf_io

    count = elements = largest = total_bytes = 0
    for _name, array in gguf_io.iter_gguf_tensors(path, dtype=_dtype(dtype_name)):
        count += 1
        elements += array.size
        total_bytes += array.nbytes
        largest = max(largest, array.nbytes)
    return {"tensors": count, "parameters": elements, "all_tensors_mib": total_bytes / 2**20,
            "largest_tensor_mib": largest / 2**20}  # fmt: skip


def full_load(path: str, dtype_name: str) -> dict[str, Any]:
    """The whole `spt_jax.models.load`: config, tokenizer, and every tensor placed as a JAX array."""
    import jax

    from spt_jax import models

    lm = models.load(path, dtype=dtype_name)
    jax.block_until_ready(lm.params)
    return {"parameters": lm.n_params}


CASES = {
    "imports + config (baseline)": imports_and_config,
    "iter_gguf_tensors": iterate_gguf_tensors,
    "models.load (full)": full_load,
}
TARGET_MIB = {"models.load (full)": 2.5e9 / 2**20}  # issue 2: at most 2.5 GB for float32


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--without-torch", action="store_true", help="hide torch, as on a torch-free install")
    parser.add_argument("--path", help="GGUF file (default: the embedded Gemma-3-270M, assembled if needed)")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)  # the CPU kind this result holds for
    path = args.path or measure(gemma_path)["result"]
    file_mib = Path(path).stat().st_size / 2**20
    print(f"file: {path} ({file_mib:.0f} MiB), dtype {args.dtype}, torch {'hidden' if args.without_torch else 'importable'}")
    for label, fn in CASES.items():
        report = measure(fn, path, args.dtype, without_torch=args.without_torch)
        line = f"{label:>30}: peak RSS {report['peak_rss_mib']:7.0f} MiB  {report['seconds']:6.1f} s  {report['result']}"
        if label in TARGET_MIB:
            line += f"  ({report['peak_rss_mib'] / TARGET_MIB[label]:.2f}x the 2.5 GB target)"
        print(line)


if __name__ == "__main__":
    main()
