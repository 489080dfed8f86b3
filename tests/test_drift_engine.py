"""The drift engine on a fleet of 50 devices over 3 sites, each round 500 held-out digits per device binned as the
agent bins them, against the good release's signed reference: a shift is reported once, where it lives (one device,
one site, or the fleet), persists before it is a drift, and says which features moved which way."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.drift import engine
from fleet.drift.engine import DeviceBatch, Reference, Track
from fleet.examples.modelgen import digits_split, feature_histogram

DEVICES, SITES, ROWS = 50, 3, 500


@pytest.fixture(scope="module")
def card(example_model: Callable[[str], Path]) -> dict[str, Any]:
    return json.loads((example_model("good") / "card.json").read_text())


@pytest.fixture(scope="module")
def reference(card: Mapping[str, Any]) -> Reference:
    return Reference.from_card(card, "int8.onnx")


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return digits_split()[1]


def window(rows: np.ndarray, card: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A window as a device sends it: per-feature histograms over the card's edges, padded to one width (underflow,
    bins, zeros, overflow, NaN), with predicted classes and top-1 confidence drawn like a good model's."""
    edges = card["drift"]["edges"]
    hists = [feature_histogram(rows[:, j], e) for j, e in enumerate(edges)]
    width = max(h.size for h in hists)
    padded = [np.concatenate([h[:-2], np.zeros(width - h.size, np.int64), h[-2:]]).tolist() for h in hists]
    confidence = [0] * 10
    confidence[9], confidence[8] = len(rows) - len(rows) // 20, len(rows) // 20
    return {"count": len(rows), "features": padded, "classes": rng.multinomial(len(rows), [0.1] * 10).tolist(),
            "confidence": confidence}  # fmt: skip


