"""Assigning releases to devices: the director's half of the two-key rule, published where each device listens.

For every device, the fleet records the next desired state in the store (the last published state's models with the
assigned one replaced, and a seq never used before), signs it with the online director key
(:func:`fleet.trust.director.sign_desired`), publishes it retained with QoS 1 on the device's ``desired`` topic and only
counts it once the broker's PUBACK arrived. Retained plus the device's persistent session means a device that is
offline picks the state up when it connects. The device acts on it only if TUF's targets metadata lists the same
target too (see :mod:`agent.update.desired`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from securesystemslib.signer import Signer

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from fleet.store.sqlite import Store
from fleet.trust.director import sign_desired

#: The fields of a release that go into a desired state (``ReleaseInfo.desired_entry``).
_ENTRY_FIELDS = ("target", "release", "sha256", "length")


class PublishError(RuntimeError):
    """The broker could not be reached, refused the connection, or did not acknowledge a message in time."""


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


def release_ref(release: Mapping[str, Any]) -> str:
    return f"{release['name']}:{release['version']}"


def desired_entry(release: Mapping[str, Any]) -> dict[str, Any]:
    """A release (``Repository.release()``'s view) as one model of a desired state."""
    return {field: release[field] for field in _ENTRY_FIELDS}


def incompatible(store: Store, device_ids: Sequence[str], release: Mapping[str, Any]) -> list[str]:
    """Why known devices could not run the release (a device refuses what its birth says it cannot load).

    ``release`` is ``Repository.release()``'s view. Devices the fleet has not heard from yet pass: their desired
    state waits retained until they connect.
    """
    machines = release["hardware"]["machines"]
    problems = []
    for device_id in device_ids:
        device = store.device(device_id)
        if device is None:
            continue
        machine = (device["hardware"] or {}).get("machine")
        if machine is not None and machine not in machines:
            problems.append(f"{device_id} is {machine}; {release_ref(release)} is signed for {', '.join(machines)}")
        runtimes = device["runtimes"]
        if runtimes is not None and release["runtime"] not in runtimes:
            problems.append(f"{device_id} has no {release['runtime']} runtime (it has {', '.join(runtimes) or 'none'})")
    return problems


def _sign(
    signer: Signer,
    device_id: str,
    campaign: str | None,
    issued: float,
    expires: float,
    seq: int,
    models: dict[str, Any],
) -> bytes:
    return sign_desired(signer, device_id, seq, models, campaign, issued, expires)


def assign(
    store: Store,
    signer: Signer,
    publisher: DesiredPublisher,
    device_ids: Sequence[str],
    release: Mapping[str, Any],
    *,
    campaign: str | None,
    ttl_s: float,
    actor: str,
    prefix: str = protocol.DEFAULT_PREFIX,
) -> Iterator[dict[str, Any]]:
    """Give each device a new desired state running ``release`` (``Repository.release()``'s view) and publish it.

    Devices are done one at a time, in order, and each state is yielded once the broker acknowledged it; a failure
    stops there and raises :class:`PublishError` (the devices yielded before keep their new state).
    """
    issued = time.time()
    expires = issued + ttl_s
    update = {release["name"]: desired_entry(release)}
    for device_id in device_ids:
        sign = functools.partial(_sign, signer, device_id, campaign, issued, expires)
        state, payload = store.add_desired(device_id, update, issued, expires, campaign, sign)
        publisher.publish(protocol.topic(prefix, device_id, protocol.Kind.DESIRED), payload)
        detail = {"release": release_ref(release), "campaign": campaign, "expires": expires}
        store.mark_desired_published(device_id, state["seq"], actor, detail)
        yield state
