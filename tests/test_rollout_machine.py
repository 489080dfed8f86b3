"""The rollout's pure parts: the two state machines, what device events and silence do to an execution, the share
gates, how telemetry windows are filed for the KPI gates, and the campaign's options. No I/O: rows in, rows out."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.protocol import LATENCY_EDGES_MS
from fleet.rollout import gates
from fleet.rollout.evidence import Evidence, Groups
from fleet.rollout.kpi import Sample
from fleet.rollout.progress import on_event, on_silence
from fleet.rollout.spec import CampaignSpec, parse_spec
from fleet.rollout.states import (
    EXEC_TRANSITIONS,
    TOUCHED,
    TRANSITIONS,
    CampaignEvent,
    CampaignState,
    ExecEvent,
    ExecState,
    IllegalMove,
    next_campaign,
    next_exec,
)
from fleet.store.rows import DriftTrack, Event, Execution

OLD, NEW = "digits:1.0.0", "digits:1.1.0"
NOTIFIED_AT = 1000.0
FIRST_SEQ = 5


# --------------------------------------------------------------------------------------------------------------
# The campaign's table


@pytest.mark.parametrize(("state", "event", "target"), [(s, e, t) for (s, e), t in TRANSITIONS.items()])
def test_every_documented_campaign_move_goes_where_the_table_says(
    state: CampaignState, event: CampaignEvent, target: CampaignState
) -> None:
    assert next_campaign(state, event) is target


def test_the_campaign_table_holds_exactly_the_documented_moves() -> None:
    documented = {
        ("pending", "start"): "running", ("pending", "abort"): "aborted", ("pending", "rollback"): "rolling_back",
        ("running", "pause"): "paused", ("running", "abort"): "aborted", ("running", "rollback"): "rolling_back",
        ("running", "complete"): "succeeded", ("paused", "resume"): "running", ("paused", "abort"): "aborted",
        ("paused", "rollback"): "rolling_back", ("succeeded", "rollback"): "rolling_back",
        ("aborted", "rollback"): "rolling_back", ("rolling_back", "reverted"): "rolled_back",
    }  # fmt: skip
    assert {(s.value, e.value): t.value for (s, e), t in TRANSITIONS.items()} == documented


def test_a_succeeded_campaign_cannot_pause_and_the_error_says_it_takes_rollback() -> None:
    with pytest.raises(IllegalMove, match=r"^a succeeded campaign cannot pause: it takes rollback$"):
        next_campaign(CampaignState.SUCCEEDED, CampaignEvent.PAUSE)


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in CampaignState for e in CampaignEvent if (s, e) not in TRANSITIONS],
)
def test_an_illegal_campaign_move_raises_naming_what_the_state_takes(
    state: CampaignState, event: CampaignEvent
) -> None:
    takes = sorted(e.value for (s, e) in TRANSITIONS if s is state)
    with pytest.raises(IllegalMove) as caught:
        next_campaign(state, event)
    message = str(caught.value)
    article = "an" if state is CampaignState.ABORTED else "a"
    assert message.startswith(f"{article} {state.value} campaign cannot {event.value}: ")
    assert message.endswith(f"it takes {', '.join(takes)}" if takes else "it has ended")


@pytest.mark.parametrize("event", list(CampaignEvent))
def test_a_rolled_back_campaign_has_ended_and_takes_nothing(event: CampaignEvent) -> None:
    with pytest.raises(IllegalMove, match="it has ended"):
        next_campaign(CampaignState.ROLLED_BACK, event)


# --------------------------------------------------------------------------------------------------------------
# The execution's table


@pytest.mark.parametrize("late", [ExecState.PROBATION, ExecState.SUCCEEDED])
def test_a_late_downloading_after_probation_or_success_is_no_move(late: ExecState) -> None:
    assert next_exec(late, ExecEvent.DOWNLOADING) is None
    assert next_exec(late, ExecEvent.INSTALLING) is None


def test_a_device_moves_only_forward_along_its_install() -> None:
    assert next_exec(ExecState.NOTIFIED, ExecEvent.DOWNLOADING) is ExecState.DOWNLOADING
    assert next_exec(ExecState.DOWNLOADING, ExecEvent.PROBATION) is ExecState.PROBATION
    assert next_exec(ExecState.INSTALLING, ExecEvent.DOWNLOADING) is None
    assert next_exec(ExecState.PROBATION, ExecEvent.PROBATION) is None
    assert next_exec(ExecState.PROBATION, ExecEvent.COMMITTED) is ExecState.SUCCEEDED
    assert next_exec(ExecState.SUCCEEDED, ExecEvent.COMMITTED) is None


@pytest.mark.parametrize(
    ("event", "target"),
    [
        (ExecEvent.DOWNLOADING, ExecState.DOWNLOADING),
        (ExecEvent.INSTALLING, ExecState.INSTALLING),
        (ExecEvent.PROBATION, ExecState.PROBATION),
        (ExecEvent.COMMITTED, ExecState.SUCCEEDED),
        (ExecEvent.FAILED, ExecState.FAILED),
        (ExecEvent.REVERTED, ExecState.ROLLED_BACK),
    ],
)
def test_a_timed_out_device_that_speaks_again_moves_on(event: ExecEvent, target: ExecState) -> None:
    assert next_exec(ExecState.TIMED_OUT, event) is target


@pytest.mark.parametrize("state", sorted(TOUCHED - {ExecState.ROLLING_BACK, ExecState.ROLLED_BACK}))
def test_every_touched_device_can_be_rolled_back(state: ExecState) -> None:
    assert next_exec(state, ExecEvent.ROLLBACK) is ExecState.ROLLING_BACK


def test_a_queued_device_was_never_touched_and_has_no_rollback_move() -> None:
    assert next_exec(ExecState.QUEUED, ExecEvent.ROLLBACK) is None
    assert [e for (s, e) in EXEC_TRANSITIONS if s is ExecState.QUEUED] == [ExecEvent.NOTIFY]


def test_a_rolling_back_device_returns_or_times_out_and_a_rolled_back_one_takes_nothing() -> None:
    assert next_exec(ExecState.ROLLING_BACK, ExecEvent.REVERTED) is ExecState.ROLLED_BACK
    assert next_exec(ExecState.ROLLING_BACK, ExecEvent.TIMEOUT) is ExecState.TIMED_OUT
    assert [e for (s, e) in EXEC_TRANSITIONS if s is ExecState.ROLLED_BACK] == []


# --------------------------------------------------------------------------------------------------------------
# progress.on_event


def execution(state: ExecState = ExecState.NOTIFIED, **changes: Any) -> Execution:
    base = Execution("rollout-1", "dev-1", 0, 0, state.value, from_release=OLD, desired_seq=FIRST_SEQ,
                     first_seq=FIRST_SEQ, attempts=1, notified_at=NOTIFIED_AT, heard_at=NOTIFIED_AT)  # fmt: skip
    return replace(base, **changes)


def event(
    kind: str,
    *,
    release: str = NEW,
    seq: int = FIRST_SEQ,
    received_at: float = NOTIFIED_AT + 10,
    model: str = "digits",
    **detail: Any,
) -> Event:
    return Event("dev-1", "b" * 32, 42, received_at, kind, model, {"release": release, "seq": seq, **detail},
                 received_at)  # fmt: skip


@pytest.mark.parametrize(
    ("step", "state"),
    [("DOWNLOADING", ExecState.DOWNLOADING), ("SMOKE_TEST", ExecState.INSTALLING), ("PROBATION", ExecState.PROBATION)],
)
def test_install_states_are_the_devices_progress(step: str, state: ExecState) -> None:
    moved = on_event(execution(), event("install_state", state=step), NEW, "digits")
    assert moved is not None
    assert moved.state == state.value
    assert moved.heard_at == NOTIFIED_AT + 10


@pytest.mark.parametrize("seq", [FIRST_SEQ, FIRST_SEQ + 2])
def test_install_committed_of_the_campaign_release_at_or_after_the_first_seq_is_success(seq: int) -> None:
    moved = on_event(execution(ExecState.PROBATION, reason="retry after timeout"), event("install_committed", seq=seq),
                     NEW, "digits")  # fmt: skip
    assert moved is not None
    assert (moved.state, moved.reason) == ("succeeded", None)


@pytest.mark.parametrize(
    "committed",
    [
        event("install_committed", seq=FIRST_SEQ - 1),
        event("install_committed", release="digits:1.2.0"),
        event("install_committed", release=OLD),
        event("install_committed", model="other"),
    ],
    ids=["an-older-desired-seq", "another-release", "the-old-release", "another-model"],
)
def test_install_committed_of_an_older_desired_state_or_another_release_or_model_is_nothing(committed: Event) -> None:
    assert on_event(execution(ExecState.PROBATION), committed, NEW, "digits") is None


def test_install_failed_of_a_verdict_on_the_release_fails_the_device_with_the_reason() -> None:
    moved = on_event(execution(ExecState.INSTALLING), event("install_failed", reason="smoke_mismatch"), NEW, "digits")
    assert moved is not None
    assert (moved.state, moved.reason) == ("failed", "smoke_mismatch")


def test_install_failed_of_a_passing_cause_means_the_device_retries() -> None:
    moved = on_event(execution(ExecState.DOWNLOADING), event("install_failed", reason="download_failed"), NEW, "digits")
    assert moved is not None
    assert (moved.state, moved.reason) == ("retrying", "download_failed")


def test_events_received_before_the_device_was_notified_say_nothing() -> None:
    early = event("install_committed", received_at=NOTIFIED_AT - 1)
    assert on_event(execution(ExecState.PROBATION), early, NEW, "digits") is None
    assert on_event(execution(ExecState.QUEUED, notified_at=None), early, NEW, "digits") is None


def test_a_rejected_desired_state_keeps_the_reason_and_restarts_the_timeout() -> None:
    moved = on_event(execution(), event("desired_rejected", reason="expired"), NEW, "digits")
    assert moved is not None
    assert moved.state == "notified"
    assert moved.reason == "desired state rejected: expired"
    assert moved.heard_at == NOTIFIED_AT + 10


def test_while_rolling_back_only_a_return_to_the_from_release_at_the_rollback_seq_counts() -> None:
    back = execution(ExecState.ROLLING_BACK, rollback_seq=9, reason="device_timeout")
    returned = on_event(back, event("install_committed", release=OLD, seq=9), NEW, "digits")
    assert returned is not None
    assert (returned.state, returned.reason) == ("rolled_back", "device_timeout")
    assert on_event(back, event("install_committed", release=OLD, seq=8), NEW, "digits") is None
    assert on_event(back, event("install_committed", release=NEW, seq=9), NEW, "digits") is None
    assert on_event(back, event("install_failed", release=OLD, seq=9, reason="smoke_mismatch"), NEW, "digits") is None


def test_a_repeated_outcome_moves_a_finished_device_nowhere() -> None:
    done = execution(ExecState.SUCCEEDED)
    again = on_event(done, event("install_committed", received_at=NOTIFIED_AT + 50), NEW, "digits")
    assert again is None or again.state == "succeeded"


def test_a_repeated_retry_notice_changes_nothing_but_when_the_device_was_heard() -> None:
    now = execution(ExecState.RETRYING, reason="download_failed", heard_at=NOTIFIED_AT + 5)
    again = on_event(now, event("install_retry_scheduled", received_at=NOTIFIED_AT + 50), NEW, "digits")
    assert again == replace(now, heard_at=NOTIFIED_AT + 50)


def test_a_duplicate_event_changes_nothing_but_when_the_device_was_heard() -> None:
    now = execution(ExecState.DOWNLOADING, heard_at=NOTIFIED_AT + 5)
    again = on_event(now, event("install_state", state="DOWNLOADING", received_at=NOTIFIED_AT + 50), NEW, "digits")
    assert again == replace(now, heard_at=NOTIFIED_AT + 50)


# --------------------------------------------------------------------------------------------------------------
# progress.on_silence

TIMEOUT, RETRIES = 60.0, 2


def test_a_silent_device_is_not_due_before_its_timeout() -> None:
    assert on_silence(execution(), NOTIFIED_AT + TIMEOUT - 1, TIMEOUT, RETRIES) is None


def test_a_silent_device_with_retries_left_is_sent_again() -> None:
    result = on_silence(execution(attempts=RETRIES), NOTIFIED_AT + TIMEOUT, TIMEOUT, RETRIES)
    assert result is not None
    row, again = result
    assert again is True
    assert (row.state, row.reason) == ("notified", "retry after timeout")


def test_a_silent_device_whose_retries_are_spent_times_out() -> None:
    result = on_silence(execution(attempts=RETRIES + 1), NOTIFIED_AT + TIMEOUT, TIMEOUT, RETRIES)
    assert result is not None
    row, again = result
    assert again is False
    assert (row.state, row.reason) == ("timed_out", "device_timeout")


def test_a_retrying_device_silent_past_its_retries_fails_keeping_its_reason() -> None:
    retrying = execution(ExecState.RETRYING, attempts=RETRIES + 1, reason="download_failed")
    result = on_silence(retrying, NOTIFIED_AT + 2 * TIMEOUT, TIMEOUT, RETRIES)
    assert result is not None
    row, again = result
    assert again is False
    assert (row.state, row.reason) == ("failed", "download_failed")


def test_a_device_silent_during_its_rollback_times_out_as_a_rollback_timeout() -> None:
    back = execution(ExecState.ROLLING_BACK, rollback_seq=9)
    result = on_silence(back, NOTIFIED_AT + TIMEOUT, TIMEOUT, 0)
    assert result is not None
    row, again = result
    assert again is False
    assert (row.state, row.reason) == ("timed_out", "rollback_timeout")


@pytest.mark.parametrize("state", [ExecState.QUEUED, ExecState.SUCCEEDED, ExecState.FAILED, ExecState.TIMED_OUT])
def test_silence_of_a_device_not_in_flight_is_nothing(state: ExecState) -> None:
    assert on_silence(execution(state), NOTIFIED_AT + 100 * TIMEOUT, TIMEOUT, RETRIES) is None


# --------------------------------------------------------------------------------------------------------------
# gates

NO_TELEMETRY = Groups(Sample(), Sample(), Sample())


def test_a_share_gate_is_pending_below_its_minimum() -> None:
    result = gates.share_gate("failed", "failed", 2, 2, 10.0, 3)
    assert result.verdict == gates.PENDING
    assert result.detail == "2 of the 3 devices needed have finished"


def test_one_failure_of_three_finished_devices_trips_a_ten_percent_limit() -> None:
    result = gates.share_gate("failed", "failed", 1, 3, 10.0, 3)
    assert result.verdict == gates.FAIL
    assert result.detail == "failed 1 of 3 devices (33%; limit 10%)"
    assert gates.share_gate("failed", "failed", 0, 3, 10.0, 3).verdict == gates.PASS


def test_a_complete_wave_lowers_the_minimum_to_the_devices_sent() -> None:
    spec = parse_spec(kpis=["none"], min_devices=3, seed=1)
    sent = [
        execution(ExecState.SUCCEEDED, device_id="a"),
        execution(ExecState.FAILED, device_id="b", position=1),
        execution(ExecState.QUEUED, device_id="c", position=2, wave=1, attempts=0),
    ]
    under_way = gates.evaluate(spec, sent, 0, NO_TELEMETRY, wave_complete=False)
    assert [r.verdict for r in under_way] == [gates.PENDING, gates.PENDING]
    done = gates.evaluate(spec, sent, 0, NO_TELEMETRY, wave_complete=True)
    assert [(r.gate, r.verdict) for r in done] == [("failed", gates.FAIL), ("timed_out", gates.PASS)]
    assert done[0].detail == "failed 1 of 2 devices (50%; limit 10%)"
    assert gates.tripped(done) == [done[0]]


# --------------------------------------------------------------------------------------------------------------
# evidence

STARTED_AT = 500.0


def window(device_id: str, release: str, count: int) -> dict[str, Any]:
    latency = [0] * (len(LATENCY_EDGES_MS) + 1)
    latency[5] = count
    confidence = [0] * 10
    confidence[9] = count
    return {"device_id": device_id, "release": release, "count": count, "errors": 0, "latency": latency,
            "confidence": confidence}  # fmt: skip


def test_windows_are_filed_as_baseline_upgraded_or_control_by_release_and_time() -> None:
    evidence = Evidence(NEW, STARTED_AT)
    upgraded = execution(ExecState.PROBATION, device_id="up")
    queued = execution(ExecState.QUEUED, device_id="wait", notified_at=None, heard_at=None, attempts=0)
    evidence.add(window("up", OLD, 1), STARTED_AT - 100, upgraded)  # before the campaign: its baseline
    evidence.add(window("up", OLD, 2), NOTIFIED_AT - 1, upgraded)  # before notification: its baseline too
    evidence.add(window("up", OLD, 4), NOTIFIED_AT + 1, upgraded)  # old release after notification: ignored
    evidence.add(window("up", NEW, 8), NOTIFIED_AT + 2, upgraded)  # the new release: upgraded
    evidence.add(window("wait", OLD, 16), STARTED_AT - 1, queued)  # before the campaign: not the control
    evidence.add(window("wait", OLD, 32), STARTED_AT + 1, queued)  # after the start: the control
    groups = evidence.groups([upgraded, queued])
    assert (groups.baseline.count, groups.upgraded.count, groups.control.count) == (3, 8, 32)
    assert groups.upgraded.devices == frozenset({"up"})
    assert groups.control.devices == frozenset({"wait"})


def test_windows_of_a_third_release_are_neither_baseline_nor_control() -> None:
    evidence = Evidence(NEW, STARTED_AT)
    upgraded = execution(ExecState.PROBATION, device_id="up")
    queued = execution(ExecState.QUEUED, device_id="wait", notified_at=None, heard_at=None, attempts=0)
    evidence.add(window("up", "digits:1.3.0", 64), STARTED_AT - 100, upgraded)  # a rolled-back campaign's release
    evidence.add(window("up", OLD, 2), NOTIFIED_AT - 1, upgraded)
    evidence.add(window("up", NEW, 8), NOTIFIED_AT + 2, upgraded)
    evidence.add(window("wait", "digits:1.3.0", 128), STARTED_AT + 1, queued)
    groups = evidence.groups([upgraded, queued])
    assert (groups.baseline.count, groups.upgraded.count, groups.control.count) == (2, 8, 0)


def test_a_device_without_windows_on_the_new_release_brings_no_baseline() -> None:
    evidence = Evidence(NEW, STARTED_AT)
    notified = execution(device_id="slow")
    evidence.add(window("slow", OLD, 5), STARTED_AT + 1, notified)
    groups = evidence.groups([notified])
    assert (groups.baseline.count, groups.upgraded.count, groups.control.count) == (0, 0, 0)


# --------------------------------------------------------------------------------------------------------------
# spec


def test_a_spec_with_no_options_gets_the_documented_defaults() -> None:
    spec = parse_spec(seed=7)
    assert (spec.waves, spec.soak_s, spec.max_failed, spec.max_timed_out, spec.min_devices) == (
        "10,50,100", 600.0, 10.0, 20.0, 3)  # fmt: skip
    assert (spec.on_failure, spec.device_timeout_s, spec.retries, spec.window, spec.seed) == (
        "rollback", 1800.0, 2, None, 7)  # fmt: skip
    assert [k.metric for k in spec.kpi_gates] == ["latency_p95", "error_rate", "confidence", "accuracy"]


@pytest.mark.parametrize("soak", ["5 minutes", "-1s", ""])
def test_a_duration_that_does_not_parse_is_refused(soak: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_spec(soak=soak)


def test_a_spec_without_a_seed_draws_one_and_keeps_it() -> None:
    spec = parse_spec()
    assert CampaignSpec.from_dict(spec.to_dict()).seed == spec.seed


@pytest.mark.parametrize(
    ("option", "named"),
    [
        pytest.param({"soak": "5 minutes"}, "--soak", id="soak"),
        pytest.param({"device_timeout": "half an hour"}, "--device-timeout", id="device-timeout"),
        pytest.param({"max_failed": 150}, "--max-failed", id="max-failed"),
        pytest.param({"max_timed_out": -1}, "--max-timed-out", id="max-timed-out"),
        pytest.param({"on_failure": "explode"}, "--on-failure", id="on-failure"),
        pytest.param({"kpis": ["p99 < 3"]}, "KPI metric 'p99'", id="kpi"),
        pytest.param({"window": "0 2 * *"}, r"maintenance window '0 2 \* \*'", id="window"),
        pytest.param({"waves": "50,10,100"}, "--waves", id="waves"),
        pytest.param({"retries": -1}, "--retries", id="retries"),
    ],
)
def test_each_bad_option_raises_naming_it(option: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_spec(**option)


def test_kpis_none_turns_every_kpi_gate_off() -> None:
    spec = parse_spec(kpis=["none"], seed=1)
    assert spec.kpis == ()
    assert spec.kpi_gates == ()
    assert [r.gate for r in gates.evaluate(spec, [], 0, NO_TELEMETRY, wave_complete=False)] == ["failed", "timed_out"]


def test_a_spec_comes_back_whole_from_its_stored_form() -> None:
    spec = parse_spec(select="site=north", waves="5d,50%,100%", soak="90s", max_failed=5, kpis=["error_rate <= +0.02"],
                      on_failure="pause", device_timeout="1h", retries=0, window="0 2 * * * 4h", spread_by="site",
                      seed=11)  # fmt: skip
    again = CampaignSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert isinstance(spec.to_dict()["kpis"], list)


def test_the_drift_gate_fails_on_a_persisted_drift_of_the_release_and_waits_until_the_detector_judged_it() -> None:
    def track(scope: str, key: str, state: str) -> DriftTrack:
        moved = "feature 3 down"
        return DriftTrack("digits", scope, key, "data", NEW, state, [True, True], 1.0, [], [], {}, moved, 2.0)

    spec = parse_spec(kpis=["drift"], seed=1)
    assert spec.drift_gate and spec.kpi_gates == ()
    rows = [execution(ExecState.SUCCEEDED, device_id="a"), execution(ExecState.SUCCEEDED, device_id="b")]
    groups = Evidence(NEW, STARTED_AT).groups(rows)

    def verdict(drift: list[DriftTrack] | None) -> gates.GateResult:
        return next(g for g in gates.evaluate(spec, rows, 0, groups, wave_complete=True, drift=drift)
                    if g.gate == "drift")  # fmt: skip

    assert verdict(None).verdict == "pending"
    assert verdict([track("device", "a", "warning")]).verdict == "pass", "a one-round warning is not a drift"
    assert verdict([track("device", "elsewhere", "drift")]).verdict == "pass", "not one of the campaign's devices"
    failed = verdict([track("device", "b", "drift")])
    assert failed.verdict == "fail" and failed.detail == "data drift on device b: feature 3 down"
    assert verdict([track("group", "site=north", "drift")]).verdict == "fail"
