"""The statistics behind a campaign's KPI gates: merged telemetry of a group of devices, the operator's limits, and
a verdict on whether a release made a figure worse than the operator allows.

A campaign upgrades devices in waves. The gate judges the **upgraded** group (their windows on the new release)
against two references: the **baseline** (the same devices' windows on the old release, before the upgrade) and
the **control** (devices not yet upgraded, over the same period). Telemetry is noisy and a wave can be small, so a
gate never trips on a bare threshold over a few windows. :func:`evaluate` decides, per KPI:

* **Sample size.** The unit is an inference that carries the figure (a latency row, a confidence row; every
  inference for the error rate) or, for accuracy, a labelled feedback row. A reference is *usable* with at least
  ``min_count`` units. The upgraded group needs ``min_count`` too, and at least one reference must be usable;
  otherwise the verdict is ``"pending"``: the wave has not yet earned a verdict either way. Accuracy is ``"n/a"``
  when no group has any labelled row, since feedback is optional and a fleet without it can never judge accuracy.
* **Fail** iff, for **every** usable reference, both the effect is beyond the limit (point estimates: upgraded over
  reference above the ratio, or their difference beyond the delta) and a one-sided test of H0 "the upgraded group is
  no worse than this reference" rejects at ``alpha``. The effect guards against failing a release for a real but
  harmless change (a large sample makes any difference significant); the test guards against failing it for noise
  (a small one makes any difference large). Requiring every usable reference means a change the whole fleet sees
  (the world changed: the control group moved as well) does not blame the release. Otherwise **pass**.

The tests, each one-sided towards "worse":

* error rate and accuracy (its complement, the share of wrong labels): the pooled two-proportion z-test, or Fisher's
  exact test when any expected cell of the 2x2 table is below 5, where the normal approximation fails.
* p95 latency: a window holds bucket counts, not values, so the test is on the tail: with ``e`` the reference's p95
  (its bucket's upper edge, :func:`agent.histograms.latency_quantile_ms`), the share of upgraded rows above ``e``
  against the reference's share above ``e``, by the same two-proportion test. The reference has at most 5% above
  ``e``; a significantly larger share means the upgraded p95 is higher. Rows in the overflow bucket make the p95
  ``inf``, which compares as a number: an upgraded ``inf`` is beyond any finite reference, and nothing is above a
  reference's ``inf``.
* mean confidence: a Welch z-test of the means, each bin counted at its midpoint, the variances those of the binned
  distributions.

A gate may **fail early**, on a quarter of ``min_count`` or more, when the test clears a much stricter level (an
O'Brien-Fleming boundary, :func:`early_alpha`): a release many times slower is stopped within a window or two of
its first telemetry instead of waiting for the whole sample. It passes only on the whole sample.

Everything is a pure function of integer counts, so the same telemetry always gives the same verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from agent.histograms import FEEDBACK, latency_quantile_ms
from agent.protocol import CONFIDENCE_BINS, LATENCY_EDGES_MS

KPI_METRICS = ("latency_p95", "error_rate", "confidence", "accuracy")

#: The direction in which each metric gets worse: "<=" caps a figure that must not rise, ">=" floors one that must
#: not fall.
_OPS = {"latency_p95": "<=", "error_rate": "<=", "confidence": ">=", "accuracy": ">="}
_EXAMPLES = {
    "latency_p95": "'latency_p95 <= 1.5x' or 'latency_p95 <= +20ms'",
    "error_rate": "'error_rate <= +0.02' or 'error_rate <= +2%'",
    "confidence": "'confidence >= -0.05' or 'confidence >= -5%'",
    "accuracy": "'accuracy >= -0.05' or 'accuracy >= -5%'",
}
_LABELS = {
    "latency_p95": "p95 latency",
    "error_rate": "error rate",
    "confidence": "mean confidence",
    "accuracy": "accuracy",
}
_LATENCY_UPPER_EDGES = (*LATENCY_EDGES_MS, math.inf)
_CONFIDENCE_MIDPOINTS = np.arange(CONFIDENCE_BINS, dtype=np.float64) / CONFIDENCE_BINS + 0.5 / CONFIDENCE_BINS
_KPI_RE = re.compile(r"\s*(?P<metric>\w+)\s*(?P<op>[<>=!]+)\s*(?P<limit>\S+)\s*")
_LIMIT_RE = re.compile(r"(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))(?P<unit>x|ms|%)?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Sample:
    """Merged telemetry of a group of devices: integer counts, merged exactly (sum).

    ``latency`` and ``confidence`` are empty until a window brings rows, then have the wire's bins
    (``len(LATENCY_EDGES_MS) + 1`` and ``CONFIDENCE_BINS``). ``correct`` and ``labelled`` are the trace and the sum of
    the feedback confusion counts: all a gate needs of them is an accuracy.
    """

    count: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()
    confidence: tuple[int, ...] = ()
    correct: int = 0
    labelled: int = 0
    windows: int = 0
    devices: frozenset[str] = frozenset()

    def add(self, window: Mapping[str, Any]) -> Sample:
        """This sample with one decoded telemetry window (which names its ``device_id``) merged in.

        Raises ValueError for histograms that do not have the wire's bins or feedback that is not square: counts
        from a different layout must not be summed into plausible numbers.
        """
        latency = tuple(int(c) for c in window["latency"])
        if len(latency) != len(LATENCY_EDGES_MS) + 1:
            raise ValueError(f"latency has {len(latency)} buckets, not {len(LATENCY_EDGES_MS) + 1}")
        confidence = tuple(int(c) for c in window["confidence"])
        if len(confidence) != CONFIDENCE_BINS:
            raise ValueError(f"confidence has {len(confidence)} bins, not {CONFIDENCE_BINS}")
        correct = labelled = 0
        if window.get(FEEDBACK):
            confusion = np.asarray(window[FEEDBACK], dtype=np.int64)
            if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
                raise ValueError(f"feedback must be a square confusion matrix, got shape {confusion.shape}")
            correct, labelled = int(np.trace(confusion)), int(confusion.sum())
        one = Sample(
            count=int(window["count"]),
            errors=int(window["errors"]),
            latency=latency,
            confidence=confidence,
            correct=correct,
            labelled=labelled,
            windows=1,
            devices=frozenset({str(window["device_id"])}),
        )
        return self + one

    def __add__(self, other: Sample) -> Sample:
        """The exact merge of two samples: counts summed, devices unioned."""
        return Sample(
            count=self.count + other.count,
            errors=self.errors + other.errors,
            latency=_sum_bins("latency", self.latency, other.latency),
            confidence=_sum_bins("confidence", self.confidence, other.confidence),
            correct=self.correct + other.correct,
            labelled=self.labelled + other.labelled,
            windows=self.windows + other.windows,
            devices=self.devices | other.devices,
        )


def _sum_bins(key: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a or not b:
        return a or b
    if len(a) != len(b):
        raise ValueError(f"{key}: cannot merge {len(a)} bins with {len(b)}")
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class Kpi:
    """An operator's limit on how much worse a release may make one figure than its references.

    ``relative`` limits are ratios (> 1) capping upgraded / reference; the others are signed differences, upgraded
    minus reference, in the figure's unit (ms for latency, a fraction in [0, 1] otherwise): positive for the
    ceilings (``latency_p95``, ``error_rate``), negative for the floors (``confidence``, ``accuracy``). ``text`` is
    the canonical form, which :func:`parse_kpi` reads back to the same Kpi.
    """

    metric: str
    limit: float
    relative: bool
    text: str


def parse_kpi(text: str) -> Kpi:
    """Read an operator's ``"<metric> <op> <limit>"``, e.g. ``"latency_p95 <= 1.5x"`` or ``"accuracy >= -5%"``.

    Each metric has one operator, the direction in which it gets worse. Deltas carry an explicit sign, so
    ``error_rate <= 0.02`` (an error rate of at most 2%?) is refused rather than read as an increase. Any error raises
    ValueError with a one-line message that says what to write instead.
    """
    match = _KPI_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot read KPI {text!r}; write '<metric> <op> <limit>', e.g. 'latency_p95 <= 1.5x'")
    metric, op, limit_text = match["metric"], match["op"], match["limit"]
    if metric not in _OPS:
        raise ValueError(
            f"unknown KPI metric {metric!r}; use one of {', '.join(KPI_METRICS)} (e.g. 'latency_p95 <= 1.5x')"
        )
    if op != _OPS[metric]:
        raise ValueError(f"{metric} takes {_OPS[metric]!r}, not {op!r}; e.g. {_EXAMPLES[metric]}")
    limit = _LIMIT_RE.fullmatch(limit_text)
    if limit is None:
        raise ValueError(f"cannot read the limit {limit_text!r} of {metric}; write e.g. {_EXAMPLES[metric]}")
    number, unit = float(limit["number"]), (limit["unit"] or "").lower()
    signed = limit["number"][0] in "+-"
    if metric == "latency_p95" and unit == "x":
        if signed or number <= 1:
            raise ValueError(
                f"a latency ratio has no sign and is greater than 1, not {limit_text!r}; e.g. 'latency_p95 <= 1.5x'"
            )
        return Kpi(metric, number, True, f"{metric} <= {number:.15g}x")
    if metric == "latency_p95":
        if unit != "ms" or not signed or number <= 0:
            raise ValueError(
                f"latency_p95 takes a ratio or an increase in ms, not {limit_text!r}; write e.g. {_EXAMPLES[metric]}"
            )
        return Kpi(metric, number, False, f"{metric} <= {number:+.15g}ms")
    if unit in ("x", "ms"):
        raise ValueError(f"{metric} takes a change in a rate, not {limit_text!r}; write e.g. {_EXAMPLES[metric]}")
    delta = number / 100 if unit == "%" else number
    worse = 1 if _OPS[metric] == "<=" else -1
    if not signed or not 0 < delta * worse < 1:
        raise ValueError(
            f"{metric} takes a {'rise' if worse > 0 else 'drop'} between 0 and 1 (0% and 100%) with its sign, "
            f"not {limit_text!r}; write e.g. {_EXAMPLES[metric]}"
        )
    return Kpi(metric, delta, False, f"{metric} {_OPS[metric]} {delta:+.15g}")


#: The gates a campaign gets when the operator names none. Latency buckets are a factor of sqrt(2) apart, so a p95
#: moves by 1.41x at the least; 1.5x lets a one-bucket move pass: a good release measured against devices under a
#: slightly different load moved one bucket in a test run (p=0.003 on 1,371 inferences), a false alarm 1.3x made.
DEFAULT_KPIS: tuple[Kpi, ...] = tuple(
    parse_kpi(text)
    for text in ("latency_p95 <= 1.5x", "error_rate <= +0.02", "confidence >= -0.1", "accuracy >= -0.05")
)


@dataclass(frozen=True, slots=True)
class KpiResult:
    """One KPI's verdict on a wave, with the figures and the test behind it.

    ``verdict`` is ``"pass"``, ``"fail"``, ``"pending"`` (not enough sample yet) or ``"n/a"`` (no data of that kind
    anywhere). ``value`` is the upgraded group's figure; ``baseline`` and ``control`` are the references' figures,
    None when that reference has too few units to take part. ``p_value`` is the larger of the one-sided p-values of
    the references that took part (None without a test). ``count`` is the upgraded group's units, ``devices`` its
    device count, and ``detail`` one line for a human.
    """

    kpi: str
    verdict: str
    value: float | None
    baseline: float | None
    control: float | None
    p_value: float | None
    count: int
    devices: int
    detail: str


def value_of(metric: str, sample: Sample) -> float | None:
    """The figure of ``sample`` for ``metric``, or None without rows for it.

    p95 latency in ms (the upper edge of its bucket; ``inf`` in the overflow), error rate, mean top-1 confidence (each
    bin at its midpoint) or accuracy (share of labelled rows predicted right).
    """
    if metric == "latency_p95":
        return latency_quantile_ms(sample.latency, 0.95) if sample.latency else None
    if metric == "error_rate":
        return sample.errors / sample.count if sample.count else None
    if metric == "confidence":
        rows = sum(sample.confidence)
        return float(np.dot(sample.confidence, _CONFIDENCE_MIDPOINTS)) / rows if rows else None
    if metric == "accuracy":
        return sample.correct / sample.labelled if sample.labelled else None
    raise ValueError(f"unknown KPI metric {metric!r}; use one of {', '.join(KPI_METRICS)}")


def evaluate(
    kpi: Kpi, upgraded: Sample, baseline: Sample, control: Sample, *, alpha: float = 0.01, min_count: int = 200
) -> KpiResult:
    """The verdict of ``kpi`` on the upgraded group against its baseline and control, by the module's decision rule.

    ``alpha`` is the significance level of each one-sided test; ``min_count`` the units (inferences, or labelled rows
    for accuracy) a group needs to take part. Raises ValueError for an ``alpha`` outside (0, 1) or a ``min_count``
    below 1: either would let a single noisy window decide.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    metric, noun = kpi.metric, _noun(kpi.metric)
    n, value = _units(metric, upgraded), value_of(metric, upgraded)
    references = {"baseline": baseline, "control": control}
    usable = {name: ref for name, ref in references.items() if _units(metric, ref) >= min_count}
    figures = {name: value_of(metric, ref) if name in usable else None for name, ref in references.items()}

    def result(verdict: str, p_value: float | None, detail: str) -> KpiResult:
        return KpiResult(
            kpi=kpi.text,
            verdict=verdict,
            value=value,
            baseline=figures["baseline"],
            control=figures["control"],
            p_value=p_value,
            count=n,
            devices=len(upgraded.devices),
            detail=detail,
        )

    if metric == "accuracy" and n == 0 and all(_units(metric, ref) == 0 for ref in references.values()):
        return result("n/a", None, "no labelled feedback from any device, so accuracy cannot be judged")
    waiting = f"{n:,} of {min_count:,} {noun} needed on upgraded devices so far"
    if n < EARLY_FRACTION * min_count or (n < min_count and not usable):
        return result("pending", None, waiting)
    if not usable:
        return result(
            "pending",
            None,
            f"{_units(metric, baseline):,} {noun} before the upgrade and {_units(metric, control):,} on devices not "
            f"yet upgraded, of {min_count:,} needed in one of them",
        )
    assert value is not None  # n >= min_count >= 1 units carry the figure
    worse = {name: _worse_p(metric, upgraded, ref) for name, ref in usable.items()}
    level = alpha if n >= min_count else early_alpha(alpha, n / min_count)
    failed = all(_beyond(kpi, value, figures[name]) and p <= level for name, p in worse.items())
    p_value = max(worse.values())
    if n < min_count and not failed:
        return result("pending", None, waiting)
    compared = [
        f"{'baseline ' if name == 'baseline' else ''}{_show(metric, figures[name])}"
        f"{' on devices not yet upgraded' if name == 'control' else ''}"
        for name in usable
    ]
    early = f", early: p <= {level:.2g} on {n / min_count:.0%} of the sample" if n < min_count else ""
    detail = (
        f"{_LABELS[metric]} {_show(metric, value)} vs {' and '.join(compared)} "
        f"(p={p_value:.2g}{early}; {n:,} {noun} on {len(upgraded.devices):,} "
        f"device{'s' * (len(upgraded.devices) != 1)})"
    )
    return result("fail" if failed else "pass", p_value, detail)


