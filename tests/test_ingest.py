"""The fleet's MQTT ingest against a real mosquitto, real paho publishers and a real SQLite store."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fleet_fixtures import device_view
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.protocol import Kind
from fleet.broker import MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.store import Store, open_store

BOOT_A = "a" * 32
BOOT_B = "b" * 32


def window(device_id: str, seq: int, boot_id: str = BOOT_A, count: int = 10, start: float = 1.7e9) -> dict[str, Any]:
    latency = [0] * (len(protocol.LATENCY_EDGES_MS) + 1)
    latency[8] = count
    confidence = [0] * protocol.CONFIDENCE_BINS
    confidence[-1] = count
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": seq,
        "model": "digits",
        "release": "digits:1",
        "window_start": start,
        "window_end": start + 60,
        "count": count,
        "errors": 0,
        "dropped": 0,
        "latency": latency,
        "confidence": confidence,
        "classes": [count, 0, 0],
        "features": [[0, count, 0, 0, 0], [0, 0, count, 0, 0]],
        "health": {"cpu_percent": 12.5},
    }


def event_message(device_id: str, seq: int, boot_id: str = BOOT_A) -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": seq,
        "ts": 1.7e9 + seq,
        "type": "install_committed",
        "model": "digits",
        "detail": {"release": "digits:1"},
    }


def birth(device_id: str, boot_id: str = BOOT_A, agent_version: str = "0.1.0") -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "state": "online",
        "boot_id": boot_id,
        "agent_version": agent_version,
        "hardware": {"machine": "aarch64", "memory_bytes": 4 << 30},
        "runtimes": ["onnxruntime"],
        "models": {"digits": {"release": "digits:1"}},
    }


MESSAGES: dict[Kind, Callable[[str, int], dict[str, Any]]] = {
    Kind.TELEMETRY: lambda device_id, seq: window(device_id, seq),
    Kind.EVENTS: lambda device_id, seq: event_message(device_id, seq),
    Kind.STATUS: lambda device_id, seq: birth(device_id),
}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Publisher:
    """A device-side paho client that publishes raw payloads on any topic, QoS 1, and waits until each is sent."""

    def __init__(self, url: str, prefix: str) -> None:
        address = BrokerAddress.parse(url)
        self.prefix = prefix
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def send(self, device_level: str, kind: Kind, payload: bytes | dict[str, Any], retain: bool = False) -> None:
        self.send_many([(device_level, kind, payload)], retain=retain)

    def send_many(self, messages: list[tuple[str, Kind, bytes | dict[str, Any]]], retain: bool = False) -> None:
        infos = [
            self.client.publish(
                f"{self.prefix}/{device_level}/{kind.value}",
                protocol.encode(kind, payload) if isinstance(payload, dict) else payload,
                qos=1,
                retain=retain,
            )
            for device_level, kind, payload in messages
        ]
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of the test's own: the session broker keeps retained messages and sessions between tests."""
    return f"t{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "fleet.db")
    yield s
    s.close()


def start_ingest(store: Store, broker: MosquittoBroker, prefix: str, client_id: str | None = None) -> Ingest:
    ingest = Ingest(store, broker.url, prefix=prefix, client_id=client_id or f"ingest-{uuid.uuid4().hex[:10]}")
    ingest.start()
    assert ingest.wait_ready(10), "the ingest did not subscribe"
    return ingest


@pytest.fixture
def ingest(store: Store, broker: MosquittoBroker, prefix: str) -> Iterator[Ingest]:
    running = start_ingest(store, broker, prefix)
    yield running
    running.stop()


@pytest.fixture
def publisher(broker: MosquittoBroker, prefix: str) -> Iterator[Publisher]:
    p = Publisher(broker.url, prefix)
    yield p
    p.close()


def test_status_windows_and_events_from_a_device_are_stored(ingest: Ingest, publisher: Publisher, store: Store) -> None:
    publisher.send("pi-1", Kind.STATUS, birth("pi-1"), retain=True)
    publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(3)])
    publisher.send_many([("pi-1", Kind.EVENTS, event_message("pi-1", seq)) for seq in range(2)])

    wait_for(lambda: ingest.stats()["stored"] == 5, "5 windows and events")
    assert store.window_counts() == {"pi-1": 3}
    device = device_view(store, "pi-1")
    assert device is not None
    assert device["online"] is True
    assert device["agent_version"] == "0.1.0"
    assert device["events"] == 2
    assert [e["type"] for e in device["last_events"]] == ["install_committed"] * 2
    stored = store.telemetry("pi-1").windows
    assert [w["seq"] for w in stored] == [0, 1, 2]
    assert stored[0]["features"] == window("pi-1", 0)["features"]
    assert ingest.stats()["rejected"] == {}


