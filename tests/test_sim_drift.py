"""Sensor drift in the simulator: each kind, on the real held-out digits, moves what it should by its size and nothing
else; through a simulated fleet and the real ingest, it moves the stored feature, prediction or feedback counts the
expected way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from firmware_sim.drift import KINDS, Drift, DriftingFrames
from firmware_sim.sensors import held_out_digits
from firmware_sim.simulator import SimSettings, Simulation
from fleet.broker import MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.store import open_store


def drifted(drift: Drift, elapsed_s: float = 10.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(frames, labels) of the held-out set, then what a device reads of them under ``drift``."""
    frames, labels = held_out_digits(0)
    rows = DriftingFrames([drift], frames, labels)
    rng = np.random.default_rng(1)
    out = [rows.apply(frames[i : i + 1], int(labels[i]), elapsed_s, rng) for i in range(len(frames))]
    return frames, labels, np.concatenate([f for f, _ in out]), np.asarray([label for _, label in out])


def test_each_kind_moves_what_it_should_by_its_size() -> None:
    frames, labels, noisy, same = drifted(Drift("noise", 0.2))
    assert 0.1 < float(np.abs(noisy - frames).mean()) < 0.2 and noisy.min() >= 0 and noisy.max() <= 1
    assert (same == labels).all()
    _, _, bright, _ = drifted(Drift("brightness", 0.3))
    assert bright.mean() > frames.mean() + 0.2 and bright.max() <= 1
    _, _, contrasted, _ = drifted(Drift("contrast", 0.5))
    assert np.isin(contrasted, [0, 1]).mean() > np.isin(frames, [0, 1]).mean() + 0.2  # pushed to black and white
    _, _, occluded, _ = drifted(Drift("occlusion", 0.5))
    image = occluded.reshape(-1, 8, 8)
    assert (image[:, :4, :4] == 0).all() and (image[:, 4:, 4:] == frames.reshape(-1, 8, 8)[:, 4:, 4:]).all()
    _, _, _, shifted = drifted(Drift("prior", 0.5))
    assert (labels == 0).mean() < 0.15 and 0.45 < (shifted == 0).mean() < 0.65
    _, _, stuck, stuck_labels = drifted(Drift("stuck", 0.5))
    repeats = (np.abs(np.diff(stuck, axis=0)).sum(axis=1) == 0).mean()
    assert 0.4 < repeats < 0.6 and (np.diff(stuck_labels)[np.abs(np.diff(stuck, axis=0)).sum(axis=1) == 0] == 0).all()
    _, _, unchanged, remapped = drifted(Drift("concept", 0.3))
    assert (unchanged == frames).all(), "concept drift is visible through feedback alone"
    assert 0.2 < (remapped != labels).mean() < 0.4 and ((remapped - labels) % 10 <= 1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_no_kind_changes_anything_before_its_start_or_at_size_zero(kind: str) -> None:
    frames, labels, before, before_labels = drifted(Drift(kind, 0.8, start_s=60), elapsed_s=59.9)
    assert (before == frames).all() and (before_labels == labels).all()
    _, _, nothing, nothing_labels = drifted(Drift(kind, 0.0))
    assert (nothing == frames).all() and (nothing_labels == labels).all()


def test_a_drift_is_written_kind_size_and_start_and_a_bad_one_says_how() -> None:
    assert Drift.parse("noise:0.1") == Drift("noise", 0.1)
    assert Drift.parse("concept:0.5@30") == Drift("concept", 0.5, 30.0)
    for bad, says in [("rain:0.1", "unknown drift 'rain'"), ("noise", "KIND:SIZE"), ("noise:2", "between 0 and 1"),
                      ("noise:x", "KIND:SIZE"), ("noise:0.1@-1", "0 or more")]:  # fmt: skip
        with pytest.raises(ValueError, match=says):
            Drift.parse(bad)


def stored(tmp_path: Path, broker: MosquittoBroker, model: Path, *drifts: Drift) -> dict[str, np.ndarray]:
    """Run 3 simulated devices with ``drifts`` through a real ingest; sum what the fleet stored of their windows."""
    prefix = f"dr{uuid.uuid4().hex[:6]}"
    store = open_store(tmp_path / f"{prefix}.db")
    ingest = Ingest(store, broker.url, client_id=f"drift-{prefix}")
    ingest.start()
    assert ingest.wait_ready(10)
    try:
        settings = SimSettings(devices=3, broker=broker.url, state_root=tmp_path / prefix, model_dir=model,
                               duration_s=2.5, window_s=1, rate_hz=60, id_prefix=prefix, feedback_share=1.0,
                               drifts=drifts)  # fmt: skip
        report = Simulation(settings).run()
        assert report["totals"]["windows_produced"] == report["totals"]["windows_acked"] > 0
        windows = [w for d in report["devices"] for w in store.telemetry(d["device_id"]).windows]
    finally:
        ingest.stop()
        store.close()
    return {
        "features": sum(np.asarray(w["features"], float) for w in windows),
        "classes": sum(np.asarray(w["classes"], float) for w in windows),
        "feedback": sum(np.asarray(w["feedback"], float) for w in windows),
    }


def test_through_the_fleet_brightness_moves_the_feature_histograms_prior_the_predictions_concept_only_feedback(
    tmp_path: Path, broker: MosquittoBroker, example_model: Callable[[str], Path]
) -> None:
    model = example_model("good")
    base = stored(tmp_path, broker, model)
    bright = stored(tmp_path, broker, model, Drift("brightness", 0.4))
    prior = stored(tmp_path, broker, model, Drift("prior", 0.6))
    concept = stored(tmp_path, broker, model, Drift("concept", 0.6))

    def mean_bin(h: np.ndarray) -> float:  # the mean bin of every feature's histogram (overflow and NaN aside)
        bins = h[:, :-2]
        return float((bins * np.arange(bins.shape[1])).sum() / bins.sum())

    def share_0(h: np.ndarray) -> float:
        return float(h[0] / h.sum())

    def agreement(h: np.ndarray) -> float:  # feedback: true label x predicted label
        return float(np.trace(h) / h.sum())

    assert mean_bin(bright["features"]) > mean_bin(base["features"]) + 1
    assert share_0(prior["classes"]) > share_0(base["classes"]) + 0.3
    assert abs(mean_bin(concept["features"]) - mean_bin(base["features"])) < 0.3
    assert abs(share_0(concept["classes"]) - share_0(base["classes"])) < 0.1
    assert agreement(base["feedback"]) > 0.85 and agreement(concept["feedback"]) < agreement(base["feedback"]) - 0.4
