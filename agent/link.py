"""The device's MQTT link: birth and last will, persistent session, outbox draining, reconnect with backoff.

paho-mqtt is driven from a :class:`~agent.reactor.Reactor` (its external-loop API) instead of its own thread, so
one thread can carry many links. MQTT 3.1.1 only: it is what every broker speaks.

Delivery: a message leaves the outbox only when the FLEET says it stored it (an acknowledgement on the device's own
``ack`` topic, :class:`agent.protocol.Ack`), never on the broker's PUBACK: a broker that restarts without its state,
or that holds no subscription for the fleet at that moment, PUBACKs a message and then discards it. A PUBACK only
moves a message from "in flight" to "unconfirmed" (in memory). Unconfirmed messages are sent again, with the same
seq, at once after every reconnect and on a timer (:class:`Resend`: 10 s, doubling to 5 min while no
acknowledgement arrives); the fleet's dedupe key absorbs the copies. In flight plus unconfirmed is bounded
(``max_unconfirmed``), so a fleet that never answers costs a bounded number of messages per resend round.
"""

from __future__ import annotations

import logging
import random
import ssl
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.logs import event
from agent.protocol import Kind
from agent.reactor import Reactor, Timer

log = logging.getLogger(__name__)


class PendingStore(Protocol):
    """What the link needs from the outbox."""

    def pending(self, limit: int, exclude: Any = ()) -> list[Any]: ...

    def acknowledge(self, boot_id: str, ranges: Any) -> Counter[Kind]: ...


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, so a fleet does not reconnect in lockstep after a broker restart."""

    initial: float = 0.5
    maximum: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt, 30))
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Resend:
    """How long a message the broker took waits for the fleet's acknowledgement before it is sent again: ``initial``
    seconds, doubled after each resend round that no acknowledgement followed, up to ``maximum``; an acknowledgement
    resets it."""

    initial: float = 10.0
    maximum: float = 300.0


class MqttLink:
    def __init__(
        self,
        reactor: Reactor,
        device_id: str,
        broker: BrokerAddress,
        outbox: PendingStore,
        birth: Callable[[], dict[str, Any]],
        boot_id: str,
        *,
        prefix: str = protocol.DEFAULT_PREFIX,
        keepalive: int = 30,
        tls: TlsFiles | None = None,
        on_command: Callable[[Kind, bytes], None] | None = None,
        max_inflight: int = 20,
        max_unconfirmed: int = 200,
        backoff: Backoff = Backoff(),
        resend: Resend = Resend(),
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.device_id = device_id
        self.broker = broker
        self.outbox = outbox
        self.prefix = prefix
        self._birth = birth
        self._boot_id = boot_id
        self._on_command = on_command
        self._max_inflight = max_inflight
        self._max_unconfirmed = max(max_unconfirmed, max_inflight)
        self._backoff = backoff
        self._resend = resend
        self._resend_after = resend.initial
        self._rng = rng or random.Random()
        self._inflight: dict[int, tuple[int, Kind]] = {}  # paho mid -> (outbox seq, kind): no PUBACK yet
        # outbox seq -> when the broker PUBACKed it (monotonic): waiting for the fleet; oldest first (insertion order)
        self._unconfirmed: dict[int, float] = {}
        self._attempt = 0
        self._closing = False
        self._held = False
        self._misc_timer: Timer | None = None
        self._reconnect_timer: Timer | None = None
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        #: Messages the fleet confirmed it stored (each counted once), by kind.
        self.acked: Counter[Kind] = Counter()
        #: Messages the broker took (PUBACK), resends included.
        self.sent = 0
        #: Messages sent again because no acknowledgement came in time (reconnects not counted).
        self.resent = 0
        #: Acknowledgements refused (malformed, another device's), by reason; they change nothing.
        self.ack_rejects: Counter[str] = Counter()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        will = protocol.encode(Kind.STATUS, protocol.offline_status(device_id, boot_id, "connection_lost"))
        client.will_set(self.topic(Kind.STATUS), will, qos=1, retain=True)
        if broker.tls:
            (tls or TlsFiles()).apply(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.connect_async(broker.host, broker.port, keepalive)
        self.client = client

    def topic(self, kind: Kind) -> str:
        return protocol.topic(self.prefix, self.device_id, kind)

    @property
    def unconfirmed(self) -> int:
        """Messages the broker took that the fleet has not acknowledged yet (this connection's)."""
        return len(self._unconfirmed)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting; runs on the reactor thread."""
        self._closing = False
        self._misc_timer = self.reactor.call_every(1.0, self._misc, first_delay=self._rng.uniform(0, 1))
        self._connect()

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self._closing:
            return
        try:
            self.client.reconnect()
        except (OSError, ssl.SSLError) as exc:
            self._schedule_reconnect(f"{type(exc).__name__}: {exc}")

    def _schedule_reconnect(self, reason: str) -> None:
        if self._closing or self._reconnect_timer is not None:
            return
        delay = self._backoff.delay(self._attempt, self._rng)
        self._attempt += 1
        event(log, "mqtt_reconnect_scheduled", logging.WARNING, device_id=self.device_id, reason=reason,
              delay_s=round(delay, 2), attempt=self._attempt)  # fmt: skip
        self._reconnect_timer = self.reactor.call_later(delay, self._connect)

    def close(self, timeout: float = 5.0, reason: str = "shutdown") -> None:
        """Say goodbye: a retained offline status, pending acks given a moment, then a clean DISCONNECT."""
        if self.connected:
            goodbye = protocol.encode(Kind.STATUS, protocol.offline_status(self.device_id, self._boot_id, reason))
            info = self.client.publish(self.topic(Kind.STATUS), goodbye, qos=1, retain=True)
            self.reactor.run_until(lambda: info.is_published() or not self.connected, timeout)
        self._closing = True
        for timer in (self._misc_timer, self._reconnect_timer):
            if timer:
                timer.cancel()
        if self.connected:
            self.client.disconnect()
            self.reactor.run_until(lambda: self.client.socket() is None, timeout)
        self.connected = False

    def hold(self, held: bool) -> None:
        """While held, nothing is published (the outbox keeps it all); the connection and its keepalive go on. What
        the fleet sees of a device whose agent hangs while its network stack still answers: the simulator's
        ``silent`` fault. Released, what was kept is sent and the birth published again."""
        self._held = held
        if not held:
            self.publish_birth()
            self.pump()

    def lose_power(self) -> None:
        """Lose the connection as a process that died does (the simulator's power cut, firmware_sim.power): no goodbye
        and no DISCONNECT, the socket closed and out of the reactor, so the broker publishes the last will; no
        reconnect. Reactor thread."""
        self._closing = True
        for timer in (self._misc_timer, self._reconnect_timer):
            if timer:
                timer.cancel()
        sock = self.client.socket()
        # paho still holds the closed socket: when the client is collected, it must not reach into the reactor.
        self.client.on_socket_close = self.client.on_socket_unregister_write = None
        if sock is not None:
            self.reactor.remove_socket(sock)
            sock.close()
        self.connected = False

    def publish_birth(self) -> None:
        """Announce the device (retained): on every connect, and again when what it runs changes."""
        if self.connected and not self._held:
            birth = protocol.encode(Kind.STATUS, self._birth())
            self.client.publish(self.topic(Kind.STATUS), birth, qos=1, retain=True)

    # -- outbox -------------------------------------------------------------------------------------------------

    def pump(self) -> None:
        """Send stored messages while the in-flight window has room."""
        if not self.connected or self._held:
            return
        busy = len(self._inflight)
        room = min(self._max_inflight - busy, self._max_unconfirmed - busy - len(self._unconfirmed))
        if room <= 0:
            return
        exclude = {seq for seq, _ in self._inflight.values()}
        exclude.update(self._unconfirmed)
        for entry in self.outbox.pending(room, exclude=exclude):
            info = self.client.publish(entry.topic, entry.payload, qos=entry.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # connection went away mid-pump; the entry stays stored and is sent after reconnect
            self._inflight[info.mid] = (entry.seq, entry.kind)

    # -- paho callbacks (reactor thread) ------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            event(log, "mqtt_connect_refused", logging.ERROR, device_id=self.device_id, reason=str(reason))
            return
        self.connected = True
        self._attempt = 0
        self.connects += 1
        event(log, "mqtt_connected", device_id=self.device_id, broker=self.broker.url,
              session_present=bool(flags.session_present))  # fmt: skip
        self.publish_birth()
        client.subscribe([(self.topic(Kind.DESIRED), 1), (self.topic(Kind.CMD), 1), (self.topic(Kind.ACK), 1)])
        # What the broker took before may be gone (a restart without its state, no subscriber for the fleet then):
        # send it all again now. paho itself resends what was still waiting for its PUBACK.
        self._unconfirmed.clear()
        self.pump()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was_connected = self.connected
        self.connected = False
        if was_connected:
            self.disconnects += 1
        if not self._closing:
            self._schedule_reconnect(f"disconnected: {reason}")

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any) -> None:
        """The broker took a message: it now waits for the fleet's acknowledgement, not in paho's window."""
        sent = self._inflight.pop(mid, None)
        if sent is not None:
            self.sent += 1
            self._unconfirmed[sent[0]] = self.reactor.clock()
            self.pump()

    def _on_ack(self, payload: bytes) -> None:
        """The fleet stored these seqs: forget them. A malformed acknowledgement is counted and changes nothing."""
        try:
            ack = protocol.decode(Kind.ACK, payload)
            if ack["device_id"] != self.device_id:
                raise protocol.ProtocolError("device_mismatch", ack["device_id"])
        except protocol.ProtocolError as exc:
            self.ack_rejects[exc.reason] += 1
            event(log, "mqtt_ack_rejected", logging.WARNING, device_id=self.device_id, reason=exc.reason,
                  detail=exc.detail, size=len(payload))  # fmt: skip
            return
        ranges = ack["seqs"]
        self.acked.update(self.outbox.acknowledge(ack["boot_id"], ranges))
        if self._unconfirmed:
            confirmed = [seq for seq in self._unconfirmed if any(first <= seq <= last for first, last in ranges)]
            for seq in confirmed:
                del self._unconfirmed[seq]
        self._resend_after = self._resend.initial  # the fleet is there: wait the short time again
        self.pump()

    def _resend_overdue(self) -> None:
        """Send again what the broker took but the fleet has not confirmed within the resend time."""
        if not self._unconfirmed or not self.connected:
            return
        now = self.reactor.clock()
        if now - next(iter(self._unconfirmed.values())) < self._resend_after:
            return
        overdue = [seq for seq, at in self._unconfirmed.items() if now - at >= self._resend_after]
        for seq in overdue:
            del self._unconfirmed[seq]
        self.resent += len(overdue)
        event(log, "mqtt_resend", logging.WARNING, device_id=self.device_id, messages=len(overdue),
              waited_s=round(self._resend_after, 1))  # fmt: skip
        self._resend_after = min(self._resend_after * 2, self._resend.maximum)
        self.pump()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, kind = protocol.parse_topic(self.prefix, message.topic)
        except protocol.ProtocolError as exc:
            event(log, "mqtt_message_rejected", logging.WARNING, device_id=self.device_id, reason=exc.reason)
            return
        if device_id != self.device_id or kind not in protocol.FLEET_PUBLISHED:
            event(log, "mqtt_message_rejected", logging.WARNING, device_id=self.device_id, reason="foreign_topic")
            return
        if kind is Kind.ACK:
            self._on_ack(message.payload)
            return
        if self._on_command:
            self._on_command(kind, message.payload)

    def _misc(self) -> None:
        if self.client.socket() is not None:
            self.client.loop_misc()
        self._resend_overdue()

    def _on_socket_open(self, client: mqtt.Client, _u: Any, sock: Any) -> None:
        self.reactor.add_socket(sock, self._read, self._write)

    def _on_socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self.reactor.remove_socket(sock)

    def _on_register_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self.reactor.want_write(sock, True)

    def _on_unregister_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self.reactor.want_write(sock, False)

    def _read(self) -> None:
        self.client.loop_read()

    def _write(self) -> None:
        self.client.loop_write()


def new_boot_id() -> str:
    """A fresh id per agent start; with the outbox sequence it makes every message unique."""
    return uuid.uuid4().hex
