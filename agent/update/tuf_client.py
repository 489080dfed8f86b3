"""Releases through TUF: the repository's half of the two-key rule, and bounded, resumable downloads.

The director (:mod:`agent.update.desired`) names a target; this module accepts it only if the fleet's TUF repository, as
python-tuf's ngclient verifies it from the root this device was enrolled with, lists the same target. In order:

1. :meth:`ReleaseFetcher.refresh` runs ngclient's top-level update (root -> timestamp -> snapshot -> targets):
   signatures and thresholds, version rollback and expiry (freeze) checks are all ngclient's, as the spec says.
2. :meth:`ReleaseFetcher.resolve` requires TUF's target for the director's path to have the same sha256 and length,
   then reads the release's signed custom metadata: the same release counter, ``release >= min_release``
   (revocation), a runtime this device has, and this machine in the hardware list.
3. :meth:`ReleaseFetcher.download` checks the free space first, then downloads through ngclient, which verifies
   length and hashes, with :class:`~agent.update.fetcher.ResumingFetcher`: a deadline per file, Range resume after a
   cut or a kill, a whole download when a server mishandles Range. Local file names (the partial file, the result)
   are derived from checked values, never taken from the network.

Each failure is a :class:`TrustError` whose ``retryable`` tells transient causes from verdicts on signed content.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import platform
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    ExpiredMetadataError,
    LengthOrHashMismatchError,
    RepositoryError,
)
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater

from agent.canonical import strict_json
from agent.errors import EdgefleetError
from agent.files import fsync_path, is_disk_full
from agent.logs import event
from agent.targets import SUFFIX_BY_RUNTIME, parse_target_path
from agent.update.desired import DesiredModel
from agent.update.fetcher import DownloadDeadlineError, NoSpace, ResumedFileMismatch, ResumingFetcher

log = logging.getLogger(__name__)

#: HTTP statuses worth another try besides 5xx: a request timeout, too many requests.
_RETRYABLE_STATUS = frozenset({408, 429})


class TrustError(EdgefleetError):
    """A release this device must not install, or not now. ``reason`` is short and stable (a counter key); ``detail``
    explains.

    ``retryable`` says whether the same attempt may succeed later with nothing signed changed, which reasons alone do
    not (``tuf_refresh_failed`` is a dead link or a forged signature): True for transient causes (the network, an HTTP
    5xx, 408 or 429, a deadline, metadata expired until ``fleet serve`` renews it or the clock is corrected, a full
    disk); False for what the signed bytes are (signature, threshold, rollback, hash, length), every decision on
    signed content (revoked, incompatible, too large) and other HTTP 4xx. Retry only what says True.
    """

    def __init__(self, reason: str, detail: str = "", *, retryable: bool = False) -> None:
        super().__init__(reason, detail)
        self.retryable = retryable


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


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` may not happen on a later try: see :class:`TrustError`."""
    if isinstance(exc, DownloadHTTPError):
        return exc.status_code >= 500 or exc.status_code in _RETRYABLE_STATUS
    if isinstance(exc, DownloadLengthMismatchError):
        return False
    if isinstance(exc, OSError):
        return is_disk_full(exc)
    return isinstance(exc, DownloadError | ExpiredMetadataError)


def _refresh_failed(exc: Exception) -> TrustError:
    return TrustError("tuf_refresh_failed", f"{type(exc).__name__}: {exc}", retryable=_transient(exc))


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
            failed = _refresh_failed(exc)
            event(log, "tuf_refresh_failed", logging.WARNING, error=type(exc).__name__, retryable=failed.retryable,
                  detail=str(exc)[:200])  # fmt: skip
            raise failed from exc
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

        Nothing is requested unless the partial folder and ``dest_dir`` have room (``disk_full`` up front; see
        :meth:`~agent.update.fetcher.ResumingFetcher.copying_to`). The result never exists half-written: ngclient
        copies the file into a hidden temporary name only after its length and hash checks passed, and that name is
        renamed into place after an fsync, or removed on failure. A file put together from resumed responses that
        fails the checks is downloaded once more, whole (``download_range_fallback``); failing again, it is
        ``hash_mismatch`` (or ``length_mismatch``) and never retried here.
        """
        final = dest_dir / f"{target.name}-{target.version}{SUFFIX_BY_RUNTIME[target.runtime]}"
        temp = dest_dir / f".{final.name}.download"
        updater = self._current()
        started = time.monotonic()
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            with self._fetcher.copying_to(dest_dir):
                try:
                    updater.download_target(target.targetinfo, str(temp))
                except ResumedFileMismatch as exc:
                    event(log, "download_range_fallback", logging.WARNING, url=target.path,
                          why="hash_mismatch_after_resume", detail=str(exc)[:200])  # fmt: skip
                    updater.download_target(target.targetinfo, str(temp))  # the partial is gone: from byte 0
            fsync_path(temp)
            os.replace(temp, final)
            fsync_path(dest_dir)
        except DownloadDeadlineError as exc:
            raise self._failed("download_deadline", exc, target, retryable=True) from exc
        except DownloadLengthMismatchError as exc:
            raise self._failed("length_mismatch", exc, target) from exc
        except LengthOrHashMismatchError as exc:
            raise self._failed("hash_mismatch", exc, target) from exc
        except DownloadError as exc:
            raise self._failed("download_failed", exc, target, retryable=_transient(exc)) from exc
        except NoSpace as exc:
            raise self._failed("disk_full", exc, target, retryable=True, detail=exc.strerror) from exc
        except OSError as exc:
            full = is_disk_full(exc)
            raise self._failed("disk_full" if full else "io_error", exc, target, retryable=full) from exc
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
    def _failed(
        reason: str, exc: BaseException, target: VerifiedTarget, *, retryable: bool = False, detail: str | None = None
    ) -> TrustError:
        detail = (detail or f"{type(exc).__name__}: {exc}")[:300]
        event(log, "download_failed", logging.WARNING, reason=reason, target=target.path, retryable=retryable,
              detail=detail)  # fmt: skip
        return TrustError(reason, detail, retryable=retryable)
