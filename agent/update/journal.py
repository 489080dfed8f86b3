"""The installer's journal: each model's install record and slots, persisted before they move, every move evented.

:meth:`Journal.enter` is the one way an install changes state: it asks the table (:func:`~agent.update.states.
next_state`) for the move, persists the new record with any slot change in one transaction
(:class:`~agent.update.slots.SlotStore`), and only then events it (``install_state``) and reports an outcome that
came with it. The in-memory record, the slots and what status shows never run ahead of the disk: after a SIGKILL
the next start finds exactly what was last evented, or one step more.

An outcome (``install_committed``, ``install_failed``, ``rolled_back``) is persisted unreported, evented, then marked
reported: a crash in between reports it again at the next start (:meth:`Journal.report`).

Fault-injection hooks, to prove the restart table; never set in production. Both act right after a state was
persisted and evented (and its outcome, if any, reported), in whatever thread entered it: the installer's worker, or
the host's constructor while :meth:`~agent.update.install.Installer.recover` settles the last run.

- ``EDGEFLEET_FAULT_KILL_AT=<STATE>`` makes the agent SIGKILL itself there.
- ``fault_point``, a callable given to the journal (through ``AgentCore(fault_point=...)`` and the installer), is
  called with each state entered; what it raises propagates. The simulator's power cut (firmware_sim.power) raises
  there to end one simulated device's worker among hundreds in one process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from agent.logs import event
from agent.update.desired import DesiredModel
from agent.update.host import InstallHost
from agent.update.record import InstallRecord, install_status, release_name
from agent.update.slots import ModelSlots, SlotRecord, SlotStore
from agent.update.states import AT_REST, Event, State, next_state

log = logging.getLogger(__name__)

#: The test hook's environment variable (see the module docstring).
FAULT_KILL_AT = "EDGEFLEET_FAULT_KILL_AT"
_DETAIL_CHARS = 300


class Journal:
    """The persisted install state of the models ``names``, read from ``store`` at construction.

    ``records`` and ``slots`` are what was last persisted; the installer reads them, and may set a record in memory
    only for what must not outlive the process (a restart counted before it is saved, a retry a full disk would not
    take). ``factory`` is each model's factory record (what an empty slot stands for); ``retry_in(name)`` the seconds
    until the model's next retry, for status; ``fault_point`` the fault-injection callable (module docstring).
    """

    def __init__(
        self,
        host: InstallHost,
        store: SlotStore,
        names: Iterable[str],
        factory: Mapping[str, SlotRecord],
        retry_in: Callable[[str], float | None],
        fault_point: Callable[[State], None] | None = None,
    ) -> None:
        self._host = host
        self._store = store
        self._factory = factory
        self._retry_in = retry_in
        self.records: dict[str, InstallRecord] = {}
        self.slots: dict[str, ModelSlots] = {}
        for name in names:
            slots, stored = store.load(name)
            self.slots[name], self.records[name] = slots, InstallRecord.from_dict(stored)
        self._status: dict[str, dict[str, Any]] = {}
        self._status_lock = threading.Lock()
        self._kill_at = os.environ.get(FAULT_KILL_AT)
        self._fault_point = fault_point

    def enter(
        self,
        name: str,
        happened: Event,
        *,
        slots: ModelSlots | None = None,
        reason: str = "",
        detail: str = "",
        revert_active: bool | None = None,
        outcome: Mapping[str, Any] | None = None,
    ) -> None:
        """Take the table's move for ``happened``: persist the new state (with any slot change, atomically), then
        event it, then report ``outcome`` if one came with it."""
        rec = self.records[name]
        state = next_state(rec.state, happened)
        detail = detail[:_DETAIL_CHARS]
        rec = replace(
            rec,
            state=state,
            reason=reason,
            detail=detail,
            restarts=0 if state in AT_REST else rec.restarts,
            revert_active=rec.revert_active if revert_active is None else revert_active,
            outcome=outcome or rec.outcome,
            **({"retries": 0, "retry_in_s": None} if state is State.COMMITTED else {}),
        )
        self.save(name, rec, slots)
        self._host.emit("install_state", model=name, state=state.value, release=rec.release, seq=rec.seq,
                        reason=reason, **({"detail": detail} if detail else {}))  # fmt: skip
        if outcome is not None:
            self.report(name)
        self.fault_point(state)

    def save(self, name: str, rec: InstallRecord, slots: ModelSlots | None = None) -> None:
        """Persist first; only then does the in-memory state (and what status shows) move."""
        slots = slots or self.slots[name]
        self._store.save(name, slots, rec.to_dict())
        self.records[name], self.slots[name] = rec, slots
        self.status_changed(name)

    def status_changed(self, name: str) -> None:
        """Work out the model's status again (a retry scheduled or taken changes it without a save)."""
        rec, slots = self.records[name], self.slots[name]
        retry_in = self._retry_in(name)
        retry_at = None if retry_in is None else self._host.clock() + retry_in
        with self._status_lock:
            self._status[name] = install_status(rec, slots, self._factory[name], retry_at)
        self._host.status_changed()

    def outcome(self, kind: str, release: str, seq: int, **extra: Any) -> dict[str, Any]:
        """An install's outcome as persisted with the move that ends it (unreported until :meth:`report`)."""
        return {"outcome": kind, "release": release, "seq": seq, "reason": "", "detail": "", "ts": self._host.clock(),
                "reported": False, **extra}  # fmt: skip

    def committed(self, entry: DesiredModel, seq: int, **extra: Any) -> dict[str, Any]:
        return self.outcome("install_committed", release_name(entry), seq, **extra)

    def report(self, name: str) -> None:
        """Event the record's outcome, then mark it reported: a crash in between reports it again at the next start."""
        rec = self.records[name]
        assert rec.outcome is not None
        fields = {k: v for k, v in rec.outcome.items() if k not in ("outcome", "ts", "reported")}
        self._host.emit(rec.outcome["outcome"], model=name, **fields)
        self.save(name, replace(rec, outcome={**rec.outcome, "reported": True}))

    def status(self, name: str) -> dict[str, Any]:
        """Slots (release, sha256 prefix) and the install state with its last outcome, for status output."""
        with self._status_lock:
            return dict(self._status.get(name, {}))

    def fault_point(self, state: State) -> None:
        """The fault-injection hooks (see the module docstring): die here if asked to, then call ``fault_point``."""
        if self._kill_at == state.value:
            event(log, "fault_injected", logging.WARNING, hook=FAULT_KILL_AT, state=state.value)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fault_point is not None:
            self._fault_point(state)
