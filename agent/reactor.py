"""A small single-threaded event loop: sockets (via selectors) and timers.

One reactor drives any number of MQTT links, so a simulator with hundreds of devices uses one thread, not
hundreds. Everything registered with a reactor runs on its thread; other threads hand work over with
:meth:`Reactor.call_soon_threadsafe`.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.logs import event

log = logging.getLogger(__name__)

Callback = Callable[[], Any]


class Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callback) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._handoff: deque[Callback] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, (self._drain_wakeups, None))
        self._stopping = False
        self.thread: threading.Thread | None = None

    # -- timers -------------------------------------------------------------------------------------------------

    def call_later(self, delay: float, fn: Callback) -> Timer:
        timer = Timer(self.clock() + max(0.0, delay), fn)
        heapq.heappush(self._timers, (timer.when, next(self._counter), timer))
        return timer

    def call_every(self, interval: float, fn: Callback, first_delay: float | None = None) -> Timer:
        """Run ``fn`` every ``interval`` seconds on a fixed schedule (no drift); cancel the returned timer to end."""
        handle = Timer(0.0, fn)
        start = self.clock() + (interval if first_delay is None else first_delay)

        def schedule(when: float) -> None:
            heapq.heappush(self._timers, (when, next(self._counter), Timer(when, tick)))

        def tick() -> None:
            if handle.cancelled:
                return
            try:
                fn()
            finally:
                # The next beat on the original grid: a late or slow tick skips missed beats instead of bunching.
                schedule(start + (int((self.clock() - start) // interval) + 1) * interval)

        schedule(start)
        return handle

    def call_soon_threadsafe(self, fn: Callback) -> None:
        self._handoff.append(fn)
        with contextlib.suppress(OSError):  # a full pipe means a wake-up is already pending
            self._wake_w.send(b"\0")

    # -- sockets ------------------------------------------------------------------------------------------------

    def add_socket(self, sock: Any, on_read: Callback, on_write: Callback) -> None:
        self._selector.register(sock, selectors.EVENT_READ, (on_read, on_write))

    def remove_socket(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def want_write(self, sock: Any, wanted: bool) -> None:
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        if key.events != events:
            self._selector.modify(sock, events, key.data)

    # -- running ------------------------------------------------------------------------------------------------

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_safely(self, fn: Callback) -> None:
        try:
            fn()
        except Exception:
            event(log, "reactor_callback_failed", logging.ERROR, callback=getattr(fn, "__qualname__", repr(fn)))
            log.debug("callback failure", exc_info=True)

    def run_once(self, max_wait: float = 0.5) -> None:
        while self._handoff:
            self._run_safely(self._handoff.popleft())
        now = self.clock()
        wait = max_wait
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - now))
        for key, mask in self._selector.select(wait):
            on_read, on_write = key.data
            if mask & selectors.EVENT_READ:
                self._run_safely(on_read)
            if mask & selectors.EVENT_WRITE and on_write is not None:
                self._run_safely(on_write)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._run_safely(timer.fn)

    def run(self) -> None:
        """Run until :meth:`stop` is called (from any thread)."""
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = self.clock() + timeout
        while not done():
            if self.clock() >= deadline:
                return False
            self.run_once(max_wait=min(0.05, max(0.0, deadline - self.clock())))
        return True

    def stop(self) -> None:
        def _stop() -> None:
            self._stopping = True

        self.call_soon_threadsafe(_stop)

    def start_thread(self, name: str = "reactor") -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()
        return self.thread

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
