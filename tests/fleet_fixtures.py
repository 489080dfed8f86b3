"""A real fleet for device-side tests: a signed TUF repository served over HTTP on loopback, the director's signing
of desired states, their delivery as retained messages on a real broker, and a tap on what a device reports."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from securesystemslib.signer import Signer

from agent.broker_address import BrokerAddress
from agent.protocol import DEFAULT_PREFIX, Kind, topic
from fleet import views
from fleet.broker import free_port, wait_for_port
from fleet.store import Store
from fleet.trust.director import sign_desired
from fleet.trust.releases import ReleaseInfo
from fleet.trust.repo_server import RepoServer
from fleet.trust.repository import Repository


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until ``condition()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def device_view(store: Store, device_id: str) -> dict[str, Any] | None:
    """A device as `fleet devices show --json` prints it (no desired state), or None if the fleet does not know it."""
    detail = store.device(device_id)
    return None if detail is None else views.device_detail_json(detail, None)


def new_device_id(prefix: str = "dev") -> str:
    """Unique per test: retained desired states on the shared broker never leak into another test."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Fleet:
    """One fleet's repository and director key, served on loopback."""

    repo: Repository
    server: RepoServer

    @classmethod
    def create(cls, home: Path) -> Fleet:
        Repository.init(home)
        repo = Repository(home)
        return cls(repo, RepoServer(repo.dir).start())

    @property
    def director(self) -> Signer:
        return self.repo.keys.signer("director")

    def publish(self, model_file: Path, version: str, card: Mapping[str, Any], **options: Any) -> ReleaseInfo:
        return self.repo.publish(model_file, "digits", version, card, **options)

    def publish_like(self, model_file: Path, version: str, card: Mapping[str, Any], like: str) -> ReleaseInfo:
        """Publish a file made from ``like`` (a file ``card`` describes) with that file's facts and expected smoke
        outputs in its card, under its own name, length and hash."""
        data, name = model_file.read_bytes(), model_file.name
        card = json.loads(json.dumps(card))
        card["files"][name] = {**card["files"][like], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        card["smoke_test"]["expected"][name] = card["smoke_test"]["expected"][like]
        return self.publish(model_file, version, card)

    def stored_file(self, release: ReleaseInfo) -> Path:
        """Where the repository keeps a release's bytes (what its server sends)."""
        name = release.target.rsplit("/", 1)[-1]
        return self.repo.targets_dir / "models" / release.name / release.version / f"{release.sha256}.{name}"

    def tamper(self, release: ReleaseInfo) -> None:
        """Flip one byte in the middle of a release's stored bytes, as an attacker on the server would."""
        stored = self.stored_file(release)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))

    def desired(
        self,
        device_id: str,
        seq: int,
        *releases: ReleaseInfo,
        issued: float | None = None,
        expires: float | None = None,
        signer: Signer | None = None,
    ) -> bytes:
        issued = time.time() if issued is None else issued
        expires = issued + 3600 if expires is None else expires
        models = {r.name: r.desired_entry() for r in releases}
        return sign_desired(signer or self.director, device_id, seq, models, "campaign-1", issued, expires)

    def enroll(self, folder: Path) -> tuple[Path, Path]:
        """What a device is provisioned with: the TUF root and the director's public key, as files."""
        folder.mkdir(parents=True, exist_ok=True)
        root, director = folder / "root.json", folder / "director.json"
        root.write_bytes(self.repo.trusted_root())
        director.write_bytes(self.repo.keys.public_key_json("director"))
        return root, director

    def stop(self) -> None:
        self.server.stop()


def _client(broker_url: str, client_id: str) -> mqtt.Client:
    address = BrokerAddress.parse(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect(address.host, address.port, keepalive=30)
    return client


def deliver(broker_url: str, device_id: str, payload: bytes) -> None:
    """Publish a desired state as the fleet does: retained, QoS 1, on the device's desired topic."""
    client = _client(broker_url, f"director-{uuid.uuid4().hex[:8]}")
    client.loop_start()
    try:
        info = client.publish(topic(DEFAULT_PREFIX, device_id, Kind.DESIRED), payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def retained_birth(broker_url: str, device_id: str) -> dict[str, Any]:
    """The device's retained online status, as a fleet subscribing now receives it."""
    got: list[dict[str, Any]] = []
    client = _client(broker_url, f"reader-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda _c, _u, message: got.append(json.loads(message.payload))
    client.subscribe(topic(DEFAULT_PREFIX, device_id, Kind.STATUS), qos=1)
    client.loop_start()
    try:
        return wait_for(lambda: next((m for m in got if m.get("state") == "online"), None), 10, "the retained birth")
    finally:
        client.disconnect()
        client.loop_stop()


class EventTap:
    """Every event a device publishes, decoded, in arrival order: what the fleet's ingest would see."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = _client(broker_url, f"tap-{uuid.uuid4().hex[:8]}")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.subscribe(topic(DEFAULT_PREFIX, device_id, Kind.EVENTS), qos=1)
        self._client.loop_start()
        assert self._subscribed.wait(10), "the event tap could not subscribe"

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        decoded = json.loads(message.payload)
        key = (decoded["boot_id"], decoded["seq"])
        with self._lock:
            if key not in self._seen:  # a resend after a cut: the fleet drops it the same way
                self._seen.add(key)
                self.events.append(decoded)

    def of(self, *types: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["type"] in types]

    def states(self) -> list[str]:
        """The install states the device went through, in order."""
        return [e["detail"]["state"] for e in self.of("install_state")]

    def wait_for(self, type_: str, timeout: float = 30.0, **detail: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            matching = [e for e in self.of(type_) if all(e["detail"].get(k) == v for k, v in detail.items())]
            return matching[0] if matching else None

        return wait_for(found, timeout, f"event {type_} {detail or ''}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A real full disk: a small tmpfs (64 KiB unless ``size``) mounted at ``path`` (root only; the test is skipped,
    saying why, otherwise)."""
    path.mkdir(parents=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip(f"mounting a {size} tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsBroker:
    """A nats-server of the test's own speaking MQTT 3.1.1 (which needs JetStream and a server name): a second broker,
    one that grants ``$share/...`` subscriptions and never delivers on them. Restarts keep its ports and store."""

    def __init__(self, workdir: Path) -> None:
        if not Path(NATS_SERVER).exists():
            pytest.skip("nats-server is not installed (apt-get install nats-server): the second broker is untested")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            f"server_name: edgefleet_test\nlisten: 127.0.0.1:{free_port()}\n"
            f'jetstream {{ store_dir: "{workdir / "jetstream"}" }}\nmqtt {{ listen: 127.0.0.1:{self.port} }}\n'
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with (self.workdir / "nats.log").open("a") as log:
            self._proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for_port("127.0.0.1", self.port, timeout=30)

    def kill(self) -> None:
        """SIGKILL: no goodbye to any client."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(20)
            self._proc = None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(20)
            self._proc = None


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``folder`` with one file until ``leave`` bytes at most are free; returns the file (delete
    it to give the space back)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        while (free := shutil.disk_usage(folder).free) > leave:
            try:
                f.write(b"\0" * max(1, min(free - leave, 1 << 20)))
            except OSError:
                break
    return filler
