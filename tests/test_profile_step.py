"""`benchmarks/profile_step.py`: the fair-share attribution, the HLO reading and a traced step end to end."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step as ps  # noqa: E402
from tune_support import tiny_lm  # noqa: E402


def test_fair_share_splits_overlaps_evenly_and_counts_gaps():
    events = [("a", 0.0, 10.0), ("b", 5.0, 10.0), ("c", 20.0, 10.0)]
    share, busy, span = ps.fair_share(events)
    assert share == pytest.approx({"a": 7.5, "b": 7.5, "c": 10.0})
    assert (busy, span) == (25.0, 30.0)  # the 5 us between b and c ran nothing


def test_trace_events_drop_wrappers(tmp_path):
    known = {name: None for name in ("while.1", "dot.1", "add.2", "copy.3")}
    x = lambda name, ts, dur, tid=1: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}  # noqa: E731
    events = [x("while.1", 0, 100), x("dot.1", 1, 40), x("add.2", 50, 30), x("copy.3", 10, 20, tid=2),
              x("ThunkExecutor::Execute", 0, 200)]  # not an HLO op: ignored
    path = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    kept = sorted(ps.trace_events(str(tmp_path), known))
    assert kept == [("add.2", 50.0, 30.0), ("copy.3", 10.0, 20.0), ("dot.1", 1.0, 40.0)]


def test_dots_are_found_with_their_flops_and_batching():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    module = ps.parse_hlo(jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(a, b).compile().as_text())
    dots = [ps.dot_of(op, module) for op in module.ops.values()]
    assert (False, 2.0 * 8 * 16 * 4) in dots
    q, k = jnp.ones((2, 3, 5, 8)), jnp.ones((2, 3, 7, 8))
    module = ps.parse_hlo(jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)).lower(q, k).compile().as_text())
    assert (True, 2.0 * 2 * 3 * 5 * 7 * 8) in [ps.dot_of(op, module) for op in module.ops.values()]


def test_a_traced_step_is_attributed_to_every_kind():
    import tune_step as ts

    lm = tiny_lm(n_layers=3)
    result = ps.profile(lm, steps=2)
    kinds = result["kinds"]
    assert set(kinds) == set(ps.KINDS)
    for kind in ("matmuls", "attention matmuls", "weight slices", "scan residual stacks", "other"):
        assert kinds[kind] > 0, kind
    busy = sum(ms for kind, ms in kinds.items() if kind != "gaps")
    assert busy + kinds["gaps"] == pytest.approx(result["traced_ms"], rel=1e-6)
    assert result["wall_ms"] > 0
    # The dots XLA ran are the FLOPs tune_step.py's compute bound counts, less attention's batched dots.
    c, specials = lm.config, ts.Specials.of(lm)
    batch, _, _ = ts.spt_jax_step(lm, ts.make_rows(specials), specials)
    prefix, T, N = batch["prefix_tokens"].shape[1], batch["tokens"].shape[1], batch["target_ids"].shape[0]
    layers, head = ts.step_flops(c, prefix, T, N)
    attention = 2 * 2 * c.n_layers * c.n_heads * c.head_dim * (prefix * prefix + ts.B * T * (prefix + T))
    assert result["matmul_gflop"] * 1e9 == pytest.approx(layers - 3 * attention + head, rel=1e-9)


def test_cold_weight_rate_calls_every_layers_own_weights_once(monkeypatch):
    """tune_step.py's cold-weight GEMM rate: each of the L layers' 7 matmuls, on weights of its own,
    timed with one call per form (a second back-to-back call would find the weight in cache)."""
    import tune_step as ts

    config = tiny_lm(n_layers=3).config
    counts = []
    monkeypatch.setattr(ts, "time_calls", lambda fn, n: counts.append(n) or [1e-3] * n)
    rates = {library: sample() for library, sample in ts.cold_layer_rate_samplers(config, 16).items()}
    flops = config.n_layers * sum(2 * m * k * n for m, k, n in ts._layer_shapes(config, 16))
    assert rates == {"XLA": (pytest.approx(flops / (config.n_layers * 7 * 1e-3)),),
                     "PyTorch": (pytest.approx(flops / (config.n_layers * 7 * 1e-3)),)}
    assert set(counts) == {1} and len(counts) == 2 * 2 * config.n_layers * 7  # 2 libraries x 2 layouts
