"""Releases through TUF: the repository's half of the two-key rule, and bounded, resumable downloads.

The director (:mod:`agent.update.desired`) names a target; this module accepts it only if the fleet's TUF repository, as
python-tuf's ngclient verifies it from the root this device was enrolled with, lists the same target. In order:

1. :meth:`ReleaseFetcher.refresh` runs ngclient's top-level update (root -> timestamp -> snapshot -> targets):
   signatures and thresholds, version rollback and expiry (freeze) checks are all ngclient's, as the spec says.
2. :meth:`ReleaseFetcher.resolve` requires TUF's target for the director's path to have the same sha256 and length,
   then reads the release's signed custom metadata: the same release counter, ``release >= min_release``
   (revocation), a runtime this device has, and this machine in the hardware list.
3. :meth:`ReleaseFetcher.download` downloads through ngclient, which verifies length and hashes, with
   :class:`ResumingFetcher`: a deadline per file and Range resume after a cut. Local file names (the partial file,
   the result) are derived here from checked values, never taken from the network.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.client
import logging
import os
import platform
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    LengthOrHashMismatchError,
    RepositoryError,
)
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent import __version__
from agent.canonical import strict_json
from agent.errors import EdgefleetError
from agent.files import fsync_path
from agent.logs import event
from agent.targets import SUFFIX_BY_RUNTIME, parse_target_path
from agent.update.desired import DesiredModel

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_USER_AGENT = f"edgefleet-agent/{__version__}"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class TrustError(EdgefleetError):
    """A release this device must not install. ``reason`` is short and stable (a counter key); ``detail`` explains."""


class DownloadDeadlineError(DownloadError):
    """The file did not arrive within its deadline (a slow-drip server, or a link too slow for this file)."""


class DownloadInterrupted(DownloadError):
    """The connection broke or stalled mid-transfer; a target download resumes from where it stopped."""


@dataclass(frozen=True)
class VerifiedTarget:
    """A release both keys agree on: the director's entry matched TUF's target and its signed custom metadata."""

    name: str
    version: str
    path: str
    release: int
    min_release: int
    sha256: str
    length: int
    runtime: str
    machines: tuple[str, ...]
    #: The signed model card: I/O schema, quantization, drift reference, smoke test, provenance.
    card: Mapping[str, Any]
    targetinfo: TargetFile = field(repr=False, compare=False)


class ResumingFetcher(FetcherInterface):
    """HTTP(S) for ngclient with a deadline per file, and Range resume for target files.

    ngclient's default fetchers read whole files into an anonymous temporary file: a cut at 90 % restarts from zero
    and a server dripping bytes holds the agent for as long as it likes. Here every file has a wall-clock deadline
    that no read waits past, and target files (URLs under ``targets_url``) grow in ``partial_dir`` under a name
    derived from the URL, resuming with ``Range`` after a cut (up to ``max_resumes`` cuts per call), within one call
    or a later one, even after a restart. ngclient still verifies the length and hashes of what this yields; the
    partial file is deleted once it has been yielded, verified or not, so bytes that failed verification are never
    resumed from.
    """

    def __init__(
        self,
        partial_dir: Path,
        targets_url: str,
        deadline_s: float,
        *,
        read_timeout_s: float = 30.0,
        max_resumes: int = 5,
    ) -> None:
        self._partial_dir = partial_dir
        self._targets_url = targets_url
        self._deadline_s = deadline_s
        self._read_timeout_s = read_timeout_s
        self._max_resumes = max_resumes

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Metadata: one GET under the deadline (files are small and each is bounded by ngclient)."""
        deadline = time.monotonic() + self._deadline_s
        conn, resp, sock = self._open(url, 0, deadline)
        if resp.status != 200:
            resp.close()
            conn.close()
            raise DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return self._whole_body(conn, resp, sock, deadline)

    def _whole_body(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, sock: socket.socket, deadline: float
    ) -> Iterator[bytes]:
        try:
            total = _content_length(resp)
            received = 0
            for chunk in self._chunks(resp, sock, deadline):
                received += len(chunk)
                yield chunk
            if total is not None and received < total:
                raise DownloadInterrupted(f"connection closed at byte {received} of {total}")
        finally:
            resp.close()
            conn.close()

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        if not url.startswith(self._targets_url):
            with super().download_file(url, max_length) as temp_file:
                yield temp_file
            return
        # Named by the path under the targets URL: hash-prefixed with consistent snapshots, so the same partial
        # resumes from any mirror, and bytes that do not belong to it fail verification and are dropped.
        relative = url[len(self._targets_url) :]
        part = self._partial_dir / (hashlib.sha256(relative.encode()).hexdigest() + ".part")
        self._fill(url, part, max_length)
        try:
            with open(part, "rb") as done:
                yield done
        finally:
            part.unlink(missing_ok=True)

    def _fill(self, url: str, part: Path, max_length: int) -> None:
        deadline = time.monotonic() + self._deadline_s
        cuts = 0
        while True:
            try:
                self._resume(url, part, max_length, deadline)
                return
            except DownloadLengthMismatchError:
                part.unlink(missing_ok=True)  # more bytes than signed: this is not the file
                raise
            except OSError as exc:
                if exc.errno in _DISK_FULL:  # do not keep a full disk full for a download that cannot finish
                    part.unlink(missing_ok=True)
                raise
            except DownloadInterrupted as exc:
                cuts += 1
                if cuts > self._max_resumes:
                    raise
                have = part.stat().st_size if part.exists() else 0
                event(log, "download_resume", logging.WARNING, url=url, have=have, cuts=cuts, why=str(exc))

    def _resume(self, url: str, part: Path, max_length: int, deadline: float) -> None:
        """Append to ``part`` from where it ends; return when the server's whole file is there."""
        have = part.stat().st_size if part.exists() else 0
        if have > max_length:  # cannot be a prefix of this file
            part.unlink()
            have = 0
        if have == max_length:  # complete from an earlier attempt; ngclient verifies it
            return
        conn, resp, sock = self._open(url, have, deadline)
        try:
            if resp.status == 206:
                start, total = _content_range(resp.getheader("Content-Range", ""))
                if start != have:
                    raise DownloadError(f"{url}: server resumed at byte {start}, asked for {have}")
                mode = "ab"
            elif resp.status == 200:  # the server ignored Range: start over
                start, total, mode = 0, _content_length(resp), "wb"
            elif resp.status == 416:  # our partial is longer than the server's file: it is not this file
                part.unlink()
                raise DownloadInterrupted("server refused the resume range")
            else:
                raise DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
            if total is not None and total > max_length:
                raise DownloadLengthMismatchError(f"{url}: server has {total} bytes, signed length is {max_length}")
            received = start
            with open(part, mode) as out:
                for chunk in self._chunks(resp, sock, deadline):
                    received += len(chunk)
                    if received > max_length:
                        raise DownloadLengthMismatchError(f"{url}: more than the signed {max_length} bytes")
                    out.write(chunk)
            if total is not None and received < total:
                raise DownloadInterrupted(f"connection closed at byte {received} of {total}")
        finally:
            resp.close()
            conn.close()

    def _open(
        self, url: str, offset: int, deadline: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, socket.socket]:
        parts = urlsplit(url)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.netloc)
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.netloc)
        else:
            raise DownloadError(f"unsupported URL scheme {parts.scheme!r}")
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        wait = self._wait(deadline)
        conn.timeout = wait
        try:
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            sock = conn.sock
            resp = conn.getresponse()
        except TimeoutError as exc:
            conn.close()
            raise self._timed_out(wait) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DownloadInterrupted(f"{type(exc).__name__}: {exc}") from exc
        return conn, resp, sock

    def _chunks(self, resp: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> Iterator[bytes]:
        """Yield the body as it arrives; ``read1`` returns after one receive, so the deadline is checked often."""
        while True:
            wait = self._wait(deadline)
            sock.settimeout(wait)
            try:
                chunk = resp.read1(_CHUNK)
            except TimeoutError as exc:
                raise self._timed_out(wait) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadInterrupted(f"{type(exc).__name__}: {exc}") from exc
            if not chunk:
                return
            yield chunk

    def _wait(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DownloadDeadlineError(f"not done within {self._deadline_s} s")
        return min(remaining, self._read_timeout_s)

    def _timed_out(self, wait: float) -> DownloadError:
        if wait < self._read_timeout_s:  # the wait was cut short by the deadline
            return DownloadDeadlineError(f"not done within {self._deadline_s} s")
        return DownloadInterrupted(f"no data for {wait} s")


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    if value is None:
        return None
    if not value.isdigit():
        raise DownloadError(f"bad Content-Length {value[:40]!r}")
    return int(value)


def _content_range(value: str) -> tuple[int, int | None]:
    """Parse ``bytes <start>-<end>/<total or *>`` into (start, total)."""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    start, _, end = span.partition("-")
    if unit != "bytes" or not (start.isdigit() and end.isdigit()) or not (total.isdigit() or total == "*"):
        raise DownloadError(f"bad Content-Range {value[:60]!r}")
    return int(start), int(total) if total.isdigit() else None


def _pin_reference_time(updater: Updater, now: float) -> None:
    """Make ngclient judge expiry by this device's clock.

    ngclient compares expiry with the time its trusted set was created and has no public clock hook; the device (and
    the simulator's clock-skew faults) must use one clock throughout, so it is set on that one attribute. If python-tuf
    renames it this fails loudly rather than silently checking against another clock.
    """
    trusted = updater._trusted_set
    if not isinstance(getattr(trusted, "reference_time", None), datetime):
        raise RuntimeError("python-tuf changed TrustedMetadataSet.reference_time; update _pin_reference_time")
    trusted.reference_time = datetime.fromtimestamp(now, UTC)


def _release_metadata(info: TargetFile, name: str, version: str) -> dict[str, Any]:
    """Read the fleet's signed custom metadata of one target (see ``fleet.trust.repository``), strictly."""
    custom = info.custom
    expected = {"name": str, "version": str, "release": int, "min_release": int, "runtime": str, "hardware": dict}
    if not isinstance(custom, dict):
        raise TrustError("bad_release_metadata", f"{info.path}: no custom metadata")
    for key, kind in expected.items():
        value = custom.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TrustError("bad_release_metadata", f"{info.path}: {key} is not {kind.__name__}")
    if (custom["name"], custom["version"]) != (name, version):
        raise TrustError("bad_release_metadata", f"{info.path}: name/version differ from the target path")
    machines = custom["hardware"].get("machines")
    if not isinstance(machines, list) or not all(isinstance(m, str) for m in machines):
        raise TrustError("bad_release_metadata", f"{info.path}: hardware.machines is not a list of names")
    try:
        card = strict_json(custom.get("card", ""))
    except (TypeError, ValueError) as exc:
        raise TrustError("bad_release_metadata", f"{info.path}: card: {exc}") from None
    if not isinstance(card, dict):
        raise TrustError("bad_release_metadata", f"{info.path}: card is not an object")
    return {**custom, "machines": tuple(machines), "card": card}


def _refresh_failed(exc: Exception) -> TrustError:
    return TrustError("tuf_refresh_failed", f"{type(exc).__name__}: {exc}")


class ReleaseFetcher:
    """The device's TUF client: refresh, check a director entry against TUF, download the verified file.

    ``trusted_root`` is the root.json the device was enrolled with. It is the trust anchor of every refresh: ngclient
    keeps it and every later root it verified under ``state_dir/tuf/metadata/`` (with the timestamp, snapshot and
    targets it has seen, which is what makes rollbacks detectable across restarts). The repository is
    ``<repo_url>/metadata/`` and ``<repo_url>/targets/``. ``runtimes`` are the runtimes this device can load;
    ``machine`` defaults to ``platform.machine()``; ``clock`` is the device clock (unix seconds) for expiry checks.
    Not thread-safe: one fetcher per device, used from one thread.
    """

    def __init__(
        self,
        state_dir: Path,
        repo_url: str,
        trusted_root: bytes,
        max_download_bytes: int,
        download_deadline_s: float,
        *,
        runtimes: Collection[str],
        machine: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        base = repo_url.rstrip("/")
        self._metadata_url = f"{base}/metadata/"
        self._targets_url = f"{base}/targets/"
        self._metadata_dir = state_dir / "tuf" / "metadata"
        partial_dir = state_dir / "tuf" / "partial"
        for folder in (self._metadata_dir, partial_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._trusted_root = trusted_root
        self._max_download_bytes = max_download_bytes
        self._runtimes = frozenset(runtimes)
        self._machine = machine or platform.machine()
        self._clock = clock
        self._fetcher = ResumingFetcher(partial_dir, self._targets_url, download_deadline_s)
        self._updater: Updater | None = None

    def refresh(self) -> None:
        """Load the newest trusted top-level metadata (ngclient's workflow); raises ``tuf_refresh_failed``.

        After a failed refresh nothing resolves against older metadata: the next call refreshes again.
        """
        self._updater = None
        self._updater = self._refreshed_updater()

    def _current(self) -> Updater:
        if self._updater is None:
            self._updater = self._refreshed_updater()
        return self._updater

    def _refreshed_updater(self) -> Updater:
        """ngclient refreshes once per ``Updater``, so each refresh starts a new one from the enrolled root."""
        try:
            updater = Updater(
                str(self._metadata_dir),
                self._metadata_url,
                target_base_url=self._targets_url,
                fetcher=self._fetcher,
                bootstrap=self._trusted_root,
            )
            _pin_reference_time(updater, self._clock())
            updater.refresh()
        except (RepositoryError, DownloadError, OSError) as exc:
            event(log, "tuf_refresh_failed", logging.WARNING, error=type(exc).__name__, detail=str(exc)[:200])
            raise _refresh_failed(exc) from exc
        return updater

    def resolve(self, entry: DesiredModel) -> VerifiedTarget:
        """Return the release for a director entry if TUF agrees and this device can run it; else raise TrustError."""
        try:
            name, version, _ = parse_target_path(entry.target)
        except ValueError as exc:
            raise self._reject("bad_target", str(exc), entry) from None
        try:
            info = self._current().get_targetinfo(entry.target)
        except (RepositoryError, DownloadError, OSError) as exc:
            raise _refresh_failed(exc) from exc
        if info is None:
            raise self._reject("not_in_targets", entry.target, entry)
        if info.length != entry.length:
            raise self._reject("length_mismatch", f"TUF says {info.length} bytes, director {entry.length}", entry)
        tuf_sha256 = info.hashes.get("sha256", "")
        if not hmac.compare_digest(tuf_sha256.encode(), entry.sha256.encode()):
            raise self._reject("hash_mismatch", "TUF and the director disagree on sha256", entry)
        try:
            meta = _release_metadata(info, name, version)
        except TrustError as exc:
            raise self._reject(exc.reason, exc.detail, entry) from None
        if meta["release"] != entry.release:
            raise self._reject("release_mismatch", f"TUF release {meta['release']}, director {entry.release}", entry)
        if meta["release"] < meta["min_release"]:
            raise self._reject("below_min_release", f"release {meta['release']} < {meta['min_release']}", entry)
        if meta["runtime"] not in self._runtimes or meta["runtime"] not in SUFFIX_BY_RUNTIME:
            raise self._reject("incompatible_runtime", f"{meta['runtime']} not in {sorted(self._runtimes)}", entry)
        if self._machine not in meta["machines"]:
            raise self._reject("incompatible_hardware", f"{self._machine} not in {list(meta['machines'])}", entry)
        if info.length > self._max_download_bytes:
            raise self._reject("too_large", f"{info.length} bytes > {self._max_download_bytes}", entry)
        return VerifiedTarget(
            name=name,
            version=version,
            path=info.path,
            release=meta["release"],
            min_release=meta["min_release"],
            sha256=tuf_sha256,
            length=info.length,
            runtime=meta["runtime"],
            machines=meta["machines"],
            card=meta["card"],
            targetinfo=info,
        )

    def download(self, target: VerifiedTarget, dest_dir: Path) -> Path:
        """Download and verify ``target`` into ``dest_dir/<name>-<version><suffix>`` (fsynced, renamed into place).

        The result never exists half-written: ngclient copies the file into a hidden temporary name only after its
        length and hash checks passed, and that name is renamed into place after an fsync, or removed on failure.
        """
        final = dest_dir / f"{target.name}-{target.version}{SUFFIX_BY_RUNTIME[target.runtime]}"
        temp = dest_dir / f".{final.name}.download"
        updater = self._current()
        started = time.monotonic()
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            updater.download_target(target.targetinfo, str(temp))
            fsync_path(temp)
            os.replace(temp, final)
            fsync_path(dest_dir)
        except DownloadDeadlineError as exc:
            raise self._failed("download_deadline", exc, target) from exc
        except DownloadLengthMismatchError as exc:
            raise self._failed("length_mismatch", exc, target) from exc
        except LengthOrHashMismatchError as exc:
            raise self._failed("hash_mismatch", exc, target) from exc
        except DownloadError as exc:
            raise self._failed("download_failed", exc, target) from exc
        except OSError as exc:
            raise self._failed("disk_full" if exc.errno in _DISK_FULL else "io_error", exc, target) from exc
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
        event(
            log,
            "release_downloaded",
            target=target.path,
            release=target.release,
            bytes=target.length,
            seconds=round(time.monotonic() - started, 3),
        )
        return final

    @staticmethod
    def _reject(reason: str, detail: str, entry: DesiredModel) -> TrustError:
        event(log, "release_rejected", logging.WARNING, reason=reason, target=entry.target[:300], detail=detail)
        return TrustError(reason, detail)

    @staticmethod
    def _failed(reason: str, exc: BaseException, target: VerifiedTarget) -> TrustError:
        detail = f"{type(exc).__name__}: {exc}"[:300]
        event(log, "download_failed", logging.WARNING, reason=reason, target=target.path, detail=detail)
        return TrustError(reason, detail)
