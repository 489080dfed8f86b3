"""The drift statistics agree with scipy and with hand-computed values, and the decision rule beats PSI > 0.2."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from fleet.drift import stats as drift_stats
from fleet.drift.stats import (
    MIN_EFFECT_JS,
    Ddm,
    FeatureShift,
    Persistence,
    benjamini_hochberg,
    cusum,
    decide,
    feature_shifts,
    g_test,
    g_test_two_sample,
    jensen_shannon,
    psi,
    psi_fixed_threshold,
    shift_direction,
    wasserstein_binned,
)

SHAPES = [2, 5, 10, 40]
#: A 10-bin reference: a standard normal feature over its deciles' edges.
_NORMAL_EDGES = stats.norm.ppf(np.linspace(0.0, 1.0, 11)[1:-1])
_NORMAL_PROBS = np.full(10, 0.1)


def _random_counts(rng: np.random.Generator, k: int, n: int = 300) -> np.ndarray:
    return rng.multinomial(n, rng.dirichlet(np.ones(k)))


@pytest.fixture(scope="module")
def digits_reference() -> list[np.ndarray]:
    from fleet.examples.modelgen import _drift_reference, digits_split

    x_train, _, _, _ = digits_split(0)
    return [np.asarray(row, dtype=np.float64) for row in _drift_reference(x_train)["reference_counts"]]


def _clean_window(rng: np.random.Generator, n: int, reference: list[np.ndarray]) -> list[np.ndarray]:
    return [rng.multinomial(n, row / row.sum()) for row in reference]


def _normal_row(rng: np.random.Generator, n: int, shift_sigma: float) -> np.ndarray:
    return np.bincount(np.searchsorted(_NORMAL_EDGES, rng.normal(shift_sigma, 1.0, n)), minlength=10)


@pytest.mark.parametrize("k", SHAPES)
def test_g_test_agrees_with_scipy_power_divergence_when_no_bin_is_empty(k: int) -> None:
    rng = np.random.default_rng(k)
    observed = _random_counts(rng, k)
    probs = rng.dirichlet(np.ones(k))
    g, dof, p = g_test(observed, probs)
    expected = stats.power_divergence(observed, probs * observed.sum(), lambda_="log-likelihood")
    assert dof == k - 1
    assert g == pytest.approx(expected.statistic, rel=1e-9, abs=1e-12)
    assert p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-15)


def test_g_test_of_a_perfect_fit_is_zero_with_p_one() -> None:
    assert g_test([10, 20, 30], [1, 2, 3]) == (0.0, 2, 1.0)


def test_g_test_with_a_count_where_the_reference_never_was_gives_p_near_zero_without_warnings() -> None:
    reference = [0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0]  # underflow, 4 bins, overflow, NaN
    observed = [0, 125, 125, 125, 124, 1, 0]  # one row above everything the reference saw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, dof, p = g_test(observed, reference)
    assert math.isfinite(g)
    assert dof == 4  # the four seen bins and the pooled unseen one
    assert p < 1e-8


def test_g_test_ignores_empty_unseen_columns_so_padding_adds_no_degrees_of_freedom() -> None:
    assert g_test([5, 5, 0, 0, 0], [0.5, 0.5, 0, 0, 0]) == g_test([5, 5], [0.5, 0.5])


@pytest.mark.parametrize("k", SHAPES)
def test_two_sample_g_test_agrees_with_scipy_chi2_contingency(k: int) -> None:
    rng = np.random.default_rng(100 + k)
    a, b = _random_counts(rng, k, 200), _random_counts(rng, k, 900)
    a[0] = b[0] = 0  # a bin empty in both is dropped, as scipy would refuse it
    g, dof, p = g_test_two_sample(a, b)
    keep = (a + b) > 0
    res = stats.chi2_contingency(np.vstack([a[keep], b[keep]]), lambda_="log-likelihood", correction=False)
    assert dof == res.dof
    assert g == pytest.approx(res.statistic, rel=1e-9, abs=1e-12)
    assert p == pytest.approx(res.pvalue, rel=1e-9, abs=1e-15)


def test_two_sample_g_test_of_proportional_counts_is_zero() -> None:
    g, dof, p = g_test_two_sample([1, 2, 3, 0], [10, 20, 30, 0])
    assert (g, dof) == (pytest.approx(0.0, abs=1e-12), 2)
    assert p == pytest.approx(1.0)


def test_psi_of_a_simple_pair_is_the_hand_computed_value() -> None:
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * math.log(2) + 0.25 * math.log(1.5))
    assert psi([3, 7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-15)


def test_psi_raises_empty_proportions_to_eps() -> None:
    assert psi([0, 10], [5, 5], eps=1e-4) == pytest.approx((1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(2))


@pytest.mark.parametrize("k", SHAPES)
def test_jensen_shannon_agrees_with_scipy_squared_base_2_distance(k: int) -> None:
    rng = np.random.default_rng(200 + k)
    p, q = _random_counts(rng, k), _random_counts(rng, k, 50)
    assert jensen_shannon(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2, rel=1e-9, abs=1e-15)


def test_jensen_shannon_is_one_for_disjoint_and_zero_for_identical_distributions() -> None:
    assert jensen_shannon([5, 0, 0], [0, 3, 4]) == pytest.approx(1.0)
    assert jensen_shannon([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("k", SHAPES)
@pytest.mark.parametrize("with_edges", [False, True])
def test_wasserstein_binned_agrees_with_scipy_on_bin_centres(k: int, with_edges: bool) -> None:
    rng = np.random.default_rng(300 + k)
    p, q = _random_counts(rng, k), _random_counts(rng, k, 1000)
    edges = np.cumsum(rng.uniform(0.1, 2.0, k + 1)) if with_edges else None
    centres = 0.5 * (edges[:-1] + edges[1:]) if edges is not None else np.arange(k, dtype=np.float64)
    expected = stats.wasserstein_distance(centres, centres, u_weights=p, v_weights=q)
    assert wasserstein_binned(p, q, edges) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_wasserstein_of_all_mass_moved_three_bins_is_three() -> None:
    assert wasserstein_binned([0, 0, 0, 7], [4, 0, 0, 0]) == pytest.approx(3.0)
    assert wasserstein_binned([0, 0, 0, 7], [4, 0, 0, 0], edges=[0, 1, 2, 3, 5]) == pytest.approx(3.5)


def test_shift_direction_is_positive_when_values_move_up_and_in_edge_units() -> None:
    assert shift_direction([0, 1, 1], [1, 1, 0]) == pytest.approx(1.0)
    assert shift_direction([1, 1, 0], [0, 1, 1]) == pytest.approx(-1.0)
    assert shift_direction([0, 1, 1], [1, 1, 0], edges=[0, 2, 4, 6]) == pytest.approx(2.0)


@pytest.mark.parametrize("m", [1, 5, 20, 200])
@pytest.mark.parametrize("q", [0.01, 0.05, 0.2])
def test_benjamini_hochberg_rejects_what_scipy_false_discovery_control_does(m: int, q: float) -> None:
    rng = np.random.default_rng(m)
    # a mixture: most null (uniform), some signals (tiny p-values), and ties
    p = np.concatenate([rng.uniform(size=m), rng.uniform(0, 1e-3, size=m // 4), [0.01] * (m // 5)])
    expected = stats.false_discovery_control(p, method="bh") <= q
    assert benjamini_hochberg(p, q) == expected.tolist()


def test_benjamini_hochberg_of_nothing_rejects_nothing() -> None:
    assert benjamini_hochberg([]) == []
    assert benjamini_hochberg([0.2, 0.5]) == [False, False]


def test_persistence_alarms_on_two_hits_of_the_last_three_windows() -> None:
    rule = Persistence()
    history: tuple[bool, ...] = ()
    alarms = []
    for hit in (True, False, False, True, False, True, True, False, False, False):
        history, alarm = rule.update(history, hit)
        alarms.append(alarm)
        assert len(history) <= 3
    assert alarms == [False, False, False, False, False, True, True, True, False, False]


def test_persistence_of_one_in_one_alarms_on_every_hit() -> None:
    assert Persistence(window=1, need=1).update((True, True), False) == ((False,), False)
    with pytest.raises(ValueError):
        Persistence(window=2, need=3)


def test_cusum_accumulates_excess_over_k_and_reports_the_first_crossing() -> None:
    # S: 0, 0.5, 1.5, 3.0, 2.5, 4.5 (> 4 at index 5), 4.0
    values = [0.0, 1.0, 1.5, 2.0, 0.0, 2.5, 0.0]
    assert cusum(values, k=0.5, h=4.0) == (pytest.approx(4.0), 5)
    assert cusum([-3.0, 0.2, 0.4], k=0.5, h=4.0) == (0.0, None)


def test_ddm_stays_ok_on_a_stable_ten_percent_error_stream() -> None:
    rng = np.random.default_rng(7)
    ddm = Ddm()
    states = [ddm.update(int(rng.binomial(200, 0.10)), 200) for _ in range(100)]
    assert "drift" not in states
    assert states.count("ok") >= 95


def test_ddm_warns_then_drifts_within_a_few_batches_of_a_jump_to_forty_percent_and_resets() -> None:
    ddm = Ddm()
    assert all(ddm.update(5, 50) == "ok" for _ in range(40))
    after = []
    for _ in range(5):
        after.append(ddm.update(20, 50))
        if after[-1] == "drift":
            break
    assert after[0] == "warning"
    assert after[-1] == "drift"
    assert len(after) <= 3
    assert (ddm.n, ddm.errors, ddm.pmin) == (0, 0, None)
    # the new concept (40%) is learned from scratch: no alarm while it stays
    assert all(ddm.update(20, 50) == "ok" for _ in range(10))


def test_ddm_waits_for_thirty_instances_before_judging() -> None:
    ddm = Ddm()
    assert ddm.update(0, 20) == "ok"
    assert ddm.pmin is None


def test_ddm_state_round_trips_through_a_dict() -> None:
    ddm = Ddm()
    for errors in (10, 12, 9, 30):
        ddm.update(errors, 100)
    copy = Ddm.from_dict(ddm.to_dict())
    assert copy == ddm
    assert copy.update(35, 100) == ddm.update(35, 100)


def test_feature_shifts_aligns_a_padded_wire_row_to_the_reference_row() -> None:
    reference = [[0, 30, 70, 0, 0]]  # underflow, 2 bins, overflow, NaN
    wire = [[0, 30, 70, 0, 0, 0, 0]]  # the same, padded to a wider feature's bins
    (shift,) = feature_shifts(wire, reference)
    assert shift == FeatureShift(feature=0, p_value=1.0, effect=0.0, psi=0.0, direction=0.0, observed=100)
    with pytest.raises(ValueError, match="padding"):
        feature_shifts([[0, 30, 60, 10, 0, 0, 0]], reference)


def test_feature_shifts_agree_with_the_public_statistics() -> None:
    rng = np.random.default_rng(11)
    reference = [rng.multinomial(1000, rng.dirichlet(np.ones(6))) for _ in range(4)]
    observed = [rng.multinomial(300, rng.dirichlet(np.ones(6))) for _ in range(4)]
    for shift, obs, ref in zip(feature_shifts(observed, reference), observed, reference, strict=True):
        assert shift.p_value == pytest.approx(g_test(obs, ref)[2], rel=1e-9, abs=1e-300)
        assert shift.effect == pytest.approx(jensen_shannon(obs, ref), rel=1e-9, abs=1e-15)
        assert shift.psi == pytest.approx(psi(obs, ref), rel=1e-9)
        assert shift.direction == pytest.approx(shift_direction(obs[:-1], ref[:-1]), rel=1e-9, abs=1e-12)
        assert shift.observed == 300


def test_feature_shifts_point_up_when_values_move_up() -> None:
    rng = np.random.default_rng(5)
    (shift,) = feature_shifts([np.append(_normal_row(rng, 2000, 0.5), 0)], [np.append(_NORMAL_PROBS, 0)])
    assert shift.direction > 0.5
    assert shift.effect >= MIN_EFFECT_JS


def test_no_feature_of_two_hundred_clean_digits_windows_of_500_rows_alarms(digits_reference) -> None:
    rng = np.random.default_rng(1)
    rule = Persistence()
    history: tuple[bool, ...] = ()
    flagged_windows = flagged_features = alarms = 0
    for _ in range(200):
        flagged = decide(feature_shifts(_clean_window(rng, 500, digits_reference), digits_reference))
        flagged_features += len(flagged)
        flagged_windows += bool(flagged)
        history, alarm = rule.update(history, bool(flagged))
        alarms += alarm
    # BH at q = 0.01 holds a clean window's chance of any flag at ~1%; 2 of 3 windows makes an alarm ~3e-4
    assert flagged_features / (200 * 64) < 0.001
    assert flagged_windows <= 4
    assert alarms == 0


def test_fixed_psi_false_alarms_on_small_clean_windows_where_the_decision_rule_does_not(digits_reference) -> None:
    rng = np.random.default_rng(2)
    windows = [_clean_window(rng, 50, digits_reference) for _ in range(50)]
    psi_windows = sum(bool(psi_fixed_threshold(w, digits_reference)) for w in windows)
    ours = sum(len(decide(feature_shifts(w, digits_reference))) for w in windows)
    assert psi_windows / len(windows) > 0.2
    assert ours / (len(windows) * 64) < 0.01
    # on a 10-bin reference PSI > 0.2 flags ~43% of the clean feature-windows of 50 rows
    rows = [rng.multinomial(50, _NORMAL_PROBS) for _ in range(500)]
    psi_features = len(psi_fixed_threshold(rows, [_NORMAL_PROBS] * len(rows)))
    assert psi_features / len(rows) > 0.2


def test_a_quarter_sigma_shift_at_500_rows_is_flagged_and_psi_misses_it() -> None:
    rng = np.random.default_rng(3)
    reference = [_NORMAL_PROBS] * 64
    caught = psi_caught = others = 0
    trials = 40
    for _ in range(trials):
        window = [_normal_row(rng, 500, 0.25)] + [rng.multinomial(500, _NORMAL_PROBS) for _ in range(63)]
        flagged = {s.feature for s in decide(feature_shifts(window, reference))}
        caught += 0 in flagged
        others += len(flagged - {0})
        psi_caught += 0 in psi_fixed_threshold(window, reference)
    assert caught / trials >= 0.5  # measured 71% of single windows (see decide)
    assert others <= 1
    assert psi_caught == 0
    # at a larger sample every window catches it, while PSI still does not
    window = [_normal_row(rng, 20000, 0.25)] + [rng.multinomial(20000, _NORMAL_PROBS) for _ in range(63)]
    assert [s.feature for s in decide(feature_shifts(window, reference))] == [0]
    assert psi_fixed_threshold(window, reference) == []


def test_a_significant_but_negligible_shift_at_a_large_sample_is_not_flagged() -> None:
    rng = np.random.default_rng(4)
    (shift,) = feature_shifts([_normal_row(rng, 200_000, 0.1)], [_NORMAL_PROBS])
    assert shift.p_value < 1e-10
    assert decide([shift]) == []


def test_decide_needs_the_minimum_sample_the_test_and_the_effect() -> None:
    strong = FeatureShift(feature=0, p_value=1e-12, effect=0.2, psi=1.0, direction=1.0, observed=1000)
    assert decide([strong]) == [strong]
    assert decide([FeatureShift(0, 1e-12, 0.2, 1.0, 1.0, 199)]) == []
    assert decide([FeatureShift(0, 1e-12, MIN_EFFECT_JS / 2, 0.01, 0.1, 1000)]) == []
    assert decide([FeatureShift(0, 0.02, 0.2, 1.0, 1.0, 1000)]) == []
    assert decide([]) == []


def test_feature_shifts_give_an_unseen_value_the_g_test_p_value_and_an_empty_feature_no_verdict() -> None:
    reference = [[0, 250, 250, 0, 0], [0, 10, 0, 0], [0, 5, 5, 0, 0]]  # rows of different widths, as on a card
    observed = [[0, 120, 120, 0, 0, 0], [0, 240, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0]]  # the wire's padded rows
    shifts = feature_shifts(observed, reference)
    assert shifts[0].p_value == pytest.approx(g_test([0, 120, 120, 0, 0], reference[0])[2])
    assert shifts[1].p_value == pytest.approx(g_test([0, 240, 2, 0], reference[1])[2], rel=1e-9)
    assert shifts[1].p_value < 1e-8
    assert shifts[1].direction == pytest.approx(shift_direction([0, 240, 2], [0, 10, 0]))
    assert shifts[2] == FeatureShift(feature=2, p_value=1.0, effect=0.0, psi=0.0, direction=0.0, observed=0)


def test_two_sample_shifts_on_matrices_agree_with_the_one_row_functions() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 40, size=(6, 9))
    b = rng.integers(0, 40, size=(6, 9))
    a[2, 4] = b[2, 4] = 0  # a column empty on both sides adds no degree of freedom
    b[5] = 0  # an empty side: nothing to compare
    shifts = drift_stats.two_sample_shifts(a, b)
    for j in range(5):
        *_, p = drift_stats.g_test_two_sample(a[j].tolist(), b[j].tolist())
        assert shifts[j].p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
        assert shifts[j].effect == pytest.approx(drift_stats.jensen_shannon(a[j], b[j]), abs=1e-12)
        assert shifts[j].psi == pytest.approx(drift_stats.psi(a[j], b[j]), rel=1e-9)
        assert shifts[j].direction == pytest.approx(drift_stats.shift_direction(a[j][:-1], b[j][:-1]), abs=1e-12)
    assert (shifts[5].p_value, shifts[5].effect) == (1.0, 0.0)
