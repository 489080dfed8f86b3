"""A read-only HTTP server for the TUF repository: ``metadata/`` and ``targets/``, with Range for resumed downloads.

Everything it serves is signed, so the server is trusted with nothing but availability; it still refuses to be a
way into the file system: only GET/HEAD, only regular files under ``<root>/metadata/`` and ``<root>/targets/``, no
directory listings, no hidden files (a change's temporary files are dot-files), no ``..``, and no symlink out of the
root. Each response is read from one open file, so a concurrent rename of timestamp.json never mixes two versions.
Any static server, CDN or bucket can serve the same folders instead.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from agent.logs import event

log = logging.getLogger(__name__)

SERVED_FOLDERS = frozenset({"metadata", "targets"})
#: Files whose content changes under the same name; everything else (versioned, hash-prefixed) never changes.
_MUTABLE = frozenset({"timestamp.json", "root.json"})
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 64 * 1024


class RepoRequestHandler(BaseHTTPRequestHandler):
    """Serves one request. Subclasses may override :meth:`send_body` (tests inject cuts and slow drips there)."""

    server_version = "edgefleet-repo"
    root: Path

    def __init__(self, *args: Any, root: Path, **kwargs: Any) -> None:
        self.root = root
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = self._resolve(self.path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        try:
            f = path.open("rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            try:
                span = _parse_range(self.headers.get("Range"), size)
            except ValueError:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = span if span is not None else (0, size - 1)
            self.send_response(HTTPStatus.OK if span is None else HTTPStatus.PARTIAL_CONTENT)
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header(
                "Content-Type", "application/json" if path.suffix == ".json" else "application/octet-stream"
            )
            self.send_header("Accept-Ranges", "bytes")
            immutable = path.name not in _MUTABLE
            self.send_header("Cache-Control", "public, max-age=31536000, immutable" if immutable else "no-cache")
            self.end_headers()
            if body:
                f.seek(start)
                try:
                    self.send_body(f, end - start + 1)
                except (BrokenPipeError, ConnectionResetError):  # the client hung up: its business, not an error
                    self.close_connection = True

    def send_body(self, f: BinaryIO, length: int) -> None:
        """Copy ``length`` bytes of ``f`` to the client."""
        shutil.copyfileobj(_Limited(f, length), self.wfile, _CHUNK)

    def _resolve(self, raw_path: str) -> Path | None:
        """Map a request path to a servable file, or None. Checks the words first, then the real path."""
        path = unquote(urlsplit(raw_path).path)
        parts = path.split("/")
        if len(parts) < 3 or parts[0] != "" or parts[1] not in SERVED_FOLDERS or "\x00" in path:
            return None
        if any(not p or p.startswith(".") or "\\" in p for p in parts[1:]):
            return None
        root = self.root.resolve()
        candidate = root.joinpath(*parts[1:]).resolve()
        if not candidate.is_relative_to(root / parts[1]) or not candidate.is_file():
            return None
        return candidate

    def log_message(self, format: str, *args: Any) -> None:
        event(log, "repo_http", logging.DEBUG, client=self.client_address[0], line=format % args)


class _Limited:
    """A file-like reader that stops after ``length`` bytes."""

    def __init__(self, f: BinaryIO, length: int) -> None:
        self._f = f
        self._left = length

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range as (start, end inclusive), or None without a Range header; ValueError if bad or unsatisfiable.

    Only single ranges are served: resuming needs nothing more.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if not match or not (match[1] or match[2]):
        raise ValueError(f"bad range {header[:60]!r}")
    if match[1]:
        start = int(match[1])
        end = min(int(match[2]), size - 1) if match[2] else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(size - int(match[2]), 0), size - 1
    if start > end or start >= size:
        raise ValueError(f"range {header[:60]!r} outside {size} bytes")
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    #: A fleet's devices refresh at once after a publish; the default backlog of 5 drops their connects for 1 s.
    request_queue_size = 128


class RepoServer:
    """Serve ``root_dir`` (a repository's ``metadata/`` and ``targets/``) on a thread; ``port=0`` picks a free one."""

    def __init__(
        self,
        root_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: type[RepoRequestHandler] = RepoRequestHandler,
    ) -> None:
        self.root_dir = Path(root_dir)
        self._httpd = _Server((host, port), functools.partial(handler, root=self.root_dir))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> RepoServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.1,), name="repo-server", daemon=True)
        self._thread.start()
        event(log, "repo_server_started", url=self.url, root=str(self.root_dir))
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RepoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
