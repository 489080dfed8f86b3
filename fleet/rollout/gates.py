"""A campaign's gates, checked all the time: the failed and timed-out shares, and the KPI gates. Pure.

The shares are of the devices that finished (succeeded, failed or timed out), so a wave that fails fast trips fast;
they decide once ``min_devices`` have finished, or every device of a finished wave when fewer were sent the
release. A KPI gate decides by :func:`fleet.rollout.kpi.evaluate` (a minimum sample, a test and an effect beyond the
limit, against the devices' own baseline and the devices not yet upgraded).

Every result carries one human line (``detail``) that says what was measured, for `fleet rollout status` and for the
reason a campaign stopped ("failed 3 of 3 devices (100%; limit 10%)").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.rollout.evidence import Groups
from fleet.rollout.kpi import evaluate as evaluate_kpi
from fleet.rollout.spec import CampaignSpec
from fleet.rollout.states import FINISHED, ExecState
from fleet.store.rows import DriftTrack, Execution

PASS, FAIL, PENDING, NOT_APPLICABLE = "pass", "fail", "pending", "n/a"


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict now: ``pass``, ``fail``, ``pending`` (not enough to decide yet) or ``n/a``."""

    gate: str
    verdict: str
    value: float | None
    limit: str
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def share_gate(gate: str, what: str, hits: int, finished: int, limit_pct: float, min_count: int) -> GateResult:
    """``hits`` of ``finished`` devices against a limit in percent, once ``min_count`` have finished."""
    share = 100.0 * hits / finished if finished else None
    figures = {"count": hits, "finished": finished, "min_count": min_count}
    limit = f"<= {limit_pct:g}%"
    if finished < min_count or share is None:
        detail = f"{finished} of the {min_count} devices needed have finished"
        return GateResult(gate, PENDING, share, limit, detail, figures)
    verdict = FAIL if share > limit_pct else PASS
    detail = f"{what} {hits} of {finished} devices ({share:.0f}%; limit {limit_pct:g}%)"
    return GateResult(gate, verdict, share, limit, detail, figures)


def evaluate(
    spec: CampaignSpec,
    executions: Sequence[Execution],
    wave: int,
    groups: Groups,
    *,
    wave_complete: bool,
    kpis_ready: bool = True,
    drift: Sequence[DriftTrack] | None = None,
) -> list[GateResult]:
    """Every gate of the campaign now. ``wave`` is the wave under way; ``wave_complete`` lowers the shares' minimum
    to the devices sent the release when the wave is done and fewer than ``min_devices`` were; without
    ``kpis_ready`` (the controller is still reading the campaign's telemetry) the KPI gates are pending. ``drift``
    is what the drift detector says of the campaign's release (its tracks), for the ``drift`` gate."""
    states = [ExecState(e.state) for e in executions]
    finished = sum(s in FINISHED for s in states)
    sent = sum(e.wave <= wave and e.attempts > 0 for e in executions)
    min_count = min(spec.min_devices, sent) if wave_complete else spec.min_devices
    min_count = max(min_count, 1)
    failed = sum(s is ExecState.FAILED for s in states)
    timed_out = sum(s is ExecState.TIMED_OUT for s in states)
    results = [
        share_gate("failed", "failed", failed, finished, spec.max_failed, min_count),
        share_gate("timed_out", "timed out", timed_out, finished, spec.max_timed_out, min_count),
    ]
    if spec.drift_gate:
        results.append(drift_gate(drift, {e.device_id for e in executions}))
    for kpi in spec.kpi_gates:
        if not kpis_ready:
            read = groups.upgraded.windows + groups.baseline.windows + groups.control.windows
            reading = f"reading the campaign's telemetry: {read} windows so far"
            results.append(GateResult(kpi.text, PENDING, None, kpi.text, reading))
            continue
        r = evaluate_kpi(kpi, groups.upgraded, groups.baseline, groups.control, min_count=spec.kpi_min_count)
        figures = {"baseline": r.baseline, "control": r.control, "p_value": r.p_value, "count": r.count,
                   "devices": r.devices}  # fmt: skip
        results.append(GateResult(kpi.text, r.verdict, r.value, kpi.text, r.detail, figures))
    return results


def drift_gate(tracks: Sequence[DriftTrack] | None, devices: set[str]) -> GateResult:
    """The ``drift`` gate: it fails when the drift detector holds a drift (persisted, not a one-round warning) on the
    campaign's release for one of its devices, or for a site or the fleet; it is pending until the detector has
    judged the release at all (``tracks`` None or empty)."""
    if not tracks:
        return GateResult("drift", PENDING, None, "no drift", "the drift detector has not judged the release yet")
    found = [t for t in tracks if t.state == "drift" and (t.scope != "device" or t.key in devices)]
    if not found:
        return GateResult("drift", PASS, 0.0, "no drift", f"no drift on the release ({len(tracks)} scopes judged)")
    first = found[0]
    where = first.key if first.scope != "device" else f"device {first.key}"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    detail = f"{first.kind} drift on {where}: {first.detail}{more}"
    return GateResult("drift", FAIL, float(len(found)), "no drift", detail, {"alarms": len(found)})


def tripped(results: Sequence[GateResult]) -> list[GateResult]:
    return [r for r in results if r.verdict == FAIL]


def undecided(results: Sequence[GateResult]) -> list[GateResult]:
    return [r for r in results if r.verdict == PENDING]
