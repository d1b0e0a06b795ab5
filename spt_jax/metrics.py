"""Metrics that keep format validity apart from correctness, with intervals and paired tests.

An evaluation produces, per item, two booleans: ``valid`` (the output parsed into the task's answer
format) and ``correct`` (the parsed answer matched the gold one). Three rates follow from them:

* format validity      = valid / n           -- did the model learn the answer format?
* accuracy             = (correct & valid) / n -- the usual headline number; an unparsable answer is wrong
* knowledge accuracy   = (correct & valid) / valid -- what the model knows once the format is out of the way

so ``accuracy == format_validity * knowledge_accuracy`` whenever at least one output is valid. Soft-prompt
tuning exists to push format validity to ~1, after which accuracy and knowledge accuracy agree.

Everything here is a pure function: numpy-like arrays in, plain Python floats / ints / dicts out (so a
result drops straight into ``json.dumps``; NaN marks an undefined value). Bad inputs raise
`spt_jax.errors.DataError` (the data) or `spt_jax.errors.ConfigError` (a parameter such as
``confidence``), both ``ValueError`` subclasses, with a message naming the argument and the expected form.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Callable

import numpy as np
import scipy.stats

from spt_jax.errors import ConfigError, DataError

# Below this many discordant pairs McNemar's chi-square approximation is poor, so the exact binomial
# test is used instead (a common rule of thumb; statsmodels and most textbooks use 25).
MCNEMAR_EXACT_BELOW = 25


class UndefinedCorrelationWarning(RuntimeWarning):
    """A rank correlation was asked of data that cannot define one (too few points, a constant vector)."""


# --------------------------------------------------------------------------------------------------
# input checks


def _as_bool_vector(name: str, values) -> np.ndarray:
    """``values`` as a 1-D bool array, refusing anything that is not True/False or 0/1 per item."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(
            f"{name} must be a 1-D sequence of booleans (True/False or 0/1), one per item; "
            f"got an array of shape {array.shape}"
        )
    if array.dtype == bool:
        return array
    if array.size == 0:
        return array.astype(bool)
    if array.dtype.kind not in "iuf":
        raise DataError(
            f"{name} must hold booleans (True/False or 0/1), one per item; got dtype {array.dtype}"
        )
    not_binary = ~np.isin(array, (0, 1))  # NaN is neither 0 nor 1, so it is refused here too
    if not_binary.any():
        where = np.flatnonzero(not_binary)[:5]
        raise DataError(
            f"{name} must hold booleans (True/False or 0/1), one per item; "
            f"got {array[where].tolist()} at positions {where.tolist()}"
        )
    return array.astype(bool)


