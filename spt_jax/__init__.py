"""spt_jax: fair, cheap LLM benchmark evaluation by soft-prompt tuning, in JAX.

The data flow, one module a step: ``tasks`` (a benchmark and its answer format) -> ``tune`` (batches,
a frozen LM from ``models`` with a trainable prompt prefix, the loss) -> ``generate`` -> the task's
parser -> ``metrics``; ``evaluate`` runs the whole protocol and ``cli`` is the ``spt-jax`` command.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "tune", "tasks", "metrics", "generate", "scoring", "evaluate", "report")


def __getattr__(name):
    # Submodules load on first use, so `import spt_jax` stays cheap and `from spt_jax import tune` works.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES]
