"""A part of the fleet service that works in rounds on a thread of its own: the campaign controller and the drift
detector. :meth:`Rounds.start` runs :meth:`Rounds.tick` every ``interval`` seconds (less the round's own time)
until :meth:`Rounds.stop`; a round that fails is logged (``<name>_round_failed`` for the fleet's own errors: the
store busy, the broker away; ``<name>_round_crashed`` with its traceback for anything else) and the next round tries
again, so one bad round never stops the part."""

from __future__ import annotations

import logging
import threading
import time
from typing import Self

from agent.logs import event
from fleet.errors import FleetError

log = logging.getLogger(__name__)


class Rounds:
    """The round loop; subclasses give :meth:`tick`. ``cpu_s`` and ``rounds`` count what the rounds cost on the
    part's thread (what `scripts/bench/rollout_revert.py` reads)."""

    def __init__(self, name: str, interval: float) -> None:
        self.name, self.interval = name, interval
        self.cpu_s = 0.0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> object:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started, cpu = time.monotonic(), time.thread_time()
            try:
                self.tick()
            except FleetError as exc:
                event(log, f"{self.name}_round_failed", logging.WARNING, reason=exc.reason, detail=exc.detail)
            except Exception as exc:
                event(log, f"{self.name}_round_crashed", logging.ERROR, exc_info=exc)
            self.cpu_s += time.thread_time() - cpu
            self.rounds += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
