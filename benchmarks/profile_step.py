"""Where a prompt-tuning step's time goes on this CPU: the JAX profiler's trace of the step, each
op's wall time shared with the ops running beside it, summed by kind.

The step is `benchmarks/tune_step.py`'s (batch 8, P=10 + 64 tokens, the same rows and buckets, one
device). Its ops run on XLA's worker threads, often two at once (the MLP's gate and up products side
by side, each on a core), so an op's own duration overstates what it costs the step: here each
moment of the trace is split evenly between the ops running then ("fair share"), which sums to the
time the step's threads were busy. Ops are named by the compiled HLO and sorted into kinds:

- matmuls: dots without batch dimensions (projections, MLP, vocabulary head), with their FLOPs;
- attention matmuls: batched dots (scores, weighted values) and what XLA fused with them;
- weight slices: each layer's weights copied out of the stacked ``[L, ...]`` arrays by the scan;
- scan residual stacks: the stacked activations the backward pass reads (their zero fill, writes, reads);
- other: norms, activations, rotary embeddings, softmax, copies, loop control;
- gaps: no op running (dispatch, synchronisation).

Run: ``python benchmarks/profile_step.py [--model gemma3-270m] [--steps 3]``. It prints a table and a
``SUMMARY`` line (`make benchmarks` keeps it); on a new CPU kind it is the profile the step's
targets are read against (BUILD_NOTES.md, issue 11).
"""

from __future__ import annotations

import tune_step  # benchmarks/ is sys.path[0] when a script runs
from machine import machine_line

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import re
import statistics
import tempfile

KINDS = ("matmuls", "attention matmuls", "weight slices", "scan residual stacks", "other", "gaps")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Op:
    """One HLO instruction as the profile needs it."""

    name: str
    shape: tuple[int, ...] | None  # None for tuples and tokens
    opcode: str
    op_name: str  # the JAX-side name in its metadata ("" if none)
    calls: str | None  # the computation a fusion calls


@dataclasses.dataclass(frozen=True)
class Module:
    """A compiled module's instructions by name, their text lines, and each computation's names."""

    ops: dict[str, Op]
    lines: dict[str, str]
    computations: dict[str, list[str]]


def parse_hlo(text: str) -> Module:
    """The instructions of a compiled module's text (``compiled.as_text()``)."""
    ops, lines, computations, current = {}, {}, {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            computations[current] = []
            continue
        match = _INSTRUCTION.match(line)
        if not match or current is None:
            continue
        name, shape, opcode, rest = match.groups()
        dims = _SHAPE.match(shape)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        op = Op(name=name, shape=tuple(int(d) for d in dims.group(1).split(",") if d) if dims else None,
                opcode=opcode, op_name=op_name.group(1) if op_name else "", calls=calls.group(1) if calls else None)
        ops[name], lines[name] = op, line
        computations[current].append(name)
    return Module(ops, lines, computations)


def dot_of(op: Op, module: Module) -> tuple[bool, float] | None:
    """``(batched, FLOPs)`` of the dot ``op`` is or fuses, or None if it has none."""
    names = [op.name] if op.opcode == "dot" else module.computations.get(op.calls, []) if op.calls else []
    for line in (module.lines[name] for name in names):
        match = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\)", line)
        if not match:
            continue
        out = [int(d) for d in match.group(1).split(",") if d]
        lhs = module.ops[match.group(2)].shape or ()
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
        k = math.prod(lhs[int(i)] for i in contracting.split(",") if i)
        batched = bool(re.search(r"lhs_batch_dims=\{\d", line))
        return batched, 2.0 * math.prod(out) * k
    return None


def kind_of(op: Op, module: Module, stacked_layers: set[int]) -> str:
    """Which of `KINDS` an op belongs to (see the module docstring); ``stacked_layers``: the leading
    sizes a scan's stacked residuals have (the layers it scans)."""
    dot = dot_of(op, module)
    if dot is not None:
        return "attention matmuls" if dot[0] else "matmuls"
    path = op.op_name
    if "dynamic_update_index_in_dim" in path:
        return "scan residual stacks"  # the forward scan writing a layer's activations
    if "dynamic_index_in_dim" in path:  # inside the layer: its weights; outside: a residual read back
        return "weight slices" if "closed_call" in path else "scan residual stacks"
    if (op.opcode in ("fusion", "copy", "broadcast") and op.shape and len(op.shape) >= 3
            and op.shape[0] in stacked_layers and ("broadcast" in op.name or op.opcode == "copy")):
        return "scan residual stacks"  # a stack's zero fill, or a copy of one
    return "other"


