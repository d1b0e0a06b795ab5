"""Tests for spt_jax.metrics: hand-computed values, true properties (hypothesis), input validation."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spt_jax import metrics
from spt_jax.errors import ConfigError, DataError

Z_95 = 1.959963984540054  # standard normal 97.5% quantile


def wilson_by_hand(successes, n, z=Z_95):
    """The textbook Wilson score formula, written out independently of the library."""
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half_width, centre + half_width


def paired_items(both, a_only, b_only, neither):
    """Two correctness vectors with the given 2x2 table of (a right?, b right?) counts."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# hypothesis strategies: per-item (valid, correct) flags, and paired correctness vectors
flags = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60)
FAST = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------------------ rates


def test_rates_on_a_hand_example():
    valid = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1]  # 8 valid
    correct = [1, 1, 0, 1, 1, 0, 1, 0, 1, 1]  # 7 "correct", one of them (item 4) invalid
    assert metrics.format_validity(valid) == pytest.approx(0.8)
    assert metrics.accuracy(correct) == pytest.approx(0.7)
    assert metrics.accuracy(correct, valid) == pytest.approx(0.6)  # the invalid "correct" is wrong
    assert metrics.knowledge_accuracy(valid, correct) == pytest.approx(6 / 8)


def test_knowledge_accuracy_is_nan_without_valid_outputs():
    assert math.isnan(metrics.knowledge_accuracy([False, False], [True, False]))


@FAST
@given(flags)
def test_rates_lie_in_unit_interval_and_decompose(items):
    valid = np.array([v for v, _ in items])
    correct = np.array([c for _, c in items])
    validity = metrics.format_validity(valid)
    acc = metrics.accuracy(correct, valid)
    knowledge = metrics.knowledge_accuracy(valid, correct)
    assert 0.0 <= validity <= 1.0 and 0.0 <= acc <= 1.0
    if valid.any():
        assert 0.0 <= knowledge <= 1.0
        assert knowledge >= acc  # dividing by n_valid <= n can only raise the rate
        # with every correct output valid, plain accuracy decomposes exactly
        assert metrics.accuracy(correct & valid) == pytest.approx(validity * knowledge)
        if validity == 1.0:
            assert knowledge == pytest.approx(acc)
    else:
        assert math.isnan(knowledge) and acc == 0.0


# -------------------------------------------------------------------------------------- intervals


def test_wilson_matches_the_hand_formula_and_known_values():
    low, high = metrics.wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    assert (low, high) == pytest.approx(wilson_by_hand(8, 10), abs=1e-12)
    z_90 = 1.6448536269514722
    expected = wilson_by_hand(3, 40, z_90)
    assert metrics.wilson_interval(3, 40, confidence=0.9) == pytest.approx(expected, abs=1e-12)


def test_wilson_edges():
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))
    low, high = metrics.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(wilson_by_hand(0, 10)[1])
    low, high = metrics.wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(wilson_by_hand(10, 10)[0])
    assert metrics.wilson_interval(np.int64(8), np.int64(10)) == metrics.wilson_interval(8, 10)


@FAST
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.floats(0.5, 0.999))
def test_wilson_contains_the_estimate_and_widens_with_confidence(counts, confidence):
    successes, n = counts
    low, high = metrics.wilson_interval(successes, n, confidence)
    assert 0.0 <= low <= successes / n <= high <= 1.0
    wider_low, wider_high = metrics.wilson_interval(successes, n, (1 + confidence) / 2)
    assert wider_low <= low + 1e-12 and wider_high >= high - 1e-12


def test_bootstrap_interval_is_deterministic_and_sensible():
    rng = np.random.default_rng(1)
    values = rng.normal(size=200)
    first = metrics.bootstrap_interval(np.mean, values, n_resamples=500, seed=3)
    assert first == metrics.bootstrap_interval(np.mean, values, n_resamples=500, seed=3)
    assert first != metrics.bootstrap_interval(np.mean, values, n_resamples=500, seed=4)
    low, high = first
    standard_error = values.std(ddof=1) / math.sqrt(len(values))
    assert low < values.mean() < high
    assert high - low == pytest.approx(2 * Z_95 * standard_error, rel=0.2)


