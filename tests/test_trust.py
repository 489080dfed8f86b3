"""The device side of releases: every attack on the two-key rule, one test each, against real signed metadata.

A real repository (``fleet.trust.repository``) signed with python-tuf, the project's digits models, the repository
served over HTTP on loopback (``fleet.trust.repo_server``, with handler subclasses for cuts and slow drips), and the
device's ngclient-based :class:`agent.update.tuf_client.ReleaseFetcher` and
:func:`agent.update.desired.verify_desired`. Attackers
forge metadata with the keys they are assumed to hold (usually the online ones) or with keys of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from fleet_fixtures import tiny_tmpfs
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Key, Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from agent.canonical import canonical_json
from agent.protocol import SCHEMA_VERSION
from agent.update.desired import DesiredModel, DesiredStateError, load_director_key, verify_desired
from agent.update.tuf_client import ReleaseFetcher, TrustError, VerifiedTarget
from fleet.trust.director import sign_desired
from fleet.trust.releases import ReleaseInfo
from fleet.trust.repo_server import RepoRequestHandler, RepoServer
from fleet.trust.repository import Repository

DAY = 86400.0
RUNTIMES = ("onnxruntime", "tflite")


@pytest.fixture(scope="module")
def digits(example_model: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    folder = example_model("good")
    return folder, json.loads((folder / "card.json").read_text())


@dataclass
class Fleet:
    """One fleet's repository and director, served on loopback, with digits 1.0.0 (int8.onnx) published."""

    tmp: Path
    repo: Repository
    server: RepoServer
    card: dict[str, Any]
    model_dir: Path
    release: ReleaseInfo
    director_key: Key
    servers: list[RepoServer] = field(default_factory=list)

    def fetcher(self, device: str = "dev-1", url: str | None = None, **options: Any) -> ReleaseFetcher:
        """The device's TUF client, enrolled with the current root; state persists per device name."""
        defaults: dict[str, Any] = {"max_download_bytes": 1_000_000, "download_deadline_s": 10.0, "runtimes": RUNTIMES}
        return ReleaseFetcher(
            self.tmp / "devices" / device,
            url or self.server.url,
            self.repo.trusted_root(),
            **(defaults | options),
        )

    def desired(
        self,
        models: dict[str, dict[str, Any]],
        *,
        device: str = "dev-1",
        seq: int = 1,
        issued: float | None = None,
        expires: float | None = None,
        signer: Signer | None = None,
    ) -> bytes:
        issued = time.time() if issued is None else issued
        expires = issued + 3600 if expires is None else expires
        signer = signer or self.repo.keys.signer("director")
        return sign_desired(signer, device, seq, models, "campaign-1", issued, expires)

    def serve(self, handler: type[RepoRequestHandler]) -> RepoServer:
        """Another server on the same repository, with a fault-injecting handler."""
        server = RepoServer(self.repo.dir, handler=handler).start()
        self.servers.append(server)
        return server

    def verified(self, info: ReleaseInfo | None = None, fetcher: ReleaseFetcher | None = None) -> VerifiedTarget:
        """Run the happy path up to a verified target: director state, TUF refresh, resolve."""
        info = info or self.release
        state = verify_desired(
            self.desired({info.name: info.desired_entry()}), self.director_key, "dev-1", 0, time.time()
        )
        fetcher = fetcher or self.fetcher()
        fetcher.refresh()
        return fetcher.resolve(state.models[info.name])


@pytest.fixture
def fleet(tmp_path: Path, digits: tuple[Path, dict[str, Any]]) -> Iterator[Fleet]:
    folder, card = digits
    Repository.init(tmp_path / "home")
    repo = Repository(tmp_path / "home")
    release = repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    director_key = load_director_key(repo.keys.public_key_json("director"))
    with RepoServer(repo.dir) as server:
        f = Fleet(tmp_path, repo, server, card, folder, release, director_key)
        yield f
        for extra in f.servers:
            extra.stop()


def entry(info: ReleaseInfo, **changes: Any) -> dict[str, Any]:
    return {**info.desired_entry(), **changes}


def model(info: ReleaseInfo, **changes: Any) -> DesiredModel:
    """A director entry as the device holds it after verify_desired."""
    fields = {**entry(info), **changes}
    return DesiredModel(
        info.name, info.version, fields["target"], fields["release"], fields["sha256"], fields["length"]
    )


