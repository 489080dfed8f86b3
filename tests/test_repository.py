"""The fleet side of releases: keys, the TUF repository, the director's signature and the repository's HTTP server.

Everything is real: Ed25519 keys on disk, metadata signed with python-tuf, the project's digits models, HTTP on
loopback. Attacks that need a device (a TUF client) are in test_trust.py.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from agent.update.desired import DesiredStateError, load_director_key, verify_desired
from fleet.trust.director import sign_desired
from fleet.trust.keys import KeyStore
from fleet.trust.releases import ReleaseError
from fleet.trust.repo_server import RepoServer
from fleet.trust.repository import ExpiryPolicy, Repository, RepositoryError

NOW = 1_800_000_000.0


@pytest.fixture
def home(tmp_path: Path) -> Path:
    Repository.init(tmp_path / "home", clock=lambda: NOW)
    return tmp_path / "home"


@pytest.fixture
def repo(home: Path) -> Repository:
    return Repository(home, clock=lambda: NOW)


@pytest.fixture(scope="module")
def digits(example_model: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    folder = example_model("good")
    return folder, json.loads((folder / "card.json").read_text())


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (the lock file aside): to show a refused change changed nothing."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def metadata(repo: Repository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def committed(repo: Repository) -> tuple[Metadata[Timestamp], Metadata[Snapshot], Metadata[Targets]]:
    """Follow the chain from timestamp.json, as a client does."""
    timestamp = metadata(repo, "timestamp.json")
    snapshot = metadata(repo, f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    targets = metadata(repo, f"{snapshot.signed.meta['targets.json'].version}.targets.json")
    return timestamp, snapshot, targets


# --------------------------------------------------------------------------------------------------------------
# init and keys


def test_init_creates_owner_only_keys_and_a_summary_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    home = tmp_path / "home"
    summary = Repository.init(home, root_threshold=2, root_keys=3)

    keys = home / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    names = sorted(p.name for p in keys.iterdir())
    assert names == [
        "director-1.pem",
        "root-1.pem",
        "root-2.pem",
        "root-3.pem",
        "snapshot-1.pem",
        "targets-1.pem",
        "timestamp-1.pem",
    ]
    assert all(stat.S_IMODE((keys / n).stat().st_mode) == 0o600 for n in names)

    assert summary["roles"]["root"]["threshold"] == 2
    assert len(summary["roles"]["root"]["keyids"]) == 3
    assert summary["roles"]["root"]["online"] is False
    assert all(summary["roles"][r]["online"] for r in ("targets", "snapshot", "timestamp"))
    assert "offline" in summary["note"]
    secrets = [(keys / n).read_text() for n in names]
    logged = json.dumps(summary) + "".join(r.getMessage() + repr(r.__dict__) for r in caplog.records)
    assert "PRIVATE KEY" not in logged
    assert not any(secret.splitlines()[1] in logged for secret in secrets)

    root = Metadata[Root].from_bytes(Repository(home).trusted_root())
    assert root.signed.consistent_snapshot is True
    assert len(root.signatures) == 3
    root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
    assert summary["trusted_root_sha256"] == hashlib.sha256(Repository(home).trusted_root()).hexdigest()


def test_init_refuses_to_overwrite_without_force(home: Path) -> None:
    before = tree(home)
    with pytest.raises(RepositoryError, match="refusing to overwrite"):
        Repository.init(home)
    assert tree(home) == before

    old_root = Metadata[Root].from_bytes(Repository(home).trusted_root())
    Repository.init(home, force=True)
    new_root = Metadata[Root].from_bytes(Repository(home).trusted_root())
    assert set(new_root.signed.keys).isdisjoint(old_root.signed.keys)
    assert not [p for p in home.iterdir() if p.name.startswith(".init-")]


def test_init_rejects_a_threshold_above_the_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threshold"):
        Repository.init(tmp_path / "home", root_threshold=3, root_keys=2)
    assert not (tmp_path / "home").exists()


def test_key_files_readable_by_others_are_refused(home: Path) -> None:
    key_file = home / "keys" / "targets-1.pem"
    key_file.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        KeyStore(home / "keys").signer("targets")


def test_missing_repository_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no repository in") as missing:
        Repository(tmp_path / "nowhere")
    assert missing.value.fix == "run `fleet init`"


# --------------------------------------------------------------------------------------------------------------
# publish


def test_publish_two_versions_counts_releases_and_signs_the_card(
    repo: Repository, digits: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, card = digits
    first = repo.publish(folder / "int8.onnx", "digits", "1.0.0", card, source_commit="0123abc")
    second_file = tmp_path / "int8.tflite"
    shutil.copy(folder / "int8.tflite", second_file)
    second = repo.publish(second_file, "digits", "1.1.0", card, hardware={"machines": ["aarch64"]})

    assert (first.release, second.release) == (1, 2)
    assert (first.runtime, second.runtime) == ("onnxruntime", "tflite")
    assert first.target == "models/digits/1.0.0/int8.onnx"
    assert first.desired_entry() == {
        "target": first.target,
        "release": 1,
        "sha256": first.sha256,
        "length": (folder / "int8.onnx").stat().st_size,
    }
    stored = repo.targets_dir / "models/digits/1.0.0" / f"{first.sha256}.int8.onnx"
    assert stored.read_bytes() == (folder / "int8.onnx").read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644

    listed = repo.releases()
    assert [(r["version"], r["release"], r["min_release"], r["revoked"]) for r in listed] == [
        ("1.0.0", 1, 1, False),
        ("1.1.0", 2, 1, False),
    ]
    detail = repo.release("digits", "1.0.0")
    assert detail["card"]["provenance"]["source_commit"] == "0123abc"
    assert detail["card"]["smoke_test"] == card["smoke_test"]
    assert detail["card"]["drift"]["edges"] == card["drift"]["edges"]
    assert detail["hardware"] == {"machines": ["aarch64", "armv7l", "x86_64"]}
    assert repo.release("digits", "1.1.0")["hardware"] == {"machines": ["aarch64"]}

    # Each publish moved targets, snapshot and timestamp on by one, and the chain verifies against root.
    timestamp, snapshot, targets = committed(repo)
    assert (timestamp.signed.version, snapshot.signed.version, targets.signed.version) == (3, 3, 3)
    root = Metadata[Root].from_bytes(repo.trusted_root()).signed
    for md in (timestamp, snapshot, targets):
        root.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
    assert timestamp.signed.expires == datetime.fromtimestamp(NOW, UTC) + timedelta(days=1)
    assert targets.signed.expires == datetime.fromtimestamp(NOW, UTC) + timedelta(days=90)
    custom = targets.signed.targets[first.target].custom
    assert set(custom) == {"name", "version", "release", "min_release", "runtime", "hardware", "card"}


def test_release_counters_are_per_model(repo: Repository, digits: tuple[Path, dict[str, Any]]) -> None:
    folder, card = digits
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    other = repo.publish(folder / "float.onnx", "digits-float", "1.0.0", card)
    assert other.release == 1


@pytest.mark.parametrize(
    ("name", "version", "reason"),
    [
        ("../evil", "1.0.0", "bad_name"),
        ("a/b", "1.0.0", "bad_name"),
        ("..", "1.0.0", "bad_name"),
        (".hidden", "1.0.0", "bad_name"),
        ("", "1.0.0", "bad_name"),
        ("has space", "1.0.0", "bad_name"),
        ("digits", "../1", "bad_version"),
        ("digits", "1\\0", "bad_version"),
        ("digits", "v/1", "bad_version"),
    ],
)
def test_publish_rejects_path_traversal_and_bad_names(
    repo: Repository, digits: tuple[Path, dict[str, Any]], name: str, version: str, reason: str
) -> None:
    folder, card = digits
    before = tree(repo.dir)
    with pytest.raises(ReleaseError) as err:
        repo.publish(folder / "int8.onnx", name, version, card)
    assert err.value.reason == reason
    assert tree(repo.dir) == before


def test_publish_validates_file_card_and_hardware_first(
    home: Path, digits: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, card = digits
    config = json.loads((home / "repo/config.json").read_text())
    config["max_target_bytes"] = 8000
    (home / "repo/config.json").write_text(json.dumps(config))
    repo = Repository(home)
    empty = tmp_path / "empty.onnx"
    empty.touch()
    odd_name = tmp_path / "we ird.onnx"
    shutil.copy(folder / "int8.onnx", odd_name)
    text = tmp_path / "model.txt"
    text.write_text("not a model")
    nan_card = {**card, "drift": {"edges": [float("nan")]}}
    no_smoke = {k: v for k, v in card.items() if k != "smoke_test"}
    wrong_card = {**card, "files": {"int8.onnx": {**card["files"]["int8.onnx"], "sha256": "0" * 64}}}
    cases: list[tuple[Path, dict[str, Any], dict[str, Any] | None, str]] = [
        (tmp_path / "missing.onnx", card, None, "bad_file"),
        (folder, card, None, "unsupported_runtime"),
        (empty, card, None, "empty_file"),
        (folder / "float.onnx", card, None, "too_large"),
        (odd_name, card, None, "bad_filename"),
        (text, card, None, "unsupported_runtime"),
        (folder / "int8.onnx", nan_card, None, "bad_card"),
        (folder / "int8.onnx", no_smoke, None, "bad_card"),
        (folder / "int8.onnx", card, {"machines": []}, "bad_hardware"),
        (folder / "int8.onnx", card, {"machines": ["../x"]}, "bad_hardware"),
        (folder / "int8.onnx", card, {"cpus": 4}, "bad_hardware"),
        (folder / "int8.onnx", wrong_card, None, "card_mismatch"),
    ]
    before = tree(repo.dir)
    for model_file, model_card, hardware, reason in cases:
        with pytest.raises(ReleaseError) as err:
            repo.publish(model_file, "digits", "1.0.0", model_card, hardware=hardware)
        assert err.value.reason == reason, (model_file, err.value)
        assert tree(repo.dir) == before, reason


def test_duplicate_name_and_version_is_rejected(repo: Repository, digits: tuple[Path, dict[str, Any]]) -> None:
    folder, card = digits
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    before = tree(repo.dir)
    with pytest.raises(ReleaseError) as err:
        repo.publish(folder / "int8.tflite", "digits", "1.0.0", card)
    assert err.value.reason == "duplicate"
    assert tree(repo.dir) == before


def test_a_publish_failing_mid_commit_changes_nothing(repo: Repository, digits: tuple[Path, dict[str, Any]]) -> None:
    """The snapshot key is unusable, so publish fails after the target file and targets metadata were written."""
    folder, card = digits
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    before = tree(repo.dir)
    (repo.home / "keys/snapshot-1.pem").chmod(0o644)
    with pytest.raises(PermissionError):
        repo.publish(folder / "int8.tflite", "digits", "1.1.0", card)
    assert tree(repo.dir) == before
    assert not (repo.targets_dir / "models/digits/1.1.0").exists()
    (repo.home / "keys/snapshot-1.pem").chmod(0o600)
    assert repo.publish(folder / "int8.tflite", "digits", "1.1.0", card).release == 2


def test_a_tampered_repository_folder_is_not_re_signed(repo: Repository, digits: tuple[Path, dict[str, Any]]) -> None:
    folder, card = digits
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    _, _, targets = committed(repo)
    path = repo.metadata_dir / f"{targets.signed.version}.targets.json"
    path.write_bytes(path.read_bytes().replace(b'"release":1,', b'"release":9,'))
    with pytest.raises(RepositoryError, match=rf"inconsistent: {path.name}: 2.snapshot.json records v2: ") as err:
        repo.renew_online(NOW + 10 * 86400)
    assert err.value.reason == "repository_inconsistent"


# --------------------------------------------------------------------------------------------------------------
# revoke and renewal


def test_revoke_raises_the_floor_on_every_target_of_the_model(
    repo: Repository, digits: tuple[Path, dict[str, Any]]
) -> None:
    folder, card = digits
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    repo.publish(folder / "int8.tflite", "digits", "1.1.0", card)
    repo.publish(folder / "float.onnx", "other", "1.0.0", card)

    info = repo.revoke("digits", "1.0.0")
    assert (info.release, info.min_release, info.revoked) == (1, 2, True)
    by_version = {(r["name"], r["version"]): r for r in repo.releases()}
    assert by_version["digits", "1.0.0"]["revoked"] and by_version["digits", "1.0.0"]["min_release"] == 2
    assert not by_version["digits", "1.1.0"]["revoked"] and by_version["digits", "1.1.0"]["min_release"] == 2
    assert by_version["other", "1.0.0"]["min_release"] == 1

    before = tree(repo.dir)
    assert repo.revoke("digits", "1.0.0").min_release == 2  # already revoked: nothing to sign
    assert tree(repo.dir) == before

    # A new release continues the counter and carries the floor.
    third = repo.publish(folder / "float.onnx", "digits", "1.2.0", card)
    assert (third.release, third.min_release) == (3, 2)
    with pytest.raises(ReleaseError) as err:
        repo.revoke("digits", "9.9.9")
    assert err.value.reason == "unknown_release"


def test_renew_online_re_signs_what_is_about_to_expire(home: Path) -> None:
    repo = Repository(home, clock=lambda: NOW)
    assert repo.renew_online(NOW) == {}

    day = 86400.0
    renewed = repo.renew_online(NOW + 0.75 * day)  # timestamp has 6 h left, under the 12 h margin
    assert renewed == {"timestamp": 2}
    timestamp, snapshot, targets = committed(repo)
    assert timestamp.signed.expires == datetime.fromtimestamp(NOW + 1.75 * day, UTC)
    assert (snapshot.signed.version, targets.signed.version) == (1, 1)

    assert repo.renew_online(NOW + 6.8 * day) == {"snapshot": 2, "timestamp": 3}
    assert repo.renew_online(NOW + 89.9 * day) == {"targets": 2, "snapshot": 3, "timestamp": 4}
    timestamp, snapshot, targets = committed(repo)
    assert targets.signed.expires == datetime.fromtimestamp(NOW + 179.9 * day, UTC).replace(microsecond=0)
    assert repo.renew_online(NOW + 89.9 * day) == {}


def test_expiry_policy_is_kept_with_the_repository(tmp_path: Path) -> None:
    policy = ExpiryPolicy(timestamp=timedelta(hours=2), snapshot=timedelta(days=1))
    Repository.init(tmp_path / "home", expiry=policy, clock=lambda: NOW)
    repo = Repository(tmp_path / "home")
    assert repo.expiry == policy
    timestamp, _, _ = committed(repo)
    assert timestamp.signed.expires == datetime.fromtimestamp(NOW, UTC) + timedelta(hours=2)


# --------------------------------------------------------------------------------------------------------------
# director


def test_sign_desired_round_trips_and_refuses_malformed_states(repo: Repository) -> None:
    signer = repo.keys.signer("director")
    key = load_director_key(repo.keys.public_key_json("director"))
    entry = {"target": "models/digits/1.0.0/int8.onnx", "release": 1, "sha256": "a" * 64, "length": 10}
    payload = sign_desired(signer, "dev-1", 7, {"digits": entry}, "wave-1", NOW, NOW + 3600.5)
    state = verify_desired(payload, key, "dev-1", 6, NOW)
    assert (state.seq, state.campaign, state.expires) == (7, "wave-1", NOW + 3600.5)
    assert state.models["digits"].version == "1.0.0"

    bad = [
        {"digits": {**entry, "target": "models/digits/../../etc/passwd"}},
        {"digits": {**entry, "target": "models/other/1.0.0/int8.onnx"}},
        {"digits": {**entry, "sha256": "A" * 64}},
        {"digits": {**entry, "length": 0}},
        {"digits": {**entry, "extra": 1}},
    ]
    for models in bad:
        with pytest.raises(DesiredStateError):
            sign_desired(signer, "dev-1", 8, models, None, NOW, NOW + 60)
    with pytest.raises(DesiredStateError):
        sign_desired(signer, "dev/1", 8, {}, None, NOW, NOW + 60)
    with pytest.raises(DesiredStateError):
        sign_desired(signer, "dev-1", 8, {}, None, NOW, NOW - 1)
    other = CryptoSigner.generate_ed25519()
    with pytest.raises(DesiredStateError) as err:
        verify_desired(sign_desired(other, "dev-1", 8, {}, None, NOW, NOW + 60), key, "dev-1", 7, NOW)
    assert err.value.reason == "bad_signature"


# --------------------------------------------------------------------------------------------------------------
# repo server


def get(server: RepoServer, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def test_repo_server_serves_ranges_and_nothing_else(repo: Repository, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("outside the repository")
    os.symlink(tmp_path / "secret.txt", repo.targets_dir / "link.onnx")
    (repo.metadata_dir / ".timestamp.json.partial").write_text("in flight")
    whole = (repo.metadata_dir / "timestamp.json").read_bytes()
    size = len(whole)
    with RepoServer(repo.dir) as server:
        status, headers, body = get(server, "/metadata/timestamp.json")
        assert (status, body) == (200, whole)
        assert headers["Accept-Ranges"] == "bytes" and headers["Cache-Control"] == "no-cache"
        assert get(server, "/metadata/1.root.json")[1]["Cache-Control"].endswith("immutable")

        status, headers, body = get(server, "/metadata/timestamp.json", {"Range": "bytes=10-"})
        assert (status, body, headers["Content-Range"]) == (206, whole[10:], f"bytes 10-{size - 1}/{size}")
        status, _, body = get(server, "/metadata/timestamp.json", {"Range": "bytes=0-3"})
        assert (status, body) == (206, whole[:4])
        status, _, body = get(server, "/metadata/timestamp.json", {"Range": "bytes=-5"})
        assert (status, body) == (206, whole[-5:])
        for bad in (f"bytes={size}-", "bytes=5-2", "bytes=abc", "bytes=0-1,3-4", "items=0-1", "bytes=-"):
            status, headers, _ = get(server, "/metadata/timestamp.json", {"Range": bad})
            assert (status, headers["Content-Range"]) == (416, f"bytes */{size}"), bad

        status, headers, body = get(server, "/metadata/timestamp.json", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, str(size), b"")

        for path in (
            "/",
            "/metadata/",
            "/targets",
            "/config.json",
            "/metadata/../config.json",
            "/metadata/%2e%2e/config.json",
            "/targets/..%2fconfig.json",
            "/metadata//timestamp.json",
            "/metadata/.timestamp.json.partial",
            "/.lock",
            "/targets/link.onnx",
            "/metadata/timestamp.json%00",
            "/keys/targets-1.pem",
        ):
            status, _, body = get(server, path)
            assert status == 404, path
            assert b"outside" not in body and b"in flight" not in body
        assert get(server, "/metadata/timestamp.json", method="POST")[0] == 501
