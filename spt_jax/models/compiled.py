"""`CompileCache`: the jitted functions and derived tables built for one loaded model.

Generation, scoring and tuning compile functions specialised to a model (its graph definition, its
shardings) and derive tables from its tokenizer (stop-token masks). They keep them here, in an object
the `LM` carries, instead of in module-level dicts: two models in one process never share an entry,
dropping the model drops its compilations, and ``traces`` counts exactly this model's compilations
(one trace of a jitted function = one XLA compilation), so tests can assert exact numbers.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax


class CompileCache:
    """Per-model memo of jitted functions (``jit``) and other derived values (``memo``)."""

    def __init__(self):
        self._entries: dict[Hashable, Any] = {}
        self.traces: collections.Counter = collections.Counter()

    def counted(self, name: str, fn: Callable) -> Callable:
        """``fn`` wrapped to count its traces under ``name``: jit the result to count compilations."""

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.traces[name] += 1  # runs only while tracing, i.e. once per compilation
            return fn(*args, **kwargs)

        return counted

    def jit(self, name: str, fn: Callable, **jit_kwargs) -> Callable:
        """``jax.jit(fn, **jit_kwargs)``, built once per (name, kwargs); traces counted under ``name``.

        The options must be hashable (static names, donation); a step whose shardings depend on a
        mesh builds its own jit inside `memo`, keyed by the mesh, with `counted`.
        """
        key = ("jit", name, tuple(sorted(jit_kwargs.items())))
        return self.memo(key, lambda: jax.jit(self.counted(name, fn), **jit_kwargs))

    def memo(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value stored under ``key``, built by ``build()`` on first use."""
        if key not in self._entries:
            self._entries[key] = build()
        return self._entries[key]

    def compilations(self, name: str | None = None) -> int:
        """Compilations of the function ``name`` (all functions when None)."""
        return sum(self.traces.values()) if name is None else self.traces[name]


# JAX's own compile-time events: tracing to a jaxpr, lowering to MLIR, the XLA backend compile.
_COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
})


class CompileClock:
    """Seconds JAX spent compiling (tracing, lowering, XLA) while the ``with`` block ran.

    It listens to `jax.monitoring`'s duration events only inside the block, so a run can say how
    much of each phase's wall time was compilation rather than work.
    """

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)