def fleet_round(
    card: Mapping[str, Any], held_out: np.ndarray, seed: int, change: Callable[[str, int, np.ndarray], np.ndarray]
) -> list[DeviceBatch]:
    """One round: each device's 500 rows drawn from the held-out digits, passed through ``change(device, site,
    rows)`` (the drift), binned."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(DEVICES):
        device, site = f"d{i:02d}", i % SITES
        rows = change(device, site, held_out[rng.integers(0, len(held_out), ROWS)].copy())
        batches.append(DeviceBatch(device, window(rows, card, rng), {"site": f"site-{site}"}))
    return batches


def run(
    card: Mapping[str, Any],
    reference: Reference,
    held_out: np.ndarray,
    change: Callable[[str, int, np.ndarray], np.ndarray],
    rounds: int = 3,
) -> dict[tuple[str, str, str], Track]:
    tracks: dict[tuple[str, str, str], Track] = {}
    for r in range(rounds):
        findings = engine.assess(fleet_round(card, held_out, 100 + r, change), reference)
        tracks, _ = engine.advance(tracks, findings, at=float(r))
    return tracks


def alarms(tracks: Mapping[tuple[str, str, str], Track], kind: str = "data") -> dict[tuple[str, str], Track]:
    return {(t.scope, t.key): t for t in tracks.values() if t.kind == kind and t.state == "drift"}


def clean(device: str, site: int, rows: np.ndarray) -> np.ndarray:
    return rows


def test_a_clean_fleet_raises_no_drift(card: dict[str, Any], reference: Reference, held_out: np.ndarray) -> None:
    tracks = run(card, reference, held_out, clean)
    assert not alarms(tracks), alarms(tracks)
    assert not alarms(tracks, "prediction") and not alarms(tracks, "accuracy")


def test_one_occluded_device_among_fifty_is_one_device_alarm_naming_the_occluded_pixels(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    def occluded(device: str, site: int, rows: np.ndarray) -> np.ndarray:
        if device == "d07":
            rows[:, 32:] = 0.0  # the lower half of the 8x8 image: a dirty lens
        return rows

    found = alarms(run(card, reference, held_out, occluded))
    assert set(found) == {("device", "d07")}, found
    moved = [s.feature for s in found[("device", "d07")].features]
    assert moved and all(f >= 32 for f in moved) and all(s.direction < 0 for s in found[("device", "d07")].features)


def test_a_shift_one_site_shares_is_one_group_alarm_not_one_per_device(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    def brighter(device: str, site: int, rows: np.ndarray) -> np.ndarray:
        return np.clip(rows + 0.25, 0.0, 1.0) if site == 1 else rows

    found = alarms(run(card, reference, held_out, brighter))
    assert set(found) == {("group", "site=site-1")}, sorted(found)
    assert all(s.direction > 0 for s in found[("group", "site=site-1")].features)


def test_a_fleet_wide_shift_is_one_fleet_alarm(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    def brighter(device: str, site: int, rows: np.ndarray) -> np.ndarray:
        return np.clip(rows + 0.25, 0.0, 1.0)

    found = alarms(run(card, reference, held_out, brighter))
    assert set(found) == {("fleet", "fleet")}, sorted(found)


def test_a_drift_is_a_warning_on_its_first_round_and_a_drift_on_its_second(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    def occluded(device: str, site: int, rows: np.ndarray) -> np.ndarray:
        if device == "d03":
            rows[:, :16] = 0.0
        return rows

    tracks: dict[tuple[str, str, str], Track] = {}
    states = []
    for r in range(3):
        tracks, changed = engine.advance(tracks, engine.assess(fleet_round(card, held_out, r, occluded), reference), r)
        states.append((tracks[("device", "d03", "data")].state, [c.key for c in changed if c.kind == "data"]))
    assert states == [("warning", ["d03"]), ("drift", ["d03"]), ("drift", [])]
    assert tracks[("device", "d03", "data")].since == 0.0


def test_an_occlusion_lowers_the_estimated_accuracy_of_its_device(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    batches = fleet_round(card, held_out, 7, clean)
    unsure = dict(batches[5].window)
    unsure["confidence"] = [0, 0, 0, 60, 80, 80, 80, 60, 40, 100]  # what occluded inputs do to confidence
    batches[5] = DeviceBatch(batches[5].device_id, unsure, batches[5].tags)
    hits = {(f.scope, f.key) for f in engine.assess_accuracy(batches, reference, "site") if f.hit}
    assert ("device", "d05") in hits and ("fleet", "fleet") not in hits


def test_a_device_whose_predictions_skew_is_a_prediction_finding(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    batches = fleet_round(card, held_out, 8, clean)
    skewed = dict(batches[9].window)
    skewed["classes"] = [250, 50, 25, 25, 25, 25, 25, 25, 25, 25]
    batches[9] = DeviceBatch(batches[9].device_id, skewed, batches[9].tags)
    hits = {f.key: f for f in engine.assess_predictions(batches) if f.hit}
    assert set(hits) == {"d09"}
    assert hits["d09"].classes[0][0] == 0 and "class 0 50%" in hits["d09"].detail


def test_concept_drift_is_seen_in_the_feedback_error_rate() -> None:
    state: dict[str, Any] | None = None
    verdicts = []
    for errors in (5, 4, 6, 5, 5, 40, 45, 50):
        matrix = [[100 - errors, errors], [0, 0]]
        state, verdict = engine.concept(state, {"feedback": matrix})
        verdicts.append(verdict)
    assert verdicts[:5] == ["ok"] * 5 and "drift" in verdicts[5:]


def test_a_site_far_less_accurate_than_the_rest_by_its_feedback_is_reported_as_a_segment(
    card: dict[str, Any], reference: Reference, held_out: np.ndarray
) -> None:
    batches = []
    for b in fleet_round(card, held_out, 9, clean):
        site1 = b.tags["site"] == "site-1"
        correct = 60 if site1 else 97  # of 100 labelled predictions
        feedback = [[0] * 10 for _ in range(10)]
        feedback[0][0], feedback[0][1] = correct, 100 - correct
        batches.append(DeviceBatch(b.device_id, {**b.window, "feedback": feedback}, b.tags))
    findings = {(f.scope, f.key): f for f in engine.assess_accuracy(batches, reference, "site") if f.hit}
    segment = findings[("group", "site=site-1")]
    assert segment.figures["segment"] and "segment: measured accuracy 60.0% vs 97.0% on the rest" in segment.detail
    assert ("group", "site=site-0") not in findings and ("group", "site=site-2") not in findings
