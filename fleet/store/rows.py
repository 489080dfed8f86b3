"""What the store hands back: typed, immutable rows with times as unix seconds (floats).

Rows say what is stored, not how to show it: ISO times, "name:version" strings and tables are made by
:mod:`fleet.views` for the CLI and the HTTP API alike. JSON-typed fields (a device's hardware, an event's detail)
are the parsed values the device sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Reject:
    """A message the ingest refused. Only its reason, topic, detail and size are kept: never the payload body."""

    reason: str
    topic: str
    detail: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True)
class Device:
    """A device as its latest birth (or its first message) described it, and how many windows are stored for it."""

    device_id: str
    first_seen: float
    last_seen: float
    online: bool
    boot_id: str | None
    agent_version: str | None
    hardware: dict[str, Any] | None
    runtimes: list[str] | None
    models: dict[str, Any] | None
    offline_reason: str | None
    windows: int
    #: The tags the device was last enrolled with (site, hardware, ...: `fleet enroll --tag`); {} if none.
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def releases(self) -> dict[str, str | None]:
        """The release each model runs, by model name, as the birth said (None where it named none)."""
        models = self.models if isinstance(self.models, dict) else {}
        return {name: m.get("release") if isinstance(m, dict) else None for name, m in models.items()}

    @property
    def machine(self) -> str | None:
        """The CPU architecture the device reported (``platform.machine()``), if it did."""
        return (self.hardware or {}).get("machine")


@dataclass(frozen=True, slots=True)
class Event:
    """One event a device reported (install progress and outcomes, agent start and stop...)."""

    device_id: str
    boot_id: str
    seq: int
    ts: float
    type: str
    model: str | None
    detail: Any
    received_at: float


@dataclass(frozen=True, slots=True)
class InstallOutcome:
    """A device's latest install outcome (committed, failed, rolled back), with the seq of the desired state it
    answered (``desired_seq``), to compare with the last one published."""

    type: str
    model: str | None
    release: str | None
    reason: str | None
    desired_seq: int | None
    ts: float


@dataclass(frozen=True, slots=True)
class Gap:
    """Seqs ``first`` to ``last`` of a device that the fleet has not stored: no window or event holds them.

    A device's seqs come from its outbox, one sequence for windows and events that continues across boots, so a gap
    is a run of missing seqs between two stored ones: ``prev_boot_id`` is the boot of the seq stored just before it,
    ``boot_id`` the boot of the one just after (equal unless the loss straddles a reboot). A seq the device itself
    dropped (outbox full, disk full) is missing too, and was counted in the ``dropped`` field of a later window; the
    rest were lost or are still on their way. A resend that stores a missing seq narrows or closes the gap.
    """

    device_id: str
    first: int
    last: int
    prev_boot_id: str
    boot_id: str

    @property
    def missing(self) -> int:
        """How many seqs the gap spans."""
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class DeviceDetail:
    """One device with its event count, latest events (newest first) and latest install outcome; ``gaps`` are its
    latest gaps (lowest seq first, at most the store's ``LAST_GAPS``), ``missing`` the seqs missing in all of them."""

    device: Device
    events: int
    last_events: tuple[Event, ...]
    last_install: InstallOutcome | None
    gaps: tuple[Gap, ...] = ()
    missing: int = 0


@dataclass(frozen=True, slots=True)
class DesiredRecord:
    """A desired state recorded for a device; ``published_at`` is None until the broker acknowledged it."""

    device_id: str
    seq: int
    issued: float
    expires: float
    campaign: str | None
    models: dict[str, Any]
    created_at: float
    published_at: float | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A device's windows in a time range, and their histograms merged per (model, release).

    ``windows`` are the stored windows as the device sent them plus ``received_at``; each ``merged`` entry holds
    ``agent.histograms.merge_windows``'s fields plus ``windows`` (how many were merged) and ``dropped``.
    """

    device_id: str
    model: str | None
    since: float | None
    until: float | None
    windows: list[dict[str, Any]] = field(default_factory=list)
    merged: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Summary:
    """Fleet-wide counts for `fleet status`; ``gaps`` is the number of missing seqs per device that has any."""

    devices: int
    online: int
    windows: int
    events: int
    rejects: dict[str, int]
    gaps: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the hash-chained audit log; ``detail`` is parsed, ``detail_text`` is what the hash covers."""

    id: int
    ts: float
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str
    detail_text: str


@dataclass(frozen=True, slots=True)
class AuditCheck:
    """The result of walking the audit chain: ``rows`` verified, ending in hash ``head`` (record it elsewhere to detect
    rows cut off the end); ``bad_id`` and ``problem`` name the first row that does not verify."""

    ok: bool
    rows: int
    head: str
    bad_id: int | None = None
    problem: str | None = None


#: The top-level TUF roles a repository commit is made of, in the order they are checked.
REPO_ROLES = ("root", "timestamp", "snapshot", "targets")


@dataclass(frozen=True, slots=True)
class RepoCommit:
    """The fleet's TUF repository as the fleet's own last change left it: per role (``REPO_ROLES``) the metadata
    version and the sha256 of its file (``N.root.json``, ``timestamp.json``, ``N.snapshot.json``,
    ``N.targets.json``). :mod:`fleet.trust.history` refuses a repository behind it or whose files no longer hash so."""

    versions: dict[str, int]
    sha256: dict[str, str]
    recorded_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Campaign:
    """A rollout campaign: what it ships (``release``, "name:version", of ``model``), how (``spec``: its options as
    the operator gave them, canonical texts), where it is (``state``; ``wave`` under way, 0-based, -1 before the
    first; ``wave_done_at`` when every device of that wave finished, which starts its soak) and why it stopped."""

    id: str
    release: str
    model: str
    spec: dict[str, Any]
    state: str
    wave: int
    waves: int
    wave_done_at: float | None
    reason: str | None
    created_at: float
    updated_at: float
    actor: str
    #: The gates as the controller last evaluated them (a list of :func:`fleet.rollout.gates` results as dicts).
    gates: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Execution:
    """One device's part in a campaign. ``desired_seq`` is the last desired state sent it for the release
    (``first_seq`` the first), ``rollback_seq`` the one that returns it to ``from_release``; ``attempts`` counts the
    sends; ``heard_at`` is the fleet's clock at the device's last progress (what the device timeout runs from)."""

    campaign_id: str
    device_id: str
    wave: int
    position: int
    state: str
    reason: str | None = None
    detail: str | None = None
    from_release: str | None = None
    desired_seq: int | None = None
    first_seq: int | None = None
    rollback_seq: int | None = None
    attempts: int = 0
    notified_at: float | None = None
    heard_at: float | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """A gate evaluation that changed a campaign's course or a gate's verdict, with its figures (append-only)."""

    id: int
    campaign_id: str
    ts: float
    wave: int
    gate: str
    verdict: str
    figures: dict[str, Any]
    action: str | None


@dataclass(frozen=True, slots=True)
class DriftTrack:
    """A scope's drift of one kind on one model, as the detector last judged it: ``state`` ok, warning or drift,
    ``since`` the round it first hit (fleet clock), ``features`` the moved features ranked by effect (each a dict:
    feature, effect, psi, direction, p_value, observed), ``classes`` the predicted shares that moved most
    (class, share, rest's share), ``history`` the last rounds' hits."""

    model: str
    scope: str
    key: str
    kind: str
    release: str
    state: str
    history: list[bool]
    since: float | None
    features: list[dict[str, Any]]
    classes: list[list[float]]
    figures: dict[str, Any]
    detail: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event with its place in the store (``rowid`` grows with every event stored): what the campaign controller
    reads, from where it stopped."""

    rowid: int
    event: Event


@dataclass(frozen=True, slots=True)
class StoredWindow:
    """A telemetry window (decoded, as the device sent it) with its place in the store and the fleet's clock when it
    arrived."""

    rowid: int
    window: dict[str, Any]
    received_at: float


@dataclass(frozen=True)
class RolloutUpdate:
    """What one round of the controller changes, written in one transaction: executions (whole rows), campaign
    fields (``wave``, ``wave_done_at``, ``reason``), gate decisions (without ids), audit entries (actor, action,
    subject, detail) and the reading places (``cursors``: name -> last rowid read)."""

    executions: Sequence[Execution] = ()
    campaigns: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    decisions: Sequence[Decision] = ()
    audit: Sequence[tuple[str, str, str, Mapping[str, Any]]] = ()
    cursors: Mapping[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.executions or self.campaigns or self.decisions or self.audit or self.cursors)