#: The share of ``min_count`` from which a gate may fail early (it passes only on the whole sample).
EARLY_FRACTION = 0.25


def early_alpha(alpha: float, fraction: float) -> float:
    """The significance level a test must reach to fail a gate on ``fraction`` of its sample: an O'Brien-Fleming
    boundary, z >= z(alpha) / sqrt(fraction). A release three times slower shows it in a few windows with p far
    below 1e-6; holding it to the full sample cost a campaign two telemetry windows of its upgraded devices. The
    boundary spends little of ``alpha`` early (at a quarter of the sample p <= 1.6e-6 for alpha 0.01). Looked at
    every round, it is a constant boundary on the test's Brownian motion, which its path crosses by the end with
    probability at most 2 x ``alpha`` (the reflection principle); the effect beyond the limit is needed as well, and
    a pass still needs the whole sample."""
    return float(stats.norm.sf(stats.norm.isf(alpha) / math.sqrt(fraction)))


def _noun(metric: str) -> str:
    return "labelled rows" if metric == "accuracy" else "inferences"


def _units(metric: str, sample: Sample) -> int:
    """The rows that carry ``metric``'s figure: what ``min_count`` counts and what its test is over."""
    if metric == "latency_p95":
        return sum(sample.latency)
    if metric == "confidence":
        return sum(sample.confidence)
    if metric == "accuracy":
        return sample.labelled
    return sample.count


