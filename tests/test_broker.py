"""The embedded brokers carry MQTT traffic: mosquitto when present, amqtt in-process otherwise; and the ingest comes
back promptly when the broker restarts."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_ingest import wait_for, window

from agent import protocol
from fleet.broker import AmqttBroker, Broker, MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.store import Store, open_store


def round_trip(broker: Broker) -> bytes:
    got = threading.Event()
    received: list[bytes] = []

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append(msg.payload)
        got.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe("t/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        for _ in range(50):  # the subscription may land a moment after connect
            pub.publish("t/x", b"hello", qos=1).wait_for_publish(5)
            if got.wait(0.2):
                break
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return received[0]


def test_the_pure_python_fallback_broker_carries_messages() -> None:
    broker = AmqttBroker()
    broker.start()
    try:
        assert round_trip(broker) == b"hello"
    finally:
        broker.stop()


def test_mosquitto_keeps_a_fixed_port_across_restarts(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path)
    broker.start()
    port = broker.port
    broker.restart()
    try:
        assert broker.port == port
        assert round_trip(broker) == b"hello"
    finally:
        broker.kill()


# --------------------------------------------------------------------------------------------------------------
# The ingest through a broker killed and restarted

#: How long the broker stays down: paho's old back-off (1 s doubling to 30 s) would by then wait 8 s more.
DOWN_S = 8.0
#: What "promptly" means: the ingest's back-off is capped at 2 s.
RESUBSCRIBED_WITHIN_S = 3.0


@contextlib.contextmanager
def ingest_on(tmp_path: Path, persistence: bool) -> Iterator[tuple[MosquittoBroker, Ingest, Store]]:
    """A mosquitto of the test's own and an ingest subscribed to it; both stopped at the end."""
    broker = MosquittoBroker(tmp_path / "mosquitto", persistence=persistence)
    broker.start()
    store = open_store(tmp_path / "fleet.db")
    ingest = Ingest(store, broker.url, prefix="restart/v1", client_id="restart-ingest")
    ingest.start()
    try:
        assert ingest.wait_ready(10)
        yield broker, ingest, store
    finally:
        ingest.stop()
        store.close()
        broker.kill()


def test_the_ingest_subscribes_again_within_seconds_of_a_broker_killed_and_restarted_and_warns_of_the_lost_session(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet")
    with ingest_on(tmp_path, persistence=False) as (broker, ingest, store):  # Mosquitto's default configuration
        broker.kill()  # SIGKILL
        wait_for(lambda: not ingest.stats()["connected"], "the ingest to see the broker gone")
        time.sleep(DOWN_S)
        broker.start()  # the same port
        restarted = time.monotonic()
        assert ingest.wait_ready(10)
        took = time.monotonic() - restarted
        print(f"subscribed again {took:.2f} s after the broker came back")  # the measurement (pytest -s)
        assert took < RESUBSCRIBED_WITHIN_S, f"the ingest took {took:.1f} s to subscribe again"
        lost = [r for r in caplog.records if r.getMessage() == "ingest_session_lost"]
        assert len(lost) == 1 and lost[0].levelno == logging.WARNING

        publish_once(broker, "restart/v1", window("pi-k", 0))
        wait_for(lambda: store.window_counts() == {"pi-k": 1}, "a window published after the restart, stored")


def test_a_broker_that_kept_the_session_raises_no_session_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet")
    with ingest_on(tmp_path, persistence=True) as (broker, ingest, _):  # SIGTERM saves the sessions
        broker.restart()
        wait_for(lambda: ingest.stats()["connected"], "the ingest back")
        assert [r.getMessage() for r in caplog.records].count("ingest_connected") == 2
        assert "ingest_session_lost" not in [r.getMessage() for r in caplog.records]


def publish_once(broker: Broker, prefix: str, message: dict[str, object]) -> None:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="restart-device")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        topic = protocol.topic(prefix, str(message["device_id"]), protocol.Kind.TELEMETRY)
        pub.publish(topic, protocol.encode(protocol.Kind.TELEMETRY, message), qos=1).wait_for_publish(10)
    finally:
        pub.disconnect()
        pub.loop_stop()
