"""The two state machines of a rollout, as data: a campaign's and each device's execution. Pure: no I/O.

The campaign (``TRANSITIONS``)::

    pending --start--> running --complete--> succeeded
    running --pause--> paused --resume--> running                        (an operator, or a gate with on_failure=pause)
    pending, running, paused, succeeded, aborted --rollback--> rolling_back --reverted--> rolled_back
    pending, running, paused --abort--> aborted                          (nothing more is sent; nothing is undone)

A device's execution (``EXEC_TRANSITIONS``)::

    queued --notify--> notified --downloading--> downloading --installing--> installing --probation--> probation
        --committed--> succeeded
    notified .. probation --failed--> failed;  --transient--> retrying (the device tries again by itself)
    failed --transient--> retrying                                       (the device's retry notice came after it)
    notified .. probation, retrying --timeout--> timed_out
    in flight, failed, timed_out --notify--> notified                    (a retry: a new desired state, same release)
    any touched state --rollback--> rolling_back --reverted--> rolled_back;  rolling_back --timeout--> timed_out
    timed_out --reverted--> rolled_back                                  (silent during its rollback, back later)

Progress events may arrive late or twice (a device's outbox resends after a reconnect): a move that is not in the
table is no move (:func:`next_exec` returns None), so an old "downloading" never drags a succeeded device back, and a
device counts once whatever the order. A timed-out device that speaks again takes up where its events say it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class CampaignState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class CampaignEvent(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    COMPLETE = "complete"
    REVERTED = "reverted"


#: States in which the controller still has work: everything but the three ends.
ACTIVE = frozenset({CampaignState.PENDING, CampaignState.RUNNING, CampaignState.PAUSED, CampaignState.ROLLING_BACK})
ENDED = frozenset(CampaignState) - ACTIVE

_C, _CE = CampaignState, CampaignEvent
TRANSITIONS: Mapping[tuple[CampaignState, CampaignEvent], CampaignState] = MappingProxyType(
    {
        (_C.PENDING, _CE.START): _C.RUNNING,
        (_C.PENDING, _CE.ABORT): _C.ABORTED,
        (_C.PENDING, _CE.ROLLBACK): _C.ROLLING_BACK,
        (_C.RUNNING, _CE.PAUSE): _C.PAUSED,
        (_C.RUNNING, _CE.ABORT): _C.ABORTED,
        (_C.RUNNING, _CE.ROLLBACK): _C.ROLLING_BACK,
        (_C.RUNNING, _CE.COMPLETE): _C.SUCCEEDED,
        (_C.PAUSED, _CE.RESUME): _C.RUNNING,
        (_C.PAUSED, _CE.ABORT): _C.ABORTED,
        (_C.PAUSED, _CE.ROLLBACK): _C.ROLLING_BACK,
        (_C.SUCCEEDED, _CE.ROLLBACK): _C.ROLLING_BACK,
        (_C.ABORTED, _CE.ROLLBACK): _C.ROLLING_BACK,
        (_C.ROLLING_BACK, _CE.REVERTED): _C.ROLLED_BACK,
    }
)


class IllegalMove(ValueError):
    """A campaign event its state does not take (pausing a finished campaign, say)."""


def next_campaign(state: CampaignState, event: CampaignEvent) -> CampaignState:
    """The campaign's next state; :class:`IllegalMove` names what the state does take."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        takes = sorted(e.value for (s, e) in TRANSITIONS if s is state)
        allowed = f"it takes {', '.join(takes)}" if takes else "it has ended"
        article = "an" if state.value[0] in "aeiou" else "a"
        raise IllegalMove(f"{article} {state.value} campaign cannot {event.value}: {allowed}") from None


class ExecState(StrEnum):
    QUEUED = "queued"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    PROBATION = "probation"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class ExecEvent(StrEnum):
    NOTIFY = "notify"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    PROBATION = "probation"
    COMMITTED = "committed"
    FAILED = "failed"
    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    ROLLBACK = "rollback"
    REVERTED = "reverted"


_S, _E = ExecState, ExecEvent
#: Where an update is under way on the device: the device-timeout clock runs in these.
IN_FLIGHT = frozenset({_S.NOTIFIED, _S.DOWNLOADING, _S.INSTALLING, _S.PROBATION, _S.RETRYING})
#: Sent the release (now or before): the devices a rollback returns to their last committed release.
TOUCHED = frozenset({*IN_FLIGHT, _S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT, _S.ROLLING_BACK, _S.ROLLED_BACK})
#: Done with the release, for the wave's progress and the gates' counts.
FINISHED = frozenset({_S.SUCCEEDED, _S.FAILED, _S.TIMED_OUT})

#: How far along the install each progress event says the device is: a device only moves forward.
_PROGRESS = (_E.DOWNLOADING, _E.INSTALLING, _E.PROBATION)
_STEP = {_E.DOWNLOADING: _S.DOWNLOADING, _E.INSTALLING: _S.INSTALLING, _E.PROBATION: _S.PROBATION}


def _exec_table() -> dict[tuple[ExecState, ExecEvent], ExecState]:
    table: dict[tuple[ExecState, ExecEvent], ExecState] = {(_S.QUEUED, _E.NOTIFY): _S.NOTIFIED}
    # From each in-flight state (and from timed_out: the device spoke again), forward only.
    ladder = (_S.NOTIFIED, _S.DOWNLOADING, _S.INSTALLING, _S.PROBATION)
    for rank, state in enumerate((*ladder, _S.RETRYING, _S.TIMED_OUT)):
        for event in _PROGRESS:
            target = _STEP[event]
            if state in (_S.RETRYING, _S.TIMED_OUT) or ladder.index(target) > rank:
                table[(state, event)] = target
        table[(state, _E.COMMITTED)] = _S.SUCCEEDED
        table[(state, _E.FAILED)] = _S.FAILED
        table[(state, _E.TRANSIENT)] = _S.RETRYING
        if state is not _S.TIMED_OUT:
            table[(state, _E.TIMEOUT)] = _S.TIMED_OUT
    for state in (*IN_FLIGHT, _S.FAILED, _S.TIMED_OUT):
        table[(state, _E.NOTIFY)] = _S.NOTIFIED
    table[(_S.FAILED, _E.TRANSIENT)] = _S.RETRYING  # its retry notice came after the failure
    for state in TOUCHED - {_S.ROLLING_BACK, _S.ROLLED_BACK}:
        table[(state, _E.ROLLBACK)] = _S.ROLLING_BACK
    table[(_S.ROLLING_BACK, _E.REVERTED)] = _S.ROLLED_BACK
    table[(_S.TIMED_OUT, _E.REVERTED)] = _S.ROLLED_BACK  # silent during its rollback, then back after all
    table[(_S.ROLLING_BACK, _E.TIMEOUT)] = _S.TIMED_OUT
    return table


#: The whole execution machine: (state, event) -> next state. A pair that is not here is no move.
EXEC_TRANSITIONS: Mapping[tuple[ExecState, ExecEvent], ExecState] = MappingProxyType(_exec_table())


def next_exec(state: ExecState, event: ExecEvent) -> ExecState | None:
    """The execution's next state, or None when the table has no such move (a late or repeated event)."""
    return EXEC_TRANSITIONS.get((state, event))
