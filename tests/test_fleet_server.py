"""FleetServer in-process: the whole fleet service (embedded broker, ingest and workers, repository server, renewal,
serve.json) started, fed by a device, supervised and stopped, without the CLI."""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.request
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from test_ingest import birth, wait_for, window

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.protocol import Kind
from fleet.errors import FleetError
from fleet.server import AlreadyRunning, FleetServer, ServerSettings, SettingsError, StartFailed
from fleet.store import open_store
from fleet.trust.renewal import MetadataRenewal, renewal_schedule
from fleet.trust.repository import ExpiryPolicy, Repository


def publish(url: str, messages: list[tuple[str, Kind, dict[str, object]]]) -> None:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="server-test-device")
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        for device_id, kind, message in messages:
            topic = protocol.topic(protocol.DEFAULT_PREFIX, device_id, kind)
            client.publish(topic, protocol.encode(kind, message), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def refused(url: str) -> bool:
    address = BrokerAddress.parse(url)
    try:
        socket.create_connection((address.host, address.port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("workers", [0, 1])
def test_a_fleet_server_stores_a_devices_telemetry_and_stops_cleanly(
    tmp_path: Path, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    settings = ServerSettings(home=home, ingest_workers=workers, stats_interval=0.1, log_level="WARNING")
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="fleet")
    with FleetServer(settings) as server:
        assert server.broker_url is not None and server.broker_url.startswith("mqtt://127.0.0.1:")
        assert server.repo_url is not None and server.repo_url.startswith("http://127.0.0.1:")
        assert (server.workers is not None) == bool(workers)
        record = json.loads((home / "serve.json").read_text())
        assert (record["broker"], record["repo"], record["prefix"]) == (
            server.broker_url,
            server.repo_url,
            "edgefleet/v1",
        )
        with urllib.request.urlopen(f"{server.repo_url}/metadata/root.json", timeout=5) as response:
            assert response.read() == Repository(home).trusted_root()

        supervisor = threading.Thread(target=server.run_until, args=(stop,))
        supervisor.start()
        try:
            publish(
                server.broker_url, [("pi-1", Kind.STATUS, birth("pi-1")), ("pi-1", Kind.TELEMETRY, window("pi-1", 0))]
            )
            store = open_store(home / "fleet.db")
            try:
                wait_for(lambda: store.window_counts() == {"pi-1": 1}, "the window in the database", timeout=30)
            finally:
                store.close()
            wait_for(lambda: any(r.getMessage() == "ingest_stats" for r in caplog.records), "a stats line")
        finally:
            stop.set()
            supervisor.join(10)
        broker_url = server.broker_url
        stats = server.stats()
        assert stats["received"] >= 1
        assert ("telemetry_workers" in stats) == bool(workers)

    assert not (home / "serve.json").exists(), "a clean stop removes serve.json"
    assert refused(broker_url), "the embedded broker stopped with the server"
    events = [r.getMessage() for r in caplog.records]
    assert events.index("serve_started") < events.index("ingest_stopped") < events.index("serve_stopped")
    server.stop()  # twice is harmless


def test_a_second_server_on_the_same_home_is_refused_and_leaves_the_first_alone(tmp_path: Path) -> None:
    settings = ServerSettings(home=tmp_path / "home", ingest_workers=0)
    with FleetServer(settings) as first:
        with pytest.raises(AlreadyRunning) as refused_start:
            FleetServer(settings).start()
        assert refused_start.value.fix == "stop it first"
        assert f"already runs for {tmp_path / 'home'}" in refused_start.value.message()
        assert json.loads((tmp_path / "home" / "serve.json").read_text())["broker"] == first.broker_url


def test_a_repository_port_in_use_fails_the_start_with_its_fix_and_stops_what_had_started(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = FleetServer(ServerSettings(home=tmp_path / "home", repo_port=port, ingest_workers=0))
        with pytest.raises(StartFailed) as failed:
            server.start()
    assert failed.value.reason == "repo_server_failed"
    assert "--repo-port" in failed.value.fix
    assert failed.value.exit_code == 1
    assert server.broker is not None and refused(server.broker.url), "the embedded broker was stopped again"
    assert not (tmp_path / "home" / "serve.json").exists()


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"broker_url": "mqtt://127.0.0.1:1883", "port": 1883}, "port_with_broker"),
        ({"broker_url": "http://example.com"}, "bad_broker_url"),
        ({"tls": TlsFiles(ca=Path("ca.pem"))}, "tls_without_mqtts"),
        ({"client_id": "fleet/ingest"}, "bad_client_id"),
        ({"stats_interval": 0}, "bad_settings"),
    ],
)
def test_settings_that_do_not_go_together_are_refused_before_anything_starts(
    tmp_path: Path, settings: dict[str, object], reason: str
) -> None:
    with pytest.raises(SettingsError) as refused_settings:
        ServerSettings(home=tmp_path / "home", **settings)  # type: ignore[arg-type]
    assert refused_settings.value.reason == reason
    assert isinstance(refused_settings.value, FleetError) and refused_settings.value.fix
    assert not (tmp_path / "home").exists()


def test_a_client_id_with_slashes_is_fine_without_workers(tmp_path: Path) -> None:
    assert ServerSettings(home=tmp_path, client_id="fleet/ingest", ingest_workers=0).client_id == "fleet/ingest"


# --------------------------------------------------------------------------------------------------------------
# Metadata renewal


def test_renewal_checks_four_times_per_half_timestamp_lifetime_between_a_fifth_of_a_second_and_five_minutes(
    tmp_path: Path,
) -> None:
    for lifetime, period in ((timedelta(days=1), 300.0), (timedelta(minutes=8), 60.0), (timedelta(seconds=1), 0.2)):
        home = tmp_path / str(lifetime.total_seconds())
        Repository.init(home, expiry=ExpiryPolicy(timestamp=lifetime))
        assert renewal_schedule(Repository(home)) == (lifetime / 2, period)


def test_the_renewal_thread_re_signs_an_expiring_timestamp_and_stops(tmp_path: Path) -> None:
    Repository.init(tmp_path, expiry=ExpiryPolicy(timestamp=timedelta(seconds=2)))
    repo = Repository(tmp_path)
    first = json.loads((repo.metadata_dir / "timestamp.json").read_bytes())["signed"]["version"]
    renewal = MetadataRenewal(repo).start()
    try:
        wait_for(
            lambda: json.loads((repo.metadata_dir / "timestamp.json").read_bytes())["signed"]["version"] > first,
            "a renewed timestamp",
        )
    finally:
        renewal.stop()
