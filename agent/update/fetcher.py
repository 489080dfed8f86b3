"""HTTP for ngclient: a deadline per file, and target downloads that survive a cut, a SIGKILL and a bad proxy.

:class:`ResumingFetcher` is the ``FetcherInterface`` :class:`agent.update.tuf_client.ReleaseFetcher` gives ngclient.
Metadata is one bounded GET. A target file grows in a partial file that outlives the call and the process, and
resumes with ``Range``. Whatever this module yields, ngclient verifies (length and hashes) before it is used.

Faults, and what they leave:

- A cut or a stall: the partial file keeps every byte received; the same call resumes (up to ``max_resumes`` cuts),
  or a later one does. Writes are unbuffered, so a SIGKILL loses nothing received (with Python's buffered writer it
  lost the buffered tail, and a small file's whole partial: 6 of 15 seeded kills resumed with Range, 10 of 15
  partials were short); an fsync every :data:`SYNC_EVERY` bytes bounds what a power cut loses.
- A bad answer to ``Range`` (206 from the wrong byte, a Content-Range that does not parse, 416 for a range inside
  the file): the partial is dropped and the same call downloads the file once whole, without Range
  (``download_range_fallback``). A resumed file that fails ngclient's check raises :class:`ResumedFileMismatch`, for
  the caller's one whole retry.
- No room: :class:`NoSpace` before the first byte is requested (see :meth:`ResumingFetcher.copying_to`).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    LengthOrHashMismatchError,
)
from tuf.ngclient.fetcher import FetcherInterface

from agent import __version__
from agent.files import is_disk_full
from agent.logs import event

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_USER_AGENT = f"edgefleet-agent/{__version__}"
#: The partial file is fsynced each time this much more arrived, so a power cut loses at most this much. Measured
#: (docs/performance.md, virtio disk): 256 MiB in 64 KiB writes, median of 7, 0.69 s with these fsyncs against 0.67 s
#: with one at the end; at most ~0.1 s per 256 MiB, under 1 % of the 21 s the bytes take to arrive at 100 Mbit/s.
SYNC_EVERY = 4 * 1024 * 1024
#: Free space kept beyond a download's own bytes: the card written beside it, the install's state rows, block slack.
SPACE_RESERVE = 1024 * 1024


class DownloadDeadlineError(DownloadError):
    """The file did not arrive within its deadline (a slow-drip server, or a link too slow for this file)."""


class DownloadInterrupted(DownloadError):
    """The connection broke or stalled mid-transfer; a target download resumes from where it stopped."""


class BadRangeAnswer(DownloadError):
    """The server (or a proxy) answered a Range request wrongly; ``why`` is short and stable (an event field)."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(detail)
        self.why = why


class ResumedFileMismatch(LengthOrHashMismatchError):
    """A file put together from more than one response (or from an earlier attempt's partial) failed ngclient's length
    or hash check: some answer to a Range had the wrong bytes. The partial is gone; a whole download may follow."""


