"""What machine a benchmark ran on: every benchmark prints this first, and `run_all.py` records it.

A speed ratio holds only on the CPU kind it was measured on (XLA's GEMM speed and BF16 support differ
between AMD Zen 4 and Intel Ice Lake), so each result names the CPU model, the flags that decide the
BF16/AMX paths, the threads, the XLA flags in force and the load average. Virtual machines often
name the CPU only "AMD EPYC", so the line adds the CPU family and model (Zen 1: family 23, Zen 3:
25 model 1, Zen 4: 25 model 17) and the widest vector instructions (avx512, avx2), which decide
XLA's GEMM speed.
"""

from __future__ import annotations

import os
import platform

BF16_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
VECTOR_FLAGS = ("avx512f", "avx2", "avx")  # widest first


def _cpuinfo() -> dict[str, str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return dict(line.split(":", 1) for line in first.splitlines() if ":" in line)


def machine() -> dict:
    info = {k.strip(): v.strip() for k, v in _cpuinfo().items()}
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model": (f"family {info['cpu family']} model {info.get('model', '?')}"
                             if "cpu family" in info else None),
        "vector_isa": next((f.removesuffix("f") for f in VECTOR_FLAGS if f in flags), "none"),
        "cpu_flags": {flag: flag in flags for flag in BF16_FLAGS},
        "cores": os.cpu_count(),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")
                    if os.environ.get(k)},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": round(os.getloadavg()[0], 2),
    }


def machine_line() -> str:
    m = machine()
    flags = ",".join(f for f, on in m["cpu_flags"].items() if on) or "none"
    kind = ", ".join(x for x in (m["cpu_family_model"], m["vector_isa"]) if x)
    return (f"MACHINE cpu={m['cpu']!r} ({kind}) bf16/amx flags: {flags}; cores {m['cores']}; "
            f"XLA_FLAGS={m['xla_flags'] or '(none)'}; load {m['load_average']}")
