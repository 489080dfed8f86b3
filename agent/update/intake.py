"""Desired states as they arrive: verified, the newest accepted one persisted, then handed to the installer's worker.

This runs on the reactor thread, apart from the installs (the worker thread), so a slow download never delays the
verdict on a new desired state, and a newer state can supersede the install under way at its next step.
:func:`agent.update.desired.verify_desired` checks the director's half of the two-key rule; what this module adds
is the device's memory: the last accepted seq survives restarts (an older state replayed later is refused), a
state redelivered as is (the retained message, on every reconnect) is not acted on twice, and a refusal is reported
once per payload and reason however often the broker delivers it.

A state that cannot be persisted for want of space is not accepted (an install could persist nothing either): it is
reported as ``desired_deferred`` (``disk_full``) and held, and :meth:`DesiredIntake.retry_deferred`, which the
installer's worker calls with back-off, verifies and persists it again once there is room.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

from tuf.api.metadata import Key

from agent.files import is_disk_full
from agent.logs import event
from agent.protocol import Kind
from agent.update.desired import DesiredModel, DesiredState, DesiredStateError, verify_desired
from agent.update.host import InstallHost
from agent.update.record import release_name
from agent.update.slots import SlotStore

log = logging.getLogger(__name__)

#: Where the accepted desired state is kept in the slot store.
_STORE_KEY = "desired"
_DETAIL_CHARS = 300


class DesiredIntake:
    """Verifies each desired state for ``host`` and hands every newly accepted one to ``hand_over``.

    ``models`` are the names agent.toml serves: a desired state may name others, and each of those is reported as
    ``install_failed`` (``unknown_model``) at once, since no install will answer for it.
    """

    def __init__(
        self,
        host: InstallHost,
        store: SlotStore,
        director_key: Key,
        models: Collection[str],
        hand_over: Callable[[DesiredState], None],
        on_deferred: Callable[[], None],
    ) -> None:
        self._host = host
        self._store = store
        self._director_key = director_key
        self._models = models
        self._hand_over = hand_over
        self._on_deferred = on_deferred
        self._lock = threading.Lock()  # the reactor delivers states; the installer's worker retries a deferred one
        #: A verified state a full disk kept from being persisted: (payload, sha256), tried again by retry_deferred.
        self._deferred: tuple[bytes, str] | None = None
        accepted = store.get(_STORE_KEY) or {}
        #: The newest accepted desired state (persisted), which the worker reconciles again at each start.
        self.accepted = _from_dict(accepted, host.device_id) if accepted else None
        self._last_seq: int = accepted.get("seq", -1)
        self._accepted_sha256: str = accepted.get("sha256", "")
        self._rejected = ("", "")

    def on_command(self, kind: Kind, payload: bytes) -> None:
        """A message on the device's desired or cmd topic: verify, persist the seq, hand the state over."""
        if kind is not Kind.DESIRED:
            event(log, "command_ignored", logging.WARNING, device_id=self._host.device_id, kind=kind.value)
            return
        with self._lock:
            self._take(payload)

    @property
    def deferred(self) -> bool:
        """Whether a verified state waits for room to be persisted."""
        return self._deferred is not None

    def retry_deferred(self) -> bool:
        """Try again to accept the state a full disk deferred; return whether one is still deferred."""
        with self._lock:
            if self._deferred is not None:
                self._take(self._deferred[0])
            return self._deferred is not None

    def _take(self, payload: bytes) -> None:
        host = self._host
        digest = hashlib.sha256(payload).hexdigest()
        if digest == self._accepted_sha256:
            return  # the retained state, delivered again on reconnect: already acted on
        try:
            state = verify_desired(payload, self._director_key, host.device_id, self._last_seq, host.clock())
        except DesiredStateError as exc:
            # Checked again on every delivery (a clock set right makes it valid), reported once per payload and reason.
            if (digest, exc.reason) != self._rejected:
                self._rejected = (digest, exc.reason)
                host.emit("desired_rejected", reason=exc.reason, detail=exc.detail[:_DETAIL_CHARS])
            return
        try:
            self._store.put(_STORE_KEY, _to_dict(state, digest))
        except (OSError, sqlite3.OperationalError) as exc:
            if not is_disk_full(exc):
                raise
            self._defer(payload, digest, state, exc)
            return
        self._deferred = None
        self._last_seq, self._accepted_sha256, self.accepted = state.seq, digest, state
        releases = {name: release_name(entry) for name, entry in state.models.items()}
        host.emit("desired_accepted", seq=state.seq, campaign=state.campaign, models=releases)
        for name in sorted(set(state.models) - set(self._models)):
            host.emit("install_failed", model=name, release=releases[name], seq=state.seq,
                      reason="unknown_model", detail="not a [[models]] entry of agent.toml")  # fmt: skip
        self._hand_over(state)


    def _defer(self, payload: bytes, digest: str, state: DesiredState, exc: BaseException) -> None:
        if self._deferred is None or self._deferred[1] != digest:  # reported once per payload
            detail = f"cannot persist it ({exc}): free space in the state folder"[:_DETAIL_CHARS]
            self._host.emit("desired_deferred", seq=state.seq, reason="disk_full", detail=detail)
        self._deferred = (payload, digest)
        self._on_deferred()


def _to_dict(state: DesiredState, sha256: str) -> dict[str, Any]:
    """The accepted desired state and the sha256 of its payload (a redelivery of the same payload is skipped)."""
    return {
        "seq": state.seq,
        "sha256": sha256,
        "issued": state.issued,
        "expires": state.expires,
        "campaign": state.campaign,
        "models": {name: asdict(entry) for name, entry in state.models.items()},
    }


def _from_dict(data: Mapping[str, Any], device_id: str) -> DesiredState:
    """The desired state this device accepted (verified then, so read back from its own durable state as is)."""
    models = {name: DesiredModel(**entry) for name, entry in data["models"].items()}
    return DesiredState(
        device_id, data["seq"], data["issued"], data["expires"], data["campaign"], MappingProxyType(models)
    )