def reason_of(call: Callable[[], Any]) -> str:
    with pytest.raises(TrustError) as err:
        call()
    return err.value.reason


def refresh_failure(fetcher: ReleaseFetcher) -> str:
    """The ngclient exception class behind a failed refresh (``TrustError.detail`` starts with it)."""
    with pytest.raises(TrustError) as err:
        fetcher.refresh()
    assert err.value.reason == "tuf_refresh_failed"
    return err.value.detail.split(":")[0]


# --------------------------------------------------------------------------------------------------------------
# Forging metadata as an attacker would


def sign(md: Metadata[Any], *signers: Signer) -> bytes:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    return md.to_bytes()


def load(repo: Repository, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((repo.metadata_dir / name).read_bytes())


def current(repo: Repository) -> tuple[Metadata[Timestamp], Metadata[Snapshot], Metadata[Targets]]:
    timestamp = load(repo, "timestamp.json")
    snapshot = load(repo, f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    targets = load(repo, f"{snapshot.signed.meta['targets.json'].version}.targets.json")
    return timestamp, snapshot, targets


def meta(data: bytes, version: int) -> MetaFile:
    return MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})


def put(repo: Repository, name: str, data: bytes) -> None:
    (repo.metadata_dir / name).write_bytes(data)


def forge_snapshot_and_timestamp(repo: Repository, snapshot: Metadata[Snapshot]) -> None:
    """Publish ``snapshot`` as a new version, with a new timestamp, signed by the real online keys (stolen)."""
    timestamp = load(repo, "timestamp.json")
    snapshot.signed.version = timestamp.signed.snapshot_meta.version + 1
    data = sign(snapshot, repo.keys.signer("snapshot"))
    put(repo, f"{snapshot.signed.version}.snapshot.json", data)
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = meta(data, snapshot.signed.version)
    put(repo, "timestamp.json", sign(timestamp, repo.keys.signer("timestamp")))


# --------------------------------------------------------------------------------------------------------------
# Happy paths


def test_two_keys_agree_and_the_verified_model_lands(fleet: Fleet, tmp_path: Path) -> None:
    target = fleet.verified()
    assert (target.name, target.version, target.release, target.min_release) == ("digits", "1.0.0", 1, 1)
    assert target.runtime == "onnxruntime" and platform.machine() in target.machines
    assert target.card["smoke_test"] == fleet.card["smoke_test"]
    assert target.card["drift"] == fleet.card["drift"]

    fetcher = fleet.fetcher()
    path = fetcher.download(fleet.verified(fetcher=fetcher), tmp_path / "models")
    assert path == tmp_path / "models" / "digits-1.0.0.onnx"
    assert path.read_bytes() == (fleet.model_dir / "int8.onnx").read_bytes()
    assert os.listdir(tmp_path / "models") == [path.name]  # no temporary file left behind
    assert not os.listdir(tmp_path / "devices/dev-1/tuf/partial")

    # A second release shows up on the next refresh, with the next counter.
    second = fleet.repo.publish(fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card)
    newer = fleet.verified(second, fetcher)
    assert (newer.release, newer.runtime) == (2, "tflite")
    assert fetcher.download(newer, tmp_path / "models").read_bytes() == (fleet.model_dir / "int8.tflite").read_bytes()


