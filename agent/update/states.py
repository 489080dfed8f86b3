"""The install state machine as data: states, events, the transition table and the restart table. Pure: no I/O.

The installer (:mod:`agent.update.install`) persists a state before its work begins and asks :func:`next_state`
for every move, so the order of an install's steps is this table's, not the installer's::

    IDLE/COMMITTED --START--> DOWNLOADING --DONE--> VERIFYING --DONE--> STAGED --DONE--> SMOKE_TEST --DONE-->
        ACTIVATING --DONE--> PROBATION --DONE--> COMMITTED
    any state but REVERTING --FAIL--> REVERTING --DONE--> IDLE
    DOWNLOADING, VERIFYING, STAGED, SMOKE_TEST --RESUME--> DOWNLOADING      (an install a restart interrupted)

FAIL from IDLE or COMMITTED is a damaged or unloadable active slot found at start-up, or (COMMITTED) a crash loop of
the agent soon after the commit. What a start does in each state is :data:`ON_RESTART`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum, StrEnum
from types import MappingProxyType

from agent.errors import EdgefleetError


class State(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    SMOKE_TEST = "SMOKE_TEST"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    REVERTING = "REVERTING"


class Event(StrEnum):
    """What happened to an install, as the table reads it."""

    #: A desired state names a release this device does not run.
    START = "start"
    #: The worker takes up an install that a restart interrupted before the active model was touched.
    RESUME = "resume"
    #: The state's work succeeded.
    DONE = "done"
    #: The install cannot go on: a failed check, a newer desired state, a damaged slot, a crash loop (also one soon
    #: after the commit).
    FAIL = "fail"


#: States with no install under way.
AT_REST = frozenset({State.IDLE, State.COMMITTED})

_S, _E = State, Event
#: The whole machine: (state, event) -> next state. A pair that is not here is an illegal move.
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType(
    {
        (_S.IDLE, _E.START): _S.DOWNLOADING,
        (_S.IDLE, _E.FAIL): _S.REVERTING,
        (_S.COMMITTED, _E.START): _S.DOWNLOADING,
        (_S.COMMITTED, _E.FAIL): _S.REVERTING,
        (_S.DOWNLOADING, _E.DONE): _S.VERIFYING,
        (_S.DOWNLOADING, _E.RESUME): _S.DOWNLOADING,
        (_S.DOWNLOADING, _E.FAIL): _S.REVERTING,
        (_S.VERIFYING, _E.DONE): _S.STAGED,
        (_S.VERIFYING, _E.RESUME): _S.DOWNLOADING,
        (_S.VERIFYING, _E.FAIL): _S.REVERTING,
        (_S.STAGED, _E.DONE): _S.SMOKE_TEST,
        (_S.STAGED, _E.RESUME): _S.DOWNLOADING,
        (_S.STAGED, _E.FAIL): _S.REVERTING,
        (_S.SMOKE_TEST, _E.DONE): _S.ACTIVATING,
        (_S.SMOKE_TEST, _E.RESUME): _S.DOWNLOADING,
        (_S.SMOKE_TEST, _E.FAIL): _S.REVERTING,
        (_S.ACTIVATING, _E.DONE): _S.PROBATION,
        (_S.ACTIVATING, _E.FAIL): _S.REVERTING,
        (_S.PROBATION, _E.DONE): _S.COMMITTED,
        (_S.PROBATION, _E.FAIL): _S.REVERTING,
        (_S.REVERTING, _E.DONE): _S.IDLE,
    }
)


class IllegalTransition(EdgefleetError):
    """A move the table does not have: a bug in the installer, so it is reported as ``internal_error``."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__("internal_error", f"{state.value} --{event.value}--> is not a transition")


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; :class:`IllegalTransition` if the table has no such move."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(state, event) from None


class Restart(Enum):
    """What a start does for a model found in each state (after a SIGKILL, a power cut, or a clean stop)."""

    NOTHING = "serve the active slot"
    WATCH_COMMIT = "serve the active slot; within the commit watch an unclean start counts, and a crash loop reverts"
    RESTART = "the active model was never touched: serve it; the worker restarts the install from DOWNLOADING"
    COMPLETE_ACTIVATION = "re-verify the staged release and make it active (PROBATION), or revert if it fails"
    CONTINUE_PROBATION = "serve the release on probation and start its probation over"
    COMPLETE_REVERT = "finish the revert before anything is served"


ON_RESTART: Mapping[State, Restart] = MappingProxyType(
    {
        _S.IDLE: Restart.NOTHING,
        _S.COMMITTED: Restart.WATCH_COMMIT,
        _S.DOWNLOADING: Restart.RESTART,
        _S.VERIFYING: Restart.RESTART,
        _S.STAGED: Restart.RESTART,
        _S.SMOKE_TEST: Restart.RESTART,
        _S.ACTIVATING: Restart.COMPLETE_ACTIVATION,
        _S.PROBATION: Restart.CONTINUE_PROBATION,
        _S.REVERTING: Restart.COMPLETE_REVERT,
    }
)
