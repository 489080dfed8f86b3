"""What a device's events and silence mean for its execution in a campaign. Pure: rows in, rows out.

A device reports its install through events (``agent.update``): ``desired_accepted``, ``install_state`` at every
step, and one outcome, ``install_committed``, ``install_failed`` or ``rolled_back``, each naming the release and the
seq of the desired state it answers. :func:`on_event` turns one of them into the execution's next row (by the table
of :mod:`fleet.rollout.states`), or None when it says nothing new for it. Only events about the campaign's model, at
or after the first desired state the campaign sent the device, count: an older install of the same release is not
this campaign's. While the device is being rolled back, only its return to ``from_release`` counts.

A device counts as succeeded only on ``install_committed``: after its probation, never at download or activation.

:func:`on_silence` is the device timeout, on the fleet's clock (``received_at``; a device's own clock may be wrong):
an execution in flight that has not been heard from for ``timeout_s`` is sent its desired state again while it has
retries left, else it is ``timed_out`` (or ``failed`` with its last failure, if it did report one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fleet.rollout.states import IN_FLIGHT, ExecEvent, ExecState, next_exec
from fleet.store.rows import Event, Execution

#: The device events the controller reads.
EVENT_TYPES = ("desired_accepted", "desired_rejected", "install_state", "install_committed", "install_failed",
               "rolled_back", "install_retry_scheduled")  # fmt: skip

#: Install states as campaign progress.
_STEP: Mapping[str, ExecEvent] = {
    "DOWNLOADING": ExecEvent.DOWNLOADING,
    "VERIFYING": ExecEvent.INSTALLING,
    "STAGED": ExecEvent.INSTALLING,
    "SMOKE_TEST": ExecEvent.INSTALLING,
    "ACTIVATING": ExecEvent.INSTALLING,
    "PROBATION": ExecEvent.PROBATION,
}

#: Failures whose cause passes by itself: the device tries again on its own (``agent.update.retry``), and the fleet
#: sends the state again after a timeout. An ``install_failed`` says so itself (``retrying``, since agent 0.1.0: a
#: TUF refresh cut by the network is, one refused for a signature is not); for a device that does not, these reasons
#: are taken as passing. Every other reason is a verdict on the release (a signature, a hash, the smoke test,
#: probation, a crash loop) and is never retried.
TRANSIENT_REASONS = frozenset({"download_failed", "download_deadline", "io_error", "disk_full", "internal_error"})


def _detail(event: Event) -> Mapping[str, Any]:
    return event.detail if isinstance(event.detail, dict) else {}


def classify(event: Event, execution: Execution, release: str) -> tuple[ExecEvent | None, str | None, str | None]:
    """What ``event`` says about ``execution`` of a campaign shipping ``release``: the table's event (None: no
    move), with the reason and detail to record. Events of another model, or of an older desired state, say
    nothing."""
    detail = _detail(event)
    seq = detail.get("seq")
    if execution.rollback_seq is not None:
        returned = event.type == "install_committed" and detail.get("release") == execution.from_release
        if returned and isinstance(seq, int) and seq >= execution.rollback_seq:
            return ExecEvent.REVERTED, None, None
        return None, None, None
    if execution.first_seq is None or not isinstance(seq, int) or seq < execution.first_seq:
        return None, None, None
    if detail.get("release") != release:
        return None, None, None
    reason, text = detail.get("reason") or None, detail.get("detail") or None
    if event.type == "install_state":
        return _STEP.get(str(detail.get("state"))), None, None
    if event.type == "install_committed":
        return ExecEvent.COMMITTED, None, None
    if event.type in ("install_failed", "rolled_back"):
        retrying = detail.get("retrying")
        transient = retrying if isinstance(retrying, bool) else reason in TRANSIENT_REASONS
        return (ExecEvent.TRANSIENT if transient else ExecEvent.FAILED), reason, text
    if event.type == "install_retry_scheduled":
        return ExecEvent.TRANSIENT, reason, None
    return None, None, None


def on_event(execution: Execution, event: Event, release: str, model: str) -> Execution | None:
    """The execution after the device's ``event`` (its new row), or None if the event changes nothing.

    Hearing from the device at all (even a late or repeated event, or a rejected desired state) restarts its
    timeout: the device is alive. A rejection is kept as the reason, so a timeout that follows says why."""
    if event.model is not None and event.model != model:
        return None
    heard = replace(execution, heard_at=max(execution.heard_at or 0.0, event.received_at))
    if execution.notified_at is None or event.received_at < execution.notified_at:
        return None
    if event.type == "desired_rejected":
        detail = _detail(event)
        return replace(heard, reason=f"desired state rejected: {detail.get('reason')}", detail=detail.get("detail"))
    alive = heard if heard.heard_at != execution.heard_at else None
    move, reason, text = classify(event, execution, release)
    if move is None:
        return alive if event.type in ("desired_accepted", "install_retry_scheduled") else None
    state = next_exec(ExecState(execution.state), move)
    if state is None:
        return alive
    if state is ExecState(execution.state) and reason is None:
        return heard
    if state is ExecState.SUCCEEDED:
        return replace(heard, state=state.value, reason=None, detail=None)
    # A failure says why; a step or a return keeps the last reason (why it retried, why it was rolled back).
    return replace(heard, state=state.value, reason=reason or execution.reason, detail=text or execution.detail)


def on_silence(execution: Execution, now: float, timeout_s: float, retries: int) -> tuple[Execution, bool] | None:
    """The execution after ``timeout_s`` of silence at ``now`` (fleet clock), or None while it is not due: the new
    row, and whether the device is to be sent its desired state again (a retry)."""
    state = ExecState(execution.state)
    if state not in IN_FLIGHT and state is not ExecState.ROLLING_BACK:
        return None
    since = max(execution.heard_at or 0.0, execution.notified_at or 0.0)
    if now - since < timeout_s:
        return None
    silent = f"silent for {now - since:.0f} s"
    if state is ExecState.ROLLING_BACK:
        return replace(execution, state=ExecState.TIMED_OUT.value, reason="rollback_timeout", detail=silent), False
    if execution.attempts <= retries:
        why = execution.reason if state is ExecState.RETRYING else "timeout"
        return replace(execution, reason=f"retry after {why}", detail=silent), True
    if state is ExecState.RETRYING:
        return replace(execution, state=ExecState.FAILED.value), False
    return replace(execution, state=ExecState.TIMED_OUT.value, reason="device_timeout", detail=silent), False
