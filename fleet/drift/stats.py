"""The statistics behind drift detection: tests, effect sizes and persistence rules over fixed-bin histograms.

A device never sends its inputs, only a window of integer counts per feature (``agent.telemetry``: underflow, the
feature's bins, padding, overflow, NaN) plus class, confidence and feedback counts. The fleet compares them with the
reference counts a model card carries (``fleet.examples.modelgen._drift_reference``). Every function here is pure
(numpy and scipy only, no I/O), so the same counts always give the same verdict.

Why a decision needs four things, not a threshold on one number:

* **A test** (:func:`g_test`, the likelihood-ratio goodness of fit; :func:`g_test_two_sample` for two windows).
  It knows the sample size: at 50 rows a large PSI is noise, at 50,000 a small one is not. Across devices and
  features the p-values are pooled by :func:`benjamini_hochberg`, so 64 features x many devices do not each get a
  5% chance of a false alarm.
* **An effect size** (:func:`jensen_shannon`; :func:`psi` and :func:`wasserstein_binned` are reported beside it).
  At large samples every real but harmless difference is significant; the effect floor says how big a change
  must be to matter.
* **A minimum sample**: below it no verdict, either way.
* **Persistence** (:class:`Persistence`, 2 of the last 3 windows, or :func:`cusum`): one unlucky window does not
  page anyone.

The baseline the anchors used, :func:`psi_fixed_threshold` (PSI > 0.2 per feature), fails both ways: see
:func:`decide` for the measured figures.

Concept drift (the inputs look the same but the answers got worse) needs labels: :class:`Ddm` watches the error
rate of the feedback confusion counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

#: The probability :func:`g_test` gives the pooled bins the reference never saw (instead of 0, which would divide
#: by zero). It is a pseudo-count small enough that one row there is decisive: with 500 rows it adds
#: ``2 * ln(1 / (500 * 1e-15)) = 57`` to G, a p-value of 1e-8 at 10 degrees of freedom. A value outside
#: everything the reference saw is drift of the data; whether it matters is the effect size's call.
UNSEEN_PROB = 1e-15

#: The Jensen-Shannon divergence (bits) a feature must reach for :func:`decide` to call it drifted: the divergence
#: of a 0.17-sigma mean shift of a normal feature over 10 quantile bins (0.25 sigma: 0.0107, 0.5 sigma: 0.042).
#: Measured on clean multinomial windows of 500 rows, JS has a median of 0.0030 bits and a 99th percentile of 0.0083
#: (10-bin normal reference), 0.0007 and 0.0047 on the digits reference (most pixels have few bins). At a few
#: hundred rows the test is the stricter condition (G ~ 5.5 n JS, so BH over 64 features at q = 0.01 needs JS ~ 0.012
#: at 500 rows); the floor binds at large samples, where a shift below ~0.17 sigma is significant but negligible. It
#: stays below a 0.25-sigma shift, which the fixed PSI > 0.2 misses at any sample size (its PSI is 0.06).
MIN_EFFECT_JS = 0.005
#: Rows a feature needs in a window before :func:`decide` judges it.
MIN_SAMPLES = 200


def _counts(values: Sequence[int] | Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if np.any(~np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return array


def _row(values: Sequence[int] | Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """A one-dimensional float row, its values checked by the caller (on the whole matrix at once)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _pair(p: Any, q: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _counts(p, "p_counts"), _counts(q, "q_counts")
    if a.shape != b.shape:
        raise ValueError(f"histograms of {a.size} and {b.size} bins cannot be compared")
    if a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("an empty histogram has no distribution")
    return a / a.sum(), b / b.sum()


def g_test(observed: Sequence[int], expected_probs: Sequence[float]) -> tuple[float, int, float]:
    """Goodness of fit of ``observed`` counts to the reference probabilities: ``(G, dof, p-value)``.

    ``G = 2 * sum(O * ln(O / E))`` with ``E = n * p``, against chi-square with ``k - 1`` degrees of freedom: the
    same as ``scipy.stats.power_divergence(observed, E, lambda_="log-likelihood")`` when every reference
    probability is positive. ``expected_probs`` may be counts; they are normalised. Bins the reference never saw
    (probability 0) are pooled into one bin of probability :data:`UNSEEN_PROB`, kept only if a row landed there:
    a row outside the reference's support gives a p-value of about 0, padding columns neither add degrees of
    freedom nor divide by zero. No rows, or a single bin: ``(0.0, 0, 1.0)``.
    """
    obs = _counts(observed, "observed")
    ref = _counts(expected_probs, "expected_probs")
    if obs.shape != ref.shape:
        raise ValueError(f"{obs.size} observed bins do not fit {ref.size} reference bins")
    if ref.sum() <= 0:
        raise ValueError("the reference has no mass")
    g, dof = _g_statistic(obs, ref / ref.sum())
    if dof == 0:
        return 0.0, dof, 1.0
    return g, dof, float(stats.chi2.sf(g, dof))


def _g_statistic(obs: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """G and its degrees of freedom for :func:`g_test` (validated inputs, ``probs`` summing to 1); dof 0: no test."""
    seen = probs > 0
    unseen_rows = float(obs[~seen].sum())
    obs_bins = obs[seen]
    prob_bins = probs[seen]
    if unseen_rows > 0:
        obs_bins = np.append(obs_bins, unseen_rows)
        prob_bins = np.append(prob_bins, UNSEEN_PROB)
    n = float(obs_bins.sum())
    dof = max(obs_bins.size - 1, 0) if n > 0 else 0
    if dof == 0:
        return 0.0, 0
    g = 2.0 * float(np.sum(special.xlogy(obs_bins, obs_bins / (n * prob_bins))))
    return max(g, 0.0), dof  # rounding can make a perfect fit slightly negative


def g_test_two_sample(a: Sequence[int], b: Sequence[int]) -> tuple[float, int, float]:
    """Homogeneity of two count vectors over the same bins: the G-test of their 2 x k table, ``(G, dof, p)``.

    Bins empty in both are dropped (they say nothing and would give 0/0); ``dof = k' - 1`` over the rest. Agrees
    with ``scipy.stats.chi2_contingency([a, b], lambda_="log-likelihood", correction=False)``. Unlike
    :func:`g_test` it counts the reference's own sampling noise: use it when the reference is a sample of the same
    order of size as the window. An empty side, or a single bin: ``(0.0, dof, 1.0)``.
    """
    x, y = _counts(a, "a"), _counts(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"{x.size} and {y.size} bins cannot be compared")
    keep = (x + y) > 0
    table = np.vstack([x[keep], y[keep]])
    dof = max(int(keep.sum()) - 1, 0)
    rows = table.sum(axis=1)
    if dof == 0 or np.any(rows <= 0):
        return 0.0, dof, 1.0
    expected = np.outer(rows, table.sum(axis=0)) / table.sum()
    g = max(2.0 * float(np.sum(special.xlogy(table, table / expected))), 0.0)
    return g, dof, float(stats.chi2.sf(g, dof))


_PSI_EPS = 1e-4


def psi(observed: Sequence[int], reference: Sequence[int] | Sequence[float], eps: float = _PSI_EPS) -> float:
    """Population stability index ``sum((o - r) * ln(o / r))`` over the two histograms' proportions.

    Both may be counts or probabilities (each is normalised). A proportion of 0 on either side is raised to
    ``eps`` (not renormalised), the usual convention; that is why PSI explodes on small samples, where most bins of
    a window are empty by chance (see :func:`psi_fixed_threshold`).
    """
    o, r = _pair(observed, reference)
    o, r = np.maximum(o, eps), np.maximum(r, eps)
    return float(np.sum((o - r) * np.log(o / r)))


def jensen_shannon(p_counts: Sequence[int] | Sequence[float], q_counts: Sequence[int] | Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1]: 0 for identical distributions, 1 for disjoint supports.

    ``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2``. Symmetric and bounded, with no smoothing needed
    for empty bins, so it is the effect size :func:`decide` thresholds.
    """
    p, q = _pair(p_counts, q_counts)
    m = 0.5 * (p + q)
    value = 0.5 * float(np.sum(special.rel_entr(p, m)) + np.sum(special.rel_entr(q, m))) / math.log(2.0)
    return min(max(value, 0.0), 1.0)


def _centres(k: int, edges: Sequence[float] | None) -> np.ndarray:
    if edges is None:
        return np.arange(k, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size != k + 1:
        raise ValueError(f"{k} bins need {k + 1} edges, got {e.size}")
    if np.any(np.diff(e) < 0) or not np.all(np.isfinite(e)):
        raise ValueError("edges must be finite and increasing")
    return 0.5 * (e[:-1] + e[1:])


def wasserstein_binned(
    p_counts: Sequence[int] | Sequence[float],
    q_counts: Sequence[int] | Sequence[float],
    edges: Sequence[float] | None = None,
) -> float:
    """Earth mover's distance between two histograms on ordered bins, each bin's mass at its centre.

    Centres are the midpoints of ``edges`` (``k + 1`` values for ``k`` bins), or ``0..k-1`` (bin units) without.
    ``sum(|CDF_p - CDF_q| * gap)``: the same as ``scipy.stats.wasserstein_distance(centres, centres, p, q)``.
    Unlike JS it grows with how far mass moved, not only how much.
    """
    p, q = _pair(p_counts, q_counts)
    centres = _centres(p.size, edges)
    gaps = np.diff(centres)
    return float(np.sum(np.abs(np.cumsum(p - q)[:-1]) * gaps))


def shift_direction(
    p_counts: Sequence[int] | Sequence[float],
    q_counts: Sequence[int] | Sequence[float],
    edges: Sequence[float] | None = None,
) -> float:
    """Signed shift of the mean, observed (``p``) minus reference (``q``), in bin units or ``edges`` units.

    Positive: values moved up. Bin centres as in :func:`wasserstein_binned`.
    """
    p, q = _pair(p_counts, q_counts)
    centres = _centres(p.size, edges)
    return float(np.dot(p - q, centres))


def benjamini_hochberg(p_values: Sequence[float], q: float = 0.05) -> list[bool]:
    """Which hypotheses the Benjamini-Hochberg step-up procedure rejects at false discovery rate ``q``.

    The largest rank ``i`` (of ``m`` sorted p-values) with ``p_(i) <= q * i / m`` and every smaller p-value are
    rejected; the same set as ``scipy.stats.false_discovery_control(p, method="bh") <= q``. Valid for independent or
    positively dependent tests (features of one window, the same feature across devices).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError("p_values must be one-dimensional")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must be in [0, 1]")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be between 0 and 1, got {q}")
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    below = np.nonzero(p[order] <= q * np.arange(1, m + 1) / m)[0]
    rejected = np.zeros(m, dtype=bool)
    if below.size:
        rejected[order[: below[-1] + 1]] = True
    return rejected.tolist()


@dataclass(frozen=True, slots=True)
class Persistence:
    """Alarm when at least ``need`` of the last ``window`` verdicts were hits (default: 2 of 3).

    One noisy window does not alarm; a drift that persists alarms on its second window, and an intermittent one
    (every other window) still does. The history is the caller's state, so the rule stays a pure function.
    """

    window: int = 3
    need: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.need <= self.window:
            raise ValueError(f"need must be between 1 and window ({self.window}), got {self.need}")

    def update(self, history: tuple[bool, ...], hit: bool) -> tuple[tuple[bool, ...], bool]:
        """The last ``window`` verdicts after this one, and whether they alarm."""
        kept = (*tuple(history), bool(hit))[-self.window :]
        return kept, sum(kept) >= self.need


def cusum(values: Sequence[float], k: float, h: float) -> tuple[float, int | None]:
    """One-sided upper CUSUM of standardized values: ``S_t = max(0, S_t-1 + x_t - k)``, from ``S = 0``.

    Returns the final ``S`` and the first index where ``S > h`` (None if never). ``k`` is the allowance (half the
    shift to detect, in sigmas: 0.5 for a 1-sigma shift), ``h`` the decision interval (4-5 gives an in-control run
    length of several hundred windows). Slow, persistent drift accumulates where single windows stay below any test.
    """
    s = 0.0
    first: int | None = None
    for i, x in enumerate(values):
        s = max(0.0, s + float(x) - k)
        if first is None and s > h:
            first = i
    return s, first


@dataclass(slots=True)
class Ddm:
    """Gama et al. (2004) Drift Detection Method on the error rate, fed a window's labelled rows at a time.

    ``p`` is the error rate since the last reset, ``s = sqrt(p (1 - p) / n)``; ``pmin``/``smin`` hold the state with
    the smallest ``p + s`` seen after ``min_instances`` rows. :meth:`update` says ``"warning"`` when
    ``p + s >= pmin + 2 smin``, ``"drift"`` at ``pmin + 3 smin`` (and resets, so the next concept is learned from
    scratch), else ``"ok"``. Batches are an approximation of the per-instance method: a drift inside a window is
    seen at its end. ``errors`` is kept as an integer beside ``p`` so the cumulative rate does not drift with
    rounding. :meth:`to_dict` / :meth:`from_dict` let the engine persist it.
    """

    n: int = 0
    errors: int = 0
    p: float = 0.0
    s: float = 0.0
    pmin: float | None = None
    smin: float | None = None
    min_instances: int = 30
    warning_level: float = 2.0
    drift_level: float = 3.0

    def update(self, errors: int, n: int) -> str:
        """Add a batch of ``n`` labelled rows with ``errors`` wrong; return ``"ok"``, ``"warning"`` or ``"drift"``."""
        if n < 0 or not 0 <= errors <= n:
            raise ValueError(f"need 0 <= errors <= n, got errors={errors}, n={n}")
        if n == 0:
            return "ok"
        self.n += int(n)
        self.errors += int(errors)
        self.p = self.errors / self.n
        self.s = math.sqrt(self.p * (1.0 - self.p) / self.n)
        if self.n < self.min_instances:
            return "ok"
        if self.pmin is None or self.smin is None or self.p + self.s <= self.pmin + self.smin:
            self.pmin, self.smin = self.p, self.s
            return "ok"
        level = self.p + self.s
        if level >= self.pmin + self.drift_level * self.smin:
            self.reset()
            return "drift"
        if level >= self.pmin + self.warning_level * self.smin:
            return "warning"
        return "ok"

    def reset(self) -> None:
        """Forget the concept: counts and minima back to their start."""
        self.n, self.errors, self.p, self.s, self.pmin, self.smin = 0, 0, 0.0, 0.0, None, None

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-able values (unset minima are None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ddm:
        """The detector :meth:`to_dict` saved."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True, slots=True)
class FeatureShift:
    """One feature of one window against its reference.

    ``p_value`` is the G-test's (:func:`g_test`); ``effect`` is the Jensen-Shannon divergence in bits
    (:func:`jensen_shannon`), the effect size :func:`decide` thresholds; ``psi`` is reported for operators used to
    it; ``direction`` is the mean shift in columns of the reference row (+: values moved up), as
    :func:`shift_direction` over the ordered columns (underflow, bins, overflow; the NaN column left out, each side
    normalised without it); ``observed`` the window's rows.
    """

    feature: int
    p_value: float
    effect: float
    psi: float
    direction: float
    observed: int


def _align(observed: np.ndarray, reference: np.ndarray, feature: int) -> np.ndarray:
    """The observed row in the reference row's columns.

    A window's rows are padded to the widest feature (underflow, bins, zeros, overflow, NaN); the card's reference
    rows are not (underflow, bins, overflow, NaN). The padding must be empty: a count there is a layout mix-up.
    """
    if observed.size == reference.size:
        return observed
    if observed.size < reference.size or reference.size < 3:
        raise ValueError(f"feature {feature}: {observed.size} observed columns do not fit {reference.size} reference")
    head = reference.size - 2
    if np.any(observed[head:-2] != 0):
        raise ValueError(f"feature {feature}: counts in the padding columns {head}..{observed.size - 3}")
    return np.concatenate([observed[:head], observed[-2:]])


def feature_shifts(
    observed_rows: Sequence[Sequence[int]], reference_rows: Sequence[Sequence[int]]
) -> list[FeatureShift]:
    """Per feature, the window's row against the reference's: G-test p-value, JS, PSI, direction, rows.

    ``reference_rows`` are the card's ``drift.reference_counts`` (or probabilities); an observed row may be wider,
    with the wire's padding (see :func:`_align`). A feature with no rows gets p-value 1 and no effect.
    """
    if len(observed_rows) != len(reference_rows):
        raise ValueError(f"{len(observed_rows)} observed features, {len(reference_rows)} in the reference")
    if len(observed_rows) == 0:
        return []
    # All features at once, on matrices: a feature at a time, through the public functions, cost ~5 ms for a
    # 64-feature window (hundreds of small numpy calls); this costs under 1 ms. Each row is placed like the wire's:
    # underflow and bins from column 0, overflow and NaN in the last two columns, zeros between (which every
    # statistic below ignores: no mass on either side).
    refs = [_row(row, f"reference feature {j}") for j, row in enumerate(reference_rows)]
    obs = [_align(_row(row, f"observed feature {j}"), refs[j], j) for j, row in enumerate(observed_rows)]
    features, width = len(refs), max(r.size for r in refs)
    ref_m, obs_m = np.zeros((features, width)), np.zeros((features, width))
    positions = np.zeros((features, width - 1))  # a column's place among its feature's ordered columns
    for j, (o, r) in enumerate(zip(obs, refs, strict=True)):
        if r.size < 2:
            raise ValueError(f"reference feature {j} has {r.size} columns; a row ends with overflow and NaN")
        head = r.size - 2
        ref_m[j, :head], ref_m[j, -2:] = r[:head], r[-2:]
        obs_m[j, :head], obs_m[j, -2:] = o[:head], o[-2:]
        positions[j, :head], positions[j, -1] = np.arange(head), head
    for name, matrix in (("reference", ref_m), ("observed", obs_m)):
        bad = ~np.isfinite(matrix) | (matrix < 0)
        if np.any(bad):
            raise ValueError(f"{name} feature {int(np.nonzero(bad)[0][0])}: counts must be finite and non-negative")
    ref_total, n = ref_m.sum(axis=1), obs_m.sum(axis=1)
    if np.any(ref_total <= 0):
        raise ValueError(f"reference features {np.nonzero(ref_total <= 0)[0].tolist()} have no mass")
    probs = ref_m / ref_total[:, None]
    has_rows = n > 0
    freq = np.divide(obs_m, n[:, None], out=np.zeros_like(obs_m), where=has_rows[:, None])

    # G (as _g_statistic): the seen bins, plus the bins the reference never saw pooled at UNSEEN_PROB
    seen = probs > 0
    unseen_rows = np.where(seen, 0.0, obs_m).sum(axis=1)
    unseen_share = np.where(seen, 0.0, freq).sum(axis=1)
    ratio = np.divide(freq, probs, out=np.ones_like(freq), where=seen & (obs_m > 0))
    g = 2.0 * (np.sum(obs_m * np.log(ratio), axis=1) + special.xlogy(unseen_rows, unseen_share / UNSEEN_PROB))
    dof = np.where(has_rows, seen.sum(axis=1) + (unseen_rows > 0) - 1, 0)
    tested = dof > 0
    g = np.where(tested, np.maximum(g, 0.0), 0.0)
    p_values = np.ones(features)
    p_values[tested] = stats.chi2.sf(g[tested], dof[tested])

    mid = 0.5 * (freq + probs)
    js = (special.rel_entr(freq, mid).sum(axis=1) + special.rel_entr(probs, mid).sum(axis=1)) * (0.5 / math.log(2.0))
    js = np.where(has_rows, np.clip(js, 0.0, 1.0), 0.0)
    floor_o, floor_r = np.maximum(freq, _PSI_EPS), np.maximum(probs, _PSI_EPS)
    psi_values = np.where(has_rows, np.sum((floor_o - floor_r) * np.log(floor_o / floor_r), axis=1), 0.0)

    # direction: the mean column over the ordered columns (underflow, bins, overflow), NaN (the last) left out
    ordered_o, ordered_r = obs_m[:, :-1], ref_m[:, :-1]
    mass_o, mass_r = ordered_o.sum(axis=1), ordered_r.sum(axis=1)
    movable = (mass_o > 0) & (mass_r > 0)
    mean_o = np.divide((ordered_o * positions).sum(axis=1), mass_o, out=np.zeros(features), where=movable)
    mean_r = np.divide((ordered_r * positions).sum(axis=1), mass_r, out=np.zeros(features), where=movable)
    direction = np.where(movable, mean_o - mean_r, 0.0)
    return [
        FeatureShift(
            feature=j,
            p_value=float(p_values[j]),
            effect=float(js[j]),
            psi=float(psi_values[j]),
            direction=float(direction[j]),
            observed=int(n[j]),
        )
        for j in range(features)
    ]


def two_sample_shifts(a_rows: np.ndarray, b_rows: np.ndarray) -> list[FeatureShift]:
    """Per row (a feature, or any histogram), window ``a`` against window ``b`` of the same layout: the two-sample
    G-test's p-value (:func:`g_test_two_sample`), JS, PSI and direction (NaN column left out), on matrices.

    What the engine compares a device or a site with (the rest of the fleet). Rows of unequal width are padded by the
    caller; columns empty on both sides add no degree of freedom. A row empty on either side gets p-value 1."""
    a, b = np.asarray(a_rows, dtype=np.float64), np.asarray(b_rows, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two windows of one layout are compared, got {a.shape} and {b.shape}")
    na, nb = a.sum(axis=1), b.sum(axis=1)
    both = (na > 0) & (nb > 0)
    col = a + b
    total = na + nb
    used = col > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ea = np.where(used, col * (na / np.where(total > 0, total, 1))[:, None], 1.0)
        eb = np.where(used, col * (nb / np.where(total > 0, total, 1))[:, None], 1.0)
        g = 2.0 * (special.xlogy(a, np.where(a > 0, a / ea, 1.0)).sum(axis=1)
                   + special.xlogy(b, np.where(b > 0, b / eb, 1.0)).sum(axis=1))  # fmt: skip
    dof = used.sum(axis=1) - 1
    tested = both & (dof > 0)
    p_values = np.ones(len(a))
    p_values[tested] = stats.chi2.sf(np.maximum(g[tested], 0.0), dof[tested])
    fa = np.divide(a, na[:, None], out=np.zeros_like(a), where=na[:, None] > 0)
    fb = np.divide(b, nb[:, None], out=np.zeros_like(b), where=nb[:, None] > 0)
    mid = 0.5 * (fa + fb)
    js = (special.rel_entr(fa, mid).sum(axis=1) + special.rel_entr(fb, mid).sum(axis=1)) * (0.5 / math.log(2.0))
    js = np.where(both, np.clip(js, 0.0, 1.0), 0.0)
    floor_a, floor_b = np.maximum(fa, _PSI_EPS), np.maximum(fb, _PSI_EPS)
    psi_values = np.where(both, np.sum((floor_a - floor_b) * np.log(floor_a / floor_b), axis=1), 0.0)
    positions = np.arange(a.shape[1] - 1)
    oa, ob = a[:, :-1], b[:, :-1]
    ma, mb = oa.sum(axis=1), ob.sum(axis=1)
    movable = (ma > 0) & (mb > 0)
    mean_a = np.divide(oa @ positions, ma, out=np.zeros(len(a)), where=movable)
    mean_b = np.divide(ob @ positions, mb, out=np.zeros(len(a)), where=movable)
    direction = np.where(movable, mean_a - mean_b, 0.0)
    return [
        FeatureShift(j, float(p_values[j]), float(js[j]), float(psi_values[j]), float(direction[j]), int(na[j]))
        for j in range(len(a))
    ]


def decide(
    shifts: Sequence[FeatureShift],
    *,
    q: float = 0.01,
    min_effect: float = MIN_EFFECT_JS,
    min_samples: int = MIN_SAMPLES,
) -> list[FeatureShift]:
    """The features that drifted in this window: rejected by Benjamini-Hochberg over all given p-values at ``q``,
    with a JS effect of at least ``min_effect`` bits and at least ``min_samples`` rows.

    Pass the shifts of every device and feature being judged together, so the false discovery rate holds across
    them. BH runs over every p-value given, including features too small or too weak to be flagged: dropping them
    first would pick the family by its outcome. Persistence across windows is the caller's (:class:`Persistence`).

    Measured with the defaults on seeded multinomial windows (tests/test_drift_stats.py asserts bounds on these):

    * clean windows of 500 rows from the digits reference (64 features, 1,347 training rows): 2 flagged
      feature-windows of 200 x 64 (0.016%), in 2 of the 200 windows (1%: under the global null BH holds the
      family-wise rate at ``q``, so ``q`` is the per-window rate; :class:`Persistence` 2-of-3 makes an alarm
      ~3 * q**2 = 3e-4 a window). At ``q = 0.001``: none. At 50 rows nothing is judged (``min_samples``), while
      PSI > 0.2 flags 4.6% of the feature-windows, 96% of the windows; on a 10-bin normal reference 43% of the
      feature-windows.
    * one feature of a 10-bin normal reference shifted by 0.25 sigma among 63 clean ones: flagged in ~70% of single
      windows of 500 rows (68% and 71% in two seeded runs of 300; ~78% alarm on 2 of 3 windows), 100% at 1,000
      and 2,000 rows (at ``q = 0.001``: 50% and 98%); a 0.5-sigma shift in 100% at 500 rows; clean features beside
      it 0.016-0.04%. PSI > 0.2 catches a 0.25-sigma shift in none: its PSI is 0.06 at any size.
    * the digits' held-out split (450 rows) against the training reference: 3 features have p < 0.01 (down to
      4e-39, pixel values beyond the training range: :data:`UNSEEN_PROB`) with JS <= 0.0034; none is flagged.
    """
    if not shifts:
        return []
    rejected = benjamini_hochberg([s.p_value for s in shifts], q)
    return [
        s for s, r in zip(shifts, rejected, strict=True) if r and s.effect >= min_effect and s.observed >= min_samples
    ]


def psi_fixed_threshold(
    observed_rows: Sequence[Sequence[int]], reference_rows: Sequence[Sequence[int]], threshold: float = 0.2
) -> list[int]:
    """The baseline rule (the anchors' default): indices of features whose PSI exceeds ``threshold``.

    No sample size, no multiplicity, no persistence: kept only so the evaluation can compare against it.
    """
    return [s.feature for s in feature_shifts(observed_rows, reference_rows) if s.observed > 0 and s.psi > threshold]
