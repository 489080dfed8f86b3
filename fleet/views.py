"""The fleet's JSON shapes: store rows as documents for `--json` and the HTTP API alike (one shape per thing).

Times become ISO 8601 UTC strings with milliseconds; releases in desired states become "name:version" beside their
signed entries. Pure functions over :mod:`fleet.store.rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from agent.targets import parse_target_path
from fleet.store.rows import (
    AuditCheck,
    AuditEntry,
    Campaign,
    Decision,
    DesiredRecord,
    Device,
    DeviceDetail,
    Event,
    Execution,
    Gap,
    InstallOutcome,
    Summary,
    Telemetry,
)


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with millisecond precision."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def release_ref(name: str, version: str) -> str:
    """A release as people and devices name it: "name:version"."""
    return f"{name}:{version}"


def release_of(entry: Mapping[str, Any]) -> str:
    """A desired-state model entry as the "name:version" devices report."""
    name, version, _ = parse_target_path(entry["target"])
    return release_ref(name, version)


def device_json(device: Device) -> dict[str, Any]:
    """A device as `fleet devices list --json` lists it (and the head of `devices show`)."""
    doc = asdict(device)
    doc.update(first_seen=iso(device.first_seen), last_seen=iso(device.last_seen), releases=device.releases)
    return doc


def device_summary_json(device: Device) -> dict[str, Any]:
    """The fields of `fleet devices list --json`."""
    doc = device_json(device)
    keys = ("device_id", "online", "last_seen", "windows", "agent_version", "models", "releases", "tags")
    return {k: doc[k] for k in keys}


def event_json(event: Event) -> dict[str, Any]:
    return {**asdict(event), "ts": iso(event.ts), "received_at": iso(event.received_at)}


def install_json(outcome: InstallOutcome | None) -> dict[str, Any] | None:
    return None if outcome is None else {**asdict(outcome), "ts": iso(outcome.ts)}


def gap_json(gap: Gap) -> dict[str, Any]:
    """A run of seqs the fleet has not stored: ``first`` to ``last`` (``missing`` of them), between the seqs stored
    under ``prev_boot_id`` and ``boot_id``."""
    return {
        "first": gap.first,
        "last": gap.last,
        "missing": gap.missing,
        "prev_boot_id": gap.prev_boot_id,
        "boot_id": gap.boot_id,
    }


def device_detail_json(detail: DeviceDetail, desired: DesiredRecord | None) -> dict[str, Any]:
    """`fleet devices show --json`: the device, its events, last install, the last desired state published, and its
    gaps: ``gaps`` its latest runs of missing seqs, ``missing`` how many seqs all of its gaps span."""
    return {
        **device_json(detail.device),
        "events": detail.events,
        "gaps": [gap_json(g) for g in detail.gaps],
        "missing": detail.missing,
        "last_events": [event_json(e) for e in detail.last_events],
        "last_install": install_json(detail.last_install),
        "desired": desired
        and {
            "seq": desired.seq,
            "campaign": desired.campaign,
            "expires": iso(desired.expires),
            "releases": {name: release_of(entry) for name, entry in desired.models.items()},
        },
    }


def desired_json(state: DesiredRecord, *, recorded: bool = True) -> dict[str, Any]:
    """A desired state with ISO times and each model's release as "name:version"; ``recorded=False`` leaves out the
    bookkeeping times (what `fleet assign --json` prints for the states it just published)."""
    doc = asdict(state)
    for key in ("issued", "expires", "created_at", "published_at"):
        doc[key] = iso(doc[key])
    if not recorded:
        del doc["created_at"], doc["published_at"]
    doc["releases"] = {name: release_of(entry) for name, entry in state.models.items()}
    return doc


def telemetry_json(data: Telemetry) -> dict[str, Any]:
    """`fleet telemetry --json`: the windows and their per-release merges, times as ISO."""
    times = ("window_start", "window_end", "received_at")
    return {
        "device_id": data.device_id,
        "model": data.model,
        "since": iso(data.since),
        "until": iso(data.until),
        "windows": [{**w, **{k: iso(w[k]) for k in times if k in w}} for w in data.windows],
        "merged": [{**m, **{k: iso(m[k]) for k in times if k in m}} for m in data.merged],
    }


def summary_json(summary: Summary) -> dict[str, Any]:
    """`fleet status --json`."""
    return {
        "devices": {
            "total": summary.devices,
            "online": summary.online,
            "offline": summary.devices - summary.online,
        },
        "windows": summary.windows,
        "events": summary.events,
        "rejects": summary.rejects,
        "gaps": {"missing": sum(summary.gaps.values()), "devices": summary.gaps},
    }


def audit_entry_json(entry: AuditEntry) -> dict[str, Any]:
    doc = asdict(entry)
    del doc["detail_text"]
    doc["ts"] = iso(entry.ts)
    return doc


def audit_check_json(check: AuditCheck) -> dict[str, Any]:
    return asdict(check)


def execution_json(e: Execution) -> dict[str, Any]:
    """One device of a campaign; ``wave`` counts from 1, as people number waves."""
    return {
        "device_id": e.device_id,
        "wave": e.wave + 1,
        "state": e.state,
        "reason": e.reason,
        "detail": e.detail,
        "from_release": e.from_release,
        "attempts": e.attempts,
        "desired_seq": e.desired_seq,
        "notified_at": iso(e.notified_at),
        "heard_at": iso(e.heard_at),
    }


def _wave_state(c: Campaign, index: int, counts: Mapping[str, int]) -> str:
    """Where one wave is: waiting (not started), sending (devices still queued), installing, soaking, done, or
    stopped (the campaign ended before it was done)."""
    if index > c.wave:
        return "stopped" if c.state in ("rolled_back", "aborted", "rolling_back") else "waiting"
    if index < c.wave or c.state == "succeeded":
        return "done"
    if c.state not in ("running", "paused"):
        return "stopped"
    if counts.get("queued"):
        return "sending"
    return "soaking" if c.wave_done_at is not None else "installing"


def campaign_json(
    c: Campaign, executions: Sequence[Execution], decisions: Sequence[Decision] | None = None
) -> dict[str, Any]:
    """`fleet rollout status --json`: the campaign, its waves with their devices counted by state, its gates as last
    evaluated, each device (``devices``) and the decisions that changed its course. Without ``decisions``, one item
    of `fleet rollout list --json`: the same less the devices and decisions."""
    soak_s = float(c.spec.get("soak_s", 0.0))
    by_wave: dict[int, dict[str, int]] = {}
    for e in executions:
        by_wave.setdefault(e.wave, {}).setdefault(e.state, 0)
        by_wave[e.wave][e.state] += 1
    totals: dict[str, int] = {}
    for e in executions:
        totals[e.state] = totals.get(e.state, 0) + 1
    waves = []
    for index in range(c.waves):
        counts = by_wave.get(index, {})
        soaking = index == c.wave and c.wave_done_at is not None
        waves.append({
            "wave": index + 1,
            "devices": sum(counts.values()),
            "state": _wave_state(c, index, counts),
            "counts": counts,
            "soak_until": iso(c.wave_done_at + soak_s) if soaking and c.wave_done_at is not None else None,
        })  # fmt: skip
    doc: dict[str, Any] = {
        "id": c.id,
        "release": c.release,
        "model": c.model,
        "state": c.state,
        "reason": c.reason,
        "wave": c.wave + 1,
        "waves": waves,
        "device_count": len(executions),
        "counts": totals,
        "gates": c.gates,
        "spec": c.spec,
        "actor": c.actor,
        "created_at": iso(c.created_at),
        "updated_at": iso(c.updated_at),
    }
    if decisions is not None:
        doc["devices"] = [execution_json(e) for e in executions]
        doc["decisions"] = [decision_json(d) for d in decisions]
    return doc


def decision_json(d: Decision) -> dict[str, Any]:
    """A recorded gate decision: the gate, its verdict, what it led to, and its figures."""
    return {
        "ts": iso(d.ts),
        "wave": d.wave + 1,
        "gate": d.gate,
        "verdict": d.verdict,
        "action": d.action,
        "detail": d.figures.get("detail"),
        "figures": d.figures,
    }
