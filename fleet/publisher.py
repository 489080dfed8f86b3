"""Publishing retained messages and knowing the broker has them: how desired states reach devices.

Retained plus the device's persistent session means a device that is offline picks the state up when it connects;
a state counts as published only once the broker's PUBACK arrived.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.broker_address import BrokerAddress, TlsFiles
from fleet.errors import FleetError


class PublishError(FleetError):
    """The broker could not be reached, refused the connection, or did not acknowledge a message in time."""

    def __init__(self, detail: str) -> None:
        super().__init__("publish_failed", detail, "check the broker and run the command again")


class DesiredPublisher:
    """One MQTT connection that publishes retained QoS 1 messages and waits for each one's PUBACK."""

    def __init__(self, broker_url: str, tls: TlsFiles | None = None, timeout: float = 10.0) -> None:
        self.address = BrokerAddress.parse(broker_url)
        self.timeout = timeout
        self._connected = threading.Event()
        self._refused: str | None = None
        # A clean session of its own: the director only publishes, and must not take over another client's session.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-director-{os.getpid()}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if self.address.tls:
            (tls or TlsFiles()).apply(client)
        client.on_connect = self._on_connect
        self._client = client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connected.set()

    def __enter__(self) -> DesiredPublisher:
        where = self.address.url
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=30)
        except OSError as exc:
            raise PublishError(f"cannot connect to the broker at {where}: {exc}") from None
        self._client.loop_start()
        if not self._connected.wait(self.timeout) or self._refused:
            self.__exit__()
            raise PublishError(f"the broker at {where} did not accept the connection: {self._refused or 'timeout'}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish retained with QoS 1; return once the broker acknowledged it (it then holds it for the device)."""
        info = self._client.publish(topic, payload, qos=1, retain=True)
        try:
            info.wait_for_publish(self.timeout)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"publishing on {topic} failed: {exc}") from None
        if not info.is_published():
            raise PublishError(f"the broker did not acknowledge {topic} within {self.timeout:g} s")
