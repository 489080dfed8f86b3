"""What wakes the installer's worker: the newest desired state, retries whose time has come, and the agent stopping.

The reactor thread puts desired states in (only the newest is kept: an older one waiting is superseded by it); the
installer schedules retries by key (a model's name, or :data:`DEFERRED_STATE` for a desired state a full disk kept
from being persisted); :meth:`Inbox.take` blocks the worker until there is something to do. Times are
``time.monotonic``: setting the device clock neither hastens nor delays a retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.update.desired import DesiredState

#: The retry key of a desired state that waits for room to be persisted.
DEFERRED_STATE = ""
#: How long :meth:`Inbox.take` sleeps at most with nothing scheduled (a spurious wake-up costs one empty turn).
_IDLE_WAIT_S = 3600.0


@dataclass(frozen=True)
class Work:
    """What the worker wakes up for: a newer desired state (or None) and the retry keys now due."""

    desired: DesiredState | None
    due: frozenset[str]


class Inbox:
    """The installer worker's inbox. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._wake = threading.Condition()
        self._newest: DesiredState | None = None
        self._due: dict[str, float] = {}
        self._stopping = False

    def put(self, desired: DesiredState) -> None:
        """A newly accepted desired state: it replaces any still waiting."""
        with self._wake:
            self._newest = desired
            self._wake.notify_all()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    @property
    def stopping(self) -> bool:
        with self._wake:
            return self._stopping

    @property
    def newest(self) -> DesiredState | None:
        """The desired state waiting to be taken, if any (an install under way gives way to it at its next step)."""
        with self._wake:
            return self._newest

    def retry(self, key: str, delay_s: float) -> None:
        """Wake the worker for ``key`` in ``delay_s`` seconds (replacing any earlier schedule of it)."""
        with self._wake:
            self._due[key] = self._clock() + delay_s
            self._wake.notify_all()

    def cancel(self, key: str) -> None:
        with self._wake:
            self._due.pop(key, None)

    def due_in(self, key: str) -> float | None:
        """Seconds until ``key``'s retry (0 when overdue), or None if none is scheduled."""
        with self._wake:
            when = self._due.get(key)
            return None if when is None else max(0.0, when - self._clock())

    def take(self) -> Work | None:
        """Block until a desired state or a due retry is there, and take them; None once the agent is stopping."""
        with self._wake:
            while True:
                if self._stopping:
                    return None
                now = self._clock()
                due = frozenset(key for key, when in self._due.items() if when <= now)
                if due or self._newest is not None:
                    for key in due:
                        del self._due[key]
                    work, self._newest = Work(self._newest, due), None
                    return work
                self._wake.wait(min(self._due.values(), default=now + _IDLE_WAIT_S) - now)

    def pause(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a desired state arriving or the agent stopping ends it early."""
        with self._wake:
            if not self._stopping:
                self._wake.wait(seconds)
