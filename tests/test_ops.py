"""The fleet's use cases called as a library, as the campaign controller and the HTTP API will call them: every rule
holds and every change is audited without the CLI. Real repository, real SQLite store, real mosquitto."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import paho.mqtt.subscribe as subscribe
import pytest

from agent import protocol
from agent.broker_address import BrokerAddress
from agent.protocol import Kind
from agent.update.desired import load_director_key, verify_desired
from fleet.broker import MosquittoBroker
from fleet.errors import FleetError, NotFound
from fleet.home import init_home
from fleet.ops import assign, releases
from fleet.ops.enroll import BundleSettings, enroll
from fleet.publisher import DesiredPublisher
from fleet.store import Store, open_store
from fleet.trust.repository import Repository

ACTOR = "controller"


@pytest.fixture
def fleet(tmp_path: Path, example_model: Callable[[str], Path]) -> Iterator[tuple[Store, Repository]]:
    """A fleet home with digits 1.0.0 (onnx) and 1.1.0 (tflite) published through the library."""
    home = init_home(tmp_path / "home")
    Repository.init(home.root)
    repo = Repository(home.root)
    store = open_store(home.db)
    digits = example_model("good")
    card = releases.read_card(digits / "card.json")
    releases.publish(repo, store, digits / "int8.onnx", "digits", "1.0.0", card, actor=ACTOR)
    releases.publish(repo, store, digits / "int8.tflite", "digits", "1.1.0", card, actor=ACTOR)
    yield store, repo
    store.close()


class Connections:
    """Counts broker connections opened by an operation, each a real :class:`DesiredPublisher`."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.opened = 0

    def __call__(self) -> AbstractContextManager[DesiredPublisher]:
        self.opened += 1
        return DesiredPublisher(self.broker_url, timeout=10)


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


def birth(device_id: str, machine: str = "aarch64", runtimes: tuple[str, ...] = ("onnxruntime", "tflite")) -> Any:
    message = {"v": protocol.SCHEMA_VERSION, "device_id": device_id, "state": "online", "boot_id": "b" * 32,
               "hardware": {"machine": machine}, "runtimes": list(runtimes), "models": {}}  # fmt: skip
    return protocol.decode(Kind.STATUS, protocol.encode(Kind.STATUS, message))


def audited(store: Store, action: str) -> list[str]:
    return [e.subject for e in store.audit() if e.action == action]


def test_the_library_refuses_a_revoked_release_before_it_connects_or_records_anything(
    fleet: tuple[Store, Repository], broker: MosquittoBroker
) -> None:
    store, repo = fleet
    device = new_device()
    store.write_batch(status=[birth(device)])
    info, changed = releases.revoke(repo, store, "digits", "1.0.0", actor=ACTOR)
    assert (changed, info.revoked) == (True, True)
    connect = Connections(broker.url)

    with pytest.raises(FleetError) as refused:
        assign.assign(store, repo, connect, [device], "digits", "1.0.0", actor=ACTOR)

    assert refused.value.reason == "revoked"
    assert "publish a new version" in refused.value.message()
    assert connect.opened == 0
    assert store.desired(device) is None
    assert audited(store, "assign") == []
    assert audited(store, "revoke") == ["digits:1.0.0"]


@pytest.mark.parametrize(
    ("machine", "runtimes", "says"),
    [
        ("riscv64", ("onnxruntime", "tflite"), "is riscv64"),
        ("aarch64", ("onnxruntime",), "has no tflite runtime"),
    ],
    ids=["wrong-machine", "missing-runtime"],
)
def test_the_library_refuses_a_release_a_known_device_cannot_run(
    fleet: tuple[Store, Repository], broker: MosquittoBroker, machine: str, runtimes: tuple[str, ...], says: str
) -> None:
    store, repo = fleet
    fits, misfit = new_device(), new_device()
    store.write_batch(status=[birth(fits), birth(misfit, machine, runtimes)])
    connect = Connections(broker.url)

    with pytest.raises(FleetError) as refused:
        assign.assign(store, repo, connect, [fits, misfit], "digits", "1.1.0", actor=ACTOR)

    assert refused.value.reason == "incompatible"
    assert says in refused.value.detail
    assert connect.opened == 0
    assert (store.desired(fits), store.desired(misfit)) == (None, None)


def test_the_library_refuses_an_unknown_device_unless_asked_to_pre_provision_it(
    fleet: tuple[Store, Repository], broker: MosquittoBroker
) -> None:
    store, repo = fleet
    typo = new_device()
    connect = Connections(broker.url)

    with pytest.raises(FleetError) as refused:
        assign.assign(store, repo, connect, [typo], "digits", "1.1.0", actor=ACTOR)
    assert refused.value.reason == "unknown_device"
    assert connect.opened == 0

    (state,) = assign.assign(store, repo, connect, [typo], "digits", "1.1.0", actor=ACTOR, allow_unknown=True)
    assert (state.device_id, state.seq) == (typo, 1)


def test_an_unknown_release_is_not_found(fleet: tuple[Store, Repository], broker: MosquittoBroker) -> None:
    store, repo = fleet
    with pytest.raises(NotFound) as missing:
        assign.assign(store, repo, Connections(broker.url), [new_device()], "digits", "9.9", actor=ACTOR)
    assert (missing.value.reason, missing.value.exit_code) == ("unknown_release", 3)


def test_an_enrolled_device_is_assigned_and_the_retained_state_verifies_on_the_device_side(
    fleet: tuple[Store, Repository], broker: MosquittoBroker, tmp_path: Path
) -> None:
    store, repo = fleet
    device = new_device()
    settings = BundleSettings(broker_url=broker.url, repo_url="http://127.0.0.1:1/", listen="unix:/run/x/infer.sock")
    bundle = enroll(store, repo, device, tmp_path / "bundle", settings, actor=ACTOR)
    assert "api" in (tmp_path / "bundle" / "agent.toml").read_text()
    assert bundle.summary["device_id"] == device

    (state,) = assign.assign(store, repo, Connections(broker.url), [device], "digits", "1.1.0", actor=ACTOR,
                             campaign="wave-1")  # fmt: skip

    address = BrokerAddress.parse(broker.url)
    topic = protocol.topic(protocol.DEFAULT_PREFIX, device, Kind.DESIRED)
    message = subscribe.simple(topic, hostname=address.host, port=address.port, retained=True, msg_count=1)
    director = load_director_key(repo.keys.public_key_json("director"))
    verified = verify_desired(message.payload, director, device, last_seq=0, now=state.issued)
    assert (verified.seq, verified.campaign, verified.models["digits"].version) == (1, "wave-1", "1.1.0")
    assert store.desired(device) is not None
    assert audited(store, "enroll") == [device]
    assert audited(store, "assign") == [device]
    assert store.verify_audit().ok


def test_a_refused_publish_leaves_the_repository_and_the_audit_log_as_they_were(
    fleet: tuple[Store, Repository], tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    store, repo = fleet
    digits = example_model("good")
    broken = tmp_path / "int8.onnx"
    broken.write_bytes((digits / "int8.onnx").read_bytes()[:1000])
    before = repo.releases()

    with pytest.raises(FleetError) as refused:
        releases.publish(repo, store, broken, "digits", "2.0.0", releases.read_card(digits / "card.json"), actor=ACTOR)

    assert refused.value.reason == "model_does_not_load"
    assert repo.releases() == before
    assert audited(store, "publish") == ["digits:1.0.0", "digits:1.1.0"]
