"""spt_jax: fair, cheap LLM benchmark evaluation by soft-prompt tuning, in JAX.

The data flow, one module a step (docs/architecture.md): ``tasks`` (a benchmark, its prompts and
answer format) -> ``sequence`` (the one token layout) -> a frozen LM from ``models`` with a prompt
prefix (``prefix``) -> ``tune`` (the loss) / ``generate`` / ``scoring`` -> the task's parser ->
``metrics`` -> ``report``; ``evaluate`` runs the protocol over its modes and ``cli`` is ``spt-jax``.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "tune", "tasks", "sequence", "prefix", "metrics", "generate", "scoring", "evaluate",
               "report")


def __getattr__(name):
    # Submodules load on first use, so `import spt_jax` stays cheap and `from spt_jax import tune` works.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES]