def test_a_window_or_event_published_twice_is_stored_once(ingest: Ingest, publisher: Publisher, store: Store) -> None:
    publisher.send_many(
        [
            ("pi-1", Kind.TELEMETRY, window("pi-1", 7)),
            ("pi-1", Kind.TELEMETRY, window("pi-1", 7)),
            ("pi-1", Kind.TELEMETRY, window("pi-1", 7, boot_id=BOOT_B)),  # same seq after a reboot: a new window
            ("pi-1", Kind.EVENTS, event_message("pi-1", 7)),
            ("pi-1", Kind.EVENTS, event_message("pi-1", 7)),
        ]
    )

    wait_for(lambda: ingest.stats()["stored"] + ingest.stats()["duplicates"] == 5, "all five messages")
    assert ingest.stats()["stored"] == 3
    assert ingest.stats()["duplicates"] == 2
    assert store.window_counts() == {"pi-1": 2}
    assert device_view(store, "pi-1")["events"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------------------------------------------
# Bad input: every kind of broken message is rejected and counted by reason, and the good ones keep flowing.

TOPIC_DEVICE = "pi-bad"
_NOT_A_VALUE = st.sampled_from([None, -1, True, [[["x"]]]])  # fails every field check of every schema
_FLAVOURS = (
    "bytes",
    "truncated",
    "zlib",
    "bomb",
    "oversized",
    "version",
    "type",
    "unknown",
    "surrogate_key",
    "surrogate_text",
    "device_id",
    "mismatch",
)
#: Free-text fields SQLite stores as text: a lone surrogate in them passes the schema but cannot be stored.
_TEXT_FIELDS = {Kind.TELEMETRY: "release", Kind.STATUS: "agent_version"}
_TOPIC_CHARS = st.sampled_from([*"abcXYZ019_.-", " ", "é", "ß", "!", "@", "$", "%", "&", "*", "=", "~"])


def _expected_reason(kind: Kind, payload: bytes) -> str | None:
    """The reason the wire contract gives for a payload on TOPIC_DEVICE's topic; None if it is a good message."""
    try:
        message = protocol.decode(kind, payload)
    except protocol.ProtocolError as exc:
        return exc.reason
    return None if message["device_id"] == TOPIC_DEVICE else "device_mismatch"


@st.composite
def bad_message(draw: st.DrawFn) -> tuple[str, Kind, bytes, str]:
    """(device topic level, kind, payload, the reason the ingest must count it under)."""
    kind = draw(st.sampled_from(protocol.DEVICE_PUBLISHED))
    message = MESSAGES[kind](TOPIC_DEVICE, draw(st.integers(0, 10**6)))
    raw = json.dumps(message).encode()
    flavour = draw(st.sampled_from(_FLAVOURS))
    if flavour == "bytes":
        payload = draw(st.binary(max_size=300))
        reason = _expected_reason(kind, payload)
        if reason is None:
            reject()  # bytes that happen to be a valid message are not bad input
        return TOPIC_DEVICE, kind, payload, reason
    if flavour == "truncated":
        return TOPIC_DEVICE, kind, raw[: draw(st.integers(1, len(raw) - 1))], "not_json"
    if flavour == "zlib":
        packed = zlib.compress(raw)
        return TOPIC_DEVICE, kind, packed[: draw(st.integers(1, len(packed) - 1))], "bad_compression"
    if flavour == "bomb":  # small on the wire, over the cap once inflated
        return TOPIC_DEVICE, kind, zlib.compress(b" " * (protocol.MAX_PAYLOAD_BYTES + 1)), "oversized"
    if flavour == "oversized":
        size = draw(st.integers(protocol.MAX_PAYLOAD_BYTES + 1, protocol.MAX_PAYLOAD_BYTES + 50_000))
        return TOPIC_DEVICE, kind, b"{" + b" " * (size - 1), "oversized"
    if flavour == "version":
        message["v"] = draw(st.sampled_from([0, 2, "1", None, -1, 99]))
        return TOPIC_DEVICE, kind, json.dumps(message).encode(), "schema_version"
    if flavour == "type":
        message[draw(st.sampled_from(sorted(k for k in message if k != "v")))] = draw(_NOT_A_VALUE)
        return TOPIC_DEVICE, kind, json.dumps(message).encode(), "bad_field"
    if flavour == "unknown":
        fields = protocol.SCHEMAS[kind].__struct_fields__
        message[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in fields))] = 1
        return TOPIC_DEVICE, kind, json.dumps(message).encode(), "unknown_field"
    if flavour == "surrogate_key":  # JSON escapes make lone surrogates; the reject must still be recorded
        message["\ud800" + draw(st.text(max_size=5))] = 1
        payload = json.dumps(message).encode()
        return TOPIC_DEVICE, kind, payload, _expected_reason(kind, payload)
    if flavour == "surrogate_text":
        text_kind = draw(st.sampled_from(sorted(_TEXT_FIELDS)))
        message = MESSAGES[text_kind](TOPIC_DEVICE, 0)
        message[_TEXT_FIELDS[text_kind]] = "v\udc80"
        payload = json.dumps(message).encode()
        return TOPIC_DEVICE, text_kind, payload, _expected_reason(text_kind, payload) or "unstorable"
    if flavour == "device_id":
        level = draw(st.text(_TOPIC_CHARS, max_size=80).filter(lambda s: not protocol.valid_device_id(s)))
        return level, kind, raw, "bad_device_id"
    other = MESSAGES[kind]("someone-else", 1)
    return TOPIC_DEVICE, kind, json.dumps(other).encode(), "device_mismatch"