def test_bootstrap_resamples_items_jointly():
    x = np.arange(50.0)
    # identical arrays stay identical under joint resampling, so the difference is always exactly 0
    def largest_gap(a, b):
        return np.max(np.abs(a - b))

    assert metrics.bootstrap_interval(largest_gap, x, x.copy(), n_resamples=200) == (0.0, 0.0)


def test_bootstrap_ignores_nan_resamples():
    valid = np.array([True] + [False] * 4)
    correct = np.array([True] + [False] * 4)
    # knowledge accuracy is NaN whenever the one valid item is not drawn, and 1.0 otherwise
    interval = metrics.bootstrap_interval(metrics.knowledge_accuracy, valid, correct, n_resamples=300)
    assert interval == (1.0, 1.0)
    always_nan = metrics.bootstrap_interval(lambda a: math.nan, valid, n_resamples=50)
    assert all(math.isnan(v) for v in always_nan)


# -------------------------------------------------------------------------------------- summarize


def test_summarize_on_a_hand_example_is_json_ready():
    valid = [1] * 8 + [0] * 2
    correct = [1] * 6 + [0] * 2 + [1, 0]  # the 9th item is "correct" but invalid -> wrong
    summary = metrics.summarize(valid, correct, n_resamples=300)
    assert (summary["n"], summary["n_valid"], summary["n_correct"]) == (10, 8, 6)
    assert summary["format_validity"]["value"] == pytest.approx(0.8)
    assert (summary["format_validity"]["low"], summary["format_validity"]["high"]) == pytest.approx(
        (0.4902, 0.9433), abs=5e-5
    )
    assert summary["accuracy"]["value"] == pytest.approx(0.6)
    assert summary["knowledge_accuracy"]["value"] == pytest.approx(0.75)
    # knowledge accuracy's Wilson interval is over the 8 valid items
    assert (summary["knowledge_accuracy"]["low"], summary["knowledge_accuracy"]["high"]) == pytest.approx(
        wilson_by_hand(6, 8)
    )
    assert summary["knowledge_accuracy_bootstrap"]["value"] == summary["knowledge_accuracy"]["value"]
    assert json.loads(json.dumps(summary)) == summary
    assert all(type(value) in (int, float) for value in summary["accuracy"].values())


def test_summarize_without_valid_outputs_reports_nan_knowledge():
    summary = metrics.summarize([0, 0, 0], [1, 0, 0], n_resamples=50)
    assert summary["accuracy"]["value"] == 0.0 and summary["n_correct"] == 0
    assert all(math.isnan(v) for v in summary["knowledge_accuracy"].values())
    assert all(math.isnan(v) for v in summary["knowledge_accuracy_bootstrap"].values())
    json.dumps(summary)  # NaN is still serializable


@FAST
@given(flags)
def test_summarize_agrees_with_the_rate_functions_and_intervals_contain_values(items):
    valid = [v for v, _ in items]
    correct = [c for _, c in items]
    summary = metrics.summarize(valid, correct, n_resamples=100)
    assert summary["format_validity"]["value"] == pytest.approx(metrics.format_validity(valid))
    assert summary["accuracy"]["value"] == pytest.approx(metrics.accuracy(correct, valid))
    for key in ("format_validity", "accuracy", "knowledge_accuracy"):
        estimate = summary[key]
        if not math.isnan(estimate["value"]):
            assert 0.0 <= estimate["low"] <= estimate["value"] <= estimate["high"] <= 1.0
    bootstrap = summary["knowledge_accuracy_bootstrap"]
    if not math.isnan(bootstrap["value"]):
        assert 0.0 <= bootstrap["low"] <= bootstrap["high"] <= 1.0


# ----------------------------------------------------------------------------------- paired tests