class NoSpace(OSError):
    """Not enough free space for a download and its verified copy; raised before the first byte is requested."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.ENOSPC, detail)


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
        self._copy_dir: Path | None = None

    @contextmanager
    def copying_to(self, folder: Path) -> Iterator[None]:
        """Within the block, target downloads also need room in ``folder`` (which must exist) for the verified copy.

        ngclient copies a verified file to its destination before the partial file is deleted, so a download needs its
        missing bytes in ``partial_dir`` plus the whole file in ``folder`` (twice the file on one file system), plus
        :data:`SPACE_RESERVE` on each file system written to. What is missing raises :class:`NoSpace` up front.
        """
        self._copy_dir = folder
        try:
            yield
        finally:
            self._copy_dir = None

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
        self._check_space(part, max_length)
        mixed = self._fill(url, part, max_length)  # a failure keeps the partial for the next call
        try:
            with open(part, "rb") as done:
                try:
                    yield done
                except LengthOrHashMismatchError as exc:
                    if mixed:
                        raise ResumedFileMismatch(str(exc)) from exc
                    raise
        finally:
            part.unlink(missing_ok=True)

    def _check_space(self, part: Path, max_length: int) -> None:
        """Raise :class:`NoSpace` unless each file system has room for what is still to be written to it."""
        have = _size(part)
        have = have if have <= max_length else 0  # a longer partial is dropped: it cannot be a prefix
        writes = [(self._partial_dir, max_length - have)]
        if self._copy_dir is not None:
            writes.append((self._copy_dir, max_length))
        needed: dict[int, tuple[Path, int]] = {}
        for folder, size in writes:
            device = os.stat(folder).st_dev
            first, total = needed.get(device, (folder, 0))
            needed[device] = (first, total + size)
        for folder, size in needed.values():
            free = shutil.disk_usage(folder).free
            if size and free < size + SPACE_RESERVE:
                raise NoSpace(
                    f"{size + SPACE_RESERVE} bytes needed in {folder}, {free} free: free space there or move the"
                    " agent's state_dir to a larger disk (No space left on device)"
                )

    def _fill(self, url: str, part: Path, max_length: int) -> bool:
        """Complete ``part``; return whether it holds bytes of more than one response (what a bad Range can spoil)."""
        deadline = time.monotonic() + self._deadline_s
        cuts = 0
        ranged = True
        while True:
            try:
                return self._resume(url, part, max_length, deadline, ranged)
            except DownloadLengthMismatchError:
                part.unlink(missing_ok=True)  # more bytes than signed: this is not the file
                raise
            except OSError as exc:
                if is_disk_full(exc):  # do not keep a full disk full for a download that cannot finish
                    part.unlink(missing_ok=True)
                raise
            except BadRangeAnswer as exc:
                part.unlink(missing_ok=True)
                if not ranged:  # the one whole download got a range answer too: this server cannot serve the file
                    raise
                ranged = False
                event(log, "download_range_fallback", logging.WARNING, url=url, why=exc.why, detail=str(exc)[:200])
            except DownloadInterrupted as exc:
                cuts += 1
                if cuts > self._max_resumes:
                    raise
                have = _size(part)
                event(log, "download_resume", logging.WARNING, url=url, have=have, cuts=cuts, why=str(exc))

    def _resume(self, url: str, part: Path, max_length: int, deadline: float, ranged: bool) -> bool:
        """Append to ``part`` from where it ends (or, not ``ranged``, rewrite it whole); return when the server's whole
        file is there, and whether bytes already in ``part`` were kept."""
        have = _size(part) if ranged else 0
        if have > max_length:  # cannot be a prefix of this file
            have = 0
        if have == max_length:  # complete from an earlier attempt; ngclient verifies it
            return True
        conn, resp, sock = self._open(url, have, deadline)
        try:
            if resp.status == 206:
                start, total = _content_range(resp.getheader("Content-Range", ""))
                if start != have:
                    raise BadRangeAnswer("wrong_start", f"{url}: server resumed at byte {start}, asked for {have}")
                kept = have > 0
            elif resp.status == 200:  # the server ignored Range (as it may): start over
                start, total, kept = 0, _content_length(resp), False
            elif resp.status == 416 and have:  # a range inside the file, refused
                raise BadRangeAnswer("range_refused", f"{url}: HTTP 416 for bytes={have}- of {max_length}")
            else:
                raise DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
            if total is not None and total > max_length:
                raise DownloadLengthMismatchError(f"{url}: server has {total} bytes, signed length is {max_length}")
            received = synced = start
            # Unbuffered: each chunk is in the kernel once written, so a SIGKILL loses nothing received.
            with open(part, "ab" if kept else "wb", buffering=0) as out:
                for chunk in self._chunks(resp, sock, deadline):
                    received += len(chunk)
                    if received > max_length:
                        raise DownloadLengthMismatchError(f"{url}: more than the signed {max_length} bytes")
                    _write_all(out, chunk)
                    if received - synced >= SYNC_EVERY:
                        os.fsync(out.fileno())
                        synced = received
            if total is not None and received < total:
                raise DownloadInterrupted(f"connection closed at byte {received} of {total}")
            return kept
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_all(out: IO[bytes], data: bytes) -> None:
    """An unbuffered write may write less than asked (near a full disk); the rest goes on, or raises ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) or 0 :]


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    if value is None:
        return None
    if not value.isdigit():
        raise DownloadError(f"bad Content-Length {value[:40]!r}")
    return int(value)


def _content_range(value: str) -> tuple[int, int | None]:
    """Parse ``bytes <start>-<end>/<total or *>`` into (start, total); :class:`BadRangeAnswer` if it does not parse."""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    start, _, end = span.partition("-")
    if unit != "bytes" or not (start.isdigit() and end.isdigit()) or not (total.isdigit() or total == "*"):
        raise BadRangeAnswer("bad_content_range", f"bad Content-Range {value[:60]!r}")
    return int(start), int(total) if total.isdigit() else None
