"""Accuracy without labels: the estimate from a confidence histogram and the card's calibration, against the accuracy
measured on the same rows, on the project's real int8 model and held-out digits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import load_model
from fleet.drift.accuracy import Calibration, accuracy_drop, estimated_accuracy, measured_accuracy
from fleet.examples.modelgen import confidence_bins, digits_split

ModelDir = Callable[[str], Path]
FILE = "int8.onnx"
#: Share of pixels set to 0 (blank) at each corruption level.
OCCLUSION = (0.25, 0.5, 0.75)


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def _histogram(bins: np.ndarray) -> list[int]:
    return np.bincount(bins, minlength=10).tolist()


def _run(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence bin, predicted class) per row, binned as the agent's telemetry bins them."""
    with load_model(folder / FILE, threads=1) as model:
        probs = model.predict(x)
    return confidence_bins(probs), probs.argmax(axis=1)


def _occluded(x: np.ndarray, share: float) -> np.ndarray:
    mask = np.random.default_rng(1).random(x.shape) < share
    return np.where(mask, 0.0, x).astype(np.float32)


@pytest.fixture(scope="module")
def good(example_model: ModelDir) -> dict:
    folder = example_model("good")
    card = _card(folder)
    _, x, _, y = digits_split(0)
    bins, predicted = _run(folder, x)
    return {
        "folder": folder,
        "x": x,
        "y": y,
        "bins": bins,
        "correct": predicted == y,
        "calibration": Calibration.from_card(card, FILE),
        "reference": card["files"][FILE]["accuracy"],
    }


def test_on_clean_windows_the_estimate_is_within_three_points_of_the_measured_accuracy(good: dict) -> None:
    """50 windows of 500 rows resampled from the held-out digits: the mean error 0.4 points, the worst 1.6 (the
    calibration is from these same rows, so this is the estimator's own noise, not a generalisation claim)."""
    rng = np.random.default_rng(0)
    errors, drops = [], []
    for _ in range(50):
        rows = rng.integers(0, len(good["y"]), 500)
        estimate = estimated_accuracy(_histogram(good["bins"][rows]), good["calibration"])
        assert estimate is not None
        errors.append(abs(estimate[0] - good["correct"][rows].mean()))
        drops.append(accuracy_drop(estimate, good["reference"]))
    assert np.mean(errors) < 0.01, f"mean error {np.mean(errors):.4f}"
    assert max(errors) < 0.03, f"worst error {max(errors):.4f}"
    assert not any(drops), "clean data must not raise an accuracy drop"


def test_the_estimate_falls_with_accuracy_as_inputs_are_occluded_and_flags_a_drop_at_the_strongest(good: dict) -> None:
    """Blanking 25/50/75 % of the pixels: measured 0.82/0.61/0.41, estimated 0.90/0.80/0.60. The estimate falls at
    every level but by less than the accuracy: corrupted digits are misread with more confidence than held-out
    rows in the same bin were (CBPE's assumption weakens as the shift grows), so the estimate is an upper bound here.
    The drop is flagged at every level (the mildest: 7 points below 0.973 at z = 3.2)."""
    estimates, measured = [], []
    for share in OCCLUSION:
        bins, predicted = _run(good["folder"], _occluded(good["x"], share))
        estimate = estimated_accuracy(_histogram(bins), good["calibration"])
        assert estimate is not None
        estimates.append(estimate)
        measured.append((predicted == good["y"]).mean())
    assert measured == sorted(measured, reverse=True) and measured[-1] < 0.6, f"corruption too mild: {measured}"
    values = [e[0] for e in estimates]
    assert values[0] > values[1] > values[2], f"estimates {values}"
    assert values[0] < good["reference"] - 0.03
    assert all(v >= m for v, m in zip(values, measured, strict=True)), "the documented upper bound"
    assert all(accuracy_drop(e, good["reference"]) for e in estimates)
    clean = estimated_accuracy(_histogram(good["bins"]), good["calibration"])
    assert clean is not None and not accuracy_drop(clean, good["reference"])


