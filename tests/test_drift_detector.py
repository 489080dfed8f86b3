"""The drift detector on a real fleet home: windows stored through the ingest's write path (a real SQLite store),
judged against the signed card of a real published release; the alarm is a track, an audit entry and a call of the
retrain hook (with its back-off); `fleet drift status` and `show` show it, with the heat map of the moved pixels."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_fixtures import wait_for
from test_release_cli import fleet, ok_json, publish

from agent import protocol
from fleet.drift.detector import DriftDetector, DriftHooks
from fleet.examples.modelgen import digits_split, feature_histogram
from fleet.store import open_store
from fleet.store.api import Store
from fleet.trust.repository import Repository

RELEASE = "digits:1.0.0"
DEVICES, ROWS = 12, 500


def window(device_id: str, seq: int, rows: np.ndarray, card: dict[str, Any], rng: np.random.Generator) -> dict:
    """A window as a device of the release sends it (features binned over the card's edges, padded)."""
    hists = [feature_histogram(rows[:, j], e) for j, e in enumerate(card["drift"]["edges"])]
    width = max(h.size for h in hists)
    features = [np.concatenate([h[:-2], np.zeros(width - h.size, np.int64), h[-2:]]).tolist() for h in hists]
    latency = [0] * (len(protocol.LATENCY_EDGES_MS) + 1)
    latency[4] = len(rows)
    confidence = [0] * protocol.CONFIDENCE_BINS
    confidence[-1] = len(rows)
    return {"v": protocol.SCHEMA_VERSION, "device_id": device_id, "boot_id": "b" * 32, "seq": seq, "model": "digits",
            "release": RELEASE, "window_start": 1.7e9 + seq, "window_end": 1.7e9 + seq + 60, "count": len(rows),
            "errors": 0, "dropped": 0, "latency": latency, "confidence": confidence,
            "classes": rng.multinomial(len(rows), [0.1] * 10).tolist(), "features": features,
            "health": {"cpu_percent": 10.0}}  # fmt: skip


def send_round(store: Store, card: dict[str, Any], seq: int, occluded: str | None) -> None:
    rng = np.random.default_rng(seq)
    x = digits_split()[1]
    windows = []
    for i in range(DEVICES):
        device = f"dd-{i:02d}"
        rows = x[rng.integers(0, len(x), ROWS)].copy()
        if device == occluded:
            rows[:, 32:] = 0.0
        windows.append(window(device, seq, rows, card, rng))
    store.write_batch(windows=windows)


@pytest.fixture
def home(tmp_path: Path, example_model: Callable[[str], Path]) -> Path:
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    publish(home, example_model("good") / "int8.onnx", RELEASE)
    return home


def test_an_occluded_device_becomes_a_drift_alarm_audited_hooked_once_and_shown_with_its_heat_map(
    home: Path, tmp_path: Path
) -> None:
    store = open_store(home / "fleet.db")
    repo = Repository(home, ledger=store)
    card = repo.release("digits", "1.0.0")["card"]
    hook_out = tmp_path / "alarms.jsonl"
    command = f"{sys.executable} -c \"import sys; open({str(hook_out)!r}, 'a').write(sys.stdin.read() + chr(10))\""
    clock = [1000.0]
    detector = DriftDetector(store, repo, hooks=DriftHooks(command, backoff_s=3600, clock=lambda: clock[0]))
    states = []
    for seq in range(1, 5):
        send_round(store, card, seq, occluded="dd-07")
        changed = detector.tick()
        states.append(sorted((r.key, r.kind, r.state) for r in changed))
    assert states[0] == [("dd-07", "data", "warning")] and states[1] == [("dd-07", "data", "drift")], states
    assert states[2:] == [[], []], "a drift that persists changes nothing more"

    listed = ok_json("drift", "status", "--home", home)
    assert [(d["scope"], d["device_id"], d["kind"], d["state"]) for d in listed] == [
        ("device", "dd-07", "data", "drift")
    ]
    assert all(f["feature"] >= 32 and f["direction"] < 0 for f in listed[0]["features"]) and listed[0]["since"]

    wait_for(lambda: hook_out.exists() and hook_out.read_text().strip(), 30, "the retrain hook to run")
    time.sleep(0.5)
    (alarm,) = [json.loads(line) for line in hook_out.read_text().splitlines()]
    assert (alarm["device_id"], alarm["kind"], alarm["state"]) == ("dd-07", "data", "drift")

    audit = [e for e in store.audit() if e.action.startswith("drift_")]
    assert [(e.action, e.subject, e.detail["state"]) for e in audit] == [
        ("drift_alarm", "device:dd-07", "warning"),
        ("drift_alarm", "device:dd-07", "drift"),
    ]

    png = tmp_path / "shift.png"
    shown = fleet("drift", "show", "dd-07", "--png", png, "--home", home)
    assert shown.exit_code == 0, shown.output
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "blue: moved down" in shown.stdout and len(shown.stdout.splitlines()) > 8
    missing = fleet("drift", "show", "dd-99", "--home", home)
    assert missing.exit_code == 3 and "has judged no device or group 'dd-99'" in missing.output
    store.close()


def test_the_hook_waits_out_its_back_off_before_the_same_alarm_fires_again() -> None:
    clock = [0.0]
    hooks = DriftHooks("true", backoff_s=3600, clock=lambda: clock[0])
    alarm = {"model": "digits", "scope": "device", "key": "d1", "kind": "data", "state": "drift"}
    assert hooks.fire(alarm) and not hooks.fire(alarm), "once, then back-off"
    assert hooks.fire({**alarm, "key": "d2"}), "another scope is another alarm"
    clock[0] = 3601.0
    assert hooks.fire(alarm)


def test_a_restarted_detector_continues_where_the_last_round_ended(home: Path) -> None:
    store = open_store(home / "fleet.db")
    repo = Repository(home, ledger=store)
    card = repo.release("digits", "1.0.0")["card"]
    send_round(store, card, 1, occluded="dd-03")
    assert [r.state for r in DriftDetector(store, repo).tick()] == ["warning"]
    send_round(store, card, 2, occluded="dd-03")
    again = DriftDetector(store, repo)  # a new process: tracks and reading place from the store
    assert [(r.key, r.state) for r in again.tick()] == [("dd-03", "drift")]
    assert again.tick() == [], "nothing read twice"
    store.close()


def test_serve_refuses_a_retrain_url_that_is_not_http_in_one_line(tmp_path: Path) -> None:
    result = fleet("serve", "--home", tmp_path / "home", "--on-drift-url", "ftp://ci.example/retrain")
    assert result.exit_code == 2 and "is not an http:// or https:// URL" in result.output
    assert not (tmp_path / "home").exists(), "nothing started or made"
