"""FleetServer in-process: the whole fleet service (embedded broker, ingest and workers, repository server, renewal,
serve.json) started, fed by a device, supervised and stopped, without the CLI."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from fleet_fixtures import NatsBroker
from test_ingest import birth, wait_for, window

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.protocol import Kind
from fleet.broker import free_port
from fleet.cli import main as fleet_main
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
        if workers:  # mosquitto delivers on shared subscriptions: the probe at start passed and the workers stayed on
            assert server.ingest_workers == workers and stats["telemetry_workers"]["probes"] >= 1

    assert not (home / "serve.json").exists(), "a clean stop removes serve.json"
    assert refused(broker_url), "the embedded broker stopped with the server"
    events = [r.getMessage() for r in caplog.records]
    assert events.index("serve_started") < events.index("ingest_stopped") < events.index("serve_stopped")
    assert ("ingest_workers_checked" in events) == bool(workers) and "ingest_workers_off" not in events
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


# --------------------------------------------------------------------------------------------------------------
# Addresses that survive a restart


EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def _connections(log: Path) -> list[str]:
    """The broker URL of every `mqtt_connected` the agent logged."""
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e["broker"] for e in entries if e.get("event") == "mqtt_connected"]


def test_a_restarted_fleet_server_keeps_its_addresses_and_an_enrolled_agent_reconnects_by_itself(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    settings = ServerSettings(home=home, ingest_workers=0, log_level="WARNING")
    bundle, log_path = tmp_path / "bundle", tmp_path / "agent.log"
    first = FleetServer(settings).start()
    agent_proc: subprocess.Popen[bytes] | None = None
    log = log_path.open("w")
    try:
        addresses = (first.broker_url, first.repo_url)
        enrolled = CliRunner().invoke(fleet_main, ["enroll", "pi-r1", "--out", str(bundle), "--state-dir",
                                                   str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}",
                                                   "--home", str(home)])  # fmt: skip
        assert enrolled.exit_code == 0, enrolled.output
        agent_proc = subprocess.Popen([EDGE_AGENT, "run", "--config", bundle / "agent.toml"], stdout=log, stderr=log)
        wait_for(lambda: _connections(log_path) == [first.broker_url], "the agent's first connection", timeout=30)
        first.stop()
        remembered = json.loads((home / "addresses.json").read_text())
        assert remembered == {"broker": BrokerAddress.parse(addresses[0] or "").port,
                              "repo": int((addresses[1] or "").rsplit(":", 1)[1])}  # fmt: skip
        assert refused(addresses[0] or "")

        with FleetServer(settings) as second:
            assert (second.broker_url, second.repo_url) == addresses
            wait_for(lambda: len(_connections(log_path)) >= 2, "the agent to reconnect by itself", timeout=60)
            assert set(_connections(log_path)) == {addresses[0]}
            store = open_store(home / "fleet.db")
            try:
                wait_for(lambda: (d := store.device("pi-r1")) is not None and d.device.online, "the device online")
            finally:
                store.close()
            with urllib.request.urlopen(f"{second.repo_url}/metadata/root.json", timeout=5) as response:
                assert response.status == 200
    finally:
        if agent_proc is not None:
            agent_proc.send_signal(signal.SIGTERM)
            agent_proc.wait(20)
        log.close()
        first.stop()


def test_a_remembered_broker_port_taken_by_another_program_fails_the_start_in_one_line_naming_the_fix(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with FleetServer(ServerSettings(home=home, ingest_workers=0)) as server:
        port = server.broker.port  # type: ignore[union-attr]
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the fleet's last connections may be closing
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(StartFailed) as failed:
            FleetServer(ServerSettings(home=home, ingest_workers=0)).start()
    assert failed.value.reason == "broker_port_taken"
    assert f"127.0.0.1:{port}" in failed.value.message() and "addresses.json" in failed.value.message()
    assert "--port" in failed.value.fix and "\n" not in failed.value.message()
    assert not (home / "serve.json").exists()


def test_given_ports_override_the_remembered_ones_and_are_remembered_in_turn(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with FleetServer(ServerSettings(home=home, ingest_workers=0)):
        pass
    port, repo_port = free_port(), free_port()
    with FleetServer(ServerSettings(home=home, ingest_workers=0, port=port, repo_port=repo_port)) as server:
        assert (server.broker_url, server.repo_url) == (f"mqtt://127.0.0.1:{port}", f"http://127.0.0.1:{repo_port}")
    assert json.loads((home / "addresses.json").read_text()) == {"broker": port, "repo": repo_port}
    with FleetServer(ServerSettings(home=home, ingest_workers=0)) as server:
        assert (server.broker_url, server.repo_url) == (f"mqtt://127.0.0.1:{port}", f"http://127.0.0.1:{repo_port}")


# --------------------------------------------------------------------------------------------------------------
# A broker without shared subscriptions: NATS server's MQTT grants $share/... and never delivers on it

@pytest.fixture
def nats_broker(tmp_path: Path) -> Iterator[str]:
    """A nats-server of the test's own with MQTT; yields its mqtt:// URL."""
    nats = NatsBroker(tmp_path / "nats")
    nats.start()
    try:
        yield nats.url
    finally:
        nats.stop()


def test_on_a_broker_that_never_delivers_on_shared_subscriptions_the_workers_go_off_and_windows_still_arrive(
    tmp_path: Path, nats_broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet")
    home = tmp_path / "home"
    settings = ServerSettings(home=home, broker_url=nats_broker, log_level="WARNING", probe_timeout=2)
    with FleetServer(settings) as server:  # the default workers
        assert server.workers is None and server.ingest_workers == 0
        off = [r for r in caplog.records if r.getMessage() == "ingest_workers_off"]
        assert len(off) == 1 and "$share" in off[0].__dict__["edgefleet_fields"]["reason"], off
        publish(nats_broker, [("pi-n", Kind.STATUS, birth("pi-n"))]
                + [("pi-n", Kind.TELEMETRY, window("pi-n", seq)) for seq in range(5)])  # fmt: skip
        store = open_store(home / "fleet.db")
        try:
            wait_for(lambda: store.window_counts() == {"pi-n": 5}, "the windows in the database", timeout=30)
        finally:
            store.close()