def test_mcnemar_exact_on_a_hand_table():
    a, b = paired_items(both=10, a_only=6, b_only=1, neither=3)
    result = metrics.mcnemar(a, b)
    assert (result["n"], result["b"], result["c"], result["method"]) == (20, 6, 1, "exact")
    # two-sided exact: 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * (1 + 7) / 128
    assert result["p_value"] == pytest.approx(16 / 128)
    assert result["statistic"] == 1.0
    assert result["difference"] == pytest.approx((16 - 11) / 20)


def test_mcnemar_chi_square_on_a_hand_table():
    a, b = paired_items(both=30, a_only=20, b_only=8, neither=12)
    result = metrics.mcnemar(a, b)
    assert (result["b"], result["c"], result["method"]) == (20, 8, "chi2")
    statistic = (abs(20 - 8) - 1) ** 2 / 28
    assert result["statistic"] == pytest.approx(statistic)
    # survival function of chi-square with 1 df: P(|Z| >= sqrt(s)) = erfc(sqrt(s / 2))
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(statistic / 2)))
    assert result["p_value"] == pytest.approx(0.0376, abs=5e-4)


def test_mcnemar_without_discordant_items():
    result = metrics.mcnemar([1, 0, 1], [1, 0, 1])
    assert (result["b"], result["c"], result["p_value"], result["difference"]) == (0, 0, 1.0, 0.0)


paired_flags = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=80)


@FAST
@given(paired_flags)
def test_mcnemar_swapping_modes_negates_difference_and_keeps_p(items):
    a = np.array([x for x, _ in items])
    b = np.array([y for _, y in items])
    forward, backward = metrics.mcnemar(a, b), metrics.mcnemar(b, a)
    assert (forward["b"], forward["c"]) == (backward["c"], backward["b"])
    assert forward["difference"] == pytest.approx(-backward["difference"])
    assert forward["difference"] == pytest.approx(metrics.accuracy(a) - metrics.accuracy(b))
    assert forward["p_value"] == backward["p_value"] and forward["statistic"] == backward["statistic"]
    assert 0.0 <= forward["p_value"] <= 1.0


def test_paired_bootstrap_detects_a_clear_difference_and_not_a_null_one():
    a, b = paired_items(both=40, a_only=30, b_only=2, neither=28)
    clear = metrics.paired_bootstrap(a, b, n_resamples=1000)
    assert clear["difference"]["value"] == pytest.approx(0.28)
    assert 0.0 < clear["difference"]["low"] <= 0.28 <= clear["difference"]["high"]
    assert clear["p_value"] < 0.01
    a, b = paired_items(both=40, a_only=10, b_only=10, neither=40)
    null = metrics.paired_bootstrap(a, b, n_resamples=1000)
    assert null["difference"]["value"] == 0.0 and null["p_value"] == 1.0
    assert null["difference"]["low"] < 0.0 < null["difference"]["high"]


def test_paired_bootstrap_interval_equals_the_generic_bootstrap():
    a, b = paired_items(both=12, a_only=7, b_only=3, neither=8)
    paired = metrics.paired_bootstrap(a, b, n_resamples=300, confidence=0.9, seed=5)
    generic = metrics.bootstrap_interval(
        lambda x, y: x.mean() - y.mean(), a, b, n_resamples=300, confidence=0.9, seed=5
    )
    assert (paired["difference"]["low"], paired["difference"]["high"]) == pytest.approx(generic)


@FAST
@given(paired_flags, st.integers(0, 2**16))
def test_paired_bootstrap_swapping_modes_negates_difference_and_keeps_p(items, seed):
    a = np.array([x for x, _ in items])
    b = np.array([y for _, y in items])
    forward = metrics.paired_bootstrap(a, b, n_resamples=200, seed=seed)
    backward = metrics.paired_bootstrap(b, a, n_resamples=200, seed=seed)
    assert forward["difference"]["value"] == pytest.approx(-backward["difference"]["value"])
    assert forward["difference"]["low"] == pytest.approx(-backward["difference"]["high"])
    assert forward["difference"]["high"] == pytest.approx(-backward["difference"]["low"])
    assert forward["p_value"] == backward["p_value"]
    assert 1 / 201 <= forward["p_value"] <= 1.0
    assert forward["difference"]["low"] <= forward["difference"]["high"]


