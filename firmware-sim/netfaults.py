"""Network faults for simulated devices: a real TCP proxy between a faulted device and the real broker or repository.

The agent must not know it is being tested (a fake only injects a fault, never stands in for the thing under test),
so faults are made in the network: the simulator points a faulted device's broker or repository URL at a
:class:`FaultyLink` of one :class:`Proxy`, which forwards its bytes to the real Mosquitto or HTTP server and can drop,
refuse, hold, slow or cut them. One thread with one ``selectors`` loop carries every link of a run, so hundreds of
faulted devices cost sockets, not threads. Buffers are bounded (:data:`BUFFER_LIMIT` per direction): a side is not
read while the other side's outgoing buffer is full, and the kernel's buffers hold the rest, as on a real link.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.logs import event

log = logging.getLogger(__name__)

#: Bytes a connection holds for one direction before the proxy stops reading the sending side.
BUFFER_LIMIT = 256 * 1024
_CHUNK = 64 * 1024
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def _close(sock: socket.socket, abrupt: bool) -> None:
    """Close ``sock``; ``abrupt`` sends a RST (SO_LINGER 0) as a dropped link would surface, not a polite FIN."""
    if abrupt:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Bucket:
    """A token bucket for one link's downloads. It holds a tenth of a second of burst, and a blocked writer sleeps
    until 20 ms worth has come in, so a throttled link is woken ~50 times a second instead of spinning on bytes."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"throttle rate must be positive, not {rate}")
        self.rate = rate
        self.capacity = max(1.0, rate * 0.1)
        self.tokens = self.capacity
        self.last = time.monotonic()

    def refill(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return self.tokens

    def wait(self, now: float) -> float:
        """Seconds until the next write may go; 0 if it may go now."""
        if self.refill(now) >= 1:
            return 0.0
        return (min(self.capacity, max(1.0, self.rate * 0.02)) - self.tokens) / self.rate


class _Pipe:
    """One proxied connection: a device's socket, its upstream socket (None while held), and a buffer each way.

    Runs on the proxy's thread only. When either side reaches EOF it stops reading, flushes what is pending to the
    other side and closes both (half-close is not carried through: neither MQTT nor HTTP/1.1 clients rely on it)."""

    def __init__(self, link: FaultyLink, client: socket.socket) -> None:
        self.link, self.client, self.cut, self.sent_down = link, client, link._cut, 0
        self.upstream: socket.socket | None = None
        self.to_client, self.to_upstream = bytearray(), bytearray()
        #: ``closing``: a side reached EOF, the rest is flushed; ``connected``: upstream's connect went through.
        self.connected = self.closing = self.closed = False
        self.events: dict[socket.socket, int] = {}

    def handle(self, sock: socket.socket, mask: int) -> None:
        if self.closed:
            return  # an event of this select round for a pipe closed earlier in the round
        try:
            if sock is self.upstream and not self.connected:
                if err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise OSError(err, f"upstream {self.link.upstream}: {errno.errorcode.get(err, err)}")
                self.connected = True
            if mask & _READ:
                data = sock.recv(_CHUNK)
                self.closing = self.closing or not data
                (self.to_upstream if sock is self.client else self.to_client).extend(data)
            if mask & _WRITE:
                self._write(sock)
        except OSError:
            self.close(abrupt=True)
        self.update()

    def _write(self, sock: socket.socket) -> None:
        if sock is self.upstream:
            n = sock.send(self.to_upstream[:_CHUNK])
            del self.to_upstream[:n]
            self.link._count("bytes_up", n)
            return
        allowed = min(len(self.to_client), _CHUNK)
        if self.cut is not None:
            allowed = min(allowed, self.cut - self.sent_down)
        bucket = self.link._bucket
        if bucket is not None:
            allowed = min(allowed, int(bucket.refill(time.monotonic())))
        n = sock.send(self.to_client[:allowed]) if allowed > 0 else 0
        if bucket is not None:
            bucket.tokens -= n
        del self.to_client[:n]
        self.sent_down += n
        self.link._count("bytes_down", n)

    def update(self) -> None:
        """Bring the selector's interest in both sockets in line with the buffers and the link's faults."""
        if self.closed:
            return
        link, proxy = self.link, self.link._proxy
        if self.cut is not None and self.sent_down >= self.cut:
            self.close(fault=True)  # a cut download: the device got exactly ``cut`` bytes, then a plain close
            link._cut_done()
            return
        if self.closing and not self.to_client and not (self.to_upstream and self.upstream is not None):
            self.close()
            return
        client_events = upstream_events = 0
        if not link._blackholed:
            if self.upstream is None:
                self._connect()
                if self.closed:
                    return
            if not self.closing and len(self.to_upstream) < BUFFER_LIMIT:
                client_events |= _READ
            if self.to_client:
                bucket = link._bucket
                wait = 0.0 if bucket is None else bucket.wait(time.monotonic())
                if wait:
                    proxy._sleepers[self] = time.monotonic() + wait
                else:
                    client_events |= _WRITE
            if self.upstream is not None and not self.connected:
                upstream_events = _WRITE
            elif self.upstream is not None:
                if not self.closing and len(self.to_client) < BUFFER_LIMIT:
                    upstream_events |= _READ
                if self.to_upstream:
                    upstream_events |= _WRITE
        self._interest(self.client, client_events)
        if self.upstream is not None:
            self._interest(self.upstream, upstream_events)

    def _connect(self) -> None:
        family, address = self.link._address
        up = socket.socket(family, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream = up
        if up.connect_ex(address) not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self.close(abrupt=True)

    def _interest(self, sock: socket.socket, events: int) -> None:
        old = self.events.get(sock, 0)
        if events == old:
            return
        selector = self.link._proxy._selector
        if not old:
            selector.register(sock, events, self)
        elif not events:
            selector.unregister(sock)
        else:
            selector.modify(sock, events, self)
        self.events[sock] = events

    def close(self, fault: bool = False, abrupt: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if fault:  # counted first: whoever sees the connection drop then finds it in the stats
            self.link._count("disconnects", 1)
        self.link._proxy._sleepers.pop(self, None)
        for sock in (self.client, self.upstream):
            if sock is not None:
                if self.events.get(sock):
                    self.link._proxy._selector.unregister(sock)
                _close(sock, abrupt)
        self.link._pipes.discard(self)


class FaultyLink:
    """One listening port on 127.0.0.1 that forwards to one upstream, with the faults the simulator switches.

    The controls are thread-safe: each sets its flag at once (new connections see it) and hands the rest (the
    connections already open) to the proxy's thread."""

    def __init__(self, proxy: Proxy, upstream_host: str, upstream_port: int, name: str) -> None:
        family, _, _, _, address = socket.getaddrinfo(upstream_host, upstream_port, type=socket.SOCK_STREAM)[0]
        self._address: tuple[socket.AddressFamily, Any] = (family, address)
        self.upstream = (upstream_host, upstream_port)
        self.name = name or f"{upstream_host}:{upstream_port}"
        self._proxy = proxy
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(512)
        self._listener.setblocking(False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._pipes: set[_Pipe] = set()
        self._down = self._blackholed = False
        self._bucket: _Bucket | None = None
        self._cut: int | None = None
        self._cuts_left: int | None = None
        self._lock = threading.Lock()
        self._stats = dict.fromkeys(("connections", "refused", "disconnects", "cuts", "bytes_up", "bytes_down"), 0)

    def disconnect(self) -> None:
        """Drop every current connection now, both sides with a RST: the device sees its link fail, the broker
        sees the device vanish without a DISCONNECT and publishes its last will."""
        event(log, "netfault_disconnect", link=self.name)
        self._proxy._call_soon(self._drop_all)

    def down(self, on: bool = True) -> None:
        """A device without network: drop its connections, and accept and close new ones at once until ``False``."""
        event(log, "netfault_down", link=self.name, on=on)
        self._down = on
        if on:
            self._proxy._call_soon(self._drop_all)

    def blackhole(self, on: bool = True) -> None:
        """Forward nothing either way, and hold new connections unconnected upstream, until ``False``; bytes wait in
        the kernel's and the proxy's bounded buffers. A side that died meanwhile is closed on the other when it ends."""
        event(log, "netfault_blackhole", link=self.name, on=on)
        self._blackholed = on
        self._proxy._call_soon(self._refresh)

    def throttle(self, bytes_per_s: float | None) -> None:
        """Limit downloads (upstream to device), shared by the link's connections; None lifts the limit."""
        self._bucket = None if bytes_per_s is None else _Bucket(bytes_per_s)
        self._proxy._call_soon(self._refresh)

    def cut_after(self, n_bytes: int | None, times: int | None = None) -> None:
        """Close each NEW connection once it has forwarded ``n_bytes`` to the device (a cut download); None: never.
        With ``times``, only that many cuts happen (connections already open when the last one happens keep their
        cut), then connections go through whole: a link that fails a while, not one that can never carry a file."""
        if n_bytes is not None and n_bytes < 0:
            raise ValueError(f"cut_after needs a byte count >= 0, not {n_bytes}")
        if times is not None and times < 1:
            raise ValueError(f"cut_after needs times >= 1, not {times}")
        with self._lock:
            self._cut, self._cuts_left = n_bytes, times

    def _cut_done(self) -> None:
        with self._lock:
            self._stats["cuts"] += 1
            if self._cuts_left is not None:
                self._cuts_left -= 1
                if self._cuts_left <= 0:
                    self._cut = self._cuts_left = None

    def stats(self) -> dict[str, int]:
        """Counters: connections (proxied), refused (while down), disconnects (closed by a fault, cuts included),
        cuts (downloads cut), bytes_up, bytes_down (forwarded), and open (now)."""
        with self._lock:
            return {**self._stats, "open": len(self._pipes)}

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._stats[key] += n

    def _drop_all(self) -> None:
        for pipe in list(self._pipes):
            pipe.close(fault=True, abrupt=True)

    def _refresh(self) -> None:
        for pipe in list(self._pipes):
            self._proxy._sleepers.pop(pipe, None)
            pipe.update()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: the connection waits in the backlog
                event(log, "netfault_accept_failed", level=logging.WARNING, link=self.name, error=str(e))
                return
            if self._down:
                _close(conn, abrupt=True)
                self._count("refused", 1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(self, conn)
            self._pipes.add(pipe)
            self._count("connections", 1)
            pipe.update()


class Proxy:
    """The thread and ``selectors`` loop that carry every :class:`FaultyLink` of a run."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, _READ, None)
        self._handoff: deque[Callable[[], Any]] = deque()
        #: Throttled pipes waiting for tokens, with the time to look at them again.
        self._sleepers: dict[_Pipe, float] = {}
        self._links: list[FaultyLink] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Proxy:
        """Start the loop's thread (links made before start begin to accept here)."""
        self._thread = threading.Thread(target=self._run, name="netfaults-proxy", daemon=True)
        self._thread.start()
        return self

    def link(self, upstream_host: str, upstream_port: int, name: str = "") -> FaultyLink:
        """A new link to ``upstream_host:upstream_port``; connect to its ``host``/``port``. Callable from any thread."""
        link = FaultyLink(self, upstream_host, upstream_port, name)
        self._links.append(link)
        self._call_soon(lambda: self._selector.register(link._listener, _READ, link))
        return link

    def close(self) -> None:
        """Stop the loop, then close every listener and connection (a plain close) and the selector."""
        if self._stopping:
            return
        self._stopping = True
        self._call_soon(lambda: None)
        if self._thread is not None:
            self._thread.join()
        for link in self._links:
            for pipe in list(link._pipes):
                pipe.close()
            link._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call_soon(self, fn: Callable[[], Any]) -> None:
        self._handoff.append(fn)
        with contextlib.suppress(OSError):  # a full wake-up pipe is already a wake-up
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, min(self._sleepers.values()) - time.monotonic()) if self._sleepers else None
            # key.data: None for the wake-up socket, the link for a listener, the pipe for a connection's socket
            for key, mask in self._selector.select(timeout):
                try:
                    if key.data is None:
                        self._drain()
                    elif isinstance(key.data, FaultyLink):
                        key.data._accept()
                    else:
                        key.data.handle(key.fileobj, mask)
                except Exception:  # one connection's bug must not stop every link of the run
                    log.exception("netfaults proxy: handling %s failed", key.data)
            now = time.monotonic()
            for pipe in [p for p, when in self._sleepers.items() if when <= now]:
                del self._sleepers[pipe]
                pipe.update()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while self._handoff:
            fn = self._handoff.popleft()
            try:
                fn()
            except Exception:
                log.exception("netfaults proxy: %s failed", fn)