def fair_share(events) -> tuple[dict[str, float], float, float]:
    """``events``: (name, start, duration) of ops on any threads. Each instant is split evenly between
    the ops running then. Returns (microseconds per name, busy microseconds, span microseconds)."""
    points = sorted(p for i, (_, start, dur) in enumerate(events) for p in ((start, 1, i), (start + dur, -1, i)))
    share, active, busy, last = collections.Counter(), set(), 0.0, None
    for t, change, i in points:
        if active and last is not None and t > last:
            for j in active:
                share[events[j][0]] += (t - last) / len(active)
            busy += t - last
        last = t
        (active.add if change == 1 else active.discard)(i)
    span = (points[-1][0] - points[0][0]) if points else 0.0
    return dict(share), busy, span


def trace_events(trace_dir: str, known: dict[str, Op]) -> list[tuple[str, float, float]]:
    """The HLO ops' (name, start, duration) events from a `jax.profiler.trace` directory, leaving out
    any event that encloses another on its thread (a loop or call around its body's ops)."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        raw = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("name") in known]
    by_thread = collections.defaultdict(list)
    for e in raw:
        by_thread[(e["pid"], e["tid"])].append((e["name"], float(e["ts"]), float(e.get("dur", 0))))
    events = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e[1], -e[2]))
        for i, (name, start, dur) in enumerate(thread):
            following = thread[i + 1] if i + 1 < len(thread) else None
            if following and following[1] < start + dur and following[1] + following[2] <= start + dur:
                continue  # encloses the next op: a wrapper
            events.append((name, start, dur))
    return events


def profile(lm, steps: int) -> dict:
    """Run the benchmark's step, trace ``steps`` of it, and sum the fair shares by kind (ms a step)."""
    import jax

    from spt_jax.tune.mesh import mesh_context

    specials = tune_step.Specials.of(lm)
    batch, one_step, train_step = tune_step.spt_jax_step(lm, tune_step.make_rows(specials), specials)
    one_step()  # compiles
    with mesh_context(train_step.mesh):  # the step's executable again, from jax's in-memory cache (no recompile)
        prompt = jax.numpy.zeros((tune_step.P, lm.config.d_model), lm.dtype)
        compiled = train_step.jitted.lower(prompt, train_step.init(prompt), lm.params, batch).compile()
    module = parse_hlo(compiled.as_text())
    one_step()
    wall = statistics.median(tune_step.time_calls(one_step, max(steps, 5)))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                one_step()
        events = trace_events(trace_dir, module.ops)
    share, busy, span = fair_share(events)
    layers = lm.config.n_layers
    per_kind, flops, counts = collections.Counter(), 0.0, collections.Counter(name for name, _, _ in events)
    top = []
    for name, us in share.items():
        op = module.ops[name]
        kind = kind_of(op, module, {layers - 1, layers})
        per_kind[kind] += us / steps / 1e3
        if kind == "matmuls":
            flops += dot_of(op, module)[1] * counts[name] / steps
        top.append((us / steps / 1e3, counts[name] // steps, name, kind, op.op_name))
    per_kind["gaps"] = max(span - busy, 0.0) / steps / 1e3
    return {"wall_ms": wall * 1e3, "traced_ms": span / steps / 1e3, "kinds": {k: per_kind[k] for k in KINDS},
            "matmul_gflop": flops / 1e9, "top": sorted(top, reverse=True)[:12],
            "rows": f"{batch['prefix_tokens'].shape[1]}-slot prefix + {tune_step.B} x {batch['tokens'].shape[1]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tune_step.MODELS, default=tune_step.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    from spt_jax import models

    result = profile(models.load(args.model, dtype="float32"), args.steps)
    kinds, traced = result["kinds"], result["traced_ms"]
    print(f"{args.model}, float32, {result['rows']} slots: {result['wall_ms']:.0f} ms a step untraced, "
          f"{traced:.0f} ms traced (median of {max(args.steps, 5)} / mean of {args.steps}), "
          f"matmuls {result['matmul_gflop']:.1f} GFLOP")
    for kind, ms in kinds.items():
        rate = f"  {result['matmul_gflop'] / ms * 1e3:6.1f} GFLOP/s" if kind == "matmuls" and ms else ""
        print(f"  {kind:22s} {ms:8.1f} ms  {100 * ms / traced:5.1f}%{rate}")
    print("largest ops (ms a step, calls a step, kind, JAX op):")
    for ms, calls, name, kind, op_name in result["top"]:
        print(f"  {ms:7.1f}  {calls:3d}x  {name:34s} {kind:22s} {op_name[-70:]}")
    print(f"SUMMARY profile_step {args.model}: {traced:.0f} ms traced; " + ", ".join(
        f"{kind} {100 * ms / traced:.0f}%" for kind, ms in kinds.items())
        + f"; matmuls at {result['matmul_gflop'] / kinds['matmuls'] * 1e3:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