# ------------------------------------------------------------------------------ rank correlations


def test_kendall_and_spearman_with_ties_on_a_hand_example():
    x = [1, 2, 2, 3]
    y = [1, 3, 2, 2]
    # pairs: 3 concordant, 1 discordant, 1 tied only in x, 1 tied only in y -> (3-1)/sqrt(5*5)
    assert metrics.kendall_tau_b(x, y) == pytest.approx(0.4)
    # average ranks x=(1, 2.5, 2.5, 4), y=(1, 4, 2.5, 2.5): covariance 2.25, variances 4.5 -> 0.5
    assert metrics.spearman(x, y) == pytest.approx(0.5)
    assert metrics.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("function", [metrics.kendall_tau_b, metrics.spearman])
@pytest.mark.parametrize(
    "x, y, reason",
    [
        ([0.5], [0.7], "at least 2 points"),
        ([1, 1, 1], [1, 2, 3], "x is constant"),
        ([1, 2, 3], [4, 4, 4], "y is constant"),
    ],
)
def test_correlations_are_nan_with_a_reason_when_undefined(function, x, y, reason):
    with pytest.warns(metrics.UndefinedCorrelationWarning, match=reason):
        assert math.isnan(function(x, y))


scores = st.lists(st.tuples(st.integers(-100, 100), st.integers(-100, 100)), min_size=2, max_size=25)


@FAST
@given(scores)
def test_rank_correlations_are_bounded_and_invariant_under_monotone_maps(pairs):
    x = np.array([p for p, _ in pairs], dtype=np.int64)
    y = np.array([q for _, q in pairs], dtype=np.int64)
    if np.all(x == x[0]) or np.all(y == y[0]):
        with pytest.warns(metrics.UndefinedCorrelationWarning):
            assert math.isnan(metrics.kendall_tau_b(x, y))
        return
    tau, rho = metrics.kendall_tau_b(x, y), metrics.spearman(x, y)
    assert -1.0 - 1e-12 <= tau <= 1.0 + 1e-12 and -1.0 - 1e-12 <= rho <= 1.0 + 1e-12
    increasing = x**3 + x  # strictly increasing on the integers, exact in int64
    assert metrics.kendall_tau_b(increasing, 10 * y + 7) == pytest.approx(tau)
    assert metrics.spearman(increasing, 10 * y + 7) == pytest.approx(rho)
    assert metrics.kendall_tau_b(-increasing, y) == pytest.approx(-tau)
    assert metrics.kendall_tau_b(y, x) == pytest.approx(tau)


def test_rank_correlation_bundles_values_and_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + 0.3 * rng.normal(size=12)
    result = metrics.rank_correlation(x, y, n_resamples=300)
    assert result["n"] == 12
    assert result["kendall_tau_b"]["value"] == pytest.approx(metrics.kendall_tau_b(x, y))
    assert result["spearman"]["value"] == pytest.approx(metrics.spearman(x, y))
    for key in ("kendall_tau_b", "spearman"):
        estimate = result[key]
        assert -1.0 <= estimate["low"] <= estimate["high"] <= 1.0
        assert estimate["low"] > 0.0  # strongly related scores
    assert json.loads(json.dumps(result)) == result
    assert result == metrics.rank_correlation(x, y, n_resamples=300)  # seeded


def test_rank_correlation_skips_degenerate_resamples():
    # with 3 models many resamples draw one model three times (undefined, NaN); every other resample
    # of a perfectly concordant pair gives +1, so the interval is [1, 1] only if the NaNs are skipped
    result = metrics.rank_correlation([1, 2, 3], [10, 20, 30], n_resamples=300)
    for key in ("kendall_tau_b", "spearman"):
        estimate = result[key]
        assert (estimate["value"], estimate["low"], estimate["high"]) == pytest.approx((1.0, 1.0, 1.0))


