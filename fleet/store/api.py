"""The store's interface, one small protocol per concern. Code above the store (ops, ingest, views) depends on these,
never on a backend; :func:`fleet.store.open_store` picks the backend from a URL.

Every method raises :class:`fleet.errors.StoreUnavailable` when the backend cannot do it right now (locked too long,
disk full, read-only, corrupt); nothing else of the backend (no ``sqlite3`` error) leaks out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from fleet.store.rows import (
    AuditCheck,
    AuditEntry,
    Campaign,
    Decision,
    DesiredRecord,
    Device,
    DeviceDetail,
    DriftTrack,
    Execution,
    Gap,
    InstallOutcome,
    Reject,
    RepoCommit,
    RolloutUpdate,
    StoredEvent,
    StoredWindow,
    Summary,
    Telemetry,
)


class IngestWrites(Protocol):
    """The ingest's hot path: validated messages in batches, one transaction each, duplicates absorbed.

    A copy of a stored window or event (same device, boot and seq) is absorbed when it is the same message; one that
    differs is a ``conflict`` reject: counted with the rejects, logged with its key, appended to ``conflicts`` when
    the caller passes a list, and never stored over the first. Either way the message is done with (ack it).
    """

    def write_batch(
        self,
        status: Sequence[Mapping[str, Any]] = (),
        windows: Sequence[Mapping[str, Any]] = (),
        events: Sequence[Mapping[str, Any]] = (),
        rejects: Sequence[Reject] = (),
        received_at: float | None = None,
        payloads: Sequence[bytes] | None = None,
        conflicts: list[Reject] | None = None,
    ) -> int: ...


class Devices(Protocol):
    """The device registry, as births, wills and messages left it."""

    def devices(self) -> list[Device]: ...

    def device(self, device_id: str) -> DeviceDetail | None: ...

    def last_install(self, device_id: str) -> InstallOutcome | None: ...

    def summary(self) -> Summary: ...

    def tags(self) -> dict[str, dict[str, str]]: ...

    def gaps(self, device_id: str | None = None) -> list[Gap]: ...

    def record_enrollment(self, device_id: str, actor: str, detail: Mapping[str, Any]) -> None: ...

    def known(self, device_ids: Sequence[str]) -> set[str]: ...


class TelemetryReads(Protocol):
    """Stored windows, merged for people and gates."""

    def telemetry(
        self, device_id: str, model: str | None = None, since: float | None = None, until: float | None = None
    ) -> Telemetry: ...

    def window_counts(self) -> dict[str, int]: ...


class DesiredStates(Protocol):
    """The desired state signed for each device: recorded before publishing, marked once the broker has it."""

    def add_desired(
        self,
        device_id: str,
        updates: Mapping[str, Mapping[str, Any]],
        issued: float,
        expires: float,
        campaign: str | None,
        sign: Callable[[int, dict[str, Any]], bytes],
    ) -> tuple[DesiredRecord, bytes]: ...

    def mark_desired_published(self, device_id: str, seq: int, actor: str, detail: Mapping[str, Any]) -> None: ...

    def desired(self, device_id: str) -> DesiredRecord | None: ...


class AuditLog(Protocol):
    """The append-only, hash-chained log of every change (see :mod:`fleet.store.audit`)."""

    def append_audit(self, actor: str, action: str, subject: str, detail: Mapping[str, Any]) -> AuditEntry: ...

    def audit(self) -> list[AuditEntry]: ...

    def verify_audit(self) -> AuditCheck: ...


class RepoCommits(Protocol):
    """What the fleet's TUF repository looked like after each change the fleet made to it, the newest last: the
    record :class:`fleet.trust.repository.Repository` checks its files against (an old backup put back is refused)."""

    def last_repo_commit(self) -> RepoCommit | None: ...

    def record_repo_commit(self, commit: RepoCommit) -> None: ...


class Campaigns(Protocol):
    """Rollout campaigns and their executions (see :mod:`fleet.store.sqlite_campaigns`): created whole, moved by
    compare-and-set with their audit entry, updated by the controller one round per transaction."""

    def create_campaign(
        self,
        campaign: Campaign,
        executions: Sequence[Execution],
        exclusive_states: Collection[str],
        detail: Mapping[str, Any],
    ) -> tuple[Campaign | None, dict[str, list[str]]]: ...

    def campaigns(self, states: Collection[str] | None = None) -> list[Campaign]: ...

    def campaign(self, campaign_id: str) -> Campaign | None: ...

    def executions(self, campaign_id: str, states: Collection[str] | None = None) -> list[Execution]: ...

    def decisions(self, campaign_id: str) -> list[Decision]: ...

    def move_campaign(
        self,
        campaign_id: str,
        expected: str,
        new: str,
        *,
        actor: str,
        action: str,
        detail: Mapping[str, Any],
        reason: str | None = None,
    ) -> Campaign | None: ...

    def save_rollout(self, update: RolloutUpdate) -> None: ...

    def rollout_cursors(self) -> dict[str, int]: ...

    def events_after(self, rowid: int, types: Collection[str], limit: int = 5000) -> list[StoredEvent]: ...

    def last_event_rowid(self) -> int: ...

    def windows_after(
        self, rowid: int, model: str, devices: Collection[str], limit: int = 5000
    ) -> tuple[list[StoredWindow], int]: ...

    def last_window_rowid(self) -> int: ...

    def first_window_rowid_since(self, since: float) -> int: ...


class Drift(Protocol):
    """The drift detector's tracks and state (see :mod:`fleet.store.sqlite_drift`)."""

    def drift_tracks(self, states: Sequence[str] | None = None) -> list[DriftTrack]: ...

    def drift_state(self) -> dict[str, Any]: ...

    def save_drift(
        self,
        tracks: Sequence[DriftTrack],
        state: Mapping[str, Any],
        audit: Sequence[tuple[str, str, str, Mapping[str, Any]]] = (),
    ) -> None: ...

    def windows_since(self, rowid: int, limit: int = 5000) -> tuple[list[StoredWindow], int]: ...


class Store(IngestWrites, Devices, TelemetryReads, DesiredStates, AuditLog, RepoCommits, Campaigns, Drift, Protocol):
    """Everything the fleet keeps, behind one handle; ``close()`` when done."""

    def close(self) -> None: ...
