"""The embedded brokers carry MQTT traffic: mosquitto when present, amqtt in-process otherwise."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker import AmqttBroker, Broker, MosquittoBroker


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
