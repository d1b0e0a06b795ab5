"""Tuning checkpoints with Orbax: the prompt, optimizer state, step, data order, config, history
and evaluations so far (so a resumed run reports the same evaluations as an uninterrupted one).

Never the frozen weights: a checkpoint is a few kilobytes whatever the model size. Orbax writes each
step to a temporary directory and renames it when complete (atomic), and in a multi-host run the
primary host writes replicated arrays and the JSON once. If the newest step cannot be read, the
previous one is used with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from spt_jax.errors import DataError

STATE, META = "state", "meta"


class TuneCheckpoints:
    """An Orbax `CheckpointManager` over ``directory`` holding ``{prompt, opt_state}`` + JSON meta."""

    def __init__(self, directory, keep: int = 3):
        self.directory = Path(directory).expanduser().absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=(STATE, META),
        )

    def save(self, step: int, prompt, opt_state, meta: dict) -> None:
        """Start writing step ``step`` (asynchronously; `close` waits for it)."""
        # Copies: the train step donates prompt and opt_state, and the write may still be running.
        state = jax.tree.map(jnp.copy, {"prompt": prompt, "opt_state": opt_state})
        self.manager.save(
            step,
            args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state) -> tuple[int, dict, dict] | None:
        """``(step, {prompt, opt_state}, meta)`` of the newest readable step, or None when empty.

        ``abstract_state`` is ``{prompt, opt_state}`` of `jax.ShapeDtypeStruct` with shardings.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
                    ),
                )
            except Exception as e:  # Orbax/TensorStore raise many types for a damaged step
                failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                warnings.warn(
                    f"{self.directory}: checkpoint step {step} is unreadable ({failures[-1]}); "
                    "trying the previous one",
                    stacklevel=2,
                )
                continue
            return step, restored[STATE], restored[META]
        if failures:
            raise DataError(
                f"{self.directory}: no readable checkpoint ({'; '.join(failures)}); remove the "
                "directory to start over"
            )
        return None

    def close(self) -> None:
        """Wait for pending writes and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> TuneCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