def test_the_shuffled_label_model_is_caught_because_it_is_unconfident_not_confidently_wrong(
    example_model: ModelDir, good: dict
) -> None:
    """The inaccurate example (trained on shuffled labels) is NOT CBPE's blind spot: 382 of 450 held-out rows have
    top-1 confidence in [0.1, 0.2), none above 0.4. Its own card's table says so, and its estimate (0.14) matches its
    measured accuracy (0.138), far below the good release's 0.973; even read with the good release's table the
    estimate is 0.15. Against its own card's accuracy there is no drop: the card already admits it (the publish
    decision, not drift, is where such a card is refused). A model confidently wrong would not be caught this way."""
    folder = example_model("inaccurate")
    card = _card(folder)
    bins, predicted = _run(folder, good["x"])
    histogram = _histogram(bins)
    assert sum(histogram[4:]) == 0, f"not the unconfident model this test documents: {histogram}"
    own = estimated_accuracy(histogram, Calibration.from_card(card, FILE))
    with_good_table = estimated_accuracy(histogram, good["calibration"])
    assert own is not None and with_good_table is not None
    assert own[0] == pytest.approx((predicted == good["y"]).mean(), abs=0.03)
    assert accuracy_drop(own, good["reference"]) and accuracy_drop(with_good_table, good["reference"])
    assert not accuracy_drop(own, card["files"][FILE]["accuracy"])


def test_a_broken_file_or_a_card_without_a_table_has_no_calibration(example_model: ModelDir) -> None:
    card = _card(example_model("broken"))
    assert Calibration.from_card(card, FILE) is None
    assert Calibration.from_card({"files": {}}, FILE) is None
    assert Calibration.from_card({"calibration": {}}, FILE) is None


def test_a_malformed_or_differently_binned_table_is_refused() -> None:
    with pytest.raises(ValueError, match="bins"):
        Calibration.from_card({"calibration": {FILE: {"bins": 5, "rows": [1] * 5, "correct": [1] * 5}}}, FILE)
    with pytest.raises(ValueError, match="correct <= rows"):
        Calibration((1, 2), (2, 0))
    with pytest.raises(ValueError, match="10 bins, the calibration 2"):
        estimated_accuracy([1] * 10, Calibration((1, 2), (1, 2)))


def test_a_bin_with_few_or_no_held_out_rows_is_pulled_toward_its_midpoint_never_to_zero_or_one() -> None:
    rows, correct = [0] * 10, [0] * 10
    rows[2], correct[2] = 2, 0  # two rows, both wrong
    rows[9], correct[9] = 400, 400  # all right
    accuracy = Calibration(tuple(rows), tuple(correct)).bin_accuracy()
    assert accuracy[5] == pytest.approx(0.55)  # empty: the midpoint confidence
    assert accuracy[2] == pytest.approx(0.5 / 4)  # (0 + 2 * 0.25) / (2 + 2)
    assert 0.99 < accuracy[9] < 1.0
    assert all(0.0 < a < 1.0 for a in accuracy)


def test_the_estimate_weighs_bins_by_their_rows_and_an_empty_histogram_has_none() -> None:
    calibration = Calibration((0,) * 8 + (100, 1000), (0,) * 8 + (50, 990))
    accuracy = calibration.bin_accuracy()
    estimate, se = estimated_accuracy([0] * 8 + [100, 300], calibration)
    assert estimate == pytest.approx((100 * accuracy[8] + 300 * accuracy[9]) / 400)
    assert 0.0 < se < 0.05
    # More rows shrink the binomial part, never the held-out table's part.
    _, se_large = estimated_accuracy([0] * 8 + [100_000, 300_000], calibration)
    assert 0.75 * np.sqrt(calibration.bin_variance()[9]) <= se_large < se
    assert estimated_accuracy([0] * 10, calibration) is None


def test_measured_accuracy_is_the_confusion_diagonal_over_all_labelled_rows() -> None:
    confusion = [[5, 1, 0], [2, 7, 1], [0, 0, 4]]  # true label x predicted
    assert measured_accuracy(confusion) == (16 / 20, 20)
    assert measured_accuracy([[0, 0], [0, 0]]) is None
    with pytest.raises(ValueError, match="square"):
        measured_accuracy([[1, 2, 3], [4, 5, 6]])


def test_a_drop_must_be_both_significant_and_material() -> None:
    assert accuracy_drop((0.90, 0.01), 0.97)  # 7 points, z = 7
    assert not accuracy_drop((0.95, 0.001), 0.97)  # z = 20 but 2 points: harmless
    assert not accuracy_drop((0.90, 0.05), 0.97)  # 7 points but z = 1.4: noise
    assert not accuracy_drop((0.99, 0.01), 0.97)  # better
