"""The KPI gates' statistics on synthetic telemetry: a verdict needs a sample, a significant test and an effect beyond
the operator's limit against every usable reference; the p-values agree with scipy computed another way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from agent.protocol import CONFIDENCE_BINS, LATENCY_EDGES_MS
from fleet.rollout.kpi import DEFAULT_KPIS, KPI_METRICS, Kpi, Sample, early_alpha, evaluate, parse_kpi, value_of

LATENCY = parse_kpi("latency_p95 <= 1.5x")
ERRORS = parse_kpi("error_rate <= +0.02")
CONFIDENCE = parse_kpi("confidence >= -0.1")
ACCURACY = parse_kpi("accuracy >= -0.05")
NOTHING = Sample()


def window(
    rng: np.random.Generator,
    device: str,
    *,
    n: int = 100,
    median_ms: float = 10.0,
    error_rate: float = 0.0,
    confidence: tuple[float, float] = (8.0, 2.0),
    labelled: int = 0,
    accuracy: float = 0.9,
) -> dict[str, Any]:
    """One decoded telemetry window: lognormal latencies binned on the wire's edges (upper edge inclusive), beta
    distributed confidences, and a confusion matrix of ``labelled`` rows when asked."""
    latencies = rng.lognormal(math.log(median_ms), 0.3, n)
    buckets = np.searchsorted(LATENCY_EDGES_MS, latencies, side="left")
    confidences = np.minimum((rng.beta(*confidence, n) * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1)
    result: dict[str, Any] = {
        "device_id": device,
        "count": n,
        "errors": int(rng.binomial(n, error_rate)),
        "latency": np.bincount(buckets, minlength=len(LATENCY_EDGES_MS) + 1).tolist(),
        "confidence": np.bincount(confidences, minlength=CONFIDENCE_BINS).tolist(),
    }
    if labelled:
        right = int(rng.binomial(labelled, accuracy))
        result["feedback"] = [[right // 2, labelled - right], [0, right - right // 2]]
    return result


def group(seed: int, prefix: str, *, devices: int = 10, windows: int = 5, **kwargs: Any) -> Sample:
    """The merged sample of ``devices`` devices sending ``windows`` windows each, from a seeded generator."""
    rng = np.random.default_rng(seed)
    sample = Sample()
    for d in range(devices):
        for _ in range(windows):
            sample = sample.add(window(rng, f"{prefix}-{d}", **kwargs))
    return sample


def test_a_release_three_times_slower_fails_the_latency_gate_against_baseline_and_control() -> None:
    result = evaluate(
        LATENCY, group(1, "up", median_ms=30.0), group(2, "up", median_ms=10.0), group(3, "ctl", median_ms=10.0)
    )
    assert result.verdict == "fail"
    assert result.value is not None and result.baseline is not None and result.control is not None
    assert result.value > 2 * result.baseline and result.value > 2 * result.control
    assert result.p_value is not None and result.p_value < 1e-12
    assert (result.count, result.devices) == (5000, 10)
    assert "baseline" in result.detail and "devices not yet upgraded" in result.detail
    assert "5,000 inferences on 10 devices" in result.detail


@pytest.mark.parametrize("median_ms", [10.0, 11.0])
def test_latency_noise_within_the_limit_passes(median_ms: float) -> None:
    result = evaluate(
        LATENCY, group(4, "up", median_ms=median_ms), group(5, "up", median_ms=10.0), group(6, "ctl", median_ms=10.0)
    )
    assert result.verdict == "pass"


def test_a_shift_the_control_group_shares_does_not_blame_the_release() -> None:
    upgraded, baseline = group(7, "up", median_ms=30.0), group(8, "up", median_ms=10.0)
    control = group(9, "ctl", median_ms=30.0)  # the network slowed everyone down, upgraded or not
    assert evaluate(LATENCY, upgraded, baseline, NOTHING).verdict == "fail"  # against the baseline alone it looks bad
    result = evaluate(LATENCY, upgraded, baseline, control)
    assert result.verdict == "pass"
    assert result.p_value is not None and result.p_value > 0.01


def test_a_significant_slowdown_within_the_limit_passes_and_a_large_one_on_few_rows_needs_the_test() -> None:
    # One bucket slower (x1.41) on 50,000 rows: certainly slower, but within 1.5x.
    small_shift = evaluate(LATENCY, group(10, "up", windows=50, median_ms=14.0), group(11, "up", windows=50), NOTHING)
    assert small_shift.p_value is not None and small_shift.p_value < 1e-6
    assert small_shift.verdict == "pass"
    # 200 rows whose p95 is two buckets (x2) up, but only 11 rows against the baseline's 10 are above its p95.
    upgraded_latency, reference_latency = [0] * (len(LATENCY_EDGES_MS) + 1), [0] * (len(LATENCY_EDGES_MS) + 1)
    upgraded_latency[10], upgraded_latency[12] = 189, 11  # rank 190 of 200 is in bucket 12
    reference_latency[10], reference_latency[12] = 190, 10  # rank 190 of 200 is in bucket 10
    upgraded = Sample(count=200, latency=tuple(upgraded_latency), devices=frozenset({"a"}))
    reference = Sample(count=200, latency=tuple(reference_latency), devices=frozenset({"a"}))
    result = evaluate(LATENCY, upgraded, reference, NOTHING)
    assert result.value == pytest.approx(2 * LATENCY_EDGES_MS[10])  # beyond 1.5x on the point estimates...
    assert result.verdict == "pass"  # ...but 11 of 200 against 10 of 200 is noise


def test_too_few_inferences_is_pending_not_a_verdict() -> None:
    few_slow = group(12, "up", devices=1, windows=1, n=45, median_ms=100.0)  # 45 inferences: under a quarter
    result = evaluate(LATENCY, few_slow, group(13, "up"), group(14, "ctl"))
    assert (result.verdict, result.p_value, result.count) == ("pending", None, 45)
    assert "45 of 200 inferences" in result.detail
    many_slow = group(15, "up", median_ms=100.0)
    small_references = evaluate(
        LATENCY, many_slow, group(16, "up", devices=1, windows=3, n=50), group(17, "ctl", devices=1, n=30)
    )
    assert (small_references.verdict, small_references.baseline, small_references.control) == ("pending", None, None)
    assert evaluate(LATENCY, many_slow, group(16, "up", devices=1, windows=3, n=50), group(18, "ctl")).verdict == "fail"


def test_accuracy_without_any_feedback_is_not_applicable() -> None:
    result = evaluate(ACCURACY, group(19, "up"), group(20, "up"), group(21, "ctl"))
    assert (result.verdict, result.value, result.p_value, result.count) == ("n/a", None, None, 0)
    some = evaluate(ACCURACY, group(22, "up", labelled=3), group(23, "up", labelled=3), NOTHING)
    assert (some.verdict, some.count) == ("pending", 150)  # 3 rows x 50 windows: some feedback, not yet enough


def test_an_accuracy_drop_beyond_the_limit_fails_and_a_small_one_passes() -> None:
    baseline, control = group(24, "up", labelled=20, accuracy=0.9), group(25, "ctl", labelled=20, accuracy=0.9)
    worse = evaluate(ACCURACY, group(26, "up", labelled=20, accuracy=0.7), baseline, control)
    assert (worse.verdict, worse.count) == ("fail", 1000)
    assert worse.value is not None and worse.value == pytest.approx(0.7, abs=0.03)
    assert evaluate(ACCURACY, group(27, "up", labelled=20, accuracy=0.88), baseline, control).verdict == "pass"


def test_a_broken_release_that_errors_on_everything_fails_the_error_rate_gate() -> None:
    result = evaluate(ERRORS, group(28, "up", error_rate=1.0), group(29, "up", error_rate=0.01), group(30, "ctl"))
    assert (result.verdict, result.value) == ("fail", 1.0)
    assert result.p_value is not None and result.p_value < 1e-100


def test_a_one_in_500_rise_in_errors_passes_even_when_it_is_significant() -> None:
    upgraded = Sample(count=1_000_000, errors=12_000, devices=frozenset({"a"}))
    baseline = Sample(count=1_000_000, errors=10_000, devices=frozenset({"a"}))  # +0.002, 1 in 500
    result = evaluate(ERRORS, upgraded, baseline, NOTHING)
    assert result.p_value is not None and result.p_value < 1e-20
    assert result.verdict == "pass"
    assert evaluate(ERRORS, Sample(count=1_000_000, errors=40_000), baseline, NOTHING).verdict == "fail"


def test_the_two_proportion_p_value_is_the_pooled_z_test() -> None:
    result = evaluate(ERRORS, Sample(count=1000, errors=60), Sample(count=1000, errors=40), NOTHING)
    pooled = 100 / 2000
    z = (0.06 - 0.04) / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert result.p_value == pytest.approx(stats.norm.sf(z), rel=1e-12)
    assert result.p_value == pytest.approx(0.0201, abs=1e-4)  # z = 2.05, from a normal table


def test_the_two_proportion_p_value_is_fishers_when_an_expected_cell_is_small() -> None:
    result = evaluate(ERRORS, Sample(count=300, errors=4), Sample(count=300, errors=0), NOTHING)  # 2 expected errors
    expected = stats.fisher_exact([[4, 296], [0, 300]], alternative="greater").pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.p_value == pytest.approx(math.comb(300, 4) / math.comb(600, 4), rel=1e-12)  # all 4 upgraded


def test_the_confidence_p_value_is_a_welch_z_test_on_the_bin_midpoints() -> None:
    upgraded, baseline = group(31, "up", confidence=(7.5, 2.5)), group(32, "up")
    result = evaluate(CONFIDENCE, upgraded, baseline, NOTHING)
    midpoints = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS
    up, ref = np.repeat(midpoints, upgraded.confidence), np.repeat(midpoints, baseline.confidence)
    z = (ref.mean() - up.mean()) / math.sqrt(up.var() / up.size + ref.var() / ref.size)
    assert result.p_value == pytest.approx(stats.norm.sf(z), rel=1e-9)
    assert result.value == pytest.approx(up.mean(), rel=1e-12)
    assert result.p_value < 1e-12  # a drop of 0.05 from 0.8: certain, but within the limit of 0.1
    assert result.verdict == "pass"


def test_a_confidence_collapse_fails() -> None:
    result = evaluate(CONFIDENCE, group(33, "up", confidence=(2.0, 2.0)), group(34, "up"), group(35, "ctl"))
    assert result.verdict == "fail"
    assert result.value == pytest.approx(0.5, abs=0.01)
    assert result.detail.startswith(f"mean confidence {result.value:.3f} vs baseline 0.8")


def test_an_infinite_p95_fails_against_a_finite_one_and_nothing_is_worse_than_infinite() -> None:
    overflow = [0] * (len(LATENCY_EDGES_MS) + 1)
    overflow[-1] = 500
    stuck = Sample(count=500, latency=tuple(overflow), devices=frozenset({"a"}))
    result = evaluate(LATENCY, stuck, group(36, "up"), NOTHING)
    assert (result.verdict, result.value) == ("fail", math.inf)
    assert f"over {LATENCY_EDGES_MS[-1]:g} ms" in result.detail
    assert evaluate(LATENCY, group(37, "up"), stuck, NOTHING).verdict == "pass"
    assert evaluate(LATENCY, stuck, stuck, NOTHING).verdict == "pass"
    assert evaluate(parse_kpi("latency_p95 <= +20ms"), stuck, group(38, "up"), NOTHING).verdict == "fail"


def test_samples_merge_exactly_in_any_order() -> None:
    rng = np.random.default_rng(39)
    windows = [window(rng, f"d{k % 3}", labelled=k) for k in range(6)]
    one_by_one = Sample()
    for w in windows:
        one_by_one = one_by_one.add(w)
    halves = Sample().add(windows[0]).add(windows[1]).add(windows[2]) + Sample().add(windows[3]).add(windows[4]).add(
        windows[5]
    )
    assert halves == one_by_one
    assert one_by_one.count == sum(w["count"] for w in windows)
    assert one_by_one.errors == sum(w["errors"] for w in windows)
    assert one_by_one.latency == tuple(np.sum([w["latency"] for w in windows], axis=0))
    assert one_by_one.confidence == tuple(np.sum([w["confidence"] for w in windows], axis=0))
    assert one_by_one.labelled == sum(range(6))
    assert one_by_one.correct == sum(np.trace(w["feedback"]) for w in windows if "feedback" in w)
    assert (one_by_one.windows, one_by_one.devices) == (6, frozenset({"d0", "d1", "d2"}))
    assert Sample() + one_by_one == one_by_one == one_by_one + Sample()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("latency", [1, 2, 3], "latency has 3 buckets"),
        ("confidence", [1] * 11, "confidence has 11 bins"),
        ("feedback", [[1, 2, 3], [4, 5, 6]], "square"),
    ],
)
def test_a_window_with_the_wrong_bins_is_refused(key: str, value: list[Any], message: str) -> None:
    bad = window(np.random.default_rng(40), "d") | {key: value}
    with pytest.raises(ValueError, match=message):
        Sample().add(bad)


def test_value_of_reads_the_figures_of_a_sample() -> None:
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[3], latency[10] = 94, 6
    confidence = [0] * CONFIDENCE_BINS
    confidence[9], confidence[4] = 3, 1  # 3 at 0.95, 1 at 0.45
    sample = Sample(count=100, errors=5, latency=tuple(latency), confidence=tuple(confidence), correct=9, labelled=12)
    assert value_of("latency_p95", sample) == LATENCY_EDGES_MS[10]
    assert value_of("error_rate", sample) == 0.05
    assert value_of("confidence", sample) == pytest.approx(0.825)
    assert value_of("accuracy", sample) == 0.75
    assert [value_of(metric, Sample()) for metric in KPI_METRICS] == [None] * 4
    with pytest.raises(ValueError, match="use one of latency_p95"):
        value_of("p99", sample)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("latency_p95 <= 1.5x", Kpi("latency_p95", 1.5, True, "latency_p95 <= 1.5x")),
        ("latency_p95<=2X", Kpi("latency_p95", 2.0, True, "latency_p95 <= 2x")),
        ("latency_p95 <= +20ms", Kpi("latency_p95", 20.0, False, "latency_p95 <= +20ms")),
        ("error_rate <= +0.02", Kpi("error_rate", 0.02, False, "error_rate <= +0.02")),
        ("  error_rate<= +2% ", Kpi("error_rate", 0.02, False, "error_rate <= +0.02")),
        ("confidence >= -0.05", Kpi("confidence", -0.05, False, "confidence >= -0.05")),
        ("accuracy >=-5%", Kpi("accuracy", -0.05, False, "accuracy >= -0.05")),
        ("accuracy >= -.5", Kpi("accuracy", -0.5, False, "accuracy >= -0.5")),
    ],
)
def test_parse_kpi_reads_the_documented_forms_into_canonical_text(text: str, expected: Kpi) -> None:
    assert parse_kpi(text) == expected
    assert parse_kpi(expected.text) == expected


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        ("p99 <= 1.5x", "use one of latency_p95, error_rate, confidence, accuracy (e.g. 'latency_p95 <= 1.5x')"),
        ("", "write '<metric> <op> <limit>'"),
        ("latency_p95 1.5x", "write '<metric> <op> <limit>'"),
        ("latency_p95 >= 1.5x", "latency_p95 takes '<=', not '>='"),
        ("accuracy <= -5%", "accuracy takes '>=', not '<='"),
        ("error_rate < +0.02", "error_rate takes '<=', not '<'"),
        ("latency_p95 <= 0.9x", "greater than 1"),
        ("latency_p95 <= +1.5x", "has no sign"),
        ("latency_p95 <= 20ms", "'latency_p95 <= +20ms'"),
        ("latency_p95 <= +20", "'latency_p95 <= +20ms'"),
        ("latency_p95 <= fast", "cannot read the limit 'fast'"),
        ("error_rate <= 0.02", "with its sign"),
        ("error_rate <= -0.02", "rise between 0 and 1"),
        ("error_rate <= +120%", "rise between 0 and 1"),
        ("error_rate <= 1.5x", "'error_rate <= +0.02'"),
        ("confidence >= +0.05", "drop between 0 and 1"),
        ("accuracy >= -0", "drop between 0 and 1"),
        ("accuracy >= nan", "cannot read the limit"),
    ],
)
def test_parse_kpi_refuses_bad_text_with_a_message_naming_the_fix(text: str, fix: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_kpi(text)
    message = str(caught.value)
    assert fix in message
    assert "\n" not in message


def test_the_default_kpis_are_the_documented_limits() -> None:
    assert [kpi.text for kpi in DEFAULT_KPIS] == [
        "latency_p95 <= 1.5x",
        "error_rate <= +0.02",
        "confidence >= -0.1",
        "accuracy >= -0.05",
    ]


@pytest.mark.parametrize(("alpha", "min_count"), [(0.0, 200), (1.0, 200), (0.01, 0)])
def test_evaluate_refuses_a_level_or_minimum_that_would_let_noise_decide(alpha: float, min_count: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        evaluate(ERRORS, NOTHING, NOTHING, NOTHING, alpha=alpha, min_count=min_count)


def test_a_gate_fails_early_on_part_of_its_sample_only_past_a_much_stricter_boundary_and_never_passes_early() -> None:
    ten_times_slower = group(30, "up", devices=2, windows=3, n=25, median_ms=100.0)  # 150 of 200 inferences
    result = evaluate(LATENCY, ten_times_slower, group(31, "up"), group(32, "ctl"))
    assert result.verdict == "fail" and result.count == 150
    assert "early: p <= 0.0036 on 75% of the sample" in result.detail, result.detail
    as_fast = evaluate(LATENCY, group(33, "up", devices=2, windows=3, n=25), group(34, "up"), group(35, "ctl"))
    assert (as_fast.verdict, as_fast.p_value) == ("pending", None), "a pass waits for the whole sample"


@pytest.mark.parametrize(("fraction", "expected"), [(0.25, 1.638e-06), (0.5, 5.010e-04), (1.0, 0.01)])
def test_the_early_boundary_is_o_brien_fleming_s(fraction: float, expected: float) -> None:
    assert early_alpha(0.01, fraction) == pytest.approx(expected, rel=1e-3)
    z = stats.norm.isf(early_alpha(0.01, fraction))
    assert z * math.sqrt(fraction) == pytest.approx(stats.norm.isf(0.01))


def test_a_sub_millisecond_latency_rise_passes_however_significant_it_is() -> None:
    def at(bucket: int, n: int) -> Sample:
        latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        latency[bucket] = n
        return Sample(count=n, latency=tuple(latency), devices=frozenset({"a"}))

    fast = LATENCY_EDGES_MS.index(0.2)  # p95 0.2 ms before, 0.4 ms after: 2x, on 5,000 rows each
    result = evaluate(LATENCY, at(fast + 2, 5000), at(fast, 5000), NOTHING)
    assert result.value == pytest.approx(0.4) and result.p_value is not None and result.p_value < 1e-12
    assert result.verdict == "pass", "0.2 ms more is scheduling noise, not a slower release"
    slow = evaluate(LATENCY, at(LATENCY_EDGES_MS.index(1.6), 5000), at(fast, 5000), NOTHING)
    assert slow.verdict == "fail"
