"""The reactor runs timers on schedule and hands work over from other threads."""

from __future__ import annotations

import threading

from agent.reactor import Reactor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_periodic_timers_keep_their_grid_and_skip_missed_beats() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    beats: list[float] = []
    reactor.call_every(10.0, lambda: beats.append(clock.now))
    for t in (1005, 1010, 1015, 1020, 1055):
        clock.now = t
        reactor.run_once(max_wait=0)
    clock.now = 1060
    reactor.run_once(max_wait=0)
    assert beats == [1010, 1020, 1055, 1060]


def test_a_cancelled_timer_never_fires() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    fired: list[str] = []
    reactor.call_later(1, lambda: fired.append("once")).cancel()
    periodic = reactor.call_every(1, lambda: fired.append("tick"))
    clock.now += 1
    reactor.run_once(max_wait=0)
    periodic.cancel()
    clock.now += 5
    reactor.run_once(max_wait=0)
    assert fired == ["tick"]


def test_a_failing_callback_does_not_stop_the_loop() -> None:
    clock = FakeClock()
    reactor = Reactor(clock=clock)
    fired: list[int] = []
    reactor.call_later(0, lambda: 1 / 0)
    reactor.call_later(0, lambda: fired.append(1))
    reactor.run_once(max_wait=0)
    assert fired == [1]


def test_other_threads_hand_work_to_the_reactor_and_can_stop_it() -> None:
    reactor = Reactor()
    ran_on: list[str] = []
    thread = reactor.start_thread("test-reactor")
    reactor.call_soon_threadsafe(lambda: ran_on.append(threading.current_thread().name))
    reactor.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert ran_on == ["test-reactor"]
