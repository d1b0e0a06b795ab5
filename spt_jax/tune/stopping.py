"""When to stop tuning: the step at which an evaluated metric has saturated.

The rule (claim (a) as a number per run): the metric has saturated at the check where it first
reached ``threshold`` and then gained nothing over the next ``patience`` checks. Tuning stops at
the last of those checks, so it costs what it needs and no more; the step cap is ``TuneConfig.steps``.
"""

from __future__ import annotations

from collections.abc import Sequence


def saturation_step(points: Sequence[tuple[int, float]], threshold: float, patience: int) -> int | None:
    """The step at which ``(step, value)`` points saturated, or None while they have not.

    A plateau starts at a point whose value is at least ``threshold`` and no higher than every one
    of the ``patience`` points after it can better; the plateau's first step is returned once those
    ``patience`` later points exist.
    """
    for i, (step, value) in enumerate(points):
        later = [v for _, v in points[i + 1 : i + 1 + patience]]
        if value >= threshold and len(later) == patience and max(later) <= value:
            return int(step)
    return None
