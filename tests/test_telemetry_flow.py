"""Whole-flow telemetry: real agents, a real broker that goes away, the fleet's exact record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fleet_fixtures import device_view

from agent.broker_address import TlsFiles
from firmware_sim.simulator import SimSettings, Simulation
from fleet.broker import MosquittoBroker, free_port
from fleet.ingest.mqtt import Ingest
from fleet.store import Store, open_store


@pytest.fixture
def fleet_store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(tmp_path / "fleet.db")
    yield store
    store.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_no_window_is_lost_or_duplicated_when_the_broker_is_down_for_ten_seconds(
    tmp_path: Path,
    private_broker: MosquittoBroker,
    fleet_store: Store,
    example_model: Callable[[str], Path],
) -> None:
    ingest = Ingest(fleet_store, private_broker.url)
    ingest.start()
    assert ingest.wait_ready(10)

    settings = SimSettings(
        devices=20,
        broker=private_broker.url,
        state_root=tmp_path / "devices",
        model_dir=example_model("good"),
        duration_s=30,
        seed=7,
        window_s=1,
        rate_hz=5,
        reconnect_max_s=2,
    )
    outage: list[float] = []

    def break_the_broker() -> None:
        time.sleep(10)
        outage.append(time.monotonic())
        private_broker.stop()
        time.sleep(10)
        private_broker.start()
        outage.append(time.monotonic())

    breaker = threading.Thread(target=break_the_broker)
    breaker.start()
    report = Simulation(settings).run()
    breaker.join()
    assert len(outage) == 2

    produced = {d["device_id"]: d["windows_produced"] for d in report["devices"]}
    assert all(n >= 25 for n in produced.values()), produced
    wait_for(lambda: fleet_store.window_counts() == produced, 30, "the fleet to store every window")
    ingest.stop()

    assert fleet_store.window_counts() == produced
    assert all(d["windows_acked"] == d["windows_produced"] for d in report["devices"])
    assert all(d["windows_dropped"] == 0 for d in report["devices"])
    assert all(d["connects"] >= 2 for d in report["devices"]), "every device reconnected after the outage"
    stored_inferences = sum(w["count"] for d in produced for w in fleet_store.telemetry(d).windows)
    assert stored_inferences == report["totals"]["inferences"]


def agent_config(tmp_path: Path, broker_url: str, model_dir: Path, device_id: str, tls: TlsFiles | None = None) -> Path:
    config = tmp_path / "agent.toml"
    tls_lines = f'ca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"' if tls else ""
    config.write_text(
        f"""
device_id = "{device_id}"
state_dir = "{tmp_path / "state"}"

[mqtt]
broker = "{broker_url}"
keepalive = 5
{tls_lines}

[telemetry]
window_s = 1

[api]
listen = "127.0.0.1:{free_port()}"

[[models]]
name = "digits"
path = "{model_dir / "int8.onnx"}"
card = "{model_dir / "card.json"}"
release = "digits:1.0.0"
"""
    )
    return config


def edge_agent(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())", *args]


def test_a_device_killed_without_goodbye_is_marked_offline_by_its_last_will(
    tmp_path: Path, broker: MosquittoBroker, fleet_store: Store, example_model: Callable[[str], Path]
) -> None:
    ingest = Ingest(fleet_store, broker.url, client_id="ingest-will-test")
    ingest.start()
    assert ingest.wait_ready(10)
    config = agent_config(tmp_path, broker.url, example_model("good"), "will-device")
    agent = subprocess.Popen(edge_agent("run", "--config", str(config)), stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (device_view(fleet_store, "will-device") or {}).get("online") is True, 20, "the birth")
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(5)
        # The broker notices after 1.5 keepalives (5 s) and publishes the will.
        wait_for(lambda: device_view(fleet_store, "will-device")["online"] is False, 20, "the last will")
        assert device_view(fleet_store, "will-device")["offline_reason"] == "connection_lost"
    finally:
        agent.kill()
        ingest.stop()


def test_the_agent_stops_cleanly_on_sigterm_and_says_goodbye(
    tmp_path: Path, broker: MosquittoBroker, fleet_store: Store, example_model: Callable[[str], Path]
) -> None:
    ingest = Ingest(fleet_store, broker.url, client_id="ingest-sigterm-test")
    ingest.start()
    assert ingest.wait_ready(10)
    config = agent_config(tmp_path, broker.url, example_model("good"), "polite-device")
    agent = subprocess.Popen(edge_agent("run", "--config", str(config)), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: fleet_store.window_counts().get("polite-device", 0) >= 2, 20, "telemetry windows")
        status = subprocess.run(edge_agent("status", "--config", str(config), "--json"), capture_output=True, text=True)
        assert status.returncode == 0
        assert json.loads(status.stdout)["running"] is True
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=15)
        assert agent.returncode == 0
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert any(line["event"] == "agent_exit" for line in lines), "one JSON event per line, ending in agent_exit"
        wait_for(lambda: device_view(fleet_store, "polite-device")["online"] is False, 10, "the goodbye status")
        assert device_view(fleet_store, "polite-device")["offline_reason"] == "shutdown"
        after = json.loads(
            subprocess.run(edge_agent("status", "--config", str(config), "--json"), capture_output=True).stdout
        )
        assert after["running"] is False and after["outbox"]["rows"] == 0
    finally:
        agent.kill()
        ingest.stop()


def test_the_agent_reports_over_mqtts_with_its_client_certificate(
    tmp_path: Path, tls_broker: tuple[str, TlsFiles], fleet_store: Store, example_model: Callable[[str], Path]
) -> None:
    url, tls = tls_broker
    ingest = Ingest(fleet_store, url, client_id="ingest-tls-test", tls=tls)
    ingest.start()
    assert ingest.wait_ready(10)
    config = agent_config(tmp_path, url, example_model("good"), "tls-device", tls)
    agent = subprocess.Popen(edge_agent("run", "--config", str(config)), stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: fleet_store.window_counts().get("tls-device", 0) >= 2, 20, "windows over TLS")
        assert device_view(fleet_store, "tls-device")["online"] is True
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        ingest.stop()
    assert agent.returncode == 0
