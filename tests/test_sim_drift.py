"""Sensor drift in the simulator: each kind, on the real held-out digits, moves what it should by its size and nothing
else; through a simulated fleet and the real ingest, it moves the stored feature, prediction or feedback counts the
expected way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_sim.drift import KINDS, Drift, DriftingFrames
from firmware_sim.scenario import DevicePlan
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


#: What each simulated device of the fleet run gets: nothing (the baseline), or one drift.
FLEET_DRIFTS: dict[str, Drift | None] = {
    "base": None,
    "noise": Drift("noise", 0.3),
    "brightness": Drift("brightness", 0.4),
    "contrast": Drift("contrast", 0.6),
    "occlusion": Drift("occlusion", 0.75),
    "prior": Drift("prior", 0.6),
    "stuck": Drift("stuck", 0.95),
    "concept": Drift("concept", 0.6),
}


@pytest.fixture(scope="module")
def fleet_windows(
    tmp_path_factory: pytest.TempPathFactory, broker: MosquittoBroker, example_model: Callable[[str], Path]
) -> dict[str, list[dict[str, Any]]]:
    """One simulated fleet, each device with its own drift (a scenario plan per device), through a real ingest: the
    windows the fleet stored of each, by the name of its drift."""
    tmp_path = tmp_path_factory.mktemp("drift-fleet")
    prefix = f"dr{uuid.uuid4().hex[:6]}"
    store = open_store(tmp_path / "fleet.db")
    ingest = Ingest(store, broker.url, client_id=f"drift-{prefix}")
    ingest.start()
    assert ingest.wait_ready(10)
    ids = {name: f"{prefix}-{i:04d}" for i, name in enumerate(FLEET_DRIFTS)}
    plan = {ids[name]: DevicePlan(drifts=(drift,) if drift else ()) for name, drift in FLEET_DRIFTS.items()}
    try:
        settings = SimSettings(devices=len(ids), broker=broker.url, state_root=tmp_path / "devices", id_prefix=prefix,
                               model_dir=example_model("good"), duration_s=4, window_s=1, rate_hz=60,
                               feedback_share=1.0, plan=plan)  # fmt: skip
        report = Simulation(settings).run()
        assert report["totals"]["windows_produced"] == report["totals"]["windows_acked"] > 0
        reported = {d["device_id"]: d["drifts"] for d in report["devices"]}
        assert reported[ids["stuck"]] == [{"kind": "stuck", "size": 0.95, "from_s": 0.0}], "who got what"
        return {name: store.telemetry(device).windows for name, device in ids.items()}
    finally:
        ingest.stop()
        store.close()


def summed(windows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.asarray(sum(np.asarray(w[key], float) for w in windows))


def mean_bin(h: np.ndarray) -> float:
    """The mean bin of every feature's histogram (overflow and NaN aside)."""
    bins = h[:, :-2]
    return float((bins * np.arange(bins.shape[1])).sum() / bins.sum())


def lowest_bin_share(h: np.ndarray) -> float:
    """The share of the features' rows in each one's lowest bin (column 0 counts rows below the first edge)."""
    return float(h[:, 1].sum() / h.sum())


def share_0(h: np.ndarray) -> float:
    return float(h[0] / h.sum())


def agreement(h: np.ndarray) -> float:
    """Feedback counts (true label x predicted label): the share where they agree."""
    return float(np.trace(h) / h.sum())


def top_class_share(windows: list[dict[str, Any]]) -> float:
    """The mean, over windows, of the share of the window's most predicted class."""
    return float(np.mean([max(w["classes"]) / sum(w["classes"]) for w in windows if sum(w["classes"])]))


def test_through_the_fleet_each_drift_moves_the_stored_histograms_its_way_and_concept_only_the_feedback(
    fleet_windows: dict[str, list[dict[str, Any]]],
) -> None:
    features = {name: summed(windows, "features") for name, windows in fleet_windows.items()}
    classes = {name: summed(windows, "classes") for name, windows in fleet_windows.items()}
    base_f, base_c = features["base"], classes["base"]
    assert lowest_bin_share(features["noise"]) < lowest_bin_share(base_f) - 0.05, "noise lifts pixels off black"
    assert mean_bin(features["brightness"]) > mean_bin(base_f) + 1, "brightness moves every feature up"
    assert lowest_bin_share(features["contrast"]) > lowest_bin_share(base_f) + 0.05, "contrast: dark turns black"
    square = [row * 8 + col for row in range(6) for col in range(6)]  # ceil(8 * 0.75) = 6
    assert lowest_bin_share(features["occlusion"][square]) == 1.0 > lowest_bin_share(base_f[square]) + 0.2
    assert share_0(classes["prior"]) > share_0(base_c) + 0.3, "class prior: more zeros predicted"
    assert top_class_share(fleet_windows["stuck"]) > top_class_share(fleet_windows["base"]) + 0.3, "a stuck sensor"
    assert abs(mean_bin(features["concept"]) - mean_bin(base_f)) < 0.3
    assert abs(share_0(classes["concept"]) - share_0(base_c)) < 0.1
    base_agreement = agreement(summed(fleet_windows["base"], "feedback"))
    assert base_agreement > 0.85 and agreement(summed(fleet_windows["concept"], "feedback")) < base_agreement - 0.4