def test_bad_messages_are_rejected_and_counted_by_reason_while_good_windows_keep_being_stored(
    ingest: Ingest, publisher: Publisher, store: Store
) -> None:
    seqs = itertools.count()
    expected_rejects: Counter[str] = Counter()
    good = 0

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bad=st.lists(bad_message(), max_size=6), n_good=st.integers(1, 3), data=st.data())
    def publish_a_mix(bad: list[tuple[str, Kind, bytes, str]], n_good: int, data: st.DataObject) -> None:
        nonlocal good
        batch: list[tuple[str, Kind, bytes | dict[str, Any]]] = [
            (level, kind, payload) for level, kind, payload, _ in bad
        ]
        for _ in range(n_good):
            at = data.draw(st.integers(0, len(batch)))
            batch.insert(at, ("steady", Kind.TELEMETRY, window("steady", next(seqs))))
        publisher.send_many(batch)
        expected_rejects.update(reason for *_, reason in bad)
        good += n_good
        wait_for(
            lambda: ingest.stats()["stored"] == good and ingest.stats()["rejected"] == expected_rejects,
            f"{good} windows stored and rejects {dict(expected_rejects)}",
        )

    publish_a_mix()
    wait_for(lambda: store.reject_counts() == expected_rejects, "the rejects to be committed")
    assert store.window_counts()["steady"] == good
    assert publisher.client.is_connected(), "the broker dropped the publisher: a bad input never left it"
    assert ingest.stats()["queue_depth"] == 0


# --------------------------------------------------------------------------------------------------------------
# The device registry: births, last wills, reboots.


def test_a_birth_registers_the_device_online_with_its_agent_hardware_and_models(
    ingest: Ingest, publisher: Publisher, store: Store
) -> None:
    publisher.send("pi-7", Kind.STATUS, birth("pi-7", agent_version="1.4.2"), retain=True)

    wait_for(lambda: device_view(store, "pi-7") is not None, "the birth")
    device = device_view(store, "pi-7")
    assert device is not None
    assert device["online"] is True
    assert device["boot_id"] == BOOT_A
    assert device["agent_version"] == "1.4.2"
    assert device["hardware"] == {"machine": "aarch64", "memory_bytes": 4 << 30}
    assert device["runtimes"] == ["onnxruntime"]
    assert device["models"] == {"digits": {"release": "digits:1"}}
    assert [d.device_id for d in store.devices()] == ["pi-7"]


