"""Faults on one simulated device, as its plan (:class:`firmware_sim.scenario.DevicePlan`) schedules them.

Network faults act in the network, not in the agent: a device with one reaches the broker and the release repository
through its own links of the run's proxy (:mod:`firmware_sim.netfaults`), which drop, black-hole, slow or cut what
flows. A silent device with its connection open is the agent's link held (:meth:`agent.link.MqttLink.hold`): the
keepalive goes on, nothing is published. Clock skew is the device's clock (the agent reads one clock for windows,
events and TUF expiry). Power loss is :mod:`firmware_sim.power`'s switch, armed from the fault's start.

The proxied addresses are plain TCP: a device that reaches an ``mqtts://`` broker through the proxy would check the
broker's certificate against 127.0.0.1, so network faults are for plain ``mqtt://`` brokers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from urllib.parse import urlsplit, urlunsplit

from agent.broker_address import BrokerAddress
from agent.config import UpdateConfig
from agent.link import MqttLink
from agent.reactor import Reactor, Timer
from agent.update.states import State
from firmware_sim.netfaults import FaultyLink, Proxy
from firmware_sim.scenario import DevicePlan, Scheduled


@dataclass
class RunClock:
    """Seconds into the run, from the moment it starts (0 before), on the monotonic clock."""

    started: float | None = None

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started


def device_clock(plan: DevicePlan, run: RunClock) -> Callable[[], float]:
    """The device's wall clock: the real one, off by every ``clock_skew`` active at the moment."""
    skews = plan.of("clock_skew")
    if not skews:
        return time.time

    def clock() -> float:
        elapsed = run.elapsed()
        return time.time() + sum(float(s.fault.setting("offset")) for s in skews if s.active(elapsed))

    return clock


def armed(fault_point: Callable[[State], None], start_s: float, run: RunClock) -> Callable[[State], None]:
    """``fault_point`` from ``start_s`` into the run on; before that, install states pass it by."""

    def point(state: State) -> None:
        if run.elapsed() >= start_s:
            fault_point(state)

    return point


class DeviceFaults:
    """The network faults of one device: its proxy links and the timers that switch them."""

    def __init__(self, device_id: str, plan: DevicePlan, proxy: Proxy | None, run: RunClock) -> None:
        self.plan = plan
        self._device_id = device_id
        self._proxy = proxy
        self._run = run
        self._links: list[FaultyLink] = []
        self._repo: FaultyLink | None = None
        self._timers: list[Timer] = []

    def broker(self, address: BrokerAddress) -> BrokerAddress:
        """Where the device connects for ``address``: the address itself, or its link of the proxy."""
        if self._proxy is None or not self.plan.network_faults:
            return address
        link = self._proxy.link(address.host, address.port, f"{self._device_id}/mqtt")
        self._links.append(link)
        return BrokerAddress(link.host, link.port, address.tls)

    def update(self, update: UpdateConfig | None) -> UpdateConfig | None:
        """The device's ``[update]`` with the repository reached through its link of the proxy, when it has one."""
        if update is None or self._proxy is None or not self.plan.network_faults:
            return update
        url = urlsplit(update.repo_url)
        https = url.scheme == "https"
        self._repo = self._proxy.link(url.hostname or "127.0.0.1", url.port or (443 if https else 80),
                                      f"{self._device_id}/repo")  # fmt: skip
        self._links.append(self._repo)
        netloc = f"{self._repo.host}:{self._repo.port}"
        return replace(update, repo_url=urlunsplit(url._replace(netloc=netloc)))

    def arm(self, reactor: Reactor, link: Callable[[], MqttLink]) -> None:
        """Schedule every fault from now (the run's start); ``link`` gives the device's current MQTT link."""
        for s in self.plan.faults:
            match s.fault.kind:
                case "silent" if s.fault.setting("connection") == "open":
                    self._between(reactor, s, lambda: link().hold(True), lambda: link().hold(False))
                case "silent":
                    self._between(reactor, s, lambda: self._each(FaultyLink.down, True),
                                  lambda: self._each(FaultyLink.down, False))  # fmt: skip
                case "flaky_link":
                    for at in s.disconnects:
                        self._at(reactor, at, lambda: self._each(FaultyLink.disconnect))
                    for at, length in s.blackholes:
                        self._at(reactor, at, lambda: self._each(FaultyLink.blackhole, True))
                        self._at(reactor, at + length, lambda: self._each(FaultyLink.blackhole, False))
                case "slow_download" if self._repo is not None:
                    rate = float(s.fault.setting("rate"))
                    self._between(reactor, s, partial(self._repo_set, FaultyLink.throttle, rate),
                                  partial(self._repo_set, FaultyLink.throttle, None))  # fmt: skip
                case "cut_download" if self._repo is not None:
                    cut = partial(FaultyLink.cut_after, times=int(s.fault.setting("times")))
                    self._between(reactor, s, partial(self._repo_set, cut, int(s.fault.setting("after"))),
                                  partial(self._repo_set, FaultyLink.cut_after, None))  # fmt: skip

    def network(self) -> dict[str, dict[str, int]]:
        """What the proxy did to the device's traffic (by link: mqtt, repo): for the report."""
        return {link.name.rpartition("/")[2]: link.stats() for link in self._links}

    def restarted(self, link: MqttLink) -> None:
        """A new core after a power cut: hold its link if the device is silent with its connection open now."""
        elapsed = self._run.elapsed()
        if any(s.active(elapsed) and s.fault.setting("connection") == "open" for s in self.plan.of("silent")):
            link.hold(True)

    def lift(self) -> None:
        """The run ended: stop the timers and give the network back, so what was kept can still be delivered; a
        device silent at the end stays silent (it owes the fleet nothing)."""
        for timer in self._timers:
            timer.cancel()
        silent = self.plan.silent_at(self._run.elapsed())
        for link in self._links:
            link.blackhole(False)
            link.throttle(None)
            link.cut_after(None)
            if not silent:
                link.down(False)

    def _each(self, action: Callable[..., None], *args: object) -> None:
        for link in self._links:
            action(link, *args)

    def _repo_set(self, action: Callable[..., None], value: object) -> None:
        if self._repo is not None:
            action(self._repo, value)

    def _at(self, reactor: Reactor, at_s: float, action: Callable[[], None]) -> None:
        self._timers.append(reactor.call_later(max(0.0, at_s - self._run.elapsed()), action))

    def _between(self, reactor: Reactor, s: Scheduled, on: Callable[[], None], off: Callable[[], None]) -> None:
        self._at(reactor, s.fault.start_s, on)
        if s.fault.end_s is not None:
            self._at(reactor, s.fault.end_s, off)