def _show(metric: str, figure: float | None) -> str:
    assert figure is not None  # only usable groups are shown, and they have rows
    if metric == "latency_p95":
        return f"over {LATENCY_EDGES_MS[-1]:g} ms" if math.isinf(figure) else f"{figure:.1f} ms"
    if metric == "confidence":
        return f"{figure:.3f}"
    return f"{figure:.2%}"


#: A latency ratio also needs the p95 to rise by this much: below a millisecond a p95 moves by whole buckets with the
#: machine's scheduling. A good release, measured in the last wave of a CI run (against its own baseline only: no
#: device was left to compare with), went from 0.1 ms to 0.3 ms (p = 2e-36 on 1,645 inferences) while other devices
#: ran their smoke tests, and a 1.5x limit rolled it back. A release that matters is slower by more (the `slow`
#: example: 2.3 vs 0.3 ms).
LATENCY_FLOOR_MS = 0.5


def _beyond(kpi: Kpi, value: float, reference: float | None) -> bool:
    """Whether the point estimates differ by more than the limit, in the direction that is worse.

    Written without division so that ``inf`` compares sensibly: an upgraded ``inf`` is beyond a finite reference;
    nothing is beyond a reference's ``inf`` (``inf - inf`` is NaN, and NaN compares false).
    """
    assert reference is not None  # only usable references are compared
    if kpi.relative:
        return value > reference * kpi.limit and value - reference >= LATENCY_FLOOR_MS
    if _OPS[kpi.metric] == "<=":
        return value - reference > kpi.limit
    return value - reference < kpi.limit


