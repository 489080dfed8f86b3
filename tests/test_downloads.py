"""Target downloads under faults: a SIGKILL mid-transfer, servers that mishandle Range, a disk without room, and
which failures are worth retrying.

A real repository (``fleet.trust.repository``) on a free loopback port (``fleet.trust.repo_server`` with a handler
that records every request and lets a test answer target requests its own way, as a broken proxy would), and the
device's real ngclient-based :class:`agent.update.tuf_client.ReleaseFetcher`; kills hit a real child process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from fleet_fixtures import tiny_tmpfs, wait_for
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from agent.logs import _FIELDS
from agent.update.desired import DesiredModel
from agent.update.tuf_client import ReleaseFetcher, TrustError, VerifiedTarget
from fleet.trust.releases import ReleaseInfo
from fleet.trust.repo_server import RepoRequestHandler, RepoServer
from fleet.trust.repository import Repository

DAY = 86400.0
MIB = 1024 * 1024
#: Answers a target request its own way (return True) or leaves it to the real server (return False).
Fault = Callable[[RepoRequestHandler, bytes], bool]


@dataclass
class Repo:
    """A signed repository with one release of random bytes, served by a recording, fault-injecting server."""

    tmp: Path
    repo: Repository
    release: ReleaseInfo
    data: bytes
    #: (path, Range header) of every GET, in order.
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    fault: Fault | None = None
    server: RepoServer | None = None

    def serve(self) -> RepoServer:
        shared = self

        class Recording(RepoRequestHandler):
            def do_GET(self) -> None:
                shared.requests.append((self.path, self.headers.get("Range")))
                if self.path.startswith("/targets/") and shared.fault is not None:
                    data = (self.root / unquote(urlsplit(self.path).path).lstrip("/")).read_bytes()
                    with contextlib.suppress(OSError):  # the client may hang up (or be killed) first
                        if shared.fault(self, data):
                            return
                super().do_GET()

        self.server = RepoServer(self.repo.dir, handler=Recording).start()
        return self.server

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def target_ranges(self) -> list[str | None]:
        return [rng for path, rng in self.requests if path.startswith("/targets/")]

    def entry(self) -> DesiredModel:
        e = self.release.desired_entry()
        return DesiredModel(
            self.release.name, self.release.version, e["target"], e["release"], e["sha256"], e["length"]
        )

    def fetcher(self, state: Path, **options: Any) -> ReleaseFetcher:
        defaults: dict[str, Any] = {"max_download_bytes": 100 * MIB, "download_deadline_s": 20.0}
        return ReleaseFetcher(
            state, self.url, self.repo.trusted_root(), **(defaults | options), runtimes=["onnxruntime"]
        )

    def verified(self, state: Path, **options: Any) -> tuple[ReleaseFetcher, VerifiedTarget]:
        fetcher = self.fetcher(state, **options)
        fetcher.refresh()
        return fetcher, fetcher.resolve(self.entry())


def make_repo(tmp: Path, card: dict[str, Any], size: int, clock: Callable[[], float] = time.time) -> Repo:
    Repository.init(tmp / "home", clock=clock)
    repo = Repository(tmp / "home", clock=clock)
    model = tmp / "big.onnx"
    model.write_bytes(random.Random(size).randbytes(size))
    return Repo(tmp, repo, repo.publish(model, "big", "1.0.0", card), model.read_bytes())


@pytest.fixture
def card(example_model: Callable[[str], Path]) -> dict[str, Any]:
    return json.loads((example_model("good") / "card.json").read_text())


@pytest.fixture
def served(tmp_path: Path, card: dict[str, Any]) -> Iterator[Repo]:
    """A 1 MiB release."""
    r = make_repo(tmp_path, card, MIB)
    r.serve()
    yield r
    assert r.server is not None
    r.server.stop()


def reply(handler: RepoRequestHandler, status: int, body: bytes, headers: dict[str, str]) -> None:
    handler.send_response(status)
    for name, value in (headers | {"Content-Length": str(len(body))}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def cut_first_whole(answer_range: Fault) -> Fault:
    """The first whole-file answer breaks off at half (so the fetcher resumes); Range requests get ``answer_range``."""
    cut = [True]

    def fault(handler: RepoRequestHandler, data: bytes) -> bool:
        if handler.headers.get("Range") is not None:
            return answer_range(handler, data)
        if cut[0]:
            cut[0] = False
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data[: len(data) // 2])
            return True  # and the server closes the connection
        return False

    return fault


def status(code: int) -> Fault:
    def fault(handler: RepoRequestHandler, _data: bytes) -> bool:
        reply(handler, code, b"", {})
        return True

    return fault


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, _FIELDS, {}) for r in caplog.records if r.getMessage() == name]


def reason_of(call: Callable[[], Any]) -> TrustError:
    with pytest.raises(TrustError) as err:
        call()
    return err.value


# --------------------------------------------------------------------------------------------------------------
# 1. A download killed mid-transfer resumes with Range


CHILD = """
import json, sys
from pathlib import Path
from agent.update.desired import DesiredModel
from agent.update.tuf_client import ReleaseFetcher
a = json.loads(sys.argv[1])
fetcher = ReleaseFetcher(Path(a["state"]), a["url"], Path(a["root"]).read_bytes(), 10**8, 60, runtimes=["onnxruntime"])
fetcher.download(fetcher.resolve(DesiredModel(**a["model"])), Path(a["dest"]))
"""


def kill_mid_download(r: Repo, state: Path, dest: Path, send: int, rng: random.Random) -> Path | None:
    """A child process downloads the release; the server sends ``send`` bytes in random pieces and stalls; once the
    child has written them (or after 10 s) it is SIGKILLed. Returns the partial file left behind, if any."""
    sent, release = threading.Event(), threading.Event()

    def stall(handler: RepoRequestHandler, data: bytes) -> bool:
        handler.send_response(200)
        if send < len(data):  # else no length: the client reads until the connection closes, which it never does
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        at = 0
        while at < send:
            piece = data[at : min(send, at + rng.randint(1, 24_000))]
            handler.wfile.write(piece)
            handler.wfile.flush()
            at += len(piece)
            time.sleep(0.001)
        sent.set()
        release.wait(10)
        return True

    r.fault = stall
    args = {"state": str(state), "url": r.url, "root": str(r.repo.metadata_dir / "root.json"), "dest": str(dest),
            "model": {"name": r.release.name, "version": r.release.version, **r.release.desired_entry()}}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: sent.is_set() or child.poll() is not None, 30, "the server to send its part")
        partials = state / "tuf" / "partial"
        with contextlib.suppress(AssertionError):  # a buffered writer never gets there: measured below
            wait_for(lambda: sum(p.stat().st_size for p in partials.glob("*")) >= send, 10, "the partial file")
        assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
        if child.stderr:
            child.stderr.close()
    r.fault = None
    return next(iter((state / "tuf" / "partial").iterdir()), None)


def test_a_download_killed_mid_transfer_keeps_every_received_byte_and_resumes_with_range(served: Repo) -> None:
    """15 seeded kill points, 1 byte to the whole file: each partial holds every byte sent before the kill, and each
    next download asks for the rest with ``Range`` and verifies. With a buffered writer, 6 of 15 kills resumed with
    Range and 10 of 15 partials were short (the buffered tail lost; a small file's partial empty)."""
    rng = random.Random(20261203)
    kills, resumed, short = 15, 0, []
    for i in range(kills):
        send = min(int(2 ** rng.uniform(0, 20)), len(served.data) - 1)  # log-uniform: 1 B to 1 MiB
        state, dest = served.tmp / f"dev-{i}", served.tmp / f"models-{i}"
        part = kill_mid_download(served, state, dest, send, rng)
        have = part.stat().st_size if part else 0
        if have != send or (part and part.read_bytes() != served.data[:have]):
            short.append((send, have))
        asked = len(served.requests)
        fetcher, target = served.verified(state)
        path = fetcher.download(target, dest)  # verified by ngclient
        assert path.read_bytes() == served.data
        ranges = [rng_ for p, rng_ in served.requests[asked:] if p.startswith("/targets/")]
        resumed += ranges == [f"bytes={have}-"] and have > 0
    assert (resumed, short) == (kills, []), f"resumed with Range after {resumed}/{kills} kills; (sent, kept): {short}"


# --------------------------------------------------------------------------------------------------------------
# 2. A server that mishandles Range: one whole download instead


def wrong_start(handler: RepoRequestHandler, data: bytes) -> bool:
    """206, but from byte 0 (a proxy that ignores the offset and says so)."""
    reply(handler, 206, data, {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"})
    return True


def bad_content_range(handler: RepoRequestHandler, data: bytes) -> bool:
    start = int(str(handler.headers["Range"]).removeprefix("bytes=").rstrip("-"))
    reply(handler, 206, data[start:], {"Content-Range": f"bytes {start}-/{len(data)}"})
    return True


def refused_range(handler: RepoRequestHandler, data: bytes) -> bool:
    """416 for a range well inside the file."""
    reply(handler, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
    return True


def wrong_bytes(handler: RepoRequestHandler, data: bytes) -> bool:
    """206 with the right headers and the wrong bytes (the file's start instead of the asked offset)."""
    start = int(str(handler.headers["Range"]).removeprefix("bytes=").rstrip("-"))
    reply(handler, 206, data[: len(data) - start], {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
    return True


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (wrong_start, "wrong_start"),
        (bad_content_range, "bad_content_range"),
        (refused_range, "range_refused"),
        (wrong_bytes, "hash_mismatch_after_resume"),
    ],
)
def test_a_bad_answer_to_range_falls_back_to_one_whole_download(
    served: Repo, caplog: pytest.LogCaptureFixture, answer: Fault, why: str
) -> None:
    caplog.set_level(logging.INFO)
    fetcher, target = served.verified(served.tmp / "dev")
    served.fault = cut_first_whole(answer)
    path = fetcher.download(target, served.tmp / "models")
    assert path.read_bytes() == served.data
    half = len(served.data) // 2
    assert served.target_ranges() == [None, f"bytes={half}-", None]
    assert [e["why"] for e in events(caplog, "download_range_fallback")] == [why]
    assert not os.listdir(served.tmp / "dev/tuf/partial")


def test_a_file_that_fails_its_hash_whole_too_is_a_hash_mismatch_after_exactly_one_fallback(
    served: Repo, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong bytes from the first byte: the resumed file fails, the one whole retry fails too, and that is final."""
    caplog.set_level(logging.INFO)
    fetcher, target = served.verified(served.tmp / "dev")
    folder, _, name = target.path.rpartition("/")
    stored = served.repo.targets_dir / folder / f"{target.sha256}.{name}"
    stored.write_bytes(bytes(b ^ 0xFF for b in served.data))
    served.fault = cut_first_whole(lambda _h, _d: False)  # Range answered correctly, from the wrong file
    err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
    assert (err.reason, err.retryable) == ("hash_mismatch", False)
    assert served.target_ranges() == [None, f"bytes={len(served.data) // 2}-", None]
    assert len(events(caplog, "download_range_fallback")) == 1
    assert not os.listdir(served.tmp / "dev/tuf/partial")
    assert not (served.tmp / "models").exists() or not os.listdir(served.tmp / "models")


# --------------------------------------------------------------------------------------------------------------
# 3. No room: refused before the first byte


def test_a_partial_folder_without_room_refuses_the_download_before_any_request(served: Repo) -> None:
    state = served.tmp / "dev"
    with tiny_tmpfs(state / "tuf" / "partial") as partial:
        fetcher, target = served.verified(state)
        err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
        assert (err.reason, err.retryable) == ("disk_full", True)
        assert f"bytes needed in {partial}" in err.detail and "No space left" in err.detail
        assert served.target_ranges() == []  # not one byte of the target was asked for
        assert not os.listdir(partial)


def test_a_destination_without_room_for_the_verified_copy_refuses_the_download_before_any_request(
    served: Repo,
) -> None:
    """The partial file fits; ngclient's copy into the destination (another file system) would not."""
    with tiny_tmpfs(served.tmp / "models") as dest:
        fetcher, target = served.verified(served.tmp / "dev")
        err = reason_of(lambda: fetcher.download(target, dest))
        assert err.reason == "disk_full" and f"bytes needed in {dest}" in err.detail
        assert served.target_ranges() == []
        assert not os.listdir(dest) and not os.listdir(served.tmp / "dev/tuf/partial")


def test_a_complete_partial_from_an_earlier_attempt_needs_room_only_for_the_copy(served: Repo) -> None:
    """One file system of 3.5 MiB for the 1 MiB release: a fresh download fits (partial + copy + 1 MiB reserve);
    with the partial already complete, 1.5 MiB is free and only the copy and the reserve must fit."""
    with tiny_tmpfs(served.tmp / "disk", size="3584k") as disk:
        part = kill_mid_download(served, disk / "dev", served.tmp / "elsewhere", len(served.data), random.Random(1))
        assert part is not None and part.read_bytes() == served.data
        asked = len(served.requests)
        fetcher, target = served.verified(disk / "dev")
        assert fetcher.download(target, disk / "models").read_bytes() == served.data
        assert [p for p, _ in served.requests[asked:] if p.startswith("/targets/")] == []  # nothing downloaded again


# --------------------------------------------------------------------------------------------------------------
# 4. Which failures are worth retrying


def test_an_expired_repository_fails_the_refresh_as_retryable(tmp_path: Path, card: dict[str, Any]) -> None:
    """Signed ten days ago, never renewed: the timestamp expired; renewal (or a corrected clock) will fix it."""
    r = make_repo(tmp_path, card, 1000, clock=lambda: time.time() - 10 * DAY)
    server = r.serve()
    try:
        err = reason_of(r.fetcher(tmp_path / "dev").refresh)
    finally:
        server.stop()
    assert (err.reason, err.retryable) == ("tuf_refresh_failed", True)
    assert err.detail.startswith("ExpiredMetadataError")


def test_a_bad_signature_fails_the_refresh_as_not_retryable(served: Repo) -> None:
    timestamp = Metadata.from_bytes((served.repo.metadata_dir / "timestamp.json").read_bytes())
    timestamp.signed.version += 1
    timestamp.signatures.clear()
    timestamp.sign(CryptoSigner.generate_ecdsa())  # a key root does not list for timestamp
    (served.repo.metadata_dir / "timestamp.json").write_bytes(timestamp.to_bytes())
    err = reason_of(served.fetcher(served.tmp / "dev").refresh)
    assert (err.reason, err.retryable) == ("tuf_refresh_failed", False)
    assert err.detail.startswith("UnsignedMetadataError")


def test_server_errors_and_a_dead_server_are_retryable_and_a_missing_file_is_not(served: Repo) -> None:
    fetcher, target = served.verified(served.tmp / "dev")
    for code, retryable in ((503, True), (500, True), (404, False)):
        served.fault = status(code)
        err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
        assert (err.reason, err.retryable, f"HTTP {code}" in err.detail) == ("download_failed", retryable, True)
    assert served.server is not None
    served.server.stop()
    err = reason_of(served.fetcher(served.tmp / "dev").refresh)
    assert (err.reason, err.retryable) == ("tuf_refresh_failed", True)
    err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
    assert (err.reason, err.retryable) == ("download_failed", True)


def test_a_deadline_is_retryable_and_a_length_beyond_the_signed_one_is_not(served: Repo) -> None:
    fetcher, target = served.verified(served.tmp / "dev", download_deadline_s=0.5)

    def drip(handler: RepoRequestHandler, data: bytes) -> bool:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for at in range(0, len(data), 1000):
            handler.wfile.write(data[at : at + 1000])
            time.sleep(0.05)
        return True

    served.fault = drip
    err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
    assert (err.reason, err.retryable) == ("download_deadline", True)

    def longer(handler: RepoRequestHandler, data: bytes) -> bool:
        reply(handler, 200, data + b"more", {})
        return True

    served.fault = longer
    err = reason_of(lambda: fetcher.download(target, served.tmp / "models"))
    assert (err.reason, err.retryable) == ("length_mismatch", False)
