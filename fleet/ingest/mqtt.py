"""MQTT ingest: device status, telemetry and events from the broker into the store, batched, exactly once.

Delivery: QoS 1, a persistent session (clean session off, so messages published while the fleet is down wait in the
broker) and manual acks sent only after the batch holding the message is committed. A crash before the commit means
the broker redelivers, and the store's (device_id, boot_id, seq) key absorbs the copy. After the commit each device
gets one acknowledgement of its seqs in the batch (``<prefix>/<device>/ack``), and only then forgets them: what a
broker loses (a restart without its state, no subscription for the ingest yet) the device sends again.

Bad input never stops the ingest: a message that breaks the wire contract (checked by :mod:`fleet.ingest.decode`, the
pure half) is counted by reason, logged (topic, reason, size; never the body), recorded, and acked so the broker
does not redeliver it forever.

Batching: messages are decoded, stored and acked on paho's network thread, in a batch that closes when the socket
has nothing more to read (or at ``batch_max``). One thread does it all, because a second one measured slower: the
two fought over the GIL, and the hand-over cost more than the work. The broker caps unacked messages per client
(mosquitto's max_inflight_messages), so it pauses while a batch is being committed and the batches stay small.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.logs import event
from fleet.errors import StoreUnavailable
from fleet.ingest.decode import Item, Received, admit, split, unstorable
from fleet.store.api import IngestWrites
from fleet.store.rows import Reject

log = logging.getLogger(__name__)

_KEEPALIVE_S = 30
#: paho's reconnect back-off: devices reconnect from 0.5 s, and until the ingest has subscribed again a restarted
#: broker without its session takes their windows and discards them, so the ingest must never wait long.
_RECONNECT_MIN_S = 0.1
_RECONNECT_MAX_S = 2.0
#: The device level of :func:`probe_topic`: ``~`` is not allowed in a device id, so no device publishes there.
_PROBE_DEVICE = "~probe"
_RETRY_MAX_S = 5.0
#: How long the acknowledgements to devices of committed batches are gathered before they are sent (by the sweeper):
#: a device with messages in several batches meanwhile gets one acknowledgement, so a backlog costs a few per device.
_ACK_DELAY_S = 0.25
#: A batch left open (its last message was followed by a packet that was not a message, say a PINGRESP) is committed
#: by the sweeper thread once it is this old.
_SWEEP_S = 0.05


def probe_topic(prefix: str) -> str:
    """A telemetry topic no device publishes on, which the telemetry subscription (shared or not) matches: the
    fleet publishes there to check that its telemetry subscribers really receive (:mod:`fleet.ingest.workers`). An
    ingest acks and counts (``probes``) what arrives there and stores nothing."""
    return f"{prefix}/{_PROBE_DEVICE}/{protocol.Kind.TELEMETRY.value}"


class Ingest:
    """Subscribe to the devices' status, telemetry and events topics (``kinds``) and store what arrives.

    With no ``kinds`` it takes nothing new and stores what its persistent session still holds.

    With ``share``, the subscriptions are MQTT shared subscriptions (``$share/<share>/...``): several ingests in one
    group (each its own process, see :mod:`fleet.ingest.workers`) split the messages between them, each message going to
    one.
    """

    def __init__(
        self,
        store: IngestWrites,
        broker_url: str,
        prefix: str = protocol.DEFAULT_PREFIX,
        client_id: str = "edgefleet-ingest",
        batch_max: int = 500,
        tls: TlsFiles | None = None,
        kinds: Sequence[protocol.Kind] = protocol.DEVICE_PUBLISHED,
        share: str | None = None,
    ) -> None:
        unknown = set(kinds) - set(protocol.DEVICE_PUBLISHED)
        if unknown:
            raise ValueError(f"kinds must be some of {[k.value for k in protocol.DEVICE_PUBLISHED]}, got {kinds}")
        self.store = store
        self.prefix = prefix
        self.kinds = tuple(kinds)
        self.share = share
        self.batch_max = batch_max
        self.address = BrokerAddress.parse(broker_url)
        self._client_id = client_id
        self._pending: list[Received] = []  # the open batch, guarded by _batch_lock
        self._pending_since = 0.0
        self._batch_lock = threading.Lock()  # held while a batch is open-ended or being committed
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._connected_at: float | None = None
        self._connections = 0
        self._probes = 0
        self._received = 0
        self._stored = 0
        self._duplicates = 0
        self._batches = 0
        self._acks_sent = 0  # acknowledgements published to devices, and their payload bytes
        self._ack_bytes = 0
        self._unsent_acks: dict[tuple[str, str], list[int]] = {}  # (device, boot) -> committed seqs; _batch_lock
        self._acks_since = 0.0
        self._rejected: Counter[str] = Counter()
        self._stats_lock = threading.Lock()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        client.max_inflight_messages_set(1000)  # the acknowledgements to devices (one per device and batch)
        if self.address.tls:
            (tls or TlsFiles()).apply(client)
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.message_callback_add(probe_topic(prefix), self._on_probe)
        self._client = client

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho retries with backoff until the broker answers) and start storing."""
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ingest-sweeper", daemon=True)
        self._sweeper.start()
        self._client.connect_async(self.address.host, self.address.port, keepalive=_KEEPALIVE_S)
        self._client.loop_start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected and subscribed: from then on, what devices publish reaches the store."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        """Store and ack every message already received, then disconnect.

        Messages arriving during shutdown are left unacked: the broker keeps them in the session for the next start.
        """
        self._closing.set()
        with self._batch_lock:  # after a commit in progress
            if self._pending:
                self._commit(self._admit(self._take()))
            self._send_acks()
        if self._sweeper is not None:
            self._sweeper.join()
        self._client.disconnect()  # queued behind the last acks, which therefore reach the broker first
        self._client.loop_stop()
        event(log, "ingest_stopped", **self.stats())

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            return {
                "connected": self._ready.is_set(),
                "connected_at": self._connected_at,
                "received": self._received,
                "stored": self._stored,
                "duplicates": self._duplicates,
                "rejected": dict(self._rejected),
                "queue_depth": len(self._pending),
                "batches": self._batches,
                "acks_sent": self._acks_sent,
                "ack_bytes": self._ack_bytes,
                "probes": self._probes,
            }

    # -- paho callbacks (network thread) ------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            event(log, "ingest_connect_refused", logging.WARNING, reason=str(reason_code))
            return
        with self._stats_lock:
            self._connected_at = time.time()
            self._connections += 1
            reconnected = self._connections > 1
        broker = f"{self.address.host}:{self.address.port}"
        event(log, "ingest_connected", broker=broker, session=flags.session_present)
        if reconnected and not flags.session_present:
            # The broker restarted without our session (no persistence, or its file lost it): whatever it had queued
            # for us is gone, and until we subscribe again below it acknowledges and discards what devices publish.
            event(log, "ingest_session_lost", logging.WARNING, broker=broker, client_id=self._client_id)
        # The session keeps the subscription, but a broker that lost its state would not: subscribe every time. A
        # session from a run that took other kinds (or took them unshared) drops those filters, or it would keep
        # receiving copies of what the telemetry workers store.
        # No kinds: take nothing new, store what the session still holds (a retired worker's, see fleet.ingest.workers).
        taken = [self.filter(kind) for kind in self.kinds]
        if taken:
            client.subscribe([(f, 1) for f in taken])
        stale = [self._filter(kind, share) for kind in protocol.DEVICE_PUBLISHED for share in (None, self.share)]
        if dropped := sorted({f for f in stale if f not in taken}):
            client.unsubscribe(dropped)
        if not taken:
            self._ready.set()

    def filter(self, kind: protocol.Kind) -> str:
        """The topic filter this ingest subscribes for one kind: shared (``$share/GROUP/...``) if it has a group."""
        return self._filter(kind, self.share)

    def _filter(self, kind: protocol.Kind, share: str | None) -> str:
        plain = protocol.subscription(self.prefix, kind)
        return f"$share/{share}/{plain}" if share else plain

    def _on_probe(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """A probe (:func:`probe_topic`): counted and acked, never stored."""
        client.ack(msg.mid, msg.qos)
        with self._stats_lock:
            self._probes += 1
        event(log, "ingest_probe_received", share=self.share)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        event(log, "ingest_connect_failed", logging.WARNING, broker=f"{self.address.host}:{self.address.port}")

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            event(log, "ingest_subscribe_refused", logging.ERROR, reasons=refused)
            return
        self._ready.set()
        event(log, "ingest_subscribed", prefix=self.prefix)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._ready.clear()
        with self._stats_lock:
            self._connected_at = None
        if not self._closing.is_set():
            event(log, "ingest_disconnected", logging.WARNING, reason=str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Add the message to the open batch; commit the batch once the socket holds no more (or it is full)."""
        if self._closing.is_set():
            return  # unacked: redelivered to the next session
        try:
            topic: str | None = msg.topic
        except UnicodeDecodeError:  # paho hands such topics over and raises on access
            topic = None
        with self._batch_lock:
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending.append(Received(topic, msg.payload, msg.mid, msg.qos))
            if len(self._pending) < self.batch_max and self._more_to_read():
                return
            self._commit(self._admit(self._take()))

    def _more_to_read(self) -> bool:
        """Whether the socket already holds more bytes: then the batch waits for them (one syscall, ~1 µs)."""
        sock = self._client.socket()
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, which select() cannot see
        if pending is not None and pending():
            return True
        try:
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError, TypeError):  # closed under us: commit what we have
            return False

    def _take(self) -> list[Received]:
        batch, self._pending = self._pending, []
        with self._stats_lock:  # counted per batch, not per message: one lock less on the hot path
            self._received += len(batch)
        return batch

    def _admit(self, batch: list[Received]) -> list[Item]:
        """Decode a batch (:func:`fleet.ingest.decode.admit`); its rejects are counted and logged here."""
        prefix = self.prefix
        items = [admit(prefix, received) for received in batch]
        for item in items:
            if item.kind is None:
                self._count_reject(item.message)  # type: ignore[arg-type]
        return items

    def _count_reject(self, reject: Reject) -> None:
        with self._stats_lock:
            self._rejected[reject.reason] += 1
        event(
            log,
            "ingest_reject",
            logging.WARNING,
            topic=reject.topic,
            reason=reject.reason,
            detail=reject.detail,
            size=reject.size,
        )

    # -- sweeper thread ---------------------------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        """Commit a batch left open (its last message was followed by a packet that was not a message), and send the
        acknowledgements gathered for devices once they are ``_ACK_DELAY_S`` old."""
        while not self._closing.wait(_SWEEP_S):
            with self._batch_lock:
                if self._pending and time.monotonic() - self._pending_since >= _SWEEP_S:
                    self._commit(self._admit(self._take()))
                if self._unsent_acks and time.monotonic() - self._acks_since >= _ACK_DELAY_S:
                    self._send_acks()

    def _commit(self, batch: list[Item]) -> None:
        """Store a batch, then ack it; never give up on a message while the store itself fails.

        When the store itself fails (:class:`StoreUnavailable`: disk full, I/O error, locked), the whole batch waits
        and is tried again, nothing of it acked before the commit. Any other refusal is about the data: the batch is
        split, so one unstorable message cannot block the stream, and a single message the store refuses is recorded
        as an "unstorable" reject (if recording that works).
        """
        delay = 0.1
        while (error := self._store_and_ack(batch)) is not None:
            if not isinstance(error, StoreUnavailable):
                if len(batch) > 1:
                    for item in batch:
                        self._commit([item])
                    return
                replacement = unstorable(batch[0], error)
                if self._store_and_ack([replacement]) is None:
                    self._count_reject(replacement.message)  # type: ignore[arg-type]
                    return
            if self._closing.wait(delay):
                return  # nothing acked: the broker keeps the batch for the next session
            delay = min(delay * 2, _RETRY_MAX_S)

    def _confirm(self, *stored: list[dict[str, Any]]) -> None:
        """Note for each device which of its windows and events a committed batch holds (a duplicate is stored too,
        or the device would send it forever); :meth:`_send_acks` tells the devices. Under ``_batch_lock``."""
        unsent = self._unsent_acks
        if not unsent:
            self._acks_since = time.monotonic()
        for messages in stored:
            for message in messages:
                key = (message["device_id"], message["boot_id"])
                seqs = unsent.get(key)
                if seqs is None:
                    unsent[key] = [message["seq"]]
                else:
                    seqs.append(message["seq"])

    def _send_acks(self) -> None:
        """Publish what :meth:`_confirm` noted: one acknowledgement per device and boot, QoS 1, on the device's
        ``ack`` topic; only then does the device delete those messages from its outbox. Under ``_batch_lock``."""
        unsent, self._unsent_acks = self._unsent_acks, {}
        sent = size = 0
        publish, prefix = self._client.publish, self.prefix
        for (device_id, boot_id), seqs in unsent.items():
            topic = f"{prefix}/{device_id}/{protocol.Kind.ACK.value}"  # the id was checked when the message was decoded
            for payload in protocol.encode_ack(device_id, boot_id, seqs):
                publish(topic, payload, qos=1)
                sent, size = sent + 1, size + len(payload)
        with self._stats_lock:
            self._acks_sent += sent
            self._ack_bytes += size

    def _store_and_ack(self, batch: list[Item]) -> Exception | None:
        """Write one batch in one transaction and ack its messages; the store's exception if it refused."""
        status, telemetry, events, rejects, payloads = split(batch)
        conflicts: list[Reject] = []
        try:
            stored = self.store.write_batch(status, telemetry, events, rejects, payloads=payloads, conflicts=conflicts)
        except Exception as exc:  # nothing is acked yet, so the broker still holds every message of the batch
            event(log, "ingest_write_failed", logging.ERROR, error=repr(exc), batch=len(batch))
            return exc
        for item in batch:
            self._client.ack(item.mid, item.qos)
        self._confirm(telemetry, events)
        with self._stats_lock:
            self._batches += 1
            self._stored += stored
            self._duplicates += len(telemetry) + len(events) - stored - len(conflicts)
            self._rejected.update(c.reason for c in conflicts)
        return None
