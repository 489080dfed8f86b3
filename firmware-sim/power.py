"""Power loss at an install state, for one simulated device among hundreds in one process (issue 11).

A :class:`PowerSwitch` is a device's fault point (``AgentCore(config, reactor, fault_point=switch)``; see
:mod:`agent.update.journal`): the first time the device's install enters the switch's state, right after that state
was persisted and evented, the switch trips. It records when, sets ``tripped`` and raises :class:`PowerCut` in the
installer's worker thread, which ends that thread there and then. Then, on the reactor thread, :func:`drop` loses the
rest of the device's process state as a power cut does, and the simulator boots a new ``AgentCore`` on the same
``AgentConfig`` (a new boot id): its recovery runs the restart table (:data:`agent.update.states.ON_RESTART`) on
what the first one left on disk.

A switch trips once, and stays tripped. Give the rebuilt core the same switch or none, never a fresh one at the same
state: recovery calls the fault point on the reactor thread, in the ``AgentCore`` constructor (the restart path does,
with the state it found, which is the state of the cut), and a :class:`PowerCut` raised there would end the thread
that builds the core (the reactor's, in the simulator: every device at once), not one device's worker.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from agent.update.states import State

if TYPE_CHECKING:
    from agent.core import AgentCore

#: The install states a power cut can land in: every state of the success path, and REVERTING on the failure path.
CUT_STATES: tuple[State, ...] = (
    State.DOWNLOADING,
    State.VERIFYING,
    State.STAGED,
    State.SMOKE_TEST,
    State.ACTIVATING,
    State.PROBATION,
    State.COMMITTED,
    State.REVERTING,
)


class PowerCut(SystemExit):
    """The power went at an install state: raised by a :class:`PowerSwitch` in the installer's worker thread.

    A SystemExit: the installer's ``except Exception`` handlers do not catch it, so nothing runs after the cut, and a
    thread that it ends ends without a traceback printed."""


class PowerSwitch:
    """A device's fault point that cuts its power the first time its install enters ``state``.

    ``cut_state`` (``state``, once tripped) and ``cut_at`` (``time.monotonic()`` of the cut) are None until then;
    ``tripped`` is set at the cut, so other threads can wait for it.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self.cut_state: State | None = None
        self.cut_at: float | None = None
        self.tripped = threading.Event()

    def __call__(self, state: State) -> None:
        if state is not self.state or self.tripped.is_set():
            return
        self.cut_state, self.cut_at = state, time.monotonic()
        self.tripped.set()
        raise PowerCut(f"power cut at {state.value}")

    def __repr__(self) -> str:
        return f"PowerSwitch({self.state.value}, tripped={self.tripped.is_set()})"


def quiet_power_cuts() -> None:
    """Let a :class:`PowerCut` end its thread without a traceback on stderr: Python's thread excepthook is silent
    for ``SystemExit`` itself only, not for its subclasses. Other exceptions are reported as before; idempotent."""
    previous = threading.excepthook
    if getattr(previous, "quiet_power_cuts", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.exc_value, PowerCut):
            previous(args)

    hook.quiet_power_cuts = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def drop(core: AgentCore) -> None:
    """Lose ``core``'s process state as a power cut does (:meth:`AgentCore.lose_power`): its timers stop, its MQTT
    socket closes with no DISCONNECT (the broker publishes its retained last will, offline), its SQLite handles
    close, its installer's worker is told to stop; no window is flushed, no status written, nothing emitted. Its
    models are not closed (the simulator shares them). Only its files remain: boot a new core on the same config.

    Run it on the reactor thread, queued with ``reactor.call_soon_threadsafe`` once the switch tripped: what the
    worker handed to the reactor before the cut (a status write, an outbox pump) then runs first, and nothing of the
    dropped core runs after it.
    """
    core.lose_power()
