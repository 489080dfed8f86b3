"""Releases, desired state, enrollment and the audit log through the `fleet` CLI.

Everything is real: keys and TUF metadata signed by python-tuf, the project's digits models, SQLite, a mosquitto
broker, `fleet serve` as a process serving the repository over HTTP, and paho clients standing in for devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import queue
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as mqtt
import pytest
import sqlite_utils
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

import agent.config
from agent import protocol
from agent.broker_address import BrokerAddress
from agent.protocol import Kind
from agent.update.desired import DesiredStateError, load_director_key, verify_desired
from fleet import views
from fleet.broker import MosquittoBroker, free_port
from fleet.cli import main
from fleet.store import open_store
from fleet.store.audit import audit_hash
from fleet.store.schema import MIGRATIONS, SCHEMA_VERSION
from fleet.trust.repository import ExpiryPolicy, Repository

FLEET = Path(sys.executable).parent / "fleet"
BOOT = "d" * 32


def fleet(*args: str | Path) -> Result:
    """Run the CLI in-process; a crash (an exception the CLI did not turn into an exit code) fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok_json(*args: str | Path) -> Any:
    result = fleet(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def publish(home: Path, model_file: Path, ref: str) -> None:
    name, version = ref.split(":")
    result = fleet("release", "publish", model_file, "--name", name, "--version", version, "--home", home)
    assert result.exit_code == 0, result.output


def device_name(prefix: str) -> str:
    """A device id of the test's own: the session broker keeps retained messages between tests."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def repo_files(home: Path) -> dict[str, bytes]:
    """Every file a client can fetch from the repository, by path."""
    root = home / "repo"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for folder in ("metadata", "targets")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


class Subscriber:
    """A paho client subscribed to one topic, collecting what arrives (retained messages first)."""

    def __init__(self, url: str, topic: str) -> None:
        address = BrokerAddress.parse(url)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}")
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(10), f"no SUBACK for {topic}"

    def next(self, timeout: float = 10.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def desired_payload(url: str, device_id: str) -> mqtt.MQTTMessage:
    """What a device connecting now gets on its desired topic: the retained state."""
    sub = Subscriber(url, protocol.topic(protocol.DEFAULT_PREFIX, device_id, Kind.DESIRED))
    try:
        return sub.next()
    finally:
        sub.close()


def publish_as_device(url: str, messages: list[tuple[Kind, dict[str, Any]]]) -> None:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-device-{uuid.uuid4().hex[:8]}")
    client.connect(address.host, address.port)
    client.loop_start()
    for kind, message in messages:
        topic = protocol.topic(protocol.DEFAULT_PREFIX, message["device_id"], kind)
        client.publish(topic, protocol.encode(kind, message), qos=1, retain=kind is Kind.STATUS).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def birth(device_id: str, releases: dict[str, str], machine: str = "aarch64") -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "state": "online",
        "boot_id": BOOT,
        "agent_version": "0.4.0",
        "hardware": {"machine": machine},
        "runtimes": ["onnxruntime", "tflite"],
        "models": {name: {"release": release, "runtime": "onnxruntime"} for name, release in releases.items()},
    }


def install_event(device_id: str, seq: int, kind: str, release: str, reason: str | None = None) -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "boot_id": BOOT,
        "seq": seq,
        "ts": time.time(),
        "type": kind,
        "model": "digits",
        "detail": {"state": kind.removeprefix("install_").upper(), "release": release, "reason": reason, "seq": 1},
    }


@pytest.fixture(scope="module")
def digits(example_model: Callable[[str], Path]) -> Path:
    return example_model("good")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    assert fleet("init", "--home", home).exit_code == 0
    return home


@pytest.fixture
def published(home: Path, digits: Path) -> Path:
    """A home with digits 1.0.0 (int8.onnx) and 1.1.0 (int8.tflite), and a second model, `other` 1."""
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    publish(home, digits / "int8.tflite", "digits:1.1.0")
    publish(home, digits / "float.onnx", "other:1")
    return home


# --------------------------------------------------------------------------------------------------------------
# init


def test_init_creates_owner_only_keys_and_the_repository_and_a_second_run_keeps_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = ok_json("init", "--home", home, "--root-keys", "3", "--root-threshold", "2")
    assert {str(home / "keys"), str(home / "repo")} <= set(made["created"])
    assert made["repository"]["created"] is True
    assert made["root"] == {"threshold": 2, "keys": 3}
    assert made["keys"]["root"]["placement"].startswith("offline")
    assert all(made["keys"][role]["placement"].startswith("online") for role in ("snapshot", "timestamp", "director"))
    key_files = sorted((home / "keys").iterdir())
    assert len(key_files) == 3 + 4
    assert {p.stat().st_mode & 0o777 for p in key_files} == {0o600}
    assert (home / "keys").stat().st_mode & 0o777 == 0o700
    before = {p: p.read_bytes() for p in (*key_files, home / "repo/metadata/root.json")}

    again = fleet("init", "--home", home)
    assert again.exit_code == 0
    assert "up to date" in again.stdout
    assert "kept the existing keys and repository (root: 3 keys, threshold 2)" in again.stdout
    assert "move to offline storage" in again.stdout
    assert {p: p.read_bytes() for p in before} == before

    rotate = fleet("init", "--home", home, "--root-keys", "1")
    assert rotate.exit_code == 1
    assert "does not rotate root keys" in rotate.output
    assert fleet("init", "--home", tmp_path / "h2", "--root-keys", "1", "--root-threshold", "2").exit_code == 2


def test_a_database_of_the_previous_schema_gains_the_audit_and_desired_tables(tmp_path: Path) -> None:
    db = sqlite_utils.Database(tmp_path / "fleet.db")
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db["events"].insert({"device_id": "pi-1", "boot_id": BOOT, "seq": 0, "ts": 1.0, "type": "install_committed",
                         "model": "digits", "detail": '{"release":"digits:1"}', "received_at": 1.0})  # fmt: skip
    db.close()
    store = open_store(tmp_path / "fleet.db")
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert views.install_json(store.last_install("pi-1")) == {
            "type": "install_committed", "model": "digits", "release": "digits:1", "reason": None,
            "desired_seq": None, "ts": "1970-01-01T00:00:01.000Z",
        }  # fmt: skip
        store.append_audit("tester", "publish", "digits:1", {"release": 1})
        assert store.verify_audit().ok
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------------------
# publish, list, show, revoke


def test_publishing_two_versions_counts_releases_and_list_and_show_describe_them(home: Path, digits: Path) -> None:
    first = ok_json(
        "release", "publish", digits / "int8.onnx", "--name", "digits", "--version", "1.0.0", "--home", home
    )
    second = ok_json(
        "release", "publish", digits / "int8.tflite", "--name", "digits", "--version", "1.1.0",
        "--card", digits / "card.json", "--machine", "aarch64", "--source-commit", "abc123", "--home", home,
    )  # fmt: skip
    assert (first["release"], second["release"]) == (1, 2)
    assert (first["runtime"], second["runtime"]) == ("onnxruntime", "tflite")
    assert first["sha256"] == hashlib.sha256((digits / "int8.onnx").read_bytes()).hexdigest()

    listed = ok_json("release", "list", "--home", home)
    assert [(r["name"], r["version"], r["release"], r["revoked"]) for r in listed] == [
        ("digits", "1.0.0", 1, False),
        ("digits", "1.1.0", 2, False),
    ]
    shown = ok_json("release", "show", "digits:1.1.0", "--home", home)
    assert shown["hardware"] == {"machines": ["aarch64"]}
    assert shown["card"]["provenance"]["source_commit"] == "abc123"
    assert shown["target"] == "models/digits/1.1.0/int8.tflite"
    human = fleet("release", "list", "--home", home).stdout
    assert "digits:1.0.0" in human and "digits:1.1.0" in human
    audit = ok_json("audit", "--home", home)["entries"]
    assert [(a["action"], a["subject"], a["detail"]["release"]) for a in audit] == [
        ("publish", "digits:1.0.0", 1),
        ("publish", "digits:1.1.0", 2),
    ]


#: Each way of breaking a publish gets the home, the models and a scratch folder, and returns publish's arguments.
MakeBadPublish = Callable[[Path, Path, Path], list[str | Path]]


def _duplicate(digits: Path, tmp: Path, home: Path) -> list[str | Path]:
    return [digits / "int8.tflite", "--name", "digits", "--version", "1.0.0"]


def _corrupt(digits: Path, tmp: Path, home: Path) -> list[str | Path]:
    (tmp / "corrupt").mkdir()
    data = (digits / "int8.onnx").read_bytes()
    (tmp / "corrupt" / "int8.onnx").write_bytes(data[: len(data) // 2])
    shutil.copy(digits / "card.json", tmp / "corrupt")
    return [tmp / "corrupt" / "int8.onnx", "--name", "digits", "--version", "2.0.0"]


def test_a_corrupt_model_is_refused_in_one_line_with_one_fix(home: Path, digits: Path, tmp_path: Path) -> None:
    result = fleet("release", "publish", *_corrupt(digits, tmp_path, home), "--home", home)

    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # no log line repeating it
    assert lines[0].startswith("Error: ") and "does not load with onnxruntime: " in lines[0]
    assert lines[0].endswith("; export the model again. Nothing was changed.")
    assert "download the release again" not in lines[0]  # the device's fix, not the publisher's


def _large_model(folder: Path, card: Path, megabytes: int) -> Path:
    """A valid ONNX model of about ``megabytes`` MB (a large constant added to the input) and its card."""
    n = megabytes * 2**20 // 4
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "bias"], ["output"])],
        "large",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.ones((1, n), np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir()
    onnx.save(model, folder / "large.onnx")
    described = json.loads(card.read_text())
    described.pop("files", None)  # the card of another file: let it describe none
    (folder / "card.json").write_text(json.dumps(described))
    return folder / "large.onnx"


def test_publishing_a_large_model_shows_progress_on_a_terminal_only(home: Path, digits: Path, tmp_path: Path) -> None:
    model = _large_model(tmp_path / "large", digits / "card.json", 24)
    command = [FLEET, "release", "publish", model, "--name", "large", "--home", home]
    master, terminal = pty.openpty()
    try:
        done = subprocess.run([*command, "--version", "1"], stdout=subprocess.PIPE, stderr=terminal, timeout=120)
        os.close(terminal)
        shown = b""
        while chunk := _read_some(master):
            shown += chunk
    finally:
        os.close(master)
    assert done.returncode == 0
    assert b"publishing large.onnx" in shown and b"100%" in shown, shown[-500:]
    assert done.stdout.startswith(b"published large:1")

    piped = subprocess.run([*command, "--version", "2"], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == "", "no progress bar in a log"


def _read_some(fd: int) -> bytes:
    """What a terminal holds now, or b"" once its writer closed it (Linux reports EIO then)."""
    if not select.select([fd], [], [], 1.0)[0]:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _unknown_format(digits: Path, tmp: Path, home: Path) -> list[str | Path]:
    shutil.copy(digits / "int8.onnx", tmp / "model.pt")
    return [tmp / "model.pt", "--name", "digits", "--version", "2.0.0", "--card", digits / "card.json"]


def _missing_card(digits: Path, tmp: Path, home: Path) -> list[str | Path]:
    (tmp / "nocard").mkdir()
    shutil.copy(digits / "int8.onnx", tmp / "nocard")
    return [tmp / "nocard" / "int8.onnx", "--name", "digits", "--version", "2.0.0"]


def _missing_key(digits: Path, tmp: Path, home: Path) -> list[str | Path]:
    (home / "keys" / "targets-1.pem").rename(tmp / "targets-1.pem")
    return [digits / "int8.tflite", "--name", "digits", "--version", "2.0.0"]


@pytest.mark.parametrize(
    ("make", "says"),
    [
        pytest.param(_duplicate, "publish under a new --version", id="duplicate-version"),
        pytest.param(_corrupt, "does not load with onnxruntime: ", id="corrupt-model"),
        pytest.param(_unknown_format, "export the model as .onnx or .tflite", id="unknown-extension"),
        pytest.param(_missing_card, "pass --card PATH", id="missing-card"),
        pytest.param(_missing_key, "restore the key file from your backup", id="missing-key"),
    ],
)
def test_a_refused_publish_names_the_fix_exits_1_and_changes_nothing(
    make: MakeBadPublish, says: str, home: Path, digits: Path, tmp_path: Path
) -> None:
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    args = make(digits, tmp_path, home)
    before = repo_files(home)
    audit_before = ok_json("audit", "--home", home)["entries"]

    result = fleet("release", "publish", *args, "--home", home)

    assert result.exit_code == 1, result.output
    assert says in result.output
    assert repo_files(home) == before
    assert ok_json("audit", "--home", home)["entries"] == audit_before


def test_unknown_releases_exit_3_and_malformed_references_are_usage_errors(published: Path) -> None:
    for command in (["release", "show", "digits:9.9"], ["release", "revoke", "nope:1"]):
        result = fleet(*command, "--home", published)
        assert result.exit_code == 3
        assert "see `fleet release list`" in result.output
    assert fleet("release", "show", "digits", "--home", published).exit_code == 2
    no_home = fleet("release", "list", "--home", published.parent / "missing")
    assert no_home.exit_code == 1
    assert "fleet init" in no_home.output


def test_revoke_raises_min_release_and_a_second_revoke_changes_nothing(published: Path) -> None:
    before = repo_files(published)
    revoked = ok_json("release", "revoke", "digits:1.0.0", "--home", published)
    assert (revoked["min_release"], revoked["revoked"], revoked["changed"]) == (2, True, True)
    releases = {f"{r['name']}:{r['version']}": r for r in ok_json("release", "list", "--home", published)}
    assert releases["digits:1.0.0"]["revoked"] and not releases["digits:1.1.0"]["revoked"]
    assert releases["digits:1.1.0"]["min_release"] == 2
    assert releases["other:1"]["min_release"] == 1
    assert repo_files(published) != before

    again = ok_json("release", "revoke", "digits:1.0.0", "--home", published)
    assert again["changed"] is False
    assert [a["action"] for a in ok_json("audit", "--home", published)["entries"]].count("revoke") == 1


# --------------------------------------------------------------------------------------------------------------
# audit


def test_the_audit_chain_verifies_and_finds_an_edited_or_removed_row(published: Path) -> None:
    ok_json("release", "revoke", "digits:1.0.0", "--home", published)
    assert ok_json("audit", "--home", published)["verify"] is None  # the same shape, with or without --verify
    check = ok_json("audit", "--verify", "--home", published)["verify"]
    assert (check["ok"], check["rows"], check["bad_id"]) == (True, 4, None)
    assert "chain verified: 4 rows" in fleet("audit", "--verify", "--home", published).stdout

    db = sqlite3.connect(published / "fleet.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 2")
    # Someone with the file drops the guard and edits history.
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("""UPDATE audit SET detail = '{"release":7}' WHERE id = 2""")
    db.commit()
    tampered = fleet("audit", "--verify", "--json", "--home", published)
    assert tampered.exit_code == 1
    assert json.loads(tampered.stdout)["verify"] == {
        "ok": False, "rows": 1, "head": ok_json("audit", "--home", published)["entries"][0]["hash"], "bad_id": 2,
        "problem": "its content does not match its hash",
    }  # fmt: skip
    assert "audit chain broken at row 2" in tampered.output

    # Re-hashing the edited row does not help: the next row no longer links to it.
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM audit WHERE id = 2").fetchone())
    db.execute("UPDATE audit SET hash = ? WHERE id = 2", (audit_hash(row),))
    db.commit()
    relinked = json.loads(fleet("audit", "--verify", "--json", "--home", published).stdout)["verify"]
    assert (relinked["bad_id"], relinked["problem"]) == (3, "does not link to the row before it")

    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit WHERE id = 1")
    db.commit()
    db.close()
    removed = json.loads(fleet("audit", "--verify", "--json", "--home", published).stdout)["verify"]
    assert (removed["ok"], removed["bad_id"]) == (False, 2)


# --------------------------------------------------------------------------------------------------------------
# assign and desired


def test_assign_publishes_retained_signed_state_that_the_device_verifies_and_seq_grows(
    published: Path, broker: MosquittoBroker
) -> None:
    pi_a, pi_b = device_name("pi-a"), device_name("pi-b")
    repo = Repository(published)
    director = load_director_key(repo.keys.public_key_json("director"))
    digits_1 = repo.release("digits", "1.0.0")

    first = ok_json("assign", pi_a, pi_b, "--release", "digits:1.0.0", "--campaign", "wave-1", "--expires", "2h",
                    "--allow-unknown", "--broker", broker.url, "--home", published)  # fmt: skip
    assert [(s["device_id"], s["seq"], s["releases"]) for s in first] == [
        (pi_a, 1, {"digits": "digits:1.0.0"}),
        (pi_b, 1, {"digits": "digits:1.0.0"}),
    ]
    message = desired_payload(broker.url, pi_a)
    assert (message.retain, message.qos) == (True, 1)
    state = verify_desired(message.payload, director, pi_a, last_seq=0, now=time.time())
    assert (state.seq, state.campaign) == (1, "wave-1")
    assert 2 * 3600 - 60 < state.expires - state.issued <= 2 * 3600
    model = state.models["digits"]
    assert (model.target, model.release, model.sha256, model.length) == (
        digits_1["target"], digits_1["release"], digits_1["sha256"], digits_1["length"],
    )  # fmt: skip
    with pytest.raises(DesiredStateError) as wrong:
        verify_desired(message.payload, director, pi_b, last_seq=0, now=time.time())
    assert wrong.value.reason == "wrong_device"

    # Another model joins; then digits moves on while `other` stays.
    ok_json("assign", pi_a, "--release", "other:1", "--allow-unknown", "--broker", broker.url, "--home", published)
    ok_json("assign", pi_a, "--release", "digits:1.1.0", "--allow-unknown", "--broker", broker.url, "--home", published)
    latest = verify_desired(desired_payload(broker.url, pi_a).payload, director, pi_a, last_seq=2, now=time.time())
    assert latest.seq == 3
    assert {name: m.version for name, m in latest.models.items()} == {"digits": "1.1.0", "other": "1"}
    assert latest.campaign is None

    shown = ok_json("desired", pi_a, "--home", published)
    assert (shown["seq"], shown["releases"]) == (3, {"digits": "digits:1.1.0", "other": "other:1"})
    assert ok_json("desired", pi_b, "--home", published)["seq"] == 1
    assigned = [(a["subject"], a["detail"]["seq"], a["detail"]["release"])
                for a in ok_json("audit", "--home", published)["entries"] if a["action"] == "assign"]  # fmt: skip
    assert assigned == [(pi_a, 1, "digits:1.0.0"), (pi_b, 1, "digits:1.0.0"), (pi_a, 2, "other:1"),
                        (pi_a, 3, "digits:1.1.0")]  # fmt: skip


def test_assign_of_an_unknown_release_exits_3_and_publishes_nothing(published: Path, broker: MosquittoBroker) -> None:
    device = device_name("pi-u")
    sub = Subscriber(broker.url, protocol.topic(protocol.DEFAULT_PREFIX, device, Kind.DESIRED))
    try:
        result = fleet("assign", device, "--release", "digits:9.9.9", "--broker", broker.url, "--home", published)
        assert result.exit_code == 3
        assert "unknown release digits:9.9.9" in result.output
        with pytest.raises(queue.Empty):
            sub.next(timeout=0.5)
    finally:
        sub.close()
    assert fleet("desired", device, "--home", published).exit_code == 3
    assert "assign" not in [a["action"] for a in ok_json("audit", "--home", published)["entries"]]


def test_assign_refuses_revoked_releases_devices_that_cannot_run_them_and_bad_input(
    published: Path, broker: MosquittoBroker
) -> None:
    ok_json("release", "revoke", "digits:1.0.0", "--home", published)
    riscv = device_name("pi-riscv")
    store = open_store(published / "fleet.db")
    store.write_batch(status=[birth(riscv, {"digits": "digits:1.1.0"}, machine="riscv64")])
    store.close()
    cases = [
        (["pi-1", "--release", "digits:1.0.0"], 1, "is revoked"),
        ([riscv, "--release", "digits:1.1.0"], 1, f"{riscv} is riscv64"),
        (["no/such", "--release", "digits:1.1.0"], 2, "is not a device id"),
        (["pi-1", "--release", "digits:1.1.0"], 1, "never enrolled nor heard from pi-1"),
        (["pi-1", "--allow-unknown", "--release", "digits:1.1.0", "--campaign", "has space"], 2,
         "would be refused by devices"),
        (["pi-1", "--release", "digits:1.1.0", "--expires", "soon"], 2, "is not a span"),
    ]
    for args, code, says in cases:
        result = fleet("assign", *args, "--broker", broker.url, "--home", published)
        assert (result.exit_code, says in result.output) == (code, True), (args, result.output)
    no_broker = fleet("assign", "pi-1", "--allow-unknown", "--release", "digits:1.1.0", "--home", published)
    assert no_broker.exit_code == 1
    assert "start `fleet serve`" in no_broker.output
    assert "assign" not in [a["action"] for a in ok_json("audit", "--home", published)["entries"]]


# --------------------------------------------------------------------------------------------------------------
# `fleet serve` with its repository, and what uses it


@dataclass
class Served:
    home: Path
    broker: str
    repo: str
    proc: subprocess.Popen[str]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"`fleet serve` printed no line in {timeout}s"
    return lines[0].strip()


#: The timestamp lifetime of the served repository: short, so the test sees `fleet serve` renew it.
TIMESTAMP_S = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Iterator[Served]:
    """`fleet serve` on a home whose timestamp metadata lives 4 s, with digits 1.0.0 published."""
    home = tmp_path_factory.mktemp("served") / "home"
    Repository.init(home, expiry=ExpiryPolicy(timestamp=timedelta(seconds=TIMESTAMP_S)))
    assert fleet("init", "--home", home).exit_code == 0
    publish(home, digits / "int8.onnx", "digits:1.0.0")
    log = (home.parent / "serve.log").open("w")
    proc = subprocess.Popen([FLEET, "serve", "--home", home], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        broker_line, repo_line = _read_line(proc, 20), _read_line(proc, 5)
        assert broker_line.startswith("broker: mqtt://127.0.0.1:"), broker_line
        assert repo_line.startswith("repo: http://127.0.0.1:"), repo_line
        yield Served(home, broker_line.removeprefix("broker: "), repo_line.removeprefix("repo: "), proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()
    assert not (home / "serve.json").exists(), "a clean stop removes serve.json"


def _timestamp(served: Served) -> dict[str, Any]:
    with urllib.request.urlopen(f"{served.repo}/metadata/timestamp.json", timeout=5) as response:
        assert response.headers["Cache-Control"] == "no-cache"
        signed: dict[str, Any] = json.loads(response.read())["signed"]
        return signed


def test_serve_serves_the_signed_repository_over_http_and_records_where_it_runs(served: Served) -> None:
    assert _timestamp(served)["_type"] == "timestamp"
    with urllib.request.urlopen(f"{served.repo}/metadata/root.json", timeout=5) as response:
        assert response.read() == Repository(served.home).trusted_root()
    record = served.home / "serve.json"
    assert record.stat().st_mode & 0o777 == 0o600
    info = json.loads(record.read_text())
    assert (info["pid"], info["broker"], info["repo"]) == (served.proc.pid, served.broker, served.repo)

    second = subprocess.run([FLEET, "serve", "--home", served.home], capture_output=True, text=True, timeout=20)
    assert second.returncode == 1
    assert f"already runs for {served.home} (pid {served.proc.pid})" in second.stderr


def test_serve_renews_the_timestamp_before_it_expires(served: Served) -> None:
    first = _timestamp(served)
    renewed = wait_for(lambda: (t := _timestamp(served))["version"] > first["version"] and t, "a renewed timestamp", 10)
    for _ in range(2 * TIMESTAMP_S):  # two lifetimes: what a device fetches is never expired
        assert datetime.fromisoformat(_timestamp(served)["expires"]).timestamp() > time.time()
        time.sleep(1)
    assert _timestamp(served)["version"] > renewed["version"]


def test_enroll_writes_a_bundle_for_the_running_fleet_that_the_agent_loads(
    served: Served, digits: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    made = ok_json("enroll", "pi-e1", "--out", out, "--model-dir", digits, "--state-dir", tmp_path / "state",
                   "--home", served.home)  # fmt: skip
    assert (made["broker"], made["repo_url"], made["models"]) == (
        served.broker,
        served.repo,
        {"digits": "digits:1.0.0"},
    )
    assert made["files"] == [
        "agent.toml",
        "director.pub.json",
        "models/digits/card.json",
        "models/digits/int8.onnx",
        "root.json",
    ]
    assert {(out / f).stat().st_mode & 0o777 for f in made["files"]} == {0o644}
    repo = Repository(served.home)
    assert (out / "root.json").read_bytes() == repo.trusted_root()
    assert load_director_key((out / "director.pub.json").read_bytes()).keyid == made["director_keyid"]
    assert (out / "models/digits/int8.onnx").read_bytes() == (digits / "int8.onnx").read_bytes()

    written = tomllib.loads((out / "agent.toml").read_text())
    assert written["update"] == {
        "repo_url": served.repo,
        "trusted_root": "root.json",
        "director_key": "director.pub.json",
    }
    assert written["mqtt"]["broker"] == served.broker
    factory = {"name": "digits", "path": "models/digits/int8.onnx", "card": "models/digits/card.json"}
    assert written["models"] == [{**factory, "release": "digits:1.0.0"}]

    refused = fleet("enroll", "pi-e1", "--out", out, "--home", served.home)
    assert refused.exit_code == 1 and "--force" in refused.output
    assert fleet("enroll", "bad id", "--out", tmp_path / "x", "--home", served.home).exit_code == 2
    entries = ok_json("audit", "--home", served.home)["entries"]
    assert ("enroll", "pi-e1") in [(a["action"], a["subject"]) for a in entries]

    config = agent.config.load(out / "agent.toml")
    assert (config.device_id, config.broker.url, config.state_dir) == ("pi-e1", served.broker, tmp_path / "state")
    assert config.update is not None
    assert (config.update.repo_url, config.update.trusted_root, config.update.director_key) == (
        served.repo, out / "root.json", out / "director.pub.json",
    )  # fmt: skip
    (factory_model,) = config.models
    assert (factory_model.path, factory_model.release) == (out / "models/digits/int8.onnx", "digits:1.0.0")


def test_assign_reaches_the_device_through_the_running_serve_and_devices_show_reports_installs(
    served: Served,
) -> None:
    device = device_name("pi-s")
    assigned = ok_json("assign", device, "--release", "digits:1.0.0", "--allow-unknown", "--home", served.home)
    assert assigned[0]["seq"] == 1
    director = load_director_key(Repository(served.home).keys.public_key_json("director"))
    verify_desired(desired_payload(served.broker, device).payload, director, device, last_seq=0, now=time.time())

    publish_as_device(
        served.broker,
        [
            (Kind.STATUS, birth(device, {"digits": "digits:1.0.0"})),
            (Kind.EVENTS, install_event(device, 0, "install_state", "digits:1.0.0")),
            (Kind.EVENTS, install_event(device, 1, "install_failed", "digits:1.0.0", "smoke_test_failed")),
            (Kind.EVENTS, install_event(device, 2, "install_committed", "digits:1.0.0")),
            (Kind.EVENTS, install_event(device, 3, "install_state", "digits:1.0.0")),
        ],
    )
    shown = wait_for(
        lambda: (
            (r := fleet("devices", "show", device, "--home", served.home, "--json")).exit_code == 0
            and (d := json.loads(r.stdout))["events"] == 4
            and d
        ),
        "the device's events in the store",
    )
    assert shown["models"]["digits"]["release"] == "digits:1.0.0"
    last = shown["last_install"]
    assert (last["type"], last["model"], last["release"], last["reason"], last["desired_seq"]) == (
        "install_committed", "digits", "digits:1.0.0", None, 1,
    )  # fmt: skip
    assert shown["desired"]["releases"] == {"digits": "digits:1.0.0"}
    assert shown["desired"]["seq"] == 1
    listed = {d["device_id"]: d for d in ok_json("devices", "list", "--home", served.home)}
    assert listed[device]["releases"] == {"digits": "digits:1.0.0"}
    human = fleet("devices", "show", device, "--home", served.home).stdout
    assert "install_committed" in human and "last_install" in human


def test_a_device_enrolled_by_the_fleet_installs_the_release_the_fleet_assigns(
    served: Served, digits: Path, example_model: Callable[[str], Path], tmp_path: Path
) -> None:
    """The whole path through the CLI: publish, enroll, a real `edge-agent run` from the bundle, assign, and the
    fleet seeing the device commit the release (downloaded from `fleet serve`, whose timestamp lives 4 s)."""
    publish(served.home, example_model("better") / "int8.onnx", "digits:1.1.0")
    device = device_name("pi-e2e")
    bundle = tmp_path / "bundle"
    # A port of its own: the API's default port may be taken on this machine.
    ok_json("enroll", device, "--out", bundle, "--model-dir", digits, "--state-dir", tmp_path / "state",
            "--listen", f"127.0.0.1:{free_port()}", "--home", served.home)  # fmt: skip
    config = bundle / "agent.toml"
    config.write_text(config.read_text().replace("[update]\n", "[update]\nprobation_s = 0.5\n"))  # a quick commit
    log = (tmp_path / "agent.log").open("w")
    agent_proc = subprocess.Popen([FLEET.parent / "edge-agent", "run", "--config", config], stdout=log, stderr=log)
    try:

        def shown() -> dict[str, Any] | None:
            result = fleet("devices", "show", device, "--home", served.home, "--json")
            return json.loads(result.stdout) if result.exit_code == 0 else None

        assert wait_for(shown, "the device's birth")["releases"] == {"digits": "digits:1.0.0"}
        ok_json("assign", device, "--release", "digits:1.1.0", "--home", served.home)
        device_view = wait_for(
            lambda: (d := shown()) and d["last_install"] and d["releases"]["digits"] == "digits:1.1.0" and d,
            "the device to commit digits:1.1.0 and report it",
            timeout=60,
        )
    finally:
        agent_proc.send_signal(signal.SIGTERM)
        agent_proc.wait(20)
        log.close()
    last = device_view["last_install"]
    assert (last["type"], last["release"], last["desired_seq"]) == ("install_committed", "digits:1.1.0", 1)
    assert device_view["desired"]["releases"] == {"digits": "digits:1.1.0"}


def test_enroll_without_a_running_serve_needs_the_urls_and_refuses_bad_ones(published: Path, tmp_path: Path) -> None:
    missing = fleet("enroll", "pi-x", "--out", tmp_path / "b", "--home", published)
    assert missing.exit_code == 1
    assert "pass --broker and --repo-url" in missing.output
    bad = fleet("enroll", "pi-x", "--out", tmp_path / "b", "--repo-url", "ftp://host/", "--home", published)
    assert bad.exit_code == 2
    made = ok_json("enroll", "pi-x", "--out", tmp_path / "b", "--broker", "mqtts://fleet.example:8883",
                   "--repo-url", "https://releases.example/fleet", "--home", published)  # fmt: skip
    assert (made["broker"], made["repo_url"]) == ("mqtts://fleet.example:8883", "https://releases.example/fleet")
    assert not (tmp_path / "b" / "models").exists()
    assert "models" not in tomllib.loads((tmp_path / "b" / "agent.toml").read_text())


@pytest.mark.parametrize(
    "command",
    [
        ["release"], ["release", "publish"], ["release", "list"], ["release", "show"], ["release", "revoke"],
        ["release", "verify"],
        ["assign"], ["desired"], ["enroll"], ["audit"],
    ],
)  # fmt: skip
def test_every_release_command_has_help(command: list[str]) -> None:
    result = fleet(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def test_no_private_key_material_leaves_the_keys_folder(served: Served, tmp_path: Path) -> None:
    """A bundle, serve.json and the repository hold public keys only."""
    secrets = [p.read_bytes().splitlines()[1] for p in (served.home / "keys").iterdir()]  # the PEM's base64 line
    ok_json("enroll", "pi-e2", "--out", tmp_path / "b", "--home", served.home)
    shared = [*(tmp_path / "b").rglob("*"), *(served.home / "repo").rglob("*"), served.home / "serve.json"]
    for path in filter(Path.is_file, shared):
        data = path.read_bytes()
        assert not any(secret in data for secret in secrets), path