def _as_score_vector(name: str, values) -> np.ndarray:
    """``values`` as a 1-D float array of finite scores (one per model)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(
            f"{name} must be a 1-D sequence of numbers, one per model; got an array of shape {array.shape}"
        )
    if array.size and array.dtype.kind not in "biuf":
        raise DataError(f"{name} must hold real numbers, one per model; got dtype {array.dtype}")
    array = array.astype(float)
    bad = ~np.isfinite(array)
    if bad.any():
        raise DataError(
            f"{name} must hold finite numbers; got NaN or inf at positions "
            f"{np.flatnonzero(bad)[:5].tolist()} (drop those models from both sequences first)"
        )
    return array


def _same_length(**named: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in named.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}={length}" for name, length in lengths.items())
        names = " and ".join(lengths)
        raise DataError(f"{names} must have the same length (one entry per item); got {listed}")
    return next(iter(lengths.values()))


def _non_empty(name: str, array: np.ndarray) -> None:
    if len(array) == 0:
        raise DataError(f"{name} is empty; a rate needs at least one item")


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating, np.integer)):
        raise ConfigError(
            f"confidence must be a number strictly between 0 and 1 (e.g. 0.95); got {confidence!r}"
        )
    if not 0.0 < float(confidence) < 1.0:
        raise ConfigError(f"confidence must be strictly between 0 and 1 (e.g. 0.95); got {confidence!r}")
    return float(confidence)


def _check_n_resamples(n_resamples) -> int:
    try:
        count = operator.index(n_resamples)
    except TypeError:
        raise ConfigError(
            f"n_resamples must be a positive integer (e.g. 2000); got {n_resamples!r}"
        ) from None
    if count < 1:
        raise ConfigError(f"n_resamples must be a positive integer (e.g. 2000); got {n_resamples!r}")
    return count


def _estimate(value: float, low: float, high: float) -> dict:
    return {"value": float(value), "low": float(low), "high": float(high)}


# --------------------------------------------------------------------------------------------------
# rates


def format_validity(valid) -> float:
    """Share of outputs that parsed into the answer format."""
    valid = _as_bool_vector("valid", valid)
    _non_empty("valid", valid)
    return float(valid.mean())


def accuracy(correct, valid=None) -> float:
    """Share of items answered correctly, where an invalid (unparsable) output counts as wrong.

    With ``valid`` given, an item counts only if it is both correct and valid, so a parser that marks
    some invalid outputs "correct" cannot inflate the score.
    """
    correct = _as_bool_vector("correct", correct)
    if valid is not None:
        valid = _as_bool_vector("valid", valid)
        _same_length(correct=correct, valid=valid)
        correct = correct & valid
    _non_empty("correct", correct)
    return float(correct.mean())


def knowledge_accuracy(valid, correct) -> float:
    """Share correct among the valid outputs; NaN when no output is valid (nothing to judge)."""
    valid = _as_bool_vector("valid", valid)
    correct = _as_bool_vector("correct", correct)
    _same_length(valid=valid, correct=correct)
    _non_empty("valid", valid)
    return _hits_among(valid, correct & valid)


def _hits_among(valid: np.ndarray, hits: np.ndarray) -> float:
    n_valid = int(valid.sum())
    return float(hits.sum() / n_valid) if n_valid else math.nan


# --------------------------------------------------------------------------------------------------
# intervals


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(nan, nan)`` when ``n == 0``.

    Wilson rather than the normal (Wald) interval because benchmark rates sit near 0 or 1 and test sets
    can be small, where Wald collapses to zero width or leaves [0, 1]. The interval always contains
    ``successes / n``.
    """
    confidence = _check_confidence(confidence)
    try:
        successes, n = operator.index(successes), operator.index(n)
    except TypeError:
        raise DataError(
            f"successes and n must be integers with 0 <= successes <= n; got successes={successes!r}, n={n!r}"
        ) from None
    if n < 0 or not 0 <= successes <= n:
        raise DataError(f"successes and n must satisfy 0 <= successes <= n; got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    interval = scipy.stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(interval.low), float(interval.high))


def _bootstrap_distribution(
    statistic: Callable[..., float], arrays: tuple[np.ndarray, ...], n_resamples: int, seed
) -> np.ndarray:
    """The statistic on ``n_resamples`` resamples of the items (same indices for every array)."""
    n_items = len(arrays[0])
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for r in range(n_resamples):
        indices = rng.integers(0, n_items, size=n_items)  # [n_items], drawn with replacement
        values[r] = float(statistic(*(array[indices] for array in arrays)))
    return values


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Central percentile interval of the non-NaN ``values``; ``(nan, nan)`` if there are none."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return (float(low), float(high))


def _check_bootstrap_arrays(arrays) -> tuple[np.ndarray, ...]:
    if not arrays:
        raise DataError("bootstrap needs at least one array of per-item values to resample")
    arrays = tuple(np.asarray(array) for array in arrays)
    for position, array in enumerate(arrays):
        if array.ndim == 0:
            raise DataError(
                f"arrays[{position}] must have one entry per item along its first axis; got a scalar"
            )
    _same_length(**{f"arrays[{position}]": array for position, array in enumerate(arrays)})
    _non_empty("arrays[0]", arrays[0])
    return arrays


def bootstrap_interval(
    statistic: Callable[..., float],
    *arrays,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling items jointly.

    All arrays are indexed by the same resampled item indices (their first axis is the item axis),
    so per-item pairings such as (valid, correct) survive resampling. Resamples on which the
    statistic is NaN (e.g. knowledge accuracy with no valid item drawn) are left out; if all are,
    the interval is ``(nan, nan)``. Deterministic for a given ``seed``.
    """
    if not callable(statistic):
        raise ConfigError(f"statistic must be a function of the resampled arrays; got {statistic!r}")
    arrays = _check_bootstrap_arrays(arrays)
    n_resamples = _check_n_resamples(n_resamples)
    confidence = _check_confidence(confidence)
    return _percentile_interval(_bootstrap_distribution(statistic, arrays, n_resamples, seed), confidence)


# --------------------------------------------------------------------------------------------------
# one mode on one benchmark


@dataclasses.dataclass(frozen=True)
class Metric:
    """A per-run metric, declared once: results rows, the table, the plots, compare and the schema
    document all read `METRICS`.

    ``estimate(valid, hits, confidence, n_resamples, seed)`` returns ``{"value", "low", "high"}``;
    ``hits`` is correct AND valid. ``reference`` says whether it means anything for a format-free
    reference scorer (whose answers are valid by construction); ``shown`` whether the results table
    and the plot show it (a variant interval may live in results.json only).
    """

    name: str
    label: str
    description: str
    estimate: Callable[..., dict]
    reference: bool = True
    shown: bool = True


def _format_validity(valid, hits, confidence, n_resamples, seed) -> dict:
    n, n_valid = len(valid), int(valid.sum())
    return _estimate(n_valid / n, *wilson_interval(n_valid, n, confidence))


def _accuracy(valid, hits, confidence, n_resamples, seed) -> dict:
    n, n_correct = len(valid), int(hits.sum())
    return _estimate(n_correct / n, *wilson_interval(n_correct, n, confidence))


def _knowledge_accuracy(valid, hits, confidence, n_resamples, seed) -> dict:
    return _estimate(_hits_among(valid, hits), *wilson_interval(int(hits.sum()), int(valid.sum()), confidence))


def _knowledge_accuracy_bootstrap(valid, hits, confidence, n_resamples, seed) -> dict:
    interval = _percentile_interval(
        _bootstrap_distribution(_hits_among, (valid, hits), n_resamples, seed), confidence
    )
    return _estimate(_hits_among(valid, hits), *interval)


METRICS: tuple[Metric, ...] = (
    Metric("format_validity", "format validity", "valid / n: did the model produce the required format?",
           _format_validity, reference=False),
    Metric("accuracy", "accuracy", "correct / n: the usual headline number; an unparsable answer is wrong",
           _accuracy),
    Metric("knowledge_accuracy", "knowledge accuracy",
           "correct / valid: what the model knows once the format is out of the way", _knowledge_accuracy,
           reference=False),
    Metric("knowledge_accuracy_bootstrap", "knowledge accuracy (bootstrap)",
           "knowledge accuracy with a percentile bootstrap interval over all items", _knowledge_accuracy_bootstrap,
           reference=False, shown=False),
)


def metric_names(*, shown_only: bool = False) -> tuple[str, ...]:
    return tuple(m.name for m in METRICS if m.shown or not shown_only)


def summarize(
    valid, correct, confidence: float = 0.95, n_resamples: int = 2000, seed: int | None = 0
) -> dict:
    """Every metric of `METRICS` for one run, each with an interval.

    Returns a JSON-ready dict::

        n, n_valid, n_correct (correct AND valid), confidence,
        format_validity, accuracy, knowledge_accuracy, knowledge_accuracy_bootstrap:
            {"value", "low", "high"}

    format_validity and accuracy carry Wilson intervals over all n items. knowledge_accuracy carries a
    Wilson interval over the n_valid valid items, i.e. it treats the number of valid outputs as fixed;
    that is exact for "how good are the answers this run produced" but ignores that a rerun would
    produce a different valid subset. knowledge_accuracy_bootstrap has the same value with a percentile
    bootstrap interval over all items (``n_resamples``, ``seed``), which does include that variation,
    and is the one to quote when format validity is well below 1. With no valid output the knowledge
    accuracy value and intervals are NaN.
    """
    valid = _as_bool_vector("valid", valid)
    correct = _as_bool_vector("correct", correct)
    n = _same_length(valid=valid, correct=correct)
    _non_empty("valid", valid)
    confidence = _check_confidence(confidence)
    n_resamples = _check_n_resamples(n_resamples)

    hits = correct & valid  # an invalid output is wrong, whatever `correct` says
    out = {"n": n, "n_valid": int(valid.sum()), "n_correct": int(hits.sum()), "confidence": confidence}
    for metric in METRICS:
        out[metric.name] = metric.estimate(valid, hits, confidence, n_resamples, seed)
    return out


# --------------------------------------------------------------------------------------------------
# two modes on the same items


def _paired(correct_a, correct_b) -> tuple[np.ndarray, np.ndarray, int]:
    correct_a = _as_bool_vector("correct_a", correct_a)
    correct_b = _as_bool_vector("correct_b", correct_b)
    n = _same_length(correct_a=correct_a, correct_b=correct_b)
    _non_empty("correct_a", correct_a)
    return correct_a, correct_b, n


def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's test of two modes (e.g. zero-shot vs soft prompt) scored on the same items.

    Only discordant items carry information: b = a right and b wrong, c = a wrong and b right.
    When b + c < 25 the p-value is the exact two-sided binomial test of b ~ Bin(b + c, 1/2) and
    ``statistic`` is min(b, c) (method "exact"); otherwise ``statistic`` is the continuity-corrected
    chi-square max(|b - c| - 1, 0)^2 / (b + c) on 1 degree of freedom (method "chi2"). The correction
    is clipped at 0 so that b == c gives statistic 0 and p 1. b + c == 0 gives p 1.
    ``difference`` is accuracy(a) - accuracy(b) = (b - c) / n. Pass ``correct & valid`` per mode.
    Swapping a and b swaps b and c, negates the difference and leaves statistic and p unchanged.
    """
    correct_a, correct_b, n = _paired(correct_a, correct_b)
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    discordant = b + c
    if discordant < MCNEMAR_EXACT_BELOW:
        method = "exact"
        statistic = float(min(b, c))
        p_value = 1.0 if discordant == 0 else float(scipy.stats.binomtest(b, discordant, 0.5).pvalue)
    else:
        method = "chi2"
        statistic = max(abs(b - c) - 1, 0) ** 2 / discordant
        p_value = float(scipy.stats.chi2.sf(statistic, df=1))
    return {
        "n": n,
        "b": b,
        "c": c,
        "statistic": float(statistic),
        "p_value": min(p_value, 1.0),
        "method": method,
        "difference": (b - c) / n,
    }


def _mean_difference(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    return float(correct_a.mean() - correct_b.mean())


def paired_bootstrap(
    correct_a, correct_b, n_resamples: int = 2000, confidence: float = 0.95, seed: int | None = 0
) -> dict:
    """Accuracy difference a - b on the same items, with a paired bootstrap interval and p-value.

    Items are resampled jointly, so the correlation between the two modes (same questions) narrows
    the interval as it should. The two-sided p-value for "no difference" shifts the bootstrap
    distribution to the null: p = (1 + #{|d* - d| >= |d|}) / (1 + n_resamples), where d is the observed
    difference and d* a resampled one (Efron & Tibshirani, ch. 16); it is never 0 and is 1 when d == 0.
    Returns {"n", "difference": {"value", "low", "high"}, "p_value", "n_resamples"}.
    Swapping a and b negates the difference and interval and keeps the p-value.
    """
    correct_a, correct_b, n = _paired(correct_a, correct_b)
    n_resamples = _check_n_resamples(n_resamples)
    confidence = _check_confidence(confidence)
    observed = _mean_difference(correct_a, correct_b)
    resampled = _bootstrap_distribution(_mean_difference, (correct_a, correct_b), n_resamples, seed)
    # The tolerance keeps resamples that sit exactly on the boundary from being lost to rounding.
    extreme = np.abs(resampled - observed) >= abs(observed) - 1e-12
    p_value = (1 + int(extreme.sum())) / (1 + n_resamples)
    return {
        "n": n,
        "difference": _estimate(observed, *_percentile_interval(resampled, confidence)),
        "p_value": float(p_value),
        "n_resamples": n_resamples,
    }


# --------------------------------------------------------------------------------------------------
# agreement between rankings of models (e.g. soft-prompt scores vs a reference leaderboard)


def _scores(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = _as_score_vector("x", x)
    y = _as_score_vector("y", y)
    _same_length(x=x, y=y)
    return x, y


def _undefined_reason(x: np.ndarray, y: np.ndarray) -> str | None:
    """Why a rank correlation of x and y is undefined, or None if it is defined."""
    if len(x) < 2:
        return f"needs at least 2 points, got {len(x)}"
    for name, values in (("x", x), ("y", y)):
        if np.all(values == values[0]):
            return f"{name} is constant, so it has no ranking to compare"
    return None


def _kendall_tau_b_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    if _undefined_reason(x, y) is not None:
        return math.nan
    return float(scipy.stats.kendalltau(x, y, variant="b").statistic)


def _spearman_or_nan(x: np.ndarray, y: np.ndarray) -> float:
    if _undefined_reason(x, y) is not None:
        return math.nan
    return float(scipy.stats.spearmanr(x, y).statistic)


def _warn_if_undefined(function_name: str, x: np.ndarray, y: np.ndarray) -> None:
    reason = _undefined_reason(x, y)
    if reason is not None:
        message = f"{function_name} is undefined: {reason}; returning nan"
        warnings.warn(message, UndefinedCorrelationWarning, stacklevel=3)


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b (tie-corrected) between two score vectors, one entry per model.

    NaN, with an `UndefinedCorrelationWarning` giving the reason, when there are fewer than 2 points
    or either vector is constant (tau-b divides by the number of untied pairs, which is then 0).
    """
    x, y = _scores(x, y)
    _warn_if_undefined("kendall_tau_b", x, y)
    return _kendall_tau_b_or_nan(x, y)


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson on average ranks) between two score vectors.

    NaN, with an `UndefinedCorrelationWarning` giving the reason, when there are fewer than 2 points
    or either vector is constant (its ranks then have zero variance).
    """
    x, y = _scores(x, y)
    _warn_if_undefined("spearman", x, y)
    return _spearman_or_nan(x, y)


def rank_correlation(x, y, n_resamples: int = 2000, confidence: float = 0.95, seed: int | None = 0) -> dict:
    """Kendall tau-b and Spearman between two score vectors, each with a bootstrap interval over models.

    (x[i], y[i]) pairs are resampled jointly; resamples where the correlation is undefined (all drawn
    models tied on x or on y, which is common with few models) are skipped, so with very few models
    the interval rests on fewer than ``n_resamples`` draws. Returns
    {"kendall_tau_b": {"value", "low", "high"}, "spearman": {...}, "n"}; undefined values are NaN
    (with an `UndefinedCorrelationWarning`).
    """
    x, y = _scores(x, y)
    n_resamples = _check_n_resamples(n_resamples)
    confidence = _check_confidence(confidence)
    _warn_if_undefined("rank_correlation", x, y)
    result: dict = {}
    for name, correlation in (("kendall_tau_b", _kendall_tau_b_or_nan), ("spearman", _spearman_or_nan)):
        value = correlation(x, y)
        if math.isnan(value):
            result[name] = _estimate(math.nan, math.nan, math.nan)
            continue
        resampled = _bootstrap_distribution(correlation, (x, y), n_resamples, seed)
        result[name] = _estimate(value, *_percentile_interval(resampled, confidence))
    result["n"] = len(x)
    return result


__all__ = [
    "MCNEMAR_EXACT_BELOW",
    "UndefinedCorrelationWarning",
    "accuracy",
    "bootstrap_interval",
    "format_validity",
    "kendall_tau_b",
    "knowledge_accuracy",
    "mcnemar",
    "paired_bootstrap",
    "rank_correlation",
    "spearman",
    "summarize",
    "wilson_interval",
]