def test_rank_correlation_of_constant_scores_is_nan():
    with pytest.warns(metrics.UndefinedCorrelationWarning, match="constant"):
        result = metrics.rank_correlation([1, 1, 1], [1, 2, 3], n_resamples=20)
    assert all(math.isnan(v) for v in result["kendall_tau_b"].values())
    assert all(math.isnan(v) for v in result["spearman"].values())


# ------------------------------------------------------------------------------- input validation

m = metrics
BAD_INPUTS = [
    # (function, args, kwargs, error, message pattern)
    (m.format_validity, ([],), {}, DataError, "valid is empty"),
    (m.format_validity, ([[True, False]],), {}, DataError, r"valid must be a 1-D .*shape \(1, 2\)"),
    (m.format_validity, (True,), {}, DataError, "valid must be a 1-D"),
    (m.format_validity, ([0, 1, 2],), {}, DataError, r"valid must hold booleans.*\[2\] at positions \[2\]"),
    (m.format_validity, ([0.0, 0.5],), {}, DataError, "valid must hold booleans"),
    (m.format_validity, ([1.0, math.nan],), {}, DataError, "valid must hold booleans"),
    (m.format_validity, (["yes", "no"],), {}, DataError, "valid must hold booleans.*dtype"),
    (m.accuracy, ([1, 0], [1]), {}, DataError, "correct and valid must have the same length.*2.*1"),
    (m.knowledge_accuracy, ([1, 0, 1], [1]), {}, DataError, "valid and correct must have the same"),
    (m.wilson_interval, (11, 10), {}, DataError, "0 <= successes <= n"),
    (m.wilson_interval, (-1, 10), {}, DataError, "0 <= successes <= n"),
    (m.wilson_interval, (2.5, 10), {}, DataError, "must be integers"),
    (m.wilson_interval, (8, 10), {"confidence": 95}, ConfigError, "confidence must be strictly between 0 and"),
    (m.wilson_interval, (8, 10), {"confidence": "high"}, ConfigError, "confidence must be a number"),
    (m.bootstrap_interval, (np.mean,), {}, DataError, "at least one array"),
    (m.bootstrap_interval, (np.mean, [1.0, 2.0], [1.0]), {}, DataError, r"arrays\[0\] and arrays\[1\] must"),
    (m.bootstrap_interval, (np.mean, []), {}, DataError, "empty"),
    (m.bootstrap_interval, ("mean", [1.0]), {}, ConfigError, "statistic must be a function"),
    (m.bootstrap_interval, (np.mean, [1.0]), {"n_resamples": 0}, ConfigError, "n_resamples must be a positive"),
    (m.summarize, ([], []), {}, DataError, "valid is empty"),
    (m.summarize, ([1, 1], [1, 1]), {"n_resamples": 1.5}, ConfigError, "n_resamples"),
    (m.mcnemar, ([1, 0], [1, 0, 1]), {}, DataError, "correct_a and correct_b must have the same length"),
    (m.paired_bootstrap, ([], []), {}, DataError, "correct_a is empty"),
    (m.paired_bootstrap, ([1, 3], [1, 0]), {}, DataError, "correct_a must hold booleans"),
    (m.kendall_tau_b, ([1, 2, 3], [1, 2]), {}, DataError, "x and y must have the same length"),
    (m.spearman, ([1, math.nan], [1, 2]), {}, DataError, r"x must hold finite numbers.*positions \[1\]"),
    (m.rank_correlation, ([1, 2], ["a", "b"]), {}, DataError, "y must hold real numbers"),
    (m.rank_correlation, ([[1, 2]], [[1, 2]]), {}, DataError, "x must be a 1-D"),
]


@pytest.mark.parametrize("function, args, kwargs, error, message", BAD_INPUTS)
def test_bad_inputs_raise_errors_that_name_the_argument(function, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        function(*args, **kwargs)
    assert issubclass(error, ValueError)  # callers may catch plain ValueError