def _worse_p(metric: str, upgraded: Sample, reference: Sample) -> float:
    """The one-sided p-value of H0 "``upgraded`` is no worse than ``reference``" for ``metric``."""
    if metric == "error_rate":
        return _proportion_p(upgraded.errors, upgraded.count, reference.errors, reference.count)
    if metric == "accuracy":
        return _proportion_p(
            upgraded.labelled - upgraded.correct,
            upgraded.labelled,
            reference.labelled - reference.correct,
            reference.labelled,
        )
    if metric == "latency_p95":
        edge = latency_quantile_ms(reference.latency, 0.95)
        above = [u > edge for u in _LATENCY_UPPER_EDGES]  # buckets wholly above the reference's p95
        return _proportion_p(
            sum(c for c, a in zip(upgraded.latency, above, strict=True) if a),
            sum(upgraded.latency),
            sum(c for c, a in zip(reference.latency, above, strict=True) if a),
            sum(reference.latency),
        )
    return _mean_drop_p(upgraded.confidence, reference.confidence)


def _proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided p-value of H0 "p1 <= p2" from ``x1`` of ``n1`` against ``x2`` of ``n2``.

    The pooled two-proportion z-test; Fisher's exact test when any expected cell of the 2x2 table is below 5, where
    the normal approximation is poor (and a column of zeros, which has no variance, gives Fisher's p of 1).
    """
    table = np.array([[x1, n1 - x1], [x2, n2 - x2]], dtype=np.int64)
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    if expected.min() < 5:
        return float(stats.fisher_exact(table, alternative="greater").pvalue)
    pooled = (x1 + x2) / (n1 + n2)
    z = (x1 / n1 - x2 / n2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return float(stats.norm.sf(z))


def _mean_drop_p(upgraded: tuple[int, ...], reference: tuple[int, ...]) -> float:
    """One-sided p-value of H0 "the upgraded mean confidence is no lower" by a Welch z-test on the binned values.

    Each group's mean and variance are those of its bin midpoints weighted by the counts. When both
    variances are 0 (every row of each group in one bin) the means are exact: the p-value is 0 if the upgraded mean
    is lower, else 1.
    """
    moments = []
    for counts in (upgraded, reference):
        weights = np.asarray(counts, dtype=np.float64)
        n = weights.sum()
        mean = float(np.dot(weights, _CONFIDENCE_MIDPOINTS) / n)
        variance = float(np.dot(weights, (_CONFIDENCE_MIDPOINTS - mean) ** 2) / n)
        moments.append((mean, variance / n))
    (mean_up, var_up), (mean_ref, var_ref) = moments
    se = math.sqrt(var_up + var_ref)
    if se == 0:
        return 0.0 if mean_up < mean_ref else 1.0
    return float(stats.norm.sf((mean_ref - mean_up) / se))