_DEVICE_WITH_A_WILL = """
import json, sys, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from agent import protocol

host, port, prefix, device_id, boot_id, birth = sys.argv[1:]
status = protocol.topic(prefix, device_id, protocol.Kind.STATUS)
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
will = protocol.offline_status(device_id, boot_id, "connection_lost")
client.will_set(status, protocol.encode(protocol.Kind.STATUS, will), qos=1, retain=True)
client.connect(host, int(port))
client.loop_start()
client.publish(status, protocol.encode(protocol.Kind.STATUS, json.loads(birth)), 1, True).wait_for_publish()
print("online", flush=True)
time.sleep(120)
"""


def test_the_last_will_marks_a_device_offline_when_its_connection_dies(
    ingest: Ingest, broker: MosquittoBroker, prefix: str, store: Store
) -> None:
    device_id = "pi-dies"
    address = BrokerAddress.parse(broker.url)
    args = [address.host, str(address.port), prefix, device_id, BOOT_A, json.dumps(birth(device_id))]
    device = subprocess.Popen([sys.executable, "-c", _DEVICE_WITH_A_WILL, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert device.stdout is not None
        assert device.stdout.readline().strip() == "online"
        wait_for(lambda: (device_view(store, device_id) or {}).get("online") is True, "the birth")
    finally:
        device.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
        device.wait()

    wait_for(lambda: device_view(store, device_id)["online"] is False, "the last will")  # type: ignore[index]
    assert device_view(store, device_id)["offline_reason"] == "connection_lost"  # type: ignore[index]


def test_a_stale_will_from_before_a_reboot_does_not_mark_the_rebooted_device_offline(
    ingest: Ingest, publisher: Publisher, store: Store
) -> None:
    publisher.send_many(
        [
            ("pi-2", Kind.STATUS, birth("pi-2", boot_id=BOOT_A)),
            ("pi-2", Kind.STATUS, birth("pi-2", boot_id=BOOT_B)),  # rebooted before the broker gave up on boot A
            ("pi-2", Kind.STATUS, protocol.offline_status("pi-2", BOOT_A, "connection_lost")),
            ("pi-2", Kind.TELEMETRY, window("pi-2", 0, boot_id=BOOT_B)),  # stored after the will: a marker
        ]
    )
    wait_for(lambda: store.window_counts().get("pi-2") == 1, "the marker window")
    device = device_view(store, "pi-2")
    assert device is not None
    assert (device["online"], device["boot_id"], device["offline_reason"]) == (True, BOOT_B, None)

    publisher.send("pi-2", Kind.STATUS, protocol.offline_status("pi-2", BOOT_B, "shutdown"))
    wait_for(lambda: device_view(store, "pi-2")["online"] is False, "the current boot's goodbye")  # type: ignore[index]
    assert device_view(store, "pi-2")["offline_reason"] == "shutdown"  # type: ignore[index]


# --------------------------------------------------------------------------------------------------------------
# The persistent session: the fleet may be down while devices publish.


def test_windows_published_while_the_ingest_is_down_are_stored_once_after_it_restarts(
    store: Store, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:10]}"
    start_ingest(store, broker, prefix, client_id).stop()  # the broker now holds the session and its subscription

    publisher.send_many([("pi-3", Kind.TELEMETRY, window("pi-3", seq)) for seq in range(5)])
    assert store.window_counts() == {}

    restarted = start_ingest(store, broker, prefix, client_id)
    try:
        wait_for(lambda: store.window_counts() == {"pi-3": 5}, "the windows kept by the broker")
        publisher.send_many([("pi-3", Kind.TELEMETRY, window("pi-3", seq)) for seq in (1, 3)])  # redelivered copies
        wait_for(lambda: restarted.stats()["duplicates"] == 2, "the copies")
        assert store.window_counts() == {"pi-3": 5}
    finally:
        restarted.stop()


# --------------------------------------------------------------------------------------------------------------
def test_the_ingest_stores_windows_over_mqtts_with_a_client_certificate(
    tls_broker: tuple[str, TlsFiles], store: Store, prefix: str
) -> None:
    url, tls = tls_broker
    ingest = Ingest(store, url, prefix=prefix, tls=tls)
    ingest.start()
    try:
        assert ingest.wait_ready(10), "no TLS session with the broker"
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-device")
        device.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
        device.connect("127.0.0.1", BrokerAddress.parse(url).port)
        device.loop_start()
        topic = protocol.topic(prefix, "pi-tls", Kind.TELEMETRY)
        device.publish(topic, protocol.encode(Kind.TELEMETRY, window("pi-tls", 0)), qos=1).wait_for_publish(10)
        device.disconnect()
        device.loop_stop()
        wait_for(lambda: store.window_counts() == {"pi-tls": 1}, "the window sent over TLS")
    finally:
        ingest.stop()


def test_no_window_is_lost_when_the_ingest_is_killed_mid_stream(
    tmp_path: Path, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    home, client_id, total = tmp_path / "home", f"ingest-{uuid.uuid4().hex[:10]}", 3000
    fleet = Path(sys.executable).parent / "fleet"
    serve = [str(fleet), "serve", "--home", str(home), "--broker", broker.url, "--prefix", prefix]
    proc = subprocess.Popen([*serve, "--client-id", client_id], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"broker: ")  # subscribed
    store = open_store(home / "fleet.db")
    sender = threading.Thread(
        target=publisher.send_many, args=([("pi-k", Kind.TELEMETRY, window("pi-k", seq)) for seq in range(total)],)
    )
    sender.start()
    try:
        wait_for(lambda: store.window_counts().get("pi-k", 0) > 0, "the first windows")
    finally:
        proc.send_signal(signal.SIGKILL)  # no final commit, no acks for what was in flight
        proc.wait()
        sender.join()
    assert store.window_counts()["pi-k"] < total, "the ingest finished before it was killed: nothing was tested"

    restarted = subprocess.Popen([*serve, "--client-id", client_id], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.window_counts() == {"pi-k": total}, "every window, after the restart", timeout=30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(30)
        store.close()


# --------------------------------------------------------------------------------------------------------------
# Conflicts and gaps through the real ingest.


def test_a_forged_window_then_the_real_one_through_the_ingest_the_real_one_is_a_conflict_counted_and_acked(
    store: Store, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:10]}"
    ingest = start_ingest(store, broker, prefix, client_id)
    try:
        publisher.send("pi-f", Kind.TELEMETRY, window("pi-f", 5, count=424242))  # forged ahead of the device
        wait_for(lambda: store.window_counts() == {"pi-f": 1}, "the forged window")
        publisher.send_many([("pi-f", Kind.TELEMETRY, window("pi-f", 5)), ("pi-f", Kind.TELEMETRY, window("pi-f", 6))])
        wait_for(lambda: ingest.stats()["received"] == 3 and ingest.stats()["stored"] == 2, "the real windows")
        wait_for(lambda: store.summary().rejects == {"conflict": 1}, "the conflict counted")
        publisher.send("pi-f", Kind.TELEMETRY, window("pi-f", 6))  # an identical copy: a plain duplicate
        wait_for(lambda: ingest.stats()["duplicates"] == 1, "the copy, counted once its batch is committed")
        assert ingest.stats()["received"] == 4 and store.summary().rejects == {"conflict": 1}
        assert store.window_counts() == {"pi-f": 2}
        stats = ingest.stats()
        assert (stats["rejected"], stats["duplicates"]) == ({"conflict": 1}, 1)  # the ingest's own counters agree
    finally:
        ingest.stop()
    # Acked like any message: the session holds nothing for the next start to receive again.
    restarted = start_ingest(store, broker, prefix, client_id)
    try:
        time.sleep(1.0)
        assert restarted.stats()["received"] == 0
    finally:
        restarted.stop()


def test_a_gap_in_a_devices_seqs_shows_until_the_missing_window_arrives(
    ingest: Ingest, publisher: Publisher, store: Store
) -> None:
    publisher.send_many([("pi-g", Kind.TELEMETRY, window("pi-g", seq)) for seq in (1, 2, 5)])
    publisher.send("pi-g", Kind.EVENTS, event_message("pi-g", 6))
    wait_for(lambda: ingest.stats()["stored"] == 4, "the first messages")
    assert [(g.first, g.last) for g in store.gaps("pi-g")] == [(3, 4)]
    assert store.summary().gaps == {"pi-g": 2}

    publisher.send_many([("pi-g", Kind.EVENTS, event_message("pi-g", 3)), ("pi-g", Kind.TELEMETRY, window("pi-g", 4))])
    wait_for(lambda: ingest.stats()["stored"] == 6, "the resent ones")
    assert store.gaps("pi-g") == []
    assert device_view(store, "pi-g")["gaps"] == []  # type: ignore[index]
