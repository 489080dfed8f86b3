"""The ingest's pure half: topics and payloads in, decoded messages or rejects out, with no broker and no store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_ingest import birth, event_message, window

from agent import protocol
from agent.protocol import Kind
from fleet.ingest.decode import Item, Received, admit, split, unstorable
from fleet.store.rows import Reject

PREFIX = "edgefleet/v1"


def received(topic: str | None, payload: bytes, mid: int = 7) -> Received:
    return Received(topic, payload, mid, 1)


def test_a_good_window_is_decoded_with_its_bytes_and_what_acks_it() -> None:
    payload = protocol.encode(Kind.TELEMETRY, window("pi-1", 3))
    item = admit(PREFIX, received(f"{PREFIX}/pi-1/telemetry", payload, mid=42))
    assert (item.kind, item.mid, item.qos, item.topic, item.payload) == (
        Kind.TELEMETRY,
        42,
        1,
        f"{PREFIX}/pi-1/telemetry",
        payload,
    )
    assert isinstance(item.message, dict)
    assert (item.message["device_id"], item.message["seq"]) == ("pi-1", 3)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        (None, b"{}", "bad_topic"),  # not UTF-8
        ("other/v1/pi-1/telemetry", b"{}", "bad_topic"),  # outside the prefix
        (f"{PREFIX}/pi-1/desired", b"{}", "bad_topic"),  # a kind devices do not publish
        (f"{PREFIX}/pi 1/telemetry", b"{}", "bad_device_id"),
        (f"{PREFIX}/pi-1/telemetry", b"{", "not_json"),
        (f"{PREFIX}/pi-1/telemetry", json.dumps(window("pi-2", 0)).encode(), "device_mismatch"),
        (f"{PREFIX}/pi-1/events", json.dumps({**event_message("pi-1", 0), "v": 99}).encode(), "schema_version"),
    ],
)
def test_a_message_that_breaks_the_contract_becomes_a_reject_with_its_reason_topic_and_size(
    topic: str | None, payload: bytes, reason: str
) -> None:
    item = admit(PREFIX, received(topic, payload))
    assert item.kind is None
    assert isinstance(item.message, Reject)
    assert (item.message.reason, item.message.size) == (reason, len(payload))
    assert item.message.topic == (topic if topic is not None else "<not UTF-8>")
    assert item.mid == 7  # still acked once the reject is recorded


def test_a_bug_in_decoding_costs_one_message_not_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kind: Kind, payload: bytes) -> dict[str, object]:
        raise KeyError("boom")

    monkeypatch.setattr(protocol, "decode", broken)
    item = admit(PREFIX, received(f"{PREFIX}/pi-1/status", b"{}"))
    assert isinstance(item.message, Reject) and item.message.reason == "internal_error"


def test_split_groups_a_batch_as_the_store_takes_it_and_unstorable_replaces_a_message() -> None:
    def good(kind: Kind, message: dict[str, object]) -> Item:
        return admit(PREFIX, received(f"{PREFIX}/pi-1/{kind.value}", protocol.encode(kind, message)))

    w0, w1 = good(Kind.TELEMETRY, window("pi-1", 0)), good(Kind.TELEMETRY, window("pi-1", 1))
    status, event = good(Kind.STATUS, birth("pi-1")), good(Kind.EVENTS, event_message("pi-1", 0))
    bad = admit(PREFIX, received(f"{PREFIX}/pi-1/telemetry", b"nope"))
    statuses, windows, events, rejects, payloads = split([w0, bad, status, w1, event])
    assert statuses == [status.message] and events == [event.message] and rejects == [bad.message]
    assert windows == [w0.message, w1.message]
    assert payloads == [w0.payload, w1.payload]  # the windows' own bytes, in the windows' order

    replaced = unstorable(w0, ValueError("no"))
    assert replaced.kind is None and replaced.mid == w0.mid
    assert replaced.message == Reject("unstorable", w0.topic, "ValueError('no')", len(w0.payload))


def test_decoding_does_not_load_the_mqtt_client() -> None:
    code = "import sys, fleet.ingest.decode; print('paho' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