def test_download_resumes_after_a_cut(fleet: Fleet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen_ranges: list[str | None] = []
    cut_left = [1]

    class CutOnce(RepoRequestHandler):
        def send_body(self, f: BinaryIO, length: int) -> None:
            if self.path.startswith("/targets/"):
                seen_ranges.append(self.headers.get("Range"))
                if cut_left[0]:
                    cut_left[0] -= 1
                    self.wfile.write(f.read(length // 2))
                    return  # the server closes the connection mid-body
            super().send_body(f, length)

    server = fleet.serve(CutOnce)
    caplog.set_level(logging.INFO)
    fetcher = fleet.fetcher(url=server.url)
    path = fetcher.download(fleet.verified(fetcher=fetcher), tmp_path / "models")

    assert path.read_bytes() == (fleet.model_dir / "int8.onnx").read_bytes()
    assert seen_ranges == [None, f"bytes={fleet.release.length // 2}-"]
    assert any(r.getMessage() == "download_resume" for r in caplog.records)


def test_a_partial_download_resumes_in_a_later_attempt(fleet: Fleet, tmp_path: Path) -> None:
    """Every response is cut after half of what was asked; the fetcher gives up, then resumes on the next call."""
    seen_ranges: list[str | None] = []
    cutting = [True]

    class CutAlways(RepoRequestHandler):
        def send_body(self, f: BinaryIO, length: int) -> None:
            if self.path.startswith("/targets/"):
                seen_ranges.append(self.headers.get("Range"))
                if cutting[0]:
                    self.wfile.write(f.read(max(length // 2, 1)))
                    return
            super().send_body(f, length)

    server = fleet.serve(CutAlways)
    fetcher = fleet.fetcher(url=server.url)
    target = fleet.verified(fetcher=fetcher)
    assert reason_of(lambda: fetcher.download(target, tmp_path / "models")) == "download_failed"
    assert not (tmp_path / "models" / "digits-1.0.0.onnx").exists()
    asked = len(seen_ranges)

    cutting[0] = False
    assert fetcher.download(target, tmp_path / "models").read_bytes() == (fleet.model_dir / "int8.onnx").read_bytes()
    resumed_at = int(seen_ranges[asked].removeprefix("bytes=").rstrip("-"))
    assert resumed_at > fleet.release.length * 0.9


def test_a_failed_refresh_leaves_no_older_metadata_in_use(fleet: Fleet) -> None:
    fetcher = fleet.fetcher()
    fetcher.refresh()
    (fleet.repo.metadata_dir / "timestamp.json").write_bytes(b"{}")
    assert refresh_failure(fetcher) == "DeserializationError"
    assert reason_of(lambda: fetcher.resolve(model(fleet.release))) == "tuf_refresh_failed"


def test_renew_online_keeps_a_device_refreshing(fleet: Fleet) -> None:
    later = time.time() + 2 * DAY  # past the one-day timestamp expiry
    fetcher = fleet.fetcher(clock=lambda: later)
    assert refresh_failure(fetcher) == "ExpiredMetadataError"
    assert fleet.repo.renew_online(later) == {"timestamp": 3}
    fetcher.refresh()
    assert fetcher.resolve(model(fleet.release)).release == 1


# --------------------------------------------------------------------------------------------------------------
# Attacks on the download


def test_tampered_target_bytes_are_rejected(fleet: Fleet, tmp_path: Path) -> None:
    stored = fleet.repo.targets_dir / "models/digits/1.0.0" / f"{fleet.release.sha256}.int8.onnx"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    fetcher = fleet.fetcher()
    target = fleet.verified(fetcher=fetcher)
    assert reason_of(lambda: fetcher.download(target, tmp_path / "models")) == "hash_mismatch"
    assert not os.listdir(tmp_path / "models")
    assert not os.listdir(tmp_path / "devices/dev-1/tuf/partial")  # bad bytes are never resumed from


def test_a_server_sending_more_than_the_signed_length_is_cut_off(fleet: Fleet, tmp_path: Path) -> None:
    stored = fleet.repo.targets_dir / "models/digits/1.0.0" / f"{fleet.release.sha256}.int8.onnx"
    stored.write_bytes(stored.read_bytes() + os.urandom(10_000_000))
    fetcher = fleet.fetcher()
    target = fleet.verified(fetcher=fetcher)
    assert reason_of(lambda: fetcher.download(target, tmp_path / "models")) == "length_mismatch"
    assert not os.listdir(tmp_path / "devices/dev-1/tuf/partial")


def test_a_target_larger_than_the_device_allows_is_refused(fleet: Fleet) -> None:
    fetcher = fleet.fetcher(max_download_bytes=fleet.release.length - 1)
    fetcher.refresh()
    assert reason_of(lambda: fetcher.resolve(model(fleet.release))) == "too_large"


def test_a_slow_drip_fails_at_the_deadline(fleet: Fleet, tmp_path: Path) -> None:
    class Drip(RepoRequestHandler):
        def send_body(self, f: BinaryIO, length: int) -> None:
            if not self.path.startswith("/targets/"):
                super().send_body(f, length)
                return
            with contextlib.suppress(OSError):  # the client hangs up at its deadline
                for _ in range(length):
                    self.wfile.write(f.read(1))
                    time.sleep(0.01)

    server = fleet.serve(Drip)
    fetcher = fleet.fetcher(url=server.url, download_deadline_s=0.5)
    target = fleet.verified(fetcher=fetcher)
    started = time.monotonic()
    assert reason_of(lambda: fetcher.download(target, tmp_path / "models")) == "download_deadline"
    assert time.monotonic() - started < 3
    assert not (tmp_path / "models" / "digits-1.0.0.onnx").exists()


def publish_big(fleet: Fleet, size: int = 400_000) -> ReleaseInfo:
    big = fleet.tmp / "big.onnx"
    big.write_bytes(os.urandom(size))
    return fleet.repo.publish(big, "big", "1.0.0", fleet.card)


def test_a_full_disk_fails_the_download_cleanly(fleet: Fleet, tmp_path: Path) -> None:
    big = publish_big(fleet)
    with tiny_tmpfs(tmp_path / "full") as dest:
        fetcher = fleet.fetcher()
        target = fleet.verified(big, fetcher)
        assert reason_of(lambda: fetcher.download(target, dest)) == "disk_full"
        assert not os.listdir(dest)  # the half-written file was removed, freeing the space


def test_a_file_size_limit_fails_the_download_as_disk_full(fleet: Fleet, tmp_path: Path) -> None:
    """RLIMIT_FSIZE in a child process: the partial file cannot grow past 150 KB (EFBIG), as on a full disk."""
    big = publish_big(fleet)
    script = """
import json, resource, signal, sys
from pathlib import Path
from agent.update.desired import DesiredModel
from agent.update.tuf_client import ReleaseFetcher, TrustError
a = json.loads(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
fetcher = ReleaseFetcher(Path(a["state"]), a["url"], Path(a["root"]).read_bytes(), 10**7, 30, runtimes=["onnxruntime"])
target = fetcher.resolve(DesiredModel(**a["model"]))
try:
    fetcher.download(target, Path(a["dest"]))
except TrustError as exc:
    print(exc.reason, len(list(Path(a["state"], "tuf", "partial").iterdir())))
else:
    print("downloaded")
"""
    args = {
        "state": str(tmp_path / "child"),
        "url": fleet.server.url,
        "root": str(fleet.repo.metadata_dir / "root.json"),
        "model": {"name": "big", "version": "1.0.0", **big.desired_entry()},
        "dest": str(tmp_path / "models"),
    }
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["disk_full", "0"], done.stderr[-2000:]  # and no partial file keeps the disk full
    assert not (tmp_path / "models").exists() or not os.listdir(tmp_path / "models")


# --------------------------------------------------------------------------------------------------------------
# Attacks on TUF metadata


def test_targets_signed_with_a_key_root_does_not_list_are_rejected(fleet: Fleet) -> None:
    """An attacker with the online snapshot and timestamp keys, but not the targets key, adds a release."""
    fetcher = fleet.fetcher()
    fetcher.refresh()
    _, snapshot, targets = current(fleet.repo)
    evil = dict(targets.signed.targets)
    evil_path = "models/digits/6.6.6/int8.onnx"
    evil[evil_path] = TargetFile(4, {"sha256": "0" * 64}, evil_path, {"custom": {}})
    targets.signed.targets = evil
    targets.signed.version += 1
    data = sign(targets, CryptoSigner.generate_ed25519())
    put(fleet.repo, f"{targets.signed.version}.targets.json", data)
    snapshot.signed.meta["targets.json"] = meta(data, targets.signed.version)
    forge_snapshot_and_timestamp(fleet.repo, snapshot)
    assert refresh_failure(fetcher) == "UnsignedMetadataError"


def _root_v2(repo: Repository) -> Metadata[Root]:
    root = Metadata[Root].from_bytes(repo.trusted_root())
    root.signed.version = 2
    return root


def test_root_rotation_needs_the_root_threshold(tmp_path: Path, digits: tuple[Path, dict[str, Any]]) -> None:
    """Root threshold 2 of 2: one stolen root key cannot rotate root (here: swap in the attacker's targets key)."""
    folder, card = digits
    Repository.init(tmp_path / "home", root_threshold=2, root_keys=2)
    repo = Repository(tmp_path / "home")
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    root_keys = repo.keys.signers("root")
    with RepoServer(repo.dir) as server:
        fetcher = ReleaseFetcher(tmp_path / "dev", server.url, repo.trusted_root(), 10**6, 10, runtimes=RUNTIMES)
        fetcher.refresh()

        root = _root_v2(repo)
        old_targets_keyid = root.signed.roles["targets"].keyids[0]
        root.signed.revoke_key(old_targets_keyid, "targets")
        root.signed.add_key(CryptoSigner.generate_ed25519().public_key, "targets")
        put(repo, "2.root.json", sign(root, root_keys[0]))
        assert refresh_failure(fetcher) == "UnsignedMetadataError"

        # The same rotation with both root signatures is accepted: the threshold was the only obstacle.
        put(repo, "2.root.json", sign(_root_v2(repo), *root_keys))
        fetcher.refresh()
        assert (tmp_path / "dev/tuf/metadata/root_history/2.root.json").exists()


@pytest.mark.parametrize("relabel", [False, True], ids=["same-keyid-twice", "relabelled-as-the-other-key"])
def test_one_keys_signature_twice_does_not_meet_threshold_two(
    tmp_path: Path, digits: tuple[Path, dict[str, Any]], relabel: bool
) -> None:
    folder, card = digits
    Repository.init(tmp_path / "home", root_threshold=2, root_keys=2)
    repo = Repository(tmp_path / "home")
    repo.publish(folder / "int8.onnx", "digits", "1.0.0", card)
    first, second = repo.keys.signers("root")
    with RepoServer(repo.dir) as server:
        fetcher = ReleaseFetcher(tmp_path / "dev", server.url, repo.trusted_root(), 10**6, 10, runtimes=RUNTIMES)
        fetcher.refresh()
        root = _root_v2(repo)
        signature = first.sign(root.signed_bytes).to_dict()
        copy = {**signature, "keyid": second.public_key.keyid} if relabel else dict(signature)
        document = {"signatures": [signature, copy], "signed": root.signed.to_dict()}
        put(repo, "2.root.json", json.dumps(document).encode())
        expected = "UnsignedMetadataError" if relabel else "DeserializationError"
        assert refresh_failure(fetcher) == expected


def test_an_expired_timestamp_is_rejected(fleet: Fleet) -> None:
    fetcher = fleet.fetcher(clock=lambda: time.time() + 1.5 * DAY)
    assert refresh_failure(fetcher) == "ExpiredMetadataError"


def test_a_rolled_back_timestamp_is_rejected(fleet: Fleet) -> None:
    old_timestamp = (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    fleet.repo.publish(fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card)
    fetcher = fleet.fetcher()
    fetcher.refresh()  # the device has seen timestamp v3
    put(fleet.repo, "timestamp.json", old_timestamp)  # validly signed v2, replayed
    assert refresh_failure(fetcher) == "BadVersionNumberError"


def test_a_rolled_back_snapshot_is_rejected(fleet: Fleet) -> None:
    """An attacker with the timestamp key points a new timestamp at an older (validly signed) snapshot."""
    fleet.repo.publish(fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card)
    fetcher = fleet.fetcher()
    fetcher.refresh()
    timestamp = load(fleet.repo, "timestamp.json")
    old = (fleet.repo.metadata_dir / "2.snapshot.json").read_bytes()
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = meta(old, 2)
    put(fleet.repo, "timestamp.json", sign(timestamp, fleet.repo.keys.signer("timestamp")))
    assert refresh_failure(fetcher) == "BadVersionNumberError"


def test_rolled_back_targets_are_rejected(fleet: Fleet) -> None:
    """An attacker with the snapshot and timestamp keys points a new snapshot at older targets (before 1.1.0)."""
    fleet.repo.publish(fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card)
    fetcher = fleet.fetcher()
    fetcher.refresh()
    _, snapshot, _ = current(fleet.repo)
    old = (fleet.repo.metadata_dir / "2.targets.json").read_bytes()
    snapshot.signed.meta["targets.json"] = meta(old, 2)
    forge_snapshot_and_timestamp(fleet.repo, snapshot)
    assert refresh_failure(fetcher) == "BadVersionNumberError"


def test_clock_skew_and_a_clock_set_back(tmp_path: Path, digits: tuple[Path, dict[str, Any]]) -> None:
    """A clock far ahead sees valid metadata as expired; a clock set back cannot revive replayed old metadata
    on a device that has seen newer versions (version memory, not the clock, stops the replay)."""
    folder, card = digits
    now = time.time()
    Repository.init(tmp_path / "home", clock=lambda: now - 3 * DAY)
    Repository(tmp_path / "home", clock=lambda: now - 3 * DAY).publish(folder / "int8.onnx", "digits", "1.0.0", card)
    repo = Repository(tmp_path / "home")
    stale = (repo.metadata_dir / "timestamp.json").read_bytes()  # v2, expired two days ago
    assert repo.renew_online(now) == {"timestamp": 3}

    def device(name: str, clock: Callable[[], float]) -> ReleaseFetcher:
        return ReleaseFetcher(
            tmp_path / name, server.url, repo.trusted_root(), 10**6, 10, runtimes=RUNTIMES, clock=clock
        )

    with RepoServer(repo.dir) as server:
        assert refresh_failure(device("ahead", lambda: now + 2 * DAY)) == "ExpiredMetadataError"
        honest = device("honest", time.time)
        honest.refresh()
        put(repo, "timestamp.json", stale)
        set_back = device("honest", lambda: now - 3 * DAY)
        assert refresh_failure(set_back) == "BadVersionNumberError"
        # Only a device that never saw the newer versions, with its clock set back too, would take the stale one.
        device("fresh", lambda: now - 3 * DAY).refresh()


# --------------------------------------------------------------------------------------------------------------
# Attacks on the two-key rule: director and TUF must agree


def test_a_length_the_director_and_tuf_disagree_on_is_rejected(fleet: Fleet) -> None:
    fetcher = fleet.fetcher()
    state = verify_desired(
        fleet.desired({"digits": entry(fleet.release, length=fleet.release.length + 1)}),
        fleet.director_key,
        "dev-1",
        0,
        time.time(),
    )
    assert reason_of(lambda: fetcher.resolve(state.models["digits"])) == "length_mismatch"


def test_an_unpublished_build_signed_by_a_stolen_director_key_installs_nothing(fleet: Fleet) -> None:
    fetcher = fleet.fetcher()
    assert reason_of(lambda: fetcher.resolve(model(fleet.release, sha256="ab" * 32))) == "hash_mismatch"
    assert reason_of(lambda: fetcher.resolve(model(fleet.release, release=7))) == "release_mismatch"
    unpublished = model(fleet.release, target="models/digits/6.6.6/int8.onnx")
    assert reason_of(lambda: fetcher.resolve(unpublished)) == "not_in_targets"


def test_a_revoked_release_is_below_min_release(fleet: Fleet) -> None:
    second = fleet.repo.publish(fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card)
    fleet.repo.revoke("digits", "1.0.0")
    fetcher = fleet.fetcher()
    fetcher.refresh()
    assert reason_of(lambda: fetcher.resolve(model(fleet.release))) == "below_min_release"
    assert fetcher.resolve(model(second)).min_release == 2


def test_a_runtime_this_device_lacks_is_rejected(fleet: Fleet) -> None:
    fetcher = fleet.fetcher(runtimes=("tflite",))
    assert reason_of(lambda: fetcher.resolve(model(fleet.release))) == "incompatible_runtime"


def test_hardware_the_release_does_not_list_is_rejected(fleet: Fleet) -> None:
    other = fleet.repo.publish(
        fleet.model_dir / "int8.tflite", "digits", "1.1.0", fleet.card, hardware={"machines": ["riscv64"]}
    )
    assert platform.machine() != "riscv64"
    assert reason_of(lambda: fleet.fetcher().resolve(model(other))) == "incompatible_hardware"
    assert fleet.fetcher(device="rv", machine="riscv64").resolve(model(other)).release == 2


def test_a_traversal_path_in_a_desired_entry_is_rejected(fleet: Fleet) -> None:
    fetcher = fleet.fetcher()
    for path in ("models/digits/../../../etc/passwd", "models/digits/1.0.0/../x.onnx", "/etc/passwd", "models/d/v"):
        assert reason_of(lambda path=path: fetcher.resolve(model(fleet.release, target=path))) == "bad_target"


# --------------------------------------------------------------------------------------------------------------
# Attacks on the desired state


def desired_error(payload: bytes, key: Key, device: str = "dev-1", last_seq: int = 0, now: float | None = None) -> str:
    with pytest.raises(DesiredStateError) as err:
        verify_desired(payload, key, device, last_seq, time.time() if now is None else now)
    return err.value.reason


def test_desired_state_signed_by_the_wrong_key_is_rejected(fleet: Fleet) -> None:
    forged = fleet.desired({"digits": entry(fleet.release)}, signer=CryptoSigner.generate_ed25519())
    assert desired_error(forged, fleet.director_key) == "bad_signature"


def test_desired_state_changed_after_signing_is_rejected(fleet: Fleet) -> None:
    envelope = json.loads(fleet.desired({"digits": entry(fleet.release)}))
    envelope["signed"]["models"]["digits"]["target"] = "models/digits/6.6.6/int8.onnx"
    assert desired_error(json.dumps(envelope).encode(), fleet.director_key) == "bad_signature"
    envelope = json.loads(fleet.desired({"digits": entry(fleet.release)}))
    envelope["signatures"][0]["sig"] = "00" * 64
    assert desired_error(json.dumps(envelope).encode(), fleet.director_key) == "bad_signature"


def test_desired_state_for_another_device_is_rejected(fleet: Fleet) -> None:
    payload = fleet.desired({"digits": entry(fleet.release)}, device="dev-2")
    assert desired_error(payload, fleet.director_key, device="dev-1") == "wrong_device"


def test_a_replayed_desired_state_is_rejected(fleet: Fleet) -> None:
    payload = fleet.desired({"digits": entry(fleet.release)}, seq=5)
    assert verify_desired(payload, fleet.director_key, "dev-1", 4, time.time()).seq == 5
    assert desired_error(payload, fleet.director_key, last_seq=5) == "replayed_seq"
    older = fleet.desired({"digits": entry(fleet.release)}, seq=3)
    assert desired_error(older, fleet.director_key, last_seq=5) == "replayed_seq"


def test_an_expired_desired_state_is_rejected(fleet: Fleet) -> None:
    now = time.time()
    payload = fleet.desired({"digits": entry(fleet.release)}, issued=now - 7200, expires=now - 1)
    assert desired_error(payload, fleet.director_key, now=now) == "expired"


def test_desired_state_from_the_future_is_rejected(fleet: Fleet) -> None:
    """A device clock set back (or a state dated ahead) beyond the skew tolerance: act only once clocks agree."""
    now = time.time()
    payload = fleet.desired({"digits": entry(fleet.release)}, issued=now + 3600)
    assert desired_error(payload, fleet.director_key, now=now) == "issued_in_future"
    slightly_ahead = fleet.desired({"digits": entry(fleet.release)}, issued=now + 60)
    assert verify_desired(slightly_ahead, fleet.director_key, "dev-1", 0, now).seq == 1


def test_a_signed_traversal_path_is_rejected_after_the_signature(fleet: Fleet) -> None:
    """Even with the real director key (sign_desired itself refuses this), the device refuses the path."""
    now = time.time()
    signed = {
        "v": SCHEMA_VERSION,
        "type": "desired",
        "device_id": "dev-1",
        "seq": 1,
        "issued": now,
        "expires": now + 60,
        "campaign": None,
        "models": {"digits": entry(fleet.release, target="models/digits/../../../../etc/passwd")},
    }
    signature = fleet.repo.keys.signer("director").sign(canonical_json(signed))
    payload = canonical_json({"signed": signed, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]})
    assert desired_error(payload, fleet.director_key) == "bad_target"


def test_malformed_desired_payloads_are_rejected_before_parsing_fields(fleet: Fleet) -> None:
    good = fleet.desired({"digits": entry(fleet.release)})
    assert desired_error(b"{" + b" " * 70_000 + b"}", fleet.director_key) == "oversized"
    assert desired_error(b"not json", fleet.director_key) == "not_json"
    duplicated = b'{"signed": {}, ' + good[1:]  # a second "signed" key: parsers might disagree on which counts
    assert desired_error(duplicated, fleet.director_key) == "not_json"
    assert desired_error(b'{"signed": {}, "signatures": []}', fleet.director_key) == "bad_envelope"
    assert desired_error(b'{"signed": NaN, "signatures": []}', fleet.director_key) == "not_json"
    assert desired_error(b'{"signed": {"v": 1e999}, "signatures": []}', fleet.director_key) == "not_json"
    deep = b'{"signed": {"x": ' + b"[" * 5000 + b"]" * 5000 + b'}, "signatures": [{"keyid": "k", "sig": "00"}]}'
    assert desired_error(deep, fleet.director_key) == "not_json"


def test_many_devices_verify_concurrently(fleet: Fleet, tmp_path: Path) -> None:
    """Devices refresh and download from one server at once (the server is threaded; each client has its state)."""
    errors: list[BaseException] = []

    def run(device: str) -> None:
        try:
            fetcher = fleet.fetcher(device=device)
            fetcher.refresh()
            fetcher.download(fetcher.resolve(model(fleet.release)), tmp_path / device)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"dev-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert all((tmp_path / f"dev-{i}" / "digits-1.0.0.onnx").exists() for i in range(8))
