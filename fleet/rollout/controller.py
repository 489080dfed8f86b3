"""The campaign controller: inside `fleet serve`, one round a second drives every active campaign.

A round reads what the store gained since the last one (device events by rowid, telemetry windows by rowid), moves
each execution by what its device said (:mod:`fleet.rollout.progress`), times out the silent ones, weighs the gates
(:mod:`fleet.rollout.gates`) and acts: sends the next devices their desired state, pauses, rolls back, or ends the
campaign. Everything it decides is in the store before it acts on it, and the events' reading place is written in the
same transaction as the executions they moved, so a `fleet serve` killed at any instant continues where it was and
counts no device twice. The telemetry piles (:class:`~fleet.rollout.evidence.Evidence`) live in memory and are read
again from the store at start.

The rules of a campaign's course:

* a wave is sent only while the campaign runs; a device whose maintenance window is closed (cron and duration in its
  local time: its ``tz`` tag, else UTC) waits, and so does its wave;
* a wave is done when every device sent the release so far has finished; the next starts after ``soak_s`` more, if
  no gate failed and the KPI gates decided (or stayed undecided for the length of another soak, at least a minute:
  that is recorded as such);
* a failed gate pauses or rolls back (``on_failure``), with the gate's figures as the campaign's reason;
* a rollback sends every touched device its ``from_release`` (maintenance windows do not hold a rollback back);
  devices never sent the release are never sent anything.

Operators' actions (`fleet rollout pause` ...) change the campaign's state in the store from any process; the next
round acts on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from agent import protocol
from agent.logs import event
from fleet.errors import FleetError
from fleet.ops import assign as ops_assign
from fleet.ops import rollout as ops_rollout
from fleet.rollout import gates
from fleet.rollout.evidence import Evidence
from fleet.rollout.progress import EVENT_TYPES, on_event, on_silence
from fleet.rollout.spec import CampaignSpec
from fleet.rollout.states import (
    ACTIVE,
    ENDED,
    FINISHED,
    TOUCHED,
    CampaignEvent,
    CampaignState,
    ExecEvent,
    ExecState,
    next_campaign,
    next_exec,
)
from fleet.rollout.window import check_timezone, local_time
from fleet.rounds import Rounds
from fleet.store.api import Store
from fleet.store.rows import Campaign, Decision, Execution, RolloutUpdate
from fleet.trust.repository import Repository

log = logging.getLogger(__name__)

#: The controller's name in the audit log.
ACTOR = "controller"
#: How far back before a campaign began its devices' telemetry counts as their baseline.
BASELINE_LOOKBACK_S = 3600.0
#: Rows read per query; a round reads events until it has caught up.
_CHUNK = 5000
#: Windows a round files at most per campaign: a campaign's first round after a start reads the baseline's hour
#: (0.14-0.26 ms a window: 1,000 devices with 10 s windows would hold every campaign's round for a minute), so it
#: reads it over several rounds, its KPI gates pending until it has caught up.
WINDOWS_PER_ROUND = 20_000
#: The tag that names a device's time zone (IANA), for maintenance windows.
TZ_TAG = "tz"
#: An execution's reason when its device cannot be rolled back (see :func:`fleet.ops.rollout.unreturnable`).
NOTHING_TO_RETURN_TO = "nothing_to_return_to"
#: How long an ended campaign still hears from its timed-out devices: the desired states it sent are valid a week.
WATCH_ENDED_S = 7 * 86400.0


@dataclass
class _Round:
    """What one round of one campaign changed, before it is written."""

    executions: dict[str, Execution] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    audit: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)


class CampaignController(Rounds):
    """Drives active campaigns: :meth:`start` runs :meth:`tick` every ``tick_s`` on a thread until :meth:`stop`.

    ``connect()`` opens a publisher to the broker (:class:`~fleet.publisher.DesiredPublisher`); ``clock`` is the
    fleet's clock (seconds since the epoch), the one the store stamps ``received_at`` with: tests that move it (for
    maintenance windows, timeouts, soaks) stamp the device events they store with it too."""

    def __init__(
        self,
        store: Store,
        repo: Repository,
        connect: Callable[[], AbstractContextManager[ops_assign.Publisher]],
        *,
        prefix: str = protocol.DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        tick_s: float = 1.0,
    ) -> None:
        self._store, self._repo, self._connect = store, repo, connect
        super().__init__("rollout", tick_s)
        self._prefix, self._clock = prefix, clock
        self._evidence: dict[str, Evidence] = {}
        self._window_cursor: dict[str, int] = {}
        self._verdicts: dict[str, dict[str, str]] = {}

    # -- one round ----------------------------------------------------------------------------------------------

    def tick(self) -> None:
        """One round over every active campaign (see the module docstring)."""
        now = self._clock()
        campaigns = self._store.campaigns([s.value for s in ACTIVE])
        executions = {c.id: {e.device_id: e for e in self._store.executions(c.id)} for c in campaigns}
        # An ended campaign still hears its timed-out devices for as long as their desired state is valid: one that
        # comes back and commits is counted as what it did (rolled back, or succeeded), not left timed out.
        ended = [c for c in self._store.campaigns([s.value for s in ENDED]) if now - c.updated_at < WATCH_ENDED_S]
        for c in ended:
            silent = self._store.executions(c.id, [ExecState.TIMED_OUT.value])
            if silent:
                executions[c.id] = {e.device_id: e for e in silent}
        heard = [*campaigns, *(c for c in ended if c.id in executions)]
        rounds = {c.id: _Round() for c in heard}
        self._read_events(heard, executions, rounds)
        caught_up = {c.id: self._read_windows(c, executions[c.id]) for c in campaigns}
        for c in campaigns:
            self._campaign_round(c, executions[c.id], rounds[c.id], caught_up[c.id])

    def _read_events(
        self, campaigns: Sequence[Campaign], executions: dict[str, dict[str, Execution]], rounds: dict[str, _Round]
    ) -> int:
        """Move executions by the device events stored since the last round; returns the new reading place. The
        moves are written with it, so an event moves an execution once."""
        cursors = self._store.rollout_cursors()
        cursor = cursors.get("events")
        if cursor is None:  # the first round ever: older events cannot answer a desired state not yet sent
            cursor = self._store.last_event_rowid()
            self._store.save_rollout(RolloutUpdate(cursors={"events": cursor}))
            return cursor
        while True:
            batch = self._store.events_after(cursor, EVENT_TYPES, _CHUNK)
            for stored in batch:
                e = stored.event
                for c in campaigns:
                    current = executions[c.id].get(e.device_id)
                    if current is None:
                        continue
                    moved = on_event(current, e, c.release, c.model)
                    if moved is not None:
                        executions[c.id][e.device_id] = rounds[c.id].executions[e.device_id] = moved
            if batch:
                cursor = batch[-1].rowid
            if len(batch) < _CHUNK:
                break
        moved = [e for r in rounds.values() for e in r.executions.values()]
        self._store.save_rollout(RolloutUpdate(executions=moved, cursors={"events": cursor}))
        for r in rounds.values():
            r.executions.clear()
        return cursor

    def _read_windows(self, c: Campaign, executions: dict[str, Execution]) -> bool:
        """File the campaign's windows stored since the last round (from the baseline's start, after a restart), up
        to :data:`WINDOWS_PER_ROUND`; whether it has caught up."""
        evidence = self._evidence.get(c.id)
        if evidence is None:
            evidence = self._evidence[c.id] = Evidence(c.release, c.created_at)
            self._window_cursor[c.id] = self._store.first_window_rowid_since(c.created_at - BASELINE_LOOKBACK_S)
            self._verdicts[c.id] = {d.gate: d.verdict for d in self._store.decisions(c.id)}
        for _ in range(WINDOWS_PER_ROUND // _CHUNK):
            found, last = self._store.windows_after(self._window_cursor[c.id], c.model, executions, _CHUNK)
            for w in found:
                evidence.add(w.window, w.received_at, executions[w.window["device_id"]])
            done = last == self._window_cursor[c.id]
            self._window_cursor[c.id] = last
            if done:
                return True
        return False

    def _campaign_round(self, c: Campaign, executions: dict[str, Execution], r: _Round, caught_up: bool) -> None:
        state = CampaignState(c.state)
        spec = CampaignSpec.from_dict(c.spec)
        now = self._clock()
        if state is CampaignState.PENDING:
            c = self._move(c, CampaignEvent.START, {"release": c.release, "devices": len(executions)}) or c
            state = CampaignState(c.state)
        if state is CampaignState.RUNNING:
            self._timeouts(c, executions, r, now, spec.device_timeout_s, spec.retries)
            self._running(c, spec, executions, r, now, caught_up)
        elif state is CampaignState.ROLLING_BACK:
            self._timeouts(c, executions, r, now, spec.device_timeout_s, 0)
            self._rolling_back(c, executions, r)
        self._save(c, r)

    def _timeouts(
        self, c: Campaign, executions: dict[str, Execution], r: _Round, now: float, timeout_s: float, retries: int
    ) -> None:
        """Time out the executions silent for ``timeout_s``; send again those with retries left (none: no resend)."""
        due: list[Execution] = []
        for device_id, e in executions.items():
            result = on_silence(e, now, timeout_s, retries)
            if result is None:
                continue
            moved, again = result
            executions[device_id] = r.executions[device_id] = moved
            if again:
                due.append(moved)
        if due:
            self._send(c, due, executions, r, rollback=False)

    def _running(
        self, c: Campaign, spec: CampaignSpec, executions: dict[str, Execution], r: _Round, now: float, caught_up: bool
    ) -> None:
        wave = max(c.wave, 0)
        sent = [e for e in executions.values() if e.wave <= wave]
        complete = all(ExecState(e.state) in FINISHED for e in sent)
        drift = [t for t in self._store.drift_tracks() if t.release == c.release] if spec.drift_gate else None
        results = gates.evaluate(
            spec, list(executions.values()), wave, self._evidence[c.id].groups(executions.values()),
            wave_complete=complete, kpis_ready=caught_up, drift=drift,
        )  # fmt: skip
        self._record_gates(c, results, r, now)
        if failed := gates.tripped(results):
            reason = f"wave {wave + 1}: " + "; ".join(g.detail for g in failed)
            how = CampaignEvent.ROLLBACK if spec.on_failure == "rollback" else CampaignEvent.PAUSE
            r.decisions.extend(
                Decision(0, c.id, now, wave, g.gate, g.verdict, {**g.figures, "detail": g.detail}, how.value)
                for g in failed
            )
            self._save(c, r)
            moved = self._move(c, how, {"reason": reason, "gates": [g.to_dict() for g in failed]}, reason=reason)
            if moved is not None and how is CampaignEvent.ROLLBACK:
                self._rolling_back(moved, executions, r)
            return
        if c.wave < 0:
            self._start_wave(c, 0, executions, r)
            return
        waiting = [e for e in sent if ExecState(e.state) is ExecState.QUEUED]
        if waiting:
            self._send(c, self._window_open(spec, waiting, now), executions, r, rollback=False)
            return
        if not complete:
            return
        if c.wave_done_at is None:
            r.fields["wave_done_at"] = now
            event(log, "rollout_wave_done", campaign=c.id, wave=wave + 1, devices=len(sent))
            return
        soak_end = c.wave_done_at + spec.soak_s
        if now < soak_end:
            return
        if undecided := gates.undecided(results):
            if now < soak_end + max(spec.soak_s, 60.0):
                return
            r.decisions.extend(
                Decision(0, c.id, now, wave, g.gate, "inconclusive", {**g.figures, "detail": g.detail}, "continue")
                for g in undecided
            )
        if wave + 1 < c.waves:
            self._start_wave(c, wave + 1, executions, r)
            return
        succeeded = sum(ExecState(e.state) is ExecState.SUCCEEDED for e in executions.values())
        reason = f"{succeeded} of {len(executions)} devices run {c.release}"
        self._save(c, r)
        self._move(c, CampaignEvent.COMPLETE, {"succeeded": succeeded, "devices": len(executions)}, reason=reason)

    def _start_wave(self, c: Campaign, wave: int, executions: dict[str, Execution], r: _Round) -> None:
        devices = [e for e in executions.values() if e.wave == wave]
        r.fields.update(wave=wave, wave_done_at=None)
        r.audit.append((ACTOR, "rollout_wave", c.id, {"wave": wave + 1, "devices": len(devices)}))
        event(log, "rollout_wave_started", campaign=c.id, wave=wave + 1, of=c.waves, devices=len(devices))
        spec = CampaignSpec.from_dict(c.spec)
        self._send(c, self._window_open(spec, devices, self._clock()), executions, r, rollback=False)

    def _window_open(self, spec: CampaignSpec, candidates: Iterable[Execution], now: float) -> list[Execution]:
        """The executions whose device's maintenance window is open now (all of them without a window)."""
        window = spec.maintenance
        if window is None:
            return list(candidates)
        candidates = list(candidates)
        tags = self._store.tags() if candidates else {}
        open_now = []
        for e in candidates:
            tz = tags.get(e.device_id, {}).get(TZ_TAG)
            try:
                tz = check_timezone(tz) if tz else None
            except ValueError:
                tz = None  # an unknown zone: UTC, as for a device without one
            if window.is_open(local_time(now, tz)):
                open_now.append(e)
        return open_now

    def _rolling_back(self, c: Campaign, executions: dict[str, Execution], r: _Round) -> None:
        """Send every touched device not yet sent back its ``from_release``; end the rollback when none is left."""
        due, stranded = [], []
        why_not: dict[str | None, str | None] = {}
        for e in executions.values():
            state = ExecState(e.state)
            if state not in TOUCHED or state in (ExecState.ROLLING_BACK, ExecState.ROLLED_BACK):
                continue
            if e.rollback_seq is not None:  # timed out on its way back: its state waits for it on the broker
                continue
            if e.reason == NOTHING_TO_RETURN_TO:
                continue
            if e.from_release not in why_not:
                why_not[e.from_release] = ops_rollout.unreturnable(self._repo, c.model, e.from_release)
            if (why := why_not[e.from_release]) is not None:
                stranded.append((e, why))
                continue
            due.append(e)
        for e, why in stranded:
            executions[e.device_id] = r.executions[e.device_id] = replace(e, reason=NOTHING_TO_RETURN_TO, detail=why)
        if due:
            self._send(c, due, executions, r, rollback=True)
        if any(ExecState(e.state) is ExecState.ROLLING_BACK for e in executions.values()):
            return
        if any(e.rollback_seq is None and e.reason != NOTHING_TO_RETURN_TO
               and ExecState(e.state) in TOUCHED - {ExecState.ROLLED_BACK} for e in executions.values()):  # fmt: skip
            return  # some could not be sent yet (the broker is away): the next round tries again
        back = sum(ExecState(e.state) is ExecState.ROLLED_BACK for e in executions.values())
        self._save(c, r)
        self._move(c, CampaignEvent.REVERTED, {"rolled_back": back})

    # -- acting ------------------------------------------------------------------------------------------------

    def _send(
        self, c: Campaign, due: Sequence[Execution], executions: dict[str, Execution], r: _Round, *, rollback: bool
    ) -> None:
        """Sign and publish the desired state of each due execution (its ``from_release`` for a rollback), and move
        it as each is acknowledged by the broker. A broker failure leaves the rest for the next round."""
        by_release: dict[str, list[Execution]] = {}
        for e in due:
            by_release.setdefault(e.from_release if rollback else c.release, []).append(e)
        move = ExecEvent.ROLLBACK if rollback else ExecEvent.NOTIFY
        for ref, group in by_release.items():
            name, _, version = ref.partition(":")
            ids = [e.device_id for e in group]
            try:
                assignment = ops_assign.check(
                    self._store, self._repo, ids, name, version, campaign=c.id, allow_unknown=True
                )
                with self._connect() as publisher:
                    for record in ops_assign.publish(self._store, assignment, publisher, actor=ACTOR,
                                                     prefix=self._prefix):  # fmt: skip
                        e = executions[record.device_id]
                        state = next_exec(ExecState(e.state), move)
                        if state is None:
                            continue
                        sent_at = self._clock()
                        moved = replace(e, state=state.value, notified_at=sent_at, heard_at=sent_at)
                        if rollback:
                            moved = replace(moved, rollback_seq=record.seq)
                        else:
                            moved = replace(moved, desired_seq=record.seq, first_seq=e.first_seq or record.seq,
                                            attempts=e.attempts + 1)  # fmt: skip
                        executions[e.device_id] = r.executions[e.device_id] = moved
            except FleetError as exc:
                event(log, "rollout_send_failed", logging.WARNING, campaign=c.id, release=ref, devices=len(ids),
                      reason=exc.reason, detail=exc.detail)  # fmt: skip
                self._save(c, r)
                return

    def _record_gates(self, c: Campaign, results: Sequence[gates.GateResult], r: _Round, now: float) -> None:
        """Keep the gates' current values on the campaign, and a decision row for each verdict that changed."""
        docs = [g.to_dict() for g in results]
        if docs != c.gates:
            r.fields["gates"] = docs
        seen = self._verdicts.setdefault(c.id, {})
        for g in results:
            if seen.get(g.gate) != g.verdict:
                seen[g.gate] = g.verdict
                r.decisions.append(
                    Decision(0, c.id, now, max(c.wave, 0), g.gate, g.verdict, {**g.figures, "detail": g.detail}, None)
                )

    def _move(
        self, c: Campaign, how: CampaignEvent, detail: dict[str, Any], reason: str | None = None
    ) -> Campaign | None:
        """Move the campaign by the table if it is still as read; None if someone moved it first."""
        new = next_campaign(CampaignState(c.state), how)
        moved = self._store.move_campaign(c.id, c.state, new.value, actor=ACTOR, action=f"rollout_{how.value}",
                                          detail=detail, reason=reason)  # fmt: skip
        if moved is not None:
            event(log, f"rollout_{how.value}", campaign=c.id, state=new.value, **({"reason": reason} if reason else {}))
            if new not in ACTIVE:
                self._forget(c.id)
        return moved

    def _forget(self, campaign_id: str) -> None:
        self._evidence.pop(campaign_id, None)
        self._window_cursor.pop(campaign_id, None)
        self._verdicts.pop(campaign_id, None)

    def _save(self, c: Campaign, r: _Round) -> None:
        """Write what the round has changed so far (and start it afresh)."""
        if not (r.executions or r.fields or r.decisions or r.audit):
            return
        self._store.save_rollout(
            RolloutUpdate(
                executions=list(r.executions.values()), campaigns={c.id: dict(r.fields)} if r.fields else {},
                decisions=r.decisions, audit=r.audit,
            )
        )  # fmt: skip
        r.executions.clear()
        r.fields.clear()
        r.decisions.clear()
        r.audit.clear()
